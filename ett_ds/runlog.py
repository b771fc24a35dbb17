"""Run logging: metrics.jsonl (one JSON object per logged step), TensorBoard, a tqdm bar and image grids.

Every rank calls ``add``/``step`` (the logged values are averaged over ranks with one all-reduce per logged step;
the codebook histogram is summed); only rank 0 writes. Loss terms stay on the device between logged steps, so the
step itself has no host synchronisation. A term that a micro-batch may lack (``loss_cap`` of a batch with no caption
positions, e.g. t2i samples) is averaged over the micro-batches that have it and logged as ``null`` when none had.

Held-out validation (``ett_ds.validate``) adds rows ``{"step": N, "eval": {...}}`` through :meth:`RunLog.eval_row`.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from PIL import Image
from tqdm import tqdm

from .engine import dist
from .eval.metrics import save_grid, stats_from_histogram


class RunLog:
    def __init__(self, run_dir: Path, every: int, enabled: bool):
        self.run_dir, self.every, self.enabled = Path(run_dir), max(1, every), enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.bar = self.tb = None
        self.total = None  # the last step: always logged, on every rank (the row is a collective)
        self.postfix: dict = {}  # the progress line's losses
        self.handed_on: dict = {}  # and the latest validation's PSNR of the weights checkpoints hand on
        self._reset()

    def _reset(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor | float] = {}  # micro-batches that had each term
        self.n = 0
        self.hist = None
        self.samples = 0
        self.tokens = None
        self.data = Counter()
        self.t0 = time.perf_counter()

    def start(self, total: int, initial: int = 0) -> None:
        self.total = total
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # a terminal gets a live bar; a log file (SLURM, CI) gets a line every 30 s instead of every step
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        try:
            from torch.utils.tensorboard import SummaryWriter  # reason: tensorboard is optional (metrics.jsonl has all)
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
            self.tb = None

    def truncate(self, step: int) -> int:
        """Rank 0: drop the rows of ``metrics.jsonl`` logged after ``step`` (the step a run starts or resumes from)
        and a half-written last line, so a killed run's rows past its checkpoint are not repeated by the resumed
        run. Rewritten atomically; returns how many lines were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line + "\n")
            elif line.strip():
                dropped += 1
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(self.path)
            self.info(f"{self.path.name}: dropped {dropped} row(s) logged after step {step} by an earlier attempt")
        return dropped

    def info(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(f"[ett_ds] {msg}")

    def add(self, terms: dict, indices: torch.Tensor, codebook_size: int, samples: int, tokens=None,
            present: dict | None = None) -> None:
        """``present``: for terms a micro-batch may lack, a device bool (this micro-batch has it); such a term counts
        only where present (no host synchronisation)."""
        present = present or {}
        for k, v in terms.items():
            c = 1.0
            if k in present:
                c = present[k].float()
                v = torch.where(present[k], v, torch.zeros_like(v))  # an absent term may be 0/0
            self._accumulate(k, v, c)
        idx = indices.flatten()
        if self.hist is None:
            self.hist = torch.zeros(codebook_size, dtype=torch.long, device=idx.device)
        # index_add_ (unlike bincount, which reads min/max back to the host on CUDA) never synchronises
        self.hist.index_add_(0, idx, torch.ones_like(idx))
        self.n += 1
        self.samples += samples
        if tokens is not None:
            self.tokens = tokens if self.tokens is None else self.tokens + tokens

    def add_scalars(self, values: dict[str, torch.Tensor]) -> None:
        """Per-step device scalars (not per micro-batch), averaged over the steps of the logging window."""
        for k, v in values.items():
            self._accumulate(k, v, 1.0)

    def _accumulate(self, key: str, value: torch.Tensor, count) -> None:
        """A term's running sum and how many micro-batches (or steps) it covers, until the next logged row."""
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.counts[key] = self.counts[key] + count if key in self.counts else count

    def add_data_stats(self, stats: dict | None) -> None:
        if stats:
            self.data.update({k: int(v) for k, v in stats.items()})

    def step(self, step: int, lrs: dict[str, float], extra: dict | None = None) -> dict | None:
        """Every rank, every step; on a logged step returns (and rank 0 writes) the row. ``extra``: host values
        added to the row as they are (e.g. the count of skipped steps)."""
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every and step != self.total:
            return None
        keys = sorted(self.sums)
        dev = self.hist.device
        vec = torch.stack([self.sums[k].float().to(dev) for k in keys]
                          + [torch.as_tensor(self.counts[k], dtype=torch.float32, device=dev) for k in keys]
                          + [torch.as_tensor(float(self.samples), device=self.hist.device),
                             (self.tokens.float() if self.tokens is not None
                              else torch.zeros((), device=self.hist.device))])
        dist.all_reduce_sum(vec)
        dist.all_reduce_sum(self.hist)
        data = _gather_counters(self.data)
        vals = vec.tolist()
        dt = time.perf_counter() - self.t0
        row = {"step": step}
        nk = len(keys)  # each term: its sum over micro-batches and ranks / how many of them had it
        row.update({k: vals[i] / vals[nk + i] if vals[nk + i] > 0 else None for i, k in enumerate(keys)})
        row.setdefault("loss_cap", None)
        row.setdefault("loss_vq", None)
        row["lr"] = lrs.get("llm", next(iter(lrs.values())) if lrs else None)
        row.update({f"lr_{k}": v for k, v in lrs.items()})
        row["samples_per_s"] = vals[-2] / dt
        row["tokens_per_s"] = vals[-1] / dt
        cb = stats_from_histogram(self.hist)
        row["codebook_usage"] = cb["usage"]
        row["codebook_perplexity"] = cb["perplexity"]
        if data:
            row["data"] = dict(data)
        row.update(extra or {})
        row["time"] = time.time()
        self._reset()
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("step", "time"):
                        self.tb.add_scalar(k, v, step)
            if self.bar is not None:
                self.postfix = {k: f"{row[k]:.4g}" for k in ("loss", "loss_cap", "loss_vq") if row.get(k) is not None}
                self.bar.set_postfix({**self.postfix, **self.handed_on})
        return row

    def images(self, step: int, rows: list[torch.Tensor], labels: list[str], name: str = "recon",
               captions: list | None = None, scale: int = 1) -> Path | None:
        """A grid PNG ``images/{name}_step{step}.png`` (and TensorBoard image ``name``); ``captions``: per row,
        None or a string under each image (``eval.metrics.save_grid``)."""
        if not self.enabled:
            return None
        out = self.run_dir / "images" / f"{name.replace('/', '_')}_step{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid([r.detach().float().cpu() for r in rows], out, labels=labels, captions=captions, scale=scale)
        if self.tb is not None:
            self.tb.add_image(name, np.asarray(Image.open(out).convert("RGB")), step, dataformats="HWC")
        self.info(f"wrote {out}")
        return out

    def exclude_time(self, seconds: float) -> None:
        """Leave ``seconds`` (a validation pass) out of the next logged row's throughput."""
        self.t0 += seconds

    def eval_row(self, step: int, metrics: dict, texts: dict[str, str] | None = None) -> dict:
        """Rank 0 writes ``{"step": step, "eval": metrics}`` to metrics.jsonl, each number of ``metrics`` (nested
        dicts flattened with ``/``) as the TensorBoard scalar ``eval/<key>``, and ``texts`` (markdown) as TensorBoard
        text panels. Returns the row."""
        row = {"step": step, "eval": metrics, "time": time.time()}
        if not self.enabled:
            return row
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in _flat(metrics).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"eval/{k}", v, step)
            for k, v in (texts or {}).items():
                self.tb.add_text(k, v, step)
            self.tb.flush()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in _flat(metrics).items() if isinstance(v, float)
                          and k.split("/")[-1] in ("loss", "exact_match", "cer", "psnr", "psnr_ema"))
        handed = metrics.get("handed_on")
        if handed:  # which weights init_from / evaluate / export will take from this run's checkpoints
            key = "psnr_ema" if handed == "ema" else "psnr"
            shown += f"; checkpoints hand on the {'EMA' if handed == 'ema' else handed} weights ({key})"
            if isinstance(metrics.get(key), float):
                self.handed_on = {f"eval_{key}": f"{metrics[key]:.4g}"}
                if self.bar is not None:
                    self.bar.set_postfix({**self.postfix, **self.handed_on})
        self.info(f"eval at step {step}: {shown}")
        return row

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _gather_counters(c: Counter) -> Counter:
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return Counter(c)
    parts = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, dict(c))
    total = Counter()
    for p in parts:
        total.update(p)
    return total


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
