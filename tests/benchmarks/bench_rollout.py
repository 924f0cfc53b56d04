"""Rollout engine speed against two baselines, all measured in the same run.

    python tests/benchmarks/bench_rollout.py [--model packaged:smollm2-135m-instruct] [--dialogues 16] \
        [--rounds 8 16] [--max-new-tokens 48]

Three ways to play the same held-out dialogues for R rounds, greedily, with the
same sampling settings and reply length limit:

- one at a time: the engine with `batch_size=1, reuse_cache=False`, one dialogue
  after another, the whole history re-encoded every round;
- batched generate: what a user would write without the engine. Every round, all
  dialogues of the batch are rendered with the chat template (generation prompt
  on), left-padded into one batch and passed to one `model.generate`; the whole
  history is re-encoded every round, no cache is kept between rounds;
- engine: all dialogues in one batch, the KV cache kept between rounds (only the
  new tokens are run), new segments prefilled in length groups.

For each R given to --rounds the script prints generated tokens per second of
each method, the engine's speed-up over each baseline, and for how many
dialogues each baseline's replies are identical to the engine's.

The default of 16 dialogues is the evaluator's default `batch_size`, so the engine
runs as `dialogrl eval` runs it.

Measured on 2 idle cores at commit 22a917d (defaults: 16 dialogues, up to 48 new tokens):

    R    one at a time   batched generate   engine       engine vs one / vs generate
    8    13.3 tokens/s   28.8 tokens/s      70.8         5.33x / 2.45x
    16   12.5            9.7                48.7         3.90x / 5.05x

Batched generate loses to one at a time at R = 16. Not profiled; the likely cause is
that every round it re-encodes all histories left-padded to the longest one, and
decodes until the longest reply ends.
"""

from __future__ import annotations

import argparse
import time

from dialogrl.evaluation.rollout import DialogueSpec, RolloutEngine
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.evaluation.scenarios import ScenarioConfig, build_scenarios
from dialogrl.evaluation.users import ReplayedUser
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer


def run_engine(model, tokenizer, sampling, specs, rounds, *, batch_size, reuse_cache):
    engine = RolloutEngine(model, tokenizer, sampling, batch_size=batch_size, reuse_cache=reuse_cache)
    start = time.perf_counter()
    trajectories = engine.play(specs, rounds)
    seconds = time.perf_counter() - start
    return engine.tokens_generated, seconds, [t.messages for t in trajectories]


def run_batched_generate(model, tokenizer, sampling, specs, rounds, *, batch_size):
    """The baseline without the engine: one batched `generate` per round over the whole re-encoded history.

    Tokens are counted as the engine counts them: a reply's tokens up to and
    including its first end token (later ones are the padding generate adds
    while other rows are still decoding).
    """
    import torch

    kwargs = sampling.generate_kwargs(tokenizer, model)
    stop_ids = set(kwargs["eos_token_id"])
    tokens = 0
    histories = []
    start = time.perf_counter()
    for first in range(0, len(specs), batch_size):
        torch.manual_seed(sampling.seed + first)  # as the engine seeds each batch
        batch = specs[first: first + batch_size]
        messages = [([{"role": "system", "content": s.system_prompt}] if s.system_prompt else []) + list(s.history)
                    for s in batch]
        active = [True] * len(batch)
        for round_number in range(1, rounds + 1):
            for i, spec in enumerate(batch):
                if active[i]:
                    text = spec.user.next_user_turn(messages[i], round_number)
                    if text is None:
                        active[i] = False
                        continue
                    prefix = spec.user_prefix.get(round_number)
                    messages[i].append({"role": "user", "content": f"{prefix} {text}" if prefix else text})
            live = [i for i in range(len(batch)) if active[i]]
            if not live:
                break
            texts = [tokenizer.apply_chat_template(messages[i], tokenize=False, add_generation_prompt=True)
                     for i in live]
            encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                return_tensors="pt").to(model.device)
            with torch.inference_mode():
                output = model.generate(**encoded, **kwargs)
            for i, new in zip(live, output[:, encoded["input_ids"].shape[1]:].tolist(), strict=True):
                end = next((k for k, t in enumerate(new) if t in stop_ids), None)
                reply = new if end is None else new[: end + 1]
                tokens += len(reply)
                text = tokenizer.decode(reply, skip_special_tokens=True).strip()
                messages[i].append({"role": "assistant", "content": text})
        histories += messages
    return tokens, time.perf_counter() - start, histories


def bench(model, tokenizer, args, rounds: int) -> None:
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    scenarios = build_scenarios(ScenarioConfig(dialogues=args.dialogues, rounds=rounds))
    specs = [DialogueSpec(s.dialogue_id, s.system_prompt(), ReplayedUser(s.user_turns)) for s in scenarios]
    print(f"model {args.model}; {args.dialogues} dialogues x {rounds} rounds, "
          f"up to {args.max_new_tokens} new tokens per reply, greedy", flush=True)
    one_tokens, one_s, one = run_engine(model, tokenizer, sampling, specs, rounds, batch_size=1, reuse_cache=False)
    one_speed = one_tokens / one_s
    print(f"R={rounds} one at a time (history re-encoded): {one_tokens} tokens in {one_s:.1f} s = "
          f"{one_speed:.1f} tokens/s", flush=True)
    gen_tokens, gen_s, gen = run_batched_generate(model, tokenizer, sampling, specs, rounds,
                                                  batch_size=args.dialogues)
    gen_speed = gen_tokens / gen_s
    print(f"R={rounds} batched generate (batch {args.dialogues}, left-padded, history re-encoded): "
          f"{gen_tokens} tokens in {gen_s:.1f} s = {gen_speed:.1f} tokens/s", flush=True)
    fast_tokens, fast_s, fast = run_engine(model, tokenizer, sampling, specs, rounds,
                                           batch_size=args.dialogues, reuse_cache=True)
    fast_speed = fast_tokens / fast_s
    print(f"R={rounds} engine (batch {args.dialogues}, KV cache kept): {fast_tokens} tokens in {fast_s:.1f} s = "
          f"{fast_speed:.1f} tokens/s", flush=True)
    same_one = sum(a == b for a, b in zip(one, fast, strict=True))
    same_gen = sum(a == b for a, b in zip(gen, fast, strict=True))
    print(f"R={rounds} speed-up: engine {fast_speed / one_speed:.2f}x one at a time, "
          f"{fast_speed / gen_speed:.2f}x batched generate "
          f"(identical dialogues: one at a time {same_one}/{len(specs)}, batched generate {same_gen}/{len(specs)})",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--dialogues", type=int, default=16)
    parser.add_argument("--rounds", type=int, nargs="+", default=[8, 16],
                        help="rounds per dialogue; several values run one after another (default: 8 16)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    config = ModelConfig(name_or_path=args.model)
    model, tokenizer = load_causal_lm(config).eval(), load_tokenizer(config)
    for rounds in args.rounds:
        bench(model, tokenizer, args, rounds)


if __name__ == "__main__":
    main()
