"""Train/valid datasets over indexed files, built with megatron-core's BlendedMegatronDatasetBuilder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from mod_train.config.schema import Config
from mod_train.config.validate import Derived


@dataclass
class Datasets:
    train: GPTDataset
    valid: Optional[GPTDataset]


def build_datasets(cfg: Config, derived: Derived, tokenizer, run_dir: Path) -> Datasets:
    """Sample-indexed datasets big enough for the whole run (megatron samples with its own seed)."""
    gbs = derived.global_batch_size
    train_samples = cfg.train.max_steps * gbs
    evals = cfg.train.max_steps // cfg.train.eval_interval + 1
    valid_samples = evals * cfg.train.eval_iters * gbs
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "data_cache"
    config = GPTDatasetConfig(
        random_seed=cfg.data.seed,
        sequence_length=cfg.model.seq_length,
        # No blend: megatron-core switches to its mock (synthetic) dataset.
        blend=None if cfg.data.mock else (list(cfg.data.paths),
                                          None if cfg.data.weights is None else list(cfg.data.weights)),
        split=cfg.data.split,
        path_to_cache=str(cache),
        tokenizer=tokenizer,
        # Packed documents (megatron's GPTDataset finds the tokenizer's EOD in each sample).
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        # Without document masking attention is causal by mask type (SDPA's is_causal fast path):
        # no [s, s] mask is built or moved. With it, each sample carries its causal-and-same-document
        # mask [1, s, s] (True = masked out).
        create_attention_mask=cfg.data.reset_attention_mask,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset if cfg.data.mock else GPTDataset, [train_samples, valid_samples, None], lambda: True, config
    ).build()
    return Datasets(train=train, valid=valid)


# What every micro-batch holds; "attention_mask" [b, 1, s, s] is added under data.reset_attention_mask.
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class MicroBatches:
    """Deterministic, resumable micro-batches for one data-parallel rank.

    Global sample order is the dataset's; each optimizer step consumes ``global_batch_size``
    samples, split into micro-batches, each spread over the DP ranks (as Megatron's
    pretraining sampler). Resuming only needs ``consumed_samples``.
    """

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device):
        self.dataset = dataset
        self.consumed_samples = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        start = self.consumed_samples + self.dp_rank * self.mbs
        idx = [(start + j) % len(self.dataset) for j in range(self.mbs)]
        samples = [self.dataset[i] for i in idx]
        self.consumed_samples += self.mbs * self.dp_size
        keys = BATCH_KEYS + (("attention_mask",) if "attention_mask" in samples[0] else ())
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}
        if self.device.type == "cuda":
            batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch
