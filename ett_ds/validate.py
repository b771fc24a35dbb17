"""Held-out validation during training (``train.eval_every`` > 0 with ``data.eval`` set), in every stage.

Every ``train.eval_every`` steps the trainer calls :meth:`Validator.run`, which computes on a fixed held-out subset
(the first ``train.eval_samples`` samples of ``data.eval``, read once on first use and cached on the host):

- the stage's loss terms (``loss``, ``loss_cap`` / ``loss_t2i``, ``loss_vq`` and its parts), under ``no_grad``
  with the model (and the discriminator) in eval mode, through the engine's forward (same precision as training);
  a rank computes its own share of the samples, the sums are all-reduced; ``codebook_usage`` of those samples;
- ``psnr`` of the reconstructions where the tokenizer trains with its decoder (``tokenizer``, ``ett``), plus
  ``psnr_ema`` with the EMA weights in stage ``tokenizer`` (and ``ema_decay``, the warmed-up decay of the latest
  update); ``handed_on`` names the weights a checkpoint hands on (init_from, evaluate, export): ``ema`` or ``raw``;
- greedy captions of the first ``train.eval_images`` held-out images with exact match and CER (``align``, ``ett``,
  ``frozen``, ``sft``; ``sft`` prompts in its chat template), through ``ett_ds.generation`` and scored by
  ``ett_ds.eval.tasks.caption_summary`` (the numbers ``evaluate --tasks caption`` reports);
- ``t2i``: one image sampled for each of the first ``train.eval_images`` held-out captions
  (``generation.generate_images``, the config's ``sampling`` guidance, temperature, top-k and top-p, seed ``seed``).

Rank 0 writes the row ``{"step": N, "eval": {...}}`` to ``metrics.jsonl``, the numbers as TensorBoard scalars
``eval/...``, the captions as a text panel ``eval/captions`` and image grids (``images/eval_*_stepN.png`` and
TensorBoard images ``eval/...``) with the predicted and true caption, or the prompt, under each image.

ZeRO-3: every rank runs every forward. Loss forwards are split evenly (every rank has the same number of samples);
captions and t2i samples run the same images/prompts on every rank, so greedy decoding stops at the same token
everywhere. The RNG states are restored afterwards, so validation does not change the training trajectory, and its
time is left out of the next logged ``samples_per_s``.

At the end of a run with an EMA, :func:`report_ema` compares the raw and the EMA weights on the first training batch
and warns when the EMA, which is what the next stage gets, reconstructs far worse.
"""
from __future__ import annotations

import contextlib
import random
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .data.batch import Batcher, batch_to_device
from .data.eval_stream import eval_batches
from .engine import dist
from .eval import metrics as M
from .eval.tasks import caption_summary
from .generation import caption, generate_images

if TYPE_CHECKING:  # the types the loop hands over; annotations only
    from .config import Config
    from .data.text import TextTokenizer
    from .engine.ema import ShardEMA
    from .models.ett import ETTModel
    from .runlog import RunLog
    from .stages import StageSpec
    from .tokenizers.objective import VQObjective


class Loop(Protocol):
    """What validation reads from the training loop (``trainer.Trainer`` is the one): named here, so that the
    coupling is a typed interface and not a reach into the Trainer's attributes."""

    cfg: Config
    spec: StageSpec
    model: ETTModel  # the module the engine wraps: captions, t2i sampling, the tokenizer's reconstructions
    objective: VQObjective | None  # put in eval mode with the model (discriminator BatchNorm, LeCAM anchors)
    text: TextTokenizer | None
    ema: ShardEMA | None
    device: torch.device
    log: RunLog
    step: int
    first_batch: dict | None  # the first training micro-batch on this rank (report_ema)

    def forward(self, batch: dict) -> tuple[dict, torch.Tensor, dict]:
        """The engine's forward and the loss: (outputs, L, detached terms)."""


@contextlib.contextmanager
def _rng_kept():
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global RNG states on exit."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _eval_mode(*modules):
    modes = [(m, m.training) for mod in modules if mod is not None for m in mod.modules()]
    for mod in modules:
        if mod is not None:
            mod.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _rows(batch: dict, idx: list[int]) -> dict:
    """Rows ``idx`` of a collated batch; the token tensors cut to the longest kept sequence (right padding)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0:
            out[k] = v[idx]
        elif isinstance(v, list):
            out[k] = [v[i] for i in idx]
    if "attention_mask" in out:
        width = int(out["attention_mask"].sum(1).max())
        for k in ("input_ids", "labels", "attention_mask"):
            out[k] = out[k][:, :width]
    return out


def greedy_captions(model, text, pixels: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy captions with the stage's prompt (``generation.caption``: after the image, or for ``sft`` as a
    one-turn conversation in ``data.chat_template``)."""
    return caption(model, text, pixels, max_new_tokens=max_new_tokens)


class Validator:
    def __init__(self, loop: Loop):
        self.tr = loop
        self.cfg = loop.cfg
        self.every = self.cfg.train.eval_every if self.cfg.data.eval else 0
        self.mine: list[dict] | None = None  # this rank's share, in micro-batches (host tensors)
        self.shown: dict | None = None  # the first eval_images samples, the same on every rank
        self.num_samples = 0

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    # -- data (read once) ----------------------------------------------------------------------------------------
    def _load(self) -> None:
        cfg, tr = self.cfg, self.tr
        batcher = Batcher(cfg, tr.text if tr.spec.uses_llm else None, train=False)
        # every rank reads the same first eval_samples samples (rank 0 of 1: one sorted, unsplit pass)
        it = eval_batches(cfg.data.eval, batch_size=cfg.train.eval_samples, make_example=batcher.make_example,
                          collate=batcher.collate, rank=0, world_size=1, num_workers=0, max_batches=1)
        batch = next(it, None)
        it.close()
        if batch is None or not bool(batch["valid"].any()):
            raise FileNotFoundError(f"data.eval={cfg.data.eval}: no decodable held-out sample for validation")
        keep = [i for i, v in enumerate(batch["valid"].tolist()) if v]
        batch = _rows({k: v for k, v in batch.items() if k not in ("valid", "data_stats")}, keep)
        n, world, rank = len(keep), dist.world_size(), dist.rank()
        share = [(rank + k * world) % n for k in range(max(1, n // world))]
        mb = cfg.train.micro_batch_size
        self.mine = [_rows(batch, share[i:i + mb]) for i in range(0, len(share), mb)]
        self.num_samples = len(share) * world
        self.shown = _rows(batch, list(range(min(n, cfg.train.eval_images))))

    # -- one pass ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, step: int) -> dict:
        """Collective: every rank calls it at the same step. Returns the ``eval`` metrics (on every rank)."""
        t0 = time.perf_counter()
        if self.mine is None:
            self._load()
        with _rng_kept():
            metrics, texts, grids = self._losses(step)
            if self.tr.spec.caption and self.cfg.train.eval_images > 0:
                texts.update(self._captions(metrics, grids))
            if self.tr.spec.generate and self.cfg.train.eval_images > 0:
                self._t2i(metrics, grids)
        metrics["seconds"] = time.perf_counter() - t0
        log = self.tr.log
        log.eval_row(step, metrics, texts)
        for name, (rows, labels, captions) in grids.items():
            log.images(step, rows, labels, name=name, captions=captions, scale=2)
        log.exclude_time(time.perf_counter() - t0)
        return metrics

    def _losses(self, step: int) -> tuple[dict, dict, dict]:
        tr, cfg = self.tr, self.cfg
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        psnr = torch.zeros(3, dtype=torch.float64)  # sum, n, sum with EMA weights
        hist = torch.zeros(cfg.model.tokenizer.codebook_size, dtype=torch.long, device=tr.device)
        grids = {}
        with _eval_mode(tr.model, tr.objective):
            for i, cpu in enumerate(self.mine):
                batch = batch_to_device(cpu, tr.device)
                out, _, terms = tr.forward(batch)
                has = {}
                if "num_caption_tokens" in out:
                    has["loss_cap"] = out["num_caption_tokens"] > 0
                for k, v in terms.items():
                    c = has[k].float() if k in has else torch.ones((), device=v.device)
                    v = torch.where(has[k], v, torch.zeros_like(v)) if k in has else v
                    sums[k] = sums[k] + v if k in sums else v.clone()
                    counts[k] = counts[k] + c if k in counts else c
                hist.index_add_(0, out["indices"].flatten(), torch.ones_like(out["indices"].flatten()))
                if tr.spec.reconstruct:
                    x = batch["pixels"].float()
                    p = M.psnr(out["recon"].float().clamp(-1, 1), x)
                    psnr[0] += p.double().sum()
                    psnr[1] += len(p)
                    if tr.ema is not None:
                        with tr.ema.swapped():
                            psnr[2] += M.psnr(tr.model.tokenizer(x)[0].float().clamp(-1, 1), x).double().sum()
            if tr.spec.reconstruct and cfg.train.eval_images > 0:  # same images on every rank
                x = batch_to_device({"pixels": self.shown["pixels"]}, tr.device)["pixels"]
                ctx = tr.ema.swapped() if tr.ema is not None else contextlib.nullcontext()
                with ctx:
                    recon = tr.model.tokenizer(x)[0].float().clamp(-1, 1)
                grids["eval/recon"] = ([x, recon], ["input", "recon (EMA)" if tr.ema is not None else "recon"],
                                       None)
        keys = sorted(sums)
        vec = torch.cat([torch.stack([sums[k].float() for k in keys] + [counts[k].float() for k in keys]).cpu()
                         .double(), psnr])
        vec = dist.all_reduce_sum(vec.to(tr.device)).cpu().tolist()
        dist.all_reduce_sum(hist)
        nk = len(keys)
        metrics: dict = {"num_samples": self.num_samples}
        metrics.update({k: vec[i] / vec[nk + i] if vec[nk + i] > 0 else None for i, k in enumerate(keys)})
        for k in ("loss_cap", "loss_vq"):
            metrics.setdefault(k, None)
        metrics["codebook_usage"] = M.stats_from_histogram(hist)["usage"]
        if tr.spec.reconstruct:
            s, n, s_ema = vec[2 * nk:]
            metrics["psnr"] = s / max(n, 1)
            if tr.ema is not None:
                metrics["psnr_ema"] = s_ema / max(n, 1)
                metrics["ema_decay"] = tr.ema.last_decay
            metrics["handed_on"] = "ema" if tr.ema is not None else "raw"
        return metrics, {}, grids

    def _captions(self, metrics: dict, grids: dict) -> dict:
        tr = self.tr
        rows = [i for i, t in enumerate(self.shown["text"]) if t.strip()]
        if not rows:
            return {}
        shown = _rows(self.shown, rows)
        pixels = batch_to_device({"pixels": shown["pixels"]}, tr.device)["pixels"]
        hyps = greedy_captions(tr.model, tr.text, pixels, self.cfg.data.max_text_tokens + 1)
        refs = [t.strip() for t in shown["text"]]
        cap = caption_summary(hyps, refs)
        cap["num"] = len(refs)
        cap["samples"] = [{"pred": h, "true": r} for h, r in zip(hyps, refs)]
        metrics["caption"] = cap
        grids["eval/captions"] = ([pixels], ["held-out"], [[f"pred: {h}\ntrue: {r}" for h, r in zip(hyps, refs)]])
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ") or "(empty)"  # noqa: E731
        table = "| # | predicted | true |\n|---|---|---|\n" + "".join(
            f"| {i} | {cell(h)} | {cell(r)} |\n" for i, (h, r) in enumerate(zip(hyps, refs)))
        return {"eval/captions": table}

    def _t2i(self, metrics: dict, grids: dict) -> None:
        tr = self.tr
        rows = [i for i, t in enumerate(self.shown["text"]) if t.strip()]
        if not rows:
            return
        shown = _rows(self.shown, rows)
        prompts = [t.strip() for t in shown["text"]]
        samples = generate_images(tr.model, tr.text, prompts, seed=self.cfg.seed, **self.cfg.sampling.t2i())
        data = batch_to_device({"pixels": shown["pixels"]}, tr.device)["pixels"]
        metrics["t2i"] = {"num": len(prompts), "prompts": prompts}
        grids["eval/t2i"] = ([data, samples], ["held-out", "samples"], [None, prompts])


@torch.no_grad()
def report_ema(tr: Loop, gap_db: float = 1.0) -> dict:
    """Collective, at the end of a run with an EMA: the PSNR of the raw and of the EMA weights (the ones checkpoints
    hand on to init_from, evaluate and export) on each rank's first training batch, averaged over ranks; one line,
    and a warning when the EMA is more than ``gap_db`` worse. Returns ``{"psnr": raw, "psnr_ema": ema}``."""
    if tr.ema is None or tr.first_batch is None:
        return {}
    x = tr.first_batch["pixels"].float()
    tok = tr.model.tokenizer
    with _eval_mode(tok), _rng_kept():
        raw = M.psnr(tok(x)[0].float().clamp(-1, 1), x).mean()
        with tr.ema.swapped():
            ema = M.psnr(tok(x)[0].float().clamp(-1, 1), x).mean()
    both = dist.all_reduce_sum(torch.stack([raw, ema]).double().to(tr.device)).cpu() / dist.world_size()
    raw, ema = both.tolist()
    tr.log.info(f"step {tr.step}: tokenizer PSNR on the first training batch {raw:.2f} dB with the raw weights, "
                f"{ema:.2f} dB with the EMA weights (decay {tr.ema.last_decay or 0:.4g}), which the checkpoints "
                f"hand on (tokenizer_ema.safetensors: init_from, evaluate, export)")
    if raw - ema > gap_db:
        tr.log.info(f"warning: the EMA weights handed on reconstruct {raw - ema:.1f} dB worse than the raw weights "
                    f"after {tr.step} steps: train longer or lower train.ema_decay (now {tr.cfg.train.ema_decay})")
    return {"psnr": raw, "psnr_ema": ema}
