"""A key/value cache that appends decoded tokens in place.

transformers' `DynamicLayer.update` concatenates the new token onto the cached
keys and values, so every decoding step copies the whole cache of every layer.
With a batch of dialogues several rounds long that copy is a large share of a
CPU decoding step. Here each layer keeps its keys and values in buffers with
spare room at the end; `keys`/`values` are views of the filled part and a step
writes only its new positions.

The rollout engine also replaces `keys`/`values` between chunks (dropping rows
that finished, compacting padding, merging rows back). A layer notices that its
tensors are no longer views of its buffers and copies them into fresh buffers at
the next update, so any code written for `DynamicLayer` stays correct.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class AppendInPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into spare capacity instead of concatenating."""

    min_spare = 128  # positions of room added when a buffer is (re)allocated: several chunks of decoding

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        needed = length + key_states.shape[-2]
        if not self._owns_current_tensors() or self._key_buffer.shape[-2] < needed:
            self._reallocate(length, key_states.shape[0], key_states, needed + max(self.min_spare, needed // 2))
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def reserve(self, batch: int, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start the layer as `batch` rows of `length` zeroed positions, with room to grow.

        `like` [*, H, *, D] gives the heads, head size, dtype and device. Returns the
        writable keys and values, for a caller that fills the cache itself.
        """
        self.lazy_initialization(like, like)
        self._reallocate(0, batch, like, length + max(self.min_spare, length // 2))
        self.keys = self._key_buffer[..., :length, :].zero_()
        self.values = self._value_buffer[..., :length, :].zero_()
        return self.keys, self.values

    def _owns_current_tensors(self) -> bool:
        buffers = getattr(self, "_key_buffer", None), getattr(self, "_value_buffer", None)
        return all(
            buffer is not None and tensor.dim() == 4 and tensor.data_ptr() == buffer.data_ptr()
            and tensor.shape[:2] == buffer.shape[:2] and tensor.stride() == buffer.stride()
            for tensor, buffer in zip((self.keys, self.values), buffers, strict=True)
        )

    def _reallocate(self, length: int, batch: int, like: torch.Tensor, capacity: int) -> None:
        heads, dim = like.shape[1], like.shape[3]
        key_buffer = like.new_empty((batch, heads, capacity, dim))
        value_buffer = like.new_empty((batch, heads, capacity, dim))
        if length:
            key_buffer[..., :length, :] = self.keys
            value_buffer[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer


class AppendInPlaceCache(DynamicCache):
    """A `DynamicCache` made of `AppendInPlaceLayer`s, created lazily as the model's layers report in."""

    def __init__(self) -> None:
        # DynamicCache's own constructor builds plain DynamicLayers; the base class replicates ours instead.
        Cache.__init__(self, layer_class_to_replicate=AppendInPlaceLayer)
