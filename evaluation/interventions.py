"""Split-softmax: an inference-time boost of attention on the system prompt.

Li et al. 2024 ("Measuring and Controlling Instruction (In)Stability in Language
Model Dialogs") found that attention on the system prompt decays as a dialogue
grows, and that the model drifts from the prompt's rules with it. Split-softmax
counters this without training: after the softmax of every head, for each query
row with pi = total attention on the system-prompt keys,

    system keys  *= pi^k / pi          (k in (0, 1]; k = 1 changes nothing)
    other keys   *= (1 - pi^k) / (1 - pi)

so the row still sums to 1 and the system prompt's share rises from pi to pi^k.

The cap. Late in a dialogue pi is ~0.001, where pi^k / pi is ~32 for k = 0.5 and
~1000 for k = 0.1: a few system tokens would take over every head. So the system
scale is clamped to `max_boost`, i.e. the new system mass is
`min(pi^k, max_boost * pi)`, and the other keys are renormalised to share what is
left, `(1 - new_mass) / (1 - pi)`. Rows still sum to 1, and the cap only ever
lowers the system mass (pi < new_mass <= pi^k), so it never overshoots the paper's
formula.

How it plugs into transformers 5. `register_split_softmax` registers an attention
function under the name "split_softmax" in `AttentionInterface` (which modeling
files look up from `config._attn_implementation`) and registers transformers' own
`eager_mask` for the same name in `AttentionMaskInterface`; without the latter,
mask creation does not know the name and hands the attention function no mask at
all (no causal mask, no padding mask). The function itself is Llama's
`eager_attention_forward` with the split inserted between softmax and dropout, so
with k = 1 it reproduces "eager" bit for bit.

How the mask reaches the function. The `split_softmax` context manager switches the
model to that implementation and files one state object (the system mask and the
config) in a module-level registry under every submodule of the model; the
attention function receives its attention layer as `module` and looks itself up
there. Keeping the state outside the modules leaves `state_dict` and the modules'
attributes untouched, works for any number of models at once (each only sees its
own mask), and is gone when the context exits.

Supported: decoder-only models whose modeling file dispatches attention through
`ALL_ATTENTION_FUNCTIONS.get_interface` with Llama's eager semantics (Llama,
SmolLM2, Qwen2/Qwen3 with full attention; Mistral only with `config.sliding_window
= None`), in prefill and in cached decoding, with left or right padding, in float32
or half precision (the split runs in float32). Not supported: sliding-window layers
(their key positions stop matching input positions; caught with an error),
attention sinks (gpt-oss; caught with an error), and `torch.compile`d models (the
registry lookup is Python-side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dialogrl.data.options import option

SPLIT_SOFTMAX = "split_softmax"

# id(submodule) -> the state of the `split_softmax` context that owns that submodule's model.
# Filled on enter and emptied on exit, so a model outside any context has no entry.
_ACTIVE: dict[int, _SplitSoftmaxState] = {}


@dataclass
class SplitSoftmaxConfig:
    """Strength of the split-softmax intervention (Li et al. 2024)."""

    k: float = option(
        0.5,
        help="Exponent in (0, 1]: the system prompt's attention share pi becomes pi^k. "
        "1 changes nothing; smaller values boost the system prompt more.",
    )
    max_boost: float = option(
        10.0,
        help="Cap (>= 1) on the factor pi^k / pi applied to system-prompt keys; without it a tiny pi late "
        "in a dialogue would be multiplied by hundreds. 1 disables the boost.",
    )
    exclude_first_token: bool = option(
        True,
        help="Leave the first real token (the attention sink, which takes a large share of attention "
        "regardless of content) out of the system span, so pi measures attention on the prompt itself.",
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.k, (int, float)) and 0 < self.k <= 1):
            raise ValueError(
                f"SplitSoftmaxConfig.k must be in (0, 1] (1 = no change, smaller = stronger boost), got {self.k!r}"
            )
        if not (
            isinstance(self.max_boost, (int, float)) and math.isfinite(self.max_boost) and self.max_boost >= 1
        ):
            raise ValueError(
                "SplitSoftmaxConfig.max_boost must be a finite number >= 1 (1 disables the boost; 10-20 is "
                f"typical), got {self.max_boost!r}"
            )


def apply_split_softmax(
    weights: torch.Tensor, system_keys: torch.Tensor, k: float, max_boost: float
) -> torch.Tensor:
    """Rescale attention rows so the system keys' share goes from pi to min(pi^k, max_boost * pi).

    `weights`: [..., T_k] softmax output (rows sum to 1). `system_keys`: bool, broadcastable
    to `weights`, True on system-prompt key positions. Returns a tensor shaped like `weights`.

    Rows with pi == 0 (query before the span, or empty span) or pi >= 1 (the query sees only
    system keys) are returned unchanged: the formula is 0/0 there, and there is nothing to move.
    """
    system = system_keys.to(weights.dtype)
    pi = (weights * system).sum(dim=-1, keepdim=True)  # [..., 1]
    active = (pi > 0) & (pi < 1)
    safe_pi = torch.where(active, pi, torch.full_like(pi, 0.5))
    # pi^k / pi, written as pi^(k-1) so that k = 1 gives exactly 1, then capped.
    system_scale = torch.clamp(safe_pi.pow(k - 1.0), max=max_boost)
    new_mass = system_scale * safe_pi
    other_scale = torch.clamp(1.0 - new_mass, min=0.0) / (1.0 - safe_pi)
    one = torch.ones_like(pi)
    system_scale = torch.where(active, system_scale, one)
    other_scale = torch.where(active, other_scale, one)
    scale = other_scale + (system_scale - other_scale) * system  # [..., T_k]
    return weights * scale


def _first_allowed_key(attention_mask: torch.Tensor | None, batch: int, key_len: int) -> torch.Tensor:
    """Index of the first real (not padding) key of each row: [B] long.

    Read off the last query row of the 4D eager mask, which under a causal mask may attend
    every real key seen so far (in prefill and in decoding alike). No mask means no padding.
    """
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long)
    last_row = attention_mask[:, 0, -1, :key_len]  # [B or 1, T_k]
    allowed = last_row if last_row.dtype == torch.bool else last_row > torch.finfo(last_row.dtype).min / 2
    # argmax returns the first maximum, i.e. the first allowed key (0 if a row allows none).
    return allowed.to(torch.int8).argmax(dim=-1).expand(batch)


@dataclass
class _SplitSoftmaxState:
    """What the attention function needs: the prefill system mask and the config."""

    system_mask: torch.Tensor  # [B, T0] bool over the prefill input positions
    config: SplitSoftmaxConfig

    def system_keys(
        self, attention_mask: torch.Tensor | None, batch: int, key_len: int, device
    ) -> torch.Tensor:
        """[B, T_k] bool: True on system-prompt keys for this attention call.

        Key position j is input position j (the KV cache appends in order), so the
        prefill mask is padded with False for keys added later.
        """
        mask = self.system_mask.to(device)
        mask_batch, mask_len = mask.shape
        if mask_batch not in (1, batch):
            raise ValueError(
                f"split_softmax: system_mask has batch size {mask_batch} but the model was called with batch "
                f"size {batch}; build the mask for the batch you run (generate's num_return_sequences and "
                "num_beams expand the batch, so repeat the mask rows the same way)."
            )
        if mask_len > key_len:
            raise ValueError(
                f"split_softmax: system_mask covers {mask_len} input positions but this attention layer sees only "
                f"{key_len} keys. Build the mask from the input_ids you pass at prefill; sliding-window attention "
                "layers are not supported."
            )
        keys = torch.zeros(batch, key_len, dtype=torch.bool, device=device)
        keys[:, :mask_len] = mask
        if self.config.exclude_first_token:
            first = _first_allowed_key(attention_mask, batch, key_len).to(device)
            keys[torch.arange(batch, device=device), first] = False
        return keys


def split_softmax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's eager attention with split-softmax between the softmax and dropout.

    query: [B, H, T_q, D]; key, value: [B, H_kv, T_k, D]; attention_mask: [B, 1, T_q, T_k]
    additive float mask (0 = attend, dtype min = masked). Returns the output [B, T_q, H, D]
    and the rescaled weights [B, H, T_q, T_k], as eager does.
    """
    state = _ACTIVE.get(id(module))
    if state is None:
        raise RuntimeError(
            f"The '{SPLIT_SOFTMAX}' attention implementation was called outside a split_softmax context, so it "
            "has no system mask. Wrap the forward/generate call in `with split_softmax(model, system_mask, config):` "
            "instead of setting attn_implementation by hand."
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError(
            "split_softmax does not support attention sinks (s_aux); use a model without them."
        )
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            "split_softmax does not support sliding-window attention layers: their cached key positions stop "
            "matching input positions. Use a model with full attention in every layer (for Mistral, set "
            "config.sliding_window = None if your dialogues fit in the window)."
        )

    batch, _, _, _ = query.shape
    n_rep = query.shape[1] // key.shape[1]
    key_states = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key  # [B, H, T_k, D]
    value_states = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value  # [B, H, T_k, D]
    key_len = key_states.shape[-2]

    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # [B, H, T_q, T_k]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask

    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    system_keys = state.system_keys(attention_mask, batch, key_len, weights.device)  # [B, T_k]
    weights = apply_split_softmax(
        weights, system_keys[:, None, None, :], state.config.k, state.config.max_boost
    )
    weights = weights.to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value_states).transpose(1, 2).contiguous()  # [B, T_q, H, D]
    return output, weights


