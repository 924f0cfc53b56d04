"""Tool-use dialogues end to end: rows with tools and tool calls, their masks, and SFT/DPO rows built from them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from templates import TRL_SET, stand_in_chat
from test_stages import recipe

from dialogrl.data.records import Conversation, PreferencePair, RowError, normalise_row

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_OUTPUT = '{"city": "Paris", "temperature_c": 21, "sky": "TOOLRESULTMARK"}'


def weather_row(arguments=None) -> dict:
    """OpenAI-style: arguments as a JSON string, the call's content null."""
    call = {"id": "call00001", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments or '{"city": "Paris"}'}}
    return {"tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Is it warm in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "content": TOOL_OUTPUT},
        {"role": "assistant", "content": "Yes: 21 degrees and clear skies in Paris."},
    ]}


def test_openai_row_with_tool_calls_normalises_to_the_template_form():
    record = normalise_row(weather_row())
    assert isinstance(record, Conversation)
    assert record.tools == [WEATHER_TOOL]
    call_message = record.messages[2]
    assert call_message["content"] == ""
    assert call_message["tool_calls"] == [{"type": "function", "id": "call00001",
                                           "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert record.messages[3] == {"role": "tool", "content": TOOL_OUTPUT, "tool_call_id": "call00001"}


@pytest.mark.parametrize(("change", "field", "reason"), [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     "messages[2].tool_calls[0].function.arguments", "not valid JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
     "messages[2].tool_calls[0].function.arguments", "expected a JSON object"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(name="get_time"),
     "messages[2].tool_calls[0].function.name", "do not define"),
    (lambda r: r["messages"][2].update(tool_calls=[]), "messages[2].tool_calls", "non-empty list"),
    (lambda r: r["messages"].pop(3), "messages[3].role", "tool result"),
    (lambda r: r["messages"][1].update(content=None), "messages[1].content", "expected a string, got NoneType"),
    (lambda r: r["messages"][3].update(content=None), "messages[3].content", "tool's output as a string"),
    (lambda r: r["messages"][1].update(tool_calls=r["messages"][2]["tool_calls"]), "messages[1].tool_calls",
     "only assistant messages call tools"),
    (lambda r: r.update(tools=[{"type": "function"}]), "tools[0]", "expected"),
    (lambda r: r["messages"].pop(), "messages", "no assistant reply"),
])
def test_malformed_tool_use_names_its_field(change, field, reason):
    row = weather_row()
    change(row)
    with pytest.raises(RowError) as caught:
        normalise_row(row)
    assert any(f == field and reason in r for f, r in caught.value.problems), caught.value.problems


def test_tool_results_are_context_and_tool_calls_are_trained():
    """Qwen 2.5's template: the call (in <tool_call> tags) is what the model generates; the result is not."""
    chat = stand_in_chat(TRL_SET["qwen2_5"])
    record = normalise_row(weather_row())
    result = chat(record.messages, record.tools)
    masked = [chat.tokenizer.decode(result.input_ids[a:b]) for a, b in result.assistant_spans()]
    assert masked == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                      "Yes: 21 degrees and clear skies in Paris.<|im_end|>"]
    unmasked = chat.tokenizer.decode([t for t, m in zip(result.input_ids, result.assistant_mask, strict=True) if not m])
    assert "TOOLRESULTMARK" in unmasked and "get_weather" in unmasked  # the tool list is rendered (tools=)
    # Tool call and result belong to round 1, as does the final answer.
    assert set(result.turn_index) == {0, 1}


def test_llama31_tool_call_is_trained_as_its_json():
    chat = stand_in_chat(TRL_SET["llama3_1"])
    record = normalise_row(weather_row())
    result = chat(record.messages, record.tools)
    first = chat.tokenizer.decode(result.input_ids[slice(*result.assistant_spans()[0])])
    assert json.loads(first.removesuffix("<|eot_id|>")) == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert first.endswith("<|eot_id|>")


