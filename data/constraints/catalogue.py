"""The catalogue: which types conflict, which are held out, and sampling, checking and rewriting sets of rules."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from . import rules  # noqa: F401  (registers every type)
from .base import INTRODUCERS, REGISTRY, SPLITS, Constraint, ConstraintType, Verdict, get_type

CATALOGUE: dict[str, ConstraintType] = REGISTRY

# Sets of types of which at most one may be in force: each pair in a set conflicts.
_EXCLUSIVE: tuple[frozenset[str], ...] = tuple(
    map(
        frozenset,
        (
            # the case of the whole reply (user_lowercase repeats lowercase: one rule stated twice is pointless)
            {"lowercase", "uppercase", "user_lowercase"},
            {"lowercase", "capitalised_sentences"},
            {"user_lowercase", "capitalised_sentences"},
            {"uppercase", "no_shouting"},
            # what the reply ends with
            {"end_with_phrase", "end_with_question", "user_end_with"},
            # word budgets that contradict or repeat each other
            {"max_words", "min_words", "user_max_words"},
            {"min_words", "max_sentences"},  # padding adds sentences
            {"no_digits", "user_no_digits"},
            # shapes of the whole reply
            {"bullet_list", "sections", "json_object", "quoted"},
        ),
    )
)

# Single pairs that cannot hold together.
_PAIRS: tuple[tuple[str, str], ...] = (
    ("end_with_question", "no_question_marks"),
    ("sections", "no_digits"),  # "SECTION 1" is a digit
    ("sections", "user_no_digits"),
    ("sections", "no_shouting"),  # "SECTION" is an all-caps word
    ("sections", "max_sentences"),  # every header line counts as a sentence
    ("bullet_list", "max_sentences"),  # every item counts as one
    # a JSON object starts with "{" and ends with "}", and its "reply" key is lowercase
    *(
        ("json_object", other)
        for other in (
            "title",
            "postscript",
            "start_with_word",
            "end_with_phrase",
            "end_with_question",
            "user_end_with",
            "uppercase",
            "capitalised_sentences",
        )
    ),
    # a quoted reply starts and ends with a quote
    *(
        ("quoted", other)
        for other in ("title", "start_with_word", "end_with_phrase", "end_with_question", "user_end_with")
    ),
    ("title", "start_with_word"),  # both claim the first line
)

# Never used to build training data, so evaluation can report seen and unseen types.
# Fixed (not sampled) so every run and every report agrees; one or two per family, so each
# unseen type has seen relatives (e.g. no_em_dashes next to no_commas) and the seen/unseen
# gap measures generalisation to new rules rather than to new families.
HELD_OUT_TYPES: frozenset[str] = frozenset(
    {
        "no_shouting",  # case
        "end_with_question",  # start_end
        "no_em_dashes",  # punctuation
        "max_words_per_sentence",  # length
        "keyword_frequency",  # keywords
        "title",  # format
        "no_markdown",  # format
        "persona_catchphrase",  # persona
        "no_system_prompt_leak",  # secrecy
        "user_no_emoji",  # user_rule
        "user_vegetarian",  # user_rule
    }
)


def _install_conflicts() -> None:
    table: dict[str, set[str]] = {name: set() for name in REGISTRY}
    pairs = [pair for group in _EXCLUSIVE for pair in combinations(sorted(group), 2)] + list(_PAIRS)
    for a, b in pairs:
        for name in (a, b):
            if name not in REGISTRY:
                raise ValueError(f"conflict table names unknown constraint type {name!r}")
        if a == b:
            raise ValueError(f"conflict table pairs {a!r} with itself")
        table[a].add(b)
        table[b].add(a)
    for name, others in table.items():
        REGISTRY[name].conflicts = frozenset(others)
    unknown = HELD_OUT_TYPES - set(REGISTRY)
    if unknown:
        raise ValueError(f"HELD_OUT_TYPES names unknown constraint types {sorted(unknown)}")


_install_conflicts()


# --------------------------------------------------------------------------- making and sampling


def make_constraint(type_name: str, rng: random.Random, *, split: str) -> Constraint:
    """An instance of `type_name` with sampled parameters and a phrasing from `split` ("train" or "eval")."""
    constraint_type = get_type(type_name)
    phrasings = constraint_type.phrasings(split)
    params = constraint_type.sample_params(rng)
    phrasing = rng.choice(phrasings)
    return Constraint(type_name, params, constraint_type.render(phrasing, params), split)


def compatible(names: Sequence[str]) -> bool:
    """Whether the types are distinct and pairwise free of conflicts."""
    return len(set(names)) == len(names) and not any(
        b in get_type(a).conflicts for a, b in combinations(names, 2)
    )


def sample_constraints(
    rng: random.Random, k: int, *, split: str, held_out: bool, introduced_by: str | None = None
) -> list[Constraint]:
    """`k` constraints of distinct, mutually compatible types.

    held_out=False draws from the seen types only, held_out=True from HELD_OUT_TYPES only;
    `introduced_by` ("system" or "user") narrows the pool further. Deterministic given `rng`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if introduced_by is not None and introduced_by not in INTRODUCERS:
        raise ValueError(f"introduced_by must be 'system', 'user' or None, got {introduced_by!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = sorted(
        name
        for name, t in REGISTRY.items()
        if (name in HELD_OUT_TYPES) == held_out
        and (introduced_by is None or t.introduced_by == introduced_by)
    )
    # Greedy draws in random order; a few retries find a compatible set whenever one is likely to exist.
    for _ in range(50):
        order = rng.sample(pool, len(pool))
        chosen: list[str] = []
        for name in order:
            if len(chosen) == k:
                break
            if all(name not in REGISTRY[c].conflicts for c in chosen):
                chosen.append(name)
        if len(chosen) == k:
            return [make_constraint(name, rng, split=split) for name in chosen]
    which = f"{'held-out' if held_out else 'seen'} types" + (
        f" stated by the {introduced_by}" if introduced_by else ""
    )
    raise ValueError(f"cannot draw {k} compatible constraints from the {len(pool)} {which}; ask for fewer")


