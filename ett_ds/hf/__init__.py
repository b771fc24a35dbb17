"""The remote code an ETT export carries (``trust_remote_code``): transformers opens the export folder as one model
with these files alone, without ett_ds.

    configuration_ett.py   ETTConfig (model_type ``ett``): the LLM's config, the vision tokenizer's layout, ids
    vision_ett.py          the IBQ / VQGAN tokenizer's inference path (encode to codes + embeddings, decode)
    modeling_ett.py        ETTForConditionalGeneration: vision tokenizer + projector + LLM (+ visual head), generate
    tokenization_ett.py    the text tokenizer: the run's sentencepiece model wrapped, or the LLM's own tokenizer
    processing_ett.py      ETTProcessor: image fitting, training's prompt layouts, decoding

These modules import only torch, transformers, sentencepiece, numpy and Pillow (and each other, relatively); the
export copies them into the folder (:data:`FILES`). So they repeat, by design, ett_ds's inference paths (the taming
decoder blocks, the sampling step, the image fitting); tests/test_hf_export.py holds each to ett_ds's own output.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("configuration_ett.py", "vision_ett.py", "modeling_ett.py", "tokenization_ett.py", "processing_ett.py")
