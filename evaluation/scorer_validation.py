"""Validate the dialogue-aware gate where the truth is known: human dialogues of the corpus eval split.

- Responsiveness: each sampled human reply is scored after its own context (a
  positive) and after another dialogue's context (a negative, the same reply
  "swapped"); the scorer must tell them apart (ROC AUC).
- Canned replies ("Hey there!", "I'm not sure.", ...) after substantive user
  turns: the share that scores below the threshold.
- The threshold is the point of the ROC curve with the largest Youden's J =
  TPR - FPR, with both kinds of non-answer as negatives: swapped replies and
  canned ones. Swapped replies alone put it below 0 nats, where a generic reply
  (PMI near 0: about as likely after any turn) passes; the canned negatives are
  what the gate exists to stop. It is fixed by this validation, never tuned on
  the models being evaluated; the swapped-only cut is reported beside it.
- Repeat and echo: how often human replies trip each threshold (people do repeat
  "lol" and "yeah"; the rate says what the gate costs a real speaker).

`dialogrl eval validate-scorer` runs it and writes validation.json.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from dialogrl.evaluation.gate import check_gate, echo_share, repeat_similarity
from dialogrl.evaluation.responsiveness import ResponsivenessScorer, context_of

CANNED_REPLIES = ("Hey there!", "I'm not sure.", "How can I help you today?", "That's interesting.",
                  "I'm here to help with any math problem you're having.")
SUBSTANTIVE_WORDS = 6  # a user turn of at least this many words asks for something a canned reply ignores
CANNED_TURNS = 40  # substantive turns each canned reply is tried on


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney U / n_pos n_neg).

    Worked: positives [3, 1], negatives [2, 0] -> pairs (3>2, 3>0, 1<2, 1>0) = 3/4.
    """
    if not positives or not negatives:
        raise ValueError("roc_auc needs at least one positive and one negative score")
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2
        rank_sum += mean_rank * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def youden_threshold(positives: Sequence[float], negatives: Sequence[float]) -> dict[str, float]:
    """The cut `score >= t` with the largest TPR - FPR; t is the midpoint between neighbouring scores."""
    values = sorted(set(positives) | set(negatives))
    cuts = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)] + [values[-1] + 1.0]
    best = {"threshold": cuts[0], "tpr": 1.0, "fpr": 1.0, "j": 0.0}
    for t in cuts:
        tpr = sum(p >= t for p in positives) / len(positives)
        fpr = sum(n >= t for n in negatives) / len(negatives)
        if tpr - fpr > best["j"]:
            best = {"threshold": t, "tpr": tpr, "fpr": fpr, "j": tpr - fpr}
    return best


def sample_turns(dialogues: Sequence, n: int, context_messages: int, seed: int) -> list[dict[str, Any]]:
    """One (context, human reply, earlier replies, user turn) per dialogue, at a random round with enough history."""
    rng = random.Random(seed)
    chosen = []
    for dialogue in dialogues:
        messages = dialogue.messages()
        candidates = [i for i in range(1, len(messages), 2) if i >= context_messages]
        if not candidates:
            continue
        reply_index = rng.choice(candidates)
        chosen.append({"dialogue_id": dialogue.conversation_id,
                       "context": context_of(messages, reply_index, context_messages),
                       "reply": messages[reply_index]["content"],
                       "user_turn": messages[reply_index - 1]["content"]})
        if len(chosen) == n:
            break
    return chosen


def human_repeat_echo_rates(dialogues: Sequence, thresholds: Sequence[float]) -> dict[str, Any]:
    """Share of human replies that would fail as a repeat (vs the same speaker's earlier replies) or an echo,
    and how many fail each per-reply check of the gate (with default settings)."""
    repeat_scores, echo_scores = [], []
    for dialogue in dialogues:
        replies = dialogue.reply_turns
        for r, reply in enumerate(replies):
            if r:
                repeat_scores.append(max(repeat_similarity(reply, earlier) for earlier in replies[:r]))
            echo_scores.append(echo_share(reply, dialogue.user_turns[r]))
    per_reply = Counter(check_gate(reply).reason for dialogue in dialogues for reply in dialogue.reply_turns)
    per_reply.pop(None, None)
    return {
        "replies": len(echo_scores),
        "repeat": {str(t): sum(s >= t for s in repeat_scores) / len(repeat_scores) for t in thresholds},
        "echo": {str(t): sum(s >= t for s in echo_scores) / len(echo_scores) for t in thresholds},
        "per_reply_gate_failures": dict(per_reply.most_common()),  # reason -> human replies failing it
    }


def validate(scorer: ResponsivenessScorer, dialogues: Sequence, *, n: int, seed: int = 0) -> dict[str, Any]:
    """Responsiveness AUC, Youden threshold and canned-reply check on `n` human turns; see the module docstring."""
    turns = sample_turns(dialogues, n, scorer.config.context_messages, seed)
    if len(turns) < 2:
        raise ValueError(f"need at least 2 dialogues with {scorer.config.context_messages} messages of history")
    rng = random.Random(seed + 1)
    shift = [(i + rng.randrange(1, len(turns))) % len(turns) for i in range(len(turns))]  # never itself
    true_items = [(t["context"], t["reply"]) for t in turns]
    swapped_items = [(turns[j]["context"], t["reply"]) for t, j in zip(turns, shift, strict=True)]
    substantive = [t for t in turns if len(t["user_turn"].split()) >= SUBSTANTIVE_WORDS][:CANNED_TURNS]
    canned_items = [(t["context"], reply) for t in substantive for reply in CANNED_REPLIES]
    scores = scorer.score(true_items + swapped_items + canned_items)
    true_scores, swapped_scores = scores[: len(turns)], scores[len(turns): 2 * len(turns)]
    canned_scores = scores[2 * len(turns):]
    swapped_cut = youden_threshold(true_scores, swapped_scores)
    cut = youden_threshold(true_scores, swapped_scores + canned_scores)
    canned_by_reply = {
        reply: sum(canned_scores[i] < cut["threshold"]
                   for i in range(k, len(canned_scores), len(CANNED_REPLIES))) / max(len(substantive), 1)
        for k, reply in enumerate(CANNED_REPLIES)
    }
    return {
        "pairs": len(turns),
        "auc": roc_auc(true_scores, swapped_scores),
        "threshold": cut["threshold"],
        "tpr": cut["tpr"],
        "fpr": cut["fpr"],
        "swapped_fpr": sum(s >= cut["threshold"] for s in swapped_scores) / len(swapped_scores),
        "swapped_only_cut": swapped_cut,
        "true_mean": sum(true_scores) / len(true_scores),
        "swapped_mean": sum(swapped_scores) / len(swapped_scores),
        "substantive_turns": len(substantive),
        "canned_below_threshold": (sum(s < cut["threshold"] for s in canned_scores) / len(canned_scores)
                                   if canned_scores else None),
        "canned_below_threshold_by_reply": canned_by_reply,
        "seconds_per_100_replies": 100 * scorer.seconds / max(scorer.scored_replies, 1),
        "scores": {"true": true_scores, "swapped": swapped_scores, "canned": canned_scores},
        "samples": [{**t, "true": a, "swapped": b} for t, a, b in zip(turns[:20], true_scores, swapped_scores,
                                                                      strict=False)],
    }
