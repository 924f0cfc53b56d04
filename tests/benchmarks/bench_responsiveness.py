"""Responsiveness scorer speed: the panel's cached prefixes against full passes, both measured in this run.

    python tests/benchmarks/bench_responsiveness.py [--model packaged:smollm2-135m-instruct] [--replies 100] \
        [--negatives 8]

Both compute the same contrastive PMI of the same human replies of the corpus
eval split (each with its own last 3 messages) against the same panel:

- full passes: what the scorer did before, and what a user would write from the
  formula: every (context, reply) row, own and panel, run in full in left-padded
  batches (`ResponsivenessScorer.log_likelihoods`);
- cached panel: `ResponsivenessScorer.score`, each panel context run once and its
  KV cache kept, so the panel rows run the reply's tokens only.

The script prints seconds per 100 replies for each, the ratio, the tokens each
ran, and the largest difference between the two methods' PMIs.
"""

from __future__ import annotations

import argparse
import math
import time

from dialogrl.data.corpora import load_chitchat
from dialogrl.evaluation.responsiveness import ResponsivenessConfig, ResponsivenessScorer, corpus_contexts
from dialogrl.evaluation.scorer_validation import sample_turns
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer


def pmi_by_full_passes(scorer: ResponsivenessScorer, items) -> list[float]:
    panel = scorer.panel
    rows = [pair for context, reply in items for pair in ((context, reply), *((p, reply) for p in panel))]
    logps = scorer.log_likelihoods(rows)
    out = []
    for i in range(len(items)):
        own, *others = logps[i * (1 + len(panel)): (i + 1) * (1 + len(panel))]
        peak = max(others)
        out.append(own - peak - math.log(sum(math.exp(x - peak) for x in others) / len(others)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--negatives", type=int, default=ResponsivenessConfig.negatives)
    args = parser.parse_args()
    options = ModelConfig(name_or_path=args.model, attn_implementation="sdpa")
    model, tokenizer = load_causal_lm(options).eval(), load_tokenizer(options)
    config = ResponsivenessConfig(scorer=args.model, negatives=args.negatives)
    items = [(t["context"], t["reply"])
             for t in sample_turns(load_chitchat("eval"), args.replies, config.context_messages, seed=0)]
    pool = corpus_contexts(config.context_messages, seed=config.seed)
    print(f"scorer {args.model}; {len(items)} human replies, {config.context_messages} context messages, "
          f"panel of {config.negatives}", flush=True)

    full_scorer = ResponsivenessScorer(model, tokenizer, config, pool)
    start = time.perf_counter()
    full = pmi_by_full_passes(full_scorer, items)
    full_s = time.perf_counter() - start
    print(f"full passes: {full_s:.1f} s = {100 * full_s / len(items):.1f} s per 100 replies, "
          f"{full_scorer.scored_tokens} tokens run", flush=True)

    cached_scorer = ResponsivenessScorer(model, tokenizer, config, pool)
    start = time.perf_counter()
    cached = cached_scorer.score(items)
    cached_s = time.perf_counter() - start
    print(f"cached panel: {cached_s:.1f} s = {100 * cached_s / len(items):.1f} s per 100 replies, "
          f"{cached_scorer.scored_tokens} tokens run (panel prefixes included)", flush=True)
    worst = max(abs(a - b) for a, b in zip(full, cached, strict=True))
    print(f"speed-up: {full_s / cached_s:.2f}x; largest PMI difference between the two: {worst:.4f} nats",
          flush=True)


if __name__ == "__main__":
    main()
