"""The sft, reward and dpo stages on the tiny model: they learn, mask, count, save, resume and scale out."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dialogrl.data.chat_tokens import ChatTokenizer
from dialogrl.training.config import load_recipe
from dialogrl.training.run_lifecycle import last_complete_checkpoint

WORDS = ["hello", "there", "how", "are", "you", "today", "fine", "thanks", "what", "about", "the", "weather",
         "sunny", "rain", "cold", "warm", "tea"]
CLI = [sys.executable, "-m", "dialogrl.training.cli"]


def _say(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_conversations(path: Path, n: int, rounds: int = 3, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            messages = [{"role": "system", "content": "Be brief."}]
            for _ in range(rounds):
                messages += [{"role": "user", "content": _say(rng, 6)}, {"role": "assistant", "content": _say(rng, 5)}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Trivially separable pairs at turns 1-3: the chosen reply is always 'yes yes yes'."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(n):
            prompt = [{"role": "system", "content": "Be brief."}]
            for _ in range(i % 3):
                prompt += [{"role": "user", "content": _say(rng, 6)}, {"role": "assistant", "content": _say(rng, 5)}]
            prompt.append({"role": "user", "content": _say(rng, 6)})
            row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes yes yes"}],
                   "rejected": [{"role": "assistant", "content": _say(rng, 8)}]}
            handle.write(json.dumps(row) + "\n")
    return path


def recipe(stage: str, tiny_model_dir: Path, data: Path, output_dir: Path, *overrides: str):
    from dialogrl.training.config import recipe_kinds

    return load_recipe(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train=[{{path: {data}}}]", f"output_dir={output_dir}",
        "tracking.report_to=none", "training.logging_steps=1", *overrides,
    ], expected=recipe_kinds()[stage])


def logged(output_dir: Path, key: str) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------- sft


def test_sft_labels_are_exactly_the_assistant_tokens(tiny_model_dir, tmp_path):
    """The labels TRL's collator hands the model cover the assistant turns (and end tokens), nothing else."""
    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 6)
    parts = sft.build(recipe("sft", tiny_model_dir, data, tmp_path / "out", "data.eval_fraction=0"), log=lambda _: None)
    chat = ChatTokenizer(parts.tokenizer)
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    batch = parts.trainer.data_collator([parts.trainer.train_dataset[i] for i in range(len(rows))])
    for i, messages in enumerate(rows):
        expected = chat(messages)
        n = len(expected)
        assert batch["input_ids"][i, :n].tolist() == expected.input_ids
        assert (batch["labels"][i, :n] != -100).long().tolist() == expected.assistant_mask
        assert (batch["labels"][i, n:] == -100).all()  # padding never carries loss
        trained_text = parts.tokenizer.decode(batch["input_ids"][i, :n][batch["labels"][i, :n] != -100])
        assert all(m["content"] in trained_text for m in messages if m["role"] == "assistant")
        assert not any(m["content"] in trained_text for m in messages if m["role"] == "user")


def test_sft_loss_falls_and_weights_change(tiny_model_dir, tmp_path):
    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 8)
    out = tmp_path / "out"
    summary = sft.main(recipe("sft", tiny_model_dir, data, out, "data.eval_fraction=0", "training.max_steps=20",
                              "training.learning_rate=3e-3", "training.per_device_batch_size=8",
                              "training.lr_scheduler=constant"), log=lambda _: None)
    losses = logged(out, "loss")
    assert losses[-1] < losses[0] - 1.0, losses  # the same 8 rows every step: the loss must fall clearly
    before, after = weights(tiny_model_dir), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert summary["global_step"] == 20 and summary["world_size"] == 1
    assert (out / "config.yaml").is_file()
    reloaded = load_recipe(out / "config.yaml")
    assert reloaded.training.max_steps == 20
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "Training rows: 8" in card


