"""Peer tools for the storage benchmark (``bench/storage.py``).

Every peer answers "how many bytes would this tool keep for this file / this series?"
on the same files coralfs stores. Missing tools raise :class:`PeerMissing` so the
benchmark can print "n/a (not installed)" instead of crashing.

Per-file peers (each version compressed on its own, or against the previous one):

* ``zstd``        python ``zstandard`` level 3 (same format and level as ``zstd -3``).
* ``zipnn``       ZipNN byte-grouping in byte mode with the file's dominant float dtype.
* ``zipnn-delta`` ZipNN's own delta mode (``delta_compressed_type="byte"``: XOR with the
                  previous version, then byte grouping); needs equal lengths.
* ``zstd-patch``  ``zstd -3 --patch-from=PREV --long=W``.
* ``xdelta3``     ``xdelta3 -e -B SRC -s PREV``.

Repository peers (content-defined chunking + dedup, one repo for the whole series):

* ``restic``      repository format 2 (zstd "auto" compression).
* ``borg``        ``borg init -e none``; ``borg create`` with lz4 (borg's default) and
                  with ``--compression zstd,3`` (two repositories).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zstandard

PER_FILE_PEERS: tuple[str, ...] = ("zstd", "zipnn", "zipnn-delta", "zstd-patch", "xdelta3")
REPO_PEERS: tuple[str, ...] = ("restic", "borg-lz4", "borg-zstd3")
ALL_PEERS: tuple[str, ...] = PER_FILE_PEERS + REPO_PEERS
# what --skip-peers accepts besides the names above
PEER_ALIASES: dict[str, tuple[str, ...]] = {"borg": ("borg-lz4", "borg-zstd3")}

# safetensors / torch dtype names (as coralfs.formats reports them) -> ZipNN bytearray_dtype
ZIPNN_DTYPES: dict[str, str] = {
    "F32": "float32", "float32": "float32", "FLOAT": "float32",
    "BF16": "bfloat16", "bfloat16": "bfloat16", "BFLOAT16": "bfloat16",
    "F16": "float16", "float16": "float16", "HALF": "float16",
}


class PeerMissing(Exception):
    """The tool (binary or Python package) is not installed."""


class PeerFailed(Exception):
    """The tool ran but failed or produced output that does not decode to the input."""


def _run(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
         stdout: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[bytes]:
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    p = subprocess.run(list(cmd), env=full_env, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, check=False)
    if p.returncode != 0:
        raise PeerFailed(f"{' '.join(map(str, cmd))} exited {p.returncode}: "
                         f"{p.stderr.decode(errors='replace').strip()[-500:]}")
    return p


def which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise PeerMissing(tool)
    return path


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """``du -sb PATH`` (apparent size, directories included), as an int."""
    p = _run(["du", "-sb", os.fspath(path)], stdout=subprocess.PIPE)
    return int(p.stdout.split()[0])


def available(name: str) -> str | None:
    """None if peer ``name`` can run here, else why not."""
    try:
        if name == "zstd":
            return None
        if name in ("zipnn", "zipnn-delta"):
            import zipnn  # noqa: F401
        elif name == "zstd-patch":
            which("zstd")
        elif name == "xdelta3":
            which("xdelta3")
        elif name == "restic":
            which("restic")
        elif name in ("borg-lz4", "borg-zstd3"):
            which("borg")
        else:
            raise ValueError(f"unknown peer {name!r}")
    except (PeerMissing, ImportError):
        return "not installed"
    return None


# ---------------------------------------------------------------------------- per-file peers
def zstd3(data: bytes | memoryview) -> int:
    return len(zstandard.ZstdCompressor(level=3).compress(data))


def xor_zstd3(data: bytes, prev: bytes) -> int:
    """zstd -3 of ``data XOR prev`` (equal lengths): ZipNN's delta idea for non-float files."""
    x = np.bitwise_xor(np.frombuffer(data, np.uint8), np.frombuffer(prev, np.uint8))
    return zstd3(x.tobytes())


def zipnn_dtype(dtype_bytes: Mapping[str, int]) -> str | None:
    """ZipNN bytearray_dtype for a file whose tensor bytes per dtype are ``dtype_bytes``."""
    floats = {ZIPNN_DTYPES[d]: n for d, n in dtype_bytes.items() if d in ZIPNN_DTYPES}
    if not floats:
        return None
    total = sum(dtype_bytes.values())
    best, n = max(floats.items(), key=lambda kv: kv[1])
    return best if n >= total / 2 else None


def _zipnn(dtype: str, delta: bool):
    from zipnn import ZipNN

    kw = {"delta_compressed_type": "byte"} if delta else {}
    return ZipNN(input_format="byte", bytearray_dtype=dtype, threads=2, **kw)


ZIPNN_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}


