"""Read a ``torch.save`` file without executing any of its code.

A ``torch.save`` file is a zip archive holding ``<name>/data.pkl`` (a pickle)
and the raw bytes of every tensor storage under ``<name>/data/<key>``. A pickle
names classes and functions as *globals* and calls them while it is read, so
loading an untrusted one with :mod:`pickle` or ``torch.load(weights_only=False)``
can run arbitrary code. :func:`load_records` reads it with an unpickler whose
``find_class`` admits only an allowlist of names and maps each to an inert
stand-in:

* module classes (``torch.nn.*``, ``schnetpack.*`` entries of the allowlist)
  become :class:`Record` objects that only store the pickled state
  (``_parameters``, ``_buffers``, ``_modules``, plain attributes);
* functions referenced as attributes (activations, initialisers) become
  :class:`FunctionRef` objects that hold the name and refuse to be called;
* tensors are rebuilt by this module from the archive's bytes (bounds checked),
  never by torch's pickle helpers.

Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, an
unknown class) raises :class:`DisallowedGlobalError` naming the global. No
``schnetpack`` import is ever needed. This is meant for the user's own model
files; it removes code execution, not every denial-of-service risk of a
hostile archive.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch


class ModelFileError(ValueError):
    """A model file cannot be read or converted; the message names the problem."""


class DisallowedGlobalError(ModelFileError, pickle.UnpicklingError):
    """The pickle names a global (class or function) outside the allowlist."""

    def __init__(self, name: str, path: str = ""):
        self.name = name
        where = f"{path}: " if path else ""
        super().__init__(
            f"{where}refusing to load global {name!r}: it is not an allowed tensor or model class, and "
            "reading it could execute code. Only SchNetPack models made of known modules can be converted."
        )


class FunctionRef:
    """A function named by the pickle (e.g. an activation); it is never called."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise DisallowedGlobalError(self.name)

    def __repr__(self) -> str:
        return f"FunctionRef({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FunctionRef) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class Record:
    """Stand-in for a pickled module object: its class name and its state, nothing else.

    ``Record`` subclasses are made per allowed class name (:attr:`class_name`),
    so that pickle's ``NEWOBJ`` (``cls.__new__(cls)``) and ``BUILD``
    (``__setstate__``) create and fill a record instead of the real class.
    """

    class_name: str = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            d, slots = state
            state = dict(d or {})
            state.update(slots or {})
        if not isinstance(state, dict):
            raise ModelFileError(f"unexpected pickled state of {self.class_name}: {type(state).__name__}")
        object.__setattr__(self, "state", dict(state))

    def __reduce__(self):  # a record is never pickled again
        raise TypeError("a Record cannot be pickled")

    # ---- reading the state --------------------------------------------------
    def get(self, name: str, default: Any = None) -> Any:
        """A plain attribute of the pickled object."""
        return getattr(self, "state", {}).get(name, default)

    def _section(self, section: str) -> dict:
        return getattr(self, "state", {}).get(section) or {}

    def param(self, name: str) -> torch.Tensor | None:
        """A parameter or buffer tensor (``None`` if absent)."""
        for section in ("_parameters", "_buffers"):
            d = self._section(section)
            if name in d:
                return d[name]
        return None

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter or buffer that must exist."""
        t = self.param(name)
        if t is None:
            raise ModelFileError(f"{self.class_name} has no tensor {name!r}")
        return t

    def child(self, name: str) -> "Record":
        """A sub-module that must exist."""
        m = self._section("_modules").get(name)
        if m is None:
            raise ModelFileError(f"{self.class_name} has no sub-module {name!r}")
        return m

    def children(self) -> list["Record"]:
        """Sub-modules in order (e.g. the entries of a ModuleList or Sequential)."""
        return [m for m in self._section("_modules").values() if m is not None]

    def __repr__(self) -> str:
        return f"Record({self.class_name})"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_DTYPE_GLOBALS = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Iterable[int], stride: Iterable[int], *_: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` done safely: a bounds-checked strided view, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(offset)
    if not isinstance(storage, torch.Tensor):
        raise ModelFileError(f"tensor rebuilt from a non-storage {type(storage).__name__}")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise ModelFileError(f"invalid tensor layout: size {size}, stride {stride}, offset {offset}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise ModelFileError(
                f"tensor of size {size} (stride {stride}, offset {offset}) overruns its storage of {storage.numel()} values"
            )
    return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ModelFileError(f"parameter rebuilt from a non-tensor {type(data).__name__}")
    return data


def _torch_size(*args: Any) -> tuple:
    dims = args[0] if len(args) == 1 else args
    return tuple(int(d) for d in dims)


#: non-module globals a torch.save of a model needs, mapped to safe stand-ins
_SAFE_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,
    "builtins.frozenset": frozenset,
    "__builtin__.frozenset": frozenset,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.Size": _torch_size,
    **{f"torch.{n}": _StorageType(dt) for n, dt in _STORAGES.items()},
    **{f"torch.{n}": dt for n, dt in _DTYPE_GLOBALS.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, classes: set[str], functions: set[str], path: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._classes = classes
        self._functions = functions
        self._path = path
        self._record_types: dict[str, type] = {}
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[full]
        if full in self._classes:
            cls = self._record_types.get(full)
            if cls is None:
                cls = type(name, (Record,), {"class_name": full, "__module__": __name__})
                self._record_types[full] = cls
            return cls
        if full in self._functions:
            return FunctionRef(full)
        raise DisallowedGlobalError(full, self._path)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ModelFileError(f"{self._path}: unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise ModelFileError(f"{self._path}: storage of unknown type {stype!r:.80}")
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise ModelFileError(f"{self._path}: the archive lacks the tensor storage {name!r}") from None
        itemsize = torch.empty((), dtype=stype.dtype).element_size()
        if info.file_size < int(numel) * itemsize:
            raise ModelFileError(
                f"{self._path}: storage {key} holds {info.file_size} bytes, fewer than {numel} x {itemsize}"
            )
        raw = bytearray(self._archive.read(info)[: int(numel) * itemsize])
        t = torch.frombuffer(raw, dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
        self._storages[key] = t
        return t


def load_records(path: str | Path, classes: Iterable[str], functions: Iterable[str]) -> Any:
    """Unpickle a ``torch.save`` zip file admitting only the given globals.

    Args:
        path: the file.
        classes: fully qualified class names to turn into :class:`Record` objects.
        functions: fully qualified function names to turn into :class:`FunctionRef` objects.

    Returns:
        the unpickled root object (for a saved module: its :class:`Record`).

    Raises:
        DisallowedGlobalError: the pickle names any other global.
        ModelFileError: the file is not a (zip-format) torch.save file or is inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path}: not a torch.save zip archive (files written by torch < 1.6 or with "
            "_use_new_zipfile_serialization=False are not supported; re-save it with a current torch)"
        )
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ModelFileError(f"{path}: expected one '<name>/data.pkl' in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
            raise ModelFileError(f"{path}: big-endian torch files are not supported")
        data = archive.read(pkls[0])
        unpickler = _RestrictedUnpickler(io.BytesIO(data), archive, prefix, set(classes), set(functions), str(path))
        try:
            return unpickler.load()
        except ModelFileError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError) as err:
            raise ModelFileError(f"{path}: cannot read the pickled model: {err}") from err
