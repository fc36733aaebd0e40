"""Read a torch.save pickle (``data.pkl``) without executing it.

A restricted unpickler whose ``find_class`` returns inert stand-in classes: no
global named by the pickle is ever imported or called. ``persistent_load`` records
each storage's key and element type; walking the resulting stand-in tree names
every tensor (``model.layer.weight``, ``optimizer.state.0.exp_avg``).

The pickle is hostile until proven otherwise. Before the (C) unpickler runs, a scan of
its opcodes (iterative) bounds what loading it can cost: at most ``MAX_OPS`` opcodes (each
creates at most one object) and memo indices below it, and tuples/frozensets nested at
most ``MAX_NEST`` deep (the unpickler hashes dict keys and set members, and hashing a
tuple recurses in C without a limit: a 1M-deep tuple as a dict key crashed the process).
At most ``MAX_GLOBALS`` distinct stand-in classes are made. The walk that names tensors
is iterative, builds each path once, and stops descending past ``MAX_PATH`` characters.
Whatever fails is ``ValueError`` (the caller then splits the tensors without names and
dtypes); only ``MemoryError`` passes through.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from dataclasses import dataclass
from typing import Any

# torch storage class name -> (dtype, element width)
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("F32", 4), "DoubleStorage": ("F64", 8), "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2), "LongStorage": ("I64", 8), "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2), "CharStorage": ("I8", 1), "ByteStorage": ("U8", 1), "BoolStorage": ("BOOL", 1),
    "ComplexFloatStorage": ("C64", 4), "ComplexDoubleStorage": ("C128", 8), "UInt16Storage": ("U16", 2),
    "UInt32Storage": ("U32", 4), "UInt64Storage": ("U64", 8), "Float8_e4m3fnStorage": ("F8_E4M3", 1),
    "Float8_e5m2Storage": ("F8_E5M2", 1), "Float8_e4m3fnuzStorage": ("F8_E4M3FNUZ", 1),
    "Float8_e5m2fnuzStorage": ("F8_E5M2FNUZ", 1), "Float8_e8m0fnuStorage": ("F8_E8M0", 1),
    "QInt8Storage": ("QI8", 1), "QUInt8Storage": ("QU8", 1), "QInt32Storage": ("QI32", 4),
}
MAX_PICKLE = 64 << 20
MAX_OPS = 4_000_000  # a state dict with 24,000 tensors and its optimizer state: 714,000
MAX_NEST = 256  # tuples and frozensets inside each other
MAX_GLOBALS = 4096  # distinct globals named (torch.save: about ten)
MAX_PATH = 4096  # characters of a tensor's path; deeper values are not named
MAX_NODES = 1_000_000  # containers visited by the naming walk (a 24,000-tensor checkpoint: ~100,000)


@dataclass
class StorageInfo:
    key: str
    dtype: str
    width: int
    numel: int | None
    name: str = ""
    shape: tuple[int, ...] | None = None


class _Stub:
    """Inert stand-in for any global a pickle names. Records what it is given."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        self = object.__new__(cls)
        self.args = args
        self.items = {}
        self.list = []
        self.state = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, v: Any) -> None:
        self.list.append(v)

    def extend(self, vs: Any) -> None:
        self.list.extend(vs)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageInfo] = {}
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> type:  # never imports anything
        key = (module, name)
        cls = self._classes.get(key)
        if cls is None:
            if len(self._classes) >= MAX_GLOBALS:
                raise pickle.UnpicklingError("too many distinct globals")
            cls = self._classes[key] = type(name if name.isidentifier() else "Stub", (_Stub,),
                                            {"_qualname": f"{module}.{name}"})
        return cls

    def persistent_load(self, pid: Any) -> StorageInfo:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        if not isinstance(pid[2], (str, int)) or isinstance(pid[2], bool) or len(str(pid[2])) > 64:
            raise pickle.UnpicklingError("unexpected storage key")
        storage_type, key = pid[1], str(pid[2])
        tname = getattr(storage_type, "_qualname", "").rsplit(".", 1)[-1]
        dtype, width = STORAGE_DTYPES.get(tname, ("U8", 1))
        numel = pid[4] if len(pid) >= 5 and type(pid[4]) is int and 0 <= pid[4] < 1 << 63 else None
        info = self.storages.get(key)
        if info is None:
            info = self.storages[key] = StorageInfo(key, dtype, width, numel)
        return info