def zipnn_compress(data: bytes, dtype: str, prev: bytes | None = None, verify: bool = False) -> int:
    """Size of ZipNN's output for ``data`` (XOR-delta against ``prev`` when given).

    Two ZipNN 0.5.4 quirks are worked around here:

    * its C core reorders the input buffer IN PLACE (even a ``bytes`` object), so it
      always gets a private copy;
    * a buffer whose length is not a multiple of the element width corrupts the heap
      (glibc aborts), so ZipNN gets the aligned prefix and the last ``len % width``
      bytes (at most 3) are counted as stored verbatim.
    """
    if prev is not None and len(prev) != len(data):
        raise ValueError("ZipNN delta needs equal lengths")
    n = len(data) - len(data) % ZIPNN_WIDTH[dtype]
    tail = len(data) - n
    if n == 0:
        return len(data)
    z = _zipnn(dtype, prev is not None)
    if prev is None:
        out = bytes(z.compress(bytearray(data[:n])))
    else:
        out = bytes(z.compress(bytearray(data[:n]), delta_second_data=bytearray(prev[:n])))
    if verify:
        d = _zipnn(dtype, prev is not None)
        back = d.decompress(out) if prev is None else d.decompress(out, delta_second_data=bytearray(prev[:n]))
        if bytes(back) != data[:n]:
            raise PeerFailed("ZipNN round trip does not match the input")
    return len(out) + tail


def long_window_log(*sizes: int) -> int:
    """zstd --long window log covering all of ``sizes`` together (27..31)."""
    return max(27, min(31, math.ceil(math.log2(max(1, sum(sizes))))))


def zstd_patch(prev: str, cur: str, out: str, verify: bool = False) -> int:
    """``zstd -3 --patch-from=prev cur``: size of the patch."""
    zstd = which("zstd")
    w = long_window_log(os.path.getsize(prev), os.path.getsize(cur))
    _run([zstd, "-q", "-f", "-3", f"--long={w}", f"--patch-from={prev}", cur, "-o", out])
    if verify:
        back = out + ".check"
        try:
            _run([zstd, "-q", "-f", "-d", f"--long={w}", f"--patch-from={prev}", out, "-o", back])
            if not _same_file(back, cur):
                raise PeerFailed(f"zstd --patch-from round trip does not match {cur}")
        finally:
            _unlink(back)
    return os.path.getsize(out)


def zstd_cli(cur: str, out: str) -> int:
    """``zstd -3 cur`` (what zstd-patch does for a file with no previous version)."""
    _run([which("zstd"), "-q", "-f", "-3", cur, "-o", out])
    return os.path.getsize(out)


def xdelta3_source_window(prev_size: int) -> int:
    """-B big enough to hold the whole source (xdelta3's default is 64 MiB)."""
    return max(64 << 20, 1 << math.ceil(math.log2(max(1, prev_size))))


def xdelta3(prev: str | None, cur: str, out: str, verify: bool = False) -> int:
    """``xdelta3 -e -s prev cur out`` (or plain ``xdelta3 -e cur out`` with no previous version)."""
    x = which("xdelta3")
    if prev is None:
        _run([x, "-e", "-f", cur, out])
    else:
        _run([x, "-e", "-f", "-B", str(xdelta3_source_window(os.path.getsize(prev))), "-s", prev, cur, out])
    if verify:
        back = out + ".check"
        try:
            src = [] if prev is None else ["-B", str(xdelta3_source_window(os.path.getsize(prev))), "-s", prev]
            _run([x, "-d", "-f", *src, out, back])
            if not _same_file(back, cur):
                raise PeerFailed(f"xdelta3 round trip does not match {cur}")
        finally:
            _unlink(back)
    return os.path.getsize(out)


def _same_file(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(8 << 20)
            if x != fb.read(8 << 20):
                return False
            if not x:
                return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------- repository peers
class ResticRepo:
    """One restic repository (format 2, default "auto" zstd compression) for a series."""

    name = "restic"

    def __init__(self, root: Path) -> None:
        self.exe = which("restic")
        self.repo = root / "repo"
        self.env = {"RESTIC_PASSWORD": "coralfs-bench", "RESTIC_REPOSITORY": str(self.repo),
                    "RESTIC_CACHE_DIR": str(root / "cache"), "RESTIC_PROGRESS_FPS": "0"}
        _run([self.exe, "init", "--repository-version", "2"], env=self.env)
        self.empty = tree_bytes(self.repo)

    def backup(self, work: Path, label: str) -> None:
        _run([self.exe, "backup", "--quiet", "--host", "bench", "--tag", label, "."], env=self.env, cwd=work)

    def size(self) -> int:
        return tree_bytes(self.repo) - self.empty


class BorgRepo:
    """One unencrypted borg repository with a given ``--compression`` for a series."""

    def __init__(self, root: Path, compression: str, name: str) -> None:
        self.exe = which("borg")
        self.name = name
        self.compression = compression
        self.repo = root / "repo"
        self.env = {"BORG_BASE_DIR": str(root / "base"), "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_PASSPHRASE": ""}
        _run([self.exe, "init", "-e", "none", str(self.repo)], env=self.env)
        self.empty = tree_bytes(self.repo)

    def backup(self, work: Path, label: str) -> None:
        _run([self.exe, "create", "--compression", self.compression, f"{self.repo}::{label}", "."],
             env=self.env, cwd=work)

    def size(self) -> int:
        return tree_bytes(self.repo) - self.empty


def make_repo_peer(name: str, root: Path) -> ResticRepo | BorgRepo:
    root.mkdir(parents=True, exist_ok=True)
    if name == "restic":
        return ResticRepo(root)
    if name == "borg-lz4":
        return BorgRepo(root, "lz4", name)
    if name == "borg-zstd3":
        return BorgRepo(root, "zstd,3", name)
    raise ValueError(f"unknown repository peer {name!r}")
