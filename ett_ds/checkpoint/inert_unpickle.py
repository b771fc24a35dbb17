"""Reading the tensors of a PyTorch file that pickles arbitrary Python objects, without running anything from it.

A PyTorch-Lightning ``.ckpt`` (SEED-Voken's IBQ releases, taming's VQGAN) holds, beside its ``state_dict``,
omegaconf objects in ``hyper_parameters``, callback and optimizer states and whatever else the training script
kept. ``torch.load(weights_only=True)`` refuses such a file; ``weights_only=False`` would import and call whatever
the file names, so a crafted ``__reduce__`` (``os.system``, ``builtins.eval``, ``getattr`` chains) runs.

:func:`load_inert` takes a third way. Its unpickler (a pure-Python :class:`pickle._Unpickler` whose opcode handlers
are narrowed, driven by torch's own zip reader for the storages) never imports a module and only ever calls:

- the callables of torch's ``weights_only`` allow-list (tensor rebuild functions, ``torch.Size``, dtypes,
  ``collections.OrderedDict``, ...), looked up by name in a table built from the already imported torch, with
  ``_codecs.encode`` narrowed to the latin-1 round trip pickle uses for ``bytes``;
- placeholders: every other global the file names (``omegaconf.dictconfig.DictConfig``, ``posix.system``,
  ``builtins.getattr``, ``torch.load`` ...) becomes a fresh subclass of :class:`Inert`, whose construction,
  ``__setstate__``, ``__call__``, item and attribute assignment only record their arguments.

Any other use of an object (a BUILD on a type outside the table, an APPEND to a non-list) is refused, so loading
either gives plain data with placeholders or a one-line :class:`CheckpointError`; nothing in the file runs.
:func:`to_plain` then turns placeholders into data where that is safe: omegaconf containers and nodes give their
content, dict- and list-like objects their items, and everything else a :class:`NotLoaded` naming the global.
"""
from __future__ import annotations

import _compat_pickle
import copyreg
import pickle
import types
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._weights_only_unpickler import _get_allowed_globals

from .layout import CheckpointError


class Inert:
    """Stands for a global a pickle names that is not on the allow-list. Building, calling, filling or setting state
    on it records the arguments and nothing else; the named module is never imported."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        rec = obj.__dict__
        rec.update(args=args, kwargs=kwargs, state=None, items={}, listitems=[], attrs={})
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setattr__(self, name, value):
        self.__dict__["attrs"][name] = value

    def __setitem__(self, key, value):
        self.__dict__["items"][key] = value

    def append(self, item):
        self.__dict__["listitems"].append(item)

    def extend(self, items):
        self.__dict__["listitems"].extend(items)

    def add(self, item):
        self.__dict__["listitems"].append(item)

    def __call__(self, *args, **kwargs):  # e.g. getattr(x, 'system')(...): another record, nothing called
        return _placeholder(f"{self.global_name}(...)")(*args, **kwargs)

    def __reduce__(self):
        raise pickle.PicklingError(f"placeholder for {self.global_name} is not picklable")

    def __repr__(self):
        return f"<not loaded: {self.global_name}>"


def _placeholder(name: str) -> type:
    return type("Inert_" + name.replace(".", "_")[-80:], (Inert,), {"global_name": name})


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it (``bytes`` written as a latin-1 string); any other codec
    name gives a placeholder, so the codec registry is never searched by a name from the file."""
    if type(obj) is str and encoding in ("latin1", "latin-1") and errors == "strict":
        return obj.encode("latin-1")
    return _placeholder("_codecs.encode")(obj, encoding, errors)


def allowed_callables() -> dict[str, Any]:
    """The globals a file may really name: torch's ``weights_only`` allow-list (tensor rebuild functions, storage
    and tensor types, dtypes, ``torch.Size``/``device``, ``OrderedDict``/``Counter``, ``set``/``bytearray``/
    ``complex``), with ``_codecs.encode`` narrowed to latin-1."""
    table = dict(_get_allowed_globals())
    table["_codecs.encode"] = _latin1_encode
    return table


