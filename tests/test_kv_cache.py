"""The append-in-place key/value cache: same logits as transformers' DynamicCache, without the copies."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from dialogrl.evaluation.kv_cache import AppendInPlaceCache, AppendInPlaceLayer
from dialogrl.training.models import ModelConfig, load_causal_lm


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir))).eval()


def test_generate_matches_dynamic_cache_with_left_padding(model):
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 9))
    attention = torch.ones_like(input_ids)
    attention[0, :4] = 0  # left padding, as the rollout engine lays rows out
    common = dict(input_ids=input_ids, attention_mask=attention, max_new_tokens=10, do_sample=False,
                  return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.inference_mode():
        reference = model.generate(past_key_values=DynamicCache(), **common)
        in_place = model.generate(past_key_values=AppendInPlaceCache(), **common)
    assert torch.equal(reference.sequences, in_place.sequences)
    for a, b in zip(reference.logits, in_place.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(isinstance(layer, AppendInPlaceLayer) for layer in in_place.past_key_values.layers)


def test_decoding_steps_write_into_the_same_buffer():
    layer = AppendInPlaceLayer()
    keys, values = layer.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    buffer = keys.data_ptr()
    for step in range(20):
        new_keys, new_values = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        keys, values = layer.update(new_keys, new_values)
        assert keys.shape == (2, 3, 6 + step, 4)
        assert torch.equal(keys[..., -1:, :], new_keys) and torch.equal(values[..., -1:, :], new_values)
    assert keys.data_ptr() == buffer  # 20 appends fit the spare room: no reallocation, no copy


def test_tensors_replaced_from_outside_are_adopted():
    layer = AppendInPlaceLayer()
    keys, _ = layer.update(torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8))
    before = keys.clone()
    layer.batch_select_indices(torch.tensor([2, 0]))  # what the engine does when rows leave the batch
    new_keys = torch.randn(2, 2, 1, 8)
    keys, values = layer.update(new_keys, torch.randn(2, 2, 1, 8))
    assert keys.shape == values.shape == (2, 2, 5, 8)
    torch.testing.assert_close(keys[:, :, :4], before[[2, 0]])
    torch.testing.assert_close(keys[:, :, 4:], new_keys)
