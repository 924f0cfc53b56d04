"""PPO maths on hand-made multi-turn batches; every expected number is derived in the docstrings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dialogrl.training.ppo_math import (
    AdaptiveKL,
    FixedKL,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    group_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    place_turn_rewards,
    policy_loss,
    returns_to_go,
    turn_aware_gae,
    value_loss,
)


@pytest.fixture(autouse=True)
def float64_default():
    """Hand-computed numbers are checked to 1e-12, so this module builds float64 tensors by default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# Turns of one dialogue as (rewards, values) per generated token, used by the layout tests.
TURNS = [
    ([-0.1, 0.05, 1.0], [0.3, -0.2, 0.7]),
    ([0.2], [0.5]),
    ([0.0, -0.3, 0.1, 2.0], [1.1, 0.4, -0.6, 0.9]),
]


def build_batch(layouts, turns=TURNS, garbage=123.0):
    """Rows of the same dialogue laid out as (left_pad, user tokens before each turn, right_pad).

    Non-generated positions get `garbage` rewards and values, which must never matter.
    """
    rows = []
    for left, gaps, right in layouts:
        row = [(garbage, garbage, 0, -1)] * left
        for k, ((rewards, values), gap) in enumerate(zip(turns, gaps, strict=True)):
            row += [(garbage, garbage, 0, -1)] * gap
            row += [(r, v, 1, k) for r, v in zip(rewards, values, strict=True)]
        rows.append(row + [(garbage, garbage, 0, -1)] * right)
    length = max(len(row) for row in rows)
    rows = [row + [(garbage, garbage, 0, -1)] * (length - len(row)) for row in rows]
    rewards = torch.tensor([[p[0] for p in row] for row in rows])  # [B, L]
    values = torch.tensor([[p[1] for p in row] for row in rows])  # [B, L]
    mask = torch.tensor([[p[2] for p in row] for row in rows], dtype=torch.bool)  # [B, L]
    turn_ids = torch.tensor([[p[3] for p in row] for row in rows])  # [B, L]
    return rewards, values, mask, turn_ids


