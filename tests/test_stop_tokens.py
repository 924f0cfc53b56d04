"""Where a turn ends: eos, the generation config, and the recipe's `model.stop_tokens`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from templates import TRL_SET
from test_stages import recipe, write_conversations

from dialogrl.training.models import (
    ModelConfig,
    ModelResolutionError,
    load_causal_lm,
    load_tokenizer,
    stop_tokens,
)

PHI3 = TRL_SET["phi3"]


@pytest.fixture
def phi3_model_dir(tiny_model_dir, tmp_path) -> Path:
    """The tiny model speaking Phi-3's template: eos <|endoftext|>, turns closed by <|end|>, which no
    generation config lists (as in a checkpoint saved without one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path / "tiny-phi3"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": PHI3.special_tokens})
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = PHI3.text
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_recipe_stop_tokens_end_the_masks_and_the_generation(phi3_model_dir, tmp_path):
    from dialogrl.training import sft

    config = ModelConfig(name_or_path=str(phi3_model_dir), stop_tokens=["<|end|>"])
    tokenizer = load_tokenizer(config)
    assert stop_tokens(config, tokenizer) == ["<|endoftext|>", "<|end|>"]
    model = load_causal_lm(config)
    assert tokenizer.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id

    data = write_conversations(tmp_path / "sft.jsonl", 4)
    parts = sft.build(recipe("sft", phi3_model_dir, data, tmp_path / "out", "data.eval_fraction=0",
                             "model.stop_tokens=['<|end|>']"), log=lambda _: None)
    batch = parts.trainer.data_collator([parts.trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = [i for i, label in zip(ids.tolist(), labels.tolist(), strict=True) if label != -100]
    end_id = parts.tokenizer.convert_tokens_to_ids("<|end|>")
    messages = json.loads(data.read_text().splitlines()[0])["messages"]
    assert trained.count(end_id) == sum(m["role"] == "assistant" for m in messages)  # every turn ends there


def test_without_the_end_of_turn_token_the_rows_are_refused_not_guessed(phi3_model_dir, tmp_path):
    from dialogrl.data.sources import DataError
    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 4)
    with pytest.raises(DataError, match="no usable training rows"):
        sft.build(recipe("sft", phi3_model_dir, data, tmp_path / "out", "data.eval_fraction=0"), log=lambda _: None)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 4 and all("not followed by a stop token" in r["reason"] for r in rejects)


def test_a_stop_token_the_tokenizer_does_not_know_is_named(phi3_model_dir):
    with pytest.raises(ModelResolutionError, match=r"model.stop_tokens \['<\|stop\|>'\]"):
        load_tokenizer(ModelConfig(name_or_path=str(phi3_model_dir), stop_tokens=["<|stop|>"]))


def test_a_trained_checkpoint_keeps_the_recipe_stop_tokens(phi3_model_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 4)
    out = tmp_path / "out"
    sft.main(recipe("sft", phi3_model_dir, data, out, "data.eval_fraction=0", "training.max_steps=1",
                    "model.stop_tokens=['<|end|>']"), log=lambda _: None)
    end_id = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|end|>")
    assert end_id in GenerationConfig.from_pretrained(out).eos_token_id
