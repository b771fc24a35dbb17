"""The typed configuration tree: the single source of truth for a run.

A run is described by a YAML recipe plus ``key.sub=value`` overrides. Every field below has a docstring (the string
literal right after it); ``python -m ett_ds.config --markdown`` (the command is ``config_cli.py``) turns them into the
reference page (docs/configuration.md), so the docs cannot drift from the code. Unknown keys and wrongly typed values
are rejected with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml

from .stages import STAGES
from .typed_tree import ConfigError, build, field_docs, is_unset, parse_value, set_path  # noqa: F401 (re-exported)

# isort: split
from .typed_tree import Decay, Fraction, Len, NonNegFloat, NonNegInt, OneOf, PosFloat, PosFraction, PosInt

RECIPES = Path(__file__).resolve().parent / "recipes"
TOKENIZER_TYPES = ("ibq", "vqgan")  # the keys of tokenizers.REGISTRY (tests/test_config.py: one list)
RESIZE_MODES = ("crop", "pad", "stretch")  # data.resize_mode: data/transforms.fit_image does each


@dataclass
class TokenizerConfig:
    type: Annotated[str, OneOf(*TOKENIZER_TYPES)] = "ibq"
    "Which tokenizer (ett_ds/tokenizers): `ibq` (the paper's, index backpropagation) or `vqgan` (taming VQGAN, nearest-neighbour codes with a straight-through estimator)."
    ch: PosInt = 128
    "Base channel count of the VQGAN encoder/decoder."
    ch_mult: Annotated[list[PosInt], Len(1)] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    "Channel multiplier per resolution level; len(ch_mult)-1 downsamplings (5 levels = 16x)."
    num_res_blocks: PosInt = 4
    "ResNet blocks per encoder level (the decoder uses one more, as in taming/IBQ)."
    attn_resolutions: list[PosInt] = field(default_factory=lambda: [16])
    "Feature-map sides (relative to `resolution`) that get a self-attention block."
    resolution: PosInt = 256
    "Nominal input side used to place `attn_resolutions` (IBQ's `resolution`); inputs may be other sizes."
    z_channels: PosInt = 256
    "Channels of the encoder output before `quant_conv`."
    in_channels: PosInt = 3
    "Image channels."
    dropout: Decay = 0.0
    "Dropout inside ResNet blocks."
    codebook_size: PosInt = 131072
    "K, the number of codes (paper: 131,072)."
    code_dim: PosInt = 256
    "Dimension of each code (paper: 256)."
    codebook_init_std: PosFloat | None = None
    "None: IBQ's uniform(-1/K, 1/K) codebook init; a number: normal(0, std) (keeps more codes alive in short runs)."
    beta: NonNegFloat = 0.25
    "`ibq`: weight of the codebook term in the double quantization loss (IBQ's placement); `vqgan`: the commitment weight."
    entropy_temperature: PosFloat = 0.01
    "`ibq`: softmax temperature of the entropy loss."
    entropy_eps: PosFloat = 1e-5
    "`ibq`: eps inside the log of the entropy loss's batch distribution, log(mean p + eps) (the IBQ / MAGVIT-v2 reference's 1e-5)."
    l2_norm_codes: bool = False
    "`vqgan`: l2-normalise encoder outputs and codebook rows before the nearest-neighbour search (LlamaGen's VQ-16)."
    quantizer_chunk_tokens: PosInt | None = None
    "Tokens per chunk of the quantizer's K-wide logits/softmax/entropy (recomputed in backward); None: from a 256 MiB budget (128 at K = 131,072)."
    checkpoint: str | None = None
    "Local path to a tokenizer to start from: a SEED-Voken IBQ or taming VQGAN Lightning .ckpt, or an ett_ds export's tokenizer.safetensors."
    checkpoint_config: str | None = None
    "YAML with the taming / IBQ `ddconfig`/`n_embed`/`embed_dim` of `checkpoint`; when set, it overrides the fields above (a YAML naming the other tokenizer family is an error)."
    use_ema_weights: bool = True
    "Load the `model_ema.*` weights of an IBQ checkpoint when present."

    @property
    def downsample(self) -> int:
        """Pixels per token side: one halving per level after the first."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class LoRAConfig:
    r: NonNegInt = 0
    "LoRA rank on the LLM (peft; ett_ds/models/lora.py); 0: off. With r > 0, in a stage where the LLM trains only the adapters of the LLM train (its base weights, embeddings and LM head stay frozen), beside the stage's other parts; checkpoints hold the adapters, `python -m ett_ds.export` merges them into a plain LLM."
    alpha: PosFloat = 16.0
    "LoRA scaling numerator: the adapter's update is (alpha / r) B A."
    dropout: Decay = 0.0
    "Dropout on the adapters' input in training."
    target_modules: Annotated[list[str], Len(1)] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    "Names of the LLM's nn.Linear layers that get adapters (peft's suffix match; Qwen2/Llama attention and MLP projections by default); never the embeddings or `lm_head`."


