"""A key/value cache that appends decoded tokens in place.

transformers' `DynamicLayer.update` concatenates the new token onto the cached
keys and values, so every decoding step copies the whole cache of every layer.
With a batch of dialogues several rounds long that copy is a large share of a
CPU decoding step. Here each layer keeps its keys and values in buffers with
spare room at the end; `keys`/`values` are views of the filled part and a step
writes only its new positions.

The rollout engine also replaces `keys`/`values` between chunks (compacting
padding, merging rows back). A layer notices when its tensors are no longer
views of its buffers: it lets the buffers go at once (so the old and the new
contents are not both held) and copies the new tensors into fresh buffers at
the next update, so any code written for `DynamicLayer` stays correct. Rows
leaving the batch (`batch_select_indices`) are moved down inside the buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class AppendInPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into spare capacity instead of concatenating."""

    min_spare = 128  # positions of room added when a buffer is (re)allocated: several chunks of decoding

    def __init__(self, **kwargs):
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        super().__init__(**kwargs)

    # `keys`/`values` are views of the buffers' filled part. Whoever assigns other tensors (the rollout
    # engine compacting or merging rows, DynamicLayer's own batch_select_indices, reset) replaces the
    # cache's contents, so the buffers are let go at once: held until the next update, they would sit
    # beside the new tensors, a second copy of the cache.
    @property
    def keys(self) -> torch.Tensor | None:
        return self.__dict__.get("_keys")

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self.__dict__["_keys"] = tensor
        if not _is_view_of(tensor, self._key_buffer):
            self._key_buffer = None

    @property
    def values(self) -> torch.Tensor | None:
        return self.__dict__.get("_values")

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self.__dict__["_values"] = tensor
        if not _is_view_of(tensor, self._value_buffer):
            self._value_buffer = None

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

    def reserve(self, batch: int, length: int, like: torch.Tensor,
                spare: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Start the layer as `batch` rows of `length` zeroed positions, with room to grow.

        `like` [*, H, *, D] gives the heads, head size, dtype and device. `spare`
        is the room left after `length` (positions); by default as much as an
        update that outgrows the buffer would add. A caller that knows how far
        the layer will grow (the rollout engine: one round) gives it exactly.
        Returns the writable keys and values, for a caller that fills the cache itself.
        """
        self.lazy_initialization(like, like)
        spare = max(self.min_spare, length // 2) if spare is None else spare
        self._reallocate(0, batch, like, length + spare)
        self.keys = self._key_buffer[..., :length, :].zero_()
        self.values = self._value_buffer[..., :length, :].zero_()
        return self.keys, self.values

    def own_buffers(self, spare: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers behind `keys`/`values`, made now (with `spare` positions of room) if none."""
        if not self._owns_current_tensors():
            length = self.keys.shape[-2]
            self._reallocate(length, self.keys.shape[0], self.keys, length + spare)
            self.keys = self._key_buffer[..., :length, :]
            self.values = self._value_buffer[..., :length, :]
        return self._key_buffer, self._value_buffer

    def hold(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Make these buffers [B, H, capacity, D] the layer's own, holding their first `length` positions.

        For a caller that moves rows inside the buffers itself (the rollout engine
        setting finished rows aside behind the others): `key_buffer` may be some
        rows of the current buffers, and later updates write into those rows only.
        """
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys = key_buffer[..., :length, :]
        self.values = value_buffer[..., :length, :]

    def view_rows(self, start: int, stop: int, length: int) -> AppendInPlaceLayer:
        """A layer over rows [start, stop) of this one's buffers, holding their first `length` positions.

        Its updates write into this layer's buffers (as long as they fit), so a
        subset of consecutive rows can be run on its own with no copy of their cache.
        """
        if not self._owns_current_tensors():
            raise ValueError("view_rows needs a layer whose keys and values are views of its buffers")
        view = AppendInPlaceLayer()
        view.lazy_initialization(self.keys, self.values)
        view.hold(self._key_buffer[start:stop], self._value_buffer[start:stop], length)
        return view

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices`, moved down inside the buffers (no new allocation) when they are in order.

        DynamicLayer's version builds new tensors and the next update would then
        copy them into new buffers: two allocations where none is needed.
        """
        rows = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        if (not self._owns_current_tensors() or self.get_seq_length() == 0 or not rows
                or any(not 0 <= r < self.keys.shape[0] for r in rows)
                or any(b <= a for a, b in zip(rows, rows[1:], strict=False))):
            super().batch_select_indices(indices)
            return
        length = self.keys.shape[-2]
        for buffer in (self._key_buffer, self._value_buffer):
            for target, source in enumerate(rows):  # target <= source: nothing is overwritten before it is read
                if target != source:
                    buffer[target, :, :length] = buffer[source, :, :length]
        self.hold(self._key_buffer[: len(rows)], self._value_buffer[: len(rows)], length)

    def _owns_current_tensors(self) -> bool:
        buffers = self._key_buffer, self._value_buffer
        return all(_is_view_of(tensor, buffer) for tensor, buffer in zip((self.keys, self.values), buffers, strict=True))

    def _reallocate(self, length: int, batch: int, like: torch.Tensor, capacity: int) -> None:
        heads, dim = like.shape[1], like.shape[3]
        key_buffer = like.new_empty((batch, heads, capacity, dim))
        value_buffer = like.new_empty((batch, heads, capacity, dim))
        if length:
            key_buffer[..., :length, :] = self.keys
            value_buffer[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer


def _is_view_of(tensor: torch.Tensor | None, buffer: torch.Tensor | None) -> bool:
    """Whether `tensor` is the first positions of every row of `buffer` [B, H, capacity, D]."""
    # Storage and offset rather than data_ptr(): a view of no positions yet (0 cached) reports data_ptr() 0.
    return (buffer is not None and isinstance(tensor, torch.Tensor) and tensor.dim() == 4
            and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            and tensor.storage_offset() == buffer.storage_offset() and tensor.shape[:2] == buffer.shape[:2]
            and tensor.stride() == buffer.stride())


class AppendInPlaceCache(DynamicCache):
    """A `DynamicCache` made of `AppendInPlaceLayer`s, created lazily as the model's layers report in."""

    def __init__(self) -> None:
        # DynamicCache's own constructor builds plain DynamicLayers; the base class replicates ours instead.
        Cache.__init__(self, layer_class_to_replicate=AppendInPlaceLayer)
