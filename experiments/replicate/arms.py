"""Named arm records: what each arm of the ablation trains, and its run names per seed."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One row of the paper's Tab. 4/5: how the LLM sees the image and whether (and how fast) the tokenizer moves.

    ``alpha`` and ``tok_lr_ratio`` (stage-2 tokenizer lr / LLM lr) are set only for ETT arms (``stage="ett"``);
    understanding-only is ETT with ``alpha=0``. ``llm_init`` is ``random`` or ``text`` (the text-pretrained LLM).
    """
    name: str
    visual_input: str = "embed"          # embed | index
    stage: str = "frozen"                # frozen | ett
    alpha: float | None = None
    tok_lr_ratio: float | None = None
    llm_init: str = "random"             # random | text

    @property
    def tuned(self) -> bool:
        return self.stage == "ett"

    @property
    def align(self) -> str:
        """Stage-1 run shared by every arm with the same visual input and LLM initialisation."""
        return f"align_{self.visual_input}" + ("_text" if self.llm_init == "text" else "")

    def run(self, seed: int) -> str:
        return f"{self.name}_s{seed}"

    def align_run(self, seed: int) -> str:
        return f"{self.align}_s{seed}"

    @property
    def label(self) -> str:
        if not self.tuned:
            base = f"{self.visual_input}, tokenizer frozen"
        elif self.alpha == 0:
            base = f"understanding-only (α 0, tok lr {_r(self.tok_lr_ratio)}× LLM)"
        else:
            base = f"ETT α {self.alpha:g}, tok lr {_r(self.tok_lr_ratio)}× LLM"
        return base + (", text-pretrained LLM" if self.llm_init == "text" else "")


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def frozen(llm_init: str = "random") -> Arm:
    return Arm(("text_" if llm_init == "text" else "") + "frozen", llm_init=llm_init)


def index() -> Arm:
    return Arm("index", visual_input="index")


def ett(alpha: float, ratio: float, llm_init: str = "random") -> Arm:
    pre = "text_" if llm_init == "text" else ""
    name = f"{pre}und_only_r{ratio:g}" if alpha == 0 else f"{pre}ett_a{alpha:g}_r{ratio:g}"
    return Arm(name, stage="ett", alpha=float(alpha), tok_lr_ratio=float(ratio), llm_init=llm_init)


def grid(alphas: list[float], ratios: list[float], extra: list[tuple[float, float]] = ()) -> list[Arm]:
    """The (alpha, tokenizer-lr ratio) surface, ratios outermost, then the ``extra`` (alpha, ratio) cells."""
    cells = [ett(a, r) for r in ratios for a in alphas]
    return cells + [ett(a, r) for a, r in extra if ett(a, r) not in cells]


def final_arms(chosen: tuple[float, float], paper_alpha: float, und_ratios: list[float] = (),
               cells: list[tuple[float, float]] = (), *, with_index: bool, text: bool, text_full: bool = False,
               random_all: bool = True) -> list[Arm]:
    """The reported arms: frozen, understanding-only (at the chosen ratio, then at each of ``und_ratios``), ETT at
    the chosen setting, at the paper's alpha (same ratio) and at each (alpha, ratio) of ``cells``; with ``text``,
    frozen and the chosen ETT again on the text-pretrained LLM (``text_full``: every one of those arms but index).
    ``random_all=False`` keeps only frozen of the random-LLM arms."""
    alpha, ratio = chosen

    def tuned(llm: str) -> list[Arm]:
        arms = [*(ett(0.0, r, llm) for r in dict.fromkeys([ratio, *und_ratios])), ett(alpha, ratio, llm)]
        for a, r in [(paper_alpha, ratio), *cells]:
            if ett(a, r, llm) not in arms:
                arms.append(ett(a, r, llm))
        return arms

    out = [frozen(), *(tuned("random") if random_all else [])]
    if with_index and random_all:
        out.insert(0, index())
    if text:
        out += [frozen("text"), *(tuned("text") if text_full else [ett(alpha, ratio, "text")])]
    return out
