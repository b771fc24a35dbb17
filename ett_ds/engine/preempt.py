"""Preemption and time limits: a signal becomes one agreed checkpoint and a requeue exit code.

SLURM warns a job before its time limit with the signal ``--signal=USR1@120`` asks for, and preempts it with SIGTERM
(SIGKILL follows after ``KillWait`` / ``GraceTime``). Both reach every process of a job step: the ``deepspeed``
launchers as well as the training processes. DeepSpeed's ``launch.py`` answers SIGTERM by terminating its workers,
and SIGUSR1's default action ends a process, so:

* ``python -m ett_ds.engine.preempt CMD ...`` (what ``launchers/train.sh`` puts in front of ``deepspeed``) execs CMD
  with SIGUSR1 and SIGTERM **blocked**. A blocked signal stays pending and no Python handler runs, and the mask is
  inherited through fork and exec, so DeepSpeed's runner and per-node launchers never act on them.
* Each training process calls :func:`install` first thing: it unblocks both signals and records their arrival.
* At every step boundary the trainer calls :func:`agreed` (one all-reduce of a flag): when any rank got a signal,
  every rank stops after the same step, one complete checkpoint is written, and the process exits with
  :data:`REQUEUE_EXIT`, which the launchers pass up and ``launchers/slurm.sbatch`` turns into ``scontrol requeue``.

This module imports only the standard library at the top: the guard runs with any ``python3``.
"""
from __future__ import annotations

import os
import signal
import sys

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: int | None = None


def _handler(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum
        os.write(2, f"[ett_ds] received {signal.Signals(signum).name}: checkpoint at the next step boundary, then "
                    f"exit {REQUEUE_EXIT}\n".encode())


def install() -> None:
    """Catch SIGUSR1 and SIGTERM in this process (and the data loader workers it forks) and unblock them."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def received() -> str | None:
    """The name of the first signal this process caught, or None."""
    return signal.Signals(_received).name if _received is not None else None


def agreed(device="cpu") -> bool:
    """Collective (every rank, at the same step): True on all ranks when any rank caught a signal."""
    import torch

    from . import dist
    flag = torch.tensor([0.0 if _received is None else 1.0], device=device)
    return bool(dist.all_reduce_sum(flag).item() > 0)


def exec_guarded(argv: list[str]) -> None:
    """Exec ``argv`` with SIGUSR1 and SIGTERM blocked (see the module docstring); does not return."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m ett_ds.engine.preempt CMD [ARGS ...]", file=sys.stderr)
        sys.exit(2)
    exec_guarded(args)
