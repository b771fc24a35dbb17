"""The one DeepSpeed engine: config resolution (no "auto" reaches DeepSpeed), precision, optimizer, schedule.

Precision (`engine.precision`):
- ``autocast_bf16``: parameters and master weights stay fp32; the engine's forward runs under torch.autocast(bf16)
  (DeepSpeed's ``torch_autocast`` section). The decoder is an fp32 island (tokenizers/taming.FP32Conv2d + autocast disabled), and
  its FP32Conv2d class is not in ``lower_precision_safe_modules`` (exact-class match), so even on 2+ ranks its weights
  are all-gathered in fp32. DeepSpeed's plain ``bf16`` mode is not offered: it casts every parameter, the decoder's too.
- ``fp32``: everything in fp32 (debugging, exactness tests).
- ``auto`` (default): autocast_bf16 on GPU; fp32 on CPU, where bf16 convolutions are emulated and slower.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

import ds_configs  # the templates: a package of JSON files beside ett_ds, installed with it (pyproject package-data)

from ..config import Config, ConfigError
from .zero3 import deepspeed_module, register_child_reads

DS_CONFIGS = Path(ds_configs.__file__).resolve().parent
# Modules DeepSpeed's torch_autocast may all-gather in bf16 (it matches exact classes): the visual-code head is an
# nn.Linear subclass computing its chunked loss inside its own call, so it is named too. FP32Conv2d (the decoder) is
# deliberately absent.
LOW_PRECISION_SAFE = ["torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d", "ett_ds.models.ett.CodeHead"]

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, once per bucket: noise, not news.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

_HF_DS_CONFIG = None  # keeps transformers' HfDeepSpeedConfig alive (it is held through a weakref)


def load_template(name_or_path: str) -> dict:
    p = Path(name_or_path)
    if not p.suffix:
        p = DS_CONFIGS / f"{name_or_path}.json"
    if not p.is_file():
        names = ", ".join(sorted(x.stem for x in DS_CONFIGS.glob("*.json")))
        raise ConfigError(f"engine.ds_config: '{name_or_path}' is neither a file nor one of: {names}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.ds_config: {p} is not valid JSON ({e})") from None


def default_bucket_size(hidden: int) -> int:
    """Reduce/prefetch bucket in elements: ~80 h^2 (2e8 for h=1536, the tuned value measured on an H200)."""
    return int(min(max(80 * hidden * hidden, 5e6), 5e8))


def default_persistence(hidden: int) -> int:
    """Params smaller than this stay gathered: ~650 h (1e6 for h=1536, measured best; DeepSpeed's default is 1e5)."""
    return int(min(max(650 * hidden, 1e4), 1e7))


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    micro = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size
    if gbs is None:
        return 1
    if gbs % (micro * world_size):
        raise ConfigError(f"train.global_batch_size: {gbs} is not a multiple of micro_batch_size x ranks "
                          f"= {micro} x {world_size}")
    return gbs // (micro * world_size)


def resolve_ds_config(cfg: Config, world_size: int, hidden: int | None) -> dict:
    """The JSON DeepSpeed receives: template + every "auto" filled + the precision section."""
    ds = {k: v for k, v in load_template(cfg.engine.ds_config).items() if not k.startswith("_")}
    for banned in ("bf16", "fp16"):
        if ds.get(banned, {}).get("enabled"):
            raise ConfigError(f"engine.ds_config: a '{banned}' section would cast the fp32 decoder; "
                              "use engine.precision instead")
        ds.pop(banned, None)
    h = hidden or 1024
    accum = grad_accum_steps(cfg, world_size)
    micro = cfg.train.micro_batch_size
    fill = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world_size, "gradient_clipping": cfg.optim.grad_clip}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    zero = ds.setdefault("zero_optimization", {})
    bucket = cfg.engine.bucket_size or default_bucket_size(h)
    zero_fill = {"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket,
                 "allgather_bucket_size": bucket,
                 "stage3_param_persistence_threshold": (cfg.engine.persistence_threshold
                                                        if cfg.engine.persistence_threshold is not None
                                                        else default_persistence(h))}
    for k, v in zero_fill.items():
        if zero.get(k) == "auto" or (k == "stage3_param_persistence_threshold"
                                     and cfg.engine.persistence_threshold is not None and k in zero):
            zero[k] = v
    if resolved_precision(cfg) == "autocast_bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                "lower_precision_safe_modules": LOW_PRECISION_SAFE}
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"engine.ds_config: unresolved 'auto' at {leftover[0]} (ett_ds does not know how to fill it)")
    return ds


