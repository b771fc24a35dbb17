"""Moving weights between ett_ds checkpoints, models and files.

- ``consolidated_state_dict(folder)``: the full fp32 state dict of a ZeRO checkpoint step folder (frozen params
  included), with the tokenizer's EMA weights substituted when the folder carries them (stage ``tokenizer``).
- ``load_into_model(model, folder)``: initialise a (possibly ZeRO-3-partitioned) model from a previous stage.
- ``save_tokenizer``: the tokenizer in the IBQ key layout as safetensors (+ its config in the metadata).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .engine import dist
from .models.ibq_checkpoint import CheckpointError
from .models.llm import gathered

TOKENIZER_EMA = "tokenizer_ema.safetensors"


class _TorchReadingSafely:
    """``torch`` as DeepSpeed's zero_to_fp32 sees it inside :func:`_zero_to_fp32_reads_safely`: the same module
    except that ``load`` is :func:`ett_ds.engine.checkpoint.safe_load` (weights_only=True, allow-listed types)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def load(f, map_location=None, **_ignored):
        from .engine.checkpoint import safe_load
        return safe_load(f, map_location=map_location or "cpu")


@contextlib.contextmanager
def _zero_to_fp32_reads_safely():
    """DeepSpeed's zero_to_fp32 merges the ZeRO shards but reads them with ``torch.load(weights_only=False)``,
    which runs whatever a pickled object asks for. While this is active its module-level ``torch`` reads safely."""
    import deepspeed.utils.zero_to_fp32 as z
    real = z.torch
    z.torch = _TorchReadingSafely(real)
    try:
        yield
    finally:
        z.torch = real


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is a one-line CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    folder = Path(folder)
    if not (folder / "complete").is_file():
        raise CheckpointError(f"{folder} is not a complete ett_ds checkpoint step folder")
    with _zero_to_fp32_reads_safely():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    ema = folder / TOKENIZER_EMA
    if ema.is_file():
        sd.update({f"tokenizer.{k}": v for k, v in read_safetensors(ema).items()})
    return sd


def load_into_model(model: torch.nn.Module, folder: Path) -> dict:
    """Copy matching tensors from a checkpoint into ``model`` (gathering partitioned params); returns a report.

    Parameters the checkpoint lacks (a part new in this stage, e.g. the visual head) keep their init; tensors the
    model lacks are ignored. A shape mismatch is an error.
    """
    sd = consolidated_state_dict(folder)
    own = dict(model.named_parameters())
    loaded, missing = [], []
    for name, p in own.items():
        if name not in sd:
            missing.append(name)
            continue
        shape = tuple(getattr(p, "ds_shape", p.shape))
        src = sd[name]
        if tuple(src.shape) != shape:
            raise CheckpointError(f"{folder}: {name} has shape {tuple(src.shape)}, the model has {shape}")
        with gathered([p], modify=True):
            if dist.rank() == 0 or not hasattr(p, "ds_id"):
                p.data.copy_(src.to(p.dtype))
        loaded.append(name)
    for name, b in model.named_buffers():
        if name in sd:
            b.data.copy_(sd[name].to(b.dtype))
    # tied weights (an LM head sharing the input embedding) appear once in named_parameters but under both names in
    # the checkpoint: the alias is loaded through its twin, not unused
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unexpected = sorted(set(sd) - set(own) - aliases - {n for n, _ in model.named_buffers()})
    report = {"from": str(folder), "loaded": len(loaded), "missing": missing, "unexpected": unexpected[:20]}
    if dist.is_rank0():
        print(f"[ett_ds] init_from {folder}: {len(loaded)} tensors loaded, {len(missing)} new "
              f"({', '.join(sorted({m.split('.')[0] for m in missing})) or '-'}), {len(unexpected)} unused"
              + (f" ({', '.join(unexpected[:8])}{', ...' if len(unexpected) > 8 else ''})" if unexpected else ""))
    return report


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the module's full parameters (gathered under ZeRO-3) and buffers, on CPU, on every rank."""
    params = list(module.parameters())
    with gathered(params):
        out = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()})
    return out


def umask_mode(path: str | Path, mode: int = 0o666) -> None:
    """Give a written file ``mode`` minus the process umask (what a plain ``open`` would have given): safetensors
    writes 0600, which colleagues on a shared cluster cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with the file mode following the umask (0644 under umask 022)."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    umask_mode(path)


def save_tokenizer(tokenizer: torch.nn.Module, path: Path, tcfg, dtype: torch.dtype = torch.float32) -> None:
    """Collective. Rank 0 writes the IBQ-layout safetensors with the tokenizer config in its metadata."""
    sd = full_state_dict(tokenizer)
    if dist.is_rank0():
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        save_safetensors({k: v.contiguous() for k, v in sd.items()}, path,
                         metadata={"format": "ibq", "ett_tokenizer_config": json.dumps(asdict(tcfg))})
    dist.barrier()