def register_split_softmax() -> str:
    """Register the attention function and its (eager, additive float) mask; safe to call repeatedly.

    Returns the implementation name to pass to `set_attn_implementation`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SPLIT_SOFTMAX, split_softmax_attention_forward)
    AttentionMaskInterface.register(SPLIT_SOFTMAX, eager_mask)
    return SPLIT_SOFTMAX


def _all_configs(model: nn.Module) -> list[Any]:
    """Every config whose `_attn_implementation` `set_attn_implementation` may change, deduplicated."""
    from transformers import PreTrainedModel

    found: dict[int, Any] = {}
    pending = [sub.config for sub in model.modules() if isinstance(sub, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return list(found.values())


class split_softmax:  # noqa: N801 - used like a function: `with split_softmax(model, mask, config):`
    """Run a model with split-softmax attention inside a `with` block.

    `system_mask`: [B, T0] bool over the input positions of the batch at prefill, True on
    system-prompt tokens (see `system_span_mask`). Positions beyond T0, i.e. tokens
    generated or appended later through the KV cache, are never system. A batch-1 mask
    is broadcast over the batch.

    On enter the model (and its sub-models) switch to the "split_softmax" attention
    implementation; on exit, even after an exception, every config's previous
    implementation is put back exactly as it was. Entering returns the model.
    """

    def __init__(self, model: nn.Module, system_mask: torch.Tensor, config: SplitSoftmaxConfig) -> None:
        if not isinstance(config, SplitSoftmaxConfig):
            raise TypeError(f"config must be a SplitSoftmaxConfig, got {type(config).__name__}")
        if not isinstance(system_mask, torch.Tensor) or system_mask.dim() != 2:
            raise ValueError(
                "system_mask must be a 2D [batch, input_length] tensor over the prefill input positions; got "
                f"{getattr(system_mask, 'shape', type(system_mask))}. Build it with system_span_mask()."
            )
        if system_mask.dtype != torch.bool:
            # An int mask is most likely the tokenizer's attention_mask passed by mistake, which would
            # mark the whole dialogue as system prompt; refuse rather than cast.
            raise ValueError(
                f"system_mask must be bool (True on system-prompt tokens), got dtype {system_mask.dtype}. "
                "Build it with system_span_mask(input_ids, attention_mask, system_lengths)."
            )
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"split_softmax needs a transformers PreTrainedModel, got {type(model).__name__}")
        self.model = model
        self.state = _SplitSoftmaxState(system_mask=system_mask.detach(), config=config)
        self._saved: list[tuple[Any, Any]] | None = None
        self._module_ids: list[int] = []

    def __enter__(self) -> nn.Module:
        if self._saved is not None:
            raise RuntimeError(
                "this split_softmax context is already active; create a new one to nest or reuse"
            )
        name = register_split_softmax()
        module_ids = [id(sub) for sub in self.model.modules()]
        if any(i in _ACTIVE for i in module_ids):
            raise RuntimeError(
                "this model is already inside a split_softmax context; exit it before entering another one"
            )
        saved = [
            (config, getattr(config, "_attn_implementation_internal", None))
            for config in _all_configs(self.model)
        ]
        try:
            self.model.set_attn_implementation(name)
            if self.model.config._attn_implementation != name:
                raise RuntimeError(
                    f"{type(self.model).__name__} cannot switch its attention implementation at run time (its "
                    "attention layers do not dispatch through transformers' AttentionInterface), so split-softmax "
                    "cannot be applied. Use a model family whose modeling file calls "
                    "ALL_ATTENTION_FUNCTIONS.get_interface, e.g. Llama or Qwen2."
                )
        except BaseException:
            self._restore(saved)
            raise
        for i in module_ids:
            _ACTIVE[i] = self.state
        self._saved, self._module_ids = saved, module_ids
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        saved, module_ids = self._saved, self._module_ids
        self._saved, self._module_ids = None, []
        for i in module_ids:
            _ACTIVE.pop(i, None)
        if saved is not None:
            self._restore(saved)

    @staticmethod
    def _restore(saved: list[tuple[Any, Any]]) -> None:
        # Written on the internal attribute, as set_attn_implementation does, so that no check or
        # fallback (e.g. sdpa -> eager) can alter what was there before.
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def system_span_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, system_lengths: list[int]
) -> torch.Tensor:
    """[B, T] bool, True on the first `system_lengths[b]` real tokens of row b.

    Counts real tokens (attention_mask == 1) from the left, so it is right for left-padded
    batches (the usual case for generation) and for right-padded ones too.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [batch, length], got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    batch = input_ids.shape[0]
    if len(system_lengths) != batch:
        raise ValueError(
            f"system_lengths needs one length per row: {batch} rows, {len(system_lengths)} lengths"
        )
    real = attention_mask.bool()  # [B, T]
    real_counts = real.sum(dim=-1).tolist()
    for row, (length, available) in enumerate(zip(system_lengths, real_counts, strict=True)):
        if not 0 <= length <= available:
            raise ValueError(
                f"system_lengths[{row}] = {length} but row {row} has {available} real tokens; the system prompt "
                "must be a prefix of the row's real tokens (count it with the same tokenizer and chat template)."
            )
    rank = real.long().cumsum(dim=-1)  # [B, T]: 1-based index among real tokens
    lengths = torch.tensor(system_lengths, dtype=torch.long, device=input_ids.device)[:, None]  # [B, 1]
    return real & (rank <= lengths)