@dataclass
class LLMConfig:
    path: str | None = None
    "Local folder of a Hugging Face causal LM (from_pretrained). Nothing is ever downloaded."
    init_config: dict | None = None
    "Instead of `path`: a config dict (with `model_type`) for a randomly initialised LLM, e.g. a tiny Qwen2; dropped (from the run and its saved config) when `path` is set."
    text_tokenizer: str | None = None
    "Local HF tokenizer folder or sentencepiece .model file; defaults to `path`; unset with `init_config`: a sentencepiece model trained from `data.train`'s captions into the run folder (docs/own_data.md)."
    trust_remote_code: bool = False
    "Allow custom modelling code in `path` (off by default)."
    gradient_checkpointing: bool = True
    "Activation checkpointing on the LLM's decoder layers (non-reentrant)."
    attn_implementation: str = "sdpa"
    "Attention backend passed to transformers (PyTorch SDPA by default; no flash-attn)."
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    "LoRA adapters on the LLM (`r` > 0 turns them on)."


@dataclass
class ModelConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    "The vision tokenizer (`type` picks IBQ or VQGAN)."
    llm: LLMConfig = field(default_factory=LLMConfig)
    "The language model."
    projector_depth: PosInt = 2
    "Linear layers in the MLP-GELU projector from code_dim to the LLM hidden size."
    visual_input: Annotated[str, OneOf("embed", "index")] = "embed"
    "`embed` (ETT: codebook embeddings -> projector) or `index` (baseline: ids -> a new embedding table)."


@dataclass
class DataConfig:
    train: str = ""
    "Training shards: a brace pattern (`dir/x-{000000..000099}.tar`), a directory, or several joined by `::`."
    eval: str = ""
    "Held-out shards for evaluation and image logging (optional)."
    image_size: Annotated[list[PosInt], Len(2, 2)] = field(default_factory=lambda: [512, 512])
    "Training resolution as [height, width]; both must be multiples of the tokenizer's downsampling."
    resize_mode: Annotated[str, OneOf(*RESIZE_MODES)] = "crop"
    "How images of another aspect ratio are fitted to `image_size`, in training, `evaluate` and `infer` alike: `crop` (cover, then cut the centre; a random offset in training), `pad` (letterbox on mid grey (128, 128, 128)), or `stretch` (plain resize). One warning line per process when inputs' aspect ratio differs from `image_size`'s by more than 10%."
    max_text_tokens: PosInt = 256
    "Caption tokens kept per sample (longer captions are truncated)."
    max_chat_tokens: PosInt = 2048
    "Text tokens kept per `sft` conversation (the image's tokens not counted; LLaVA's model_max_length): a longer conversation is cut there, and one left with no assistant token is skipped as `too_long`."
    caption_prompts: Annotated[list[str], Len(1)] = field(default_factory=lambda: ["Describe the image."])
    "Prompts placed after the image for captioning; one is drawn per sample."
    chat_template: str = "{role}: {content}\n"
    "Format of one chat turn for `sft` (roles `user` and `assistant`)."
    num_workers: NonNegInt = 2
    "DataLoader worker processes per rank."
    shuffle_buffer: NonNegInt = 1000
    "Samples held in the shuffle buffer (raw bytes); 0 or 1: no shuffling."
    max_error_rate: Fraction = 0.1
    "Stop the run when more than this fraction of samples fail to decode."
    demo_dir: str | None = None
    "If set and `train` matches no shard, build the built-in demo data here first (`python -m data_tools demo`)."


