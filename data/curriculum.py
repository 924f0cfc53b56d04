"""A floor on how many SFT dialogues teach each seen rule type.

Rules are drawn at random per window, so a type that is often incompatible with
others, or that fails its rewrite often, can end up in a handful of dialogues and
never be learned. `build_with_quota` builds the set in chunks of windows; while a
seen type has fewer than `minimum` built dialogues, the next windows are given
the short types, several to a window (their other rules drawn as usual), until
every type has its floor and the set its size, or the corpus runs out of
windows. Held-out types never come in.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dialogrl.data import constraints as catalogue
from dialogrl.data.builders import DialogueConfig, Window, with_rules

SEEN_TYPES: tuple[str, ...] = tuple(sorted(set(catalogue.CATALOGUE) - catalogue.HELD_OUT_TYPES))


def row_types(row: dict[str, Any]) -> list[str]:
    return [c["type_name"] for c in row["meta"]["constraints"]]


def _plan(windows: list[Window], deficits: Counter, config: DialogueConfig, rng: random.Random) -> list[Window]:
    """Give the chunk's first windows the types still short: up to `config.max_constraints` compatible ones per
    window, the largest shortfall first."""
    planned, out = Counter(deficits), []
    for window in windows:
        required: list[str] = []
        for name, n in planned.most_common():
            if len(required) == config.max_constraints:
                break
            if n > 0 and catalogue.compatible([*required, name]):
                required.append(name)
        if not required:
            out.append(window)
            continue
        planned.subtract(required)
        out.append(with_rules(window.dialogue, window.start_round, window.rounds, config, rng, required=required))
    return out


def build_with_quota(windows: Sequence[Window], build_chunk: Callable[[list[Window]], list[dict[str, Any]]], *,
                     target: int, minimum: int, config: DialogueConfig, rng: random.Random, log=print
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows from `build_chunk` until `target` rows are built and every seen type is in `minimum` of them.

    Returns the rows and a report: per-type counts, types still short, windows used.
    """
    pool: Iterator[Window] = iter(windows)
    rows: list[dict[str, Any]] = []
    counts: Counter = Counter()
    used = surplus = 0
    while True:
        deficits = Counter({t: minimum - counts[t] for t in SEEN_TYPES if counts[t] < minimum})
        need = target - len(rows)
        if need <= 0 and not deficits:
            break
        # A small margin covers windows that end up skipped (a short chunk only costs another round of this
        # loop, while every surplus window is sampled for nothing). The short types ride on the windows the
        # set needs anyway, several to a window; only a shortfall they cannot carry asks for more windows.
        size = max(max(need, 0) + max(2, max(need, 0) // 8),
                   math.ceil(sum(deficits.values()) / max(1, config.max_constraints)))
        chunk = list(itertools.islice(pool, size))
        if not chunk:
            break
        used += len(chunk)
        new_rows = build_chunk(_plan(chunk, deficits, config, rng))
        if need > 0 and not deficits and len(new_rows) > need:
            surplus += len(new_rows) - need
            new_rows = new_rows[:need]
        rows += new_rows
        for row in new_rows:
            counts.update(row_types(row))
        if deficits:
            log(f"curriculum: {len(rows)} dialogues; short of {minimum}: "
                + (", ".join(f"{t} {counts[t]}" for t in sorted(deficits)) or "none"))
    short = {t: counts[t] for t in SEEN_TYPES if counts[t] < minimum}
    report = {"min_dialogues_per_type": minimum, "dialogues_per_type": {t: counts[t] for t in SEEN_TYPES},
              "types_short_of_minimum": short, "windows_used": used,
              "built_beyond_target": surplus}
    if short:
        log(f"curriculum: the corpus ran out of windows; still short of {minimum}: {short}")
    return rows, report
