"""`dialogrl eval score FILE`: transcripts from anywhere, judged like the evaluator's own dialogues."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dialogrl.data.records import RowError
from dialogrl.data.transcripts import load_transcripts, parse_transcript

GOOD = {
    "id": "chat-1",
    "model": "some-api",
    "messages": [
        {"role": "system", "content": "Write in lowercase."},
        {"role": "user", "content": "hi, how are you?"},
        {"role": "assistant", "content": "i'm good, thanks for asking"},
        {"role": "user", "content": "what did you do this weekend?"},
        {"role": "assistant", "content": "i'm good, thanks for asking"},
        {"role": "user", "content": "Please end every reply with 'bye'. Do you like music?"},
        {"role": "assistant", "content": "Yes, I like jazz a lot."},
    ],
    "rules": [{"type": "lowercase", "params": {}, "from_round": 1},
              {"type": "end_with_phrase", "params": {"phrase": "bye"}, "from_round": 3}],
}


def row_problems(row) -> list[tuple[str, str]]:
    with pytest.raises(RowError) as caught:
        parse_transcript(row, "file", set())
    return caught.value.problems


def test_a_good_row_gives_rules_standing_from_their_round():
    transcript = parse_transcript(GOOD, "file", set())
    assert transcript.model == "some-api"
    assert [c.type_name for c in transcript.standing(1)] == ["lowercase"]
    assert [c.type_name for c in transcript.standing(3)] == ["lowercase", "end_with_phrase"]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"rules": [{"type": "lowercse", "params": {}}]}, "rules[0].type", "did you mean 'lowercase'"),
        ({"rules": [{"type": "end_with_phrase", "params": {}}]}, "rules[0].params", "takes params ['phrase']"),
        ({"rules": [{"type": "lowercase", "params": {}, "from_round": 0}]}, "rules[0].from_round", ">= 1"),
        ({"rules": [{"type": "lowercase", "params": {}, "when": 1}]}, "rules[0]", "unknown keys"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role", "expected user"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
        ({"id": ""}, "id", "non-empty string"),
    ],
)
def test_bad_rows_name_the_field_and_what_is_wrong(change, field, words):
    problems = row_problems({**GOOD, **change})
    assert any(f == field and words in reason for f, reason in problems), problems


def test_duplicate_ids_and_unreadable_lines_are_rejected_with_their_row(tmp_path):
    source = tmp_path / "chats.jsonl"
    source.write_text("\n".join([json.dumps(GOOD), "{not json", json.dumps(GOOD)]) + "\n")
    transcripts, report = load_transcripts(source, tmp_path / "rejects.jsonl")
    assert len(transcripts) == 1 and report.rejected_rows == 2
    assert [(p.row, p.field) for p in report.problems] == [(2, "line"), (3, "id")]
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [2, 3]


def test_eval_score_judges_a_file_like_the_evaluator(tiny_model_dir, tmp_path):
    source = tmp_path / "chats.jsonl"
    bad = {**GOOD, "id": "chat-2", "rules": [{"type": "no_such_rule", "params": {}}]}
    other = {**GOOD, "id": "chat-3", "model": "other-model"}
    source.write_text("\n".join(json.dumps(r) for r in (GOOD, bad, other)) + "\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "dialogrl.training.cli", "eval", "score", str(source),
                           "--output-dir", str(out), f"responsiveness.scorer={tiny_model_dir}",
                           "bootstrap_samples=50"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "row 2: rules[0].type: unknown rule type 'no_such_rule'" in done.stderr
    assert (out / "rejects.jsonl").read_text().count('"row": 2') == 1
    for name in ("report.json", "report.md", "report.html", "adherence.png", "survival.png", "dialogues.jsonl"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"some-api", "other-model"}
    assert report["config"]["input"]["rejected_rows"] == 1
    rows = [json.loads(line) for line in (out / "dialogues.jsonl").read_text().splitlines()]
    turns = rows[0]["turns"]
    assert [t["round"] for t in turns] == [1, 2, 3]
    assert turns[1]["gate_reason"] == "repeat" and turns[1]["adherent"] is False
    assert turns[2]["rules_kept"] is False  # capitals, and no "bye" at the end
    assert all(isinstance(t["responsiveness"], float) for t in turns)