@dataclass
class LossConfig:
    alpha: NonNegFloat = 0.25
    "Weight of L_vq in `ett` (L = L_cap + alpha L_vq); stage `tokenizer` trains on L_vq alone."
    l1_weight: NonNegFloat = 1.0
    "Pixel L1 reconstruction weight."
    perceptual_weight: NonNegFloat = 1.0
    "Perceptual (VGG feature) loss weight; only active when `perceptual_weights` is given."
    perceptual_weights: str | None = None
    "Local path to VGG16 weights (torchvision layout). No download: without it the perceptual term is off."
    quant_weight: NonNegFloat = 1.0
    "Double quantization loss weight."
    entropy_weight: NonNegFloat = 0.05
    "Entropy loss weight (lambda_E)."
    gan_weight: NonNegFloat = 0.1
    "Fixed non-saturating generator loss weight (lambda_G)."
    gan_start_step: NonNegInt = 0
    "Step from which the GAN terms count; before it they run with weight 0 (never a skipped branch)."
    lecam_weight: NonNegFloat = 0.05
    "LeCAM regulariser weight on the discriminator."
    lecam_decay: Decay = 0.999
    "EMA decay of the LeCAM logit anchors."
    disc_channels: PosInt = 64
    "PatchGAN base channels."
    disc_layers: PosInt = 3
    "PatchGAN strided layers."
    disc_lr: PosFloat = 1e-4
    "Discriminator Adam learning rate."
    disc_betas: Annotated[list[Decay], Len(2, 2)] = field(default_factory=lambda: [0.5, 0.9])
    "Discriminator Adam betas."


@dataclass
class OptimConfig:
    lr: PosFloat = 4e-5
    "Peak learning rate of the LLM."
    projector_lr: PosFloat | None = None
    "Peak learning rate of the projector / index table / visual head (default: `lr`)."
    tokenizer_lr: NonNegFloat | None = None
    "Peak learning rate of the vision tokenizer (default: `lr`; 0 keeps it in the graph, receiving gradients, unmoved)."
    betas: Annotated[list[Decay], Len(2, 2)] = field(default_factory=lambda: [0.9, 0.999])
    "Adam betas of the LLM and projector."
    tokenizer_betas: Annotated[list[Decay], Len(2, 2)] = field(default_factory=lambda: [0.5, 0.9])
    "Adam betas of the tokenizer (IBQ's)."
    weight_decay: NonNegFloat = 0.0
    "Decoupled weight decay (AdamW) on matrices; biases and norms never decay."
    warmup_ratio: Decay = 0.03
    "Fraction of `train.max_steps` spent in linear warm-up."
    schedule: Annotated[str, OneOf("cosine", "constant")] = "cosine"
    "`cosine` (decay to `min_lr_ratio` x peak) or `constant` after warm-up."
    min_lr_ratio: Fraction = 0.0
    "Final learning rate as a fraction of the peak."
    grad_clip: NonNegFloat = 1.0
    "Global gradient-norm clipping (0 disables)."


