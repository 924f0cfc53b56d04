"""Per-document attention for packed SFT rows on any device, without a quadratic mask.

A packed row holds several conversations one after another; position ids restart
at 0 where a conversation starts. transformers keeps the conversations apart in
two ways: flash-attention kernels read the boundaries from the position ids (GPU
only), and SDPA/eager get a block-diagonal mask as wide as the whole packed row.
That mask makes attention cost grow with the square of the packed length, so a
4,000-token packed row costs more than the padded batch it replaces.

`dialogrl_packed` is registered with transformers' attention and mask interfaces:
for a batch with no padding it builds no mask and runs SDPA causally on each
conversation's own slice, so cost grows with the sum of the squared conversation
lengths, as with a varlen kernel. Padded batches, and decoding with a cache, go to
transformers' own SDPA path unchanged.
"""

from __future__ import annotations

from typing import Any

PACKED_ATTENTION = "dialogrl_packed"
_FLASH_PREFIX = "flash_attention"


def _no_mask_needed(q_length: int, kv_length: int, kv_offset: int, attention_mask) -> bool:
    return q_length == kv_length and kv_offset == 0 and (attention_mask is None or bool(attention_mask.all()))


def _packed_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 attention_mask=None, **kwargs: Any):
    from transformers.masking_utils import sdpa_mask

    if _no_mask_needed(q_length, kv_length, kv_offset, attention_mask):
        return None  # the attention below reads document boundaries from the position ids
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def document_spans(position_ids) -> list[list[tuple[int, int]]]:
    """Per batch row, the [start, end) token span of every document (position ids restart at each)."""
    import torch
    from transformers.masking_utils import find_packed_sequence_indices

    rows, length = position_ids.shape
    indices = find_packed_sequence_indices(position_ids)
    if indices is None:
        return [[(0, length)] for _ in range(rows)]
    spans = []
    for row in indices:
        _, counts = torch.unique_consecutive(row, return_counts=True)
        ends = counts.cumsum(0).tolist()
        spans.append(list(zip([0, *ends[:-1]], ends, strict=True)))
    return spans


def _spans_from_collator(kwargs: dict, rows: int, length: int) -> list[list[tuple[int, int]]] | None:
    # TRL's padding-free collator hands over the boundaries it computed on the CPU (`cu_seq_lens_q`), which
    # spares reading them back from the position ids in every layer.
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or rows != 1 or int(bounds[-1]) != length:
        return None
    bounds = bounds.tolist()
    return [[(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]]


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_length, kv_length = query.shape[2], key.shape[2]
    if attention_mask is not None or position_ids is None or q_length != kv_length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    spans = _spans_from_collator(kwargs, query.shape[0], q_length) or document_spans(
        position_ids.expand(query.shape[0], -1))
    if all(row == [(0, q_length)] for row in spans):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    rows = []
    for b, row_spans in enumerate(spans):
        pieces = [
            sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], None,
                                   dropout=dropout, scaling=scaling, is_causal=True)[0]
            for s, e in row_spans
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def register() -> str:
    """Make `dialogrl_packed` a valid `attn_implementation` (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    return PACKED_ATTENTION


def use_for_packing(model) -> str:
    """Switch a model to per-document attention for packed training; flash-attention kernels are kept.

    Returns the implementation in use.
    """
    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if current.startswith(_FLASH_PREFIX):
        return current  # its varlen kernel already reads the boundaries from the position ids
    model.set_attn_implementation(register())
    return PACKED_ATTENTION