# --------------------------------------------------------------------------- checking and rewriting


def check_all(reply: str, constraints: Sequence[Constraint]) -> list[Verdict]:
    """One verdict per constraint, in order."""
    return [c.check(reply) for c in constraints]


_ATTEMPTS = 8  # rounds of tightening budgets (each is a fresh rewrite of the original reply)
_PASSES = 3  # sweeps over the rules within one attempt, for rules whose insertions affect each other


def rewrite_all(reply: str, constraints: Sequence[Constraint]) -> str | None:
    """A reply that passes every strict check, made from `reply` with small edits; None if none was found.

    Rewrites run by stage (see base.STAGE_*): removals, insertions, length, structure, start and
    end phrases, characters, case, wrappers. When other rules' insertions push a word or
    sentence budget over, the budget rule is re-run with a tighter working budget.
    """
    ordered = sorted(enumerate(constraints), key=lambda ic: (ic[1].type.stage, ic[0]))
    working: dict[int, Mapping[str, Any]] = {i: c.params for i, c in ordered}
    for _ in range(_ATTEMPTS):
        text = reply
        failing: list[tuple[int, Constraint]] = []
        for _ in range(_PASSES):
            for i, c in ordered:
                rewritten = c.type.rewrite(text, working[i])
                if rewritten is None:
                    return None
                text = rewritten
            failing = [(i, c) for i, c in ordered if not c.type.check_strict(text, c.params)[0]]
            if not failing:
                return text
        tightened = False
        for i, c in failing:
            new = c.type.tighten(working[i], c.params, text)
            if new is not None:
                working[i] = new
                tightened = True
        if not tightened:
            return None
    return None
