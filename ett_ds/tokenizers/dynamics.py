"""How fast the tokenizer moves under ETT, logged per step with ``train.log_tokenizer_dynamics=true``:

* ``code_drift``: over the codebook rows this step's images used, the mean of ||E_after - E_before|| / ||E_before||
  (how fast the projector's inputs move under the LLM that is learning to read them);
* ``grad_ratio``: ||dL/dz_q|| through the projector (the caption loss) over ||dL/dz_q|| through the decoder
  (alpha times L_vq's pixel, perceptual and GAN terms), at the straight-through codebook embeddings z_q where the two
  objectives meet. The quantizer's own terms (quant, entropy) act on the encoder output before z_q and are not in it.

Every rank computes both for its own micro-batches (the codebook is gathered under ZeRO-3); they are averaged over
ranks and the steps of a logging window like any other term in ``metrics.jsonl``. They cost a codebook copy per
step and two tensor hooks per micro-batch.
"""
from __future__ import annotations

import torch

from ..engine.zero3 import gathered


class TokenizerDynamics:
    def __init__(self, model):
        self.tokenizer = model.tokenizer
        model.branch_probe = self
        self.before = None
        self.used: list[torch.Tensor] = []
        self.norms: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_step(self) -> None:
        with gathered([self.tokenizer.codebook()]):
            self.before = self.tokenizer.codebook().detach().float().clone()
        self.used, self.norms = [], []

    def watch(self, zq_llm: torch.Tensor, zq_rec: torch.Tensor) -> None:
        """Called by ``ETTModel.forward`` (inside the engine's forward, where the tensors are the ones the losses
        use) with the two branches of this micro-batch's z_q: hooks keep their gradient norms."""
        pair = [None, None]

        def keep(i):
            def hook(g):
                pair[i] = g.detach().float().norm()
            return hook
        zq_llm.register_hook(keep(0))
        zq_rec.register_hook(keep(1))
        self.norms.append(pair)

    def used_codes(self, indices: torch.Tensor) -> None:
        self.used.append(indices.detach().flatten())

    def after_step(self) -> dict[str, torch.Tensor]:
        with gathered([self.tokenizer.codebook()]):
            after = self.tokenizer.codebook().detach().float()
            rows = torch.unique(torch.cat(self.used))
            old = self.before[rows]
            drift = ((after[rows] - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)).mean()
        ratios = [a / b.clamp_min(1e-30) for a, b in self.norms if a is not None and b is not None]
        out = {"code_drift": drift}
        if ratios:
            out["grad_ratio"] = torch.stack(ratios).mean()
        self.before = None
        return out
