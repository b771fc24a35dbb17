"""ETTModel: the vision tokenizer, the projector and the causal LLM as ONE nn.Module (one DeepSpeed engine).

Data flow of one forward:

    pixels -> tokenizer.encode -> z_q (codebook embeddings, straight-through) + indices + quantizer loss terms
        z_q -> tokenizer.decode (fp32)                 -> recon          (stages that reconstruct)
        z_q -> projector  | indices -> index_embed     -> visual tokens  (spliced at the image placeholders)
        [text embeddings with visual tokens] -> LLM body -> hidden
        hidden at caption positions -> lm_head -> L_cap ; hidden before image positions -> visual_head -> L_t2i

What trains and which terms exist is data (``stages.STAGE_SPECS``), fixed for a run, so every step runs the same modules in
the same order (a ZeRO-3 requirement). The model does not know about DeepSpeed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config
from ..stages import STAGE_SPECS
from ..tokenizers import build_tokenizer
from ..tokenizers.chunked import auto_chunk_tokens
from . import lora, losses
from .llm import base_model, build_llm, hidden_size, resize_for_vocab
from .projector import MLPProjector

# the batch keys ETTModel.forward takes (a collated batch has more: text, valid, data_stats, ...)
MODEL_INPUTS = ("pixels", "input_ids", "attention_mask", "labels", "gen_mask")


class CodeHead(nn.Linear):
    """The K-way visual-code head: an ``nn.Linear`` (same ``weight``, logits from ``head(h)``) whose call with
    targets returns the mean cross-entropy chunk by chunk (``losses.linear_cross_entropy``), so the N x K logits never
    exist at once. The loss runs inside the module's own call, where ZeRO-3 has gathered the weight."""

    chunk_tokens: int | None = None  # rows per chunk; None: from the memory budget (chunked.auto_chunk_tokens)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return losses.linear_cross_entropy(x, self.weight, targets, self.chunk_tokens)


class ETTModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int | None = None, image_token_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.spec = STAGE_SPECS[cfg.stage]
        tcfg = cfg.model.tokenizer
        self.tokenizer = build_tokenizer(tcfg)  # any tokenizer behind the seam (ett_ds/tokenizers/base.py)
        self.branch_probe = None  # tokenizers/dynamics: sees the gradients of z_q's two branches (LLM, decoder)
        self.image_token_id = image_token_id
        self.llm = self.projector = self.index_embed = self.visual_head = None
        if self.spec.uses_llm:
            if vocab_size is None or image_token_id is None:
                raise ValueError("an LLM stage needs the text tokenizer's vocab size and image token id")
            self.llm = build_llm(cfg.model.llm)
            resize_for_vocab(self.llm, vocab_size)
            h = hidden_size(self.llm)
            self.projector = MLPProjector(self.tokenizer.code_dim, h, cfg.model.projector_depth)
            if cfg.model.visual_input == "index":
                self.index_embed = nn.Embedding(self.tokenizer.codebook_size, h)
                nn.init.normal_(self.index_embed.weight, std=0.02)
            if self.spec.generate:
                self.visual_head = CodeHead(h, self.tokenizer.codebook_size, bias=False)
                nn.init.normal_(self.visual_head.weight, std=0.02)
        self.set_trainable()

    # -- what trains ---------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        named = {"tokenizer": self.tokenizer, "projector": self.projector, "index_embed": self.index_embed,
                 "llm": self.llm, "visual_head": self.visual_head}
        return {k: v for k, v in named.items() if v is not None}

    def set_trainable(self) -> None:
        for name, module in self.parts().items():
            module.requires_grad_(name in self.spec.trains)
        if "llm" in self.spec.trains:
            lora.train_adapters_only(self.llm)  # model.llm.lora.r > 0: the LLM's base weights stay frozen

    @property
    def tokenizer_trains(self) -> bool:
        return "tokenizer" in self.spec.trains

    # -- forward -------------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor):
        if self.tokenizer_trains:
            return self.tokenizer.encode(pixels)
        with torch.no_grad():  # frozen tokenizer: only codes and embeddings, no quantizer losses
            return self.tokenizer.encode(pixels, losses=False)

    def visual_tokens(self, z_q: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) codebook embeddings or (B, h, w) codes -> (B, h*w, hidden) LLM inputs."""
        if self.index_embed is not None:
            return self.index_embed(indices.flatten(1))
        return self.projector(z_q.flatten(2).transpose(1, 2))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n) integer codes -> (B, n, hidden) LLM inputs (generation feeds its own samples back this way)."""
        if self.index_embed is not None:
            return self.index_embed(codes)
        return self.projector(self.tokenizer.lookup(codes))

    def embed_inputs(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the image placeholders replaced, in order, by ``visual`` (B, N, hidden)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        if not mask.is_cuda:  # on GPU this check would cost a host sync per step; the Batcher guarantees it
            n = visual.shape[0] * visual.shape[1]
            if int(mask.sum()) != n:
                raise ValueError(f"batch has {int(mask.sum())} image placeholders, the images give {n} tokens")
        return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype))

    def llm_hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = base_model(self.llm)(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                gen_mask: torch.Tensor | None = None) -> dict:
        q = self.encode_images(pixels)
        out = {"indices": q.indices, "quantizer_terms": q.terms}
        zq_llm = zq_rec = q.z_q
        if self.branch_probe is not None and q.z_q.requires_grad:  # two views, so each branch's gradient is seen
            zq_llm, zq_rec = q.z_q.view_as(q.z_q), q.z_q.view_as(q.z_q)
            self.branch_probe.watch(zq_llm, zq_rec)
        if self.spec.reconstruct:
            out["recon"] = self.tokenizer.decode(zq_rec)
        if self.llm is None:
            return out
        visual = self.visual_tokens(zq_llm, q.indices)
        hidden = self.llm_hidden(self.embed_inputs(input_ids, visual), attention_mask)
        h_prev, targets = hidden[:, :-1], labels[:, 1:]
        keep = targets != losses.IGNORE
        out["loss_cap"] = losses.head_caption_loss(self.llm.get_output_embeddings(), h_prev[keep], targets[keep],
                                                   self.lm_head_chunks(h_prev))
        out["num_caption_tokens"] = keep.sum()
        if self.visual_head is not None:
            out["loss_t2i"] = self.generation_loss(h_prev, input_ids, q.indices, gen_mask)
        return out

    def lm_head_chunks(self, h_prev: torch.Tensor) -> int:
        """Pieces the LM head's loss runs in, from static sizes (B x min(L - 1, data.max_text_tokens + 8) target
        positions at most, in the usual case), so the number of head calls is the same every step; 1 (no
        recomputation) when those logits fit the budget. More targets than that only make the pieces larger."""
        vocab = self.llm.get_output_embeddings().out_features
        rows = h_prev.shape[0] * min(h_prev.shape[1], self.cfg.data.max_text_tokens + 8)
        return -(-rows // auto_chunk_tokens(vocab, copies=5))

    def generation_loss(self, h_prev, input_ids, indices, gen_mask) -> torch.Tensor:
        """CE of the visual head at the positions just before each image token of generation samples."""
        is_img = input_ids[:, 1:] == self.image_token_id  # aligned with h_prev: position t predicts token t+1
        if gen_mask is not None:
            is_img = is_img & gen_mask.view(-1, 1).bool()
        hidden = h_prev[is_img]
        sel = gen_mask.bool() if gen_mask is not None else torch.ones(len(indices), dtype=torch.bool,
                                                                         device=indices.device)
        targets = indices.flatten(1)[sel].reshape(-1)
        return self.visual_head(hidden, targets)  # chunked: the N x K logits never exist at once
