"""The MLP-GELU projector from codebook embeddings (code_dim) to the LLM hidden size."""
from __future__ import annotations

import torch.nn as nn


class MLPProjector(nn.Sequential):
    """Linear(code_dim, hidden) followed by (GELU, Linear(hidden, hidden)) x (depth - 1)."""

    def __init__(self, in_dim: int, hidden: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        layers = [nn.Linear(in_dim, hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        super().__init__(*layers)
