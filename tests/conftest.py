"""Test environment: a real single-process DeepSpeed on CPU (gloo), no JIT-compiled ops, 1 thread per op.

Set before anything imports deepspeed: the accelerator, a repo-local extension cache, and the torch.distributed
variables that let ``deepspeed.initialize`` run in-process as rank 0 of 1.
"""
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("MASTER_PORT", str(_free_port()))
if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker its own port (workers inherit the controller's environment)
    os.environ["MASTER_PORT"] = str(_free_port())
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_zero3_model_building_after_a_test():
    """A ZeRO-3 Trainer keeps transformers' HfDeepSpeedConfig alive so that later LLMs are built partitioned; in one
    pytest process that would leak into the next test (a plain tiny Qwen2 built with empty, partitioned weights)."""
    yield
    from ett_ds.engine import deepspeed as eds
    eds._HF_DS_CONFIG = None
