"""What a routing layer must know about megatron-core's activation recomputation.

megatron-core recomputes through ``tensor_parallel.checkpoint`` (``CheckpointFunction``): full
granularity wraps whole layers (``TransformerBlock._checkpointed_forward``), selective granularity
wraps submodules (core attention, dense MLP, MoE layer). The wrapped code runs twice per
micro-batch:

* the FIRST pass, in the forward schedule, under ``torch.no_grad()``: its outputs feed the next
  layers, nothing inside it is kept for backward;
* the RECOMPUTE, inside the backward pass of that micro-batch, under ``enable_grad``: the graph
  that backward runs through is this pass's graph.

megatron marks both with its checkpoint flag (``tensor_parallel.random.is_checkpointing()``); the
grad mode tells them apart (:func:`recompute_pass`). A layer whose forward has side effects must
do each of them in exactly one pass. mod-train's rule: a recomputed layer's side effects
(auxiliary losses attached to the graph, routing statistics, calibration observations) happen in
the RECOMPUTE, the pass that backward runs through, as megatron's own MoE router does (it attaches
and logs its load-balancing loss only under ``torch.is_grad_enabled()``). A forward whose backward
never runs then leaves no trace, as without recomputation a forward under ``no_grad`` leaves none.

A MoD layer's routing is not a side effect but a decision: the RECOMPUTE must reuse the FIRST
pass's top-k set, never select again (recomputed router logits can differ in the last bit on a
GPU, and a second selection would also repeat the tensor-parallel broadcast). The FIRST pass
pushes its selection onto the layer's :class:`RoutingStash`, the RECOMPUTE pops it. Pipeline
schedules (1F1B, interleaved) run several micro-batches' forwards before their backwards, but
each model chunk's backwards come in the order of its forwards, so a first-in first-out queue per
layer pairs each recompute with its own forward. A stale entry (a FIRST pass whose backward never
ran) can never be used silently: every pop checks the shape of the selection against the
recompute's sequence, batch and k, and the training step checks that every stash is empty at its
start and end (:func:`check_drained`), clearing it when it raises.

Nested megatron checkpoints clear the flag early (the inner one unsets it); megatron nests them
only for ``moe`` + ``shared_experts``, which validate.py refuses. Transformer Engine's checkpoint
(fp8/fp4 full recompute) does not set the flag: the MoD layer refuses that combination.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Deque, Iterable, List

import torch
from megatron.core.tensor_parallel.random import is_checkpointing


class Pass(enum.Enum):
    PLAIN = "plain"  # no recomputation around this code
    FIRST = "first"  # the no-grad forward of a recomputed region
    RECOMPUTE = "recompute"  # the same region run again during backward


def recompute_pass(training: bool) -> Pass:
    """Which pass of megatron's recomputation the calling module is in. Evaluation (``training``
    false) is always PLAIN: nothing is recomputed without a backward pass."""
    if not (training and is_checkpointing()):
        return Pass.PLAIN
    return Pass.RECOMPUTE if torch.is_grad_enabled() else Pass.FIRST


class StaleRecomputeState(RuntimeError):
    """A routing decision stashed for a recompute that did not (or not yet) come."""


class RoutingStash:
    """First-in first-out routing decisions of one layer, from its FIRST passes to its RECOMPUTEs."""

    def __init__(self, owner: str):
        self.owner = owner  # for messages: which layer
        self._queue: Deque[torch.Tensor] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, idx: torch.Tensor) -> None:
        self._queue.append(idx)

    def pop(self, batch: int, k: int, seq_len: int) -> torch.Tensor:
        """The oldest selection, which must be [batch, k] indices below ``seq_len``'s shape."""
        if not self._queue:
            raise StaleRecomputeState(
                f"{self.owner}: recompute without a stashed routing decision (the forward pass of this "
                f"micro-batch did not run under megatron's checkpoint, or its entry was taken by another)")
        idx = self._queue.popleft()
        if tuple(idx.shape) != (batch, k):
            self._queue.clear()
            raise StaleRecomputeState(
                f"{self.owner}: the stashed routing decision has shape {tuple(idx.shape)} but the recompute "
                f"routes [batch {batch}, k {k}] of {seq_len} tokens: a stale entry from another forward pass")
        return idx

    def clear(self) -> int:
        n = len(self._queue)
        self._queue.clear()
        return n


class HasRoutingStash:
    """Mixin of a layer that owns a :class:`RoutingStash` (``self.routing_stash``)."""

    routing_stash: RoutingStash


def stashes_of(modules: Iterable[torch.nn.Module]) -> List[RoutingStash]:
    return [m.routing_stash for module in modules for m in module.modules() if isinstance(m, HasRoutingStash)]


def check_drained(stashes: Iterable[RoutingStash], when: str) -> None:
    """Raise if a routing stash (of :func:`stashes_of`) holds decisions (a FIRST pass whose backward
    never ran), after clearing them all so that none is ever used. Call at the start and end of
    every training step."""
    stale = [(s.owner, s.clear()) for s in stashes]
    stale = [(owner, n) for owner, n in stale if n]
    if stale:
        held = ", ".join(f"{owner}: {n}" for owner, n in stale)
        raise StaleRecomputeState(
            f"{when}: routing decisions stashed for a recompute that never ran ({held}; cleared). A training-mode "
            f"forward under full recomputation was not followed by its backward pass: run forward-only passes "
            f"with the model in eval mode.")
