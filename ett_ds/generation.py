"""Generation over a loaded ETTModel: captions, chat replies, text-to-image samples and reconstructions.

All decoding is autoregressive with the LLM's KV cache: the prompt runs once through the transformer body
(``use_cache=True``), then one position at a time with the returned cache (transformers 5 calls the former
``past_key_values`` argument ``cache``). Sequences of one call always have the same length (captions of a batch
share their prompt; a t2i prompt's images share theirs), so no padding is needed and a batch gives exactly what its
samples give one by one.

Classifier-free guidance runs a second stream on the empty prompt and samples from
``cond + (s - 1) * (cond - uncond)`` (= ``uncond + s * (cond - uncond)``, written so that s = 1 is exactly the
unguided logits). ``cfg_scale=None`` skips the second stream.

The functions also work on the live model inside a ZeRO-3 engine (every rank must call them with the same inputs:
each step runs the same modules on every rank).
"""
from __future__ import annotations

import contextlib

import torch

from .checkpoint import CheckpointError
from .data.batch import IMAGE_MARK, Batcher
from .data.text import TextTokenizer
from .models.ett import ETTModel
from .models.llm import base_model


# -- sampling ------------------------------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids. Greedy when temperature == 0; else top-k, then nucleus (top-p), then a draw."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _device(model: ETTModel) -> torch.device:
    return next(model.tokenizer.parameters()).device


def _autocast(model: ETTModel):
    """Low-precision LLM weights (load_model(dtype=...)) compute under autocast; fp32 weights run plain."""
    llm_dtype = next(model.llm.parameters()).dtype if model.llm is not None else torch.float32
    if llm_dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(_device(model).type, dtype=llm_dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: ETTModel):
    """Eval mode, no gradients, the LLM's autocast; every module's training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # also turns gradient checkpointing off, which would disable the KV cache
    try:
        with torch.no_grad(), _autocast(model):
            yield
    finally:
        for m, training in modes:
            m.training = training


class _Stream:
    """One batch of sequences advancing together through the LLM with a KV cache."""

    def __init__(self, model: ETTModel, embeds: torch.Tensor):
        self.body = base_model(model.llm)
        out = self.body(inputs_embeds=embeds, use_cache=True)
        self.cache, self.last = out.cache, out.last_hidden_state[:, -1]

    def feed(self, embeds: torch.Tensor) -> None:
        """(B, n, hidden) next inputs (n = 1 while sampling; a whole new chat turn at once)."""
        out = self.body(inputs_embeds=embeds, cache=self.cache, use_cache=True)  # transformers 5: `cache`
        self.cache, self.last = out.cache, out.last_hidden_state[:, -1]


def _need_llm(model: ETTModel) -> None:
    if model.llm is None:
        raise CheckpointError(f"this model was trained with stage={model.cfg.stage} and has no LLM")


# -- text ----------------------------------------------------------------------------------------------------------
def _image_tokens(model: ETTModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, N, hidden) LLM inputs through the frozen tokenizer (no quantizer losses)."""
    q = model.tokenizer.encode(pixels, losses=False)
    return model.visual_tokens(q.z_q, q.indices)


def decode_tokens(model: ETTModel, text: TextTokenizer, prompt_ids: torch.Tensor, pixels: torch.Tensor,
                  max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T) new token ids (eos-filled after a row's eos). prompt_ids: (B, L), the same layout in every row, with
    one image's placeholders per row; call under ``no_grad``."""
    embeds = model.embed_inputs(prompt_ids, _image_tokens(model, pixels))
    return _sample_text(model, text, _Stream(model, embeds), max_new_tokens, temperature, top_k, top_p,
                        generator)[0]


def _sample_text(model: ETTModel, text: TextTokenizer, stream: _Stream, max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, generator) -> tuple[torch.Tensor, int]:
    """Tokens sampled after ``stream``'s inputs, and how many of them were fed back (the cache holds those)."""
    head, table = model.llm.get_output_embeddings(), model.llm.get_input_embeddings()
    banned = [text.boi_id, text.eoi_id, text.image_id]
    b, dev = stream.last.shape[0], stream.last.device
    out = torch.full((b, 0), text.eos_id, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    fed = 0
    for _ in range(max_new_tokens):
        logits = head(stream.last).float()
        logits[:, text.vocab_size:] = float("-inf")  # padding rows of the embedding table
        logits[:, banned] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, text.eos_id), nxt)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= nxt == text.eos_id
        if bool(done.all()):
            break
        stream.feed(table(nxt[:, None]))
        fed += 1
    return out, fed


