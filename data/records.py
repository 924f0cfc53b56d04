"""One internal form for dialogue data, and the row checks every source goes through.

A conversation is a list of messages `{"role", "content"}`: an optional system
message first, then user and assistant turns alternating, starting with the
user. An assistant message may call tools (`tool_calls`); the results follow as
`role: tool` messages, one per call, and then the assistant goes on (see
tool_calls.py; a row's `tools` list says which tools exist). A preference pair
is a prompt (a conversation ending in a user turn or tool results) and two
assistant replies to it.

Rows arrive in the formats people bring (OpenAI `messages`, ShareGPT
`conversations`, prompt/completion, prompt/chosen/rejected with an explicit or
implicit prompt, user-edit records `{messages, draft, edited}`). `normalise_row`
turns any of them into a `Conversation` or a `PreferencePair`, or into a list of
problems that name the field and the reason, so that no row is ever dropped
without a word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dialogrl.data.tool_calls import (
    clean_tool_calls,
    tool_call_problems,
    tool_names,
    tool_result_problems,
    tools_problems,
)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}


@dataclass(frozen=True)
class Problem:
    """Why one row cannot be used: where it is and what is wrong with it."""

    source: str
    row: int  # 1-based: the line of a JSONL file, the index + 1 of a dataset row
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: row {self.row}: {self.field}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "row": self.row, "field": self.field, "reason": self.reason}


class RowError(ValueError):
    """Problems found in one row (field, reason pairs), before the row number is known."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))
        self.problems = problems


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # the tool definitions the template renders

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    @property
    def num_assistant_turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # ends with a user turn
    chosen: list[dict[str, str]]  # assistant message(s) continuing the prompt
    rejected: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None

    @property
    def turn_index(self) -> int:
        """1-based round of the compared reply: the number of user turns in the prompt."""
        return sum(m["role"] == "user" for m in self.prompt)


Record = Conversation | PreferencePair


# --------------------------------------------------------------------------- checks


def message_problems(
    messages: Any,
    field_name: str,
    *,
    forbidden_substrings: Sequence[str] = (),
    max_chars: int | None = None,
    known_tools: set[str] | None = None,
) -> list[tuple[str, str]]:
    """Problems of one message list taken on its own (roles, contents, tool calls, limits)."""
    if not isinstance(messages, list):
        return [(field_name, f"expected a list of messages, got {type(messages).__name__}")]
    if not messages:
        return [(field_name, "is empty")]
    problems = []
    open_calls = 0
    for i, message in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            problems.append((where, f"expected a message object with role and content, got {type(message).__name__}"))
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append((f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})"))
        calls = message.get("tool_calls")
        if "tool_calls" in message and role != "assistant":
            problems.append((f"{where}.tool_calls", f"only assistant messages call tools, this one is {role!r}"))
        elif calls is not None:
            problems += tool_call_problems(calls, where, known_tools)
        if role == "tool":
            problems += tool_result_problems(message, where, open_calls)
            open_calls -= 1
            continue
        open_calls = len(calls) if isinstance(calls, list) and role == "assistant" else 0
        if calls and content in (None, ""):
            continue  # a message that only calls tools
        if not isinstance(content, str):
            problems.append((f"{where}.content", f"expected a string, got {type(content).__name__}"))
        elif not content.strip():
            problems.append((f"{where}.content", "is empty"))
        else:
            if max_chars is not None and len(content) > max_chars:
                problems.append((f"{where}.content", f"is {len(content)} characters, over the limit of {max_chars}"))
            for token in forbidden_substrings:
                if token in content:
                    problems.append((f"{where}.content", f"contains the chat template's special token {token!r}"))
                    break
        if role == "system" and i != 0:
            problems.append((f"{where}.role", "a system message may only come first"))
    return problems


