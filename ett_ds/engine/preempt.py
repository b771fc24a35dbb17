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
* DataLoader workers leave both signals to their training process (:func:`worker_init`, from the loader's
  ``worker_init_fn``): SLURM signals every process of the step, and a worker's default answer (torch's handler
  re-raises a SIGTERM that its parent did not send) kills it, which makes the training process raise
  ``DataLoader worker ... is killed by signal`` instead of checkpointing. The training process then shuts its
  workers down as it exits; a SIGTERM from it (the loader's own ``terminate()``) still ends a worker.

This module imports only the standard library at the top: the guard runs with any ``python3``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

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


def active() -> bool:
    """True when :func:`install` runs this process's SIGTERM handling (its data loader workers then leave the
    signals to it)."""
    return signal.getsignal(signal.SIGTERM) is _handler


@contextlib.contextmanager
def deferred():
    """Block SIGUSR1 and SIGTERM while starting data loader workers: a worker forked in between inherits the
    block, so a signal that arrives before its :func:`worker_init` stays pending instead of killing it; here the
    signal is delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_init(main_pid: int) -> None:
    """In a DataLoader worker of training process ``main_pid``: SIGUSR1 is ignored, and SIGTERM ends the worker
    only when ``main_pid`` sent it (the loader's shutdown) or the training process is gone; any other SIGTERM
    (SLURM's, sent to the whole step or process group) is left to the training process, which stops at the
    next step boundary and shuts the workers down itself."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the block
    forked = os.getppid() == main_pid  # else a spawn/forkserver worker, whose parent is not the training process
    threading.Thread(target=_worker_sigterm, args=(main_pid, forked), name="ett_ds-sigterm", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})  # ignored now, and pending ones are discarded


def _worker_sigterm(main_pid: int, forked: bool) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == main_pid or _gone(main_pid, forked):
            os._exit(0)  # what torch's own handler does for its parent's SIGTERM


def _gone(pid: int, forked: bool) -> bool:
    if forked:
        return os.getppid() != pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def received() -> str | None:
    """The name of the first signal this process caught, or None."""
    return signal.Signals(_received).name if _received is not None else None


def agreed(device="cpu") -> bool:
    """Collective (every rank, at the same step): True on all ranks when any rank caught a signal."""
    from . import dist  # reason: dist imports torch; the exec guard (python -m ett_ds.engine.preempt) runs stdlib-only
    return dist.any_rank(_received is not None, device)


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
