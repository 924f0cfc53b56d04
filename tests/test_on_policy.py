"""On-policy SFT data: rejection sampling under the evaluator's verdict, the pairs it yields, the curriculum."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from dialogrl.data import builders, curriculum, on_policy
from dialogrl.data import constraints as catalogue
from dialogrl.data.build import DataBuildConfig, build_all
from dialogrl.data.corpora import load_chitchat
from dialogrl.evaluation.gate import GateConfig
from dialogrl.evaluation.verdicts import judge_replies
from dialogrl.training.data_stage import _verdict


def _judge(candidates):
    return [_verdict(turn) for turn in judge_replies(candidates, GateConfig())]


def _window(rule: str, rounds: int = 3) -> builders.Window:
    dialogue = next(d for d in load_chitchat("train", min_rounds=4) if d.rounds >= rounds)
    constraint = catalogue.make_constraint(rule, random.Random(0), split="train")
    return builders.Window(dialogue, 0, rounds, [constraint], [1])


def _scripted(replies_by_round):
    """A sampler that answers round r (counted from the history) with the given replies."""
    def sample(histories, k):
        out = []
        for history in histories:
            r = sum(m["role"] == "user" for m in history)
            out.append(list(replies_by_round[r])[:k])
        return out
    return sample


def test_a_passing_sample_is_kept_and_a_failing_one_becomes_the_rejected_reply():
    window = _window("lowercase")
    sample = _scripted({
        1: ["Sure, I really LIKE that band a lot.", "sure, i really like that band a lot."],
        2: ["i think their second album was better than the first one.", "I Think So Too."],
        3: ["what other music do you listen to these days?", "What Else?"],
    })
    counts = on_policy.SamplingCounts()
    [dialogue] = on_policy.sample_dialogues([window], sample, _judge, samples_per_turn=2, counts=counts,
                                            log=lambda _m: None)
    replies = [m["content"] for m in dialogue.messages if m["role"] == "assistant"]
    assert replies == ["sure, i really like that band a lot.",
                       "i think their second album was better than the first one.",
                       "what other music do you listen to these days?"]
    assert dialogue.outcomes == ["sampled"] * 3 and dialogue.dropped_at is None
    assert len(dialogue.pairs) == 3
    for pair, rejected in zip(dialogue.pairs, ["Sure, I really LIKE that band a lot.", "I Think So Too.",
                                               "What Else?"], strict=True):
        assert pair["rejected"][0]["content"] == rejected and pair["meta"]["violated"] == ["lowercase"]
        # chosen and rejected answer the same history, which ends with the user turn
        assert pair["prompt"][-1]["role"] == "user" and pair["prompt"] == dialogue.messages[:len(pair["prompt"])]
    assert counts.to_dict()["by_type"]["lowercase"]["1"] == {"sampled": 1, "rewritten": 0, "dropped": 0}


def test_when_no_sample_passes_the_best_one_is_rewritten_and_recorded():
    window = _window("lowercase", rounds=2)
    sample = _scripted({1: ["That Sounds Great, I Love Their Music.", "Zzxq Qqv."],
                        2: ["Which Song Do You Like Best?", "Ok Ok Ok Ok Ok Ok Ok Ok."]})
    counts = on_policy.SamplingCounts()
    [dialogue] = on_policy.sample_dialogues([window], sample, _judge, samples_per_turn=2, counts=counts,
                                            log=lambda _m: None)
    replies = [m["content"] for m in dialogue.messages if m["role"] == "assistant"]
    # the gate-passing sample (real words, no loop) is the one rewritten, not the first one drawn
    assert replies == ["that sounds great, i love their music.", "which song do you like best?"]
    assert dialogue.outcomes == ["rewritten", "rewritten"] and dialogue.pairs == []
    assert counts.to_dict()["turns_by_rule"] == {"sampled": 0, "rewritten": 2, "dropped": 0}


def test_a_repeat_of_an_earlier_target_fails_and_cuts_the_dialogue_when_nothing_else_passes():
    window = _window("lowercase", rounds=3)
    same = "i like that band a lot, they are great."
    sample = _scripted({1: [same], 2: [same, "i like that band a lot, they are great!"], 3: ["fine."]})
    counts = on_policy.SamplingCounts()
    [dialogue] = on_policy.sample_dialogues([window], sample, _judge, samples_per_turn=2, counts=counts,
                                            log=lambda _m: None)
    assert dialogue.outcomes == ["sampled"] and dialogue.dropped_at == 2
    assert "repeat" in dialogue.drop_reason
    assert counts.fail_reasons["repeat"] == 2
    assert counts.to_dict()["by_type"]["lowercase"]["2"]["dropped"] == 1


def test_on_policy_pairs_and_sampled_sft_rows_through_the_build(tmp_path):
    rng = random.Random(1)

    def sample(histories, k):
        # half the samples keep a lowercase rule, half shout; other rules fall to the rewrite
        words = ["that is a good point about the movie", "i did not know that about them",
                 "what did you think of the ending", "we should talk about this more often"]
        return [[(rng.choice(words) if j % 2 else rng.choice(words).upper()) + "." for j in range(k)]
                for _ in histories]

    config = DataBuildConfig(output_dir=str(tmp_path / "out"), max_length=None,
                             sft=builders.SFTSetConfig(conversations=6, reply_source="policy", samples_per_turn=2),
                             preferences=builders.PreferenceSetConfig(pairs=20, rejected={"natural": 0.5,
                                                                                          "on_policy": 0.5}))
    manifest = build_all(config, sample=sample, judge=_judge, log=lambda _m: None)
    out = tmp_path / "out"
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    on_policy_pairs = [p for p in pairs if p["meta"]["rejected_kind"] == "on_policy"]
    assert on_policy_pairs and manifest["preferences"]["rejected_kinds"]["on_policy"] == len(on_policy_pairs)
    # a `limit` on the set keeps its first rows: both kinds must be among them
    first_half = {p["meta"]["rejected_kind"] for p in pairs[: len(pairs) // 2]}
    assert "on_policy" in first_half and first_half & {"natural", "partial"}, first_half
    for pair in on_policy_pairs:
        constraints = [catalogue.Constraint.from_dict(c) for c in pair["meta"]["constraints"]]
        active = [c for c in constraints if c.type_name in pair["meta"]["active_constraints"]]
        chosen, rejected = _judge([(pair["prompt"], pair["chosen"][0]["content"], active),
                                       (pair["prompt"], pair["rejected"][0]["content"], active)])
        assert chosen.passed and not rejected.passed
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["sft"]["rows"] >= 6
    outcomes = Counter(o for row in rows for o in row["meta"]["target_outcomes"])
    stats = manifest["sft"]["on_policy"]
    assert outcomes["sampled"] > 0 and stats["samples"] > 0
    # every kept turn is counted once per standing rule (or once as "no rule yet")
    assert stats["turns_by_rule"]["sampled"] >= outcomes["sampled"]


def test_the_curriculum_floor_holds_in_the_built_set(tmp_path):
    config = DataBuildConfig(output_dir=str(tmp_path / "out"), max_length=None,
                             sft=builders.SFTSetConfig(conversations=40, min_dialogues_per_type=6),
                             preferences=builders.PreferenceSetConfig(pairs=10))
    manifest = build_all(config, log=lambda _m: None)
    rows = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    counts = Counter(t for row in rows for t in curriculum.row_types(row))
    assert all(counts[t] >= 6 for t in curriculum.SEEN_TYPES), {t: counts[t] for t in curriculum.SEEN_TYPES}
    assert not set(counts) & catalogue.HELD_OUT_TYPES
    report = manifest["sft"]["curriculum"]
    assert report["types_short_of_minimum"] == {} and report["dialogues_per_type"] == {
        t: counts[t] for t in curriculum.SEEN_TYPES}
    # the short types ride several to a window on the windows the set needs, not one extra window each
    # (28 types x 6 would be 168 windows)
    assert report["windows_used"] <= 2 * 40 and len(rows) <= 2 * 40
    # without the floor, random draws leave some types under it at this size
    plain = DataBuildConfig(output_dir=str(tmp_path / "plain"), max_length=None,
                            sft=builders.SFTSetConfig(conversations=40), preferences=builders.PreferenceSetConfig(pairs=10))
    plain_counts = build_all(plain, log=lambda _m: None)["sft"]["curriculum"]["dialogues_per_type"]
    assert min(plain_counts.values()) < 6


def test_a_required_type_is_always_among_a_windows_rules():
    dialogue = load_chitchat("train", min_rounds=4)[0]
    rng = random.Random(0)
    for name in curriculum.SEEN_TYPES:
        window = builders.with_rules(dialogue, 0, 4, builders.DialogueConfig(), rng, required=name)
        names = [c.type_name for c in window.constraints]
        assert name in names and catalogue.compatible(names)
    several = ["lowercase", "include_word", "bullet_list"]
    window = builders.with_rules(dialogue, 0, 4, builders.DialogueConfig(max_constraints=2), rng, required=several)
    assert set(several) <= {c.type_name for c in window.constraints}
    with pytest.raises(ValueError, match="held-out"):
        builders.with_rules(dialogue, 0, 4, builders.DialogueConfig(), rng, required="title")
    with pytest.raises(ValueError, match="conflict"):
        builders.with_rules(dialogue, 0, 4, builders.DialogueConfig(), rng, required=["lowercase", "uppercase"])


def test_on_policy_pairs_need_policy_replies(tmp_path):
    config = DataBuildConfig(output_dir=str(tmp_path / "out"),
                             sft=builders.SFTSetConfig(conversations=4),
                             preferences=builders.PreferenceSetConfig(pairs=4, rejected={"on_policy": 1.0}))
    with pytest.raises(ValueError, match="reply_source: policy"):
        build_all(config, log=lambda _m: None)


def test_rejection_sampling_from_a_tiny_model_through_the_data_recipe(tmp_path, tiny_model_dir):
    from dialogrl.training import data_stage
    from dialogrl.training.config import load_recipe

    # The tiny model writes random word pieces: the known-words check is relaxed so some samples pass.
    recipe = load_recipe(None, [
        f"output_dir={tmp_path / 'out'}", f"model.name_or_path={tiny_model_dir}", "sft.reply_source=policy",
        "sft.conversations=3", "sft.samples_per_turn=3", "sft.min_rounds_kept=1", "preferences.pairs=10",
        "dialogue.max_rounds=4", "sampling.max_new_tokens=8", "sampling.seed=3", "max_length=null",
        "gate.min_known_word_share=0", "responsiveness.enabled=false",
    ], expected=data_stage.DataRecipe)
    manifest = data_stage.main(recipe, log=lambda _m: None)
    stats = manifest["sft"]["on_policy"]
    assert stats["samples"] == manifest["policy_reply_cache"]["generated"] > 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        constraints = [catalogue.Constraint.from_dict(c) for c in row["meta"]["constraints"]]
        for r, outcome in enumerate(row["meta"]["target_outcomes"], start=1):
            assert outcome in ("sampled", "rewritten")
            active = [c for c, intro in zip(constraints, row["meta"]["intro_round"], strict=True) if intro <= r]
            assert all(c.check(row["messages"][2 * r]["content"]).strict for c in active)
    kept = Counter(o for row in rows for o in row["meta"]["target_outcomes"])
    assert kept["sampled"] + kept["rewritten"] == sum(len(row["meta"]["target_outcomes"]) for row in rows)
    rerun = data_stage.main(recipe, log=lambda _m: None)
    assert rerun["policy_reply_cache"]["generated"] == 0
    assert (tmp_path / "out" / "sft.jsonl").read_text().splitlines() == [json.dumps(r, ensure_ascii=False)
                                                                         for r in rows]
