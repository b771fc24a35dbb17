"""Training and evaluating one stage: reuse what is finished, refuse what was trained otherwise, converge stage 0."""
from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ett_ds.checkpoint.layout import MARKER, is_complete, latest, step_tag

REPO = Path(__file__).resolve().parents[2]
# Overrides that do not change what a stage learns: a rerun may differ in them (stage 0 runs in chunks; the
# tokenizer-dynamics diagnostics only add columns to metrics.jsonl).
VOLATILE = ("train.stop_at=", "train.log_tokenizer_dynamics=")


def log(msg: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def has_train_option(name: str) -> bool:
    from ett_ds.config import TrainConfig
    return name in {f.name for f in dataclasses.fields(TrainConfig)}


def _kept(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(VOLATILE)]


def step_folder(run_dir: Path, step: int) -> Path | None:
    folder = run_dir / "checkpoints" / step_tag(step)
    return folder if is_complete(folder) else None


def latest_step(run_dir: Path) -> int:
    folder = latest(run_dir / "checkpoints")
    return int(folder.name.split("_")[1]) if folder is not None else 0


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Stages:
    """Runs ``ett_ds.train`` stages under ``runs`` with ``common`` overrides; ``timings`` collects seconds."""

    def __init__(self, runs: Path, recipe: str, common: list[str], launcher: str = "inprocess"):
        self.runs, self.recipe, self.common, self.launcher = runs, recipe, common, launcher
        self.timings: dict[str, float] = {}

    def _check_record(self, name: str, overrides: list[str]) -> None:
        record = self.runs / name / "replicate_stage.json"
        before = json.loads(record.read_text())["overrides"] if record.is_file() else None
        if before is not None and _kept(before) != _kept(overrides):
            changed = sorted(set(_kept(before)) ^ set(_kept(overrides)))
            raise SystemExit(f"error: {self.runs / name} was trained with other settings ({', '.join(changed[:4])}); "
                             f"use a new --out, or delete that folder to retrain it")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"overrides": overrides}, indent=1))

    def _call(self, overrides: list[str]) -> int:
        if self.launcher == "inprocess":
            from ett_ds.train import main as train_main
            return train_main(["--config", self.recipe, *overrides])
        cmd = ([sys.executable, "-m", "ett_ds.train", "--config", self.recipe] if self.launcher == "python"
               else [*shlex.split(self.launcher), self.recipe])
        return subprocess.call([*cmd, *overrides], cwd=REPO)

    def train(self, name: str, steps: int, extra: list[str], stop_at: int | None = None) -> Path:
        """Train run ``name`` to ``stop_at`` (default ``steps``) of a ``steps``-step schedule; reuse it if done."""
        end = stop_at or steps
        overrides = [f"name={name}", f"train.max_steps={steps}", *self.common, *extra]
        if stop_at is not None:
            overrides.append(f"train.stop_at={stop_at}")
        done = step_folder(self.runs / name, end)
        self._check_record(name, overrides)
        if done is not None:
            return done
        log(f"{name}: training to step {end}")
        t0 = time.time()
        rc = self._call(overrides)
        self.timings[name] = round(self.timings.get(name, 0.0) + time.time() - t0, 1)
        folder = step_folder(self.runs / name, end)
        if rc != 0 or folder is None:
            raise SystemExit(f"error: stage {name} failed (exit {rc}); see {self.runs / name}")
        return folder

    def converge_stage0(self, extra: list[str], *, chunk: int, max_steps: int, tol_db: float, window: int = 1000,
                        cooldown: int = 0) -> tuple[Path, dict]:
        """Stage 0 on a constant lr in chunks of ``chunk`` steps, validated every chunk; stop once the validation
        PSNR gained less than ``tol_db`` over the last ``window`` steps, or at ``max_steps``. Then, with
        ``cooldown``, a second run from there whose lr decays to 0 over ``cooldown`` steps (cosine), so that the
        tokenizer the arms start from is not one that a smaller lr alone would still improve.

        The rule reads the raw weights' validation PSNR (``psnr``, what the trainer validates); ``train.init_from``
        (and ``evaluate``) read the tokenizer's EMA from ``tokenizer_ema.safetensors`` when the checkpoint has one.
        """
        if window % chunk:
            raise SystemExit(f"error: --stage0-chunk {chunk} must divide the {window}-step window")
        # constant lr after a short warm-up (at most 200 steps), so the horizon max_steps does not shape the curve
        plateau = [*extra, "optim.schedule=constant", f"optim.warmup_ratio={min(0.05, 200 / max_steps):g}",
                   f"train.eval_every={chunk}"]
        step = 0
        while step < max_steps:
            step = min(step + chunk, max_steps)
            curve = psnr_curve(self.runs / "stage0")
            if not (step in curve and latest_step(self.runs / "stage0") > step):  # else: passed in an earlier run
                self.train("stage0", max_steps, plateau, stop_at=step)
                curve = psnr_curve(self.runs / "stage0")
            if step in curve and step - window in curve and curve[step] - curve[step - window] < tol_db:
                break
        folder = step_folder(self.runs / "stage0", step)
        if folder is None:
            raise SystemExit(f"error: stage 0 has no checkpoint at step {step} (a run with other limits left it "
                             f"elsewhere); use a new --out")
        curve = psnr_curve(self.runs / "stage0")
        gain = (curve[step] - curve[step - window]) if step - window in curve and step in curve else None
        info = {"curve": curve, "stopped_at": step, "window": window, "tol_db": tol_db, "last_gain_db": gain,
                "converged": gain is not None and gain < tol_db, "cooldown": cooldown}
        if cooldown:
            folder = self.train("stage0_cool", cooldown, [*extra, "optim.schedule=cosine", "optim.warmup_ratio=0",
                                                          f"train.eval_every={chunk}", f"train.init_from={folder}"])
            info["cooldown_curve"] = {step + k: v for k, v in psnr_curve(self.runs / "stage0_cool").items()}
        return folder, info

    def evaluate(self, ckpt: Path, data: Path, out: Path, tasks: str, samples: int) -> dict:
        """Held-out metrics JSON (and ``<stem>_samples.jsonl``) of ``ckpt``; reused when newer than it."""
        if out.is_file() and out.stat().st_mtime >= (ckpt / MARKER).stat().st_mtime:
            return json.loads(out.read_text())
        from ett_ds.evaluate import main as eval_main
        t0 = time.time()
        rc = eval_main(["--ckpt", str(ckpt), "--data", str(data), "--tasks", tasks, "--out", str(out),
                        "--max-samples", str(samples), "--batch-size", str(min(64, samples)), "--ocr", "off",
                        "--quiet"])
        self.timings[f"eval_{out.parent.name}_{out.stem}"] = round(time.time() - t0, 1)
        if rc != 0:
            raise SystemExit(f"error: evaluation of {ckpt} failed")
        return json.loads(out.read_text())


def psnr_curve(run_dir: Path) -> dict[int, float]:
    """Validation PSNR of the raw weights by step from a stage-0 run's metrics.jsonl."""
    out = {}
    for row in metrics_rows(run_dir):
        ev = row.get("eval")
        if isinstance(ev, dict) and "psnr" in ev:
            out[int(row["step"])] = float(ev["psnr"])
    return out


def train_curve(run_dir: Path, key: str) -> dict[int, float]:
    """Training metric ``key`` by logged step (rows without it skipped)."""
    return {int(r["step"]): float(r[key]) for r in metrics_rows(run_dir)
            if "eval" not in r and isinstance(r.get(key), (int, float))}
