"""Fingerprints: what a recipe computes and what its inputs hold, nothing else."""

import json

from dialogrl.data.fingerprint import fingerprint, input_identity, read_fingerprint, write_fingerprint


def _recipe(tmp_path, **changes):
    recipe = {"output_dir": str(tmp_path / "out"), "resume": "auto", "tracking": {"report_to": "none"},
              "training": {"learning_rate": 1e-3, "max_steps": 5},
              "data": {"train": [{"path": str(tmp_path / "rows.jsonl")}]}}
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return recipe


def test_a_changed_key_or_input_changes_the_digest_and_says_what_changed(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1}\n')
    before = fingerprint(_recipe(tmp_path))
    assert before.inputs == {str(rows): input_identity(rows)}
    assert fingerprint(_recipe(tmp_path)).digest == before.digest

    changed = fingerprint(_recipe(tmp_path, training__learning_rate=2e-3))
    assert changed.digest != before.digest
    assert changed.changes_from(before) == ["training.learning_rate: 0.001 -> 0.002"]

    rows.write_text('{"a": 2}\n')
    edited = fingerprint(_recipe(tmp_path))
    assert edited.digest != before.digest
    assert edited.changes_from(before) == [f"{rows}: its contents changed"]


def test_where_and_how_a_run_is_recorded_does_not_count(tmp_path):
    base = fingerprint(_recipe(tmp_path))
    moved = fingerprint(_recipe(tmp_path, output_dir=str(tmp_path / "elsewhere"), resume="never",
                                tracking={"report_to": "tensorboard"}))
    assert moved.digest == base.digest


def test_an_output_is_identified_by_its_output_id_so_a_rebuild_makes_its_users_stale(tmp_path):
    """A model directory rebuilt by the same recipe is a new model: whatever trained from the old one is stale."""
    model = tmp_path / "sft"
    model.mkdir()
    (model / "run_summary.json").write_text(json.dumps({"status": "complete", "output_id": "first"}))
    (model / "merged").mkdir()
    recipe = _recipe(tmp_path) | {"model": {"name_or_path": str(model)}, "ref": str(model / "merged")}
    first = fingerprint(recipe)
    assert first.inputs[str(model)] == "output:first" and first.inputs[str(model / "merged")] == "output:first"
    (model / "run_summary.json").write_text(json.dumps({"status": "complete", "output_id": "second"}))
    assert fingerprint(recipe).changes_from(first) == [f"{model}: its contents changed",
                                                        f"{model / 'merged'}: its contents changed"]


def test_paths_inside_the_output_dir_and_the_working_directory_are_not_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cache.jsonl").write_text("x")
    recipe = _recipe(tmp_path) | {"cache": str(tmp_path / "out" / "cache.jsonl"), "root": ".", "up": ".."}
    assert fingerprint(recipe).inputs == {}


def test_a_stage_name_that_is_also_a_directory_is_not_an_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # the repository root holds the package's data/ next to the recipes
    (tmp_path / "data" / "build.py").write_text("x")
    recipe = _recipe(tmp_path) | {"stage": "data"}
    assert fingerprint(recipe).inputs == {}
    reading = fingerprint(recipe | {"sft": {"path": "data"}})
    assert reading.inputs.keys() == {"data"}  # a path field still is
    # Its stored fingerprint says why an output made before this fix is rebuilt once.
    assert fingerprint(recipe).changes_from(reading) == ['sft.path: "data" -> "(unset)"', "data: no longer read as an input"]


def test_a_fingerprint_round_trips_through_its_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    fp = fingerprint(_recipe(tmp_path))
    write_fingerprint(tmp_path / "out", fp)
    assert read_fingerprint(tmp_path / "out") == fp
    (tmp_path / "out" / "fingerprint.json").write_text("{cut")
    assert read_fingerprint(tmp_path / "out") is None