def test_packed_and_unpacked_batches_give_the_same_loss(tiny_model_dir, tmp_path):
    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 6, rounds=2)
    losses = {}
    for packing in (False, True):
        parts = sft.build(recipe("sft", tiny_model_dir, data, tmp_path / f"out-{packing}", "data.eval_fraction=0",
                                 f"packing={str(packing).lower()}", "data.max_length=1024"), log=lambda _: None)
        trainer = parts.trainer
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        if packing:
            assert len(rows) < 6  # the six conversations really were packed together
        batch = trainer.data_collator(rows)
        if packing:
            assert "attention_mask" not in batch and "position_ids" in batch
        model = trainer.model.eval()
        with torch.no_grad():
            losses[packing] = model(**{k: v for k, v in batch.items() if k != "seq_lengths"}).loss.item()
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_invalid_wrong_kind_and_over_long_rows_are_counted_and_kept(tiny_model_dir, tmp_path):
    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 6)
    long_messages = [{"role": "user", "content": "hello " * 400}, {"role": "assistant", "content": "fine"}]
    with data.open("a") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")  # row 7: invalid
        handle.write(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")  # row 8: a pair
        handle.write(json.dumps({"messages": long_messages}) + "\n")  # row 9: over max_length
    out = tmp_path / "out"
    parts = sft.build(recipe("sft", tiny_model_dir, data, out, "data.eval_fraction=0", "data.max_length=256"),
                      log=lambda _: None)
    summary = parts.data.summary
    assert summary["rejects"] == {"invalid": 1, "wrong_kind": 1, "too_long": 1}
    assert summary["train"]["rows"] == 6 == len(parts.trainer.train_dataset)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in rejects) == [7, 8, 9]
    assert all(r["source"] == str(data) and r["reason"] for r in rejects)


def test_lora_sft_saves_an_adapter_and_a_merged_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 4)
    out = tmp_path / "out"
    sft.main(recipe("sft", tiny_model_dir, data, out, "data.eval_fraction=0", "training.max_steps=3",
                    "lora.enabled=true", "lora.merge=true", "training.learning_rate=1e-2"), log=lambda _: None)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # only adapted linear layers moved
    assert load_recipe(out / "merged" / "config.yaml").lora.enabled


# --------------------------------------------------------------------------- reward


def test_reward_model_learns_separable_pairs_and_scores_per_turn(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dialogrl.training import reward
    from dialogrl.training.reward_scoring import score_conversations

    data = write_pairs(tmp_path / "pairs.jsonl", 90)
    out = tmp_path / "rm"
    summary = reward.main(recipe("reward", tiny_model_dir, data, out, "data.eval_fraction=0.25",
                                 "training.max_steps=30", "training.learning_rate=3e-3"), log=lambda _: None)
    accuracy = json.loads((out / reward.ACCURACY_FILENAME).read_text())
    assert accuracy["accuracy"] > 0.9 and accuracy["pairs"] >= 10
    assert set(accuracy["by_turn"]) == {"1", "2", "3"}
    assert summary["metrics"]["eval_accuracy"] == accuracy["accuracy"]

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "yes yes yes"},
                    {"role": "user", "content": "and today"}, {"role": "assistant", "content": "cold rain tea"}]
    chat = ChatTokenizer(tokenizer)
    (per_turn,) = score_conversations(model, chat, [conversation], pad_id=tokenizer.pad_token_id)
    # One pass over the whole dialogue gives each turn the score of the dialogue cut after that turn.
    for k, prefix in enumerate((conversation[:2], conversation)):
        ids = chat(prefix).input_ids
        end = max(i for i, bit in enumerate(chat(prefix).assistant_mask) if bit)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids[: end + 1]])).logits[0, 0].item()
        assert per_turn[k] == pytest.approx(alone, abs=1e-4)


