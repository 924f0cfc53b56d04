"""Batched chat-template tokenisation of many conversations, on every core.

Rows go through `datasets.map` in batches, several processes at once; within a
batch the tokenizer is called once for all text pieces (the Rust tokenizer
batches them). A conversation the template cannot render, or one longer than
`max_length`, is not dropped: it comes back with an `error` string so the
caller can count it and write it to a rejects file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from dialogrl.data.chat_tokens import ChatTokenizer, TemplateError

COLUMNS = ("input_ids", "assistant_mask", "turn_index", "length", "error")


def _tokenize_batch(batch: dict[str, list[Any]], chat: ChatTokenizer, max_length: int | None) -> dict[str, list]:
    if "conversation_json" in batch:
        rows = [json.loads(row) for row in batch["conversation_json"]]
        conversations, tools = [row["messages"] for row in rows], [row.get("tools") for row in rows]
    else:
        conversations, tools = batch["messages"], [None] * len(batch["messages"])
    try:
        results: list[Any] = chat.tokenize_many(conversations, tools)
    except TemplateError:
        results = []
        for messages, row_tools in zip(conversations, tools, strict=True):  # find which rows fail, keep the others
            try:
                results.append(chat(messages, row_tools))
            except TemplateError as err:
                results.append(err)
    out: dict[str, list] = {name: [] for name in COLUMNS}
    for result in results:
        if isinstance(result, TemplateError):
            error, ids, mask, turns = str(result), [], [], []
        else:
            ids, mask, turns = result.input_ids, result.assistant_mask, result.turn_index
            error = None
            if max_length is not None and len(ids) > max_length:
                error = f"is {len(ids)} tokens, over max_length {max_length}"
            elif not any(mask):
                error = "has no assistant tokens after tokenisation"
        out["input_ids"].append(ids)
        out["assistant_mask"].append(mask)
        out["turn_index"].append(turns)
        out["length"].append(len(ids))
        out["error"].append(error)
    return out


def _features(keep: dict | None = None):
    from datasets import Features, List, Value

    columns = {
        "input_ids": List(Value("int32")),
        "assistant_mask": List(Value("int8")),
        "turn_index": List(Value("int16")),
        "length": Value("int32"),
        # Declared, so a batch in which every row is fine (all None) still writes.
        "error": Value("string"),
    }
    return Features({**(keep or {}), **columns})


def default_num_proc() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def tokenize_conversations(
    tokenizer,
    conversations: Sequence[Sequence[dict[str, Any]]] | Any,
    *,
    tools: Sequence[list[dict[str, Any]] | None] | None = None,
    max_length: int | None = None,
    num_proc: int | None = None,
    batch_size: int = 256,
    keep_columns: bool = False,
):
    """A `datasets.Dataset` with input_ids, assistant_mask, turn_index, length and error per conversation.

    `conversations` is a list of message lists (with `tools[i]` the tool list of
    conversation i), or a Dataset with a `messages` column.
    """
    from datasets import Dataset

    chat = tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)
    if isinstance(conversations, Dataset):
        dataset = conversations
    else:
        # As JSON text: Arrow would merge the keys of all rows' messages (and of all tool
        # arguments) into one struct, giving every message the others' keys as None.
        tools = list(tools) if tools is not None else [None] * len(conversations)
        dataset = Dataset.from_dict({"conversation_json": [
            json.dumps({"messages": list(m), "tools": t}) for m, t in zip(conversations, tools, strict=True)]})
    num_proc = default_num_proc() if num_proc is None else num_proc
    num_proc = max(1, min(num_proc, max(1, len(dataset) // batch_size)))
    return dataset.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"chat": chat, "max_length": max_length},
        remove_columns=[] if keep_columns else dataset.column_names,
        features=_features(dict(dataset.features) if keep_columns else None),
        desc="tokenising with the chat template",
    )
