"""Scores from a reward model: per assistant turn in one forward pass, and pair accuracy by turn.

A causal-LM reward model's score for "the dialogue up to the end of turn k" is
its score head applied at turn k's end token: with causal attention, the
hidden state there does not depend on anything later. So one forward pass over
the whole conversation gives every turn's score, which is what per-turn PPO
rewards and `dialogrl reward score` need (tested against scoring each prefix).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def _backbone_and_head(model):
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = getattr(model, "score", None)
    if backbone is None or head is None:
        raise TypeError(f"{type(model).__name__} is not a decoder with a `score` head "
                        "(AutoModelForSequenceClassification of a causal LM); cannot read per-turn scores")
    return backbone, head


def position_scores(model, input_ids, attention_mask):
    """The score head at every position: [B, T] float32."""
    backbone, head = _backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    return head(hidden).squeeze(-1).float()  # [B, T]


def _batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, device):
    import torch

    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        yield start, ids.to(device), mask.to(device)


def scores_at(model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], *,
              pad_id: int, batch_size: int = 8) -> list[list[float]]:
    """For each sequence, the score at each of its given positions."""
    import torch

    device = next(model.parameters()).device
    out: list[list[float]] = []
    with torch.no_grad():
        for start, ids, mask in _batches(sequences, batch_size, pad_id, device):
            scores = position_scores(model, ids, mask).cpu()
            for row in range(ids.shape[0]):
                out.append([float(scores[row, p]) for p in positions[start + row]])
    return out


def turn_end_positions(assistant_mask: Sequence[int]) -> list[int]:
    """Index of the last token of every assistant turn (its end token)."""
    return [i for i, bit in enumerate(assistant_mask) if bit and (i + 1 == len(assistant_mask) or not assistant_mask[i + 1])]


def score_conversations(model, chat, conversations: Sequence[Sequence[dict[str, str]]], *, pad_id: int,
                        batch_size: int = 8, tools: Sequence[Any] | None = None) -> list[list[float]]:
    """Per conversation, the score after each assistant turn; `tools[i]` is the tool list conversation i's
    template renders (as training rendered it: a reward model never saw a tool conversation without it)."""
    tokens = chat.tokenize_many(conversations, tools)
    ends = [turn_end_positions(t.assistant_mask) for t in tokens]
    return scores_at(model, [t.input_ids for t in tokens], ends, pad_id=pad_id, batch_size=batch_size)


def pair_accuracy(model, pairs, *, pad_id: int, batch_size: int = 8) -> dict[str, Any]:
    """Accuracy (chosen scored above rejected) overall and by turn index, on a reward-format dataset."""
    chosen = list(pairs["chosen_ids"])
    rejected = list(pairs["rejected_ids"])
    last = [[len(s) - 1] for s in chosen + rejected]
    scores = scores_at(model, chosen + rejected, last, pad_id=pad_id, batch_size=batch_size)
    n = len(chosen)
    by_turn: dict[int, list[int]] = defaultdict(list)
    margins = []
    for i, turn in enumerate(pairs["turn_index"]):
        margin = scores[i][0] - scores[n + i][0]
        margins.append(margin)
        by_turn[int(turn)].append(int(margin > 0))
    correct = [c for values in by_turn.values() for c in values]
    return {
        "pairs": n,
        "accuracy": sum(correct) / n if n else None,
        "mean_margin": sum(margins) / n if n else None,
        "by_turn": {turn: {"pairs": len(v), "accuracy": sum(v) / len(v)} for turn, v in sorted(by_turn.items())},
    }
