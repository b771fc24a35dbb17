"""Importing tokenizer weights in the taming-transformers key layout, which SEED-Voken's IBQ keeps.

A taming VQGAN (``VQModel`` with ``VectorQuantizer2``) or SEED-Voken IBQ checkpoint is a PyTorch-Lightning
``.ckpt`` whose ``state_dict`` holds ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
``quantize.embedding.weight``, usually ``loss.*`` (discriminator, LPIPS; ignored) and, for IBQ, ``model_ema.*``
(LitEma buffers: the parameter name with its dots removed, plus ``decay``/``num_updates``). Its architecture lives
in a YAML (``model.params`` or ``model.init_args``: ``ddconfig`` / ``n_embed`` / ``embed_dim``). Both tokenizer
types here use that layout, so one importer serves both; ``model.tokenizer.type`` says which quantizer to build.

Such a ``.ckpt`` also pickles omegaconf ``hyper_parameters``, callback and optimizer states, which
``torch.load(weights_only=True)`` refuses. It is read with ``checkpoint.inert_unpickle``: tensors and plain data are
rebuilt, every other pickled object becomes an inert placeholder that is never called, so nothing in the file runs
(a crafted ``__reduce__`` included) and no ``weights_only=False`` is ever needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import CheckpointError, read_safetensors
from ..checkpoint.inert_unpickle import read_untrusted
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


def yaml_tokenizer_type(tree: dict) -> str | None:
    """The tokenizer type a model YAML names: an ett_ds export's ``type``, or the class of a taming
    (``target: taming.models.vqgan.VQModel``) or SEED-Voken (``class_path: ...IBQ``) config; None if unnamed."""
    if isinstance(tree, dict) and isinstance(tree.get("type"), str):
        return tree["type"]
    name = _find(tree, "class_path") or _find(tree, "target") or ""
    if not isinstance(name, str):
        return None
    if "ibq" in name.lower():
        return "ibq"
    if name.rsplit(".", 1)[-1] in ("VQModel", "VQGAN") or ".vqgan." in name.lower():
        return "vqgan"
    return None


def tokenizer_config_from_yaml(path: str | Path, base: TokenizerConfig | None = None) -> TokenizerConfig:
    """Fill a TokenizerConfig from a taming / IBQ YAML (``ddconfig`` + ``n_embed`` + ``embed_dim``, found at any
    depth; an export's ``tokenizer_config.json`` reads the same way)."""
    with open(path) as fh:
        tree = yaml.safe_load(fh)
    return tokenizer_config_from_tree(tree, path, base)


def tokenizer_config_from_tree(tree: Any, path: str | Path, base: TokenizerConfig | None = None) -> TokenizerConfig:
    """:func:`tokenizer_config_from_yaml` on already parsed data (``path`` names its source in errors)."""
    dd = _find(tree, "ddconfig")
    if not isinstance(dd, dict):
        raise CheckpointError(f"{path}: no 'ddconfig' section found (is this a taming / IBQ config?)")
    if dd.get("double_z"):
        raise CheckpointError(f"{path}: double_z=True is a KL autoencoder, not a VQ tokenizer layout")
    cfg = TokenizerConfig(**vars(base)) if base is not None else TokenizerConfig()
    kind = yaml_tokenizer_type(tree)
    if kind is not None and kind != cfg.type:
        raise CheckpointError(f"{path} describes a {kind} tokenizer but model.tokenizer.type={cfg.type} "
                              f"(set model.tokenizer.type={kind})")
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


def read_checkpoint(path: str | Path) -> tuple[Any, list[str]]:
    """A .ckpt/.pt file's content as plain data, with nothing in it run (``checkpoint.inert_unpickle``): tensors,
    containers, omegaconf configs as dicts/lists, every other pickled object a ``NotLoaded``; plus the names of the
    globals it pickles that were not loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer checkpoint not found: {path}")
    return read_untrusted(path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict (its tensors) of a .safetensors file or a .ckpt/.pt (a Lightning checkpoint's
    ``state_dict``, or the top level), read without running anything from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj, skipped = read_checkpoint(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(sd, dict) else {}
    if not tensors:
        also = f" (its other objects, e.g. '{skipped[0]}', were not loaded and nothing was run)" if skipped else ""
        raise CheckpointError(f"{path}: no tensors in its state_dict{also}")
    return tensors


def tokenizer_config_from_checkpoint(path: str | Path, base: TokenizerConfig | None = None) -> TokenizerConfig:
    """Fill a TokenizerConfig from the ``hyper_parameters`` a Lightning checkpoint keeps (SEED-Voken's IBQ saves its
    ``ddconfig`` / ``n_embed`` / ``embed_dim`` there, often as omegaconf objects, read as plain data)."""
    obj, _ = read_checkpoint(path)
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hp, dict):
        raise CheckpointError(f"{path}: no hyper_parameters to read the architecture from (give a YAML instead)")
    return tokenizer_config_from_tree(hp, path, base)


def tokenizer_weights(sd: dict[str, torch.Tensor], expected: list[str], use_ema: bool = True,
                      source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Pick the tokenizer's tensors out of a taming-layout state dict (EMA copies when asked and present); exact key check."""
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
    """Copy a taming-layout checkpoint into ``tokenizer`` exactly (shapes checked). Returns a short report."""
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