@dataclass
class TrainConfig:
    max_steps: PosInt = 1000
    "Optimizer steps to run."
    micro_batch_size: PosInt = 8
    "Samples per rank per forward."
    global_batch_size: PosInt | None = None
    "Samples per optimizer step; gradient accumulation = global / (micro x ranks). Default: no accumulation."
    ema_decay: Decay = 0.999
    "EMA decay of the tokenizer weights in stage `tokenizer` (0 disables); warmed up as min(decay, (1 + step) / (10 + step)), so a short run's EMA, which its checkpoints hand on, follows the raw weights (0.87 after 60 steps; 0.999 from about step 9,000)."
    prompt_dropout: Fraction = 0.1
    "`t2i`: probability of dropping the prompt (for classifier-free guidance)."
    init_from: str | None = None
    "Checkpoint whose weights initialise this run: a step folder of a previous stage, or its run folder (pinned to its newest complete step at start)."
    resume: str = "auto"
    "`auto` continues from the newest complete checkpoint of this run, `never` starts fresh, or a step folder."
    stop_at: PosInt | None = None
    "Stop this job (after saving) at this step although `max_steps` is later: for jobs with a time limit; the schedule still spans `max_steps` and `resume=auto` continues."
    log_every: PosInt = 10
    "Steps between metric lines."
    save_every: PosInt = 500
    "Steps between checkpoints (the last step is always saved)."
    keep_last: NonNegInt = 2
    "Checkpoints kept (older ones are deleted once a newer one is complete; the newest one known to be good, i.e. followed by a finite step, is never deleted); 0 keeps every one."
    max_bad_steps: PosInt = 5
    "Steps in a row whose loss or gradient norm is not finite (each skipped: no update) before the run stops with an error."
    image_every: NonNegInt = 0
    "Steps between image grids (input vs reconstruction, samples); 0 disables."
    log_tokenizer_dynamics: bool = False
    "Stages that tune the tokenizer with an LLM: log `code_drift` (relative change of the used codebook rows per step) and `grad_ratio` (caption vs alpha L_vq gradient norm at the codebook embeddings) in metrics.jsonl."
    eval_every: NonNegInt = 0
    "Steps between held-out validations on `data.eval` (loss terms, greedy captions with exact match and CER, PSNR, t2i samples; rows with an `eval` key in metrics.jsonl, TensorBoard `eval/...`, grids in images/); 0 disables."
    eval_samples: PosInt = 64
    "Held-out samples (the first ones of `data.eval`, the same at every validation, split across ranks) whose loss terms and PSNR are computed."
    eval_images: NonNegInt = 8
    "Of those, how many are captioned greedily and drawn in the validation grids (stage `t2i`: prompts sampled)."


@dataclass
class EngineConfig:
    ds_config: str = "zero3"
    "DeepSpeed template: a name in ds_configs/ (`zero3`, `zero3_offload`, `zero2`) or a path to your own JSON."
    precision: Annotated[str, OneOf("auto", "autocast_bf16", "fp32")] = "auto"
    "`autocast_bf16` (fp32 params, bf16 compute, fp32 decoder), `fp32`, or `auto` (autocast_bf16 on GPU, fp32 on CPU, where bf16 is emulated and slower)."
    persistence_threshold: NonNegInt | None = None
    "ZeRO-3 `stage3_param_persistence_threshold`; default derived from the LLM hidden size."
    bucket_size: PosInt | None = None
    "ZeRO reduce and prefetch bucket size in elements; default derived from the LLM hidden size."
    fused_optimizer: bool | None = None
    "Use PyTorch's fused AdamW (default: on for CUDA)."
    tf32: bool = True
    "Allow TF32 for fp32 matmuls/convs on GPU (the fp32 decoder is 3x slower without)."