def test_reward_score_cli_scores_every_turn(tiny_model_dir, tmp_path):
    from dialogrl.training import reward

    out = tmp_path / "rm"
    reward.main(recipe("reward", tiny_model_dir, write_pairs(tmp_path / "pairs.jsonl", 12), out,
                       "training.max_steps=2", "data.eval_fraction=0"), log=lambda _: None)
    conversations = write_conversations(tmp_path / "c.jsonl", 3, rounds=2)
    done = subprocess.run([*CLI, "reward", "score", "--model", str(out), str(conversations)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["row"] for line in lines] == [1, 2, 3] and all(len(line["scores"]) == 2 for line in lines)
    last = subprocess.run([*CLI, "reward", "score", "--model", str(out), str(conversations), "--turns", "last"],
                          capture_output=True, text=True, timeout=300)
    assert [json.loads(line)["score"] for line in last.stdout.splitlines()] == [line["scores"][-1] for line in lines]


# --------------------------------------------------------------------------- dpo


def test_dpo_margin_rises_and_weights_change(tiny_model_dir, tmp_path):
    from dialogrl.training import dpo

    out = tmp_path / "dpo"
    dpo.main(recipe("dpo", tiny_model_dir, write_pairs(tmp_path / "pairs.jsonl", 16), out, "data.eval_fraction=0",
                    "training.max_steps=10", "training.learning_rate=2e-3", "training.per_device_batch_size=8"),
             log=lambda _: None)
    margins = logged(out, "rewards/margins")
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert margins[-1] > 0.5, margins
    before, after = weights(tiny_model_dir), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("reference", ["lora", "precomputed"])
def test_dpo_reference_options(tiny_model_dir, tmp_path, reference):
    """LoRA: the reference is the base with the adapter disabled; precomputed: log-probs taken once before training."""
    from dialogrl.training import dpo

    extra = ["lora.enabled=true", "lora.r=4"] if reference == "lora" else ["reference=precomputed"]
    out = tmp_path / "dpo"
    parts = dpo.build(recipe("dpo", tiny_model_dir, write_pairs(tmp_path / "pairs.jsonl", 16), out,
                             "data.eval_fraction=0", "training.max_steps=6", "training.learning_rate=5e-3", *extra),
                      log=lambda _: None)
    assert parts.trainer.ref_model is None  # no second copy of the model in memory
    from dialogrl.training.trainer_setup import train_stage

    train_stage(parts)
    margins = logged(out, "rewards/margins")
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > margins[0]


def test_dpo_rows_split_at_the_reply(tiny_model_dir, tmp_path):
    from dialogrl.training import dpo

    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    parts = dpo.build(recipe("dpo", tiny_model_dir, data, tmp_path / "out", "data.eval_fraction=0"),
                      log=lambda _: None)
    row = parts.trainer.train_dataset[0]
    tokenizer = parts.tokenizer
    assert tokenizer.decode(row["chosen_ids"]) == "yes yes yes<|im_end|>"
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------- processes


def _accelerate_launch(config: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "-m", "dialogrl.training.cli", *args]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_processes_reach_the_same_losses_as_one_with_double_accumulation(stage, tiny_model_dir, tmp_path):
    """Same global batch (2 x 2 rows): losses agree to 1e-5 at every step, and the run really has 2 processes.
    For reward, both processes must start from the same score head (drawn from the recipe's seed)."""
    data = write_conversations(tmp_path / "rows.jsonl", 16) if stage == "sft" else write_pairs(tmp_path / "rows.jsonl", 16)
    common = [stage, "--config", str(_stage_file(tmp_path, stage)), f"model.name_or_path={tiny_model_dir}",
              f"data.train=[{{path: {data}}}]", "data.eval_fraction=0", "tracking.report_to=none",
              "training.max_steps=5", "training.logging_steps=1", "training.per_device_batch_size=2",
              "training.learning_rate=1e-3"]
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu.yaml"
    two = subprocess.run(_accelerate_launch(config, [*common, f"output_dir={tmp_path / 'two'}"]),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([*CLI, *common, f"output_dir={tmp_path / 'one'}", "training.gradient_accumulation_steps=2"],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run_summary.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "run_summary.json").read_text())["world_size"] == 1
    losses_two, losses_one = logged(tmp_path / "two", "loss"), logged(tmp_path / "one", "loss")
    assert len(losses_two) == len(losses_one) == 5
    assert losses_two == pytest.approx(losses_one, abs=1e-5)


def _stage_file(tmp_path: Path, stage: str) -> Path:
    path = tmp_path / f"{stage}.yaml"
    path.write_text(f"stage: {stage}\n")
    return path


def test_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "sft.jsonl", 32)
    out = tmp_path / "out"
    command = [*CLI, "sft", "--config", str(_stage_file(tmp_path, "sft")), f"model.name_or_path={tiny_model_dir}",
               f"data.train=[{{path: {data}}}]", f"output_dir={out}", "data.eval_fraction=0",
               "tracking.report_to=none", "training.max_steps=400", "training.save_steps=10",
               "training.per_device_batch_size=1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-20" / "trainer_state.json").is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "run_summary.json").exists()  # it really died mid-run
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at < 400
    # Mark what only the checkpoint holds: the Trainer carries a resumed run's log history on from its
    # checkpoint, and a run trained from scratch (the resume ignored) would not have the mark.
    resume_point = last_complete_checkpoint(out)
    state_path = Path(resume_point) / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"][0]["written_before_the_kill"] = True
    state_path.write_text(json.dumps(state))
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 400 and summary["resumed_from"] == resume_point
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0].get("written_before_the_kill") is True, "the run did not continue from its checkpoint"
    steps_logged = [e["step"] for e in history if "loss" in e]
    assert steps_logged == sorted(set(steps_logged))  # no step trained twice in the log


