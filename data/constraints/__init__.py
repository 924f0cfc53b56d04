"""The constraint catalogue: verifiable rules a chat model must keep in every reply of a dialogue.

Used by the dataset builders (system prompts carrying 1-3 rules, corpus replies
made to comply with `rewrite_all`) and by the evaluator (`check_all`, strict and
loose). Everything is deterministic and offline; the package imports nothing
from `dialogrl.training` or `dialogrl.evaluation`.

    >>> import random
    >>> rules = sample_constraints(random.Random(0), 2, split="train", held_out=False)
    >>> reply = rewrite_all("Sure, here you go.", rules)
    >>> all(v.strict for v in check_all(reply, rules))
    True
"""

from __future__ import annotations

from .base import FAMILIES, Constraint, ConstraintType, Verdict, get_type, loose_variants, strip_markdown
from .catalogue import (
    CATALOGUE,
    HELD_OUT_TYPES,
    check_all,
    compatible,
    make_constraint,
    rewrite_all,
    sample_constraints,
)

__all__ = [
    "CATALOGUE",
    "FAMILIES",
    "HELD_OUT_TYPES",
    "Constraint",
    "ConstraintType",
    "Verdict",
    "check_all",
    "compatible",
    "get_type",
    "loose_variants",
    "make_constraint",
    "rewrite_all",
    "sample_constraints",
    "strip_markdown",
]
