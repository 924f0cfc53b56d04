"""Row formats, validation messages and the invalid-row policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dialogrl.data.records import Conversation, PreferencePair, RowError, normalise_row
from dialogrl.data.sources import DataError, load_records

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

GOOD_ROWS = [
    {"messages": [S("Be kind."), U("hi"), A("hello"), U("how are you?"), A("fine")]},
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"},
                       {"from": "gpt", "value": "hey"}]},
    {"prompt": [U("2+2?")], "completion": [A("4")]},
    {"prompt": "2+2?", "completion": "4"},
    {"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]},
    {"chosen": [U("q"), A("a"), U("q2"), A("good")], "rejected": [U("q"), A("a"), U("q2"), A("bad")]},
    {"messages": [U("hi"), A("a"), U("again")], "draft": "rough reply", "edited": "polished reply"},
]

# (row, field named in the problem, words of the reason)
BAD_ROWS = [
    ({"messages": [A("hello"), U("hi")]}, "messages[0].role", "expected user here"),
    ({"messages": [U(""), A("hello")]}, "messages[0].content", "is empty"),
    ({"messages": [U("   "), A("hello")]}, "messages[0].content", "is empty"),
    ({"messages": [U(5), A("hello")]}, "messages[0].content", "expected a string, got int"),
    ({"messages": [{"role": "wizard", "content": "x"}, A("y")]}, "messages[0].role", "unknown role 'wizard'"),
    ({"messages": [U("x"), S("late"), A("y")]}, "messages[1].role", "system message may only come first"),
    ({"messages": [U("only a question")]}, "messages", "has no assistant turn"),
    ({"messages": [U("q"), A("a"), U("unanswered")]}, "messages", "no assistant reply after its last user turn"),
    ({"messages": [U("q"), U("q again"), A("a")]}, "messages[1].role", "expected assistant here"),
    ({"messages": []}, "messages", "is empty"),
    ({"messages": "hello"}, "messages", "expected a list of messages"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from", "unknown speaker 'alien'"),
    ({"prompt": [U("q")], "chosen": [A("same")], "rejected": [A("same ")]}, "chosen", "identical to rejected"),
    ({"chosen": [U("q"), A("x")], "rejected": [U("other"), A("y")]}, "chosen", "share no prompt"),
    ({"prompt": [U("q"), A("a")], "chosen": [A("x")], "rejected": [A("y")]}, "prompt", "must end with a user turn"),
    ({"text": "free text"}, "row", "no recognised fields"),
    (["not", "an", "object"], "row", "expected a JSON object"),
]


@pytest.mark.parametrize("row", GOOD_ROWS, ids=lambda r: "+".join(sorted(r)))
def test_every_supported_format_normalises(row):
    record = normalise_row(row)
    if "chosen" in row or "draft" in row:
        assert isinstance(record, PreferencePair)
        assert record.prompt[-1]["role"] == "user"
        assert all(m["role"] == "assistant" for m in record.chosen + record.rejected)
    else:
        assert isinstance(record, Conversation)
        assert record.messages[-1]["role"] == "assistant"


def test_implicit_prompt_and_edits_map_as_expected():
    implicit = normalise_row(GOOD_ROWS[5])
    assert implicit.prompt == [U("q"), A("a"), U("q2")] and implicit.chosen == [A("good")]
    assert implicit.turn_index == 2
    edit = normalise_row(GOOD_ROWS[6])
    assert edit.chosen == [A("polished reply")] and edit.rejected == [A("rough reply")]
    sharegpt = normalise_row(GOOD_ROWS[1])
    assert sharegpt.messages == [S("Be kind."), U("hi"), A("hey")]


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS, ids=lambda v: str(v)[:40])
def test_bad_rows_name_field_and_reason(row, field, reason):
    with pytest.raises(RowError) as err:
        normalise_row(row)
    assert any(f == field and reason in r for f, r in err.value.problems), err.value.problems


def test_special_tokens_and_length_limits_are_problems():
    with pytest.raises(RowError, match="special token '<|im_end|>'"):
        normalise_row({"messages": [U("sneaky <|im_end|>"), A("ok")]}, forbidden_substrings=["<|im_end|>"])
    with pytest.raises(RowError, match="over the limit of 10"):
        normalise_row({"messages": [U("q"), A("x" * 11)]}, max_chars=10)


@pytest.fixture
def mixed_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in GOOD_ROWS] + [json.dumps(r) for r, _f, _r in BAD_ROWS] + ["{not json"]
    path.write_text("\n".join(lines) + "\n")
    bad_lines = list(range(len(GOOD_ROWS) + 1, len(lines) + 1))
    return path, bad_lines


def test_error_policy_lists_problems_with_row_numbers_and_total(mixed_file):
    path, bad_lines = mixed_file
    with pytest.raises(DataError) as err:
        load_records(str(path), show=5)
    message = str(err.value)
    assert f"{len(bad_lines)} of {len(bad_lines) + len(GOOD_ROWS)} rows" in message
    assert f"row {bad_lines[0]}: messages[0].role: expected user here" in message
    assert "... and" in message and "on_invalid: skip" in message


def test_skip_policy_keeps_good_rows_and_rejects_exactly_the_bad_ones(mixed_file, tmp_path):
    path, bad_lines = mixed_file
    rejects = tmp_path / "rejects.jsonl"
    records, report = load_records(str(path), on_invalid="skip", rejects_path=rejects)
    assert len(records) == report.kept == len(GOOD_ROWS)
    assert report.rejected_rows == len(bad_lines) and report.rows == len(bad_lines) + len(GOOD_ROWS)
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["row"] for r in rejected] == bad_lines
    assert all(r["problems"] for r in rejected)
    assert [r["record"] for r in rejected[:-1]] == [row for row, _f, _r in BAD_ROWS]
    assert [r.meta["source_row"] for r in records] == list(range(1, len(GOOD_ROWS) + 1))


def test_json_parquet_and_saved_dataset_sources(tmp_path):
    from datasets import Dataset

    rows = [{"messages": [U(f"q{i}"), A(f"a{i}")]} for i in range(3)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in ("rows.json", "rows.parquet", "saved"):
        records, report = load_records(str(tmp_path / source))
        assert [r.messages for r in records] == [r["messages"] for r in rows], source
        assert report.kept == 3


def test_unreadable_sources_fail_with_the_path(tmp_path):
    text_file = tmp_path / "x.txt"
    text_file.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(str(text_file))
    with pytest.raises(DataError, match="no such file or directory"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_data_check_cli_exit_codes(mixed_file, tmp_path):
    path, bad_lines = mixed_file
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "dialogrl.training.cli", "data", "check", *args], capture_output=True, text=True
    )
    result = run(str(path), "--rejects", str(tmp_path / "rejects.jsonl"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for line in bad_lines:
        assert f"row {line}:" in result.stdout
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in GOOD_ROWS) + "\n")
    result = run(str(good))
    assert result.returncode == 0 and "no problems found" in result.stdout


def test_data_check_with_model_reports_over_long_rows(tiny_model_dir, tmp_path):
    path = tmp_path / "lengths.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [U("hi"), A("word " * n)]}) for n in (3, 400)) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "dialogrl.training.cli", "data", "check", str(path), "--model", str(tiny_model_dir),
         "--max-length", "128"], capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "row 2: messages: is" in result.stdout and "over max_length 128" in result.stdout
    assert "row 1:" not in result.stdout


def test_a_line_that_is_not_utf8_is_a_bad_row_naming_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"messages": [U("hi"), A("hello")]}).encode()
    path.write_bytes(good + b"\n" + b'{"messages": "caf\xe9"}\n' + good + b"\n")
    records, report = load_records(str(path), on_invalid="skip")
    assert len(records) == 2 and report.rejected_rows == 1
    assert "row 2: line: is not valid UTF-8 (byte 0xe9" in str(report.problems[0])
    json_path = tmp_path / "rows.json"
    json_path.write_bytes(b'[{"messages": "caf\xe9"}]')
    with pytest.raises(DataError, match=f"{json_path}: not valid UTF-8"):
        load_records(str(json_path))


def test_a_parquet_file_that_is_really_csv_names_the_path(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_text("messages,reply\nhi,hello\n")
    with pytest.raises(DataError, match=f"{path}: not a readable Parquet file"):
        load_records(str(path))
