"""The typed config tree: recipes, overrides, one-line errors, and docs generated from field docstrings."""
import subprocess
import sys

import pytest

from ett_ds.config import Config, ConfigError, field_docs, load_config
from ett_ds.config_cli import markdown_reference


def test_builtin_recipes_load_and_validate():
    tiny = load_config("tiny")
    assert tiny.stage == "ett" and tiny.num_image_tokens == 32  # 32x64 at 8x downsampling
    paper = load_config("qwen2.5-1.5b-ibq")
    assert paper.model.tokenizer.codebook_size == 131072 and paper.loss.alpha == 0.25
    assert paper.train.global_batch_size == 1024 and paper.data.image_size == [512, 512]


def test_overrides_are_typed():
    cfg = load_config("tiny", ["stage=align", "optim.lr=3e-3", "train.max_steps=7", "data.image_size=[16,64]"])
    assert cfg.stage == "align" and cfg.optim.lr == 0.003 and cfg.train.max_steps == 7
    assert cfg.data.image_size == [16, 64]


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("stage=bogus", "stage: 'bogus' is not one of"),
    ("model.tokenizer.type=magvit", "model.tokenizer.type: 'magvit' is not one of ibq, vqgan"),
    ("train.max_steps=many", "train.max_steps: expected an integer"),
    ("engine.tf32=maybe", "engine.tf32: expected true/false"),
    ("data.image_size=[30,64]", "not a multiple of the tokenizer downsampling"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
    ("train.alpha=0.1", "config key 'train.alpha' is now 'loss.alpha'"),
    ("noequals", "must look like key.sub=value"),
])
def test_bad_config_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("tiny", [override])
    assert "\n" not in str(e.value)


def test_tokenizer_kinds_the_config_allows_are_the_registry():
    """config.py declares the allowed kinds without importing the tokenizers; the registry checks it at build time."""
    import typing

    from ett_ds.config import TOKENIZER_TYPES, TokenizerConfig
    from ett_ds.tokenizers import REGISTRY
    (one_of,) = typing.get_args(typing.get_type_hints(TokenizerConfig, include_extras=True)["type"])[1:]
    assert set(REGISTRY) == set(TOKENIZER_TYPES) == set(one_of.choices)


def test_stages_say_what_each_one_trains_in_pipeline_order():
    """stages.py is the one home of the stage list: the config accepts exactly its names, in pipeline order, and
    each spec says which parts train and which terms run (the paper's stage 1 = align, 2 = ett, 3 = sft / t2i)."""
    import typing

    from ett_ds.config import Config, ConfigError, config_from_dict
    from ett_ds.stages import STAGE_SPECS, STAGES
    (one_of,) = typing.get_args(typing.get_type_hints(Config, include_extras=True)["stage"])[1:]
    assert STAGES == ("tokenizer", "align", "ett", "frozen", "sft", "t2i")
    assert STAGE_SPECS["align"].trains == {"projector", "index_embed"}  # stage 1: projector only
    assert {"tokenizer", "projector", "llm"} == STAGE_SPECS["ett"].trains and STAGE_SPECS["ett"].reconstruct
    assert "tokenizer" not in STAGE_SPECS["sft"].trains | STAGE_SPECS["t2i"].trains  # stage 3: tokenizer frozen
    assert [s for s in STAGES if STAGE_SPECS[s].caption] == ["align", "ett", "frozen", "sft"]
    assert [s for s in STAGES if not STAGE_SPECS[s].uses_llm] == ["tokenizer"]
    assert tuple(one_of.choices) == STAGES
    with pytest.raises(ConfigError, match="stage"):
        config_from_dict({"stage": "pretrain"})
    assert Config().stage in STAGES


@pytest.mark.slow
def test_cli_reports_config_error_in_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "ett_ds.train", "--config", "tiny", "train.bogus=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown config key 'train.bogus' (valid: " +
                                             r.stderr.split("(valid: ")[1].strip()]
    r = subprocess.run([sys.executable, "-m", "ett_ds.train", "--config", "nope.yaml"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: config file not found: nope.yaml"


def test_every_field_is_documented_and_reference_lists_it():
    import dataclasses
    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
                sub = f.default_factory if isinstance(f.default_factory, type) else None
                if sub is not None and dataclasses.is_dataclass(sub):
                    walk(sub)
    walk(Config)
    md = markdown_reference()
    assert "| `loss.alpha` |" in md and "| `model.tokenizer.codebook_size` |" in md


def test_the_configuration_reference_page_is_generated_from_the_code():
    from pathlib import Path

    from ett_ds.config_cli import page_with_reference
    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "configuration.md").read_text()
    assert page == page_with_reference(page), \
        "docs/configuration.md is stale: run python -m ett_ds.config --write docs/configuration.md"
    assert "docs/configuration.md" in (repo / "README.md").read_text()  # the front door links it
