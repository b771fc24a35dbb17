"""What a checkpoint folder holds: the file names, the completion and good markers, the errors.

A training step folder ``RUN/checkpoints/step_00000100/`` is written as ``.tmp-step_00000100-PID`` and renamed
into place once every file in it is on disk (:mod:`.manager`); it holds DeepSpeed's sharded engine state,
``extra_rank{r}.pt`` per rank, ``trainer_state.json`` and ``config.yaml`` (rank 0), ``tokenizer_ema.safetensors``
after a tokenizer stage, and the :data:`MARKER` file written last: only folders with it count. :data:`GOOD` is
added once a later step with a finite loss and gradient norm ran from its weights. An export folder holds
:data:`EXPORT_CONFIG` and one safetensors file per part.
"""
from __future__ import annotations

from pathlib import Path

from ..commandline import UserError
from ..engine import dist

MARKER = "complete"  # written last into a step folder: the folder is complete
GOOD = "good"  # written into a checkpoint once a later step with finite loss and gradient norm ran from its weights
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "config.yaml"
TOKENIZER_EMA = "tokenizer_ema.safetensors"
EXPORT_CONFIG = "ett_config.yaml"
TMP_PREFIX = ".tmp-"  # a step folder being written: RUN/checkpoints/.tmp-step_XXXXXXXX-PID, renamed when complete
ABANDONED = "abandoned"  # RUN/checkpoints/abandoned/: folders moved aside (a rollback's abandoned branch)
LATEST = "latest"  # DeepSpeed's pointer file in RUN/checkpoints: the tag of the newest complete folder
RUN_LOCK = "run.lock"  # RUN/run.lock: flock-ed by rank 0 of the job that trains into the run folder
# Parts besides the LLM and the vision tokenizer, one safetensors file each in an export.
EXTRA_PARTS = ("projector", "visual_head", "index_embed")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or is not the kind the caller expects."""


class ResumeError(UserError, RuntimeError):
    """A training run that cannot continue from the checkpoint it was given."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def extra_file(folder: Path, rank: int) -> Path:
    """A rank's extras (discriminator, EMA shard, RNG states) in a step folder."""
    return folder / f"extra_rank{rank}.pt"


def step_of(folder: Path) -> int | None:
    """The step number in a ``step_XXXXXXXX`` folder name (None for other names)."""
    name = folder.name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if is_complete(p))


def latest(ckpt_root: Path) -> Path | None:
    dirs = step_dirs(ckpt_root)
    return dirs[-1] if dirs else None


def step_folder(path: Path) -> Path | None:
    """The complete step folder ``path`` names: itself, or a run folder's (or checkpoints folder's) newest one."""
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        step = latest(root)
        if step is not None:
            return step
    return None


def newest_good(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint known to be good (marked by :func:`mark_good`)."""
    good = [d for d in step_dirs(ckpt_root) if (d / GOOD).is_file()]
    return good[-1] if good else None


def mark_good(folder: Path) -> None:
    """Rank 0 records that a step with a finite loss and gradient norm ran from ``folder``'s weights."""
    if dist.is_rank0() and is_complete(folder):
        (folder / GOOD).write_text("ok\n")


def to_prune(dirs: list[Path], keep_last: int) -> list[Path]:
    """Which of the complete checkpoints ``dirs`` (oldest first) to delete: all but the newest ``keep_last`` and
    the newest one known to be good (a diverged run never deletes its last good weights)."""
    if keep_last <= 0:
        return []
    keep = set(dirs[-keep_last:])
    good = [d for d in dirs if (d / GOOD).is_file()]
    if good:
        keep.add(good[-1])
    return [d for d in dirs if d not in keep]
