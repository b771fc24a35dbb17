"""ETTForConditionalGeneration: the exported ETT model as one transformers model (remote code, no ett_ds import).

    vision_tokenizer (IBQ / VQGAN, float32)  pixels -> codes + codebook embeddings (vision_ett.py)
    projector (MLP-GELU) or index_embed       codebook embeddings / codes -> LLM inputs
    model + lm_head                           the causal LLM (``AutoModel.from_config(text_config)`` + its head)
    visual_head (t2i checkpoints)             hidden -> visual code logits

``forward`` replaces the embeddings at the image-token positions of ``input_ids`` by the projected visual tokens of
``pixel_values`` (the prompt step of ``generate``; later steps carry no image tokens and read the KV cache), so
``model.generate(**processor(images=..., text=...))`` captions an image as ``python -m ett_ds.infer caption`` does.
``generate_image`` samples the visual codes of a t2i checkpoint and decodes them to pixels.

The weights: ``model.safetensors.index.json`` maps the LLM's tensors to the export's ``llm/`` safetensors (stored
once) and the rest to ``vision.safetensors``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ett import ETTConfig
from .vision_ett import VisionTokenizer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids: greedy at temperature 0, else top-k, then nucleus (top-p), then a draw."""
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
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class ETTPreTrainedModel(PreTrainedModel):
    config_class = ETTConfig
    base_model_prefix = "ett"
    # float32 whatever dtype the rest loads in: its decoder is an fp32 island, its code search precision-bound
    _keep_in_fp32_modules = _keep_in_fp32_modules_strict = ["vision_tokenizer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class ETTForConditionalGeneration(ETTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ETTConfig):
        super().__init__(config)
        text = config.text_config
        hidden, codes = text.hidden_size, config.vision_config["n_embed"]
        self.model = AutoModel.from_config(text)
        self.lm_head = nn.Linear(hidden, text.vocab_size, bias=False)
        self.vision_tokenizer = VisionTokenizer(config.vision_config)
        self.projector = self.index_embed = self.visual_head = None
        if config.visual_input == "index":
            self.index_embed = nn.Embedding(codes, hidden)
        else:
            layers = [nn.Linear(config.vision_config["embed_dim"], hidden)]
            for _ in range(config.projector_depth - 1):
                layers += [nn.GELU(), nn.Linear(hidden, hidden)]
            self.projector = nn.Sequential(*layers)
        if config.has_visual_head:
            self.visual_head = nn.Linear(hidden, codes, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # -- images -> LLM inputs --------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, N, hidden) LLM inputs (N = codes per image)."""
        z_q, codes = self.vision_tokenizer.encode(pixel_values.to(self.vision_tokenizer.quant_conv.weight.device))
        return self.embed_codes(codes.flatten(1), z_q.flatten(2).transpose(1, 2))

    def embed_codes(self, codes: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) codes (or their codebook embeddings (B, n, D)) -> (B, n, hidden)."""
        if self.index_embed is not None:
            return self.index_embed(codes)
        if embeddings is None:
            embeddings = self.vision_tokenizer.lookup(codes)
        return self.projector(embeddings.to(self.projector[0].weight.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)
        mask = input_ids == self.config.image_token_id
        if pixel_values is None or not bool(mask.any()):
            return embeds
        visual = self.get_image_features(pixel_values)
        if int(mask.sum()) != visual.shape[0] * visual.shape[1]:
            raise ValueError(f"{int(mask.sum())} image tokens in input_ids, the images give "
                             f"{visual.shape[0] * visual.shape[1]} (one image per row, N tokens each)")
        return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype))

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                      attentions=out.attentions)

    # -- text to image ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_image(self, input_ids: torch.Tensor, uncond_input_ids: torch.Tensor | None = None,
                       cfg_scale: float | None = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       num_images: int = 1, seed: int = 0, generator: torch.Generator | None = None,
                       **unused) -> torch.Tensor:
        """(num_images, 3, H, W) images in [-1, 1] for one prompt (``processor.image_inputs(text)``).

        The visual codes are sampled one by one through the visual head (temperature 0 = greedy) with
        classifier-free guidance ``cond + (cfg_scale - 1) * (cond - uncond)`` against ``uncond_input_ids``
        (``cfg_scale`` None or <= 0, or no ``uncond_input_ids``: none), then decoded by the vision tokenizer. With
        the same seed this draws what ``python -m ett_ds.infer generate`` draws for its first prompt."""
        cfg_scale = cfg_scale if cfg_scale is not None and cfg_scale > 0 else None
        if self.visual_head is None:
            raise ValueError(f"this model was trained with stage={self.config.stage}; generate_image needs a t2i "
                             "checkpoint")
        dev = self.lm_head.weight.device
        if generator is None:
            generator = torch.Generator(device=dev).manual_seed(seed)
        table = self.get_input_embeddings()
        h, w = (side // self.vision_tokenizer.downsample for side in self.config.image_size)
        prompts = [input_ids] + ([uncond_input_ids] if cfg_scale is not None and uncond_input_ids is not None else [])
        streams = []
        for ids in prompts:
            ids = ids.to(dev).reshape(1, -1).expand(num_images, -1)
            out = self.model(inputs_embeds=table(ids), use_cache=True)
            streams.append([out.cache, out.last_hidden_state[:, -1]])
        codes = []
        for i in range(h * w):
            logits = [self.visual_head(s[1]).float() for s in streams]
            if len(logits) == 2:
                cond, uncond = logits
                logits = [cond + (cfg_scale - 1.0) * (cond - uncond)]
            code = sample_next(logits[0], temperature, top_k, top_p, generator)
            codes.append(code)
            if i + 1 < h * w:
                nxt = self.embed_codes(code[:, None])
                for s in streams:
                    out = self.model(inputs_embeds=nxt, cache=s[0], use_cache=True)
                    s[0], s[1] = out.cache, out.last_hidden_state[:, -1]
        codes = torch.stack(codes, 1).view(num_images, h, w)
        return self.vision_tokenizer.decode_codes(codes).float().clamp(-1, 1)