def test_gae_matches_hand_computed_example():
    """Layout [u u][a0 a0][u][a1 a1 a1][pad], gamma_turn 0.9, lam 0.95, bootstrap 0.

    Generated tokens (position: reward, value): 2: 0, 0.5 | 3: 1.0, 0.4 | 5: 0, 0.3 | 6: 0, 0.2 | 7: 2.0, 0.1.
    Backwards, g = 0.9 at the end and at the 3 -> 5 boundary, 1 inside a turn:
      t7: delta = 2.0 + 0.9*0 - 0.1 = 1.9;              A7 = 1.9
      t6: delta = 0 + 0.1 - 0.2 = -0.1;                 A6 = -0.1 + 0.95*1.9 = 1.705
      t5: delta = 0 + 0.2 - 0.3 = -0.1;                 A5 = -0.1 + 0.95*1.705 = 1.51975
      t3: delta = 1.0 + 0.9*0.3 - 0.4 = 0.87;           A3 = 0.87 + 0.9*0.95*1.51975 = 2.16938625
      t2: delta = 0 + 0.4 - 0.5 = -0.1;                 A2 = -0.1 + 0.95*2.16938625 = 1.9609169375
    Returns A + V: 2.4609169375, 2.56938625, 1.81975, 1.905, 2.0. User/pad tokens carry 9.0 values
    and rewards, which must be ignored, and get 0.
    """
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    turn_ids = torch.tensor([[-1, -1, 0, 0, -1, 1, 1, 1, -1]])
    rewards = torch.tensor([[9.0, 9.0, 0.0, 1.0, 9.0, 0.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.4, 9.0, 0.3, 0.2, 0.1, 9.0]])
    adv, ret = turn_aware_gae(rewards, values, mask, turn_ids, gamma_turn=0.9, lam=0.95)
    expected_adv = torch.tensor([[0, 0, 1.9609169375, 2.16938625, 0, 1.51975, 1.705, 1.9, 0]])
    expected_ret = torch.tensor([[0, 0, 2.4609169375, 2.56938625, 0, 1.81975, 1.905, 2.0, 0]])
    torch.testing.assert_close(adv, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, expected_ret, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bootstrap", [0.0, 0.8])
def test_gae_ignores_user_token_lengths_and_padding(bootstrap):
    """One dialogue, rows differing only in user-gap lengths (0, 1, 5, 17) and left/right padding."""
    layouts = [
        (0, [0, 0, 0], 0),
        (0, [1, 5, 17], 0),
        (0, [17, 0, 1], 6),
        (4, [5, 17, 0], 0),
        (9, [0, 1, 5], 3),
    ]
    rewards, values, mask, turn_ids = build_batch(layouts)
    boot = torch.full((len(layouts),), bootstrap)
    adv, ret = turn_aware_gae(
        rewards, values, mask, turn_ids, gamma_turn=0.9, lam=0.95, bootstrap_values=boot
    )
    reference_adv, reference_ret = adv[0][mask[0]], ret[0][mask[0]]
    assert reference_adv.abs().sum() > 0
    for b in range(1, len(layouts)):
        torch.testing.assert_close(adv[b][mask[b]], reference_adv, atol=1e-12, rtol=0)
        torch.testing.assert_close(ret[b][mask[b]], reference_ret, atol=1e-12, rtol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_placed_rewards_land_on_each_turns_last_token():
    """Rows with 3, 2 and 1 turns; the scores of missing turns are NaN and must be dropped."""
    rewards, values, mask, turn_ids = build_batch([(2, [3, 1, 5], 1)])
    short = torch.tensor([[-1, 0, 0, -1, 1, 1, 1, -1] + [-1] * (turn_ids.shape[1] - 8)])
    single = torch.tensor([[-1] * 4 + [0] * 3 + [-1] * (turn_ids.shape[1] - 7)])
    turn_ids = torch.cat([turn_ids, short, single])  # [3, L]
    nan = float("nan")
    scores = torch.tensor([[1.5, -2.0, 0.25], [3.0, 4.0, nan], [-7.0, nan, nan]])  # [3, K]
    placed = place_turn_rewards(scores, turn_ids)
    assert placed.shape == turn_ids.shape and not placed.isnan().any()
    for b in range(3):
        for k in range(3):
            positions = (turn_ids[b] == k).nonzero().flatten()
            if len(positions) == 0:
                continue
            last = int(positions[-1])
            assert turn_ids[b, last] >= 0  # a generated (action_mask 1) position
            assert placed[b, last] == scores[b, k]
    assert placed.sum() == 1.5 - 2.0 + 0.25 + 3.0 + 4.0 - 7.0
    assert (placed != 0).sum() == 6
    with pytest.raises(ValueError, match="turn_scores has only 2 columns"):
        place_turn_rewards(scores[:, :2], turn_ids)


def test_discount_is_one_inside_a_turn_and_gamma_across_turns():
    """gamma_turn 0.5, lam 1, values 0, reward 1 on turn 1's last token: turn 1 tokens get 1 each,
    turn 0 tokens get 0.5 each (one boundary), whatever the number of tokens per turn."""
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    turn_ids = torch.tensor([[0, 0, 0, -1, -1, 1, 1]])
    rewards = torch.tensor([[0, 0, 0, 0, 0, 0, 1.0]])
    adv, _ = turn_aware_gae(rewards, torch.zeros(1, 7), mask, turn_ids, gamma_turn=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5, 0, 0, 1.0, 1.0]]), atol=1e-12, rtol=0)


def test_bootstrap_value_shifts_advantages_by_discounted_amount():
    """Turns [2 tokens][u][2 tokens], gamma_turn 0.9, lam 0.95, bootstrap 2 for row 0, 0 for row 1.

    The bootstrap enters delta at the last token as 0.9 * 2 = 1.8, then decays by g * lam per step:
    last turn 1.8, 1.8*0.95 = 1.71; first turn 1.71*0.9*0.95 = 1.46205, 1.46205*0.95 = 1.3889475.
    """
    mask = torch.tensor([[1, 1, 0, 1, 1]] * 2, dtype=torch.bool)
    turn_ids = torch.tensor([[0, 0, -1, 1, 1]] * 2)
    rewards = torch.tensor([[0.1, 0.5, 0, -0.2, 1.0]] * 2)
    values = torch.tensor([[0.3, 0.2, 0, 0.6, 0.4]] * 2)
    kwargs = {"gamma_turn": 0.9, "lam": 0.95}
    base_adv, base_ret = turn_aware_gae(rewards, values, mask, turn_ids, **kwargs)
    adv, ret = turn_aware_gae(
        rewards, values, mask, turn_ids, bootstrap_values=torch.tensor([2.0, 0.0]), **kwargs
    )
    shift = torch.tensor([1.3889475, 1.46205, 0, 1.71, 1.8])
    torch.testing.assert_close(adv[0] - base_adv[0], shift, atol=1e-9, rtol=0)
    torch.testing.assert_close(ret[0] - base_ret[0], shift, atol=1e-9, rtol=0)
    torch.testing.assert_close(adv[1], base_adv[1], atol=0, rtol=0)


