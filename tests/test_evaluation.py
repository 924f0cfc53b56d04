"""The evaluator end to end on the tiny model, and the pieces a report rests on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dialogrl.data import constraints as catalogue
from dialogrl.evaluation.evaluate import EvalConfig, dialogue_specs, score_dialogues
from dialogrl.evaluation.gate import check_gate
from dialogrl.evaluation.rollout import Trajectory
from dialogrl.evaluation.scenarios import Scenario, ScenarioConfig, build_scenarios


@pytest.mark.parametrize(
    ("reply", "passes"),
    [
        ("", False),
        ("   \n ", False),
        ("Sure, I can help with that today.", True),
        ("the cat the cat the cat the cat the cat the cat the cat the cat", False),
        ("ok\nok\nok\nok\nok", False),
        ("zxqv plorf wubbleton krazzit vexmor", False),
        ('{"reply": "sounds good to me"}', True),
        ("word " * 301, False),
    ],
)
def test_quality_gate(reply, passes):
    assert check_gate(reply).passed is passes


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        # Seen in eval-quick: distinct 4-grams throughout, so only the sentence count catches them.
        ("I'm glad to hear that. I'm glad to hear that. I'm glad to hear that. I'm glad to hear that.",
         "repeated_sentence"),
        ("I'm sorry for any misunderstanding. I'm sorry for any misunderstanding! (I'm sorry for any "
         "misunderstanding)", "repeated_sentence"),
        ("No. No. That is not what I meant, sorry.", None),  # twice is emphasis, not a loop
        ("I like tea. Do you like tea? I like it hot.", None),
    ],
)
def test_a_sentence_said_three_times_is_a_loop(reply, reason):
    assert check_gate(reply).reason == reason


def test_scenarios_are_deterministic_held_out_and_split_seen_unseen():
    config = ScenarioConfig(dialogues=20, rounds=4, unseen_fraction=0.5, seed=3)
    first, second = build_scenarios(config), build_scenarios(config)
    assert [s.to_dict() for s in first] == [s.to_dict() for s in second]
    from dialogrl.data.corpora import split_of

    for scenario in first:
        assert split_of(scenario.dialogue_id.split("#")[0]) == "eval"
        assert all(c.phrasing_split == "eval" for c in scenario.constraints)
        held = {c.type_name in catalogue.HELD_OUT_TYPES for c in scenario.constraints}
        assert held == {scenario.unseen}
    assert sum(s.unseen for s in first) == 10


def _scenario_with_user_rule() -> Scenario:
    import random

    rng = random.Random(0)
    system_rule = catalogue.make_constraint("no_commas", rng, split="eval")
    user_rule = catalogue.make_constraint("user_call_me", rng, split="eval")
    return Scenario("d#0", ["hi", "how are you", "bye"], [system_rule, user_rule], [1, 2], unseen=False)


def test_user_rule_is_stated_at_its_round_and_not_checked_before():
    scenario = _scenario_with_user_rule()
    (spec,) = dialogue_specs([scenario], "none")
    assert list(spec.user_prefix) == [2] and spec.user_prefix[2] == scenario.constraints[1].instruction
    messages = [{"role": "system", "content": scenario.system_prompt()}]
    for turn in scenario.user_turns:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "hello there friend"}]
    (record,) = score_dialogues([scenario], [Trajectory("d#0", messages, [True] * 3, [4] * 3)], EvalConfig().gate,
                                "replay")
    checked = [[c["type_name"] for c in turn["checks"]] for turn in record["turns"]]
    assert checked == [["no_commas"], ["no_commas", "user_call_me"], ["no_commas", "user_call_me"]]
    # The reply never uses the name, so from round 2 on it is not adherent; round 1 is.
    assert [all(c["strict"] for c in t["checks"]) for t in record["turns"]] == [True, False, False]


def test_repeat_rules_restates_standing_rules_from_round_two():
    scenario = _scenario_with_user_rule()
    (spec,) = dialogue_specs([scenario], "repeat_rules")
    assert 1 not in spec.user_prefix
    assert scenario.constraints[0].instruction in spec.user_prefix[2]
    assert spec.user_prefix[2].endswith(scenario.constraints[1].instruction)  # the user's own rule still stated
    assert scenario.constraints[1].instruction in spec.user_prefix[3]


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    args = [sys.executable, "-m", "dialogrl.training.cli", "eval", "--model", str(tiny_model_dir),
            "--model", f"{tiny_model_dir}@repeat_rules", "scenarios.dialogues=6", "scenarios.rounds=3",
            "sampling.max_new_tokens=6", "bootstrap_samples=200", f"responsiveness.scorer={tiny_model_dir}"]
    first = subprocess.run([*args, "--output-dir", str(out / "a")], capture_output=True, text=True, timeout=600)
    second = subprocess.run([*args, "--output-dir", str(out / "b")], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    return out


def test_eval_writes_all_five_outputs(eval_run):
    for name in ("report.json", "report.md", "report.html", "adherence.png", "survival.png", "dialogues.jsonl"):
        assert (eval_run / "a" / name).stat().st_size > 0, name
    report = json.loads((eval_run / "a" / "report.json").read_text())
    assert len(report["models"]) == 2 and len(report["comparisons"]) == 1
    for model in report["models"].values():
        for key in ("auc_strict", "auc_loose", "retention", "drift_slope", "ssr", "r_k", "gate_pass_rate",
                    "survival", "by_family", "seen", "unseen", "auc_strict_per_reply_gate", "repeat_rate",
                    "echo_rate", "responsive_rate", "least_responsive"):
            assert key in model
        assert len(model["curve"]["strict"]["mean"]) == 3
    lines = (eval_run / "a" / "dialogues.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(len(json.loads(line)["turns"]) == 3 for line in lines)
    for line in lines:
        for turn in json.loads(line)["turns"]:
            assert {"round", "adherent", "gate_pass", "gate_reason", "responsive", "responsiveness",
                    "checks"} <= set(turn)
            assert isinstance(turn["responsiveness"], float)  # the scorer judged every reply


def test_same_seed_and_config_give_an_identical_report(eval_run):
    assert (eval_run / "a" / "report.json").read_bytes().replace(b"/a", b"/x") == \
        (eval_run / "b" / "report.json").read_bytes().replace(b"/b", b"/x")


def test_simulated_user_and_pressure_turns_drive_the_dialogue(tiny_model_dir):
    from dialogrl.evaluation.evaluate import evaluate_model
    from dialogrl.evaluation.sampling import SamplingConfig
    from dialogrl.evaluation.users import PRESSURE_TURNS
    from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer

    config = EvalConfig(
        scenarios=ScenarioConfig(dialogues=2, rounds=3, user_source="simulated", pressure={3: "drop_rule"}),
        sampling=SamplingConfig(max_new_tokens=5),
    )
    options = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_causal_lm(options).eval(), load_tokenizer(options)
    scenarios = build_scenarios(config.scenarios)
    records, _speed = evaluate_model(model, tokenizer, scenarios, config, log=lambda _m: None)
    for scenario, record in zip(scenarios, records, strict=True):
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert users[0].endswith(scenario.user_turns[0])  # the simulated user opens with the human's first turn
        assert users[1] != scenario.user_turns[1]  # then speaks for itself
        assert users[2] == PRESSURE_TURNS["drop_rule"]
        assert record["user_source"] == "simulated+pressure"


def test_probes_fork_the_history_and_leave_the_dialogue_unchanged(tiny_model_dir):
    from dialogrl.evaluation.evaluate import PROBE, evaluate_model
    from dialogrl.evaluation.metrics import curve
    from dialogrl.evaluation.sampling import SamplingConfig
    from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer

    options = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_causal_lm(options).eval(), load_tokenizer(options)
    sampling = SamplingConfig(max_new_tokens=5)
    plain = EvalConfig(scenarios=ScenarioConfig(dialogues=3, rounds=3), sampling=sampling)
    probed = EvalConfig(scenarios=ScenarioConfig(dialogues=3, rounds=3, probe_rounds=[1, 3]), sampling=sampling)
    scenarios = build_scenarios(plain.scenarios)
    without, _ = evaluate_model(model, tokenizer, scenarios, plain, log=lambda _m: None)
    with_probes, _ = evaluate_model(model, tokenizer, scenarios, probed, log=lambda _m: None)
    for a, b in zip(without, with_probes, strict=True):
        assert a["messages"] == b["messages"] and a["turns"] == b["turns"]
        assert PROBE not in json.dumps(b["messages"])
        assert [p["round"] for p in b["probes"]] == [1, 3]
    c = curve([{"dialogue_id": r["dialogue_id"], "user_source": "probe", "turns": r["probes"]}
               for r in with_probes], "strict", n_boot=50)
    assert c["n"][1] == 0 and c["n"][0] > 0  # round 2 was not probed


def _results_from(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    results = {label: {"model": m["model"], "intervention": m.get("intervention"), "records": []}
               for label, m in report["models"].items()}
    for line in (run_dir / "dialogues.jsonl").read_text().splitlines():
        record = json.loads(line)
        results[record.pop("model")]["records"].append(record)
    return report, results


def test_a_report_set_killed_while_written_leaves_the_previous_set_whole(eval_run, tmp_path, monkeypatch):
    import shutil

    from faults import kill_after_first_move

    from dialogrl.data import atomic_outputs
    from dialogrl.evaluation import report as report_module

    out = tmp_path / "eval"
    shutil.copytree(eval_run / "a", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    report, results = _results_from(out)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt("killed")

    rerun = report | {"rerun": True}  # what a second run would write
    monkeypatch.setattr(report_module, "plot_survival", killed)
    with pytest.raises(KeyboardInterrupt):
        report_module.write_outputs(rerun, results, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()

    kill_after_first_move(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        report_module.write_outputs(report, results, out)
    assert not (out / "report.json").exists()  # a mixed set is never taken for a finished report
    monkeypatch.undo()
    report_module.write_outputs(report, results, out)
    assert json.loads((out / "report.json").read_text()) == report
    assert not (out / atomic_outputs.STAGING_DIRNAME).exists()


def test_a_model_that_fails_costs_only_its_own_work_and_a_rerun_reuses_the_finished_ones(tiny_model_dir, tmp_path,
                                                                                           capsys):
    """Issue 18 item 3: an eval of two models whose second fails to load keeps the first model's records;
    the rerun (the second repaired) plays only the second and reports both."""
    import shutil

    from dialogrl.training import cli

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_model_dir), "--model", str(broken), "--output-dir", str(out),
            "scenarios.dialogues=2", "scenarios.rounds=2", "sampling.max_new_tokens=4", "bootstrap_samples=20",
            f"responsiveness.scorer={tiny_model_dir}"]
    assert cli.main(args) == 1
    assert f"weights in {broken}: model.safetensors" in capsys.readouterr().err
    (kept,) = (out / "per_model").glob("*.json")
    first_records = json.loads(kept.read_text())["records"]
    assert not (out / "report.json").exists()

    shutil.copy(tiny_model_dir / "model.safetensors", weights)
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"{tiny_model_dir}: reusing its records" in err and f"evaluating {tiny_model_dir}\n" not in err
    assert f"evaluating {broken}" in err
    played = [json.loads(line) for line in (out / "dialogues.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in d.items() if k != "model"} for d in played if d["model"] == str(tiny_model_dir)] \
        == first_records
    assert set(json.loads((out / "report.json").read_text())["models"]) == {str(tiny_model_dir), str(broken)}