def order_problems(messages: list[dict[str, Any]], field_name: str, *, ends_with: str | None
                   ) -> list[tuple[str, str]]:
    """Turn order: [system] user assistant user assistant ..., ending as required.

    An assistant message with `tool_calls` is followed by one tool result per call,
    then by the assistant again. `ends_with="user"` (a prompt) also accepts tool
    results at the end: the assistant answers next either way.
    """
    body = messages[1:] if messages and messages[0].get("role") == "system" else messages
    offset = len(messages) - len(body)
    expected, open_calls = "user", 0
    for i, message in enumerate(body):
        role = message.get("role")
        if role != expected and role != "system":
            return [(f"{field_name}[{i + offset}].role", _order_reason(expected, open_calls, role))]
        if role == "user":
            expected = "assistant"
        elif role == "assistant":
            open_calls = len(message.get("tool_calls") or [])
            expected = "tool" if open_calls else "user"
        elif role == "tool":
            open_calls -= 1
            expected = "tool" if open_calls else "assistant"
    if not body:
        return [(field_name, "has no user or assistant turn")]
    last = body[-1].get("role")
    if ends_with == "assistant" and (last != "assistant" or open_calls):
        if open_calls:
            return [(field_name, f"ends with {open_calls} tool call(s) that have no result")]
        return [(field_name, "has no assistant reply after its last user turn")
                if any(m.get("role") == "assistant" for m in body) else (field_name, "has no assistant turn")]
    if ends_with == "user" and (last not in ("user", "tool") or open_calls):
        return [(field_name, f"must end with a user turn (or all tool results), ends with {last!r}")]
    return []


def _order_reason(expected: str, open_calls: int, got: Any) -> str:
    if expected == "tool":
        return f"expected a tool result here ({open_calls} tool call(s) still unanswered), got {got!r}"
    if expected == "assistant":
        return f"expected assistant here (the assistant answers a user turn and tool results), got {got!r}"
    return (f"expected user here (turns must alternate user/assistant, starting with user), got {got!r}")


def check_conversation(messages: Any, field_name: str = "messages", **limits: Any) -> list[tuple[str, str]]:
    problems = message_problems(messages, field_name, **limits)
    if problems:
        return problems
    return order_problems(messages, field_name, ends_with="assistant")


# --------------------------------------------------------------------------- formats


def detect_format(row: dict[str, Any]) -> str:
    if "draft" in row and "edited" in row:
        return "edit"
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return "unknown"


