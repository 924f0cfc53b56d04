"""Dataset builders: every reply complies, comparisons at every round, nothing crosses the split."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from faults import kill_after_first_move

from dialogrl.data import builders
from dialogrl.data import constraints as catalogue
from dialogrl.data.atomic_outputs import STAGING_DIRNAME
from dialogrl.data.build import CachedReplies, DataBuildConfig, build_all
from dialogrl.data.corpora import load_chitchat


@pytest.fixture(scope="module")
def windows():
    dialogues = load_chitchat("train", min_rounds=4)[:300]
    return builders.make_windows(dialogues, builders.DialogueConfig(), random.Random(0))


def test_windows_carry_compatible_seen_rules_with_train_phrasings(windows):
    assert len(windows) >= 300
    for window in windows:
        assert 4 <= window.rounds <= 8
        assert 1 <= len(window.constraints) <= 3
        names = [c.type_name for c in window.constraints]
        assert len(set(names)) == len(names)
        for i, a in enumerate(window.constraints):
            assert a.type_name not in catalogue.HELD_OUT_TYPES and a.phrasing_split == "train"
            for b in window.constraints[i + 1:]:
                assert b.type_name not in a.type.conflicts
    user_stated = [w for w in windows if any(c.type.introduced_by == "user" for c in w.constraints)]
    assert 0.15 < len(user_stated) / len(windows) < 0.45


def test_eval_dialogues_are_refused():
    with pytest.raises(ValueError, match="eval split"):
        builders.make_windows(load_chitchat("eval", min_rounds=4)[:3], builders.DialogueConfig(), random.Random(0))


def test_sft_replies_comply_from_the_round_each_rule_starts(windows):
    stats = builders.BuildStats()
    rows = builders.build_sft(windows[:120], rejects=[], stats=stats)
    assert stats.built == len(rows) and len(rows) + sum(stats.skipped.values()) == 120 and len(rows) > 100
    for row in rows:
        messages = row["messages"]
        constraints = [catalogue.Constraint.from_dict(c) for c in row["meta"]["constraints"]]
        system_rules = [c for c in constraints if c.type.introduced_by == "system"]
        assert all(c.instruction in messages[0]["content"] for c in system_rules)
        for r in range(1, row["meta"]["rounds"] + 1):
            reply = messages[2 * r]["content"]
            for c, intro in zip(constraints, row["meta"]["intro_round"], strict=True):
                if intro <= r:
                    assert c.check(reply).strict, (c.type_name, reply)
                if c.type.introduced_by == "user" and intro == r:
                    assert messages[2 * r - 1]["content"].startswith(c.instruction)


def test_preference_pairs_cover_every_round_and_violate_a_standing_rule(windows):
    config = builders.PreferenceSetConfig(pairs=600)
    rows, stats = builders.build_preferences(windows, config, random.Random(1), rejects=[])
    assert len(rows) == 600
    by_round = Counter(row["meta"]["turn_index"] for row in rows)
    assert set(by_round) == set(range(1, 9))
    # Balanced: the rarest round (8) is not swamped by round 1.
    assert by_round[8] >= 0.5 * by_round[1] or by_round[8] == stats.rounds[8]
    for row in rows:
        r = row["meta"]["turn_index"]
        assert sum(m["role"] == "user" for m in row["prompt"]) == r and row["prompt"][-1]["role"] == "user"
        active = [catalogue.Constraint.from_dict(c) for c, intro in
                  zip(row["meta"]["constraints"], row["meta"]["intro_round"], strict=True) if intro <= r]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert all(c.check(chosen).strict for c in active)
        assert any(not c.check(rejected).strict for c in active)
        assert set(row["meta"]["violated"]) <= {c.type_name for c in active}
    kinds = Counter(row["meta"]["rejected_kind"] for row in rows)
    assert kinds["natural"] > 0 and kinds["partial"] > 0


def test_edit_records_become_pairs(tmp_path):
    from dialogrl.data.sources import load_records

    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "draft": "Hello!!!",
                                "edited": "hello."}) + "\n")
    records, _ = load_records(str(path))
    (pair,) = builders.edit_pairs(records)
    assert pair["chosen"] == [{"role": "assistant", "content": "hello."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Hello!!!"}]


def test_build_all_writes_sets_manifest_and_rejects(tmp_path, tiny_model_dir):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "draft": "a", "edited": "b"})
                     + "\n" + json.dumps({"messages": [], "draft": "a", "edited": "b"}) + "\n")
    config = DataBuildConfig(
        output_dir=str(tmp_path / "out"), max_length=600, edits=[str(edits)], on_invalid="skip",
        sft=builders.SFTSetConfig(conversations=40), preferences=builders.PreferenceSetConfig(pairs=80),
    )
    manifest = build_all(config, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), log=lambda _m: None)
    out = tmp_path / "out"
    sft = load_from_disk(str(out / "sft"))
    assert len(sft) == manifest["sft"]["rows"] == len((out / "sft.jsonl").read_text().splitlines())
    assert manifest["held_out_types_used"] == []
    assert manifest["edits"]["rows"] == 1
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    # max_length=600 is tight on purpose: long windows must show up as rejects, not vanish.
    too_long = [r for r in rejects if "over max_length 600" in r["reason"]]
    assert manifest["sft"]["rows"] > 0
    assert too_long and manifest["sft"]["skipped"].get("too long or unrenderable after tokenisation")
    assert any(r["set"] == "edits" for r in rejects)
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_policy_samples_are_cached_per_sample_and_model(tmp_path):
    calls = []

    def fake_generate(batch):
        calls.append(len(batch))
        return [f"reply {len(calls)}.{i}" for i in range(len(batch))]

    cache_path = tmp_path / "cache.jsonl"
    histories = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    first = CachedReplies(fake_generate, cache_path, "model-a")(histories, 2)
    assert [len(r) for r in first] == [2, 2, 2] and len({x for r in first for x in r}) == 6
    again = CachedReplies(fake_generate, cache_path, "model-a")
    assert again(histories, 2) == first and calls == [6] and again.hits == 6
    assert again(histories, 3)[0][:2] == first[0] and calls == [6, 3]  # one more sample each: only it is new
    CachedReplies(fake_generate, cache_path, "model-b")(histories, 2)  # another model: generate again
    assert calls == [6, 3, 6]


def test_manifest_counts_match_the_rows_written(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    config = DataBuildConfig(output_dir=str(tmp_path / "out"), max_length=700,
                             sft=builders.SFTSetConfig(conversations=30),
                             preferences=builders.PreferenceSetConfig(pairs=120))
    manifest = build_all(config, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), log=lambda _m: None)
    prefs = [json.loads(line) for line in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    by_round = Counter(str(p["meta"]["turn_index"]) for p in prefs)
    assert {k: v for k, v in manifest["preferences"]["rounds"].items() if v} == dict(by_round)
    assert manifest["preferences"]["built"] == len(prefs)
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    types = Counter(c["type_name"] for row in sft for c in row["meta"]["constraints"])
    assert {k: v for k, v in manifest["sft"]["constraint_types"].items() if v} == dict(types)


def _small_build(out, seed=0):
    return DataBuildConfig(output_dir=str(out), max_length=None, seed=seed,
                           sft=builders.SFTSetConfig(conversations=6), preferences=builders.PreferenceSetConfig(pairs=12))


def test_a_rebuild_killed_while_writing_leaves_the_previous_build_whole(tmp_path, monkeypatch):
    from dialogrl.data import build

    out = tmp_path / "out"
    first = build_all(_small_build(out), log=lambda _m: None)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_save = build._save

    def crash_on_preferences(rows, directory, name, columns):
        if name == "preferences":
            raise KeyboardInterrupt("killed")
        real_save(rows, directory, name, columns)

    monkeypatch.setattr(build, "_save", crash_on_preferences)
    with pytest.raises(KeyboardInterrupt):
        build_all(_small_build(out, seed=1), log=lambda _m: None)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()
             if STAGING_DIRNAME not in p.parts}
    assert after == before and json.loads((out / "manifest.json").read_text()) == first


def test_a_rebuild_killed_while_swapping_files_leaves_no_manifest(tmp_path, monkeypatch):
    out = tmp_path / "out"
    build_all(_small_build(out), log=lambda _m: None)
    kill_after_first_move(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_all(_small_build(out, seed=1), log=lambda _m: None)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()  # half old, half new: never taken for complete
    rebuilt = build_all(_small_build(out, seed=1), log=lambda _m: None)
    assert json.loads((out / "manifest.json").read_text()) == rebuilt
    assert not (out / STAGING_DIRNAME).exists()
