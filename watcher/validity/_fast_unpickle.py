"""A fast path for the opcodes torch.save writes into data.pkl, with the restricted unpickler
as the fallback for everything else.

Walking a pickle with pickle._Unpickler costs a Python call per opcode and more per argument
read. torch.save writes protocol 2 pickles with a small set of opcodes, so this module runs
those opcodes in one loop over the bytes. The loop has the same effect as the restricted
unpickler, because it calls the functions behind that unpickler's find_class and
persistent_load at the same points with the same arguments. Any input the loop does not
cover, and any error other than Invalid, makes it give up, and the restricted unpickler then
loads the pickle from the start. The verdict and its reason are therefore the restricted
unpickler's for every input.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys

from watcher.validity import _unpickle
from watcher.validity._common import Invalid
from watcher.validity._unpickle import (
    StorageRef,
    _Opaque,
    find_stand_in,
    load_persistent_id,
    unpickle_restricted,
)

_UINT16 = struct.Struct("<H").unpack_from
_INT32 = struct.Struct("<i").unpack_from
_UINT32 = struct.Struct("<I").unpack_from
_FLOAT64 = struct.Struct(">d").unpack_from

# Opcode values. The loop below tests them in the order of their frequency in torch's data.pkl.
BINPUT = pickle.BINPUT[0]
LONG_BINPUT = pickle.LONG_BINPUT[0]
BINGET = pickle.BINGET[0]
LONG_BINGET = pickle.LONG_BINGET[0]
BININT1 = pickle.BININT1[0]
BININT2 = pickle.BININT2[0]
BININT = pickle.BININT[0]
MARK = pickle.MARK[0]
REDUCE = pickle.REDUCE[0]
TUPLE = pickle.TUPLE[0]
TUPLE1 = pickle.TUPLE1[0]
TUPLE2 = pickle.TUPLE2[0]
TUPLE3 = pickle.TUPLE3[0]
EMPTY_TUPLE = pickle.EMPTY_TUPLE[0]
BINUNICODE = pickle.BINUNICODE[0]
NEWFALSE = pickle.NEWFALSE[0]
NEWTRUE = pickle.NEWTRUE[0]
NONE = pickle.NONE[0]
BINPERSID = pickle.BINPERSID[0]
EMPTY_DICT = pickle.EMPTY_DICT[0]
EMPTY_LIST = pickle.EMPTY_LIST[0]
SETITEM = pickle.SETITEM[0]
SETITEMS = pickle.SETITEMS[0]
APPEND = pickle.APPEND[0]
APPENDS = pickle.APPENDS[0]
BINFLOAT = pickle.BINFLOAT[0]
LONG1 = pickle.LONG1[0]
GLOBAL = pickle.GLOBAL[0]
NEWOBJ = pickle.NEWOBJ[0]
BUILD = pickle.BUILD[0]
PROTO = pickle.PROTO[0]
STOP = pickle.STOP[0]

# The stand-ins' __new__ returns object.__new__(cls) and their __init__ does nothing, so
# calling this directly builds the same object for less.
_new_instance = object.__new__


def _is_stand_in_class(value: object) -> bool:
    return type(value) is type and issubclass(value, _Opaque)


# pickle._Unpickler raises for LONG_BINPUT and BINUNICODE arguments above sys.maxsize. The
# loop leaves that check out, which is exact only where no 32-bit argument exceeds sys.maxsize.
_FAST_PATH_EXACT = sys.maxsize >= 2**32

# The shared stand-ins of _unpickle, keyed by the raw "module\nname" bytes of a GLOBAL opcode,
# which saves decoding both names and a find_class call. Strict UTF-8 decoding maps distinct
# bytes to distinct text, so this table has at most one entry per shared stand-in and stays
# within the cap of that table.
_shared_stand_ins_by_line: dict[bytes, type] = {}


def _find_class(line: bytes, own_stand_ins: dict[tuple[str, str], type]) -> type:
    """Return the stand-in for the GLOBAL arguments `line`, remembering shared ones."""
    module_end = line.index(b"\n")
    module = line[:module_end].decode("utf-8")
    name = line[module_end + 1 :].decode("utf-8")
    stand_in = find_stand_in(module, name, own_stand_ins)
    if _unpickle._shared_stand_ins.get((module, name)) is stand_in:
        _shared_stand_ins_by_line[line] = stand_in
    return stand_in


def _load_common_opcodes(data: bytes, storages: dict[str, StorageRef]) -> bool:
    """Run the pickle in `data` as the restricted unpickler would, adding to `storages`.

    Return False where this loop stops short.

    The loop covers each opcode only where pickle._Unpickler, with the overrides of
    _RestrictedUnpickler, cannot fail, and returns False otherwise. The pure-Python
    unpickler handles these opcodes alike in Python 3.10 to 3.13, and
    tests/test_validity_speed.py compares the two on mutated pickles. It relies on
    its caller to treat any exception except Invalid the same way. Invalid comes only from
    load_persistent_id, called at the same point with the same id as in a full load.
    """
    own_stand_ins: dict[tuple[str, str], type] = {}
    stack: list = []
    metastack: list[list] = []
    memo: dict[int, object] = {}
    position = 0
    while True:
        opcode = data[position]
        position += 1
        # Two chains of tests, split at 0x68 and each in order of frequency in torch's
        # data.pkl, take fewer comparisons per opcode than one.
        if opcode >= BINGET:
            if opcode == LONG_BINPUT:
                memo[_UINT32(data, position)[0]] = stack[-1]
                position += 4
            elif opcode == BINGET:
                stack.append(memo[data[position]])
                position += 1
            elif opcode == BINPUT:
                memo[data[position]] = stack[-1]
                position += 1
            elif opcode == TUPLE:
                items = stack
                stack = metastack.pop()
                stack.append(tuple(items))
            elif opcode == NEWFALSE:
                stack.append(False)
            elif opcode == TUPLE1:
                stack[-1] = (stack[-1],)
            elif opcode == LONG_BINGET:
                stack.append(memo[_UINT32(data, position)[0]])
                position += 4
            elif opcode == TUPLE2:
                last = stack.pop()
                stack[-1] = (stack[-1], last)
            elif opcode == EMPTY_DICT:
                # The restricted unpickler turns dicts into stand-ins.
                stack.append(_new_instance(_Opaque))
            elif opcode == SETITEMS:
                items = stack
                stack = metastack.pop()
                target = stack[-1]
                if items and (len(items) % 2 or not isinstance(target, _Opaque)):
                    return False
            elif opcode == SETITEM:
                del stack[-2:]
                if not isinstance(stack[-1], _Opaque):
                    return False
            elif opcode == NEWTRUE:
                stack.append(True)
            elif opcode == TUPLE3:
                last = stack.pop()
                middle = stack.pop()
                stack[-1] = (stack[-1], middle, last)
            elif opcode == NEWOBJ:
                arguments = stack.pop()
                if not _is_stand_in_class(stack[-1]) or type(arguments) is not tuple:
                    return False
                stack[-1] = _new_instance(stack[-1])
            elif opcode == LONG1:
                length = data[position]
                encoded = data[position + 1 : position + 1 + length]
                stack.append(int.from_bytes(encoded, "little", signed=True))
                position += 1 + length
            elif opcode == PROTO:
                if data[position] > pickle.HIGHEST_PROTOCOL:
                    return False
                position += 1
            else:
                return False
        elif opcode == BININT1:
            stack.append(data[position])
            position += 1
        elif opcode == MARK:
            metastack.append(stack)
            stack = []
        elif opcode == REDUCE:
            # The test of _is_stand_in_class, inline because REDUCE is frequent.
            arguments = stack.pop()
            function = stack[-1]
            if type(function) is not type or type(arguments) is not tuple:
                return False
            if not issubclass(function, _Opaque):
                return False
            stack[-1] = _new_instance(function)
        elif opcode == BINUNICODE:
            (length,) = _UINT32(data, position)
            position += 4
            stack.append(data[position : position + length].decode("utf-8", "surrogatepass"))
            position += length
        elif opcode == EMPTY_TUPLE:
            stack.append(())
        elif opcode == BINPERSID:
            stack[-1] = load_persistent_id(stack[-1], storages, False)
        elif opcode == BININT2:
            stack.append(_UINT16(data, position)[0])
            position += 2
        elif opcode == BININT:
            stack.append(_INT32(data, position)[0])
            position += 4
        elif opcode == BINFLOAT:
            stack.append(_FLOAT64(data, position)[0])
            position += 8
        elif opcode == NONE:
            stack.append(None)
        elif opcode == EMPTY_LIST:
            stack.append([])
        elif opcode == APPENDS:
            items = stack
            stack = metastack.pop()
            target = stack[-1]
            if type(target) is list:
                target.extend(items)
            elif not isinstance(target, _Opaque):
                return False
        elif opcode == APPEND:
            value = stack.pop()
            target = stack[-1]
            if type(target) is list:
                target.append(value)
            elif not isinstance(target, _Opaque):
                return False
        elif opcode == BUILD:
            stack.pop()
            if not isinstance(stack[-1], _Opaque):
                return False
        elif opcode == GLOBAL:
            end = data.index(b"\n", data.index(b"\n", position) + 1)
            line = data[position:end]
            stand_in = _shared_stand_ins_by_line.get(line)
            if stand_in is None:
                stand_in = _find_class(line, own_stand_ins)
            stack.append(stand_in)
            position = end + 1
        elif opcode == STOP:
            stack.pop()
            return True
        else:
            return False


def _load_fast(data: bytes, storages: dict[str, StorageRef]) -> bool:
    """Return whether _load_common_opcodes ran the whole pickle; let Invalid through."""
    try:
        return _load_common_opcodes(data, storages)
    except Invalid:
        raise
    except Exception:  # noqa: BLE001 - the full load in load_storages reports the error itself
        return False


def load_storages(data: bytes, what: str) -> dict[str, StorageRef]:
    """Return the storages named in the complete pickle `data`, or raise Invalid.

    `what` names the pickle in the reason of a pickle that does not parse.
    """
    storages: dict[str, StorageRef] = {}
    if not (_FAST_PATH_EXACT and _load_fast(data, storages)):
        storages.clear()
        unpickle_restricted(io.BytesIO(data), storages, legacy=False, what=what)
    return storages
