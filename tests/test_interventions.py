"""Split-softmax (Li et al. 2024) on a tiny random Llama.

The model is random, so these tests check the mechanics, not that drift goes down:
k = 1 is exactly eager attention (prefill and cached decoding, left padding),
k < 1 moves attention mass to the system span by the paper's formula with the cap,
rows still sum to 1, and leaving the context restores the model exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dialogrl.evaluation.interventions import (
    SPLIT_SOFTMAX,
    SplitSoftmaxConfig,
    apply_split_softmax,
    register_split_softmax,
    split_softmax,
    system_span_mask,
)

PAD = 0
SYSTEM_LENGTHS = [5, 4]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=None,
        bos_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Left-padded batch of 2: row 0 has 12 real tokens, row 1 has 9 after 3 pads."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 128, (2, 12), generator=generator)  # [B=2, T=12]
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3] = PAD
    attention_mask[1, :3] = 0
    system_mask = system_span_mask(input_ids, attention_mask, SYSTEM_LENGTHS)  # [2, 12] bool
    return {"input_ids": input_ids, "attention_mask": attention_mask, "system_mask": system_mask}


def forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


def reference_split(weights: torch.Tensor, system: torch.Tensor, k: float, max_boost: float) -> torch.Tensor:
    """The paper's formula, row by row in float64, with the cap: new system mass min(pi^k, max_boost * pi)."""
    out = weights.double().clone()
    rows = out.reshape(-1, out.shape[-1])
    system = system.expand_as(out).reshape(-1, out.shape[-1])
    for row, sys_row in zip(rows, system, strict=True):
        pi = row[sys_row].sum()
        if 0 < pi < 1:
            new_mass = min(pi**k, max_boost * pi)
            row[sys_row] *= new_mass / pi
            row[~sys_row] *= (1 - new_mass) / (1 - pi)
    return out.to(weights.dtype)


def key_mask(batch, exclude_first_token: bool) -> torch.Tensor:
    """[B, 1, 1, T] system keys as the attention function should see them at prefill."""
    keys = batch["system_mask"].clone()
    if exclude_first_token:
        first_real = batch["attention_mask"].argmax(dim=-1)
        keys[torch.arange(keys.shape[0]), first_real] = False
    return keys[:, None, None, :]


def test_system_span_mask_marks_the_first_real_tokens():
    input_ids = torch.tensor([[7, 8, 9, 10], [PAD, PAD, 5, 6]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    mask = system_span_mask(input_ids, attention_mask, [3, 1])
    assert mask.tolist() == [[True, True, True, False], [False, False, True, False]]
    with pytest.raises(ValueError, match="real tokens"):
        system_span_mask(input_ids, attention_mask, [3, 3])


def test_k_one_matches_eager_at_prefill_and_in_cached_decoding(model, batch):
    eager_logits = forward(model, batch).logits
    generate_kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD, output_logits=True)
    generate_kwargs.update(return_dict_in_generate=True)
    eager_generated = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **generate_kwargs
    )

    with split_softmax(model, batch["system_mask"], SplitSoftmaxConfig(k=1.0)):
        assert model.config._attn_implementation == SPLIT_SOFTMAX
        logits = forward(model, batch).logits
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **generate_kwargs
        )

    real = batch["attention_mask"].bool()  # padding query rows are garbage in both; compare real ones
    torch.testing.assert_close(logits[real], eager_logits[real], atol=1e-5, rtol=0)
    assert torch.equal(generated.sequences, eager_generated.sequences)
    for step, eager_step in zip(generated.logits, eager_generated.logits, strict=True):
        torch.testing.assert_close(step, eager_step, atol=1e-5, rtol=0)


def test_cached_decoding_matches_a_full_forward_with_the_intervention(model, batch):
    """Decoding with a KV cache (query length 1, growing keys) sees the same system keys as prefill."""
    config = SplitSoftmaxConfig(k=0.3)
    with split_softmax(model, batch["system_mask"], config):
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=PAD,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat(
            [batch["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=-1
        )  # [2, 17]
        with torch.no_grad():
            full = model(input_ids=generated.sequences, attention_mask=full_mask).logits  # [2, 17, V]
    prompt_len = batch["input_ids"].shape[1]
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, full[:, prompt_len - 1 + step], atol=1e-5, rtol=0)
    eager_tokens = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert not torch.allclose(generated.logits[0], eager_tokens.logits[0])  # the intervention did act


def test_k_below_one_moves_mass_to_the_system_span_by_the_formula(model, batch):
    config = SplitSoftmaxConfig(k=0.5, max_boost=10.0)
    eager = forward(model, batch, output_attentions=True).attentions
    with split_softmax(model, batch["system_mask"], config):
        split = forward(model, batch, output_attentions=True).attentions

    keys = key_mask(batch, exclude_first_token=True)  # [2, 1, 1, 12]
    real = batch["attention_mask"].bool()
    for layer in split:
        sums = layer.sum(dim=-1)[real[:, None, :].expand(-1, layer.shape[1], -1)]
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)

    # Layer 0 sees the same inputs in both runs, so its weights are exactly eager's after the split.
    torch.testing.assert_close(
        split[0], reference_split(eager[0], keys, config.k, config.max_boost), atol=1e-6, rtol=0
    )
    pi_eager = (eager[0] * keys).sum(dim=-1)  # [B, H, T_q]
    pi_split = (split[0] * keys).sum(dim=-1)
    for row, length in enumerate(SYSTEM_LENGTHS):
        first_real = int(batch["attention_mask"][row].argmax())
        after_span = slice(first_real + length, None)  # queries after the system prompt
        assert (pi_split[row, :, after_span] > pi_eager[row, :, after_span]).all()


