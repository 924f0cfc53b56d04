"""Tool use in dialogue rows: OpenAI-style `tools`, assistant `tool_calls` and `role: tool` results.

The internal form is the one Hugging Face chat templates read:

    tools:       [{"type": "function", "function": {"name", "description"?, "parameters"?}}]
    tool call:   {"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}
    tool result: {"role": "tool", "content": str, "tool_call_id"?: str, "name"?: str}

OpenAI's API sends `arguments` as a JSON string; templates expect a mapping
(Llama 3.1 and Qwen 2.5 apply `tojson` to it, so a string would be encoded
twice), so a string is parsed here and a string that is not a JSON object is a
problem of its row. Every check returns (field, reason) pairs, as records.py does.
"""

from __future__ import annotations

import json
from typing import Any

Problems = list[tuple[str, str]]


def _function_entry(entry: Any, at: str, shape: str) -> tuple[dict[str, Any] | None, Problems]:
    """The `function` object of a tool definition or call, and the problems of its type and name."""
    function = entry.get("function") if isinstance(entry, dict) else None
    if not isinstance(function, dict):
        return None, [(at, f'expected {{"type": "function", "function": {shape}}}')]
    problems: Problems = []
    if entry.get("type", "function") != "function":
        problems.append((f"{at}.type", f"only function tools are supported, got {entry.get('type')!r}"))
    if not isinstance(function.get("name"), str) or not function["name"].strip():
        problems.append((f"{at}.function.name", "expected a non-empty string"))
    return function, problems


def tools_problems(tools: Any, field_name: str = "tools") -> Problems:
    if not isinstance(tools, list):
        return [(field_name, f"expected a list of tool definitions, got {type(tools).__name__}")]
    problems: Problems = []
    for i, tool in enumerate(tools):
        where = f"{field_name}[{i}]"
        function, found = _function_entry(tool, where, '{"name": ..., "parameters": ...}')
        problems += found
        if function is not None and "parameters" in function and not isinstance(function["parameters"], dict):
            problems.append((f"{where}.function.parameters", "expected a JSON schema object"))
    return problems


def tool_names(tools: list[dict[str, Any]] | None) -> set[str] | None:
    return None if tools is None else {t["function"]["name"] for t in tools}


def tool_call_problems(calls: Any, where: str, known_tools: set[str] | None) -> Problems:
    """Problems of one assistant message's `tool_calls` (`where` names the message)."""
    field_name = f"{where}.tool_calls"
    if not isinstance(calls, list) or not calls:
        return [(field_name, "expected a non-empty list of tool calls")]
    problems: Problems = []
    for j, call in enumerate(calls):
        at = f"{field_name}[{j}]"
        function, found = _function_entry(call, at, '{"name": ..., "arguments": {...}}')
        problems += found
        if function is None:
            continue
        if "id" in call and not isinstance(call["id"], str):
            problems.append((f"{at}.id", f"expected a string, got {type(call['id']).__name__}"))
        name = function.get("name")
        if known_tools is not None and isinstance(name, str) and name.strip() and name not in known_tools:
            problems.append((f"{at}.function.name", f"calls {name!r}, which the row's tools do not define "
                                                    f"(defined: {', '.join(sorted(known_tools)) or 'none'})"))
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                problems.append((f"{at}.function.arguments", f"is not valid JSON ({err.msg} at character {err.pos})"))
                continue
        if not isinstance(arguments, dict):
            problems.append((f"{at}.function.arguments", f"expected a JSON object, got {type(arguments).__name__}"))
    return problems


def clean_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked tool calls in the internal form: arguments as a mapping, only known keys kept."""
    out = []
    for call in calls:
        function = call["function"]
        arguments = function["arguments"]
        clean = {"type": "function",
                 "function": {"name": function["name"],
                              "arguments": json.loads(arguments) if isinstance(arguments, str) else dict(arguments)}}
        if "id" in call:
            clean["id"] = call["id"]
        out.append(clean)
    return out


def tool_result_problems(message: dict[str, Any], where: str, open_calls: int) -> Problems:
    """A tool message must answer a call of the assistant message before it, with a string result."""
    problems: Problems = []
    if open_calls <= 0:
        problems.append((f"{where}.role", "a tool result must follow an assistant message with tool_calls "
                                          "(one result per call)"))
    if not isinstance(message.get("content"), str):
        problems.append((f"{where}.content", f"expected the tool's output as a string, got "
                                             f"{type(message.get('content')).__name__}"))
    for key in ("tool_call_id", "name"):
        if key in message and not isinstance(message[key], str):
            problems.append((f"{where}.{key}", f"expected a string, got {type(message[key]).__name__}"))
    return problems