def test_policy_loss_at_ratio_one():
    """First minibatch after rollout: ratio 1 exactly, nothing clipped, no KL, loss = -mean(A)."""
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 6) * 5
    advantages = torch.randn(3, 6)
    mask = torch.rand(3, 6) > 0.3
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask)
    assert stats["ratio"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    torch.testing.assert_close(loss, -masked_mean(advantages, mask), atol=1e-12, rtol=0)


def test_policy_loss_clipping_by_hand():
    """eps 0.2; tokens (A, ratio): (1, 1.5) (1, 0.5) (-1, 1.5) (-1, 0.5), plus a masked token.

    Per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 clipped; max(-0.5, -0.8) = -0.5;
    max(1.5, 1.2) = 1.5; max(0.5, 0.8) = 0.8 clipped. Loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15,
    clipfrac 2/4. d loss / d logp = -A r / 4 on unclipped tokens: -0.125 and 0.375; 0 on clipped.
    """
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 50.0]])
    logprobs = ratios.log().requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 5), advantages, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.15), atol=1e-12, rtol=0)
    assert stats["clipfrac"].item() == 0.5
    assert not stats["policy_loss"].requires_grad
    loss.backward()
    torch.testing.assert_close(
        logprobs.grad, torch.tensor([[0.0, -0.125, 0.375, 0.0, 0.0]]), atol=1e-12, rtol=0
    )


