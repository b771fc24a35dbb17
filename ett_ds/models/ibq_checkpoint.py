"""Reading and writing tokenizer weights in the IBQ (SEED-Voken) key layout.

A SEED-Voken checkpoint is a PyTorch-Lightning ``.ckpt`` whose ``state_dict`` holds ``encoder.*``, ``decoder.*``,
``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight``, usually ``loss.*`` (discriminator, LPIPS) and
``model_ema.*`` (LitEma buffers: the parameter name with its dots removed, plus ``decay``/``num_updates``).
Its architecture lives in a YAML (``model.init_args.ddconfig`` / ``n_embed`` / ``embed_dim``).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import CheckpointError
from ..config import TokenizerConfig

TOKENIZER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


def _find(tree: Any, key: str):
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def tokenizer_config_from_ibq_yaml(path: str | Path, base: TokenizerConfig | None = None) -> TokenizerConfig:
    """Fill a TokenizerConfig from an IBQ YAML (``ddconfig`` + ``n_embed`` + ``embed_dim``, found at any depth)."""
    with open(path) as fh:
        tree = yaml.safe_load(fh)
    dd = _find(tree, "ddconfig")
    if not isinstance(dd, dict):
        raise CheckpointError(f"{path}: no 'ddconfig' section found (is this an IBQ config?)")
    if dd.get("double_z"):
        raise CheckpointError(f"{path}: double_z=True is not an IBQ tokenizer layout")
    cfg = TokenizerConfig(**vars(base)) if base is not None else TokenizerConfig()
    for ours, theirs in [("ch", "ch"), ("ch_mult", "ch_mult"), ("num_res_blocks", "num_res_blocks"),
                         ("attn_resolutions", "attn_resolutions"), ("z_channels", "z_channels"),
                         ("resolution", "resolution"), ("in_channels", "in_channels"), ("dropout", "dropout")]:
        if theirs in dd:
            setattr(cfg, ours, list(dd[theirs]) if isinstance(dd[theirs], (list, tuple)) else dd[theirs])
    for ours, theirs in [("codebook_size", "n_embed"), ("code_dim", "embed_dim")]:
        val = _find(tree, theirs)
        if val is not None:
            setattr(cfg, ours, int(val))
    return cfg


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a .ckpt/.pt (weights_only) or .safetensors file and return its flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (expected a torch.save zip archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refuses to load with weights_only=True because the file pickles Python objects. If you trust "
            "it, re-save only its tensors: python -c \"import torch; c=torch.load('IN', weights_only=False); "
            "torch.save({'state_dict': c['state_dict']}, 'OUT')\"") from None
    except Exception as e:  # corrupt archive
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no state_dict inside")
    return sd


def tokenizer_weights(sd: dict[str, torch.Tensor], expected: list[str], use_ema: bool = True,
                      source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Pick the tokenizer's tensors out of an IBQ state dict (EMA copies when asked and present); exact key check."""
    ema_keys = {k[len("model_ema."):]: k for k in sd if k.startswith("model_ema.")}
    have_ema = use_ema and any(n.replace(".", "") in ema_keys for n in expected)
    out, missing = {}, []
    for name in expected:
        if have_ema and name.replace(".", "") in ema_keys:
            out[name] = sd[ema_keys[name.replace(".", "")]]
        elif name in sd:
            out[name] = sd[name]
        else:
            missing.append(name)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tokenizer tensors missing, e.g. {missing[:3]} "
                              "(architecture differs from the config?)")
    unexpected = [k for k in sd if k.startswith(TOKENIZER_PREFIXES) and k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tokenizer tensors, e.g. {unexpected[:3]} "
                              "(architecture differs from the config?)")
    return out


def load_tokenizer_weights(tokenizer: torch.nn.Module, path: str | Path, use_ema: bool = True) -> dict:
    """Copy an IBQ checkpoint into ``tokenizer`` exactly (shapes checked). Returns a short report."""
    sd = read_state_dict(path)
    own = tokenizer.state_dict()
    weights = tokenizer_weights(sd, list(own), use_ema, str(path))
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config builds "
                                  f"{tuple(own[name].shape)}")
    tokenizer.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)
    return {"path": str(path), "tensors": len(weights),
            "ema": use_ema and any(k.startswith("model_ema.") for k in sd)}
