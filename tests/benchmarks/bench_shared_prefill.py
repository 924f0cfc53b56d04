"""k samples per history, as the data build's rejection sampling draws them: identical rows prefilled once
(`RolloutEngine.share_identical_rows`, the default) against every row prefilled on its own, in the same run.

    python tests/benchmarks/bench_shared_prefill.py [--model packaged:smollm2-135m-instruct] [--histories 8] \
        [--samples 2] [--rounds 4] [--max-new-tokens 64] [--repeats 2]

The histories are train dialogues of the corpus cut after round `--rounds` (system prompt with a rule, the
human replies so far, the next user turn): the data build's round-r prompts. Each history is asked for
`--samples` replies in one `engine.reply` call (the k copies side by side in a batch of 16 rows, as
`CachedReplies` sends them), sampled at temperature 0.7. The two ways alternate `--repeats` times, so drift
of the machine hits both; the script prints seconds per call of each, the ratio, and whether the replies
are the same (same seed: sharing the prefill must not change what is sampled).
"""

from __future__ import annotations

import argparse
import statistics
import time

from dialogrl.data.corpora import load_chitchat
from dialogrl.evaluation.rollout import RolloutEngine
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer


def histories(count: int, rounds: int) -> list[list[dict[str, str]]]:
    dialogues = [d for d in load_chitchat("train") if d.rounds > rounds][:count]
    system = {"role": "system", "content": "You are a helpful assistant. Never use the digits 0-9 in a reply."}
    return [[system, *d.messages(0, rounds), {"role": "user", "content": d.user_turns[rounds]}] for d in dialogues]


def timed_call(engine: RolloutEngine, conversations) -> tuple[float, list[str]]:
    start = time.perf_counter()
    replies = engine.reply(conversations)
    return time.perf_counter() - start, replies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--histories", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="human rounds before the user turn to answer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = ModelConfig(name_or_path=args.model)
    model, tokenizer = load_causal_lm(config).eval(), load_tokenizer(config)
    asked = [h for h in histories(args.histories, args.rounds) for _ in range(args.samples)]
    prompt_tokens = [len(tokenizer(tokenizer.apply_chat_template(h, tokenize=False, add_generation_prompt=True),
                                   add_special_tokens=False).input_ids) for h in asked[:: args.samples]]
    print(f"model {args.model}; {len(prompt_tokens)} histories of {min(prompt_tokens)}-{max(prompt_tokens)} tokens "
          f"x {args.samples} samples, up to {args.max_new_tokens} new tokens, temperature 0.7, batch 16", flush=True)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.7)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    replies: dict[bool, list[str]] = {}
    for repeat in range(args.repeats):
        for share in (False, True):
            engine = RolloutEngine(model, tokenizer, sampling, batch_size=16)
            engine.share_identical_rows = share
            spent, replies[share] = timed_call(engine, asked)
            seconds[share].append(spent)
            print(f"repeat {repeat + 1}: {'shared' if share else 'every row'} prefill {spent:.1f} s "
                  f"({engine.rows_prefilled_as_copies} rows prefilled as copies, "
                  f"{engine.tokens_generated} tokens generated)", flush=True)
    apart, shared = statistics.median(seconds[False]), statistics.median(seconds[True])
    same = sum(a == b for a, b in zip(replies[False], replies[True], strict=True))
    print(f"median s per call: every row {apart:.1f}, shared {shared:.1f}; speed-up {apart / shared:.2f}x; "
          f"identical replies {same}/{len(asked)}")


if __name__ == "__main__":
    main()
