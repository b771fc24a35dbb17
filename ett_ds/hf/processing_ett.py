"""ETTProcessor: images and text -> the model's inputs, in the layouts ett_ds trained on; ids -> text.

    proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = proc(images=image, text="Read the text.", return_tensors="pt")      # pixel_values, input_ids, mask
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

Images are fitted to the training size as ett_ds fits them (``resize_mode`` crop / pad / stretch, bicubic) and
scaled to [-1, 1]. The prompt follows the checkpoint's stage, like ``python -m ett_ds.infer caption``:

- caption layout (every stage but sft): ``[bos] [image start] [image]*N [image end]`` then ``text + "\\n"``
  (``text=None``: the run's first caption prompt);
- chat layout (sft): the run's ``data.chat_template`` with ``text`` as the one user turn after the image, then the
  opening of the assistant's turn. ``conversation=[{"role": "user", "content": "<image>\\nHow many?"},
  {"role": "assistant", "content": "3"}, {"role": "user", "content": "And the first?"}]`` gives a longer chat.

Each piece is encoded on its own, as training did, so the ids are training's. Decoding stops at nothing (generate
already stopped at eos) and strips surrounding whitespace, as ett_ds.infer prints captions.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from .tokenization_ett import ETTTokenizer, resolve_file

IMAGE_MARK = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PAD_FILL = (128, 128, 128)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_warned = False


# -- images (the same fitting as ett_ds.data.transforms.fit_image) ---------------------------------------------------
def to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        if img.mode == "La":
            img = img.convert("LA")
        img = img.convert("RGBA")
        base = Image.new("RGB", img.size, (255, 255, 255))
        base.paste(img, mask=img.getchannel("A"))
        return base
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def fit_image(img, size, mode="crop"):
    """RGB PIL image of exactly ``size`` = (H, W): ``crop`` (cover, centre box), ``pad`` (letterbox on mid grey)
    or ``stretch``."""
    global _warned
    img = to_rgb(img)
    H, W = size
    a, b = img.width / img.height, W / H
    if not _warned and max(a / b, b / a) - 1.0 > 0.10:
        _warned = True
        print(f"warning: input image {img.width}x{img.height} differs in aspect from the training size {W}x{H}; "
              f"resize_mode={mode}", file=sys.stderr)
    if img.size == (W, H):
        return img
    if mode == "stretch":
        return img.resize((W, H), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "pad":
        scale = min(W / img.width, H / img.height)
        nw, nh = min(W, max(1, round(img.width * scale))), min(H, max(1, round(img.height * scale)))
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        canvas = Image.new("RGB", (W, H), PAD_FILL)
        canvas.paste(img, ((W - nw) // 2, (H - nh) // 2))
        return canvas
    scale = max(W / img.width, H / img.height)
    nw, nh = max(W, math.ceil(img.width * scale - 1e-6)), max(H, math.ceil(img.height * scale - 1e-6))
    left, top = (nw - W) // 2, (nh - H) // 2
    if (nw, nh) != img.size:
        sx, sy = img.width / nw, img.height / nh
        box = (left * sx, top * sy, (left + W) * sx, (top + H) * sy)
        img = img.resize((W, H), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    elif (left, top, nw, nh) != (0, 0, W, H):
        img = img.crop((left, top, left + W, top + H))
    return img


def image_to_tensor(img, size, mode="crop"):
    """(3, H, W) float32 in [-1, 1]."""
    arr = np.array(fit_image(img, size, mode), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_image(t):
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


class ETTProcessor:
    """The text tokenizer plus the image fitting and the prompt layouts of one ETT export."""

    config_name = "processor_config.json"

    def __init__(self, tokenizer, image_size, resize_mode="crop", num_image_tokens=1, caption_prompt="",
                 turn_template="{role}: {content}\n", layout="caption", max_text_tokens=256, **unused):
        self.tokenizer = tokenizer
        self.image_size = tuple(int(s) for s in image_size)
        self.resize_mode, self.num_image_tokens = resize_mode, int(num_image_tokens)
        self.caption_prompt, self.template, self.layout = caption_prompt, turn_template, layout
        self.max_text_tokens = int(max_text_tokens)
        ids = tokenizer.convert_tokens_to_ids(["<|ett_image_start|>", "<|ett_image_end|>", "<|ett_image|>"])
        self.boi_id, self.eoi_id, self.image_id = ids

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        settings = json.loads(Path(resolve_file(folder, cls.config_name, **kwargs)).read_text())
        settings.pop("auto_map", None)
        settings.pop("processor_class", None)
        return cls(ETTTokenizer.from_pretrained(folder, **kwargs), **settings)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Nothing to register: the export's processor_config.json already names this class."""

    # -- token ids -------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _start(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def image_ids(self) -> list[int]:
        return [self.boi_id] + [self.image_id] * self.num_image_tokens + [self.eoi_id]

    def caption_ids(self, prompt: str | None = None) -> list[int]:
        prompt = self.caption_prompt if prompt is None else prompt
        return self._start() + self.image_ids() + (self.encode(prompt + "\n") if prompt else [])

    def chat_ids(self, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Training's sft layout of ``conversation`` (roles user/assistant or LLaVA's human/gpt; ``<image>`` in the
        user turn that shows the image, else the image goes first), then the opening of the assistant's turn."""
        pre_t, post_t = self.template.split("{content}", 1)
        ids, placed = self._start(), False
        for turn in conversation:
            role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
            if role is None:
                raise ValueError(f"unknown chat role in {turn}")
            content = str(turn.get("content", turn.get("value", "")))
            seg = self.encode(pre_t.format(role=role))
            if role == "assistant":
                seg += self.encode(content) + [self.tokenizer.eos_token_id]
            else:
                for k, piece in enumerate(content.split(IMAGE_MARK)):
                    if k > 0:
                        if placed:
                            raise ValueError("only one <image> per conversation is supported")
                        seg += self.image_ids()
                        placed = True
                    seg += self.encode(piece.strip("\n")) if piece.strip("\n") else []
            post = post_t.format(role=role)
            ids += seg + (self.encode(post) if post else [])
        if not placed:
            n0 = len(self._start())
            ids = ids[:n0] + self.image_ids() + ids[n0:]
        if add_generation_prompt:
            ids += self.encode(pre_t.format(role="assistant"))
        return ids

    def prompt_ids(self, text: str | None = None, conversation: list[dict] | None = None) -> list[int]:
        if conversation is not None:
            return self.chat_ids(conversation)
        if self.layout == "chat":
            return self.chat_ids([{"role": "user",
                                   "content": f"{IMAGE_MARK}\n{self.caption_prompt if text is None else text}"}])
        return self.caption_ids(text)

    def image_prompt_ids(self, text: str) -> list[int]:
        """Text-to-image: the ids up to and including image start (``text=""``: the unconditional prompt)."""
        if not text:
            return self._start() + [self.boi_id]
        return self._start() + self.encode(text)[: self.max_text_tokens] + [self.boi_id]

    # -- the call --------------------------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, conversation=None, return_tensors="pt", **unused):
        """``images``: one PIL image or a list; ``text``: one prompt (for every image), a list (one per image) or
        None (the run's first caption prompt); ``conversation``: a chat (one image) instead of ``text``. Rows of
        different lengths are left-padded (pad id, attention_mask 0)."""
        if images is None:
            raise ValueError("ETTProcessor needs images (text-to-image: proc.image_inputs(text))")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        texts = text if isinstance(text, (list, tuple)) else [text] * len(images)
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        rows = [self.prompt_ids(t, conversation) for t in texts]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = [[pad] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        pixels = torch.stack([image_to_tensor(im, self.image_size, self.resize_mode) for im in images])
        data = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
        if return_tensors == "pt":
            data["input_ids"], data["attention_mask"] = torch.tensor(ids), torch.tensor(mask)
        return BatchFeature(data=data)

    def image_inputs(self, text: str | list[str], return_tensors="pt"):
        """Text-to-image inputs for ``model.generate_image``: ``input_ids`` (the prompt) and ``uncond_input_ids``
        (the empty prompt, for classifier-free guidance); one prompt per call."""
        return BatchFeature(data={"input_ids": torch.tensor([self.image_prompt_ids(text)]),
                                  "uncond_input_ids": torch.tensor([self.image_prompt_ids("")])})

    # -- decoding --------------------------------------------------------------------------------------------------
    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        eos = self.tokenizer.eos_token_id
        if eos in ids:  # what follows eos in a batch row is padding
            ids = ids[: ids.index(eos) + (0 if skip_special_tokens else 1)]
        if skip_special_tokens:  # image tokens and the rows past the tokenizer's vocabulary
            ids = [i for i in ids if i < len(self.tokenizer) and i not in (self.boi_id, self.eoi_id, self.image_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs).strip()

    def postprocess_images(self, pixels) -> list:
        """(B, 3, H, W) in [-1, 1] (``model.generate_image``) -> PIL images."""
        return [tensor_to_image(p) for p in pixels]

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, **kwargs)
