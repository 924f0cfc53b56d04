"""Rows for the TRL trainers, tokenised by the project's chat-template tokeniser.

TRL would tokenise conversations itself, but its assistant-only loss works only
for templates it knows (SmolLM2's ChatML is refused). So every stage hands TRL
pre-tokenised columns built by `dialogrl.data.chat_tokens.ChatTokenizer`:

- sft:    input_ids, assistant_masks (1 on every assistant turn and its end token)
- reward: chosen_ids, rejected_ids (the conversation up to the compared reply's end token)
- dpo:    prompt_ids, chosen_ids, rejected_ids (the reply and its end token)

Nothing is cut or dropped silently: rows that fail validation, do not render,
exceed `max_length` or are the wrong kind for the stage are counted per source
and written to `rejects.jsonl` with their source, row number and reason.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dialogrl.data.chat_tokens import ChatTokenizer
from dialogrl.data.records import Conversation, PreferencePair, Record
from dialogrl.data.sources import DataError, load_records
from dialogrl.data.tokenized import tokenize_conversations
from dialogrl.training.stage_config import DataSource, TrainData

StageKind = Literal["sft", "reward", "dpo"]
REJECTS_FILENAME = "rejects.jsonl"


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with the stage's columns (+ turn_index for pairs)
    eval: Any | None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Rejects:
    path: Path
    counts: Counter = field(default_factory=Counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record_source: str, row: Any, reason: str, kind: str, record: Any = None) -> None:
        self.counts[kind] += 1
        self.rows.append({"source": record_source, "row": row, "reason": reason, "record": record})

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", encoding="utf-8") as handle:
            for row in self.rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def dialogue_group(record: Record) -> str:
    """Rows cut from one dialogue (its per-turn pairs, say) share this key, so a held-out split keeps them together."""
    messages = record.messages if isinstance(record, Conversation) else record.prompt
    first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
    return hashlib.sha256(first_user.encode("utf-8")).hexdigest()


def _held_out(record: Record, fraction: float) -> bool:
    return int(dialogue_group(record)[:12], 16) / 16**12 < fraction


def _read_source(source: DataSource, data: TrainData, chat: ChatTokenizer, rejects: _Rejects) -> tuple[list[Record], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            records, report = load_records(
                source.path, split=source.split, on_invalid=data.on_invalid, limit=source.limit,
                forbidden_substrings=chat.special_tokens, rejects_path=Path(tmp) / "invalid.jsonl",
            )
        except DataError as err:
            raise DataError(f"data source {source.path} (split {source.split}): {err}") from None
        if report.rejects_path:
            for line in Path(report.rejects_path).read_text(encoding="utf-8").splitlines():
                bad = json.loads(line)
                reason = "; ".join(f"{p['field']}: {p['reason']}" for p in bad["problems"])
                rejects.add(source.path, bad["row"], reason, "invalid", bad["record"])
    for record in records:
        record.meta["source"] = source.path
    return records, {"path": source.path, "split": source.split, "rows": report.rows, "invalid": report.rejected_rows}


def _wrong_kind(record: Record, stage: StageKind) -> str | None:
    if stage == "sft":
        return None if isinstance(record, Conversation) else "a preference pair; the sft stage trains on conversations"
    if not isinstance(record, PreferencePair):
        return f"a conversation; the {stage} stage trains on preference pairs (prompt, chosen, rejected)"
    for name, reply in (("chosen", record.chosen), ("rejected", record.rejected)):
        if len(reply) != 1:
            return f"{name} holds {len(reply)} messages; a pair compares one assistant reply after the prompt"
    return None


def _sft_columns(tokens: dict[str, Any]) -> dict[str, Any]:
    return {"input_ids": tokens["input_ids"], "assistant_masks": tokens["assistant_mask"]}


def _last_span(mask: list[int]) -> tuple[int, int]:
    end = len(mask) - mask[::-1].index(1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end


def _pair_columns(chosen: dict[str, Any], rejected: dict[str, Any], stage: StageKind) -> dict[str, Any] | str:
    c_start, c_end = _last_span(chosen["assistant_mask"])
    r_start, r_end = _last_span(rejected["assistant_mask"])
    if chosen["input_ids"][:c_start] != rejected["input_ids"][:r_start]:
        return "the prompt renders to different tokens before the chosen and the rejected reply"
    if stage == "dpo":
        return {"prompt_ids": chosen["input_ids"][:c_start], "chosen_ids": chosen["input_ids"][c_start:c_end],
                "rejected_ids": rejected["input_ids"][r_start:r_end]}
    # Reward rows end on the reply's end token, so the score is read there, as in per-turn scoring (PPO).
    return {"chosen_ids": chosen["input_ids"][:c_end], "rejected_ids": rejected["input_ids"][:r_end]}


def _tokenize(records: list[Record], stage: StageKind, chat: ChatTokenizer, max_length: int, rejects: _Rejects):
    """Stage columns for every record that renders within max_length; the others go to `rejects`."""
    from datasets import Dataset

    if stage == "sft":
        sequences = [r.messages for r in records]
    else:
        sequences = [seq for r in records for seq in (r.prompt + r.chosen, r.prompt + r.rejected)]
    per_record = 1 if stage == "sft" else 2
    tools = [r.tools for r in records for _ in range(per_record)]
    columns = tokenize_conversations(chat, sequences, tools=tools, max_length=max_length).to_dict() if sequences else {}
    rows = []
    for i, record in enumerate(records):
        parts = [{name: values[i * per_record + j] for name, values in columns.items()} for j in range(per_record)]
        errors = [p["error"] for p in parts if p["error"]]
        if errors:
            kind = "too_long" if any("over max_length" in e for e in errors) else "unrenderable"
            rejects.add(record.meta["source"], record.meta.get("source_row"), "; ".join(errors), kind, _plain(record))
            continue
        if stage == "sft":
            rows.append(_sft_columns(parts[0]))
            continue
        pair = _pair_columns(parts[0], parts[1], stage)
        if isinstance(pair, str):
            rejects.add(record.meta["source"], record.meta.get("source_row"), pair, "unrenderable", _plain(record))
            continue
        rows.append(pair | {"turn_index": record.turn_index})
    if not rows:
        return None
    return Dataset.from_list(rows)


def _plain(record: Record) -> dict[str, Any]:
    tools = {"tools": record.tools} if record.tools else {}
    if isinstance(record, Conversation):
        return {"messages": record.messages} | tools
    return {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected} | tools


def prepare_data(data: TrainData, stage: StageKind, chat: ChatTokenizer, output_dir: str | Path, *,
                 write_rejects: bool = True) -> PreparedData:
    """Read, check, split and tokenise every source of `data` for `stage`; write rejects.jsonl.

    Under several processes every one prepares the same rows and only the main one writes.
    """
    rejects = _Rejects(Path(output_dir) / REJECTS_FILENAME)
    split_records: dict[str, list[Record]] = {"train": [], "eval": []}
    sources: dict[str, list[dict]] = {"train": [], "eval": []}
    for role, role_sources in (("train", data.train), ("eval", data.eval)):
        for source in role_sources:
            records, info = _read_source(source, data, chat, rejects)
            kept = []
            for record in records:
                reason = _wrong_kind(record, stage)
                if reason is None:
                    kept.append(record)
                else:
                    rejects.add(source.path, record.meta.get("source_row"), f"row is {reason}", "wrong_kind",
                                _plain(record))
            info["wrong_kind"] = len(records) - len(kept)
            sources[role].append(info)
            split_records[role].extend(kept)
    if not data.eval and data.eval_fraction > 0:
        train = split_records["train"]
        split_records["eval"] = [r for r in train if _held_out(r, data.eval_fraction)]
        split_records["train"] = [r for r in train if not _held_out(r, data.eval_fraction)]

    before = rejects.counts.copy()
    train = _tokenize(split_records["train"], stage, chat, data.max_length, rejects)
    after_train = rejects.counts.copy()
    evaluation = _tokenize(split_records["eval"], stage, chat, data.max_length, rejects)
    if write_rejects:
        rejects.write()
    if train is None:
        raise DataError(f"no usable training rows for the {stage} stage: {dict(rejects.counts) or 'the sources are empty'}"
                        f"; see {rejects.path}")

    def counts(dataset, records, dropped: Counter) -> dict[str, Any]:
        out = {"rows": 0 if dataset is None else len(dataset), "read": len(records),
               "too_long": dropped["too_long"], "unrenderable": dropped["unrenderable"]}
        if dataset is not None and "turn_index" in dataset.column_names:
            out["by_turn"] = dict(sorted(Counter(dataset["turn_index"]).items()))
        return out

    summary = {
        "stage": stage,
        "max_length": data.max_length,
        "sources": sources,
        "train": counts(train, split_records["train"], after_train - before),
        "eval": counts(evaluation, split_records["eval"], rejects.counts - after_train),
        "eval_from": "sources" if data.eval else f"{data.eval_fraction:.0%} of training dialogues",
        "rejects": dict(rejects.counts),
        "rejects_path": str(rejects.path),
    }
    return PreparedData(train, evaluation, summary)


def describe_data(summary: dict[str, Any]) -> str:
    """One line for the console: what was read, what is used, what was set aside."""
    train, evaluation = summary["train"], summary["eval"]
    rejected = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(summary["rejects"].items())) or "none"
    padding = train.get("padding_share")
    padding = (f"; padding share {padding['random_order']:.0%} in random order, {padding['length_grouped']:.0%} "
               "length-grouped" if padding else "")
    return (f"{summary['stage']} data: {train['rows']} training rows, {evaluation['rows']} held-out rows "
            f"(max_length {summary['max_length']}); set aside: {rejected}"
            + (f" -> {summary['rejects_path']}" if summary["rejects"] else "") + padding)
