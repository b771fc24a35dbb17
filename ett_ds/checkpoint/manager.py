"""The checkpoint manager: a training run's state saved and resumed in one call each.

The Trainer registers its parts once (:meth:`CheckpointManager.register`): every part has ``state_dict`` and
``load_state_dict`` (or is wrapped in an :class:`Adapter`). Where a part's state goes:

* the engine (weights, ZeRO optimizer and schedule) is DeepSpeed's sharded files (every rank writes its shard);
* ``per_rank`` parts (discriminator ``gan``, EMA shard ``ema``, RNG states ``rng``) go into ``extra_rank{r}.pt`` under
  their key, one file per rank;
* ``run`` parts (counters, data position) are merged into rank 0's ``trainer_state.json``;
* files (the tokenizer's EMA weights) are written by a collective writer.

A save never writes into a step folder that exists: everything goes into ``RUN/checkpoints/.tmp-step_X-PID``, every
file is fsync-ed, the ``complete`` marker is written last, and rank 0 renames the folder into place (an existing
folder of that name, from an abandoned branch, is moved to ``checkpoints/abandoned/`` first). A kill at any point
leaves either the previous folders as they were or a complete new one; leftover ``.tmp-`` folders are removed at the
next start (:meth:`CheckpointManager.prepare`). A full disk (or quota) during a save is one line naming the folder
(:class:`.layout.CheckpointError`); nothing of the failed save stays.

A resume from an explicit older step moves every newer step folder of the run to ``checkpoints/abandoned/`` (one
log line), so ``resume=auto`` never returns to the abandoned branch. :class:`RunLock` keeps a second job out of a run
folder while the first one trains in it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine import dist
from . import reshard
from .layout import (
    ABANDONED,
    LATEST,
    MARKER,
    RUN_CONFIG,
    RUN_LOCK,
    TMP_PREFIX,
    TRAINER_STATE,
    CheckpointError,
    ResumeError,
    extra_file,
    is_complete,
    latest,
    step_dirs,
    step_of,
    step_tag,
    to_prune,
)
from .safe import make_loads_safe, safe_load

# below this many free bytes a failed write is taken for a full disk (torch's C++ writer reports ENOSPC only as
# "basic_ios::clear: iostream error" / "PytorchStreamWriter failed writing file")
FULL_DISK_BYTES = 64 << 20


class Adapter:
    """A part given by two functions: ``save() -> state`` and ``load(state)``. ``reads_all``: ``load`` gets the
    rank's whole extras dict (the EMA after a world-size change reads every old rank's shards from it)."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], None], reads_all: bool = False):
        self._save, self._load, self.reads_all = save, load, reads_all

    def state_dict(self):
        return self._save()

    def load_state_dict(self, state) -> None:
        self._load(state)


# -- writing durably -----------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    write_durably(tmp, text)
    os.replace(tmp, path)


def write_error(e: BaseException, where: Path) -> str | None:
    """One line for a write that failed for lack of space (or quota); None for any other failure."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        return f"no space left on device: {where}"
    if code == errno.EDQUOT:
        return f"disk quota exceeded: {where}"
    if isinstance(e, RuntimeError):  # torch.save's C++ writer: no errno, look at the disk
        try:
            free = shutil.disk_usage(where if where.exists() else where.parent).free
        except OSError:
            return None
        if free < FULL_DISK_BYTES:
            return f"no space left on device: {where}"
    return None


def agree(message: str | None) -> str | None:
    """Collective: the first rank's error message (None when no rank failed), on every rank."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized() or dist.world_size() == 1:
        return message
    box = [None] * dist.world_size()
    torch.distributed.all_gather_object(box, message)
    return next((m for m in box if m), None)


def move_aside(folder: Path, ckpt_root: Path) -> Path:
    """Rank 0: ``folder`` -> ``ckpt_root/abandoned/NAME-UTCTIME`` (a rename: nothing is copied or deleted)."""
    dest_root = ckpt_root / ABANDONED
    dest_root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = dest_root / f"{folder.name}-{stamp}", 1
    while dest.exists():
        n += 1
        dest = dest_root / f"{folder.name}-{stamp}-{n}"
    os.rename(folder, dest)
    return dest


