"""K/V of the tokens one transformer layer has processed, per sequence of a batch."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


class LayerKVCache:
    """Storage [batch, capacity, groups, head_dim], grown by doubling.

    Sequences fill at their own pace (a MoD layer caches only the tokens it routed), so each has
    its own length; attention masks the unused tail of the shorter ones. ``positions[b]`` lists the
    absolute positions of sequence b's cached tokens, in order.
    """

    def __init__(self, batch: int) -> None:
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.positions: List[List[int]] = [[] for _ in range(batch)]

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        if self.k is not None and need <= self.k.size(1):
            return
        cap = max(16, 2 * need)
        shape = (self.lengths.numel(), cap) + tuple(like.shape[2:])
        new_k, new_v = like.new_zeros(shape), like.new_zeros(shape)
        if self.k is not None:
            new_k[:, : self.k.size(1)] = self.k
            new_v[:, : self.v.size(1)] = self.v
        self.k, self.v = new_k, new_v

    def append(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
               pos: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Add one token's k/v [1, n, g, d] for the sequences ``rows`` [n]; return their keys and
        values [n, L, g, d] and, if their lengths differ, a mask [n, L] of the valid entries."""
        self._reserve(int(self.lengths[rows].max()) + 1, k)
        rows_dev = rows.to(self.k.device)
        at = self.lengths[rows].to(self.k.device)
        self.k[rows_dev, at] = k[0]
        self.v[rows_dev, at] = v[0]
        self.lengths[rows] += 1
        for r in rows.tolist():
            self.positions[r].append(pos)
        lengths = self.lengths[rows]
        longest = int(lengths.max())
        keys, values = self.k[rows_dev, :longest], self.v[rows_dev, :longest]
        if bool((lengths == longest).all()):
            return keys, values, None
        mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
        return keys, values, mask.to(self.k.device)

    def size(self, seq: int = 0) -> int:
        """Number of K/V entries held for sequence ``seq``."""
        return int(self.lengths[seq])