@pytest.fixture
def tool_model_dir(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with Qwen 2.5's tool-aware template (same ChatML special tokens)."""
    import shutil

    from transformers import AutoTokenizer

    directory = tmp_path / "tiny-tools"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TRL_SET["qwen2_5"].text
    tokenizer.save_pretrained(directory)
    return directory


def test_tool_call_sft_row_labels_cover_the_call_not_the_tool_output(tool_model_dir, tmp_path):
    from dialogrl.training import sft

    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(weather_row()) + "\n")
    parts = sft.build(recipe("sft", tool_model_dir, data, tmp_path / "out", "data.eval_fraction=0"), log=lambda _: None)
    batch = parts.trainer.data_collator([parts.trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = parts.tokenizer.decode(ids[labels != -100])
    context = parts.tokenizer.decode(ids[labels == -100])
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained
    assert "21 degrees" in trained
    assert "TOOLRESULTMARK" not in trained and "TOOLRESULTMARK" in context
    assert "Is it warm in Paris?" in context


def test_tool_call_dpo_rows_compare_two_calls(tool_model_dir, tmp_path):
    """A prompt ending in tool results; chosen and rejected are two replies (one a wrong second call)."""
    from dialogrl.training import dpo

    row = weather_row()
    pair = {"tools": row["tools"], "prompt": row["messages"][:4],
            "chosen": [row["messages"][4]],
            "rejected": [{"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}]}
    record = normalise_row(pair)
    assert isinstance(record, PreferencePair) and record.tools == [WEATHER_TOOL]
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(pair) + "\n")
    parts = dpo.build(recipe("dpo", tool_model_dir, data, tmp_path / "dpo", "data.eval_fraction=0"), log=lambda _: None)
    first = parts.data.train[0]
    decode = parts.tokenizer.decode
    assert "TOOLRESULTMARK" in decode(first["prompt_ids"])
    assert decode(first["chosen_ids"]) == "Yes: 21 degrees and clear skies in Paris.<|im_end|>"
    assert decode(first["rejected_ids"]).startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}')


def test_data_check_names_the_row_and_field_of_a_malformed_tool_call(tmp_path):
    bad = weather_row('{"city": "Paris"')
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(weather_row()) + "\n" + json.dumps(bad) + "\n")
    out = subprocess.run([sys.executable, "-m", "dialogrl.training.cli", "data", "check", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "row 2" in out.stdout and "messages[2].tool_calls[0].function.arguments" in out.stdout
    assert "not valid JSON" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_reward_score_renders_a_rows_tools_as_training_did(tool_model_dir, tmp_path):
    """A reward model trained on tool rows saw their tool list in the prompt; scoring without it scores
    another text."""
    import torch
    from test_stages import write_pairs
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dialogrl.data.chat_tokens import ChatTokenizer
    from dialogrl.training import reward
    from dialogrl.training.reward_cli import score_file

    model_dir = tmp_path / "rm"
    reward.main(recipe("reward", tool_model_dir, write_pairs(tmp_path / "pairs.jsonl", 8), model_dir,
                       "training.max_steps=1", "data.eval_fraction=0"), log=lambda _: None)
    rows = tmp_path / "tools.jsonl"
    rows.write_text(json.dumps(weather_row()) + "\n")
    assert score_file(str(model_dir), str(rows), output=str(tmp_path / "scores.jsonl")) == 0
    (scored,) = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(model_dir))
    record = normalise_row(weather_row())

    def score_of_last_turn(tools):
        rendered = chat(record.messages, tools)
        end = max(i for i, bit in enumerate(rendered.assistant_mask) if bit)
        with torch.no_grad():
            return model(input_ids=torch.tensor([rendered.input_ids[: end + 1]])).logits[0, 0].item()

    assert len(scored["scores"]) == 2
    assert scored["scores"][-1] == pytest.approx(score_of_last_turn(record.tools), abs=1e-4)
    assert scored["scores"][-1] != pytest.approx(score_of_last_turn(None), abs=1e-4)
