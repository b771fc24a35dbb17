"""The training stages: their names and what each one trains and runs (a leaf: imported by the config, the data
pipeline and the model alike).

What trains and which terms exist is data, fixed for a run, so every step runs the same modules in the same order
(a ZeRO-3 requirement). ``config.stage`` takes one of :data:`STAGES`; docs/stages.md tells how they chain.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    trains: frozenset  # parts whose parameters train: tokenizer, projector, index_embed, llm, visual_head
    uses_llm: bool = True  # the LLM exists and runs
    reconstruct: bool = False  # the decoder runs and L_vq is part of the loss
    generate: bool = False  # the visual head exists (text -> image)
    caption: bool = True  # the model captions images (validation's greedy captions with exact match and CER)


STAGE_SPECS = {
    "tokenizer": StageSpec(frozenset({"tokenizer"}), uses_llm=False, reconstruct=True, caption=False),
    "align": StageSpec(frozenset({"projector", "index_embed"})),
    "ett": StageSpec(frozenset({"tokenizer", "projector", "llm"}), reconstruct=True),
    "frozen": StageSpec(frozenset({"projector", "index_embed", "llm"})),
    "sft": StageSpec(frozenset({"projector", "index_embed", "llm"})),
    "t2i": StageSpec(frozenset({"projector", "llm", "visual_head"}), generate=True, caption=False),
}
STAGES = tuple(STAGE_SPECS)  # the pipeline's order
