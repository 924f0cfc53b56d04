"""Responsiveness scorer speed: the panel's cached prefixes against full passes, all measured in this run.

    python tests/benchmarks/bench_responsiveness.py [--model packaged:smollm2-135m-instruct] [--replies 100] \
        [--negatives 8] [--call-size 8] [--no-full]

All compute the same contrastive PMI of the same human replies of the corpus
eval split (each with its own last 3 messages) against the same panel:

- full passes: what a user would write from the formula: every (context, reply)
  row, own and panel, run in full in left-padded batches
  (`ResponsivenessScorer.log_likelihoods`), all replies at once;
- cached panel, one context a pass: each panel context run once and its KV cache
  kept, then one forward pass per panel context over a call's replies (the scorer
  before the panel was stacked);
- cached panel, stacked: `ResponsivenessScorer.score`, the same caches stacked so
  that rows of every panel context share a pass.

The two cached ways score `--call-size` replies per call, as the data build's
rejection sampling does (a handful of replies per round); the full passes are
the reference for the PMIs. The script prints seconds per 100 replies for each,
the ratios, the tokens each ran, and the largest PMI differences.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

from dialogrl.data.corpora import load_chitchat
from dialogrl.evaluation.responsiveness import ResponsivenessConfig, ResponsivenessScorer, corpus_contexts
from dialogrl.evaluation.scorer_validation import sample_turns
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer


def log_mean_exp(values: list[float]) -> float:
    peak = max(values)
    return peak + math.log(sum(math.exp(x - peak) for x in values) / len(values))


def pmi_by_full_passes(scorer: ResponsivenessScorer, items) -> list[float]:
    panel = scorer.panel
    rows = [pair for context, reply in items for pair in ((context, reply), *((p, reply) for p in panel))]
    logps = scorer.log_likelihoods(rows)
    out = []
    for i in range(len(items)):
        own, *others = logps[i * (1 + len(panel)): (i + 1) * (1 + len(panel))]
        out.append(own - log_mean_exp(others))
    return out


def pmi_one_context_a_pass(model, tokenizer, config: ResponsivenessConfig, pool, items, call_size: int) -> list[float]:
    """The panel pass as the scorer ran it before stacking: a one-context scorer per panel context, so each
    call runs one forward pass per context over its replies."""
    own_scorer = ResponsivenessScorer(model, tokenizer, config, pool)
    per_context = [ResponsivenessScorer(model, tokenizer, dataclasses.replace(config, negatives=1), [context])
                   for context in own_scorer.panel]
    out = []
    for start in range(0, len(items), call_size):
        call = items[start: start + call_size]
        own = own_scorer.log_likelihoods(call)
        panel = [scorer.panel_log_likelihoods([reply for _, reply in call]) for scorer in per_context]
        out.extend(o - log_mean_exp([panel[j][k][0] for j in range(len(per_context))]) for k, o in enumerate(own))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--negatives", type=int, default=ResponsivenessConfig.negatives)
    parser.add_argument("--call-size", type=int, default=8, help="replies per score call of the cached ways")
    parser.add_argument("--no-full", action="store_true", help="skip the full passes (the slowest way)")
    args = parser.parse_args()
    options = ModelConfig(name_or_path=args.model, attn_implementation="sdpa")
    model, tokenizer = load_causal_lm(options).eval(), load_tokenizer(options)
    config = ResponsivenessConfig(scorer=args.model, negatives=args.negatives)
    items = [(t["context"], t["reply"])
             for t in sample_turns(load_chitchat("eval"), args.replies, config.context_messages, seed=0)]
    pool = corpus_contexts(config.context_messages, seed=config.seed)
    print(f"scorer {args.model}; {len(items)} human replies, {config.context_messages} context messages, "
          f"panel of {config.negatives}", flush=True)

    timings: dict[str, float] = {}
    if not args.no_full:
        full_scorer = ResponsivenessScorer(model, tokenizer, config, pool)
        start = time.perf_counter()
        full = pmi_by_full_passes(full_scorer, items)
        timings["full passes"] = time.perf_counter() - start
        print(f"full passes: {per_100(timings['full passes'], items)}, {full_scorer.scored_tokens} tokens run",
              flush=True)

    start = time.perf_counter()
    one_a_pass = pmi_one_context_a_pass(model, tokenizer, config, pool, items, args.call_size)
    timings["one context a pass"] = time.perf_counter() - start
    print(f"cached panel, one context a pass, {args.call_size} replies a call: "
          f"{per_100(timings['one context a pass'], items)}", flush=True)

    stacked_scorer = ResponsivenessScorer(model, tokenizer, config, pool)
    start = time.perf_counter()
    stacked = [pmi for i in range(0, len(items), args.call_size)
               for pmi in stacked_scorer.score(items[i: i + args.call_size])]
    timings["stacked"] = time.perf_counter() - start
    print(f"cached panel, stacked, {args.call_size} replies a call: {per_100(timings['stacked'], items)}, "
          f"{stacked_scorer.scored_tokens} tokens run (panel prefixes included)", flush=True)

    print(f"stacked vs one context a pass: {timings['one context a pass'] / timings['stacked']:.2f}x; largest PMI "
          f"difference {max_difference(stacked, one_a_pass):.4f} nats", flush=True)
    if not args.no_full:
        print(f"stacked vs full passes: {timings['full passes'] / timings['stacked']:.2f}x; largest PMI difference "
              f"{max_difference(stacked, full):.4f} nats", flush=True)


def per_100(seconds: float, items) -> str:
    return f"{seconds:.1f} s = {100 * seconds / len(items):.1f} s per 100 replies"


def max_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    main()
