"""Tensor maths of PPO on multi-turn dialogue: rewards, KL, turn-aware GAE, losses, controllers.

Everything works on padded batches of shape [B, L] whose positions are aligned to actions: the
log-prob, value and reward at position t all refer to emitting token t. Only tokens the policy
generated (assistant turns, end-of-turn token included) have `action_mask` 1; `turn_ids` gives the
0-based assistant turn of each generated token and -1 elsewhere. No models and no process groups
live here, so the trainer can all-reduce the detached statistics however it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKL",
    "FixedKL",
    "RunningMoments",
    "entropy_from_logits",
    "explained_variance",
    "group_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "place_turn_rewards",
    "policy_loss",
    "returns_to_go",
    "turn_aware_gae",
    "value_loss",
]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is set; 0 where nothing is selected.

    `torch.where` rather than a product, so NaN or inf in padding cannot leak into the result.
    """
    mask = mask.bool()
    total = torch.where(mask, x, 0).sum() if dim is None else torch.where(mask, x, 0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all masked positions; Bessel's correction only when two or more exist."""
    mask = mask.bool()
    centred = torch.where(mask, x - masked_mean(x, mask), 0)
    count = mask.sum()
    denom = (count - 1).clamp(min=1) if unbiased else count.clamp(min=1)
    return centred.square().sum() / denom


AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over every process (identity on one process)


def _moments(x: Tensor, mask: Tensor, all_reduce: AllReduce | None) -> tuple[Tensor, Tensor]:
    """(mean, unbiased variance) of `x` over masked positions, over every process when `all_reduce` is given.

    Across processes only sums can be reduced, so the variance comes from the sum of squares there
    (in float64); on one process it is the centred two-pass formula of `masked_var`.
    """
    if all_reduce is None:
        return masked_mean(x, mask), masked_var(x, mask)
    mask = mask.bool()
    picked = x[mask].double()
    total, squares, count = all_reduce(torch.stack([picked.sum(), picked.square().sum(),
                                                    torch.tensor(float(picked.numel()), dtype=torch.float64,
                                                                 device=x.device)])).unbind()
    mean = total / count.clamp(min=1)
    var = (squares / count.clamp(min=1) - mean.square()).clamp(min=0) * count / (count - 1).clamp(min=1)
    return mean.to(x.dtype), var.to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce: AllReduce | None = None) -> Tensor:
    """Whiten over every masked token of the batch at once (of every process with `all_reduce`), then zero
    the masked-out positions.

    Per-row or per-turn statistics would bias the advantages of short rows and late turns, which
    see few tokens; the batch-wide statistics keep one scale for the whole rollout.
    """
    mask = mask.bool()
    mean, var = _moments(x, mask, all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


def group_advantages(scores: Tensor, group_ids: Tensor, *, baseline: str = "mean", scale_by_std: bool = False,
                     eps: float = 1e-6) -> Tensor:
    """Critic-free advantages [N]: each score minus the mean score of its group (rows with the same id).

    `baseline="mean"` is GRPO's (the group mean, the row itself included); `"leave_one_out"` is
    RLOO's (the mean of the *other* rows: an unbiased baseline, G/(G-1) times the plain one).
    `scale_by_std` divides by the group's standard deviation (GRPO; Dr. GRPO argues it biases
    towards groups whose rewards barely differ). A group whose scores are all equal gets advantage
    0, never NaN: its std is 0 and the centred scores are 0 too, and eps keeps the division finite.
    """
    if scores.shape != group_ids.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must be the same 1-D shape")
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"unknown group baseline {baseline!r}; choose 'mean' or 'leave_one_out'")
    _, slot = torch.unique(group_ids, return_inverse=True)
    groups = int(slot.max()) + 1 if slot.numel() else 0
    x = scores.double()
    size = torch.zeros(groups, dtype=torch.float64, device=x.device).index_add_(0, slot, torch.ones_like(x))
    total = torch.zeros(groups, dtype=torch.float64, device=x.device).index_add_(0, slot, x)
    mean = total / size
    if baseline == "leave_one_out":
        if bool((size < 2).any()):
            raise ValueError("a leave-one-out baseline needs at least 2 rows in every group")
        advantages = x - (total[slot] - x) / (size[slot] - 1)
    else:
        advantages = x - mean[slot]
    if scale_by_std:
        squares = torch.zeros(groups, dtype=torch.float64, device=x.device).index_add_(0, slot, (x - mean[slot]) ** 2)
        std = torch.sqrt(squares / (size - 1).clamp(min=1))  # unbiased, as torch.std and TRL's GRPO
        advantages = advantages / (std[slot] + eps)
    return advantages.to(scores.dtype)


