"""Length-grouped batches for the pair stages (reward, DPO), and the padding they save.

TRL's preference collators put a batch's chosen and rejected sequences in one tensor of
2 x batch rows padded to the longest of them, so one long pair pads every other row of its
batch. With `training.group_by_length` the Trainer draws batches from transformers'
LengthGroupedSampler (shuffled mega-batches, each sorted by length) keyed on the
`length` column written here: the longer side of each pair.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

LENGTH_COLUMN = "length"


def pair_lengths(row: dict[str, Any]) -> tuple[int, int]:
    """The two sequences a pair row puts in the batch: prompt + chosen and prompt + rejected tokens."""
    prompt = len(row.get("prompt_ids", ()))
    return prompt + len(row["chosen_ids"]), prompt + len(row["rejected_ids"])


def with_length_column(dataset):
    """The pair dataset with `length` (the longer side of each pair) for the length-grouped sampler."""
    return dataset.map(lambda row: {LENGTH_COLUMN: max(pair_lengths(row))}, desc="lengths for grouping")


def padding_share(lengths: Sequence[tuple[int, int]], order: Sequence[int], batch_size: int) -> float:
    """Share of the padded batch tensors that is padding, taking pairs in `order`, `batch_size` at a time."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        longest = max(max(pair) for pair in batch)
        real += sum(sum(pair) for pair in batch)
        padded += 2 * len(batch) * longest
    return 1 - real / padded if padded else 0.0


def padding_report(dataset, batch_size: int, seed: int) -> dict[str, float]:
    """Padding share of one epoch in random order and in the length-grouped sampler's order."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [pair_lengths(row) for row in dataset]
    shuffled = list(range(len(lengths)))
    random.Random(seed).shuffle(shuffled)
    grouped = list(LengthGroupedSampler(batch_size, lengths=[max(pair) for pair in lengths],
                                        generator=torch.Generator().manual_seed(seed)))
    return {"random_order": round(padding_share(lengths, shuffled, batch_size), 4),
            "length_grouped": round(padding_share(lengths, grouped, batch_size), 4)}


def keep_length_column(trainer) -> None:
    """Let `length` reach the sampler: the Trainer drops columns outside its signature list before it builds
    the sampler, and TRL's pair trainers list only the token columns."""
    trainer._set_signature_columns_if_needed()
    if LENGTH_COLUMN not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, LENGTH_COLUMN]