def decode_texts(text: TextTokenizer, tokens: torch.Tensor) -> list[str]:
    """Generated token rows as text, each cut at its first eos."""
    texts = []
    for row in tokens.tolist():
        row = row[: row.index(text.eos_id)] if text.eos_id in row else row
        texts.append(text.decode(row).strip())
    return texts


def caption(model: ETTModel, text: TextTokenizer, pixels: torch.Tensor, prompt: str | None = None,
            max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            generator: torch.Generator | None = None) -> list[str]:
    """One caption per image of ``pixels`` (B, 3, H, W) in [-1, 1]; ``prompt`` defaults to the config's first.

    A stage ``sft`` checkpoint is asked in the layout it was trained on: the prompt as a one-turn conversation in
    ``data.chat_template`` (sft trains caption data that way); every other stage gets the prompt after the image."""
    _need_llm(model)
    if model.cfg.stage == "sft":
        turn = first_user_turn(prompt if prompt is not None else model.cfg.data.caption_prompts[0])
        one = chat_prompt(model, text, [turn])
    else:
        one = Batcher(model.cfg, text, train=False).caption_prompt(prompt)
    ids = torch.tensor([one] * pixels.shape[0], device=_device(model))
    with eval_mode(model):
        return decode_texts(text, decode_tokens(model, text, ids, pixels.to(_device(model)), max_new_tokens,
                                                temperature, top_k, top_p, generator))


def chat_prompt(model: ETTModel, text: TextTokenizer, turns: list[dict]) -> list[int]:
    """Token ids of a conversation (training's sft layout) followed by the opening of the assistant's turn."""
    ids, _ = Batcher(model.cfg, text, train=False).chat_sequence(turns)
    opening = model.cfg.data.chat_template.split("{content}", 1)[0].format(role="assistant")
    return ids + text.encode(opening)


