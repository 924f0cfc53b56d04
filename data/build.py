"""`dialogrl data build`: write the SFT, preference and edit sets with a manifest.

Outputs in `output_dir`:
  sft/, sft.jsonl                  conversations with every reply compliant
  preferences/, preferences.jsonl  one comparison per (window, round), balanced over rounds
  edits/, edits.jsonl              user-edit pairs (when edit sources are given)
  manifest.json                    counts, constraint-type and round distributions, skips by reason
  rejects.jsonl                    every skipped candidate and invalid input row, with its reason
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dialogrl.data import builders, curriculum, on_policy
from dialogrl.data import constraints as catalogue
from dialogrl.data.atomic_outputs import publish, staging_dir
from dialogrl.data.corpora import CORPORA, load_chitchat
from dialogrl.data.options import option

MANIFEST_FILENAME = "manifest.json"  # published last: a directory with it holds a complete build


@dataclass
class DataBuildConfig:
    output_dir: str = option("outputs/data", help="Directory the datasets, manifest and rejects are written to.")
    seed: int = option(0, help="Seed for windows, rules and pair sampling; the same seed gives the same sets.")
    corpus: str = option("chitchat", help=f"Dialogue corpus the user turns and human replies come from: {', '.join(CORPORA)}.")
    max_length: int | None = option(
        2048, help="Token limit per conversation under the model's chat template; longer rows are rejected "
        "(counted and written to rejects.jsonl). null: no limit."
    )
    dialogue: builders.DialogueConfig = option(
        default_factory=builders.DialogueConfig, help="Dialogue windows and the rules they carry."
    )
    sft: builders.SFTSetConfig = option(default_factory=builders.SFTSetConfig, help="The SFT set.")
    preferences: builders.PreferenceSetConfig = option(
        default_factory=builders.PreferenceSetConfig, help="The per-turn preference set."
    )
    edits: list[str] = option(
        default_factory=list, help="Sources of user-edit records {messages, draft, edited} (JSONL, JSON, Parquet, "
        "dataset dirs); each becomes a pair with the edit chosen over the draft."
    )
    on_invalid: Literal["error", "skip"] = option(
        "error", help="Invalid rows in edit sources: error stops the build; skip writes them to rejects.jsonl."
    )

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; built-in corpora: {', '.join(CORPORA)}")
        if self.max_length is not None and self.max_length < 16:
            raise ValueError(f"max_length must be >= 16 tokens or null, got {self.max_length}")


ReplyFn = Callable[[list[list[dict[str, str]]]], list[str]]
# Under a data build's output_dir. Its entries are keyed by what made them (model, messages, sample index),
# not by the recipe, so a rebuild for another recipe keeps it and samples only what it has not seen.
CACHE_DIR = "cache"


class CachedReplies:
    """k sampled replies per history from a batched reply generator, cached on disk so a rerun (or an
    interrupted build) does not generate them again.

    The key is the model's identity, the exact messages and the sample's index; the
    cache is an append-only JSONL file, safe to interrupt. The generator gets the k
    copies of a history in one batch, so they are k independent samples.
    """

    def __init__(self, generate: ReplyFn, path: str | Path, model_key: str):
        self.generate = generate
        self.path = Path(path)
        self.model_key = model_key
        self.cache: dict[str, str] = {}
        self.hits = self.misses = 0
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["reply"]

    def _key(self, messages: list[dict[str, str]], index: int) -> str:
        payload = json.dumps([self.model_key, messages, index], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def __call__(self, histories: Sequence[list[dict[str, str]]], k: int) -> list[list[str]]:
        keys = [[self._key(h, j) for j in range(k)] for h in histories]
        missing = [(i, j) for i, row in enumerate(keys) for j, key in enumerate(row) if key not in self.cache]
        self.hits += len(histories) * k - len(missing)
        self.misses += len(missing)
        if missing:
            generated = self.generate([histories[i] for i, _ in missing])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                for (i, j), reply in zip(missing, generated, strict=True):
                    self.cache[keys[i][j]] = reply
                    handle.write(json.dumps({"key": keys[i][j], "reply": reply}, ensure_ascii=False) + "\n")
        return [[self.cache[key] for key in row] for row in keys]


def _save(rows: list[dict[str, Any]], output_dir: Path, name: str, columns: Sequence[str]) -> None:
    from datasets import Dataset

    with (output_dir / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    # Metadata is kept as a JSON string column: its nested shape varies from row to row.
    table = [{k: (json.dumps(v, ensure_ascii=False) if k == "meta" else v) for k, v in row.items()} for row in rows]
    dataset = Dataset.from_list(table) if table else Dataset.from_dict({c: [] for c in columns})
    dataset.save_to_disk(str(output_dir / name))


def _sequences(row: dict[str, Any]) -> list[list[dict[str, str]]]:
    """The conversations a row is trained on: itself, or both sides of a pair."""
    if "messages" in row:
        return [row["messages"]]
    return [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]


def _drop_overlong(rows, tokenizer, max_length, name, rejects, stats: builders.BuildStats) -> list[dict[str, Any]]:
    """Rows the template cannot render or that exceed max_length go to the rejects, and out of the counts."""
    if tokenizer is None or max_length is None or not rows:
        return rows
    from dialogrl.data.tokenized import tokenize_conversations

    errors = iter(tokenize_conversations(
        tokenizer, [seq for row in rows for seq in _sequences(row)], max_length=max_length)["error"])
    kept = []
    for row in rows:
        row_errors = [error for error in (next(errors) for _ in _sequences(row)) if error]
        if not row_errors:
            kept.append(row)
            continue
        meta = row["meta"]
        stats.built -= 1
        stats.rounds[meta.get("turn_index", meta.get("rounds"))] -= 1
        stats.constraint_types.subtract(meta.get("active_constraints") or [c["type_name"] for c in meta["constraints"]])
        stats.skipped["too long or unrenderable after tokenisation"] += 1
        rejects.append({"set": name, "reason": "; ".join(row_errors), "meta": meta})
    return kept


def _sft_set(config: DataBuildConfig, windows, tokenizer, rng, rejects, sample, judge, log):
    """The SFT rows (with the curriculum's floor per type), their stats and report, and on-policy pairs."""
    stats, pairs = builders.BuildStats(), []
    counts = on_policy.SamplingCounts()
    if config.sft.reply_source == "policy" and (sample is None or judge is None):
        raise ValueError("sft.reply_source is 'policy' but no model was given to sample and judge replies")

    def build_chunk(chunk: list[builders.Window]) -> list[dict[str, Any]]:
        if config.sft.reply_source == "corpus":
            rows = builders.build_sft(chunk, rejects=rejects, stats=stats)
        else:
            rows = []
            for dialogue in on_policy.sample_dialogues(chunk, sample, judge, samples_per_turn=config.sft.samples_per_turn,
                                                       counts=counts, log=log):
                pairs.extend(dialogue.pairs)
                if len(dialogue.outcomes) < config.sft.min_rounds_kept:
                    reason = f"{len(dialogue.outcomes)} rounds before round {dialogue.dropped_at}: {dialogue.drop_reason}"
                    stats.skipped["cut too short by a turn with no usable target"] += 1
                    rejects.append({"set": "sft", "window": dialogue.window.key, "reason": reason,
                                    "meta": dialogue.window.meta()})
                    continue
                row = on_policy.sft_row(dialogue)
                rows.append(row)
                stats.built += 1
                stats.rounds[row["meta"]["rounds"]] += 1
                stats.constraint_types.update(c.type_name for c in dialogue.window.constraints)
        return _drop_overlong(rows, tokenizer, config.max_length, "sft", rejects, stats)

    rows, report = curriculum.build_with_quota(windows, build_chunk, target=config.sft.conversations,
                                               minimum=config.sft.min_dialogues_per_type, config=config.dialogue,
                                               rng=rng, log=log)
    if len(rows) < config.sft.conversations:
        stats.skipped["fewer usable windows than requested"] = config.sft.conversations - len(rows)
    if report["built_beyond_target"]:
        stats.skipped["not needed (the set was full)"] = report["built_beyond_target"]
    # Chunks are built whole and the last one trimmed: count what was kept.
    stats.built = len(rows)
    stats.rounds = Counter(row["meta"]["rounds"] for row in rows)
    stats.constraint_types = Counter(t for row in rows for t in curriculum.row_types(row))
    report = {"curriculum": report, "reply_source": config.sft.reply_source}
    if config.sft.reply_source == "policy":
        report["on_policy"] = counts.to_dict() | {"samples_per_turn": config.sft.samples_per_turn}
    return rows, stats, report, pairs


def build_all(config: DataBuildConfig, *, tokenizer=None, sample: on_policy.SampleFn | None = None,
              judge: on_policy.VerdictFn | None = None, log=print, record: dict[str, Any] | None = None) -> dict:
    """Build every set described by `config`; returns the manifest (also written to disk). `sample` and
    `judge` draw and judge policy replies (sft.reply_source: policy). `record` is added to the manifest (the
    build's fingerprint and output id)."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    dialogues = load_chitchat("train", min_rounds=config.dialogue.min_rounds)
    windows = builders.make_windows(dialogues, config.dialogue, rng)
    log(f"{len(dialogues)} train dialogues -> {len(windows)} windows of "
        f"{config.dialogue.min_rounds}-{config.dialogue.max_rounds} rounds")
    rejects: list[dict[str, Any]] = []

    sft_rows, sft_stats, sft_report, policy_pairs = _sft_set(config, windows, tokenizer, rng, rejects, sample,
                                                             judge, log)
    log(f"sft: {len(sft_rows)} conversations")

    on_policy_weight = config.preferences.rejected.get("on_policy", 0.0)
    on_policy_share = on_policy_weight / sum(config.preferences.rejected.values())
    if on_policy_share and config.sft.reply_source != "policy":
        raise ValueError("preferences.rejected.on_policy needs sft.reply_source: policy (the pairs come from its "
                         "samples)")
    wanted_on_policy = round(config.preferences.pairs * on_policy_share)
    by_round: dict[int, list[dict[str, Any]]] = {}
    for pair in _drop_overlong(policy_pairs, tokenizer, config.max_length, "preferences", rejects,
                               builders.BuildStats()):
        by_round.setdefault(pair["meta"]["turn_index"], []).append(pair)
    on_policy_rows = builders.balance_over_rounds(by_round, wanted_on_policy, rng)
    pref_rows, pref_stats = builders.build_preferences(windows, config.preferences, rng, rejects=rejects,
                                                       pairs=config.preferences.pairs - len(on_policy_rows))
    pref_rows = _drop_overlong(pref_rows, tokenizer, config.max_length, "preferences", rejects, pref_stats)
    for row in on_policy_rows:
        pref_stats.built += 1
        pref_stats.rounds[row["meta"]["turn_index"]] += 1
        pref_stats.constraint_types.update(row["meta"]["active_constraints"])
    pref_rows += on_policy_rows
    # A training source's `limit` keeps the first rows, so the kinds are interleaved: appended, a limit would
    # cut the on-policy pairs first.
    rng.shuffle(pref_rows)
    log(f"preferences: {len(pref_rows)} pairs ({len(on_policy_rows)} on-policy)")

    edit_rows, edit_reports = [], []
    for source in config.edits:
        from dialogrl.data.sources import load_records

        records, report = load_records(source, on_invalid=config.on_invalid)
        edit_rows += builders.edit_pairs(records)
        edit_reports.append(report.to_dict())
        rejects += [{"set": "edits", "reason": str(p), "meta": {"source": p.source, "row": p.row}}
                    for p in report.problems]

    builders.assert_training_safe(sft_rows, "sft")
    builders.assert_training_safe(pref_rows, "preferences")
    staging = staging_dir(output_dir)
    _save(sft_rows, staging, "sft", ("messages", "meta"))
    _save(pref_rows, staging, "preferences", ("prompt", "chosen", "rejected", "meta"))
    if config.edits:
        _save(edit_rows, staging, "edits", ("prompt", "chosen", "rejected", "meta"))
    with (staging / "rejects.jsonl").open("w", encoding="utf-8") as handle:
        for reject in rejects:
            handle.write(json.dumps(reject, ensure_ascii=False, default=str) + "\n")

    used_types = set(sft_stats.constraint_types) | set(pref_stats.constraint_types)
    manifest = {
        "corpus": config.corpus,
        "split": "train",
        "seed": config.seed,
        "windows": len(windows),
        "sft": sft_stats.to_dict() | sft_report | {"rows": len(sft_rows), "min_assistant_turns": min(
            (sum(m["role"] == "assistant" for m in r["messages"]) for r in sft_rows), default=0)},
        "preferences": pref_stats.to_dict() | {"rows": len(pref_rows), "rejected_kinds": dict(Counter(
            r["meta"]["rejected_kind"] for r in pref_rows)), "on_policy_available": len(policy_pairs)},
        "edits": {"rows": len(edit_rows), "sources": edit_reports},
        "held_out_types": sorted(catalogue.HELD_OUT_TYPES),
        "held_out_types_used": sorted(used_types & set(catalogue.HELD_OUT_TYPES)),
        "rejects": len(rejects),
        "seconds": round(time.perf_counter() - started, 1),
        **(record or {}),
    }
    (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
    publish(staging, output_dir, MANIFEST_FILENAME)
    return manifest
