"""A pickle reader that runs no code from the file: only the types third-party medrec inputs need.

The SafeDrug/GAMENet family of processed benchmarks ships its data as pickles
(``records_final.pkl``, ``ddi_A_final.pkl``, ``atc3toSMILES.pkl``, ...) and its vocabularies as
``voc_final.pkl``, a dill pickle of the authors' ``Voc`` class. An ordinary ``pickle.load`` would
call any function the file names (``os.system`` included), so every such file goes through
``RestrictedUnpickler``:

* allowed as they are: builtin containers and scalars, ``collections`` dict variants, numpy
  arrays, dtypes and scalars (their documented reconstruction functions only);
* a vocabulary class (``Voc``), whether stored by reference or - as dill does for classes of the
  authors' ``__main__`` - by value with its code: the class becomes an empty stand-in class, its
  methods and code objects inert placeholders, and only the instances' attribute dicts
  (``idx2word``, ``word2idx``) are kept. Nothing of the stored code is compiled or called, which
  also makes vocabularies written by Python 3.6/3.7 (15-argument code objects) readable;
* anything else is refused with ``UnsafePickleError`` naming the type the file asked for.
"""

from __future__ import annotations

import builtins
import codecs
import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.cohort import CohortError

VOCABULARY_CLASSES = frozenset({"Voc", "Vocabulary", "Vocab"})
"""Class names of the family's vocabulary objects; any module (``__main__``, ``util``, ...)."""

DILL_MODULES = frozenset({"dill", "dill.dill", "dill._dill", "dill._shims", "dill.shims"})
"""Where dill's reconstruction helpers live (0.2.x: ``dill.dill``; 0.3+: ``dill._dill``)."""

