"""Throughput of chat-template tokenisation with assistant masks: 1 process vs all cores.

    python tests/benchmarks/bench_tokenize.py [--conversations 10000] [--model DIR_OR_REF]

Uses the packaged SmolLM2 tokenizer when fetched (else the tiny test tokenizer),
and windows of real chitchat dialogues (4-8 rounds). Prints conversations/s and
tokens/s for each setting and the speed-up, all measured in this one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dialogrl.data.corpora import load_chitchat  # noqa: E402
from dialogrl.data.tokenized import default_num_proc, tokenize_conversations  # noqa: E402


def conversations(n: int) -> list[list[dict[str, str]]]:
    out = []
    dialogues = load_chitchat("train", min_rounds=4)
    while len(out) < n:
        for dialogue in dialogues:
            for start in range(0, dialogue.rounds - 3, 8):
                messages = [{"role": "system", "content": "Answer in lowercase and end with 'over.'"}]
                out.append(messages + dialogue.messages(start, 8))
                if len(out) == n:
                    return out
    return out


def load_tokenizer(reference: str | None):
    if reference:
        from dialogrl.training.models import ModelConfig
        from dialogrl.training.models import load_tokenizer as load

        return load(ModelConfig(name_or_path=reference)), reference
    try:
        from dialogrl.training.models import ModelConfig
        from dialogrl.training.models import load_tokenizer as load

        return load(ModelConfig()), "packaged:smollm2-135m-instruct"
    except Exception:
        from tiny_model import build_tokenizer

        return build_tokenizer(), "tiny test tokenizer"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    tokenizer, name = load_tokenizer(args.model)
    data = conversations(args.conversations)
    rounds = sum(sum(m["role"] == "user" for m in c) for c in data)
    print(f"tokenizer: {name}; {len(data)} conversations, {rounds / len(data):.1f} rounds each on average")
    rates = {}
    for num_proc in sorted({1, default_num_proc()}):
        start = time.perf_counter()
        result = tokenize_conversations(tokenizer, data, num_proc=num_proc)
        seconds = time.perf_counter() - start
        tokens = sum(result["length"])
        errors = sum(e is not None for e in result["error"])
        rates[num_proc] = len(data) / seconds
        print(f"num_proc={num_proc}: {seconds:.1f} s, {len(data) / seconds:,.0f} conversations/s, "
              f"{tokens / seconds:,.0f} tokens/s, {errors} rows with errors")
    if len(rates) > 1:
        print(f"speed-up with {max(rates)} processes: {rates[max(rates)] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
