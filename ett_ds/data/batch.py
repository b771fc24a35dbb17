"""Turning decoded samples into multimodal token sequences, and padding them into batches.

Layouts (N = image tokens of the configured resolution; [x] = one special token; labels shown under the tokens):

    caption  [bos] [boi] [img]*N [eoi] prompt caption [eos]        loss on caption + eos
    sft      [bos] turn... where the human turn's "<image>" becomes [boi] [img]*N [eoi]; loss on assistant
             contents and the eos closing each assistant turn; the text is cut at `data.max_chat_tokens`
    sft, text-only (a conversation with no image and no "<image>")
             [bos] turn... [boi] [img]*N [eoi]   a blank image's block after the text, outside the attention mask
             and the labels: every sample runs the same modules (ZeRO-3), the text trains as a plain LM
    t2i      [bos] prompt [boi] [img]*N [eoi] [eos]                 loss on the N image positions (visual head);
             the prompt is dropped with probability `train.prompt_dropout` (classifier-free guidance)

Caption samples in an ``sft`` run become one-turn conversations (a caption prompt from ``data.caption_prompts``
as the user turn, the caption as the reply). A sample's json may carry ``"task": "caption" | "sft" | "t2i"`` so one run can mix understanding and generation;
otherwise the stage decides (sft -> sft, t2i -> t2i, else caption). ``conversations`` (LLaVA style) makes a sample sft.
"""
from __future__ import annotations

import random

import torch

from ..config import Config
from ..stages import STAGE_SPECS
from .format import IMAGE_MARK, ROLES, SampleError, sample_caption, well_formed_conversation
from .text import IGNORE, TextTokenizer
from .transforms import image_to_uint8, to_unit_range

BLANK = 128  # the placeholder image of a text-only sample: mid grey, about 0 in [-1, 1]
CHARS_PER_TOKEN = 64  # a token never spans more characters than this: what a chat turn is encoded from, per token


