"""Token-length checks: a row too long for the model is reported, never cut or dropped silently."""

from __future__ import annotations

from collections.abc import Callable

from dialogrl.data.chat_tokens import ChatTokenizer, TemplateError
from dialogrl.data.records import Conversation, PreferencePair, Record


def record_sequences(record: Record) -> list[tuple[str, list[dict[str, str]]]]:
    """The full conversations a record is trained on, with the field each comes from."""
    if isinstance(record, Conversation):
        return [("messages", record.messages)]
    assert isinstance(record, PreferencePair)
    return [("chosen", record.prompt + record.chosen), ("rejected", record.prompt + record.rejected)]


def length_check(chat: ChatTokenizer, max_length: int | None) -> Callable[[Record], list[tuple[str, str]]]:
    """A `row_check` for `load_records`: the template must render the row within `max_length` tokens."""

    def check(record: Record) -> list[tuple[str, str]]:
        problems = []
        for field, messages in record_sequences(record):
            try:
                tokens = len(chat(messages, record.tools))
            except TemplateError as err:
                problems.append((field, str(err)))
                continue
            if max_length is not None and tokens > max_length:
                problems.append((field, f"is {tokens} tokens, over max_length {max_length}"))
        return problems

    return check