def returns_to_go(turn_scores: Tensor, gamma: float) -> Tensor:
    """[B, K] -> [B, K]: at each turn, its score plus the discounted scores of the turns after it.

    Absent turns (NaN) add nothing and stay NaN, so a row's turns may end early.
    """
    present = ~torch.isnan(turn_scores)
    scores = torch.nan_to_num(turn_scores)
    out = torch.zeros_like(scores)
    running = torch.zeros_like(scores[:, 0])
    for k in range(scores.shape[1] - 1, -1, -1):
        running = scores[:, k] + gamma * running
        out[:, k] = running
    return torch.where(present, out, float("nan"))


def place_turn_rewards(turn_scores: Tensor, turn_ids: Tensor) -> Tensor:
    """Rewards [B, L]: turn k's score on the last position whose `turn_ids` is k, zero elsewhere.

    That position is the turn's end-of-turn token, the action that completed the reply. Scores of
    turns a row does not have (no token with that id) are dropped, so the caller may pad
    `turn_scores` [B, K] with anything, NaN included. A generated token whose turn has no score
    column is a caller bug and raises ValueError.
    """
    batch, length = turn_ids.shape
    num_turns = turn_scores.shape[1]
    if turn_ids.numel() and int(turn_ids.max()) >= num_turns:
        raise ValueError(
            f"turn_ids reach turn {int(turn_ids.max())} but turn_scores has only {num_turns} columns"
        )
    # Non-generated positions go to a spare column K that is dropped afterwards.
    slot = torch.where(turn_ids >= 0, turn_ids, num_turns).long()  # [B, L]
    positions = torch.arange(length, device=turn_ids.device).expand(batch, length)  # [B, L]
    last = torch.full((batch, num_turns + 1), -1, dtype=torch.long, device=turn_ids.device)
    last = last.scatter_reduce(1, slot, positions, reduce="amax")[:, :num_turns]  # [B, K]
    exists = last >= 0
    rewards = torch.zeros(batch, length, dtype=turn_scores.dtype, device=turn_scores.device)  # [B, L]
    # Missing turns add 0 to position 0; adding rather than writing keeps a real score there intact.
    return rewards.scatter_add(1, last.clamp(min=0), torch.where(exists, turn_scores, 0))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, action_mask: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate [B, L] of KL(policy || reference) on sampled tokens, 0 where masked.

    k1 = log p - log p_ref is unbiased and is what goes into the reward (it can be negative per
    token). k3 = (r - 1) - log r with r = p_ref / p is also unbiased, never negative and lower
    variance, which suits a KL loss term.
    """
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        kl = diff
    elif estimator == "k3":
        log_r = (-diff).clamp(-20, 20)  # clamped so one wild token cannot overflow exp
        kl = torch.expm1(log_r) - log_r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1' or 'k3'")
    return torch.where(action_mask.bool(), kl, 0)


def turn_aware_gae(
    rewards: Tensor,
    values: Tensor,
    action_mask: Tensor,
    turn_ids: Tensor,
    *,
    gamma_turn: float,
    lam: float,
    bootstrap_values: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """GAE over generated tokens only, with the discount applied once per turn boundary.

    User, system, template and pad tokens are not decisions of the policy, so the recursion skips
    them: the next value and running advantage pass through untouched (decaying on them would make
    credit depend on how long the user talked). Between two tokens of one turn the discount is 1;
    from the last token of turn k to the first of turn k+1 it is `gamma_turn`; lambda applies at
    every step. After a row's last generated token the next state is `bootstrap_values[b]` (0 when
    None), discounted by `gamma_turn`: pass V of the cut state when the dialogue was truncated and
    0 when it really ended. Returns (advantages, returns), both [B, L], 0 where masked, unwhitened.
    """
    mask = action_mask.bool()
    if bool((turn_ids[mask] < 0).any()):
        raise ValueError("turn_ids must be >= 0 on every position where action_mask is set")
    # Advantages are regression targets and weights, never differentiated through.
    rewards, values = rewards.detach(), values.detach()
    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)  # [B]
    if bootstrap_values is not None:
        next_value = next_value + torch.as_tensor(bootstrap_values, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)  # [B]
    # -1 means no generated token follows yet, which never matches a real turn id: the first
    # step back from the bootstrap state is therefore a turn boundary.
    next_turn = torch.full((batch,), -1, dtype=turn_ids.dtype, device=turn_ids.device)  # [B]
    advantages = torch.zeros_like(values)  # [B, L]
    for t in range(length - 1, -1, -1):
        live = mask[:, t]
        discount = torch.where(turn_ids[:, t] == next_turn, 1.0, gamma_turn).to(values.dtype)
        delta = rewards[:, t] + discount * next_value - values[:, t]
        adv = delta + discount * lam * next_adv
        advantages[:, t] = torch.where(live, adv, 0)
        next_value = torch.where(live, values[:, t], next_value)
        next_adv = torch.where(live, adv, next_adv)
        next_turn = torch.where(live, turn_ids[:, t], next_turn)
    returns = torch.where(mask, advantages + values, 0)
    return advantages, returns


def _token_sum_mean(per_token: Tensor, mask: Tensor, num_tokens: int | float | Tensor | None) -> Tensor:
    """Sum over masked tokens divided by the global token count, so chunk losses add up exactly."""
    count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=per_token.device)
    return torch.where(mask, per_token, 0).sum() / count.clamp(min=1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    *,
    clip_eps: float = 0.2,
    num_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate (to minimise), summed over generated tokens / `num_tokens`.

    `num_tokens` is the generated-token count of the whole batch across processes and accumulation
    steps; summing the returned losses of all chunks then gives the full-batch token mean. Stats are
    detached 0-d tensors: `policy_loss` is this chunk's contribution, the others are means over
    this chunk's tokens.
    """
    mask = action_mask.bool()
    logratio = (logprobs - old_logprobs).clamp(-20, 20)
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = _token_sum_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "ratio": masked_mean(ratio, mask),
            "clipfrac": masked_mean((unclipped < clipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(ratio - 1 - logratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    *,
    clip_range: float = 0.2,
    num_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), aggregated like `policy_loss`."""
    mask = action_mask.bool()
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss_plain = (values - returns).square()
    loss_clipped = (v_clipped - returns).square()
    loss = _token_sum_mean(0.5 * torch.maximum(loss_plain, loss_clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "value_loss": loss.detach(),
            "value_clipfrac": masked_mean((loss_clipped > loss_plain).to(loss_plain.dtype), mask),
        }
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, all_reduce: AllReduce | None = None) -> Tensor:
    """1 - Var(R - V) / Var(R) over masked tokens (of every process with `all_reduce`); 0 when the returns
    do not vary.

    With constant returns the ratio is undefined; 0 ("explains nothing") keeps NaN out of the logs.
    """
    values, returns = values.detach().float(), returns.detach().float()
    _, var_returns = _moments(returns, mask, all_reduce)
    if float(var_returns) <= 1e-12:
        return torch.zeros((), device=returns.device)
    return 1 - _moments(returns - values, mask, all_reduce)[1] / var_returns


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, shape logits.shape[:-1], in float32.

    Computed as logsumexp(z) - sum(p * z): where a probability underflows to 0 this adds 0 * z,
    finite, whereas sum(p * log p) would meet 0 * log 0 = NaN.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) gathered at `labels` (valid token ids), float32, labels' shape.

    Computed as gather - logsumexp: no full log-softmax is materialised, and logsumexp runs one
    leading-dim slice at a time so its internal [.., V] buffer is that of one row, not of the batch.
    bf16/fp16 logits cost one float32 copy, which the temperature then divides in place.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float()
    if temperature != 1.0:
        # In place only on the copy .float() made; never on the caller's tensor.
        scaled = scaled / temperature if scaled is logits else scaled.div_(temperature)
    picked = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    log_norm = torch.stack([torch.logsumexp(row, dim=-1) for row in scaled])
    return picked - log_norm


class FixedKL:
    """Constant KL coefficient; `update` exists so the trainer can treat both controllers alike."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL:
    """Proportional controller steering the measured KL towards `target` (Ziegler et al. 2019).

    The error is clipped to +-20% so one noisy batch cannot swing beta; `n_steps / horizon` sets
    how fast it moves (n_steps is the number of episodes in the batch that measured `current_kl`).
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean/std of scalar scores, merged batch by batch (Chan et al.), in float64.

    Process-agnostic: to share moments across processes, gather the scores first and call
    `update` with the same tensor everywhere. Before two scores are seen, std is 1.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, x: Tensor) -> tuple[float, float]:
        """Fold in a batch of scores; returns that batch's mean and (unbiased) std."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_mean = float(x.mean())
        batch_m2 = float((x - batch_mean).square().sum())
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total
        return batch_mean, math.sqrt(batch_m2 / (n - 1)) if n > 1 else 0.0

    def normalise(self, x: Tensor, clip: float = 5.0) -> Tensor:
        return ((x - self._mean) / (self.std + 1e-8)).clamp(-clip, clip)

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.count = int(state["count"])
        self._mean = float(state["mean"])
        self._m2 = float(state["m2"])
