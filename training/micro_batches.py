"""Rows grouped into micro-batches under a token budget, for passes too large to run at once.

A PPO minibatch of turn-group rows (every sibling reply with its whole history) or a
scoring pass over a whole rollout can hold tens of thousands of tokens; run in one
forward pass, its activations and its [rows, positions, vocabulary] logits dominate
the step's memory. Run in micro-batches of at most `budget` padded tokens, with the
gradients accumulated, the step is the same and its memory is bounded by the budget.
verl calls this dynamic batch size (`ppo_max_token_len_per_gpu`). A fixed row count per
pass bounds nothing when row lengths vary tenfold, as turn-group rows do.
"""

from __future__ import annotations

from collections.abc import Sequence


def within_budget(lengths: Sequence[int], budget: int, starts: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of rows grouped so that each group's rows x its longest row is at most `budget`.

    Rows are taken longest first, so each group pads to about its own length; with
    `starts` (each row's first scored position) they are taken by start first, so that
    a group's rows are scored at about the same positions too (the logits a pass keeps
    are those of every position any of its rows is scored at). A row longer than the
    budget makes a group of its own (it cannot be split). Every index is in exactly one
    group; no group is empty.
    """
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    first = starts if starts is not None else [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-first[i], -lengths[i]))
    groups: list[list[int]] = []
    widest = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * max(widest, lengths[i]) <= budget:
            groups[-1].append(i)
            widest = max(widest, lengths[i])
        else:
            groups.append([i])
            widest = lengths[i]
    return groups