_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray", "bool"}
    | {"object", "range", "slice"}
)
_DILL_DATA_TYPES = {name: getattr(builtins, name) for name in _BUILTINS} | {
    f"{name.capitalize()}Type": getattr(builtins, name) for name in ("dict", "list", "tuple", "set", "object")
}
_DILL_DATA_TYPES["FrozenSetType"] = frozenset
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _numpy_core():
    # numpy >= 2 keeps these in numpy._core; pickles written by numpy 1.x name numpy.core
    from numpy._core import multiarray, numeric

    return multiarray, numeric


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {("builtins", name): getattr(builtins, name) for name in _BUILTINS}
    allowed.update(
        {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("collections", "defaultdict"): collections.defaultdict,
            ("collections", "Counter"): collections.Counter,
            ("copyreg", "_reconstructor"): _reconstructor,
            # protocol-2 pickles store bytes as latin-1 text decoded back through this
            ("_codecs", "encode"): codecs.encode,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
    )
    for core in ("numpy.core", "numpy._core"):
        for module in ("multiarray", "_multiarray_umath"):
            allowed[(f"{core}.{module}", "_reconstruct")] = multiarray._reconstruct
            allowed[(f"{core}.{module}", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class UnsafePickleError(CohortError):
    """A pickle asks for a type or function outside what medrec's input formats need."""


class Placeholder:
    """What a piece of stored code becomes (a function, code object, module dict): inert.

    Calling it returns another placeholder, so a dill pickle that builds functions out of code
    objects still loads, without any of that code being compiled or run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return Placeholder()

    def __repr__(self) -> str:
        return "<code not loaded>"


class StoredObject:
    """Base of the stand-in classes: an instance holds the attributes the file stored, no methods."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} with {sorted(vars(self))}>"


def _stand_in_class(name: Any) -> type:
    name = name if isinstance(name, str) and name.isidentifier() else "StoredObject"
    return type(name, (StoredObject,), {"__module__": __name__})


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor, which protocol-0/1 pickles of plain instances use; cls/base are
    already restricted by ``find_class``."""
    import copyreg

    return copyreg._reconstructor(cls, base, state)


def _ignore(*args: Any) -> None:
    return None


def _inert_getattr(owner: Any, name: Any, *default: Any) -> Any:
    return default[0] if default else Placeholder()


class _ModuleName:
    """dill's ``_import_module(name)``: only the name is kept; nothing is imported."""

    def __init__(self, name: Any) -> None:
        self.name = str(name)


def _create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> Any:
    """dill's numpy array: ``f`` is a reconstructor that ``find_class`` allowed (else inert)."""
    array = f(*args)
    if not isinstance(array, np.ndarray):
        return Placeholder()
    array.__setstate__(state)
    return array


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` hands out only the allowed types (module docstring)."""

    def __init__(self, file, **kwargs: Any) -> None:
        kwargs.setdefault("encoding", "latin1")  # numpy arrays written by Python 2
        super().__init__(file, **kwargs)
        self._allowed = _allowed_globals()

    def _dill_function(self, name: str) -> Any:
        """An inert (or restricted) stand-in for one of dill's reconstruction helpers."""
        if name == "_create_type":
            # _create_type(typeobj, name, bases, namespace): a class stored by value
            return lambda typeobj=None, cls_name=None, *rest: _stand_in_class(cls_name)
        if name == "_load_type":
            # dill names builtin types by name ('set', 'ListType'); only plain data types are given out
            return lambda type_name: _DILL_DATA_TYPES.get(type_name, Placeholder())
        if name == "_import_module":
            return _ModuleName
        if name == "_get_attr":
            # _get_attr(_import_module('numpy.core.multiarray'), '_reconstruct'): same rules as a global
            return lambda owner, attr: (
                self.find_class(owner.name, attr) if isinstance(owner, _ModuleName) else Placeholder()
            )
        if name == "_create_array":
            return _create_array
        return Placeholder()

    def find_class(self, module: str, name: str) -> Any:
        if module in DILL_MODULES:
            return self._dill_function(name)
        if (module, name) == ("__builtin__", "__main__") or name == "__dict__":
            return Placeholder()  # dill's reference to the globals of stored functions: never read
        if (_PY2_MODULES.get(module, module), name) == ("builtins", "setattr"):
            return _ignore  # dill names a stored class after building it; the stand-in keeps its own
        if (_PY2_MODULES.get(module, module), name) == ("builtins", "getattr"):
            # dill: getattr(dill._dill, '_setattr', setattr) for closure cells; a real getattr
            # would reach any object's internals (a function's __globals__), so none is given out
            return _inert_getattr
        if name in VOCABULARY_CLASSES:
            return _stand_in_class(name)
        module = _PY2_MODULES.get(module, module)
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: the file asks for a type or function that this "
                "format never needs (allowed: builtin containers, numpy arrays, the Voc vocabulary); "
                "loading it could run code from the file"
            ) from None


def loads(data: bytes) -> Any:
    """Unpickle ``data`` with the restrictions of ``RestrictedUnpickler``."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_pickle(path: str | os.PathLike, what: str = "a pickle") -> Any:
    """Read one pickle file safely; any failure is a ``CohortError`` that names ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except Exception as err:  # pickle raises many types for damaged or foreign files
        raise CohortError(f"{path}: cannot be unpickled as {what} ({type(err).__name__}: {err})") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A torch/Lightning checkpoint read with ``weights_only=True`` (tensors and plain types only:
    no code from the file runs); any failure is a ``CheckpointError`` that names ``path``."""
    import torch

    from datamodules.errors import CheckpointError

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: a checkpoint must be a file, this is a folder")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is not None:
            reason = f"refused to load what it asks for, which could run code ({refused.rstrip('.')})"
        elif any("Unsupported operand" in line for line in lines):
            reason = "not a checkpoint (not a torch/pickle file)"
        else:
            reason = lines[0] if lines else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint: {reason}") from None
    except Exception as err:  # truncated zip, text file, ...: torch raises many types
        raise CheckpointError(
            f"{path}: not a readable checkpoint (damaged or not a checkpoint: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint
