"""``python -m ett_ds.config``: a recipe's resolved config, and the key reference page generated from the tree.

``ett_ds/config.py`` declares the tree; this module is its command line (``config.py`` hands ``python -m
ett_ds.config`` to :func:`main`) and writes the reference (docs/configuration.md) from the fields' docstrings.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from .commandline import run_cli
from .config import Config, load_config, to_dict
from .typed_tree import markdown_table


def markdown_reference(cls=None, prefix: str = "") -> str:
    """The configuration reference (docs/configuration.md): one row per field of the tree, from the field docstrings."""
    return markdown_table(cls or Config, prefix)


REF_START, REF_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def page_with_reference(text: str) -> str:
    """A page's text with the block between the config-reference markers regenerated."""
    head, rest = text.split(REF_START, 1)
    _, tail = rest.split(REF_END, 1)
    return f"{head}{REF_START}\n{markdown_reference()}\n{REF_END}{tail}"


USAGE = """usage: python -m ett_ds.config [RECIPE] [key.sub=value ...] | --markdown | --write PAGE

Prints the resolved config of a recipe (a YAML path or a built-in name: tiny, own, qwen2.5-1.5b-ibq) with the
overrides applied, as YAML: what `python -m ett_ds.train --config RECIPE key.sub=value ...` would run.
  --markdown                 the key reference (docs/configuration.md): every key, type, default
  --write PAGE               regenerate that reference between the page's config-reference markers
                             (docs/configuration.md)"""


def _main(args: list[str]) -> int:
    if {"-h", "--help"} & set(args):
        print(USAGE)
    elif "--markdown" in args:
        print(markdown_reference())
    elif "--write" in args:
        page = Path(args[args.index("--write") + 1])
        page.write_text(page_with_reference(page.read_text()))
    else:
        cfg = load_config(args[0] if args and "=" not in args[0] else None, [a for a in args if "=" in a])
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, hint=" (python -m ett_ds.config --help)")


if __name__ == "__main__":
    sys.exit(main())
