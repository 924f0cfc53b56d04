"""`dialogrl pipeline` end to end on the tiny model: every stage, the comparison, the rerun that skips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dialogrl.training.config import load_recipe
from dialogrl.training.pipeline import PipelineRecipe, wire


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pipeline_recipe(tmp_path: Path, tiny: Path) -> Path:
    """Stage recipes that name each other by their standalone output dirs, as the shipped ones do."""
    standalone = tmp_path / "standalone"
    quiet = {"report_to": ["none"]}
    small = {"max_steps": 2, "per_device_batch_size": 2, "logging_steps": 1, "save_steps": 1}
    data = _write(tmp_path / "data.yaml", {
        "stage": "data", "output_dir": str(standalone / "data"), "max_length": 512,
        "sft": {"conversations": 6}, "preferences": {"pairs": 24}})
    sft = _write(tmp_path / "sft.yaml", {
        "stage": "sft", "output_dir": str(standalone / "sft"), "data": {"train": [{"path": str(standalone / "data/sft")}],
                                                                         "eval_fraction": 0},
        "training": small, "tracking": quiet})
    reward = _write(tmp_path / "reward.yaml", {
        "stage": "reward", "output_dir": str(standalone / "reward"),
        "data": {"train": [{"path": str(standalone / "data/preferences"), "limit": 16}], "eval_fraction": 0.25},
        "training": small, "tracking": quiet})
    dpo = _write(tmp_path / "dpo.yaml", {
        "stage": "dpo", "output_dir": str(standalone / "dpo"),
        "data": {"train": [{"path": str(standalone / "data/preferences"), "limit": 8}], "eval_fraction": 0},
        "training": small, "lora": {"enabled": True, "r": 4, "merge": True}, "tracking": quiet})
    ppo = _write(tmp_path / "ppo.yaml", {
        "stage": "ppo", "output_dir": str(standalone / "ppo"), "model": {"name_or_path": str(standalone / "sft")},
        "reward": {"model": str(standalone / "reward"), "rule_weight": 1.0},
        "episodes": {"rounds": 2}, "sampling": {"max_new_tokens": 8, "temperature": 0.8},
        "ppo": {"updates": 2, "episodes_per_update": 2, "generation_batch_size": 2, "minibatch_episodes": 2,
                "save_every": 1},
        "tracking": quiet})
    evaluation = _write(tmp_path / "eval.yaml", {
        "stage": "eval", "scenarios": {"dialogues": 4, "rounds": 2}, "sampling": {"max_new_tokens": 8},
        "batch_size": 4, "bootstrap_samples": 50, "responsiveness": {"scorer": str(tiny), "negatives": 2}})
    return _write(tmp_path / "pipeline.yaml", {
        "stage": "pipeline", "base_model": str(tiny), "output_dir": str(tmp_path / "run"),
        "steps": [
            {"name": "data", "stage": "data", "recipe": str(data)},
            {"name": "sft", "stage": "sft", "recipe": str(sft)},
            {"name": "reward", "stage": "reward", "recipe": str(reward)},
            {"name": "dpo", "stage": "dpo", "recipe": str(dpo), "model_from": "sft"},
            {"name": "ppo", "stage": "ppo", "recipe": str(ppo)},
        ],
        "eval": {"recipe": str(evaluation)},
    })


def test_steps_read_each_others_outputs_in_the_run(tiny_model_dir, tmp_path):
    recipe = load_recipe(pipeline_recipe(tmp_path, tiny_model_dir), expected=PipelineRecipe)
    run = tmp_path / "run"
    wired = {step.name: stage_recipe for step, stage_recipe, _dir in wire(recipe, run)}
    assert wired["data"].model.name_or_path == str(tiny_model_dir)
    assert wired["sft"].data.train[0].path == str(run / "data" / "sft")
    assert wired["sft"].model.name_or_path == str(tiny_model_dir)  # no earlier model: the base
    assert wired["dpo"].model.name_or_path == str(run / "sft")  # model_from
    assert wired["ppo"].model.name_or_path == str(run / "sft")  # named the standalone sft output
    assert wired["ppo"].reward.model == str(run / "reward")
    assert all(r.output_dir.startswith(str(run)) for r in wired.values())


def test_pipeline_runs_every_stage_compares_checkpoints_and_skips_on_rerun(tiny_model_dir, tmp_path):
    from dialogrl.training import pipeline

    recipe = load_recipe(pipeline_recipe(tmp_path, tiny_model_dir), expected=PipelineRecipe)
    messages: list[str] = []
    summary = pipeline.main(recipe, log=messages.append)
    run = tmp_path / "run"
    assert list(summary["models"]) == ["base", "sft", "dpo", "ppo"]
    stored = json.loads((run / "summary.json").read_text())
    assert stored["models"] == summary["models"]
    report = json.loads((run / "eval" / "report.json").read_text())
    # The summary's adherence is what the played dialogues say, recomputed here from dialogues.jsonl.
    played = [json.loads(line) for line in (run / "eval" / "dialogues.jsonl").read_text().splitlines()]
    for label, row in summary["models"].items():
        assert row["adherence_round_1"] == pytest.approx(_strict_adherence(played, label, 1))
        assert row["adherence_last_round"] == pytest.approx(_strict_adherence(played, label, row["rounds"]))
        # The tiny model keeps no rule (adherence 0), so the rates it does reach are checked too.
        turns = [turn for dialogue in played if dialogue["model"] == label for turn in dialogue["turns"]]
        assert row["gate_pass_rate"] == pytest.approx(sum(t["gate_pass"] for t in turns) / len(turns))
        judged = [t["responsive"] for t in turns if t.get("responsive") is not None]
        assert row["responsive_rate"] == pytest.approx(sum(judged) / len(judged))
    assert report["models"]["dpo"]["model"] == str(run / "dpo" / "merged")  # LoRA step: its merged model
    markdown = (run / "summary.md").read_text()
    assert all(f"| {label} |" in markdown for label in summary["models"])
    assert (run / "adherence.png").stat().st_size > 1000
    for name in ("sft", "reward", "dpo", "ppo"):
        assert json.loads((run / name / "run_summary.json").read_text())["status"] == "complete"
    # The DPO step really started from the SFT checkpoint.
    assert load_recipe(run / "dpo" / "config.yaml").model.name_or_path == str(run / "sft")

    rerun_messages: list[str] = []
    rerun = pipeline.main(recipe, log=rerun_messages.append)
    skipped = [m for m in rerun_messages if "skipped" in m]
    assert len(skipped) == 6, rerun_messages  # five steps and the evaluation
    assert not any("running" in m for m in rerun_messages)
    # A skipped step keeps the time and memory it cost when it ran.
    for first, again in zip(summary["steps"], rerun["steps"], strict=True):
        assert again["skipped"] and not first["skipped"]
        assert first["seconds"] > 0 and first["peak_rss_gib"] > 0
        assert (again["seconds"], again["peak_rss_gib"]) == (first["seconds"], first["peak_rss_gib"])
    assert rerun["eval"]["skipped"] and rerun["eval"]["seconds"] == summary["eval"]["seconds"] > 0
    sft_row = next(line for line in (run / "summary.md").read_text().splitlines() if line.startswith("| sft | sft |"))
    assert f"| {summary['steps'][1]['seconds']} s |" in sft_row and "skipped" in sft_row

    # Issue 18 item 1: a changed step is trained again, and so is every step reading its output.
    recipe.steps[1].overrides = ["training.learning_rate=3e-5"]
    changed = _ran_and_skipped(pipeline, recipe)
    assert changed == {"ran": ["sft", "dpo", "ppo"], "skipped": ["data", "reward"]}, changed
    sft_id = json.loads((run / "sft" / "run_summary.json").read_text())["output_id"]
    assert json.loads((run / "ppo" / "fingerprint.json").read_text())["inputs"][str(run / "sft")] == f"output:{sft_id}"
    assert load_recipe(run / "sft" / "config.yaml").training.learning_rate == 3e-5
    # A deleted step is trained again with its readers; the evaluation reuses the base model's records.
    shutil.rmtree(run / "reward")
    messages.clear()
    after_delete = _ran_and_skipped(pipeline, recipe, messages)
    assert after_delete == {"ran": ["reward", "ppo"], "skipped": ["data", "sft", "dpo"]}, after_delete
    assert any(m.startswith("[eval] base: reusing") for m in messages) and "[eval] evaluating ppo" in messages


def _ran_and_skipped(pipeline, recipe, messages=None) -> dict[str, list[str]]:
    messages = [] if messages is None else messages
    summary = pipeline.main(recipe, log=messages.append)
    steps = summary["steps"]
    return {"ran": [s["name"] for s in steps if not s["skipped"]], "skipped": [s["name"] for s in steps if s["skipped"]]}


def _strict_adherence(played: list[dict], label: str, round_number: int) -> float:
    verdicts = [turn["gate_pass"] and all(check["strict"] for check in turn["checks"])
                for dialogue in played if dialogue["model"] == label
                for turn in dialogue["turns"] if turn["round"] == round_number and turn["checks"]]
    return sum(verdicts) / len(verdicts)


def test_a_data_step_rebuilt_for_another_recipe_keeps_its_reply_cache(tmp_path, monkeypatch):
    """The policy-sample cache is keyed by model and history, not recipe: a rebuild samples only what is new."""
    from types import SimpleNamespace

    from dialogrl.data.fingerprint import Fingerprint, write_fingerprint
    from dialogrl.training import data_stage, pipeline

    step_dir = tmp_path / "run" / "data"
    (step_dir / "cache").mkdir(parents=True)
    (step_dir / "cache" / "policy_samples.jsonl").write_text('{"key": "k", "reply": "hi"}\n')
    (step_dir / "sft").mkdir()
    (step_dir / "sft" / "rows.jsonl").write_text("stale\n")
    (step_dir / "manifest.json").write_text("{}")
    write_fingerprint(step_dir, Fingerprint({"sft.conversations": 1}, {}))  # another recipe's
    seen_at_start: list[list[str]] = []

    def fake_build(stage_recipe, log):
        seen_at_start.append(sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")))
        return {}

    monkeypatch.setattr(pipeline.importlib, "import_module", lambda name: SimpleNamespace(main=fake_build))
    stage_recipe = load_recipe(_write(tmp_path / "data.yaml", {"stage": "data", "output_dir": str(step_dir)}),
                               expected=data_stage.DataRecipe)
    messages: list[str] = []
    pipeline.run_step(pipeline.PipelineStep(name="data", stage="data"), stage_recipe, step_dir, log=messages.append)
    assert any("training from scratch" in m for m in messages), messages
    assert seen_at_start == [["cache", "cache/policy_samples.jsonl"]]
