"""Process-group helpers for the signal tests: start a command in its own session, signal the whole group the way
SLURM does once the run is ready, and list what is left of the group after it exited."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def group_members(pgid: int) -> list[str]:
    """'pid state cmdline' of every process whose process group is ``pgid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:150]
                found.append(f"{d.name} {fields[0]} {cmd}")
        except (OSError, ValueError, IndexError):
            continue
    return found


def left_in_group(pgid: int, grace: float = 2.0) -> list[str]:
    """Members of the group still there ``grace`` seconds after its leader exited (zombies included)."""
    deadline = time.monotonic() + grace
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def metrics_reached(metrics: Path, step: int):
    """A ``ready`` test: the run's metrics.jsonl has logged ``step``."""
    def ready():
        return metrics.is_file() and any(json.loads(x).get("step", 0) >= step
                                         for x in metrics.read_text().splitlines() if x.endswith("}"))
    return ready


def start_signal_wait(cmd, env, cwd, ready, signals, timeout=300, log: Path | None = None
                      ) -> tuple[int, str, list[str], list[str]]:
    """Start ``cmd`` in its own session; once ``ready()`` holds, send each of ``signals`` to the whole group (as
    SLURM does; no signals: wait for the exit). Output goes to ``log`` when given (so ``ready`` can read it), else
    through a pipe. Returns (exit code, output, group members when the signals were sent, members left after the
    exit; those are killed)."""
    sink = open(log, "w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    members: list[str] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                members = group_members(proc.pid)
                for sig in signals:
                    os.killpg(proc.pid, sig)
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out = log.read_text() if log is not None else out
        pytest.fail(f"no exit after {signals!r}; output tail:\n{out[-3000:]}")
    finally:
        if log is not None:
            sink.close()
    out = log.read_text() if log is not None else out
    left = left_in_group(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, members, left
