"""Process-group setup for every way ett_ds is started, and small collectives that also work in one process.

Launchers and the variables they leave behind:

* ``deepspeed`` / ``torchrun``: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are set; nothing to do.
* ``srun`` with one task per GPU (``srun --ntasks-per-node=8 python -m ett_ds.train ...``): only SLURM_* variables
  exist, and DeepSpeed never reads them (it would fall back to MPI discovery). :func:`map_slurm_env` translates them
  to torch's names, the way open_clip's ``world_info_from_env`` does.
* a plain ``python -m ett_ds.train``: nothing is set; :func:`init_distributed` makes it rank 0 of 1.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Any, Mapping

import torch
import torch.distributed as dist

from .zero3 import deepspeed_module

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_PORT = 29500

# srun sets the SLURM_STEP_* variables for the tasks of a step; the SLURM_* job variables describe the whole
# allocation, which a step may not fill. Prefer the step's view when it exists.
_WORLD_KEYS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
_NODELIST_KEYS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


# ---------------------------------------------------------------------------------------------------------------
# SLURM strings
# ---------------------------------------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``"a[1,2],b"`` -> ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str) -> list[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]``; a range keeps the zero padding of its first bound."""
    out = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ValueError(f"bad range {item!r} in node list")
        lo, hi = match.group(1), match.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a compact SLURM host list, e.g. ``"gpu[01-02,07],cpu5"`` -> ``["gpu01", "gpu02", "gpu07", "cpu5"]``.

    Several bracket groups in one name expand as a product (``"r[1-2]n[1-2]"`` -> r1n1, r1n2, r2n1, r2n2), as
    ``scontrol show hostnames`` does. Raises ValueError on anything it does not understand.
    """
    if not nodelist or not nodelist.strip():
        raise ValueError("empty node list")
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        if not part:
            raise ValueError(f"empty host name in node list {nodelist!r}")
        names = [""]
        for match in re.finditer(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            text, body = match.group(1), match.group(2)
            suffixes = [""] if body is None else _expand_range_set(body)
            names = [n + text + suffix for n in names for suffix in suffixes]
        hosts.extend(names)
    return hosts


def _scontrol_hostnames(nodelist: str, scontrol: str) -> list[str]:
    out = subprocess.run([scontrol, "show", "hostnames", nodelist], check=True, capture_output=True, text=True,
                         timeout=30).stdout
    hosts = out.split()
    if not hosts:
        raise ValueError(f"'{scontrol} show hostnames {nodelist}' printed nothing")
    return hosts


def first_host(nodelist: str, scontrol: str = "scontrol") -> str:
    """The first host of a SLURM node list: parsed in Python, ``scontrol show hostnames`` only if that fails."""
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError:
        return _scontrol_hostnames(nodelist, scontrol)[0]


def parse_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` -> one count per node: ``"4(x2),1"`` -> ``[4, 4, 1]``, ``"8"`` -> ``[8]``."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def port_from_job_id(job_id: str | None) -> int:
    """A port every task of a job derives alike (launchers/train.sh uses the same formula): 20000-39999."""
    if job_id and job_id.strip().isdigit():
        return 20000 + int(job_id) % 20000
    return DEFAULT_PORT


# ---------------------------------------------------------------------------------------------------------------
# environment mapping
# ---------------------------------------------------------------------------------------------------------------
def _first(env: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if env.get(key):
            return env[key]
    return None


def _local_world_size(env: Mapping[str, str]) -> str | None:
    node = int(env.get("SLURM_NODEID", "0") or 0)
    if env.get("SLURM_STEP_TASKS_PER_NODE"):
        counts = parse_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
        return str(counts[min(node, len(counts) - 1)])
    if env.get("SLURM_NTASKS_PER_NODE"):
        return env["SLURM_NTASKS_PER_NODE"]
    if env.get("SLURM_TASKS_PER_NODE"):
        counts = parse_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        return str(counts[min(node, len(counts) - 1)])
    return None


def map_slurm_env(environ: Mapping[str, str] | None = None, *, scontrol: str = "scontrol") -> dict[str, str]:
    """The torch.distributed variables that SLURM's describe, for processes started by ``srun`` directly.

    Returns {} when a torch/DeepSpeed launcher already set RANK, WORLD_SIZE or LOCAL_RANK, or when this is not a
    SLURM task (no SLURM_PROCID). Never returns a variable that is already set in ``environ``.
    """
    env = os.environ if environ is None else environ
    if any(key in env for key in TORCH_VARS) or "SLURM_PROCID" not in env:
        return {}
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": _first(env, _WORLD_KEYS) or "1",
        "MASTER_PORT": str(port_from_job_id(env.get("SLURM_JOB_ID"))),
    }
    local_world = _local_world_size(env)
    if local_world:
        mapped["LOCAL_WORLD_SIZE"] = local_world
    nodelist = _first(env, _NODELIST_KEYS)
    if nodelist and "MASTER_ADDR" not in env:
        mapped["MASTER_ADDR"] = first_host(nodelist, scontrol)
    return {key: value for key, value in mapped.items() if key not in env}


def apply_slurm_env(*, scontrol: str = "scontrol") -> dict[str, str]:
    """Set :func:`map_slurm_env`'s variables in ``os.environ``; returns what it set."""
    mapped = map_slurm_env(os.environ, scontrol=scontrol)
    os.environ.update(mapped)
    return mapped


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the environment, SLURM's variables included; (0, 0, 1) when unset."""
    env = {**os.environ, **map_slurm_env()}
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


# ---------------------------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _set_single_process_defaults() -> None:
    """A run with no launcher at all becomes rank 0 of 1 instead of DeepSpeed's MPI discovery."""
    if any(key in os.environ for key in ("RANK", "WORLD_SIZE")):
        return
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(backend: str | None = None) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) through DeepSpeed. Safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        return
    apply_slurm_env()
    _set_single_process_defaults()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = deepspeed_module()  # after DS_ACCELERATOR is set: deepspeed picks its accelerator on import
    if not cuda:
        # Otherwise DeepSpeed JIT-compiles its shared-memory all-reduce (25-45 s) on the first init; it only
        # serves inference, which ett_ds does not run through the engine.
        deepspeed_module("ops").__compatible_ops__["deepspeed_shm_comm"] = False
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if cuda else "gloo"))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank: from the process group once initialised, else from the environment (0 in one process)."""
    return dist.get_rank() if _initialized() else world_info()[0]


def world_size() -> int:
    """Number of processes: from the process group once initialised, else from the environment (1 by default)."""
    return dist.get_world_size() if _initialized() else world_info()[2]


def is_rank0() -> bool:
    """True on global rank 0, and in a single process."""
    return rank() == 0


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it (unchanged in a single process)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device="cpu") -> bool:
    """Collective: True on every rank when ``flag`` is True on any rank (``flag`` itself in a single process)."""
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group cleanly (all ranks together); a no-op without one. Exiting without it can abort a
    rank whose communication threads are still up when its peer has already gone."""
    if _initialized():
        dist.barrier()
        dist.destroy_process_group()
