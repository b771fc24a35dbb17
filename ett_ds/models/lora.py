"""LoRA on the LLM (``model.llm.lora``, r > 0) through peft, on one ZeRO-3 engine.

- ``inject(llm, cfg)``: peft's LoRA layers are put into the Hugging Face model in place
  (``peft.inject_adapter_in_model``: no ``PeftModel`` wrapper, so ``llm.model``, ``get_input_embeddings()``,
  ``resize_token_embeddings`` and the rest of ett_ds see the same module tree). A targeted ``q_proj`` becomes
  ``q_proj.base_layer`` (the original ``nn.Linear``, still partitioned by ``zero.Init``) plus ``q_proj.lora_A.default``
  / ``q_proj.lora_B.default`` (new, unpartitioned ``nn.Linear``\\ s; ``deepspeed.initialize`` partitions them like the
  projector, since every parameter of the one engine that is not a ZeRO parameter yet is converted there).
- ``train_adapters_only(llm)``: in a stage where the LLM trains, only the adapters get gradients; the base weights
  (embeddings and LM head included) stay frozen, so ZeRO-3 keeps no gradients or optimizer state for them.
- ``merge(llm)``: W + (alpha / r) B A written into each base layer and the LoRA layers replaced by their base
  ``nn.Linear``: a plain transformers model again (what ``python -m ett_ds.export`` writes).
- ``fit_state_dict(sd, names, folder)``: ``train.init_from`` across a LoRA boundary: a checkpoint without LoRA into
  a LoRA model (``q_proj.weight`` -> ``q_proj.base_layer.weight``, fresh adapters), or a LoRA checkpoint into a model
  without LoRA, or with other adapter shapes (its adapters merged into the base weights first).

Gradient checkpointing stays non-reentrant (``models/llm.py``): with frozen base weights and frozen embeddings no
input of a checkpointed layer requires grad, which the reentrant variant would answer with no gradient at all.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import yaml

from ..checkpoint.layout import RUN_CONFIG
from ..config import ConfigError

ADAPTER_TAG = ".lora_"  # in every adapter parameter's name: ...q_proj.lora_A.default.weight
BASE_TAG = ".base_layer."


def enabled(cfg) -> bool:
    """``cfg``: an ``LLMConfig`` (or None: no LLM)."""
    return cfg is not None and getattr(cfg, "lora", None) is not None and cfg.lora.r > 0


def peft_module():
    """peft, imported on first use (its import takes ~3 s, transformers included; only LoRA models need it)."""
    import peft  # reason: ~3 s to import; paid only where LoRA is used (model.llm.lora.r > 0, merging adapters)
    return peft


def peft_config(lcfg):
    return peft_module().LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                    target_modules=list(lcfg.target_modules), bias="none")


def inject(llm: nn.Module, lcfg) -> nn.Module:
    """LoRA layers (rank ``lcfg.r``) into ``llm`` in place; returns ``llm``. Embeddings and the LM head are never
    targeted (the tiny recipe ties them, and ZeRO-3 cannot freeze rows of a table: pitfalls A5). A target the LLM
    lacks is a one-line ``ConfigError`` (``ett_ds.train``: exit 2)."""
    bad = [t for t in lcfg.target_modules if t in ("lm_head", "embed_tokens") or t.endswith((".lm_head",
                                                                                              ".embed_tokens"))]
    if bad:
        raise ConfigError(f"model.llm.lora.target_modules: {bad[0]} is an embedding table / the LM head; LoRA "
                         "targets the linear projections of the decoder layers")
    names = {n for n, _ in llm.named_modules()}
    unknown = [t for t in lcfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"model.llm.lora.target_modules: no module named '{unknown[0]}' in the LLM "
                         f"({type(llm).__name__}'s nn.Linear layers: {', '.join(linear)})")
    peft_module().inject_adapter_in_model(peft_config(lcfg), llm)
    if hasattr(llm, "peft_config"):
        del llm.peft_config  # the LoRA settings live in ett_ds's config; a leftover would confuse save_pretrained
    return llm


def is_adapter(name: str) -> bool:
    return ADAPTER_TAG in name


def has_adapters(llm: nn.Module | None) -> bool:
    return llm is not None and any(is_adapter(n) for n, _ in llm.named_parameters())


def train_adapters_only(llm: nn.Module) -> None:
    """When ``llm`` carries adapters: adapters train, everything else of the LLM is frozen. No-op otherwise."""
    if not has_adapters(llm):
        return
    for name, p in llm.named_parameters():
        p.requires_grad_(is_adapter(name))


def adapter_layers(llm: nn.Module) -> list[tuple[str, nn.Module]]:
    lora_layer = peft_module().tuners.lora.LoraLayer
    return [(n, m) for n, m in llm.named_modules() if isinstance(m, lora_layer)]


def merge(llm: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the base ``nn.Linear`` back; ``llm`` is a plain model after.
    For unpartitioned models (``models.loading.load_model`` builds them so)."""
    for name, layer in adapter_layers(llm):
        if any(hasattr(p, "ds_id") for p in layer.parameters()):
            raise RuntimeError("lora.merge: the LLM is ZeRO-3 partitioned; merge a model from load_model")
        layer.merge(safe_merge=True)  # safe: a non-finite merged weight is an error, not a silent export
        parent_name, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent_name) if parent_name else llm, child, layer.get_base_layer())
    return llm


