"""The FUSE mount: the view (what a repository looks like as a file system), its inodes, writes, the libfuse adapter and the daemon."""