def chat_reply(model: ETTModel, text: TextTokenizer, pixels: torch.Tensor, turns: list[dict],
               max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> str:
    """The assistant's reply to ``turns`` (LLaVA style: ``[{"from": "human", "value": "<image>\\n..."}, ...]``,
    ending with a user turn) about one image ``pixels`` (3, H, W) or (1, 3, H, W)."""
    _need_llm(model)
    if not turns or str(turns[-1].get("from", turns[-1].get("role"))) not in ("human", "user"):
        raise ValueError("chat_reply: the conversation must end with a user turn")
    ids = torch.tensor([chat_prompt(model, text, turns)], device=_device(model))
    pixels = pixels.reshape(1, *pixels.shape[-3:]).to(_device(model))
    with eval_mode(model):
        return decode_texts(text, decode_tokens(model, text, ids, pixels, max_new_tokens, temperature, top_k, top_p,
                                                generator))[0]


def first_user_turn(message: str) -> dict:
    return {"from": "human", "value": f"{IMAGE_MARK}\n{message}"}


def _crop(cache, keep: int) -> bool:
    """Shorten a KV cache to its first ``keep`` positions; False when this cache type cannot."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        if not getattr(cache, "is_croppable", True):
            return False
        cache.crop(-extra)  # a negative count removes that many positions (transformers 4 and 5 alike)
    return cache.get_seq_length() == keep


class ChatSession:
    """A conversation about one image whose KV cache lives from turn to turn.

    The image is encoded once. Each :meth:`reply` runs through the LLM only the tokens the cache does not hold yet:
    the closing of the previous reply, the new user turn and the opening of the answer. When the template's
    re-tokenisation of the previous reply differs from the sampled ids, the cache is cut back to the common prefix
    and the rest runs again. Replies are those of :func:`chat_reply` on the whole conversation (a test checks it).
    """

    def __init__(self, model: ETTModel, text: TextTokenizer, pixels: torch.Tensor):
        _need_llm(model)
        self.model, self.text = model, text
        self.pixels = pixels.reshape(1, *pixels.shape[-3:]).to(_device(model))
        self.turns: list[dict] = []
        self.visual = None
        self.stream: _Stream | None = None
        self.cached: list[int] = []  # the ids whose keys and values the cache holds, in order
        self.prefilled = 0  # tokens run through the LLM for prompts so far (for tests and curiosity)

    def reply(self, message: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, generator: torch.Generator | None = None) -> str:
        turns = self.turns + [first_user_turn(message) if not self.turns else {"from": "human", "value": message}]
        full = chat_prompt(self.model, self.text, turns)
        with eval_mode(self.model):
            if self.visual is None:
                self.visual = _image_tokens(self.model, self.pixels)
            keep = 0
            for a, b in zip(self.cached, full[:-1]):  # at least one new position, to read the next token from
                if a != b:
                    break
                keep += 1
            if self.stream is None or keep == 0 or not _crop(self.stream.cache, keep):
                keep = 0
            ids = torch.tensor([full], device=self.pixels.device)
            embeds = self.model.embed_inputs(ids, self.visual)[:, keep:]
            if keep == 0:
                self.stream = _Stream(self.model, embeds)
            else:
                self.stream.feed(embeds)
            self.prefilled += len(full) - keep
            tokens, fed = _sample_text(self.model, self.text, self.stream, max_new_tokens, temperature, top_k,
                                       top_p, generator)
        self.cached = full + tokens[0, :fed].tolist()
        answer = decode_texts(self.text, tokens)[0]
        self.turns = turns + [{"from": "gpt", "value": answer}]
        return answer


# -- images --------------------------------------------------------------------------------------------------------
def sample_codes(model: ETTModel, cond_ids: list[int], uncond_ids: list[int] | None, n_codes: int, batch: int,
                 cfg_scale: float | None, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """(batch, n_codes) visual codes predicted one by one through the visual head."""
    dev = _device(model)
    table = model.llm.get_input_embeddings()

    def start(ids):
        return _Stream(model, table(torch.tensor([ids] * batch, device=dev)))

    streams = [start(cond_ids)] + ([start(uncond_ids)] if cfg_scale is not None else [])
    codes = []
    for i in range(n_codes):
        logits = [model.visual_head(s.last).float() for s in streams]
        if cfg_scale is not None:
            cond, uncond = logits
            logits = [cond + (cfg_scale - 1.0) * (cond - uncond)]
        code = sample_next(logits[0], temperature, top_k, top_p, generator)
        codes.append(code)
        if i + 1 < n_codes:
            nxt = model.embed_codes(code[:, None])
            for s in streams:
                s.feed(nxt)
    return torch.stack(codes, 1)


def generate_images(model: ETTModel, text: TextTokenizer, prompts: list[str], cfg_scale: float | None = 3.0,
                    top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, seed: int = 0,
                    num_images: int = 1) -> torch.Tensor:
    """(len(prompts) * num_images, 3, H, W) images in [-1, 1], prompt-major. Prompt i samples with the seed
    ``seed + i`` (so an image does not depend on the other prompts of the call); temperature 0 is greedy;
    ``cfg_scale`` None or <= 0: no guidance (no unguided stream)."""
    cfg_scale = cfg_scale if cfg_scale is not None and cfg_scale > 0 else None
    if model.visual_head is None:
        raise CheckpointError(f"this model was trained with stage={model.cfg.stage}; generate needs a t2i checkpoint")
    batcher = Batcher(model.cfg, text, train=False)
    h, w = (side // model.tokenizer.downsample for side in model.cfg.data.image_size)
    dev = _device(model)
    images = []
    with eval_mode(model):
        for i, prompt in enumerate(prompts):
            g = torch.Generator(device=dev).manual_seed(seed + i)
            codes = sample_codes(model, batcher.t2i_prompt(prompt), batcher.t2i_prompt(""), h * w, num_images,
                                 cfg_scale, temperature, top_k, top_p, g)
            images.append(model.tokenizer.decode_codes(codes.view(num_images, h, w)).float().clamp(-1, 1))
    return torch.cat(images)


def reconstruct(model: ETTModel, pixels: torch.Tensor) -> torch.Tensor:
    """The tokenizer's round trip, (B, 3, H, W) in [-1, 1]."""
    with eval_mode(model):
        return model.tokenizer(pixels.to(_device(model)))[0].float().clamp(-1, 1)