def _plan() -> dict[int, tuple]:
    """Per opcode byte: (argument length rule, stack action) for ``check_pickle``."""
    plan: dict[int, tuple] = {}
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            rule: Any = 0
        elif arg.n >= 0:
            rule = arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            rule = "lines2" if arg.name == "stringnl_noescape_pair" else "line"
        else:
            rule = {pickletools.TAKEN_FROM_ARGUMENT1: ("len", 1, False),
                    pickletools.TAKEN_FROM_ARGUMENT4: ("len", 4, True),
                    pickletools.TAKEN_FROM_ARGUMENT4U: ("len", 4, False),
                    pickletools.TAKEN_FROM_ARGUMENT8U: ("len", 8, False)}[arg.n]
        name = op.name
        before, after = op.stack_before, op.stack_after
        if name == "MARK":
            action: tuple = ("mark",)
        elif name in ("TUPLE", "FROZENSET"):
            action = ("nest", -1)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            action = ("nest", int(name[-1]))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET", "DUP",
                      "POP_MARK", "STOP"):
            action = (name.replace("LONG_", "").replace("BIN", ""),)
        elif pickletools.markobject in before:
            below = before.index(pickletools.markobject)
            action = ("slice", below, len(after), name in _KEEPS_TARGET)
        else:
            action = ("fixed", len(before), len(after), name in _KEEPS_TARGET)
        plan[op.code.encode("latin-1")[0]] = (rule, action)
    return plan


# opcodes that return the object they modify (a list, dict, set or stand-in: never a tuple)
_KEEPS_TARGET = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_PLAN = _plan()


def check_pickle(data: bytes) -> None:
    """Bound what unpickling ``data`` can cost (see the module docstring); ValueError if it may not.

    Walks the opcodes (a lean reader: ``pickletools.genops`` takes twice as long) and simulates
    the unpickler's stack with, per item, how deep tuples/frozensets nest in it (the depth of its
    hash recursion); memo entries keep theirs. Everything else is depth 0: lists, dicts and sets
    cannot be hashed, and every global is an inert stand-in hashed by identity."""
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    plan = _PLAN
    pos, end, ops = 0, len(data), 0
    try:
        while True:
            code = data[pos]
            entry = plan.get(code)
            if entry is None:
                raise ValueError(f"unknown pickle opcode {code:#x} at {pos}")
            ops += 1
            if ops > MAX_OPS:
                raise ValueError(f"pickle has more than {MAX_OPS} opcodes")
            rule, action = entry
            pos += 1
            arg = 0
            if rule.__class__ is int:
                if rule == 1:
                    arg = data[pos]
                elif rule == 4:
                    arg = int.from_bytes(data[pos : pos + 4], "little")
                pos += rule
            elif rule == "line" or rule == "lines2":
                nl = data.index(b"\n", pos)
                if action[0] in ("PUT", "GET"):
                    arg = int(data[pos:nl])
                pos = nl + 1
                if rule == "lines2":
                    pos = data.index(b"\n", pos) + 1
            else:
                _, width, signed = rule
                n = int.from_bytes(data[pos : pos + width], "little", signed=signed)
                if n < 0:
                    raise ValueError("negative length in pickle")
                pos += width + n
            if pos > end:
                raise ValueError("pickle data was truncated")
            kind = action[0]
            if kind == "fixed":
                _, nb, na, keeps = action
                if len(stack) < nb:
                    raise ValueError("pickle stack underflow")
                keep = stack[-nb] if keeps else 0
                if nb:
                    del stack[-nb:]
                if na:
                    stack.extend((keep,) * na)
            elif kind == "mark":
                marks.append(len(stack))
            elif kind == "nest":
                k = marks.pop() if action[1] < 0 else len(stack) - action[1]
                if k < 0:
                    raise ValueError("pickle stack underflow")
                depth = 1 + max(stack[k:], default=0)
                if depth > MAX_NEST:
                    raise ValueError(f"pickle nests tuples more than {MAX_NEST} deep")
                del stack[k:]
                stack.append(depth)
            elif kind == "PUT":
                if arg >= MAX_OPS:  # the unpickler sizes its memo array to the index: 2**31 would be 16 GB
                    raise ValueError(f"pickle memo index {arg} out of range")
                memo[arg] = stack[-1]
            elif kind == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif kind == "GET":
                stack.append(memo.get(arg, 0))
            elif kind == "slice":
                _, below, na, keeps = action
                k = marks.pop() - below
                if k < 0:
                    raise ValueError("pickle stack underflow")
                keep = stack[k] if keeps and below else 0
                del stack[k:]
                if na:
                    stack.append(keep)
            elif kind == "DUP":
                stack.append(stack[-1])
            elif kind == "POP_MARK":
                del stack[marks.pop():]
            else:  # STOP
                return
    except (IndexError, KeyError) as e:
        raise ValueError(f"malformed pickle: {type(e).__name__}") from e


