"""Issue #14 item 6: no deprecated transformers call, readable types in the config reference, defaults in --help."""
import argparse
import re
import warnings

from data_tools.cli import build_parser
from data_tools.cli import main as data_tools


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_llm_activation_checkpointing_without_deprecated_call_and_non_reentrant():
    from ett_ds.config import load_config
    from ett_ds.models.llm import build_llm
    from tests.tiny import SHRINK
    cfg = load_config("tiny", [*SHRINK, "model.llm.gradient_checkpointing=true"]).model.llm
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = build_llm(cfg)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and "checkpointing" in str(w.message)]
    assert deprecated == []
    assert llm.is_activation_checkpointing
    layers = [m for m in llm.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False} for m in layers)


def test_config_reference_names_types_as_written():
    from ett_ds.config_cli import markdown_reference
    table = markdown_reference()
    assert "<class" not in table and "typing." not in table
    assert "| `name` | str | `'ett'` |" in table
    assert "| `seed` | int | `0` |" in table
    assert "| `model.tokenizer.ch_mult` | list[int] |" in table
    assert "| `model.tokenizer.codebook_init_std` | float or None |" in table


def test_every_data_tools_option_with_a_default_says_it_in_help():
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        fmt = sub._get_formatter()
        for a in sub._actions:
            if a.option_strings and all(a.default is not v for v in (None, False, argparse.SUPPRESS)):
                if "default" not in fmt._get_help_string(a):
                    missing.append(f"{name} {a.option_strings[0]}")
    assert missing == []


def test_help_shows_the_actual_defaults(capsys):
    expected = {"shard": ["--samples-per-shard SAMPLES_PER_SHARD samples per shard (default: 1000)",
                          "(default: keep)", "(default: 128000000)"],
                "llava": ["(default: llava)", "(default: the JSON's folder)"],
                "synth-text": ["(default: 32x128)", "(default: 12.0)"],
                "demo": ["(default: numbers)"],
                "instruct": ["seed of the question choice (default: 0)", "(images of text) (default: describe)"]}
    for cmd, needles in expected.items():
        try:
            data_tools([cmd, "--help"])
        except SystemExit as e:
            assert e.code == 0
        out = _flat(capsys.readouterr().out)
        for n in needles:
            assert n in out, (cmd, n, out)
        assert "(default: None)" not in out and "(default: False)" not in out


def test_evaluate_help_shows_defaults():
    from ett_ds.evaluate import build_parser as evaluate_parser
    out = _flat(evaluate_parser().format_help())
    for n in ("--batch-size BATCH_SIZE images per forward pass (per rank) (default: 16)", "(default: recon,caption)",
              "off (default: the checkpoint's sampling.cfg_scale)",
              "Answer with a single word or number."):
        assert n in out, n
    assert "(default: None)" not in out
