"""A restricted unpickler that records the storages a pickle names and never runs code."""

from __future__ import annotations

import pickle
import threading
from typing import ClassVar, NamedTuple

from watcher.validity._common import Invalid


class _Opaque:
    """Inert stand-in for the globals, dicts and sets of a pickle and the objects built from them.

    It accepts any constructor arguments and ignores all state set on it.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass

    def add(self, item) -> None:
        pass


class StorageRef(NamedTuple):
    """One storage id found in a pickle: key, storage class name and element count."""

    key: str
    type_name: str | None
    numel: int


def _storage_type_name(storage_type: object) -> str | None:
    """Return the class name of a torch storage stand-in, or None for anything else."""
    module = getattr(storage_type, "pickle_module", "")
    if module != "torch" and not module.startswith("torch."):
        return None
    return getattr(storage_type, "pickle_name", None)


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return None


# Stand-in classes shared by all checks, keyed by (module, name), so that a global costs one
# type() call per process instead of one per file. Checks may run in several threads, so
# additions take a lock, while lookups read the dict without it. A global past either cap gets
# a stand-in for its pickle alone, so hostile pickles cannot grow the table without bound. A
# full table with names at the length cap took about 2.5 MiB (tracemalloc, Python 3.11), and
# a checkpoint of the trainer names four distinct globals.
_SHARED_STAND_INS_MAX = 1024
_SHARED_NAME_MAX = 256
_shared_stand_ins: dict[tuple[str, str], type] = {}
_shared_stand_ins_lock = threading.Lock()


def _new_stand_in(module: str, name: str) -> type:
    attributes = {"pickle_module": module, "pickle_name": name}
    return type("OpaqueGlobal", (_Opaque,), attributes)


def _shared_stand_in(module: str, name: str) -> type | None:
    """Return the shared stand-in of a global, adding it unless a cap forbids, else None."""
    if len(module) > _SHARED_NAME_MAX or len(name) > _SHARED_NAME_MAX:
        return None
    key = (module, name)
    with _shared_stand_ins_lock:
        stand_in = _shared_stand_ins.get(key)
        if stand_in is None and len(_shared_stand_ins) < _SHARED_STAND_INS_MAX:
            stand_in = _shared_stand_ins[key] = _new_stand_in(module, name)
    return stand_in


class _FramingStarted(Exception):
    """Raised by the FRAME handler so that load() reads the rest through the unframer."""


def _load_frame(unpickler: _RestrictedUnpickler) -> None:
    unpickler.read = unpickler._unframer.read
    unpickler.readline = unpickler._unframer.readline
    pickle._Unpickler.load_frame(unpickler)
    raise _FramingStarted


def _reject_opcode(unpickler: pickle._Unpickler) -> None:
    raise Invalid("pickle uses a protocol 5 buffer opcode, which torch.save never writes")


def _push_opaque(unpickler: pickle._Unpickler) -> None:
    unpickler.append(_Opaque())


def _push_opaque_after_mark(unpickler: pickle._Unpickler) -> None:
    unpickler.pop_mark()
    unpickler.append(_Opaque())


# pickle._Unpickler is the pure-Python unpickler of the standard library. The C unpickler is
# not used because it sizes its memo table from the largest BINPUT index in the input, so a
# 12-byte pickle can make it allocate gigabytes. Dicts and sets become stand-ins as well:
# their contents are never needed, and crafted keys with equal hashes would make building
# them quadratic. BYTEARRAY8 would allocate its declared length before reading any data.
class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that builds only stand-ins and records the storage ids it meets."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.EMPTY_DICT[0]] = _push_opaque
    dispatch[pickle.DICT[0]] = _push_opaque_after_mark
    dispatch[pickle.EMPTY_SET[0]] = _push_opaque
    dispatch[pickle.FROZENSET[0]] = _push_opaque_after_mark
    dispatch[pickle.BYTEARRAY8[0]] = _reject_opcode
    dispatch[pickle.NEXT_BUFFER[0]] = _reject_opcode
    dispatch[pickle.READONLY_BUFFER[0]] = _reject_opcode
    dispatch[pickle.FRAME[0]] = _load_frame

    def __init__(self, file, storages: dict[str, StorageRef], legacy: bool) -> None:
        super().__init__(file, encoding="latin-1")
        self._storages = storages
        self._legacy = legacy
        self._globals: dict[tuple[str, str], type] = {}

    def load(self) -> object:
        """Load one pickle, as pickle._Unpickler.load of Python 3.10 to 3.13 does, but faster.

        The standard loop reads every opcode and argument through a pickle._Unframer, which
        only matters once a FRAME opcode (protocol 4 and up) has been read. Until then this
        loop reads from the file directly, so torch's default protocol 2 pays one call less
        per read. From the first FRAME on, all reads go through the unframer as before.
        """
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read = self._file_read
        self.readline = self._file_readline
        self.readinto = self._unframer.readinto
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read
        dispatch = self.dispatch
        while True:
            try:
                while True:
                    key = read(1)
                    if not key:
                        raise EOFError
                    dispatch[key[0]](self)
            except pickle._Stop as stop:
                return stop.value
            except _FramingStarted:
                read = self.read

    def find_class(self, module: str, name: str) -> type:
        return find_stand_in(module, name, self._globals)

    def persistent_load(self, pid: object) -> _Opaque | type[_Opaque]:
        return load_persistent_id(pid, self._storages, self._legacy)


def find_stand_in(module: str, name: str, own_stand_ins: dict[tuple[str, str], type]) -> type:
    """Return the stand-in class of a global, from the shared table or from `own_stand_ins`.

    `own_stand_ins` contains the stand-ins of one pickle that the shared table has no room for.
    """
    key = (module, name)
    stand_in = _shared_stand_ins.get(key)
    if stand_in is None:
        stand_in = _shared_stand_in(module, name) or own_stand_ins.get(key)
    if stand_in is None:
        stand_in = own_stand_ins[key] = _new_stand_in(module, name)
    return stand_in


def load_persistent_id(
    pid: object, storages: dict[str, StorageRef], legacy: bool
) -> _Opaque | type[_Opaque]:
    """Record the storage that a persistent id names in `storages`, and return its stand-in.

    Raise Invalid for an id that torch.save does not write.
    """
    if not isinstance(pid, tuple) or not pid:
        raise Invalid(f"unexpected persistent id in pickle: {type(pid).__name__}")
    kind = _as_text(pid[0])
    if legacy and kind == "module":
        # The id stands for the class of a pickled nn.Module, so it must be a class that
        # the NEWOBJ opcode can instantiate.
        return _Opaque
    expected_length = 6 if legacy else 5
    if kind != "storage" or len(pid) != expected_length:
        raise Invalid(f"unexpected persistent id in pickle: kind {kind!r}, {len(pid)} fields")
    key = pid[2]
    numel = pid[4]
    key_text = _as_text(key)
    if key_text is None or type(numel) is not int or numel < 0:
        raise Invalid(f"malformed storage id in pickle: key {key!r}, numel {numel!r}")
    # torch's loaders size a storage from its first reference and reuse it after.
    if key_text not in storages:
        storages[key_text] = StorageRef(key_text, _storage_type_name(pid[1]), numel)
    # The same object as _Opaque(), without calls to its Python-level __new__ and __init__.
    return object.__new__(_Opaque)


def unpickle_restricted(file, storages: dict[str, StorageRef], legacy: bool, what: str) -> object:
    """Load one pickle from `file` with the restricted unpickler, adding to `storages`."""
    try:
        return _RestrictedUnpickler(file, storages, legacy).load()
    except (Invalid, OSError):
        raise
    except Exception as exc:
        # A damaged pickle can raise almost any exception type from the unpickler.
        raise Invalid(f"{what} does not parse: {type(exc).__name__}: {exc}") from exc
