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


def test_replaced_tensors_let_the_buffers_go_at_once():
    layer = AppendInPlaceLayer()
    keys, _ = layer.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    assert layer._key_buffer is not None
    layer.keys = keys.clone()  # what the engine does when it compacts or merges rows
    assert layer._key_buffer is None  # not held beside the new tensor until the next update
    assert layer._value_buffer is not None  # the values are still views of theirs
    layer.values = layer.values.clone()
    assert layer._value_buffer is None
    keys, values = layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    assert keys.shape == values.shape == (2, 3, 6, 4)


def test_rows_leaving_the_batch_move_down_inside_the_buffers():
    layer = AppendInPlaceLayer()
    keys, values = layer.update(torch.randn(4, 3, 5, 4), torch.randn(4, 3, 5, 4))
    before_keys, before_values, storage = keys.clone(), values.clone(), keys.untyped_storage().data_ptr()
    layer.batch_select_indices(torch.tensor([1, 3]))
    assert torch.equal(layer.keys, before_keys[[1, 3]]) and torch.equal(layer.values, before_values[[1, 3]])
    new_keys = torch.randn(2, 3, 1, 4)
    keys, _ = layer.update(new_keys, torch.randn(2, 3, 1, 4))
    assert keys.untyped_storage().data_ptr() == storage  # no new buffer, before or after the next update
    torch.testing.assert_close(keys[:, :, :5], before_keys[[1, 3]])
    torch.testing.assert_close(keys[:, :, 5:], new_keys)


def test_reserve_with_spare_and_rows_written_through_a_view():
    layer = AppendInPlaceLayer()
    keys, values = layer.reserve(3, 5, torch.empty(1, 2, 1, 4), spare=4)
    assert keys.shape == (3, 2, 5, 4) and not keys.any()
    assert layer._key_buffer.shape[2] == 9  # exactly the room asked for
    keys[:] = torch.randn(3, 2, 5, 4)
    before = keys.clone()
    view = layer.view_rows(1, 3, 2)  # rows 1 and 2, their first 2 positions
    new_keys, new_values = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    view_keys, _ = view.update(new_keys, new_values)
    assert view_keys.shape == (2, 2, 5, 4)
    torch.testing.assert_close(layer.keys[1:, :, 2:5], new_keys)  # written into the parent's buffer
    torch.testing.assert_close(layer.values[1:, :, 2:5], new_values)
    torch.testing.assert_close(layer.keys[0], before[0])
    torch.testing.assert_close(layer.keys[1:, :, :2], before[1:, :, :2])
    assert view_keys.untyped_storage().data_ptr() == layer.keys.untyped_storage().data_ptr()


def test_a_view_of_no_positions_yet_is_written_in_place():
    layer = AppendInPlaceLayer()
    layer.reserve(2, 4, torch.empty(1, 2, 1, 4), spare=0)
    view = layer.view_rows(1, 2, 0)  # nothing cached yet: an empty view (its data_ptr() is 0)
    new_keys = torch.randn(1, 2, 4, 4)
    view.update(new_keys, torch.randn(1, 2, 4, 4))
    torch.testing.assert_close(layer.keys[1:], new_keys)