@dataclass
class SamplingConfig:
    caption_max_new_tokens: PosInt = 32
    "Longest caption in tokens (`infer caption`)."
    chat_max_new_tokens: PosInt = 128
    "Longest chat reply in tokens (`infer chat`)."
    temperature: NonNegFloat = 0.0
    "Text sampling temperature (`infer caption`/`chat`); 0 is greedy, the most likely token at every position."
    top_k: NonNegInt = 0
    "Text: sample among the k most likely tokens (0: all)."
    top_p: PosFraction = 1.0
    "Text: nucleus sampling, among the most likely tokens that hold this much probability (1: all)."
    cfg_scale: NonNegFloat = 3.0
    "Text to image: classifier-free guidance scale (`infer generate`, `evaluate --tasks t2i`, the held-out t2i grids of `train.eval_every`); 0 turns guidance off, 1 equals none."
    t2i_temperature: NonNegFloat = 1.0
    "Text to image: sampling temperature of the image codes (0: greedy)."
    t2i_top_k: NonNegInt = 0
    "Text to image: sample among the k most likely codes (0: all)."
    t2i_top_p: PosFraction = 1.0
    "Text to image: nucleus sampling of the codes (1: all)."

    def with_overrides(self, **given) -> SamplingConfig:
        """These settings with every given value that is not None in its place (a command's flags over the
        checkpoint's config)."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def t2i(self) -> dict:  # generation.generate_images' keywords
        return {"cfg_scale": self.cfg_scale, "temperature": self.t2i_temperature, "top_k": self.t2i_top_k,
                "top_p": self.t2i_top_p}


@dataclass
class Config:
    name: str = "ett"
    "Run name; the run folder is `{out_dir}/{name}`."
    stage: Annotated[str, OneOf(*STAGES)] = "ett"
    "What this run trains (see docs/stages.md)."
    seed: NonNegInt = 0
    "Seed of model init, data order and sampling."
    out_dir: str = "runs"
    "Parent folder of run folders."
    model: ModelConfig = field(default_factory=ModelConfig)
    "Model."
    data: DataConfig = field(default_factory=DataConfig)
    "Input pipeline."
    loss: LossConfig = field(default_factory=LossConfig)
    "Tokenizer loss (L_vq) terms."
    optim: OptimConfig = field(default_factory=OptimConfig)
    "Optimisation."
    train: TrainConfig = field(default_factory=TrainConfig)
    "Loop."
    engine: EngineConfig = field(default_factory=EngineConfig)
    "DeepSpeed engine."
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    "Sampling of captions, chat and images: the defaults of `ett_ds.infer` and `ett_ds.evaluate` (a flag overrides), and of the held-out t2i grids in training."

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> "Config":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        m, t = self.model, self.model.tokenizer
        need(not (m.visual_input == "index" and self.stage in ("ett", "t2i")),
             f"stage {self.stage} needs model.visual_input=embed (the index baseline keeps the tokenizer frozen)")
        need(self.stage == "tokenizer" or m.llm.path or m.llm.init_config,
             "model.llm: set `path` (a local HF model folder) or `init_config`")
        if m.llm.path and m.llm.init_config:  # the folder's LLM is built: no init_config in what is saved either
            m.llm.init_config = None
        need(not t.l2_norm_codes or t.type == "vqgan", "model.tokenizer.l2_norm_codes applies to type vqgan only")
        f = t.downsample
        for side in self.data.image_size:
            need(side % f == 0, f"data.image_size: {side} is not a multiple of the tokenizer downsampling {f}")
        need(not self.train.eval_every or bool(self.data.eval), "train.eval_every needs data.eval (held-out shards)")
        return self

    @property
    def downsample(self) -> int:
        return self.model.tokenizer.downsample

    @property
    def num_image_tokens(self) -> int:
        h, w = self.data.image_size
        return (h // self.downsample) * (w // self.downsample)


# keys that moved between sections: an old config names the new home instead of failing with a list of fields
MOVED_KEYS = {"train.alpha": "loss.alpha"}


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path, or a bare name of a built-in recipe (`tiny`, `qwen2.5-1.5b-ibq`)."""
    p = Path(path)
    if p.is_file():
        return p
    for builtin in (RECIPES / f"{p.name}.yaml", RECIPES / p.name):
        if builtin.is_file():
            return builtin
    raise ConfigError(f"config file not found: {path}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe YAML (optional) + ``key.sub=value`` overrides -> a validated Config."""
    tree: dict = {}
    if path is not None:
        with open(resolve_recipe(path)) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
        tree = loaded
    needs = tree.pop("needs", None) or {}  # a recipe's keys the user must set: {key: "VALUE (what it is)"}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        k, v = item.split("=", 1)
        set_path(tree, k.strip(), parse_value(v))
    unset = [f"{k}={what}" for k, what in needs.items() if is_unset(tree, k)]
    if unset:
        raise ConfigError(f"recipe {Path(str(path)).stem} needs: {'; '.join(unset)}")
    return build(Config, tree, moved=MOVED_KEYS).validate()


def config_from_dict(tree: dict) -> Config:
    return build(Config, tree, moved=MOVED_KEYS).validate()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


if __name__ == "__main__":  # python -m ett_ds.config runs the command, config_cli.py (which imports this module)
    runpy.run_module("ett_ds.config_cli", run_name="__main__", alter_sys=True)