def test_losses_sum_over_chunks_with_global_token_count():
    torch.manual_seed(1)
    logprobs, old, adv = -torch.rand(8, 7), -torch.rand(8, 7), torch.randn(8, 7)
    values, old_values, returns = torch.randn(8, 7), torch.randn(8, 7), torch.randn(8, 7)
    mask = torch.rand(8, 7) > 0.4
    mask[:4, 5:] = False  # unequal token counts per half, so a mean of means would differ
    total = int(mask.sum())
    full, _ = policy_loss(logprobs, old, adv, mask)
    halves = [
        policy_loss(logprobs[s], old[s], adv[s], mask[s], num_tokens=total)[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close(halves[0] + halves[1], full, atol=1e-12, rtol=0)
    full_v, _ = value_loss(values, old_values, returns, mask)
    halves_v = [
        value_loss(values[s], old_values[s], returns[s], mask[s], num_tokens=total)[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close(halves_v[0] + halves_v[1], full_v, atol=1e-12, rtol=0)


def test_whitening_over_all_masked_tokens():
    torch.manual_seed(2)
    x = torch.randn(4, 9) + torch.arange(4.0).unsqueeze(1) * 3  # rows with different means
    mask = torch.rand(4, 9) > 0.3
    white = masked_whiten(x, mask)
    torch.testing.assert_close(masked_mean(white, mask), torch.tensor(0.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(masked_var(white, mask), torch.tensor(1.0), atol=1e-6, rtol=0)
    assert (white[~mask] == 0).all()
    assert masked_mean(white[3], mask[3]) > 0.5  # batch-wide, not per row
    poisoned = x.masked_fill(~mask, float("inf"))
    poisoned[0, ~mask[0]] = float("nan")
    torch.testing.assert_close(masked_whiten(poisoned, mask), white, atol=0, rtol=0)
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(kept, mask), masked_mean(x, mask), atol=1e-12, rtol=0)


def test_kl_penalty_estimators():
    torch.manual_seed(3)
    logprobs, ref = -torch.rand(3, 8) * 4, -torch.rand(3, 8) * 4
    mask = torch.rand(3, 8) > 0.3
    ref_poisoned = ref.masked_fill(~mask, float("-inf"))
    k1 = kl_penalty(logprobs, ref_poisoned, mask, "k1")
    assert torch.equal(k1[mask], (logprobs - ref)[mask]) and (k1[~mask] == 0).all()
    k3 = kl_penalty(logprobs, ref_poisoned, mask, "k3")
    d = logprobs - ref
    torch.testing.assert_close(k3[mask], (torch.exp(-d) - 1 + d)[mask], atol=1e-12, rtol=0)
    assert (k3 >= 0).all() and (k3[~mask] == 0).all()
    assert (kl_penalty(logprobs, logprobs, mask, "k3") == 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logprobs, ref, mask, "k2")


def test_value_loss_clipping_by_hand():
    """clip 0.2, V_old 0.5 everywhere; tokens (V, R):
      (1.0, 0.0): V_clip 0.7, max(1.0, 0.49) = 1.0 -> 0.5, unclipped, dL/dV = (V - R) / 3 = 1/3
      (1.0, 2.0): V_clip 0.7, max(1.0, 1.69) = 1.69 -> 0.845, clipped, dL/dV = 0
      (0.6, 1.0): inside the range, both 0.16 -> 0.08, not counted as clipped, dL/dV = -0.4 / 3
    Loss (0.5 + 0.845 + 0.08) / 3 = 0.475, value_clipfrac 1/3; the 4th (masked) token is ignored.
    """
    values = torch.tensor([[1.0, 1.0, 0.6, 40.0]], requires_grad=True)
    returns = torch.tensor([[0.0, 2.0, 1.0, -40.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = value_loss(values, torch.full((1, 4), 0.5), returns, mask, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.475), atol=1e-12, rtol=0)
    torch.testing.assert_close(stats["value_clipfrac"], torch.tensor(1 / 3), atol=1e-12, rtol=0)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3, 0.0, -0.4 / 3, 0.0]]), atol=1e-9, rtol=0)


def test_kl_controllers():
    """target 6, horizon 10000. KL 12 -> error clipped to 0.2; n = horizon -> x1.2 exactly.
    KL 6.6 -> error 0.1, n = 5000 -> x1.05. KL 0 -> error -0.2 -> x0.8. KL 1e9 still x1.2."""
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 10000)
    assert ctl.beta == pytest.approx(0.12)
    ctl.update(6.6, 5000)
    assert ctl.beta == pytest.approx(0.12 * 1.05)
    ctl.update(0.0, 10000)
    assert ctl.beta == pytest.approx(0.12 * 1.05 * 0.8)
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    ctl.update(1e9, 10000)
    assert ctl.beta == pytest.approx(0.12)
    fixed = FixedKL(0.05)
    for kl in (0.0, 100.0):
        fixed.update(kl, 10000)
    assert fixed.beta == 0.05


def test_running_moments_match_concatenation_and_resume():
    torch.manual_seed(4)
    batches = [
        torch.randn(n) * s + o for n, s, o in [(5, 1.0, 3.0), (1, 1.0, -2.0), (17, 4.0, 0.5), (3, 0.1, 9.0)]
    ]
    moments = RunningMoments()
    assert moments.std == 1.0 and moments.mean == 0.0
    for batch in batches:
        batch_mean, batch_std = moments.update(batch)
        assert batch_mean == pytest.approx(float(batch.mean()))
        assert batch_std == pytest.approx(float(batch.std()) if len(batch) > 1 else 0.0)
    everything = torch.cat(batches)
    assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-12)
    assert moments.std == pytest.approx(float(everything.std()), abs=1e-12)
    resumed = RunningMoments()
    resumed.load_state_dict(json.loads(json.dumps(moments.state_dict())))
    extra = torch.randn(6)
    assert moments.update(extra) == resumed.update(extra)
    assert (moments.mean, moments.std, moments.count) == (resumed.mean, resumed.std, resumed.count)
    x = torch.tensor([moments.mean, moments.mean + moments.std, 1e6, -1e6])
    torch.testing.assert_close(
        moments.normalise(x, clip=5.0), torch.tensor([0.0, 1.0, 5.0, -5.0]), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_matches_log_softmax(dtype, temperature):
    torch.manual_seed(5)
    logits = (torch.randn(2, 5, 11) * 3).to(dtype).requires_grad_()
    before = logits.detach().clone()
    labels = torch.randint(0, 11, (2, 5))
    got = logprobs_from_logits(logits, labels, temperature)
    expected = (
        torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    )
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(logits.detach(), before)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, -1e4, 1.0, -3.0]])
    expected = torch.distributions.Categorical(logits=logits).entropy()
    got = entropy_from_logits(logits)
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0)
    assert got[0].item() == pytest.approx(math.log(4))


