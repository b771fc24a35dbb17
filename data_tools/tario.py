"""Deterministic WebDataset tar writing shared by every subcommand.

Byte-identical output for identical input is what makes ``--resume`` checkable and synthetic data reproducible, so
every header field that normally leaks the environment (mtime, uid/gid, user names, mode) is fixed, members of one
sample are written adjacently in sorted suffix order, and a shard only appears under its final name once it is
complete (written to a hidden temporary name in the same directory, then ``os.replace``d).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from ett_ds.data.format import key_problem


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def sample_key(shard: int, index: int) -> str:
    """Keys unique across shards without coordination: 6 digits of shard id, 6 of position in the shard."""
    return f"{shard:06d}{index:06d}"


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class ShardTarWriter:
    """Writes one shard: ``write(key, {ext: bytes})`` per sample, then ``close()`` renames it into place."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp, "wb")
        # GNU format: long names fine, no pax headers with timestamps.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self.count = 0
        self.bytes = 0
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        problem = key_problem(key)
        if problem:
            raise ValueError(problem)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path.name}")
        self._keys.add(key)
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
