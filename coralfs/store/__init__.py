"""The store: LMDB environment and transactions, key layout, refs, objects, the object store, the gc interlock."""
