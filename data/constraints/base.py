"""The core of the constraint catalogue: `Verdict`, `ConstraintType`, `Constraint`, IFEval-style loosening.

A `ConstraintType` is a rule kind ("all lowercase", "at most N words"); a
`Constraint` is one instance of it, with sampled parameters and the instruction
text shown to the model. Types register themselves in `REGISTRY` when their
family module is imported; the package `__init__` imports every family, so the
registry is complete whenever any part of the package is in use.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FAMILIES: tuple[str, ...] = (
    "case",
    "start_end",
    "punctuation",
    "length",
    "keywords",
    "format",
    "persona",
    "secrecy",
    "user_rule",
)
SPLITS: tuple[str, ...] = ("train", "eval")
INTRODUCERS: tuple[str, ...] = ("system", "user")

# Rewrite stages, in the order `rewrite_all` applies them. Removals come first so that
# later insertions are not undone; length next, so that truncation cannot cut off a
# required word, a list or a postscript (insertions that overrun a budget are handled by
# tightening it, see `ConstraintType.tighten`); start/end phrases after structure so that
# they sit outside it; character-level rules and case after every insertion, so inserted
# text complies too; wrappers (quotes, JSON) last, because nothing may be written outside them.
STAGE_REMOVE = 0
STAGE_LENGTH = 1
STAGE_ADD = 2
STAGE_STRUCTURE = 3
STAGE_EDGES = 4
STAGE_CHARACTERS = 5
STAGE_CASE = 6
STAGE_WRAP = 7

REGISTRY: dict[str, ConstraintType] = {}

_SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


@dataclass(frozen=True)
class Verdict:
    """How one reply fares against one constraint."""

    strict: bool  # the reply as written complies
    loose: bool  # it complies after IFEval loosening (markdown stripped, first/last line dropped)
    score: float  # in [0, 1]; 1.0 when strict, partial credit where the rule has a natural measure

    def __post_init__(self) -> None:
        if self.strict and not self.loose:
            raise ValueError("a strict pass is also a loose pass: got strict=True, loose=False")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score}")
        if self.strict and self.score != 1.0:
            raise ValueError(f"a strict pass scores 1.0, got {self.score}")


class ConstraintType:
    """One rule kind. Subclasses implement `check_strict` and `rewrite` (and `sample_params` if parametrised).

    Instances carry the naming: the same behaviour can be registered twice, e.g.
    `lowercase` (stated in the system prompt) and `user_lowercase` (asked for by the user).
    """

    stage: int = STAGE_ADD  # where `rewrite_all` applies this type's rewrite (see STAGE_*)

    def __init__(
        self,
        name: str,
        *,
        family: str,
        train_phrasings: tuple[str, ...],
        eval_phrasings: tuple[str, ...],
        introduced_by: str = "system",
    ) -> None:
        if not _SNAKE.fullmatch(name):
            raise ValueError(f"constraint type name {name!r} must be snake_case")
        if family not in FAMILIES:
            raise ValueError(f"{name}: family {family!r} is not one of {', '.join(FAMILIES)}")
        if introduced_by not in INTRODUCERS:
            raise ValueError(f"{name}: introduced_by must be 'system' or 'user', got {introduced_by!r}")
        if len(train_phrasings) < 2 or len(eval_phrasings) < 2:
            raise ValueError(f"{name}: needs at least two train and two eval phrasings")
        if set(train_phrasings) & set(eval_phrasings):
            raise ValueError(f"{name}: a phrasing is in both the train and the eval set")
        self.name = name
        self.family = family
        self.introduced_by = introduced_by
        self.train_phrasings = tuple(train_phrasings)
        self.eval_phrasings = tuple(eval_phrasings)
        # Filled in by the catalogue from one central table, so that symmetry is easy to review.
        self.conflicts: frozenset[str] = frozenset()
        self._param_names: frozenset[str] | None = None

    # ------------------------------------------------------------------ to override

    def sample_params(self, rng: random.Random) -> dict[str, Any]:
        """JSON-serialisable parameters for one instance (none by default)."""
        return {}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        """(passes, score) for the reply exactly as written. Must not raise on any string."""
        raise NotImplementedError

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str | None:
        """A minimally changed reply that passes `check_strict`; returns `reply` itself if it passes already."""
        raise NotImplementedError

    def tighten(
        self, working: Mapping[str, Any], params: Mapping[str, Any], composed: str
    ) -> dict[str, Any] | None:
        """Parameters to rewrite with when other rules' insertions pushed `composed` past this rule.

        Only budget-like rules (word and sentence limits) can do anything: they
        shrink their working budget by the overshoot. `working` is the budget the
        last attempt used, `params` the real one. None means "nothing to adjust".
        """
        return None

    # ------------------------------------------------------------------ shared

    @property
    def param_names(self) -> frozenset[str]:
        if self._param_names is None:
            self._param_names = frozenset(self.sample_params(random.Random(0)))
        return self._param_names

    def phrasings(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.train_phrasings if split == "train" else self.eval_phrasings

    def render(self, phrasing: str, params: Mapping[str, Any]) -> str:
        return phrasing.format(**params)

    def __repr__(self) -> str:
        return f"<ConstraintType {self.name} ({self.family}, {self.introduced_by})>"


def placeholders(phrasing: str) -> set[str]:
    """The `{name}` fields of a phrasing."""
    return {fname for _, fname, _, _ in string.Formatter().parse(phrasing) if fname}


def register(constraint_type: ConstraintType) -> ConstraintType:
    if constraint_type.name in REGISTRY:
        raise ValueError(f"constraint type {constraint_type.name!r} is registered twice")
    missing = {
        (phrasing, name)
        for phrasing in constraint_type.train_phrasings + constraint_type.eval_phrasings
        for name in placeholders(phrasing) - constraint_type.param_names
    }
    if missing:
        raise ValueError(
            f"{constraint_type.name}: phrasing placeholders not filled by sample_params: {sorted(missing)}"
        )
    REGISTRY[constraint_type.name] = constraint_type
    return constraint_type


def get_type(name: str) -> ConstraintType:
    """The registered type called `name`; an unknown name raises KeyError listing close names."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), REGISTRY, n=4, cutoff=0.5)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else f"; known types: {', '.join(sorted(REGISTRY))}"
        )
        raise KeyError(f"unknown constraint type {name!r}{hint}") from None


