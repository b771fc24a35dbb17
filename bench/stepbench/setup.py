"""What every variant shares: the variant names, presets, a stage's config, a text tokenizer, one fixed batch."""
from __future__ import annotations

from pathlib import Path

VARIANTS = ("matmul", "loader", "reference", "ett", "align", "frozen")
ENGINE_VARIANTS = ("ett", "align", "frozen")
TIMED = ("reference",) + ENGINE_VARIANTS

# The Qwen2.5-1.5B shape, randomly initialised (nothing is downloaded or loaded).
QWEN25_15B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
              "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6}

def flow_yaml(d: dict) -> str:
    """One-line YAML for an override value (JSON would turn 1e-6 into a string under YAML 1.1)."""
    import yaml
    return yaml.safe_dump(d, default_flow_style=True, width=1 << 16).strip()


PRESETS = {
    # CI smoke mode: the tiny recipe, seconds on a CPU.
    "cpu-tiny": {"recipe": "tiny", "seq_len": None, "micro_batch": 4, "steps": 3, "warmup": 1, "matmul_n": 512,
                 "loader_samples": 96, "loader_batches": 6,
                 "overrides": ["train.micro_batch_size=4", "data.num_workers=1", "data.shuffle_buffer=32"]},
    # The GPU setting: Qwen2.5-1.5B shape + IBQ-shaped tokenizer (66M with 2 res blocks; override
    # model.tokenizer.num_res_blocks=4 for IBQ's 97M), K = 131,072 x 256, 256^2 images (256 visual tokens) + text
    # to 1024 tokens, micro-batch 8.
    "h200-1.5b": {"recipe": "qwen2.5-1.5b-ibq", "seq_len": 1024, "micro_batch": 8, "steps": 8, "warmup": 3,
                  "matmul_n": 8192, "loader_samples": 512, "loader_batches": 24,
                  "overrides": ["model.llm.path=null", "model.llm.init_config=" + flow_yaml(QWEN25_15B),
                                "model.llm.gradient_checkpointing=true", "model.tokenizer.checkpoint=null",
                                "model.tokenizer.num_res_blocks=2", "model.tokenizer.codebook_size=131072",
                                "model.tokenizer.code_dim=256", "data.image_size=[256,256]",
                                "data.num_workers=8", "data.shuffle_buffer=64"]},
    # The recipe as it is (its paths must exist; a missing text tokenizer is replaced by one trained here).
    "none": {"recipe": None, "seq_len": None, "micro_batch": None, "steps": 5, "warmup": 2, "matmul_n": None,
             "loader_samples": 256, "loader_batches": 12, "overrides": []},
}

WORDS = ("the quick brown fox jumps over a lazy dog while seven red birds sing near the old stone bridge under a "
         "pale moon and green hills roll toward the blue river where children read books about ships stars trees "
         "cats maps clocks bread cheese apples gardens winter summer").split()



def train_text_tokenizer(folder: Path) -> Path:
    """A small sentencepiece model trained on the spot (byte fallback: any text encodes); its ids fit any LLM vocab."""
    import random

    import sentencepiece as spm
    model = folder / "bench_spm.model"
    if model.is_file():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "bench_spm"),
                                   vocab_size=400, model_type="unigram", character_coverage=1.0, byte_fallback=True,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2)
    return model


class Setup:
    def __init__(self, args, workdir: Path):
        from ett_ds import config as C
        self.args, self.workdir = args, workdir
        preset = PRESETS[args.preset]
        self.preset = preset
        self.recipe = args.recipe or preset["recipe"]
        if self.recipe is None:
            raise SystemExit("error: --preset none needs --recipe")
        self.micro_batch = args.micro_batch or preset["micro_batch"]
        self.seq_len = args.seq_len or preset["seq_len"]
        base = list(preset["overrides"])
        if self.micro_batch:
            base.append(f"train.micro_batch_size={self.micro_batch}")
        base += [f"out_dir={workdir / 'runs'}", "data.demo_dir=null", "train.global_batch_size=null",
                 "train.max_steps=1000000", "optim.warmup_ratio=0", "train.log_every=1000000",
                 "train.image_every=0", f"data.train={workdir / 'shards'}"]
        probe = C.load_config(self.recipe, base + list(args.overrides))
        text_path = probe.model.llm.text_tokenizer or probe.model.llm.path
        if not text_path or not Path(text_path).exists():
            text_path = str(train_text_tokenizer(workdir))
            base.append(f"model.llm.text_tokenizer={text_path}")
        self.base = base
        cfg = self.config("ett")
        self.micro_batch = cfg.train.micro_batch_size
        from ett_ds.data.batch import Batcher
        from ett_ds.data.text import TextTokenizer
        self.text = TextTokenizer(cfg.model.llm.text_tokenizer or cfg.model.llm.path, cfg.model.llm.trust_remote_code)
        prefix = len(Batcher(cfg, self.text, train=False).caption_prompt())
        if self.seq_len:
            self.max_text = self.seq_len - prefix - 1  # + eos
            if self.max_text < 1:
                raise SystemExit(f"error: --seq-len {self.seq_len} leaves no room for text after {prefix} tokens")
        else:
            self.max_text = cfg.data.max_text_tokens
        self.caption_tokens = self.max_text

    def config(self, stage: str):
        from ett_ds import config as C
        cfg = C.load_config(self.recipe, self.base + list(self.args.overrides) + [f"stage={stage}"])
        if hasattr(self, "max_text"):
            cfg.data.max_text_tokens = self.max_text
        return cfg

    def batch(self, cfg, device) -> dict:
        """Random pixels and random captions long enough to fill max_text_tokens: one fixed, pad-free shape."""
        import random

        import torch

        from ett_ds.data.batch import Batcher
        rng = random.Random(1)
        g = torch.Generator().manual_seed(1)
        b = Batcher(cfg, self.text, train=False)
        h, w = cfg.data.image_size
        examples = []
        for _ in range(cfg.train.micro_batch_size):
            words: list[str] = []
            while len(self.text.encode(" ".join(words))) < self.max_text:
                words += [rng.choice(WORDS) for _ in range(16)]
            caption = " ".join(words)
            ids, labels = b.caption_sequence(caption)
            examples.append({"pixels": torch.rand(3, h, w, generator=g) * 2 - 1, "text": caption, "gen": False,
                             "input_ids": ids, "labels": labels})
        batch = b.collate(examples)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


