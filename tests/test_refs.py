"""store/refs.py: one Refs view over a transaction (dulwich's RefsContainer is the model):
reads, compare-and-swap updates, and the stored bytes every earlier version wrote."""

from __future__ import annotations

import pytest

from coralfs.errors import ConcurrentUpdate, RefExists
from coralfs.repository import Repository
from coralfs.store import refs
from coralfs.store.refs import Refs

A, B, C = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32


@pytest.fixture
def store(tmp_path):
    with Repository.init(tmp_path / "r") as repo:
        yield repo.store


def _read(store):
    """A read transaction's Refs, as a context manager."""
    class _Ctx:
        def __enter__(self):
            self.cm = store.read()
            return Refs(self.cm.__enter__())

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    return _Ctx()


def test_head_attached_detached_and_the_bytes_stored(store):
    with _read(store) as r:
        assert r.head() == "main" and r.follow_head() == ("main", None)  # unborn
    store.write(lambda t: Refs(t).add_if_new(refs.branch_ref("main"), A))
    with _read(store) as r:
        assert r.follow_head() == ("main", A)
        assert r.t.get("refs", b"HEAD") == b"ref:branch:main" and r.t.get("refs", b"branch:main") == A
    store.write(lambda t: Refs(t).set_head(B))
    with _read(store) as r:
        assert r.head() == B and r.follow_head() == (None, B) and r.t.get("refs", b"HEAD") == B
    store.write(lambda t: Refs(t).set_head("exp/x"))
    with _read(store) as r:
        assert r.follow_head() == ("exp/x", None)


def test_listing_prefixes_and_namespaces(store):
    def fn(t):
        r = Refs(t)
        for name, v in (("main", A), ("exp/a", B), ("exp/b/c", C), ("exp2", A)):
            r.add_if_new(refs.branch_ref(name), v)
        r.add_if_new(refs.tag_ref("v1"), C)

    store.write(fn)
    with _read(store) as r:
        assert r.branches() == {"main": A, "exp/a": B, "exp/b/c": C, "exp2": A}
        assert r.branches("exp/") == {"exp/a": B, "exp/b/c": C}
        assert r.tags() == {"v1": C} and r.tag("v1") == C and r.tag("v2") is None
        assert r.branch("exp/a") == B and r.branch("exp") is None
        assert r.namespaces(refs.BRANCH) == ["exp", "exp2", "main"]
        assert r.namespaces(refs.branch_ref("exp/")) == ["a", "b"]
        assert r.namespaces(refs.branch_ref("exp/b/")) == ["c"]
        assert r.namespaces(refs.TAG) == ["v1"]
        assert r.all() == {"HEAD": b"ref:branch:main", "branch:main": A, "branch:exp/a": B, "branch:exp/b/c": C,
                           "branch:exp2": A, "tag:v1": C}


def test_compare_and_swap(store):
    ref = refs.branch_ref("main")
    store.write(lambda t: Refs(t).set_if_equals(ref, None, A))  # None: must not exist yet
    with pytest.raises(ConcurrentUpdate, match="branch 'main' moved: expected bbbbbbbbbbbb, found aaaaaaaaaaaa"):
        store.write(lambda t: Refs(t).set_if_equals(ref, B, C))
    with pytest.raises(ConcurrentUpdate):
        store.write(lambda t: Refs(t).set_if_equals(ref, None, C))
    with pytest.raises(RefExists, match="branch 'main' already exists"):
        store.write(lambda t: Refs(t).add_if_new(ref, C))
    with pytest.raises(ConcurrentUpdate):
        store.write(lambda t: Refs(t).delete_if_equals(ref, B))
    with _read(store) as r:
        assert r.branch("main") == A  # nothing changed
    store.write(lambda t: Refs(t).set_if_equals(ref, A, B))
    store.write(lambda t: Refs(t).delete_if_equals(ref, B))
    with _read(store) as r:
        assert r.branch("main") is None
    assert store.write(lambda t: Refs(t).delete(ref)) is False


def test_commit_index_prefix_lookup(tmp_path):
    with Repository.init(tmp_path / "r") as repo:
        ids = [repo.commit_changes("main", {}, f"c{i}", allow_empty=True) for i in range(3)]
        with repo.store.read() as t:
            r = Refs(t)
            assert sorted(r.commits()) == sorted(ids)
            for c in ids:
                assert r.commits(c.hex()[:7]) == [c] and r.has_commit(c)
            assert r.commits("") == r.commits() and not r.has_commit(b"\x00" * 32)
