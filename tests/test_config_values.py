"""Values outside what a config field declares (its annotation: `> 0`, `in [0, 1]`, `one of ...`, finite) are
refused in one line naming the key, exit 2, nothing written: in-process, by `python -m ett_ds.train` and by
`launchers/train.sh --dry-run` (issue 21, item 9)."""
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ett_ds.config import Config, ConfigError, load_config
from ett_ds.typed_tree import Len, OneOf, Range, hints

REPO = Path(__file__).resolve().parents[1]

# the values the issue found accepted (or crashing with a traceback after the run folder was written)
NONSENSE = ["loss.alpha=-1", "optim.lr=-1", "optim.lr=nan", "train.save_every=0", "model.tokenizer.codebook_size=0",
            "data.max_error_rate=2", "train.keep_last=-1"]


def leaves(cls, prefix=""):
    """(dotted key, annotation) of every leaf field of the tree."""
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, type(int | None)):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def bad_values(tp):
    """Override texts just outside what the annotation ``tp`` allows."""
    tp = strip_optional(tp)
    if typing.get_origin(tp) is not typing.Annotated:
        if tp is float:
            return ["nan", "inf"]
        if typing.get_origin(tp) is list and strip_optional(typing.get_args(tp)[0]) is not str:
            return [f"[{v}]" for v in bad_values(typing.get_args(tp)[0])]
        return []
    inner, *checks = typing.get_args(tp)
    out = [] if inner is not float else ["nan", "-.inf"]
    for c in checks:
        if isinstance(c, OneOf):
            out.append("bogus")
        elif isinstance(c, Len):
            out.append("[]" if c.lo > 0 else None)
            if c.hi is not None:
                item = "16" if typing.get_args(typing.get_args(inner)[0])[0] is int else "0.5"  # valid items
                out.append("[" + ", ".join([item] * (c.hi + 1)) + "]")
        elif isinstance(c, Range):
            lo = c.gt if c.gt is not None else c.ge
            hi = c.lt if c.lt is not None else c.le
            if lo is not None:
                out.append(str(lo) if c.gt is not None else str(lo - 1))
            if hi is not None:
                out.append(str(hi) if c.lt is not None else str(hi + 1))
    if typing.get_origin(inner) is list:
        out += [f"[{v}]" for v in bad_values(typing.get_args(inner)[0])]
    return [v for v in out if v is not None]


SWEEP = [(key, v) for key, tp in leaves(Config) for v in bad_values(tp)]


def test_every_numeric_field_declares_its_values():
    """Each number in the tree is bounded by its annotation (a plain float still must be finite)."""
    unbounded = [key for key, tp in leaves(Config)
                 if strip_optional(tp) in (int, float) or strip_optional(tp) in (list[int], list[float])]
    assert unbounded == []
    assert len(SWEEP) > 100


@pytest.mark.parametrize("key,value", SWEEP, ids=[f"{k}={v}" for k, v in SWEEP])
def test_sweep_a_value_outside_the_declared_range_is_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg, msg


def test_defaults_and_builtin_recipes_satisfy_their_declarations():
    from ett_ds.config import build, to_dict
    build(Config, to_dict(Config()))  # every default passes its own field's check
    for recipe in sorted((REPO / "ett_ds" / "recipes").glob("*.yaml")):
        needs = (yaml.safe_load(recipe.read_text()) or {}).get("needs") or {}  # keys the user must set (own)
        load_config(recipe, [f"{k}=set" for k in needs])


def test_boundaries_that_mean_something_are_accepted():
    cfg = load_config("tiny", ["train.keep_last=0", "optim.grad_clip=0", "train.ema_decay=0", "data.max_error_rate=1",
                               "optim.projector_lr=null", "loss.alpha=0", "data.num_workers=0"])
    assert cfg.train.keep_last == 0 and cfg.optim.projector_lr is None and cfg.data.max_error_rate == 1.0


@pytest.mark.parametrize("override", NONSENSE)
def test_nonsense_values_in_process(override):
    with pytest.raises(ConfigError, match="^" + override.split("=")[0].replace(".", r"\.") + ": "):
        load_config("tiny", [override])


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_"))}
    env.update(ETT_NO_SETUP="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin")
    return env


@pytest.mark.parametrize("override", NONSENSE)
def test_nonsense_values_refused_by_train_sh_dry_run(override, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launchers" / "train.sh"), "tiny", override, f"out_dir={tmp_path}/runs",
                           "--dry-run"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(f"train.sh: error: {override.split('=')[0]}: "), proc.stderr
    assert "+ deepspeed" not in proc.stdout and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_nonsense_values_refused_by_the_trainer_before_writing(tmp_path):
    """`python -m ett_ds.train` (every rank runs it): one line, exit 2, no run folder; all the values in one run
    each (about 4 s per start)."""
    for override in NONSENSE:
        proc = subprocess.run([sys.executable, "-m", "ett_ds.train", "--config", "tiny", override,
                               f"out_dir={tmp_path}/runs"], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {override.split('=')[0]}: "), proc.stderr
        assert list(tmp_path.iterdir()) == [], override
