"""A bounded cache of image features, so several tasks on one photo encode it once.

Users often ask several questions about one image (caption it, then detect, then segment). The SigLIP
encoder's output depends only on the pixels, so it is cached under a hash of the uploaded bytes, on the
model's device, least recently used first out. A LoRA adapter that changes the vision tower or the
projector changes the features too, so the runner keys them by (that adapter, image). Only the worker
thread touches it: no locking.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch


class FeatureCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable | None) -> torch.Tensor | None:
        if key is None or self.capacity == 0:
            return None
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: Hashable | None, features: torch.Tensor) -> None:
        if key is None or self.capacity == 0:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