def test_cap_bounds_the_system_scale():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 20, generator=generator) * 4
    logits[:, :3] -= torch.linspace(0, 12, 64)[:, None]  # pi from moderate down to ~1e-6
    weights = logits.softmax(dim=-1)  # [64, 20]
    system = torch.zeros(20, dtype=torch.bool)
    system[:3] = True
    pi = weights[:, system].sum(dim=-1)
    assert pi.min() < 1e-4  # the uncapped scale pi^-0.5 would exceed 100 here

    out = apply_split_softmax(weights, system, k=0.5, max_boost=10.0)
    scale = out[:, system] / weights[:, system]
    assert scale.max() <= 10.0 + 1e-4
    assert torch.isclose(scale.max(), torch.tensor(10.0), atol=1e-4)  # the cap was reached, not avoided
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, reference_split(weights, system, 0.5, 10.0), atol=1e-6, rtol=0)


def test_cap_holds_inside_the_model(model, batch):
    config = SplitSoftmaxConfig(k=0.1, max_boost=1.5)  # pi^-0.9 > 1.5 for every pi < 0.64
    eager = forward(model, batch, output_attentions=True).attentions
    with split_softmax(model, batch["system_mask"], config):
        split = forward(model, batch, output_attentions=True).attentions
    keys = key_mask(batch, exclude_first_token=True).expand_as(eager[0]) & (eager[0] > 0)  # skip causal zeros
    scale = split[0][keys] / eager[0][keys]
    assert scale.max() <= 1.5 + 1e-5
    assert scale.max() > 1.49


def test_rows_without_system_share_are_unchanged_and_finite():
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    system = torch.tensor([[False, False, False], [True, True, False], [True, True, False]])  # pi = 0, 1, 0
    out = apply_split_softmax(weights, system, k=0.5, max_boost=10.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out, weights)


def test_leaving_restores_the_implementation_and_eager_logits(model, batch):
    before = forward(model, batch).logits
    with split_softmax(model, batch["system_mask"], SplitSoftmaxConfig(k=0.3)):
        during = forward(model, batch).logits
    assert model.config._attn_implementation == "eager"
    assert model.model.config._attn_implementation == "eager"
    assert not torch.allclose(during, before)
    assert torch.equal(forward(model, batch).logits, before)

    with (
        pytest.raises(RuntimeError, match="boom"),
        split_softmax(model, batch["system_mask"], SplitSoftmaxConfig()),
    ):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert torch.equal(forward(model, batch).logits, before)


def test_restores_sdpa_exactly(model, batch):
    model.set_attn_implementation("sdpa")
    try:
        with split_softmax(model, batch["system_mask"], SplitSoftmaxConfig()):
            assert model.config._attn_implementation == SPLIT_SOFTMAX
        assert model.config._attn_implementation == "sdpa"
    finally:
        model.set_attn_implementation("eager")


@pytest.mark.parametrize("exclude_first_token", [True, False])
def test_first_real_token_scales_like_a_non_system_key(model, batch, exclude_first_token):
    config = SplitSoftmaxConfig(k=0.5, exclude_first_token=exclude_first_token)
    eager = forward(model, batch, output_attentions=True).attentions[0]
    with split_softmax(model, batch["system_mask"], config):
        split = forward(model, batch, output_attentions=True).attentions[0]
    row, first_real, length = 1, 3, SYSTEM_LENGTHS[1]  # row 1 is left-padded by 3
    query = 10  # a user token after the span
    scale = split[row, :, query] / eager[row, :, query]  # [H, T_k]
    sink, system_key, user_key = scale[:, first_real], scale[:, first_real + 1], scale[:, first_real + length]
    assert (system_key > 1).all() and (user_key < 1).all()
    expected = user_key if exclude_first_token else system_key
    torch.testing.assert_close(sink, expected, atol=1e-5, rtol=1e-5)


def test_outside_a_context_the_function_refuses(model, batch):
    model.set_attn_implementation(register_split_softmax())
    try:
        with pytest.raises(RuntimeError, match="split_softmax context"):
            forward(model, batch)
    finally:
        model.set_attn_implementation("eager")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0.0}, "k must be in"), ({"k": 1.5}, "k must be in"), ({"max_boost": 0.5}, "max_boost must be")],
)
def test_invalid_config_fails(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SplitSoftmaxConfig(**kwargs)


def test_invalid_system_mask_fails(model, batch):
    with pytest.raises(ValueError, match="must be bool"):
        split_softmax(model, batch["attention_mask"], SplitSoftmaxConfig())
    with (
        pytest.raises(ValueError, match="batch size"),
        split_softmax(model, batch["system_mask"].repeat(3, 1), SplitSoftmaxConfig()),
    ):
        forward(model, batch)
    assert model.config._attn_implementation == "eager"


def test_register_is_idempotent():
    assert register_split_softmax() == register_split_softmax() == SPLIT_SOFTMAX