def count(module: nn.Module, trainable_only: bool = True, adapters_only: bool = False) -> int:
    """Elements of ``module``'s parameters (their full size under ZeRO-3)."""
    total = 0
    for name, p in module.named_parameters():
        if (trainable_only and not p.requires_grad) or (adapters_only and not is_adapter(name)):
            continue
        total += int(getattr(p, "ds_numel", p.numel()))
    return total


# ---------------------------------------------------------------------------------------------------------------
# train.init_from across a LoRA boundary

def _scaling(folder: Path, r: int) -> float:
    """alpha / r of the LoRA run that wrote ``folder`` (its config.yaml)."""
    tree = yaml.safe_load((Path(folder) / RUN_CONFIG).read_text()) or {}
    lora = ((tree.get("model") or {}).get("llm") or {}).get("lora") or {}
    return float(lora.get("alpha", r)) / r


def fit_state_dict(sd: dict[str, torch.Tensor], shapes: dict[str, tuple], folder: Path | None = None) -> dict:
    """``sd`` (a consolidated checkpoint) renamed for a model whose parameters and buffers have ``shapes`` (name ->
    full shape).

    Adapters the model cannot hold (no LoRA in the model, or another rank) are merged into their base weights
    (scaling alpha / r from ``folder``'s config); base weights move between ``X.weight`` and
    ``X.base_layer.weight`` as the model has them. Anything else passes through unchanged."""
    out = dict(sd)
    for a_key in [k for k in out if ".lora_A." in k and k.endswith(".weight")]:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        if b_key not in out:
            continue
        a, b = out[a_key], out[b_key]
        if tuple(shapes.get(a_key, ())) == tuple(a.shape) and tuple(shapes.get(b_key, ())) == tuple(b.shape):
            continue  # the model holds the same adapter
        del out[a_key], out[b_key]
        base = a_key.split(".lora_A.")[0] + ".base_layer.weight"
        if base in out:
            delta = (b.double() @ a.double()) * _scaling(folder, a.shape[0])
            out[base] = (out[base].double() + delta).to(out[base].dtype)
    for key in list(out):
        if key in shapes:
            continue
        if BASE_TAG in key:
            plain = key.replace(BASE_TAG, ".")
            if plain in shapes:
                out[plain] = out.pop(key)
        else:
            stem, _, leaf = key.rpartition(".")
            lora_name = f"{stem}.base_layer.{leaf}"
            if lora_name in shapes:
                out[lora_name] = out.pop(key)
    return out
