"""Checkpoints: everything ett_ds reads and writes to keep or hand on a model.

- :mod:`.layout`: what a step or export folder holds (file names, the ``complete`` and ``good`` markers, which
  folders count, which to prune) and the errors shared by every reader: :class:`CheckpointError` (a checkpoint that
  cannot be read, or not the kind asked for) and :class:`ResumeError` (a run that cannot continue from it).
- :mod:`.safe`: reading without trusting (``torch.load(weights_only=True)`` with an allow-list, DeepSpeed's readers
  routed through it) and safetensors files.
- :mod:`.manager`: the Trainer's parts registered once, saved and resumed in one call each; a save writes aside and
  renames into place; reading a step folder back (:func:`.manager.load`, :mod:`.reshard` when the number of
  data-parallel ranks changed); the run folder's lock.
- :mod:`.training`: what a training run adds on top of the manager (RNG states, which checkpoint to resume,
  optimizer settings a resume takes from the config); the Trainer registers its own parts.

Turning a checkpoint into a model is the model's business: ``models/weights.py`` (consolidated fp32 weights,
``train.init_from``, the tokenizer's safetensors) and ``models/loading.py`` (a step, run or export folder as a plain
module for inference and export), both on top of this package.

The names most callers need are importable from the package itself (``from ett_ds import checkpoint as ckpt``;
``ckpt.latest``, ``ckpt.load``, ``ckpt.CheckpointError``).
"""
from .layout import (
                     ABANDONED,
                     EXPORT_CONFIG,
                     EXTRA_PARTS,
                     GOOD,
                     LATEST,
                     MARKER,
                     RUN_CONFIG,
                     RUN_LOCK,
                     TOKENIZER_EMA,
                     TRAINER_STATE,
                     CheckpointError,
                     ResumeError,
                     is_complete,
                     latest,
                     mark_good,
                     newest_good,
                     step_dirs,
                     step_of,
                     to_prune,
)
from .manager import check_world_size, load, read_trainer_state
from .safe import read_safetensors, safe_load, save_safetensors
from .training import rng_state, set_rng_state

__all__ = ["ABANDONED", "EXPORT_CONFIG", "EXTRA_PARTS", "GOOD", "LATEST", "MARKER", "RUN_CONFIG", "RUN_LOCK",
           "TOKENIZER_EMA", "TRAINER_STATE", "CheckpointError", "ResumeError", "is_complete", "latest", "mark_good",
           "newest_good", "step_dirs", "step_of", "to_prune", "read_safetensors", "safe_load", "save_safetensors",
           "check_world_size", "load", "read_trainer_state", "rng_state", "save", "set_rng_state"]