class Batcher:
    """``make_example`` (one decoded sample -> token ids, labels, pixels) and ``collate`` (padding)."""

    def __init__(self, cfg: Config, text: TextTokenizer | None, train: bool = True, group_by: str | None = None):
        self.cfg, self.text, self.train = cfg, text, train
        self.group_by = group_by  # evaluation: this json field of each sample goes to batch["group"] (e.g. family)
        self.size = tuple(cfg.data.image_size)
        self.resize_mode = cfg.data.resize_mode
        self.num_image_tokens = cfg.num_image_tokens
        self.default_task = {"sft": "sft", "t2i": "t2i"}.get(cfg.stage, "caption")
        # text-only conversations train where the image only feeds the LLM; a reconstructing stage would learn blanks
        self.text_only_ok = not STAGE_SPECS[cfg.stage].reconstruct
        # The global `random` module: the input pipeline seeds it per (seed, segment, rank, worker), and the
        # trainer's checkpoints carry its state, so prompt choice and dropout are reproducible and resumable.
        self.rng = random

    # -- pieces --------------------------------------------------------------------------------------------------
    def _start(self) -> list[int]:
        return [self.text.bos_id] if self.text.bos_id is not None else []

    def image_ids(self) -> list[int]:
        t = self.text
        return [t.boi_id] + [t.image_id] * self.num_image_tokens + [t.eoi_id]

    def _clip(self, ids: list[int]) -> list[int]:
        return ids[: self.cfg.data.max_text_tokens]

    def _prompt(self) -> str:
        prompts = self.cfg.data.caption_prompts
        return self.rng.choice(prompts) if self.train else prompts[0]

    def caption_prompt(self, prompt: str | None = None) -> list[int]:
        """Tokens up to where the caption starts (used by training and by captioning at inference)."""
        if prompt is None:
            prompt = self._prompt()
        return self._start() + self.image_ids() + (self.text.encode(prompt + "\n") if prompt else [])

    def t2i_prompt(self, prompt: str) -> list[int]:
        """Tokens up to and including [boi]: what the LLM reads before predicting the first visual code."""
        return self._start() + self._clip(self.text.encode(prompt)) + [self.text.boi_id] if prompt else \
            self._start() + [self.text.boi_id]

    # -- sequences -----------------------------------------------------------------------------------------------
    def caption_sequence(self, caption: str) -> tuple[list[int], list[int]]:
        prefix = self.caption_prompt()
        target = self._clip(self.text.encode(caption)) + [self.text.eos_id]
        return prefix + target, [IGNORE] * len(prefix) + target

    def t2i_sequence(self, caption: str) -> tuple[list[int], list[int]]:
        if self.train and self.rng.random() < self.cfg.train.prompt_dropout:
            caption = ""
        ids = self.t2i_prompt(caption) + self.image_ids()[1:] + [self.text.eos_id]
        return ids, [IGNORE] * len(ids)

    def chat_sequence(self, conversations: list[dict], image: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation: the image block where the row put ``<image>`` (first when it put
        none); ``image=False``: a text-only conversation (no block; an ``<image>`` mark is a ValueError).

        The text (every token but the image block's) is cut at ``data.max_chat_tokens``: turns past the cut are
        dropped, the turn it falls in is cut short (an assistant turn then has no eos), and a turn's content is
        encoded from at most :data:`CHARS_PER_TOKEN` characters per token of room left, so no conversation costs
        more than the budget whatever its length. Raises ``SampleError("too_long")`` when the cut leaves no
        supervised token."""
        template = self.cfg.data.chat_template
        if "{content}" not in template or "{role}" not in template:
            raise ValueError("data.chat_template must contain {role} and {content}")
        budget = self.cfg.data.max_chat_tokens
        ids, labels = self._start(), [IGNORE] * len(self._start())
        placed, used, cut = False, 0, False

        def encode(text: str) -> list[int]:  # at most the characters the room left can hold
            nonlocal cut
            room = max(budget - used, 0) * CHARS_PER_TOKEN
            cut = cut or len(text) > room
            return self.text.encode(text[:room]) if text and room else []

        def add(tokens: list[int], supervised: bool) -> None:
            nonlocal used, cut
            if len(tokens) > budget - used:
                tokens, cut = tokens[: budget - used], True
            ids.extend(tokens)
            labels.extend(tokens if supervised else [IGNORE] * len(tokens))
            used += len(tokens)

        for turn in conversations:
            if used >= budget:
                cut = True
                break
            role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None:
                raise ValueError(f"unknown chat role in {turn}")
            content = str(turn.get("value", turn.get("content", "")))
            pre, post = template.split("{content}", 1)
            pre, post = pre.format(role=role), post.format(role=role)
            add(encode(pre), False)
            if role == "assistant":
                add(encode(content) + [self.text.eos_id], True)
            else:
                for k, piece in enumerate(content.split(IMAGE_MARK)):
                    if k > 0:
                        if placed or not image:
                            raise ValueError("only one <image> per conversation is supported" if image else
                                             "<image> in a sample without an image")
                        block = self.image_ids()  # not counted against the text budget
                        ids.extend(block)
                        labels.extend([IGNORE] * len(block))
                        placed = True
                    add(encode(piece.strip("\n")), False)
            add(encode(post), False)
        if image and not placed:  # the image goes first when the conversation does not place it
            img = self.image_ids()
            n0 = len(self._start())
            ids = ids[:n0] + img + ids[n0:]
            labels = labels[:n0] + [IGNORE] * len(img) + labels[n0:]
        if cut and all(t == IGNORE for t in labels):
            raise SampleError("too_long")
        return ids, labels

    # -- the two callables the input pipeline runs in its workers -------------------------------------------------
    def make_example(self, sample: dict) -> dict:
        """One decoded sample -> an example. A sample that cannot serve this stage raises ``SampleError(reason)``
        (counted by the input pipeline; all but ``rejected`` count towards ``data.max_error_rate``): a stage with
        an LLM needs a caption (``missing_caption``) or well-formed ``conversations`` (``bad_conversations``);
        a json field of the wrong type is ``bad_json``. The tokenizer stage needs no text."""
        meta = sample.get("json") or {}
        text = sample_caption(sample.get("text"), meta)
        task = meta.get("task") or ("sft" if "conversations" in meta else self.default_task)
        if task not in ("caption", "sft", "t2i"):
            raise SampleError("bad_json")
        conversations = meta.get("conversations")
        if conversations is not None and not well_formed_conversation(conversations):
            raise SampleError("bad_conversations")
        has_text = bool(text and text.strip())
        text_only = sample.get("image") is None
        if text_only and not (self.text is not None and task == "sft" and conversations and self.text_only_ok):
            raise SampleError("missing_image")  # text-only: only conversations, only in stages that do not reconstruct
        if self.text is not None:
            if task == "sft" and not conversations:  # caption data becomes a one-turn instruction sample
                if not has_text:
                    raise SampleError("missing_caption")
                conversations = [{"from": "human", "value": f"{IMAGE_MARK}\n{self._prompt()}"},
                                 {"from": "gpt", "value": text.strip()}]
            if task != "sft" and not has_text:
                raise SampleError("missing_caption")
        if text_only:  # a blank image runs through the same modules; its tokens go after the text, unattended
            pixels = torch.full((3, *self.size), BLANK, dtype=torch.uint8)
        else:
            pixels = image_to_uint8(sample["image"], size=self.size, train=self.train, rng=self.rng,
                                    mode=self.resize_mode)
        ex = {"pixels": pixels, "text": str(text or ""), "gen": task == "t2i"}
        if self.group_by:
            group = meta.get(self.group_by)
            ex["group"] = None if group is None else str(group)
        if self.text is not None:
            if task == "sft":
                try:
                    ids, labels = self.chat_sequence(conversations, image=not text_only)
                except ValueError:  # unknown role, two images, an <image> mark without an image
                    raise SampleError("bad_conversations") from None
                if text_only:
                    block = self.image_ids()
                    ex["attend"], ex["text_only"] = len(ids), True
                    ids, labels = ids + block, labels + [IGNORE] * len(block)
            elif task == "t2i":
                ids, labels = self.t2i_sequence(str(text))
            else:
                ids, labels = self.caption_sequence(str(text).strip())
            ex["input_ids"], ex["labels"] = ids, labels
        return ex

    def collate(self, examples: list[dict]) -> dict:
        batch = {"pixels": torch.stack([e["pixels"] for e in examples]),
                 "text": [e["text"] for e in examples]}
        if self.group_by:
            batch["group"] = [e.get("group") for e in examples]
        if self.text is None:
            return batch
        width = max(len(e["input_ids"]) for e in examples)
        pad = self.text.pad_id
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :e.get("attend", n)] = 1  # a text-only sample's trailing image block is not attended
        batch.update(input_ids=ids, labels=labels, attention_mask=mask,
                     gen_mask=torch.tensor([e["gen"] for e in examples], dtype=torch.bool))
        return batch


def batch_to_device(batch: dict, device) -> dict:
    """Tensors of a collated batch to ``device``; the uint8 ``pixels`` become float [-1, 1] there, after the copy."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixels" in out:
        out["pixels"] = to_unit_range(out["pixels"])
    return out
