"""Per-document attention for packed rows: same numbers as each conversation alone, and no packed-row mask."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dialogrl.training import packed_attention


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _packed(lengths):
    docs = [torch.randint(0, 97, (n,)) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, torch.cat(docs)[None], positions


def test_packed_row_gives_each_conversation_its_own_logits_and_gradients(model):
    docs, ids, positions = _packed((5, 11, 3, 7))
    model.train()  # dropout is 0: train mode only makes the model build no cache
    assert packed_attention.use_for_packing(model) == packed_attention.PACKED_ATTENTION
    packed = model(input_ids=ids, position_ids=positions).logits
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(input_ids=d[None]).logits for d in docs], dim=1)
    alone.sum().backward()
    assert torch.allclose(packed, alone, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(packed_grads[name], param.grad, atol=1e-4), name


def test_no_mask_as_wide_as_the_packed_row_is_built(model, monkeypatch):
    import transformers.masking_utils as masking

    def refuse(*args, **kwargs):
        raise AssertionError("a full SDPA mask was built for a packed row")

    _, ids, positions = _packed((6, 9))
    monkeypatch.setattr(masking, "sdpa_mask", refuse)  # what the packed mask would fall back to
    monkeypatch.setitem(masking.AttentionMaskInterface._global_mapping, "sdpa", refuse)
    # On plain SDPA the check fires: a model there builds the packed row's block-diagonal mask.
    with pytest.raises(AssertionError, match="full SDPA mask"), torch.no_grad():
        model(input_ids=ids, position_ids=positions, use_cache=False)
    packed_attention.use_for_packing(model)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions, use_cache=False)


def test_padded_batches_and_cached_decoding_match_sdpa(model):
    model.eval()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        packed_attention.use_for_packing(model)
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, reference, atol=1e-5)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                          pad_token_id=0), greedy)


def test_collator_boundaries_are_used_when_given(model, monkeypatch):
    docs, ids, positions = _packed((4, 8))
    packed_attention.use_for_packing(model)
    alone = torch.cat([model(input_ids=d[None], use_cache=False).logits for d in docs], dim=1).detach()

    def refuse(_positions):
        raise AssertionError("the boundaries were read from the position ids again")

    monkeypatch.setattr(packed_attention, "document_spans", refuse)
    bounds = torch.tensor([0, 4, 12], dtype=torch.int32)
    with torch.no_grad():
        from_collator = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                              use_cache=False).logits
    assert torch.allclose(from_collator, alone, atol=1e-5)


def test_flash_attention_is_left_in_place(model):
    model.config._attn_implementation = "flash_attention_2"  # not loadable here; only the choice is checked
    assert packed_attention.use_for_packing(model) == "flash_attention_2"


def test_document_spans_read_restarting_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert packed_attention.document_spans(positions) == [[(0, 3), (3, 5), (5, 9)]]
    assert packed_attention.document_spans(torch.arange(4)[None]) == [[(0, 4)]]
