"""Range checks of single config values, part of the one validation pass (``validate.validate``).

Each rule names the key, the value it got and the range it needs, so a typo on the command line
(``train.eval_interval=0``, ``parallel.global_batch_size=-8``, ``checkpoint.keep_last=0``) fails at
start, before any process group, instead of deep inside the loop or DeepSpeed. Cross-field rules
stay in ``validate.py``; this module only looks at one value (or one string) at a time.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, List, Optional, Tuple

from mod_train.config.schema import Config

# train.seed / data.seed go to numpy, which takes 0 .. 2**32 - 1.
_MAX_SEED = 2**32 - 1
# data.split: up to three non-negative numbers separated by ',' or '/' (megatron-core's format).
_SPLIT_RE = re.compile(r"^\s*[0-9]*\.?[0-9]+(\s*[,/]\s*[0-9]*\.?[0-9]+){0,2}\s*$")

Rule = Tuple[str, object, Callable[[object], bool], str]  # key, value, ok(value), what is needed


class RangeError(ValueError):
    """One config value outside its range (``validate`` turns it into a ConfigError)."""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _at_least(lo) -> Callable[[object], bool]:
    return lambda v: _finite(v) and v >= lo


def _above(lo) -> Callable[[object], bool]:
    return lambda v: _finite(v) and v > lo


def _in_unit(lo_open: bool = False, hi_open: bool = False) -> Callable[[object], bool]:
    def ok(v) -> bool:
        if not _finite(v):
            return False
        return (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
    return ok


def _optional(rule: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or rule(v)


def _seed(v) -> bool:
    return isinstance(v, int) and 0 <= v <= _MAX_SEED


def parse_split(split: str) -> List[float]:
    """``data.split`` as three shares (train, valid, test); RangeError says what is wrong."""
    text = str(split)
    if not _SPLIT_RE.match(text):
        raise RangeError(f"data.split={text!r} must be up to three non-negative numbers separated by ',' "
                         f"(train,valid,test), e.g. data.split='98,2,0' (quote it on the command line).")
    shares = [float(x) for x in re.split(r"\s*[,/]\s*", text.strip())]
    shares += [0.0] * (3 - len(shares))
    if shares[0] <= 0:
        raise RangeError(f"data.split={text!r} gives the training split no share: the first number (train) "
                         f"must be > 0, e.g. data.split='98,2,0'.")
    return shares


def _rules(cfg: Config, world_size: int) -> Iterable[Rule]:
    m, par, opt, d, tr, ck = cfg.model, cfg.parallel, cfg.optim, cfg.data, cfg.train, cfg.checkpoint
    yield from [
        # ---- model
        ("model.num_query_groups", m.num_query_groups, _optional(_at_least(1)), ">= 1 (or null)"),
        ("model.ffn_hidden_size", m.ffn_hidden_size, _optional(_at_least(1)), ">= 1 (or null)"),
        ("model.vocab_size", m.vocab_size, _optional(_at_least(1)), ">= 1 (or null: from the tokenizer)"),
        ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by, _at_least(1), ">= 1"),
        ("model.rotary_base", m.rotary_base, _above(0), "> 0"),
        ("model.init_method_std", m.init_method_std, _above(0), "> 0"),
        ("model.hidden_dropout", m.hidden_dropout, _in_unit(hi_open=True), "in [0, 1)"),
        ("model.attention_dropout", m.attention_dropout, _in_unit(hi_open=True), "in [0, 1)"),
        ("model.mod.every", m.mod.every, _at_least(1), ">= 1"),
        ("model.mod.offset", m.mod.offset, _at_least(0), ">= 0"),
        ("model.mod.capacity", m.mod.capacity, _in_unit(lo_open=True), "in (0, 1]"),
        ("model.mod.aux_loss_coeff", m.mod.aux_loss_coeff, _at_least(0), ">= 0"),
        ("model.mod.predictor_hidden", m.mod.predictor_hidden, _at_least(0), ">= 0 (0: hidden_size // 8)"),
        ("model.moe.num_experts", m.moe.num_experts, _at_least(0), ">= 0 (0: no MoE)"),
        ("model.moe.every", m.moe.every, _at_least(1), ">= 1"),
        ("model.moe.offset", m.moe.offset, _at_least(0), ">= 0"),
        ("model.moe.aux_loss_coeff", m.moe.aux_loss_coeff, _at_least(0), ">= 0"),
        ("model.moe.z_loss_coeff", m.moe.z_loss_coeff, _optional(_at_least(0)), ">= 0 (or null)"),
        ("model.moe.ffn_hidden_size", m.moe.ffn_hidden_size, _optional(_at_least(1)), ">= 1 (or null)"),
        ("model.moe.shared_expert_ffn_hidden_size", m.moe.shared_expert_ffn_hidden_size,
         _optional(_at_least(1)), ">= 1 (or null)"),
        # ---- parallel (global batch: 0 used to mean "unset" silently, a negative one crashed in DeepSpeed)
        ("parallel.global_batch_size", par.global_batch_size, _optional(_at_least(1)),
         ">= 1 (or null: micro_batch_size x data-parallel size)"),
        ("parallel.etp", par.etp, _optional(_at_least(1)), ">= 1 (or null: parallel.tp)"),
        # ---- optimiser
        ("optim.lr", opt.lr, _above(0), "> 0"),
        ("optim.min_lr", opt.min_lr, _at_least(0), ">= 0"),
        ("optim.weight_decay", opt.weight_decay, _at_least(0), ">= 0"),
        ("optim.beta1", opt.beta1, _in_unit(hi_open=True), "in [0, 1)"),
        ("optim.beta2", opt.beta2, _in_unit(hi_open=True), "in [0, 1)"),
        ("optim.eps", opt.eps, _above(0), "> 0"),
        ("optim.clip_grad", opt.clip_grad, _at_least(0), ">= 0 (0: no clipping)"),
        ("optim.warmup_steps", opt.warmup_steps, _at_least(0), ">= 0"),
        ("optim.decay_steps", opt.decay_steps, _optional(_at_least(1)), ">= 1 (or null: train.max_steps)"),
        # ---- data
        ("data.seed", d.seed, _seed, f"an integer in [0, {_MAX_SEED}]"),
        # ---- train
        ("train.log_interval", tr.log_interval, _at_least(1), ">= 1"),
        ("train.eval_interval", tr.eval_interval, _at_least(1), ">= 1 (validation every N steps)"),
        ("train.eval_iters", tr.eval_iters, _at_least(1), ">= 1 (batches per validation)"),
        ("train.exit_interval", tr.exit_interval, _optional(_at_least(1)), ">= 1 (or null)"),
        ("train.seed", tr.seed, _seed, f"an integer in [0, {_MAX_SEED}]"),
        ("train.peak_tflops", tr.peak_tflops, _optional(_above(0)), "> 0 (or null: looked up)"),
        ("train.max_skipped_steps", tr.max_skipped_steps, _at_least(1), ">= 1"),
        ("train.step_timeout_s", tr.step_timeout_s, _optional(_above(0)), "> 0 seconds (or null: no watchdog)"),
        ("train.spike.window", tr.spike.window, _at_least(2), ">= 2 losses"),
        ("train.spike.threshold_sigmas", tr.spike.threshold_sigmas, _above(0), "> 0"),
        ("train.inject.spike_factor", tr.inject.spike_factor, _above(0), "> 0"),
        ("train.inject.hang_s", tr.inject.hang_s, _above(0), "> 0 seconds"),
        ("train.inject.checkpoint_write_delay_s", tr.inject.checkpoint_write_delay_s, _optional(_above(0)),
         "> 0 seconds (or null)"),
        # ---- checkpoint (keep_last=0 used to keep every checkpoint silently)
        ("checkpoint.save_interval", ck.save_interval, _at_least(1), ">= 1"),
        ("checkpoint.keep_last", ck.keep_last, _at_least(1),
         ">= 1 (the newest N complete checkpoints are kept; to keep them all set a large N)"),
        ("checkpoint.resume", ck.resume, lambda v: isinstance(v, str) and v.strip() != "",
         "'auto', 'none' or a checkpoint directory"),
        ("checkpoint.init_from", ck.init_from, lambda v: v is None or str(v).strip() != "",
         "a checkpoint or model directory (or null)"),
        ("train.run_dir", tr.run_dir, lambda v: isinstance(v, str) and v.strip() != "", "a directory path"),
        ("checkpoint.dir", ck.dir, lambda v: v is None or str(v).strip() != "", "a directory (or null: <run_dir>/checkpoints)"),
        # ---- parallel timeouts
        ("parallel.collective_timeout_s", par.collective_timeout_s, _above(0), "> 0 seconds"),
    ]
    for key in ("nan_loss_at_step", "spike_loss_at_step", "skip_update_at_step", "hang_at_step"):
        yield (f"train.inject.{key}", getattr(tr.inject, key), _optional(_at_least(1)), ">= 1 (a step; or null)")
    ranks = tr.inject.ranks
    yield ("train.inject.ranks", ranks, lambda v: v is None or all(0 <= int(r) < world_size for r in v),
           f"global ranks in [0, {world_size - 1}] (or null: all)")


def check_ranges(cfg: Config, world_size: int) -> Optional[str]:
    """The first value outside its range, as a fix-it message (None: all in range)."""
    for key, value, ok, needed in _rules(cfg, world_size):
        if not ok(value):
            return f"{key}={value!r} is out of range: it must be {needed}."
    try:
        parse_split(cfg.data.split)
    except RangeError as e:
        return str(e)
    return None
