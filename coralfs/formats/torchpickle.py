"""Read a torch.save pickle (``data.pkl``) without executing it.

A restricted unpickler whose ``find_class`` returns inert stand-in classes: no
global named by the pickle is ever imported or called. ``persistent_load`` records
each storage's key and element type; walking the resulting stand-in tree names
every tensor (``model.layer.weight``, ``optimizer.state.0.exp_avg``).
"""

from __future__ import annotations

import io
import pickle
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
MAX_PICKLE = 256 << 20


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
            cls = self._classes[key] = type(name if name.isidentifier() else "Stub", (_Stub,),
                                            {"_qualname": f"{module}.{name}"})
        return cls

    def persistent_load(self, pid: Any) -> StorageInfo:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        storage_type, key = pid[1], str(pid[2])
        tname = getattr(storage_type, "_qualname", "").rsplit(".", 1)[-1]
        dtype, width = STORAGE_DTYPES.get(tname, ("U8", 1))
        numel = pid[4] if len(pid) >= 5 and isinstance(pid[4], int) else None
        info = self.storages.get(key)
        if info is None:
            info = self.storages[key] = StorageInfo(key, dtype, width, numel)
        return info


def read_storages(data: bytes) -> dict[str, StorageInfo]:
    """Storage key -> info (dtype, width, first tensor name and shape using it).

    Raises ``ValueError`` when the pickle cannot be read this way."""
    if len(data) > MAX_PICKLE:
        raise ValueError("pickle too large to inspect")
    up = _SafeUnpickler(data)
    try:
        root = up.load()
    except Exception as e:  # any malformed pickle: the caller falls back to plain bytes
        raise ValueError(f"unreadable pickle: {e}") from e
    _name_tensors(root, up.storages)
    return up.storages


def _name_tensors(root: Any, storages: dict[str, StorageInfo]) -> None:
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", root)]
    budget = 2_000_000
    while stack and budget > 0:
        budget -= 1
        path, obj = stack.pop()
        if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _Stub):
            if obj.args and isinstance(obj.args[0], StorageInfo):  # _rebuild_tensor_v2(storage, offset, size, ...)
                info = obj.args[0]
                if not info.name:
                    info.name = path or info.key
                    size = obj.args[2] if len(obj.args) > 2 else None
                    if isinstance(size, tuple) and all(isinstance(x, int) for x in size):
                        info.shape = size
                continue
            children: list[tuple[str, Any]] = [(_join(path, k), v) for k, v in obj.items.items()]
            children += [(_join(path, i), v) for i, v in enumerate(obj.list)]
            children += [(path, a) for a in obj.args]
            if obj.state is not None:
                children.append((path, obj.state))
        elif isinstance(obj, dict):
            children = [(_join(path, k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            children = [(_join(path, i), v) for i, v in enumerate(obj)]
        elif isinstance(obj, (set, frozenset)):
            children = [(path, v) for v in obj]
        else:
            continue
        stack.extend(reversed(children))


def _join(path: str, key: Any) -> str:
    k = key if isinstance(key, str) else str(key)
    return f"{path}.{k}" if path else k
