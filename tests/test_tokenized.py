"""Batched tokenisation: same rows with one or two processes; bad rows come back flagged, not dropped."""

from __future__ import annotations

from templates import stand_in_tokenizer

from dialogrl.data.chat_tokens import ChatTokenizer
from dialogrl.data.tokenized import tokenize_conversations


def conversations(n: int):
    return [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * (i % 7 + 1)}]
        for i in range(n)
    ]


def test_two_processes_give_the_same_rows_as_one():
    tokenizer = stand_in_tokenizer("smollm2")
    data = conversations(600)
    one = tokenize_conversations(tokenizer, data, num_proc=1, batch_size=100)
    two = tokenize_conversations(tokenizer, data, num_proc=2, batch_size=100)
    assert one["input_ids"] == two["input_ids"]
    assert one["assistant_mask"] == two["assistant_mask"]
    chat = ChatTokenizer(tokenizer)
    assert one[17]["input_ids"] == chat(data[17]).input_ids


def test_rows_over_max_length_or_unrenderable_are_flagged_in_place():
    tokenizer = stand_in_tokenizer("gemma")  # refuses system messages
    data = conversations(3)
    data[1] = [{"role": "system", "content": "x"}] + data[1]
    data[2] = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 300}]
    result = tokenize_conversations(tokenizer, data, num_proc=1, max_length=64)
    assert result["error"][0] is None
    assert "System role not supported" in result["error"][1]
    assert "over max_length 64" in result["error"][2]
    assert len(result) == 3
