"""The Trainer: one loop for every stage, on one DeepSpeed engine holding tokenizer, projector and LLM.

The stage (config) decides what trains and which loss terms exist: L = L_cap (+ L_t2i) + loss.alpha * L_vq
(``models/losses.total_loss``), with L_vq from ``tokenizers/objective.py``. What a checkpoint holds of the run is
registered in ``checkpoint/training.py``. Every rank runs every forward. The command line is ``ett_ds/train.py``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from . import config as C
from .checkpoint import reshard, training
from .checkpoint.layout import TOKENIZER_EMA
from .checkpoint.manager import Adapter, CheckpointManager, RunLock
from .data.batch import Batcher, batch_to_device
from .data.shards import train_batches
from .engine import deepspeed as eng
from .engine import dist, preempt
from .engine.ema import ShardEMA
from .engine.zero3 import local_shard
from .generation import generate_images
from .models import losses
from .models.build import build_model
from .models.ett import MODEL_INPUTS
from .models.weights import load_into_model, save_tokenizer
from .preflight import check_shards_and_resume, ensure_demo_data, ensure_text_tokenizer, pin_init_from
from .runlog import RunLog
from .stages import STAGE_SPECS
from .tokenizers.checkpoint import tokenizer_config_from_yaml
from .tokenizers.dynamics import TokenizerDynamics
from .tokenizers.objective import VQObjective
from .validate import Validator, report_ema


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row, or non-finite weights at a save: the run stops (one line, exit 2)."""


def llm_hidden_size(cfg: C.Config) -> int | None:
    if not STAGE_SPECS[cfg.stage].uses_llm:
        return None
    llm = cfg.model.llm
    if llm.init_config:
        return int(llm.init_config["hidden_size"])
    meta = json.loads((Path(llm.path) / "config.json").read_text())
    return int(meta.get("hidden_size") or meta.get("text_config", {}).get("hidden_size"))


