"""The LRU of quantized weights that makes switching a CoAModel between configurations cheap.

A layer's W̃ depends only on (layer, spec): a config that shares a layer's spec with one seen before reuses
that W̃ instead of quantizing again (``lora.cache_mb`` bounds the bytes held).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class WeightCache:
    """An LRU of quantized weights keyed by (layer, spec key), holding at most ``max_bytes`` bytes.

    A tensor larger than the bound is not cached; ``max_bytes = 0`` caches nothing. The bound counts cached
    tensors only: each layer's current W̃ is held by the layer whether or not it is also cached.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def get(self, key: tuple[str, str], device: torch.device) -> torch.Tensor | None:
        """The cached tensor (now most recently used), or None; an entry on another device is a miss."""
        tensor = self._entries.get(key)
        if tensor is None or tensor.device != device:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: tuple[str, str], tensor: torch.Tensor) -> None:
        """Insert ``tensor``, evicting least recently used entries until it fits."""
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.nbytes -= self._nbytes(self._entries.pop(key))
        while self.nbytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= self._nbytes(old)
            self.evictions += 1
        self._entries[key] = tensor
        self.nbytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()