def read_storages(data: bytes) -> dict[str, StorageInfo]:
    """Storage key -> info (dtype, width, first tensor name and shape using it).

    Raises ``ValueError`` when the pickle cannot be read this way (``MemoryError`` passes)."""
    if len(data) > MAX_PICKLE:
        raise ValueError("pickle too large to inspect")
    try:
        check_pickle(data)
        up = _SafeUnpickler(data)
        root = up.load()
        _name_tensors(root, up.storages)
    except MemoryError:
        raise
    except ValueError:
        raise
    except Exception as e:  # any malformed pickle: the caller falls back to plain tensor regions
        raise ValueError(f"unreadable pickle: {type(e).__name__}: {e}") from e
    return up.storages


_KEY_TYPES = (str, int, float, bool, type(None))


def _key_text(key: Any) -> str | None:
    """A container key as it appears in a tensor's path (``str(key)``, as ``merge`` names the
    loaded object's paths), or None when it cannot be one (huge ints, stand-ins, deep tuples)."""
    if isinstance(key, _KEY_TYPES) or (isinstance(key, tuple) and all(isinstance(k, _KEY_TYPES) for k in key)):
        try:
            text = key if isinstance(key, str) else str(key)
        except ValueError:  # an int past sys.int_info's digit limit
            return None
        return text if len(text) <= MAX_PATH else None
    return None


def _name_tensors(root: Any, storages: dict[str, StorageInfo]) -> None:
    """Name each storage after the first path (depth first, in order) that reaches a tensor using it.

    The stack holds (parent path, key, value): a path string is built once, when its value is
    visited, and a value whose path would pass MAX_PATH characters is not descended into."""
    seen: set[int] = set()
    stack: list[tuple[str, str | None, Any]] = [("", None, root)]
    budget = MAX_NODES
    while stack and budget > 0:
        budget -= 1
        parent, key, obj = stack.pop()
        if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        path = parent if key is None else (f"{parent}.{key}" if parent else key)
        if len(path) > MAX_PATH:
            continue
        children: list[tuple[str, str | None, Any]]
        if isinstance(obj, _Stub):
            if obj.args and isinstance(obj.args[0], StorageInfo):  # _rebuild_tensor_v2(storage, offset, size, ...)
                info = obj.args[0]
                if not info.name:
                    info.name = path or info.key
                    size = obj.args[2] if len(obj.args) > 2 else None
                    if isinstance(size, tuple) and all(isinstance(x, int) for x in size):
                        info.shape = size
                continue
            children = _keyed(path, obj.items)
            children += [(path, str(i), v) for i, v in enumerate(obj.list)]
            children += [(path, None, a) for a in obj.args]
            if obj.state is not None:
                children.append((path, None, obj.state))
        elif isinstance(obj, dict):
            children = _keyed(path, obj)
        elif isinstance(obj, (list, tuple)):
            children = [(path, str(i), v) for i, v in enumerate(obj)]
        elif isinstance(obj, (set, frozenset)):
            children = [(path, None, v) for v in obj]
        else:
            continue
        stack.extend(reversed(children))


def _keyed(path: str, d: dict) -> list[tuple[str, str | None, Any]]:
    """The children of a mapping; values under keys that cannot be part of a path are not named."""
    out: list[tuple[str, str | None, Any]] = []
    for k, v in d.items():
        text = _key_text(k)
        if text is not None:
            out.append((path, text, v))
    return out