def _as_messages(value: Any, role: str) -> Any:
    """A plain string stands for one message of `role`; anything else is taken as a message list."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _from_sharegpt(turns: Any) -> list[dict[str, Any]] | RowError:
    if not isinstance(turns, list):
        return RowError([("conversations", f"expected a list of turns, got {type(turns).__name__}")])
    messages, problems = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append((f"conversations[{i}]", "expected an object with 'from' and 'value'"))
            continue
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            known = ", ".join(sorted(SHAREGPT_ROLES))
            problems.append((f"conversations[{i}].from", f"unknown speaker {turn['from']!r} (expected one of {known})"))
            continue
        messages.append({"role": role, "content": turn["value"]})
    return RowError(problems) if problems else messages


def _common_prefix_length(a: list[Any], b: list[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _starts_with(messages: list[Any], prefix: list[Any]) -> bool:
    return len(messages) > len(prefix) and _common_prefix_length(messages, prefix) == len(prefix)


def normalise_row(
    row: Any,
    *,
    forbidden_substrings: Sequence[str] = (),
    max_chars: int | None = None,
) -> Record:
    """One raw row in any supported format -> a checked `Conversation` or `PreferencePair`.

    Raises `RowError` listing every problem found (field, reason).
    """
    if not isinstance(row, dict):
        raise RowError([("row", f"expected a JSON object, got {type(row).__name__}")])
    tools = row.get("tools")
    if tools is not None:
        if problems := tools_problems(tools):
            raise RowError(problems)
        tools = [{"type": "function", "function": dict(t["function"])} for t in tools] or None
    limits = {"forbidden_substrings": forbidden_substrings, "max_chars": max_chars, "known_tools": tool_names(tools)}
    kind = detect_format(row)
    meta = {k: v for k, v in row.items() if k not in ("messages", "conversations", "prompt", "completion",
                                                     "chosen", "rejected", "draft", "edited", "tools")}
    if kind == "unknown":
        raise RowError([("row", f"no recognised fields (has {sorted(row)}); expected messages, conversations, "
                                "prompt+completion, chosen+rejected (with or without prompt), or messages+draft+edited")])
    if kind in ("messages", "sharegpt", "prompt_completion"):
        if kind == "messages":
            messages = row["messages"]
        elif kind == "sharegpt":
            messages = _from_sharegpt(row["conversations"])
            if isinstance(messages, RowError):
                raise messages
        else:
            prompt, completion = _as_messages(row["prompt"], "user"), _as_messages(row["completion"], "assistant")
            problems = message_problems(prompt, "prompt", **limits) + message_problems(completion, "completion", **limits)
            if problems:
                raise RowError(problems)
            if any(m["role"] != "assistant" for m in completion):
                raise RowError([("completion", "must hold assistant messages only")])
            messages = prompt + completion
        field_name = "conversations" if kind == "sharegpt" else ("messages" if kind == "messages" else "prompt+completion")
        problems = check_conversation(messages, field_name, **limits)
        if problems:
            raise RowError(problems)
        return Conversation(clean_messages(messages), meta | {"format": kind}, tools)

    if kind == "edit":
        prompt, chosen, rejected = row.get("messages"), _as_messages(row["edited"], "assistant"), _as_messages(
            row["draft"], "assistant")
        names = ("messages", "edited", "draft")
    else:
        prompt = _as_messages(row["prompt"], "user") if "prompt" in row else None
        chosen, rejected = _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
        names = ("prompt", "chosen", "rejected")
    problems = message_problems(chosen, names[1], **limits) + message_problems(rejected, names[2], **limits)
    if prompt is not None:
        problems += message_problems(prompt, names[0], **limits)
    if problems:
        raise RowError(problems)
    if prompt is not None and all(_starts_with(reply, prompt) for reply in (chosen, rejected)):
        # Hub sets such as ultrafeedback_binarized give the prompt and repeat it inside chosen/rejected.
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    if prompt is None:
        # Implicit prompt: the longest shared beginning of the two conversations, cut back to end on a user turn.
        shared = _common_prefix_length(chosen, rejected)
        while shared and chosen[shared - 1]["role"] != "user":
            shared -= 1
        if not shared:
            raise RowError([("chosen", "chosen and rejected share no prompt (no common turns ending with a user turn)")])
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not chosen or not rejected:
            raise RowError([("chosen", "chosen and rejected are identical")])
    problems = order_problems(prompt, names[0], ends_with="user")
    for name, reply in ((names[1], chosen), (names[2], rejected)):
        if any(m["role"] != "assistant" for m in reply):
            problems.append((name, "must hold only the assistant reply to the prompt"))
    if not problems and [(m["content"] or "").strip() for m in chosen] == [(m["content"] or "").strip() for m in rejected] \
            and [m.get("tool_calls") for m in chosen] == [m.get("tool_calls") for m in rejected]:
        problems.append((names[1], f"{names[1]} is identical to {names[2]}"))
    if problems:
        raise RowError(problems)
    return PreferencePair(clean_messages(prompt), clean_messages(chosen), clean_messages(rejected),
                          meta | {"format": kind}, tools)


def clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked messages with only the keys templates read; a message that only calls tools has content ""."""
    out = []
    for message in messages:
        clean = {"role": message["role"], "content": message.get("content") or ""}
        if message.get("tool_calls"):
            clean["tool_calls"] = clean_tool_calls(message["tool_calls"])
        clean |= {key: message[key] for key in ("tool_call_id", "name") if message["role"] == "tool" and key in message}
        out.append(clean)
    return out