class Trainer:
    def __init__(self, cfg: C.Config):
        self.cfg = cfg
        self.spec = STAGE_SPECS[cfg.stage]
        if cfg.model.tokenizer.checkpoint_config:
            cfg.model.tokenizer = tokenizer_config_from_yaml(cfg.model.tokenizer.checkpoint_config,
                                                             cfg.model.tokenizer)
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        torch.manual_seed(cfg.seed)
        eng.setup_backends(cfg)
        # a checkpoint of another world size keeps its global batch: accumulation is recomputed (checkpoint/reshard.py)
        self.reshard_note = reshard.keep_global_batch(cfg, training.resume_folder(cfg), self.world)
        self.ds_config = eng.resolve_ds_config(cfg, self.world, llm_hidden_size(cfg))
        self.accum = self.ds_config["gradient_accumulation_steps"]
        eng.enable_zero_init(self.ds_config)
        pin_init_from(cfg)  # a run folder -> its newest complete step, recorded as such in config.yaml
        ensure_demo_data(cfg)
        ensure_text_tokenizer(cfg)  # none set, random-init LLM: the run's own spm.model (recorded in cfg)
        # partitioned at creation under ZeRO-3; the tokenizer's initial weights (model.tokenizer.checkpoint) read
        model, self.text = build_model(cfg, zero_init=True)
        if cfg.train.init_from:
            self.init_report = load_into_model(model, Path(cfg.train.init_from))
        self.engine = eng.initialize(model, cfg, self.ds_config)
        self.model = self.engine.module
        # L = L_cap (+ L_t2i) + alpha * L_vq; without an LLM (stage tokenizer) L_vq is the whole loss
        self.objective = VQObjective(cfg.loss, cfg.model.tokenizer.in_channels).to(self.device) \
            if self.spec.reconstruct else None
        self.vq_weight = cfg.loss.alpha if self.spec.uses_llm else 1.0
        self.dynamics = None
        if cfg.train.log_tokenizer_dynamics and self.model.tokenizer_trains and self.spec.uses_llm:
            self.dynamics = TokenizerDynamics(self.model)  # code drift and the caption / L_vq gradient ratio
        self.ema = None
        if cfg.stage == "tokenizer" and cfg.train.ema_decay > 0:
            self.ema = ShardEMA(self.model.tokenizer.named_parameters(), cfg.train.ema_decay)
        self.step, self.segment, self.samples_seen = 0, 0, 0
        self.saved_step = None  # the step of the last checkpoint this job wrote
        self.preempted = None  # the signal (SIGUSR1 / SIGTERM) that ended this job early, see engine/preempt.py
        self.bad_in_row = self.bad_total = 0  # steps whose update was skipped (non-finite loss or gradient norm)
        self.unverified = None  # the newest checkpoint written or resumed, until a finite step follows it
        self.first_batch = None
        self.log = RunLog(self.run_dir, cfg.train.log_every, enabled=dist.is_rank0())
        self.resumed = None  # (folder, step) of the checkpoint resume() loaded
        self.checkpoints = self._checkpoint_parts()  # every part of the state, registered once

    def _checkpoint_parts(self) -> CheckpointManager:
        """Every part of this run's state registered once (torchtitan's pattern): save and resume are one call each.
        The engine (weights, optimizer, scheduler); per rank the discriminator, the EMA shards (joined from every old
        rank's after a world-size change) and the RNG states; the counters, and the tokenizer's EMA weights as a file
        the next stage and the exports read."""
        m = CheckpointManager(self.engine, self.ckpt_root, self.cfg.train.keep_last, log=self.log.info)
        if self.objective is not None:  # the discriminator, its optimizer, LeCAM anchors
            m.register("gan", Adapter(self.objective.extra_state, self.objective.load_extra_state))
        if self.ema is not None:
            ema = self.ema
            m.register("ema", Adapter(ema.state_dict, reads_all=True,
                                      load=lambda extra: ema.load_state_dict(reshard.ema_state(extra, ema.params))))
            m.register_file(TOKENIZER_EMA, self.write_tokenizer_ema)
        m.register("rng", Adapter(training.rng_state, training.set_rng_state))
        m.register("counters", Adapter(self._counters, self._set_counters), per_rank=False)
        return m

    def _counters(self) -> dict:
        return {"segment": self.segment, "samples_seen": self.samples_seen, "stage": self.cfg.stage}

    def _set_counters(self, state: dict) -> None:
        self.step, self.segment, self.samples_seen = state["step"], state["segment"], state["samples_seen"]

    def write_tokenizer_ema(self, path: Path) -> None:
        """Collective: the tokenizer with its EMA weights as safetensors (what init_from and evaluate read)."""
        with self.ema.swapped():
            save_tokenizer(self.model.tokenizer, path, self.cfg.model.tokenizer)

    # -- data ----------------------------------------------------------------------------------------------------
    def batches(self):
        batcher = Batcher(self.cfg, self.text, train=True)
        return train_batches(self.cfg.data.train, batch_size=self.cfg.train.micro_batch_size,
                             make_example=batcher.make_example, collate=batcher.collate, seed=self.cfg.seed,
                             segment=self.segment, rank=self.rank, world_size=self.world,
                             num_workers=self.cfg.data.num_workers, shuffle_buffer=self.cfg.data.shuffle_buffer,
                             max_error_rate=self.cfg.data.max_error_rate,
                             decode_size=tuple(self.cfg.data.image_size))  # JPEGs decode at reduced DCT scale

    # -- one optimizer step --------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[dict, torch.Tensor, dict]:
        """The engine's forward on a device batch and the loss L = L_cap (+ L_t2i) + alpha * L_vq
        (``models.losses.total_loss``): the model's outputs, L and its detached terms. Training and validation both
        run it (under ZeRO-3 every rank must)."""
        out = self.engine(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        loss, terms = losses.total_loss(out, batch, self.objective, self.vq_weight, self.step, self.device)
        return out, loss, terms

    def train_step(self, it) -> bool:
        """One optimizer step (``accum`` micro-batches). Returns whether the update was applied.

        A step whose loss (any micro-batch, the discriminator's included) or gradient norm is not finite never
        reaches the weights: the backward is seeded with ``finite_gate(loss)`` (1, or NaN when the loss is not
        finite, computed on the device), so a bad loss makes the gradients NaN; DeepSpeed's ZeRO optimizer already
        all-reduces the global gradient norm and skips the update when it is not finite, identically on every
        rank. Its decision (``engine.was_step_applied()``) then also skips the discriminator's update (its
        buffers, LeCAM anchors and BatchNorm statistics, are restored) and the EMA. No host synchronisation is
        added: the only one is the one DeepSpeed's norm check makes anyway.
        """
        # the discriminator's LeCAM anchors and BatchNorm statistics change in the forward: kept to restore
        snapshot = self.objective.snapshot() if self.objective is not None else None
        if self.dynamics is not None:
            self.dynamics.before_step()
        for _ in range(self.accum):
            batch = next(it)
            self.log.add_data_stats(batch.pop("data_stats", None))
            batch = batch_to_device(batch, self.device)
            if self.first_batch is None:  # kept for the image grids: the same inputs every time
                self.first_batch = batch
            out, loss, terms = self.forward(batch)
            loss_d = None
            if self.objective is not None:
                loss_d, d_terms = self.objective.discriminator_loss(batch["pixels"], out["recon"], self.step)
                terms.update({k: v.float() for k, v in d_terms.items()})
            if self.dynamics is not None:
                self.dynamics.used_codes(out["indices"])
            gate = finite_gate(loss, loss_d)
            self.engine.backward(loss * gate)
            if loss_d is not None:
                self.objective.backward_discriminator(loss_d * gate)
            self.engine.step()
            tokens = batch["attention_mask"].sum() if "attention_mask" in batch else None
            present = {"loss_cap": out["num_caption_tokens"] > 0} if "num_caption_tokens" in out else None
            self.log.add(terms, out["indices"], self.model.tokenizer.codebook_size,
                         samples=batch["pixels"].shape[0], tokens=tokens, present=present)
        applied = bool(self.engine.was_step_applied())  # a Python bool DeepSpeed set after its own norm check
        if self.objective is not None:
            self.objective.apply_step(skip=not applied)
            if not applied:
                self.objective.restore(snapshot)
        if self.dynamics is not None:
            self.log.add_scalars(self.dynamics.after_step())
        self.step += 1
        self.samples_seen += self.cfg.train.micro_batch_size * self.accum * self.world
        if applied:
            self.bad_in_row = 0
            if self.ema is not None:
                self.ema.update(self.step)  # decay warmed up by the step (engine/ema.py)
        else:
            self.bad_in_row += 1
            self.bad_total += 1
        return applied

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def resume(self) -> None:
        folder = training.resume_folder(self.cfg)
        if folder is None:
            return
        settings = training.optimizer_settings(self.engine)  # this config's, before the checkpoint's come back
        self.checkpoints.load(folder)
        training.restore_optimizer_settings(self.engine, settings)
        self.resumed = (folder, self.step)
        self.unverified = folder
        self.log.info(f"resumed from {folder} at step {self.step}")
        if self.reshard_note:
            self.log.info(self.reshard_note)
        changed = training.changed_settings(folder, self.cfg)
        if changed:
            self.log.info(f"optimizer/schedule settings changed since {folder.name}, applied from step {self.step} "
                          f"on: {changed}")

    def weights_finite(self) -> bool:
        """Collective: every rank's shards (ZeRO partitions and fp32 masters), the discriminator and the EMA are
        finite. One all-reduce and one host read per checkpoint, not per step."""
        tensors = [local_shard(p) for p in self.model.parameters()]
        tensors += list(getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
        if self.objective is not None:
            tensors += self.objective.trained_parameters()
        if self.ema is not None:
            tensors += list(self.ema.shadow.values())
        ok = torch.stack([torch.isfinite(t).all() for t in tensors if t is not None and t.numel()]).all()
        bad = dist.all_reduce_sum((~ok).float().reshape(1).to(self.device))  # ranks with a non-finite shard
        return bool(bad.item() == 0)

    def save(self) -> Path:
        if not self.weights_finite():
            raise TrainingDiverged(f"weights are not finite at step {self.step}: no checkpoint written; newest "
                                   f"checkpoint known to be good: {ckpt.newest_good(self.ckpt_root) or 'none'}")
        self.segment += 1  # the data stream is reseeded after every save: a resume continues the same stream
        folder = self.checkpoints.save(self.step, yaml.safe_dump(C.to_dict(self.cfg), sort_keys=False))
        self.unverified = folder
        self.saved_step = self.step
        return folder

    # -- pictures ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_images(self) -> None:
        """Input vs reconstruction of the first batch, or (t2i) samples for its first captions; all ranks compute
        (ZeRO-3), rank 0 writes."""
        if self.spec.generate:
            prompts = list(self.first_batch["text"][:4])
            samples = generate_images(self.model, self.text, prompts, seed=self.cfg.seed, **self.cfg.sampling.t2i())
            self.log.images(self.step, [self.first_batch["pixels"][:4], samples], ["data", "samples"], name="samples",
                            captions=[None, prompts], scale=2)
        if not self.spec.reconstruct:
            return
        x = self.first_batch["pixels"][:8]
        tok = self.model.tokenizer
        was_training = tok.training
        tok.eval()
        ctx = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            recon = tok(x)[0].clamp(-1, 1)
        tok.train(was_training)
        self.log.images(self.step, [x, recon], ["input", "recon"])

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        check_shards_and_resume(cfg)  # everything is validated before anything is written: a failing run leaves no trace
        self.resume()  # a checkpoint that does not load fails before the run folder's files are touched
        lock = RunLock(self.run_dir)  # one job per run folder; released when the process ends, however it ends
        lock.acquire()
        try:
            return self.run_locked()
        finally:
            lock.release()

    def run_locked(self) -> dict:
        cfg = self.cfg
        explicit = cfg.train.resume not in ("auto", "never", "", None)
        self.checkpoints.prepare(*(self.resumed or (None, None)), explicit=explicit)
        if dist.is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            C.save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=1))
        self.log.start(total=cfg.train.max_steps, initial=self.step)
        self.log.truncate(self.step)  # rows a killed attempt logged past the checkpoint would come twice
        validator = Validator(self)  # held-out validation every train.eval_every steps (read on first use)
        it = iter(self.batches())
        last = None
        end = min(cfg.train.max_steps, cfg.train.stop_at or cfg.train.max_steps)
        save_pending = False
        while self.step < end:
            applied = self.train_step(it)
            if applied and self.unverified is not None:  # its weights just gave a finite loss and gradient norm
                ckpt.mark_good(self.unverified)
                self.unverified = None
            lrs = {g["ett_name"].split("/")[0]: g["lr"] for g in self.engine.optimizer.param_groups}
            row = self.log.step(self.step, lrs, extra={"skipped_steps": self.bad_total})
            if row is not None:
                last = row
            if self.bad_in_row >= cfg.train.max_bad_steps:
                good = ckpt.newest_good(self.ckpt_root)
                raise TrainingDiverged(
                    f"{self.bad_in_row} steps in a row (to step {self.step}) had a non-finite loss or gradient norm "
                    f"and were skipped (train.max_bad_steps={cfg.train.max_bad_steps}); newest checkpoint known to "
                    f"be good: {good or 'none'}; see {self.log.path}")
            if cfg.train.image_every and self.step % cfg.train.image_every == 0:
                self.write_images()
            if validator.due(self.step):
                validator.run(self.step)
            if self.step % cfg.train.save_every == 0 or self.step == end or save_pending:
                save_pending = not applied  # weights after a skipped step gave a non-finite loss: save later
                if applied:
                    self.save()
                    it = iter(self.batches())
                else:
                    self.log.info(f"step {self.step} was skipped (non-finite); its checkpoint waits for a finite step")
            if self.step < end and preempt.agreed(self.device):  # a rank caught SIGUSR1/SIGTERM: all stop here
                if self.saved_step != self.step:
                    self.save()
                self.preempted = preempt.received() or "signal (on another rank)"
                self.log.info(f"{self.preempted}: stopped at step {self.step} with a complete checkpoint; exit "
                              f"{preempt.REQUEUE_EXIT} (requeue)")
                break
        if self.ema is not None and not self.preempted:  # the raw vs the EMA weights, which are handed on
            report_ema(self)
        self.log.close()
        return last or {}


def finite_gate(*losses: torch.Tensor | None) -> torch.Tensor:
    """1.0 when every given loss is finite, NaN otherwise; a device tensor (no host synchronisation)."""
    gate = None
    for loss in losses:
        if loss is not None:
            g = loss.detach().float() * 0 + 1  # inf * 0 and nan * 0 are nan
            gate = g if gate is None else gate * g
    return gate