# BUILD may set state on these exact types only (as torch's weights_only unpickler), besides placeholders
_BUILDABLE = (torch.Tensor, torch.nn.Parameter, OrderedDict, Counter)


class InertUnpickler(pickle._Unpickler):
    """Unpickles with :func:`allowed_callables` and :class:`Inert` placeholders; see the module docstring."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed = allowed_callables()
        self._callables = {id(f) for f in self.allowed.values()}
        self.placeholders: dict[str, type] = {}

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global whose name is not a string")
        if self.proto < 3 and self.fix_imports:  # python-2 names protocol 2 writes (__builtin__.set, copy_reg ...)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        if full not in self.placeholders:
            self.placeholders[full] = _placeholder(full)
        return self.placeholders[full]

    def get_extension(self, code):  # EXT1/2/4: by name as above, never through copyreg's shared cache
        key = copyreg._inverted_registry.get(code)
        if not key:
            raise pickle.UnpicklingError(f"unregistered extension code {code}")
        self.append(self.find_class(*key))

    def _may_call(self, func) -> bool:
        return id(func) in self._callables or isinstance(func, Inert) or \
            (isinstance(func, type) and issubclass(func, Inert))

    def _check_callable(self, func, what):
        if not self._may_call(func):
            raise pickle.UnpicklingError(f"{what} of a {type(func).__name__}, which is not allowed")

    def load_reduce(self):
        func = self.stack[-2]
        self._check_callable(func, "a call")
        super().load_reduce()
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        self._check_callable(self.stack[-2], "construction")
        super().load_newobj()
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        self._check_callable(self.stack[-3], "construction")
        super().load_newobj_ex()
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):  # INST / OBJ
        self._check_callable(klass, "construction")
        super()._instantiate(klass, args)

    def load_build(self):
        inst = self.stack[-2]
        if isinstance(inst, Inert):
            inst.__setstate__(self.stack.pop())
            return
        if type(inst) not in _BUILDABLE:
            raise pickle.UnpicklingError(f"setting the state of a {type(inst).__name__}, which is not allowed")
        if type(inst) is torch.Tensor:  # legacy tensors: BUILD (storage, offset, size, stride)
            inst.set_(*self.stack.pop())
            return
        super().load_build()
    dispatch[pickle.BUILD[0]] = load_build

    def load_append(self):
        target = self.stack[-2] if len(self.stack) > 1 else None
        if type(target) is not list and not isinstance(target, Inert):
            raise pickle.UnpicklingError(f"appending to a {type(target).__name__}, which is not allowed")
        super().load_append()
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        if self.metastack:
            below = self.metastack[-1]
            if not below or (type(below[-1]) is not list and not isinstance(below[-1], Inert)):
                raise pickle.UnpicklingError("appending to something that is not a list, which is not allowed")
        super().load_appends()
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        target = self.stack[-3] if len(self.stack) > 2 else None
        if type(target) not in (dict, OrderedDict, Counter) and not isinstance(target, Inert):
            raise pickle.UnpicklingError(f"setting an item of a {type(target).__name__}, which is not allowed")
        super().load_setitem()
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        if self.metastack:
            below = self.metastack[-1]
            if not below or (type(below[-1]) not in (dict, OrderedDict, Counter) and not isinstance(below[-1], Inert)):
                raise pickle.UnpicklingError("setting items of something that is not a dict, which is not allowed")
        super().load_setitems()
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        if self.metastack:
            below = self.metastack[-1]
            if not below or (type(below[-1]) is not set and not isinstance(below[-1], Inert)):
                raise pickle.UnpicklingError("adding items to something that is not a set, which is not allowed")
        super().load_additems()
    dispatch[pickle.ADDITEMS[0]] = load_additems


_PICKLE_MODULE = types.SimpleNamespace(__name__="ett_ds_inert_pickle", Unpickler=InertUnpickler,
                                       UnpicklingError=pickle.UnpicklingError)


def load_inert(path: str | Path) -> tuple[Any, list[str]]:
    """A ``torch.save`` zip archive's object, unpickled by :class:`InertUnpickler` (tensors on CPU), and the names of
    the globals it stood in placeholders for (sorted). A TorchScript archive, a legacy (non-zip) file or one the
    unpickler refuses is a one-line :class:`CheckpointError`."""
    path = Path(path)
    seen: list[InertUnpickler] = []

    class Recording(InertUnpickler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    module = types.SimpleNamespace(**{**vars(_PICKLE_MODULE), "Unpickler": Recording})
    try:
        with open(path, "rb") as fh:
            if not zipfile.is_zipfile(fh):
                raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (expected a torch.save zip archive)")
            fh.seek(0)
            records = {n.split("/", 1)[-1] for n in zipfile.ZipFile(fh).namelist()}  # below the archive's folder
            if "constants.pkl" in records or any(r.startswith("code/") for r in records):  # torch.load -> jit.load
                raise CheckpointError(f"{path}: a TorchScript archive, not a checkpoint (refused: loading it could "
                                      "run code)")
            if "data.pkl" not in records:
                raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (no data.pkl in the archive)")
            fh.seek(0)
            obj = torch.load(fh, map_location="cpu", pickle_module=module, weights_only=False, mmap=False)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (nested too deeply)") from None
    except Exception as e:  # refused opcode, corrupt archive, bad storage record
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first}); "
                              "nothing in it was run") from None
    names = sorted({n for u in seen for n in u.placeholders})
    return obj, names


@dataclass(frozen=True)
class NotLoaded:
    """What :func:`to_plain` gives for an object the file pickled that has no plain-data reading."""
    global_name: str


def _omegaconf_value(obj: Inert):
    """Content of an omegaconf container (``_content``) or node (``_val``) from its pickled state; else None."""
    state = obj.__dict__["state"]
    if not obj.global_name.startswith("omegaconf.") or not isinstance(state, dict):
        return None
    for key in ("_content", "_val"):
        if key in state:
            return (state[key],)
    return None


def to_plain(obj, _active: set[int] | None = None):
    """``obj`` with placeholders replaced by data: tensors (detached), dicts, lists, tuples, sets, numbers, strings
    and :class:`NotLoaded`. omegaconf ``DictConfig``/``ListConfig`` give their (unresolved) content; other
    dict- or list-like placeholders their items; a cycle gives None."""
    active = set() if _active is None else _active
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device)):
        return obj
    if id(obj) in active:
        return None
    active.add(id(obj))
    try:
        if isinstance(obj, Inert):
            omega = _omegaconf_value(obj)
            if omega is not None:
                return to_plain(omega[0], active)
            rec = obj.__dict__
            if rec["items"]:
                return {_key(k): to_plain(v, active) for k, v in rec["items"].items()}
            if rec["listitems"]:
                return [to_plain(v, active) for v in rec["listitems"]]
            return NotLoaded(obj.global_name)
        if isinstance(obj, type) and issubclass(obj, Inert):
            return NotLoaded(obj.global_name)
        if isinstance(obj, dict):
            return {_key(k): to_plain(v, active) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(to_plain(v, active) for v in obj) if type(obj) in (list, tuple) else \
                [to_plain(v, active) for v in obj]
        if isinstance(obj, (set, frozenset)):
            return {v for v in obj if not isinstance(v, Inert)}
        if isinstance(obj, torch.Size):
            return tuple(obj)
        return NotLoaded(type(obj).__name__)
    finally:
        active.discard(id(obj))


def _key(k):
    return k if isinstance(k, (str, int, float, bool, type(None), tuple)) else repr(k)


def read_untrusted(path: str | Path) -> tuple[Any, list[str]]:
    """:func:`load_inert` then :func:`to_plain`: the file's data with nothing run, and the globals not loaded."""
    obj, names = load_inert(path)
    try:
        return to_plain(obj), names
    except RecursionError:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (nested too deeply)") from None


__all__ = ["Inert", "InertUnpickler", "NotLoaded", "allowed_callables", "load_inert", "read_untrusted", "to_plain"]