# -- the manager ---------------------------------------------------------------------------------------------------
class CheckpointManager:
    def __init__(self, engine, ckpt_root: Path, keep_last: int, log: Callable[[str], None] = print):
        self.engine, self.ckpt_root, self.keep_last, self.log = engine, Path(ckpt_root), keep_last, log
        self.per_rank: dict[str, Any] = {}
        self.run_parts: list[Any] = []
        self.files: dict[str, Callable[[Path], None]] = {}

    # registration
    def register(self, key: str, part, per_rank: bool = True) -> None:
        """``per_rank``: the part's state goes into ``extra_rank{r}.pt`` under ``key``; otherwise its state (a
        JSON-ready dict) is merged into ``trainer_state.json``."""
        if per_rank:
            self.per_rank[key] = part
        else:
            self.run_parts.append(part)

    def register_file(self, name: str, writer: Callable[[Path], None]) -> None:
        """``writer(path)`` (collective) writes a file into the step folder before its marker."""
        self.files[name] = writer

    # saving
    def save(self, step: int, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the step folder."""
        root, tag = self.ckpt_root, step_tag(step)
        final = root / tag
        tmp = root / dist.broadcast_object(f"{TMP_PREFIX}{tag}-{os.getpid()}")
        if dist.is_rank0():
            root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        try:
            self._write(tmp, final, step, config_yaml)
        except BaseException:
            if dist.is_rank0():
                shutil.rmtree(tmp, ignore_errors=True)
            raise

        def publish():  # rank 0, after every rank's files and the marker are on disk
            if dist.is_rank0():
                if final.exists():  # a folder of an abandoned branch (or an incomplete one): never written into
                    moved = move_aside(final, root)
                    self.log(f"{final.name} already existed (another branch of this run): moved to {moved}")
                os.rename(tmp, final)
                fsync_path(root)
                write_atomically(root / LATEST, tag)
                for old in to_prune(step_dirs(root), self.keep_last):
                    shutil.rmtree(old, ignore_errors=True)
        self._guarded(final, publish)
        return final

    def _guarded(self, where: Path, fn: Callable[[], None]) -> None:
        """Run ``fn`` on every rank; a failure on any rank fails every rank (a full disk as one line)."""
        msg, error = None, None
        try:
            fn()
        except (OSError, RuntimeError) as e:
            error = e
            msg = write_error(e, where) or f"writing checkpoint {where} failed: {type(e).__name__}: " \
                                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        msg = agree(msg)
        if msg is not None:
            before = latest(self.ckpt_root)
            raise CheckpointError(f"{msg} (checkpoint not written; newest complete checkpoint: "
                                  f"{before or 'none'})") from error

    def _write(self, tmp: Path, final: Path, step: int, config_yaml: str) -> None:
        engine, rank = self.engine, dist.rank()

        def shards():
            try:
                engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state={"ett_step": step},
                                       save_latest=False)
            except (OSError, RuntimeError):
                dist.barrier()  # DeepSpeed's closing barrier, which a rank whose write failed skipped
                raise
            torch.save({k: p.state_dict() for k, p in self.per_rank.items()}, extra_file(tmp, rank))
        self._guarded(final, shards)
        for name, writer in self.files.items():
            self._guarded(final, lambda: writer(tmp / name))

        def rank0_files():
            if dist.is_rank0():
                state = {}
                for part in self.run_parts:
                    state.update(part.state_dict())
                state.update({"step": step, "world_size": dist.world_size(), "global_batch": engine.train_batch_size(),
                              "micro_batch": engine.train_micro_batch_size_per_gpu(),
                              "accumulation": engine.gradient_accumulation_steps(),
                              "param_groups": reshard.param_groups_state(engine)})
                write_durably(tmp / TRAINER_STATE, json.dumps(state, indent=1))
                write_durably(tmp / RUN_CONFIG, config_yaml)
            fsync_tree(tmp)  # every rank flushes (what it wrote is in there)
        self._guarded(final, rank0_files)
        dist.barrier()

        def marker():  # last, once every rank's files are on disk
            if dist.is_rank0():
                write_durably(tmp / MARKER, "ok\n")
                fsync_path(tmp)
        self._guarded(final, marker)

    # resuming
    def load(self, folder: Path) -> dict:
        """Collective: restore the engine and every registered part from ``folder``; returns its trainer state."""
        check_architecture(self.engine.module, folder)
        state, extra = load(self.engine, folder)
        for key, part in self.per_rank.items():
            part.load_state_dict(extra if getattr(part, "reads_all", False) else extra[key])
        for part in self.run_parts:
            part.load_state_dict(state)
        return state

    def prepare(self, resumed: Path | None, resumed_step: int | None, explicit: bool) -> None:
        """Collective, at the start of a run holding its lock. Rank 0 removes what killed saves left (``.tmp-``
        folders); after a resume from an explicit checkpoint it moves every newer step folder of this run to
        ``abandoned/``, so that ``resume=auto`` never returns to that branch."""
        self._prepare(resumed, resumed_step, explicit)
        dist.barrier()

    def _prepare(self, resumed: Path | None, resumed_step: int | None, explicit: bool) -> None:
        root = self.ckpt_root
        if not dist.is_rank0() or not root.is_dir():
            return
        for left in root.glob(f"{TMP_PREFIX}*"):
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
        if explicit and resumed_step is not None:
            newer = sorted(d for d in root.glob("step_*") if d.is_dir() and (step_of(d) or 0) > resumed_step
                           and (resumed is None or d.resolve() != resumed.resolve()))
            if newer:
                moved = [move_aside(d, root) for d in newer]
                self.log(f"train.resume={resumed}: moved {len(moved)} newer checkpoint folder(s) of the abandoned "
                         f"branch ({newer[0].name}..{newer[-1].name}) to {moved[0].parent}; resume=auto continues "
                         "from here")
        newest = latest(root)  # DeepSpeed's pointer names the newest complete folder (a kill may have left it stale)
        pointer = root / LATEST
        if newest is not None and (not pointer.is_file() or pointer.read_text().strip() != newest.name):
            write_atomically(pointer, newest.name)


def model_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}


def check_architecture(module: torch.nn.Module, folder: Path) -> None:
    """A ResumeError naming the first tensor whose shape differs between ``folder``'s ZeRO checkpoint and the model
    (or that only one of them has): a changed hidden size, codebook size or layer count."""
    files = sorted(Path(folder).glob("*model_states.pt"))
    if not files:
        return
    sd = safe_load(files[0])
    saved: dict[str, tuple] = {}
    for group in sd.get("param_shapes") or []:
        saved.update({k: tuple(v) for k, v in group.items()})
    saved.update({k: tuple(v) for k, v in (sd.get("frozen_param_shapes") or {}).items()})
    if not saved:
        return
    own = model_shapes(module)
    for name, shape in saved.items():
        if name not in own:
            raise ResumeError(f"{folder}: the checkpoint's {name} {list(shape)} is not in the model (the "
                              "architecture changed; a resume needs the same model)")
        if own[name] != shape:
            raise ResumeError(f"{folder}: {name} has shape {list(shape)} in the checkpoint, {list(own[name])} in the "
                              "model (the architecture changed; a resume needs the same model)")
    for name in own:
        if name not in saved:
            raise ResumeError(f"{folder}: the model's {name} {list(own[name])} is not in the checkpoint (the "
                              "architecture changed; a resume needs the same model)")


# -- reading a step folder back (the inverse of CheckpointManager._write) ------------------------------------
def read_trainer_state(folder: Path) -> dict:
    f = folder / TRAINER_STATE
    if not is_complete(folder) or not f.is_file():
        raise ResumeError(f"{folder} is not a complete ett_ds checkpoint (no '{MARKER}' marker)")
    return json.loads(f.read_text())


def check_world_size(folder: Path, state: dict) -> bool:
    """Whether ``folder`` was written by another number of data-parallel ranks than this job has (it is then
    re-split on load). Raises ResumeError when the folder does not hold the shards its trainer_state names."""
    old = int(state.get("world_size", dist.world_size()))
    found = reshard.shard_count(folder)
    if found and found != old:
        raise ResumeError(f"{folder}: {TRAINER_STATE} names {old} data-parallel ranks but the folder holds ZeRO "
                          f"shards of {found}")
    return old != dist.world_size()


def load(engine, folder: Path, load_optimizer: bool = True) -> tuple[dict, dict]:
    """Collective. Restores the engine (and optimizer/scheduler); returns (trainer_state, this rank's extra)."""
    state = read_trainer_state(folder)
    other_world = check_world_size(folder, state)
    make_loads_safe(engine)
    if other_world:
        path = reshard.load_universal(engine, folder, state, load_optimizer)
    else:
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load {folder}")
    if other_world:
        extra = reshard.merged_extras(folder, int(state["world_size"]))
    else:
        extra = safe_load(extra_file(folder, dist.rank()))
    return state, extra


# -- one job per run folder ----------------------------------------------------------------------------------------
class RunLock:
    """Rank 0 holds an exclusive ``flock`` on ``RUN/run.lock`` while the run trains; a second job on the same run
    folder is refused in one line. The kernel drops the lock when the process ends, however it ends (a crash, kill
    -9, a requeued SLURM job starting afresh), so no stale lock needs clearing."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RUN_LOCK
        self.fd = None

    def acquire(self) -> None:
        """Collective: every rank raises the same one-line ResumeError when another job holds the folder."""
        msg = None
        if dist.is_rank0():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                msg = (f"run folder {self.path.parent} is in use by another job ({holder}): two jobs cannot share "
                       "a run folder; wait for it to end or choose another name= / out_dir=")
            else:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n".encode(), 0)
        msg = dist.broadcast_object(msg)
        if msg:
            raise ResumeError(msg)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