# --------------------------------------------------------------------------- loosening

_MARKDOWN = re.compile(r"\*+|__|`+")


def strip_markdown(text: str) -> str:
    """Remove markdown emphasis and code marks (`*`, `**`, `__`, backticks), as IFEval's loose mode does."""
    return _MARKDOWN.sub("", text)


def loose_variants(reply: str) -> list[str]:
    """The reply as is, without its first line, last line or both, each also with markdown stripped.

    The first element is the reply itself (whitespace-stripped); duplicates are dropped, and so
    are empty variants: unlike IFEval, a one-line reply must not pass every "must not" rule by
    losing its only line (most replies are one line, so that would inflate loose numbers).
    """
    lines = reply.split("\n")
    bases = [reply, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    variants: list[str] = []
    for base in bases:
        for variant in (base.strip(), strip_markdown(base).strip()):
            if variant and variant not in variants:
                variants.append(variant)
    return variants


# --------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class Constraint:
    """One rule in force: a type, its parameters and the instruction text the model saw."""

    type_name: str
    params: dict[str, Any] = field(hash=False)
    instruction: str
    phrasing_split: str  # "train" or "eval": which phrasing set `instruction` came from

    def __post_init__(self) -> None:
        constraint_type = get_type(self.type_name)
        if self.phrasing_split not in SPLITS:
            raise ValueError(
                f"{self.type_name}: phrasing_split must be 'train' or 'eval', got {self.phrasing_split!r}"
            )
        if not isinstance(self.params, Mapping):
            raise TypeError(f"{self.type_name}: params must be a mapping, got {type(self.params).__name__}")
        try:
            # A private, JSON-clean copy: the caller's dict cannot change a frozen constraint later.
            params = json.loads(json.dumps(dict(self.params)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.type_name}: params must be JSON-serialisable ({err})") from None
        if set(params) != constraint_type.param_names:
            raise ValueError(
                f"{self.type_name}: params have keys {sorted(params)}, expected {sorted(constraint_type.param_names)}"
            )
        object.__setattr__(self, "params", params)

    @property
    def type(self) -> ConstraintType:
        return get_type(self.type_name)

    def check(self, reply: str) -> Verdict:
        """Strict and loose verdicts and a score for one reply."""
        if not isinstance(reply, str):
            raise TypeError(f"a reply must be a string, got {type(reply).__name__}")
        constraint_type = self.type
        strict, score = constraint_type.check_strict(reply, self.params)
        if strict:
            return Verdict(True, True, 1.0)
        loose = any(constraint_type.check_strict(v, self.params)[0] for v in loose_variants(reply))
        return Verdict(False, loose, min(1.0, max(0.0, float(score))))

    def rewrite(self, reply: str) -> str | None:
        return self.type.rewrite(reply, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type_name": self.type_name,
            "params": dict(self.params),
            "instruction": self.instruction,
            "phrasing_split": self.phrasing_split,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Constraint:
        expected = {"type_name", "params", "instruction", "phrasing_split"}
        if set(data) != expected:
            raise ValueError(
                f"a constraint record needs exactly the keys {sorted(expected)}; "
                f"missing {sorted(expected - set(data))}, unexpected {sorted(set(data) - expected)}"
            )
        return cls(data["type_name"], dict(data["params"]), data["instruction"], data["phrasing_split"])
