"""Transcripts to score: dialogues produced anywhere (another model, an API, a production log) with their rules.

One JSONL row per dialogue:

    {"id": "chat-17",                                   # unique, non-empty
     "model": "gpt-x",                                  # optional: rows are grouped by it in the report
     "messages": [{"role": "system", "content": ...},   # system optional and first, the text taken as given;
                  {"role": "user", ...}, {"role": "assistant", ...}, ...],   # then user/assistant alternating
     "rules": [{"type": "lowercase", "params": {}, "from_round": 1}, ...]}   # catalogue names; from_round >= 1

Every row is checked; a bad row is reported with its line, field and reason, kept in a
rejects file and counted, never dropped silently. `dialogrl eval score` reads this.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogrl.data.constraints import CATALOGUE, HELD_OUT_TYPES, Constraint, get_type
from dialogrl.data.records import Problem, RowError, message_problems, order_problems
from dialogrl.data.sources import DataError, LoadReport, iter_rows, write_rejects

RULE_KEYS = {"type", "params", "from_round"}


@dataclass(frozen=True)
class Transcript:
    dialogue_id: str
    model: str
    messages: list[dict[str, str]]
    rules: list[tuple[Constraint, int]]  # (rule, round from which it stands)

    @property
    def unseen(self) -> bool:
        """True when every rule is of a type held out of training (the report's seen/unseen split)."""
        return bool(self.rules) and all(c.type_name in HELD_OUT_TYPES for c, _ in self.rules)

    def standing(self, round_number: int) -> list[Constraint]:
        return [c for c, start in self.rules if start <= round_number]


def _rule_problems(rule: Any, where: str) -> tuple[Constraint | None, int, list[tuple[str, str]]]:
    if not isinstance(rule, dict):
        return None, 0, [(where, f"expected an object with type, params, from_round; got {type(rule).__name__}")]
    unknown = set(rule) - RULE_KEYS - {"instruction"}
    if unknown:
        return None, 0, [(where, f"unknown keys {sorted(unknown)}; a rule has {sorted(RULE_KEYS)} (and optional "
                                 "instruction)")]
    type_name = rule.get("type")
    if type_name not in CATALOGUE:
        close = difflib.get_close_matches(str(type_name), list(CATALOGUE), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see `dialogrl data` docs for the catalogue"
        return None, 0, [(f"{where}.type", f"unknown rule type {type_name!r}{hint}")]
    start = rule.get("from_round", 1)
    if not isinstance(start, int) or isinstance(start, bool) or start < 1:
        return None, 0, [(f"{where}.from_round", f"expected an integer >= 1, got {start!r}")]
    params = rule.get("params", {})
    expected = sorted(get_type(type_name).param_names)
    if not isinstance(params, dict) or sorted(params) != expected:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        return None, 0, [(f"{where}.params", f"{type_name} takes params {expected}, got {got}")]
    try:
        constraint = Constraint(type_name, params, str(rule.get("instruction", "")), "eval")
        constraint.check("a probe reply")  # parameters of the wrong kind fail here, not mid-report
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        return None, 0, [(f"{where}.params", f"not valid for {type_name}: {err}")]
    return constraint, start, []


def parse_transcript(row: Any, default_model: str, seen_ids: set[str]) -> Transcript:
    """One row -> a Transcript, or RowError naming every problem found."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError([("row", f"expected a JSON object, got {type(row).__name__}")])
    problems: list[tuple[str, str]] = []
    dialogue_id = row.get("id")
    if not isinstance(dialogue_id, str) or not dialogue_id.strip():
        problems.append(("id", f"expected a non-empty string, got {dialogue_id!r}"))
    elif dialogue_id in seen_ids:
        problems.append(("id", f"{dialogue_id!r} appears in an earlier row; ids must be unique"))
    model = row.get("model", default_model)
    if not isinstance(model, str) or not model.strip():
        problems.append(("model", f"expected a non-empty string, got {model!r}"))
    messages = row.get("messages")
    message_issues = message_problems(messages, "messages")
    if not message_issues:
        message_issues = order_problems(messages, "messages", ends_with=None)
        if not message_issues and not any(m["role"] == "assistant" for m in messages):
            message_issues = [("messages", "has no assistant turn to score")]
    problems += message_issues
    rules_value = row.get("rules", [])
    rules: list[tuple[Constraint, int]] = []
    if not isinstance(rules_value, list):
        problems.append(("rules", f"expected a list of rules, got {type(rules_value).__name__}"))
    else:
        for i, rule in enumerate(rules_value):
            constraint, start, rule_issues = _rule_problems(rule, f"rules[{i}]")
            problems += rule_issues
            if constraint is not None:
                rules.append((constraint, start))
    if problems:
        raise RowError(problems)
    seen_ids.add(dialogue_id)
    return Transcript(dialogue_id, model, [{"role": m["role"], "content": m["content"]} for m in messages], rules)


def load_transcripts(source: str | Path, rejects_path: str | Path) -> tuple[list[Transcript], LoadReport]:
    """Every valid row of a transcript file; bad rows go to `rejects_path`, counted in the report."""
    source = str(source)
    report = LoadReport(source)
    default_model = Path(source).stem
    transcripts, rejects, seen_ids = [], [], set()
    try:
        for number, row in iter_rows(source):
            report.rows += 1
            try:
                transcripts.append(parse_transcript(row, default_model, seen_ids))
                report.kept += 1
            except RowError as err:
                report.rejected_rows += 1
                report.problems += [Problem(source, number, f, r) for f, r in err.problems]
                rejects.append({"row": number, "problems": [{"field": f, "reason": r} for f, r in err.problems],
                                "data": row if not isinstance(row, RowError) else None})
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not valid UTF-8 (byte {err.start}); save the file as UTF-8") from None
    if rejects:
        report.rejects_path = str(write_rejects(rejects, rejects_path))
    return transcripts, report