def test_explained_variance():
    torch.manual_seed(6)
    returns = torch.randn(3, 10)
    mask = torch.rand(3, 10) > 0.3
    garbage = returns.masked_fill(~mask, 1e6)
    assert explained_variance(returns, garbage, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, float(masked_mean(returns, mask)))
    assert explained_variance(constant, garbage, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(returns, torch.ones(3, 10), mask).item() == 0.0


def test_group_advantages_hand_worked():
    """Groups {1, 3}, {2, 2} (all equal) and {0, 3, 6}.

    mean baseline:      {1, 3} -> {-1, 1}; {2, 2} -> {0, 0}; {0, 3, 6} -> {-3, 0, 3}
    scaled by the std:  std{1, 3} = sqrt((1 + 1) / 1) = sqrt 2 -> {-1/sqrt 2, 1/sqrt 2}; std{2, 2} = 0 -> {0, 0}
                        (0 / eps, not NaN); std{0, 3, 6} = sqrt((9 + 0 + 9) / 2) = 3 -> {-1, 0, 1}
    leave-one-out:      1 - 3 = -2, 3 - 1 = 2; 0, 0; 0 - 4.5 = -4.5, 3 - 3 = 0, 6 - 1.5 = 4.5
    """
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 3.0, 6.0])
    groups = torch.tensor([7, 7, 2, 2, 5, 5, 5])  # any ids; rows of a group need not be adjacent
    torch.testing.assert_close(group_advantages(scores, groups), torch.tensor([-1.0, 1, 0, 0, -3, 0, 3]))
    scaled = group_advantages(scores, groups, scale_by_std=True)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(scaled, torch.tensor([-r, r, 0, 0, -1, 0, 1]), atol=1e-5, rtol=0)
    assert not torch.isnan(scaled).any()
    torch.testing.assert_close(group_advantages(scores, groups, baseline="leave_one_out"),
                               torch.tensor([-2.0, 2, 0, 0, -4.5, 0, 4.5]))
    shuffled = torch.tensor([6, 0, 3, 4, 1, 5, 2])
    torch.testing.assert_close(group_advantages(scores[shuffled], groups[shuffled]),
                               group_advantages(scores, groups)[shuffled])
    with pytest.raises(ValueError, match="at least 2 rows"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), baseline="leave_one_out")
    with pytest.raises(ValueError, match="unknown group baseline"):
        group_advantages(scores, groups, baseline="median")


def test_returns_to_go_skip_absent_turns():
    """[1, 2, 4] with gamma 0.5: 4; 2 + 0.5 * 4 = 4; 1 + 0.5 * 4 = 3. A row that ended after 2 turns: [1, 2, nan]
    -> [1 + 0.5 * 2, 2, nan]."""
    nan = float("nan")
    out = returns_to_go(torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, nan]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0, 4.0], [2.0, 2.0, nan]]), equal_nan=True)


def test_whitening_and_explained_variance_across_processes_equal_one_process():
    """Two halves, each reduced with an all-reduce that adds the other half's statistics, equal the whole
    batch on one process."""
    torch.manual_seed(0)
    x, v = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.3
    halves = [(x[:2], v[:2], mask[:2]), (x[2:], v[2:], mask[2:])]

    def local_statistics(hx, hv, hm) -> list[torch.Tensor]:
        """What each all-reduce call of one half sends, in call order (whiten, then explained variance)."""
        sent: list[torch.Tensor] = []

        def record(t: torch.Tensor) -> torch.Tensor:
            sent.append(t)
            return t
        masked_whiten(hx, hm, all_reduce=record)
        explained_variance(hv, hx, hm, all_reduce=record)
        return sent

    for i, (hx, hv, hm) in enumerate(halves):
        other = iter(local_statistics(*halves[1 - i]))
        all_reduce = lambda t, other=other: t + next(other)  # noqa: E731
        whitened = masked_whiten(hx, hm, all_reduce=all_reduce)
        rows = slice(0, 2) if i == 0 else slice(2, 4)
        torch.testing.assert_close(whitened, masked_whiten(x, mask)[rows], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(explained_variance(hv, hx, hm, all_reduce=all_reduce),
                                   explained_variance(v, x, mask), atol=1e-6, rtol=1e-6)