def test_stage_errors_name_the_problem(tiny_model_dir, tmp_path):
    config = _stage_file(tmp_path, "dpo")
    missing = subprocess.run([*CLI, "dpo", "--config", str(config), f"model.name_or_path={tiny_model_dir}",
                              f"data.train=[{{path: {tmp_path / 'nope.jsonl'}}}]", f"output_dir={tmp_path / 'o'}",
                              "tracking.report_to=none"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr
    conversations = write_conversations(tmp_path / "c.jsonl", 4)
    wrong = subprocess.run([*CLI, "dpo", "--config", str(config), f"model.name_or_path={tiny_model_dir}",
                            f"data.train=[{{path: {conversations}}}]", f"output_dir={tmp_path / 'o2'}",
                            "tracking.report_to=none"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1 and "no usable training rows" in wrong.stderr and "wrong_kind" in wrong.stderr
    checkpoint = tmp_path / "o3" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    never = subprocess.run([*CLI, "sft", "--config", str(_stage_file(tmp_path, "sft")),
                            f"model.name_or_path={tiny_model_dir}", f"data.train=[{{path: {conversations}}}]",
                            f"output_dir={tmp_path / 'o3'}", "resume=never"], capture_output=True, text=True, timeout=300)
    assert never.returncode == 1 and "checkpoint-5" in never.stderr and "resume: auto" in never.stderr
    shutil.rmtree(tmp_path / "o3")


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    """A kill during a save leaves checkpoint-N without trainer_state.json (written last): resume uses N-1."""
    from dialogrl.training.run_lifecycle import find_resume_checkpoint

    for step, state in ((10, "{}"), (20, "{}"), (30, None), (40, "{truncated")):
        directory = tmp_path / f"checkpoint-{step}"
        directory.mkdir()
        (directory / "model.safetensors").write_text("")
        if state is not None:
            (directory / "trainer_state.json").write_text(state)
    assert find_resume_checkpoint(tmp_path, "auto") == str(tmp_path / "checkpoint-20")
    assert find_resume_checkpoint(tmp_path / "empty", "auto") is None
