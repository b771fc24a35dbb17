"""Reading and writing checkpoint files without trusting them.

Nothing read from a checkpoint can run code: every ``.pt`` file (ours and DeepSpeed's, on resume too) is read with
``torch.load(weights_only=True)`` through :func:`safe_load`, which allows tensors, plain containers and numbers plus
the few DeepSpeed/numpy types listed in :func:`allowed_globals`. A file that pickles anything else (e.g. an object
whose ``__reduce__`` calls ``os.system``) is refused with a one-line :class:`CheckpointError` naming the file.
DeepSpeed's own readers (``engine.load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``) call
``torch.load(weights_only=False)``; :func:`make_loads_safe` and :func:`reads_safely` route them through
:func:`safe_load`. Tensors that leave ett_ds are safetensors files (:func:`read_safetensors`,
:func:`save_safetensors`).

Foreign checkpoints that pickle arbitrary objects (PyTorch-Lightning ``.ckpt`` files with omegaconf hyper-parameters,
e.g. SEED-Voken's IBQ) are read by :mod:`.inert_unpickle` instead: tensors and plain data are rebuilt and every other
object becomes an inert placeholder that is never called. No error message of ett_ds advises ``weights_only=False``.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..engine.zero3 import deepspeed_module
from .layout import CheckpointError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


def allowed_globals() -> list:
    """Types a weights_only load may rebuild besides tensors and plain data: what DeepSpeed's ZeRO optimizer state
    pickles (its stage enum and loss-scaler objects, rebuilt from their attribute dicts without running code) and
    numpy arrays (RNG states of checkpoints written before they were stored as tensors)."""
    scalers = deepspeed_module("runtime.fp16.loss_scaler")
    return [deepspeed_module("runtime.zero.config").ZeroStageEnum, scalers.LossScaler, scalers.DynamicLossScaler,
            np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)), _reconstruct]


def safe_load(path, map_location="cpu", **_ignored):
    """``torch.load(path, weights_only=True)`` with :func:`allowed_globals`; anything else is refused (one line,
    naming the file). Extra keyword arguments (DeepSpeed passes ``weights_only=False``) are ignored."""
    path = str(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"'{found.group(1)}'" if found else "a Python object"
        raise CheckpointError(f"{path}: refused to load: it pickles {what}, which is not a tensor or plain data "
                              "(loading it could run code)") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file ({first})") from None


def make_loads_safe(engine) -> None:
    """Route every file DeepSpeed's ``engine.load_checkpoint`` reads (model and optimizer states) through
    :func:`safe_load` instead of its ``torch.load(weights_only=False)``."""
    engine.checkpoint_engine.load = safe_load


class _TorchReadingSafely:
    """``torch`` as a DeepSpeed module sees it inside :func:`reads_safely`: the same module except that ``load`` is
    :func:`safe_load` (weights_only=True, allow-listed types)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, **_ignored):
        return safe_load(f, map_location=map_location or "cpu")


@contextlib.contextmanager
def reads_safely(module):
    """While active, every ``torch.load`` of ``module`` (a DeepSpeed tool that reads ZeRO shards with
    ``torch.load(weights_only=False)``, e.g. ``zero_to_fp32`` or ``ds_to_universal``) goes through :func:`safe_load`."""
    real = module.torch
    module.torch = _TorchReadingSafely()
    try:
        yield
    finally:
        module.torch = real


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is a one-line CheckpointError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def umask_mode(path: str | Path, mode: int = 0o666) -> None:
    """Give a written file ``mode`` minus the process umask (what a plain ``open`` would have given): safetensors
    writes 0600, which colleagues on a shared cluster cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with the file mode following the umask (0644 under umask 022)."""
    save_file(tensors, str(path), metadata=metadata)
    umask_mode(path)