def resolved_precision(cfg: Config) -> str:
    if cfg.engine.precision == "auto":
        return "autocast_bf16" if torch.cuda.is_available() else "fp32"
    return cfg.engine.precision


def _find_auto(node, path="") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def enable_zero_init(ds: dict) -> None:
    """Make transformers build LLMs inside deepspeed.zero.Init (partitioned at creation) for ZeRO-3 configs."""
    global _HF_DS_CONFIG
    from transformers.integrations import HfDeepSpeedConfig  # reason: spares preflight the transformers import (~0.6 s)
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds) if zero_stage(ds) == 3 else None


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule

PART_LR = {"tokenizer": "tokenizer_lr", "projector": "projector_lr", "index_embed": "projector_lr",
           "visual_head": "projector_lr", "llm": "lr"}


def param_groups(model, cfg: Config) -> list[dict]:
    """One group per (part, decay): separate peak lrs per part; biases, norms and 1-D params never decay."""
    o = cfg.optim
    groups = []
    for part, module in model.parts().items():
        peak = getattr(o, PART_LR[part])
        peak = o.lr if peak is None else peak  # an explicit 0 holds the part still (it is not 'unset')
        betas = tuple(o.tokenizer_betas if part == "tokenizer" else o.betas)
        decay, no_decay = [], []
        for p in module.parameters():
            if p.requires_grad:
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        for params, wd, tag in ((decay, o.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "weight_decay": wd, "lr": peak, "betas": betas,
                               "ett_peak_lr": peak, "ett_name": f"{part}/{tag}"})
    if not groups:
        raise ConfigError(f"stage {cfg.stage}: nothing to train")
    return groups


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up over warmup_ratio x max_steps, then cosine to min_lr_ratio (or constant)."""
    total = cfg.train.max_steps
    warm = int(round(cfg.optim.warmup_ratio * total))
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    m = cfg.optim.min_lr_ratio
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each group's lr = its peak x lr_factor(step); stepped by the engine at accumulation boundaries."""

    def __init__(self, optimizer, cfg: Config):
        self.optimizer, self.cfg, self.step_count = optimizer, cfg, 0
        self._apply()

    def _apply(self):
        f = lr_factor(self.step_count, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = g["ett_peak_lr"] * f

    def step(self, **_):
        self.step_count += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"step_count": self.step_count}

    def load_state_dict(self, state):
        self.step_count = state["step_count"]
        self._apply()


def build_optimizer(model, cfg: Config):
    fused = cfg.engine.fused_optimizer
    if fused is None:
        fused = torch.cuda.is_available()
    return torch.optim.AdamW(param_groups(model, cfg), fused=bool(fused))


def setup_backends(cfg: Config) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32
        torch.backends.cudnn.allow_tf32 = cfg.engine.tf32
        torch.backends.cudnn.benchmark = True


def initialize(model, cfg: Config, ds: dict):
    """Exactly one deepspeed.initialize for the whole ETTModel. Returns the engine."""
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed_module().initialize(model=model, optimizer=optimizer, config=ds,
                                                    lr_scheduler=lambda opt: WarmupCosine(opt, cfg))
    register_child_reads(engine.module)
    return engine
