"""All cross-field validation, run once before any process group starts.

Every rule raises ``ConfigError`` with a message that names the keys involved and says what
to change. Derived quantities (data-parallel size, micro-batches per step, padded vocab,
which layers are MoD/MoE) are computed here once and handed around as ``Derived``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from mod_train.config.ranges import check_ranges
from mod_train.config.schema import Config, ParallelConfig
from mod_train.model.fusions import FusionPlan, fp8_refusal
from mod_train.model.fusions import decide as decide_fusions
from mod_train.model.fusions import probe as probe_kernels


class ConfigError(ValueError):
    """A configuration that cannot work. The message says what to change."""


@dataclass(frozen=True)
class Derived:
    world_size: int
    dp: int
    num_microbatches: int
    global_batch_size: int
    vocab_size: int  # the tokenizer's vocabulary
    padded_vocab_size: int  # embedding rows (vocab padded for TP)
    ffn_hidden_size: int
    mod_layers: List[int]
    mod_capacities: List[float]
    moe_layers: List[int]
    bf16: bool
    fusions: FusionPlan  # fused kernels and fp8, decided once here from what this machine offers


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _layer_list(explicit: Optional[List[int]], every: int, offset: int, num_layers: int, key: str) -> List[int]:
    if explicit is not None:
        layers = sorted(set(int(i) for i in explicit))
        bad = [i for i in layers if i < 0 or i >= num_layers]
        _require(not bad, f"{key}.layers has index {bad} out of range for model.num_layers={num_layers} "
                          f"(valid: 0..{num_layers - 1}).")
        return layers
    _require(every >= 1, f"{key}.every must be >= 1, got {every}.")
    _require(0 <= offset < max(every, 1) or offset < num_layers,
             f"{key}.offset={offset} must be below {key}.every={every}.")
    return [i for i in range(num_layers) if i >= offset and (i - offset) % every == 0]


def default_ffn_hidden_size(hidden: int, activation: str) -> int:
    if activation == "swiglu":
        # LLaMA's convention: 2/3 of 4h, rounded up to a multiple of 64 for matmul efficiency.
        return ((int(8 * hidden / 3) + 63) // 64) * 64
    return 4 * hidden


def expert_tensor_parallel_size(par: ParallelConfig) -> int:
    """parallel.etp as megatron-core takes it: null means the dense TP size."""
    return par.tp if par.etp is None else par.etp


def pad_vocab(vocab: int, divisible_by: int) -> int:
    # Unlike Megatron (which pads to divisible_by x TP), the padding does not depend on the
    # layout, so the embedding has the same shape under every TP size and checkpoints reshard.
    return ((vocab + divisible_by - 1) // divisible_by) * divisible_by


def tokenizer_vocab_size(path: str) -> int:
    """Vocabulary size of a sentencepiece .model or a Hugging Face tokenizer.json (or a directory
    with one), with a clear error for a bad path or a tokenizer without an end-of-document token."""
    p = Path(path)
    _require(p.exists(), f"data.tokenizer_model: no tokenizer file at '{path}'. Train one with "
                         f"`mod-prep-tokenizer` or point data.tokenizer_model at an existing .model file, "
                         f"tokenizer.json, or a directory with a tokenizer.json.")
    from data_prep._io import DataPrepError
    from data_prep.encoders import eod_id, load_encoder

    try:
        encoder = load_encoder(str(p))
        eod_id(encoder)  # training marks document ends with it
        return encoder.vocab_size
    except DataPrepError as e:
        raise ConfigError(f"data.tokenizer_model: {e}") from e


def tokenizer_eod(path: str) -> int:
    """The end-of-document id of the tokenizer at ``path`` (checked by ``tokenizer_vocab_size``)."""
    from data_prep.encoders import eod_id, load_encoder

    return eod_id(load_encoder(str(path)))


def _validate_packed_documents(cfg: Config, check_files: bool) -> None:
    """data.reset_position_ids / reset_attention_mask / eod_mask_loss (packed documents)."""
    d, m = cfg.data, cfg.model
    _require(not (d.reset_position_ids and m.position_embedding == "rope"),
             "data.reset_position_ids=true with model.position_embedding=rope: megatron-core computes rope "
             "from the sequence length, not from position_ids, so resetting them would change nothing. Rope "
             "is relative: with data.reset_attention_mask=true a token already sees its own document at the "
             "same relative positions as if the document started at 0. Set data.reset_position_ids=false "
             "(and data.reset_attention_mask=true), or use model.position_embedding=learned_absolute.")
    if not (d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss) or d.mock or not check_files:
        return  # megatron's mock documents end with the tokenizer's EOD
    from mod_train.data.indexed_check import documents_end_with

    eod = tokenizer_eod(d.tokenizer_model)
    for prefix in d.paths:
        _require(documents_end_with(prefix, eod),
                 f"data.reset_position_ids/reset_attention_mask/eod_mask_loss find documents by the tokenizer's "
                 f"EOD id {eod}, but no document of '{prefix}' ends with it (tokenized with `mod-prep-data "
                 f"--no-eod`?): re-tokenize without --no-eod, or set these options to false.")


def check_data_paths(paths: List[str], weights: Optional[List[float]], vocab_size: Optional[int] = None) -> None:
    _require(len(paths) > 0, "data.paths is empty: give at least one indexed dataset prefix "
                             "(the path of a .bin/.idx pair without the extension), made by `mod-prep-data`.")
    for prefix in paths:
        missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
        _require(not missing, f"data.paths: '{prefix}' has no {' or '.join(missing)} file "
                              f"(looked for {prefix}.bin and {prefix}.idx). Tokenize with `mod-prep-data` "
                              f"or fix the path (a prefix, without .bin/.idx).")
    from mod_train.data.indexed_check import DatasetCheckError, check_indexed_dataset

    for prefix in paths:  # sizes, dtype and token ids against the tokenizer (indexed_check.py)
        try:
            check_indexed_dataset(prefix, vocab_size)
        except DatasetCheckError as e:
            raise ConfigError(str(e)) from None
    if weights is not None:
        _require(len(weights) == len(paths), f"data.weights has {len(weights)} entries but data.paths has "
                                             f"{len(paths)}: give one weight per path or none.")
        _require(all(w >= 0 for w in weights) and sum(weights) > 0, "data.weights must be >= 0 with a positive sum.")


def validate(cfg: Config, world_size: Optional[int] = None, check_files: bool = True,
             has_cuda: Optional[bool] = None) -> Derived:
    """Check every cross-field rule; return the derived layout. No torch.distributed here."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    m, par, opt, tr = cfg.model, cfg.parallel, cfg.optim, cfg.train

    # ---- sizes
    for key, val in [("parallel.tp", par.tp), ("parallel.pp", par.pp), ("parallel.ep", par.ep),
                     ("parallel.cp", par.cp), ("parallel.micro_batch_size", par.micro_batch_size),
                     ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                     ("model.num_attention_heads", m.num_attention_heads), ("model.seq_length", m.seq_length),
                     ("train.max_steps", tr.max_steps)]:
        _require(val >= 1, f"{key} must be >= 1, got {val}.")
    _require(par.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {par.zero_stage}.")
    out_of_range = check_ranges(cfg, world_size)  # one value at a time (ranges.py)
    _require(out_of_range is None, out_of_range or "")
    lm = cfg.eval.lm_eval
    if lm.interval > 0 and lm.tasks:
        _require(par.tp == 1 and par.pp == 1 and par.ep == 1,
                 f"eval.lm_eval runs on rank 0, which must hold the whole model: parallel.tp/pp/ep = 1, got "
                 f"tp={par.tp} pp={par.pp} ep={par.ep}. Evaluate checkpoints with mod-eval instead.")
    _require(lm.interval >= 0, f"eval.lm_eval.interval must be >= 0 (0: off), got {lm.interval}.")

    # megatron-core implements context parallelism inside Transformer Engine's attention only, and
    # the batch must be split per CP rank (load-balanced chunks): neither is wired in yet.
    _require(par.cp == 1,
             f"parallel.cp={par.cp}: context parallelism is not supported by mod-train yet (megatron-core "
             f"provides it only in Transformer Engine's attention; mod-train does not split batches over CP "
             f"ranks). Use parallel.cp=1, and tensor/sequence parallelism for long sequences.")

    # ---- layout vs world size
    model_parallel = par.tp * par.pp * par.cp
    _require(world_size % model_parallel == 0,
             f"world size {world_size} is not divisible by parallel.tp x parallel.pp x parallel.cp = "
             f"{par.tp} x {par.pp} x {par.cp} = {model_parallel}. Launch a multiple of {model_parallel} "
             f"processes or change the layout.")
    dp = world_size // model_parallel
    etp = expert_tensor_parallel_size(par)
    if etp == par.tp:
        _require((dp * par.cp) % par.ep == 0,
                 f"parallel.ep={par.ep} must divide data-parallel x context-parallel size = {dp} x {par.cp} "
                 f"(world {world_size} / (tp {par.tp} x pp {par.pp})). Lower parallel.ep or add processes.")
    else:
        # megatron-core lays the expert ranks out as ETP x EP x expert-DP x PP over the same world
        # (parallel_state.initialize_model_parallel: world % (etp x ep x pp) == 0).
        _require((par.tp * par.cp * dp) % (etp * par.ep) == 0,
                 f"parallel.etp x parallel.ep = {etp} x {par.ep} = {etp * par.ep} must divide parallel.tp x "
                 f"data-parallel size = {par.tp} x {dp} = {par.tp * dp} (megatron-core places experts on "
                 f"etp x ep x expert-data-parallel ranks of every pipeline stage). Lower parallel.etp or "
                 f"parallel.ep, or add processes.")

    # ---- attention vs TP
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}.")
    _require(m.num_attention_heads % par.tp == 0,
             f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={par.tp}: "
             f"choose a TP size that divides the number of heads.")
    groups = m.num_query_groups or m.num_attention_heads
    _require(m.num_attention_heads % groups == 0,
             f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups={groups}.")
    _require(groups % par.tp == 0,
             f"model.num_query_groups={groups} is not divisible by parallel.tp={par.tp}.")
    if m.position_embedding == "rope":
        _require((m.hidden_size // m.num_attention_heads) % 2 == 0, "rotary embeddings need an even head dimension.")

    # ---- pipeline
    stages = par.pp * (par.vpp or 1)
    _require(m.num_layers % stages == 0,
             f"model.num_layers={m.num_layers} is not divisible by parallel.pp x parallel.vpp = {stages}: "
             f"every pipeline stage needs the same number of layers.")
    if par.vpp is not None:
        _require(par.pp > 1, "parallel.vpp (virtual pipeline stages) needs parallel.pp > 1.")
        _require(par.vpp >= 2, f"parallel.vpp must be >= 2 when set, got {par.vpp} (use null for no interleaving).")

    # ---- sequence parallel
    if par.sequence_parallel:
        _require(par.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1.")
        _require(m.seq_length % par.tp == 0,
                 f"model.seq_length={m.seq_length} is not divisible by parallel.tp={par.tp}, which sequence "
                 f"parallel requires.")

    # ---- batch
    gbs = par.global_batch_size or par.micro_batch_size * dp
    _require(gbs % (par.micro_batch_size * dp) == 0,
             f"parallel.global_batch_size={gbs} is not divisible by parallel.micro_batch_size x data-parallel "
             f"size = {par.micro_batch_size} x {dp} = {par.micro_batch_size * dp}.")
    num_microbatches = gbs // (par.micro_batch_size * dp)
    if par.pp > 1 and par.vpp is not None:
        _require(num_microbatches % par.pp == 0,
                 f"the interleaved pipeline schedule needs micro-batches per step ({num_microbatches}) to be a "
                 f"multiple of parallel.pp={par.pp}: raise parallel.global_batch_size.")
    if par.pp > 1:
        _require(par.zero_stage <= 1,
                 f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: ZeRO-2/3 partition gradients "
                 f"during backward, which megatron's pipeline schedule does not support here. Use "
                 f"parallel.zero_stage=1 (or 0) with pipeline parallelism.")

    # ---- optimiser / schedule
    _require(opt.schedule in ("cosine", "constant", "wsd"),
             f"optim.schedule must be cosine, constant or wsd, got '{opt.schedule}'.")
    _require(opt.lr > 0 and 0 <= opt.min_lr <= opt.lr, f"need 0 <= optim.min_lr <= optim.lr and lr > 0.")
    _require(opt.warmup_steps >= 0, "optim.warmup_steps must be >= 0.")
    _require(0.0 < opt.wsd_decay_fraction <= 1.0, "optim.wsd_decay_fraction must be in (0, 1].")

    # ---- model choices
    _require(m.normalization in ("RMSNorm", "LayerNorm"), f"model.normalization must be RMSNorm or LayerNorm, got '{m.normalization}'.")
    _require(m.activation in ("swiglu", "gelu"), f"model.activation must be swiglu or gelu, got '{m.activation}'.")
    _require(m.position_embedding in ("rope", "learned_absolute"),
             f"model.position_embedding must be rope or learned_absolute, got '{m.position_embedding}'.")
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.activation)
    _require(ffn % par.tp == 0, f"FFN hidden size {ffn} is not divisible by parallel.tp={par.tp}.")

    # ---- precision
    _require(tr.precision in ("auto", "fp32", "bf16", "fp8"),
             f"train.precision must be auto, fp32, bf16 or fp8, got '{tr.precision}'.")

    # ---- MoD
    mod_layers: List[int] = []
    mod_caps: List[float] = []
    if m.mod.enabled:
        mod_layers = _layer_list(m.mod.layers, m.mod.every, m.mod.offset, m.num_layers, "model.mod")
        _require(len(mod_layers) > 0, "model.mod.enabled=true but no layer is selected: check model.mod.layers/every/offset.")
        caps = list(m.mod.capacities) if m.mod.capacities is not None else [m.mod.capacity] * len(mod_layers)
        _require(len(caps) == len(mod_layers),
                 f"model.mod.capacities has {len(caps)} entries for {len(mod_layers)} MoD layers {mod_layers}.")
        for layer, cap in zip(mod_layers, caps):
            _require(0.0 < cap <= 1.0, f"MoD capacity for layer {layer} is {cap}: it must be in (0, 1].")
            k = round(cap * m.seq_length)
            _require(k >= 1, f"MoD capacity {cap} x model.seq_length {m.seq_length} rounds to k={k} routed tokens "
                             f"in layer {layer}: raise the capacity or the sequence length so that k >= 1.")
            if par.sequence_parallel:
                # The k routed tokens are split over the TP ranks again inside the layer (mod.py).
                _require(k % par.tp == 0, f"MoD layer {layer} routes k={k} tokens, which sequence parallel cannot "
                                          f"split over parallel.tp={par.tp}: choose a capacity with k divisible by TP.")
        _require(m.mod.router_weight in ("sigmoid", "logit", "none"),
                 f"model.mod.router_weight must be sigmoid, logit or none, got '{m.mod.router_weight}'.")
        _require(m.mod.causal in ("aux_loss", "predictor"),
                 f"model.mod.causal must be aux_loss or predictor, got '{m.mod.causal}'.")
        _require(0.0 <= m.mod.threshold_update_rate <= 1.0,
                 f"model.mod.threshold_update_rate must be in [0, 1] (0: no calibration, the causal decision is "
                 f"logit > 0), got {m.mod.threshold_update_rate}.")
        sched = m.mod.capacity_schedule
        _require(sched.steps >= 0 and sched.phases >= 1,
                 f"model.mod.capacity_schedule needs steps >= 0 (0: off) and phases >= 1, got steps={sched.steps} "
                 f"phases={sched.phases}.")
        mod_caps = caps
        if par.cp > 1:
            raise ConfigError("model.mod with parallel.cp > 1 is not supported: top-k routing needs the whole "
                              "sequence on one rank. Use parallel.cp=1.")

    # ---- MoE
    moe_layers: List[int] = []
    if m.moe.num_experts > 0:
        moe_layers = _layer_list(m.moe.layers, m.moe.every, m.moe.offset, m.num_layers, "model.moe")
        _require(m.moe.num_experts % par.ep == 0,
                 f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.ep={par.ep}.")
        _require(1 <= m.moe.top_k <= m.moe.num_experts,
                 f"model.moe.top_k={m.moe.top_k} must be between 1 and model.moe.num_experts={m.moe.num_experts}.")
        _require(m.moe.token_dispatcher in ("alltoall", "allgather"),
                 f"model.moe.token_dispatcher must be alltoall or allgather, got '{m.moe.token_dispatcher}'.")
        _require(m.moe.capacity_factor is None or m.moe.capacity_factor > 0,
                 f"model.moe.capacity_factor must be > 0 (or null for dropless), got {m.moe.capacity_factor}.")
        _require(m.moe.mode in ("none", "staged", "integrated"),
                 f"model.moe.mode must be none, staged or integrated, got '{m.moe.mode}'.")
        if m.moe.num_noop_experts is not None:
            _require(m.moe.mode == "integrated",
                     f"model.moe.num_noop_experts={m.moe.num_noop_experts} is only used by integrated MoDE: set "
                     f"model.moe.mode=integrated or model.moe.num_noop_experts=null.")
            _require(m.moe.num_noop_experts >= 1,
                     f"model.moe.num_noop_experts={m.moe.num_noop_experts} must be >= 1 (null: top_k, so a token "
                     f"can skip its MLP entirely).")
        if m.moe.load_balancing == "expert_bias":
            _require(m.moe.bias_update_rate > 0,
                     f"model.moe.load_balancing=expert_bias needs model.moe.bias_update_rate > 0 (megatron's "
                     f"moe_router_bias_update_rate, e.g. 1e-3), got {m.moe.bias_update_rate}. Use "
                     f"model.moe.load_balancing=none for routing without any balancing.")
        if m.moe.mode == "staged":
            _require(m.mod.enabled and bool(set(mod_layers) & set(moe_layers)),
                     f"model.moe.mode=staged (MoD routing around an MoE layer) needs layers that are both MoD and "
                     f"MoE: MoD layers {mod_layers}, MoE layers {moe_layers}. Use model=tiny_mode_staged or enable "
                     f"model.mod on the MoE layers.")
        if par.tp > 1:
            _require(par.sequence_parallel,
                     f"MoE layers with parallel.tp={par.tp} need parallel.sequence_parallel=true (megatron-core's "
                     f"MoE layer refuses to train with TP but without sequence parallelism).")
        moe_ffn = m.moe.ffn_hidden_size or ffn
        _require(moe_ffn % etp == 0,
                 f"the expert FFN hidden size {moe_ffn} is not divisible by the expert tensor parallel size {etp} "
                 f"(parallel.etp, null: parallel.tp): change model.moe.ffn_hidden_size or parallel.etp.")
        if etp != par.tp:
            # megatron-core marks expert weights as expert-parallel (allreduce=False) only when EP > 1;
            # with EP = 1 they count as ordinary weights, whose gradients DeepSpeed (like megatron's own
            # DDP) reduces over the dense data-parallel group, while with etp != tp their replicas live
            # in megatron's expert-data-parallel group (another set of ranks): wrong sums.
            _require(par.ep > 1,
                     f"parallel.etp={etp} differs from parallel.tp={par.tp} but parallel.ep=1: expert weights are "
                     f"then reduced over the dense data-parallel group, not over their expert-data-parallel "
                     f"replicas. Set parallel.ep > 1 (e.g. parallel.ep=2) or parallel.etp=null (= parallel.tp).")
        if par.ep > 1:
            # With etp != tp the expert-data-parallel groups lie across TP and DP ranks; the layout
            # rule above covers them (DeepSpeed takes megatron's groups as they are).
            _require(etp != par.tp or dp % par.ep == 0,
                     f"parallel.ep={par.ep} must divide the data-parallel size {dp}: DeepSpeed reduces expert "
                     f"gradients over expert-data-parallel groups inside its data-parallel group.")
            _require(par.zero_stage in (1, 2),
                     f"parallel.ep={par.ep} needs parallel.zero_stage=1 or 2, got {par.zero_stage}. ZeRO-3 would "
                     f"partition each EP rank's own experts over the whole data-parallel group (DeepSpeed 0.19.8 "
                     f"supports ZeRO-3 expert partitioning only for its AutoEP layers); without ZeRO (stage 0) "
                     f"DeepSpeed's gradient clipping averages per-rank norms instead of summing expert norms.")
    else:
        _require(par.ep == 1, f"parallel.ep={par.ep} but the model has no experts (model.moe.num_experts=0).")
        _require(etp == par.tp, f"parallel.etp={etp} (expert tensor parallel size) but the model has no experts "
                                f"(model.moe.num_experts=0): set parallel.etp=null.")
        _require(m.moe.mode == "none",
                 f"model.moe.mode={m.moe.mode} needs experts: set model.moe.num_experts > 0.")
        _require(m.moe.load_balancing == "aux_loss" and not m.moe.grouped_gemm,
                 f"model.moe.load_balancing={m.moe.load_balancing} / model.moe.grouped_gemm={m.moe.grouped_gemm} "
                 f"configure MoE layers, and the model has none: set model.moe.num_experts > 0 (e.g. model=tiny_moe) "
                 f"or drop these overrides.")

    _validate_recompute(cfg, moe_layers)

    # ---- data and tokenizer
    vocab = m.vocab_size or 0
    if cfg.data.mock:
        _require(m.vocab_size is not None,
                 "data.mock=true generates tokens without a tokenizer: set model.vocab_size (e.g. 32000).")
        _require(not cfg.data.paths and cfg.data.tokenizer_model is None,
                 "data.mock=true reads no files: use data=mock (no data.paths, data.tokenizer_model=null), "
                 "or data.mock=false to train on data.paths.")
    elif check_files:
        _require(cfg.data.tokenizer_model is not None,
                 "data.tokenizer_model is null: point it at a sentencepiece .model file (or use data=mock).")
        tok_vocab = tokenizer_vocab_size(cfg.data.tokenizer_model)
        if m.vocab_size is not None:
            _require(m.vocab_size == tok_vocab,
                     f"model.vocab_size={m.vocab_size} does not match the tokenizer's vocabulary of {tok_vocab} "
                     f"({cfg.data.tokenizer_model}). Set model.vocab_size={tok_vocab} or null (take it from the tokenizer).")
        vocab = tok_vocab
        check_data_paths(list(cfg.data.paths), None if cfg.data.weights is None else list(cfg.data.weights),
                         tok_vocab)
    _require(vocab >= 1, "model.vocab_size is unknown: set data.tokenizer_model (or model.vocab_size).")
    _validate_packed_documents(cfg, check_files)
    padded_vocab = pad_vocab(vocab, m.make_vocab_size_divisible_by)
    _require(padded_vocab % par.tp == 0,
             f"the padded vocabulary ({padded_vocab}) is not divisible by parallel.tp={par.tp}: raise "
             f"model.make_vocab_size_divisible_by to a multiple of {par.tp}.")

    # ---- checkpoints / logging
    _require(cfg.checkpoint.save_interval >= 1, "checkpoint.save_interval must be >= 1.")
    # DeepSpeed 0.19.8's engine.save_checkpoint writes synchronously (its decoupled/fast engines need
    # the DeepNVMe async_io op, Nebula and DataStates external services); a background save writes the
    # layout-free copy only.
    _require(not (cfg.checkpoint.async_save and cfg.checkpoint.deepspeed_files),
             "checkpoint.async_save=true writes the layout-free copy (model/, optimizer/) in the background, "
             "DeepSpeed's own files only synchronously: set checkpoint.deepspeed_files=false (resume and reshard "
             "do not need them) or checkpoint.async_save=false.")
    _require(tr.inject.checkpoint_write_delay_s is None or cfg.checkpoint.async_save,
             "train.inject.checkpoint_write_delay_s delays the background checkpoint write: it needs "
             "checkpoint.async_save=true.")
    _require(tr.log_interval >= 1, "train.log_interval must be >= 1.")
    if tr.exit_interval is not None:
        _require(tr.exit_interval >= 1, "train.exit_interval must be >= 1 (or null).")
    _validate_resilience(cfg)

    if tr.precision == "fp8":
        _validate_fp8_shapes(cfg, ffn, mod_caps)
    # Last: a config error is reported without waiting seconds for torch to import.
    avail = probe_kernels(has_cuda)
    has_cuda = avail.cuda
    if tr.precision == "fp8" and avail.this_machine:
        refusal = fp8_refusal(avail, str(tr.fp8_recipe), has_moe=bool(moe_layers))
        _require(refusal is None, refusal or "")
    # fp8 keeps bf16 weights and activations; Transformer Engine casts the matmul inputs.
    bf16 = tr.precision in ("bf16", "fp8") or (tr.precision == "auto" and bool(has_cuda))
    fusions = decide_fusions(avail, activation=str(m.activation), position_embedding=str(m.position_embedding),
                             normalization=str(m.normalization), mod=bool(mod_layers), fp8=tr.precision == "fp8",
                             fp8_recipe=str(tr.fp8_recipe))

    return Derived(
        world_size=world_size,
        dp=dp,
        num_microbatches=num_microbatches,
        global_batch_size=gbs,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab,
        ffn_hidden_size=ffn,
        mod_layers=mod_layers,
        mod_capacities=mod_caps,
        moe_layers=moe_layers,
        bf16=bf16,
        fusions=fusions,
    )


def _validate_recompute(cfg: Config, moe_layers: List[int]) -> None:
    """model.recompute against megatron-core's own rules (TransformerConfig.__post_init__,
    TransformerBlock._checkpointed_forward), stricter where megatron would silently do nothing."""
    rc, m, par = cfg.model.recompute, cfg.model, cfg.parallel
    modules = [str(x) for x in rc.modules]
    defaults = {"method": "uniform", "num_layers": 1, "modules": ["core_attn"]}
    if rc.granularity is None:
        changed = [k for k, v in (("method", str(rc.method)), ("num_layers", rc.num_layers), ("modules", modules))
                   if v != defaults[k]]
        _require(not changed,
                 f"model.recompute.{'/'.join(changed)} set but model.recompute.granularity is null (no recomputation): "
                 f"set model.recompute.granularity=full (method, num_layers) or selective (modules).")
        return
    per_stage = m.num_layers // (par.pp * (par.vpp or 1))  # layers of one model chunk
    if rc.granularity == "full":
        _require(modules == defaults["modules"],
                 f"model.recompute.modules={modules} is for granularity=selective; full recomputes whole layers "
                 f"(chosen by model.recompute.method and num_layers): drop model.recompute.modules.")
        _require(rc.num_layers >= 1, f"model.recompute.num_layers must be >= 1, got {rc.num_layers}.")
        if rc.method == "uniform":
            # megatron checkpoints groups of num_layers consecutive layers and indexes past the
            # stage's last layer when they do not divide it.
            _require(per_stage % rc.num_layers == 0,
                     f"model.recompute.method=uniform checkpoints groups of model.recompute.num_layers="
                     f"{rc.num_layers} layers, which must divide the {per_stage} layers of each pipeline stage "
                     f"(model.num_layers / (parallel.pp x parallel.vpp)): choose a divisor of {per_stage}.")
        else:
            _require(rc.num_layers <= per_stage,
                     f"model.recompute.method=block recomputes model.recompute.num_layers={rc.num_layers} layers per "
                     f"pipeline stage, which has {per_stage}: set model.recompute.num_layers between 1 and {per_stage}.")
        # Under fp8 megatron recomputes through Transformer Engine's checkpoint, which does not set the
        # flag a recomputed MoD layer reads to reuse its forward's top-k set (model/recompute.py).
        _require(not (m.mod.enabled and str(cfg.train.precision) == "fp8"),
                 "model.recompute.granularity=full with MoD layers and train.precision=fp8: megatron then recomputes "
                 "through Transformer Engine's checkpoint, where a MoD layer cannot reuse its forward's top-k set. "
                 "Use model.recompute.granularity=selective, or train.precision=bf16.")
        return
    # selective: megatron requires recompute_num_layers None and ignores the method.
    _require(str(rc.method) == "uniform" and rc.num_layers == 1,
             f"model.recompute.method/num_layers choose layers for granularity=full; selective recomputes "
             f"model.recompute.modules in every layer: drop model.recompute.method and num_layers.")
    _require(len(modules) > 0, "model.recompute.granularity=selective with no model.recompute.modules: name at "
                               "least one (core_attn, mlp, moe, moe_act, layernorm, shared_experts) or set "
                               "model.recompute.granularity=null.")
    moe_only = [x for x in modules if x in ("moe", "moe_act", "shared_experts")]
    _require(not moe_only or bool(moe_layers),
             f"model.recompute.modules {moe_only} recompute parts of MoE layers, and the model has none: use "
             f"core_attn, mlp or layernorm, or set model.moe.num_experts > 0.")
    _require("mlp" not in modules or len(moe_layers) < m.num_layers,
             "model.recompute.modules has mlp but every layer is an MoE layer (no dense MLP): use moe.")
    if "shared_experts" in modules:
        _require(m.moe.shared_expert_ffn_hidden_size is not None,
                 "model.recompute.modules has shared_experts but the MoE layers have none "
                 "(model.moe.shared_expert_ffn_hidden_size is null): drop shared_experts.")
        # Nested checkpoints: megatron's checkpoint flag (which a recomputed layer reads to recognise
        # the recompute) would be cleared by the inner one.
        _require("moe" not in modules,
                 "model.recompute.modules has both moe and shared_experts: recomputing the whole MoE layer "
                 "already recomputes its shared experts. Drop shared_experts.")
    if "layernorm" in modules:
        import importlib.util

        # megatron-core 0.16.1's CheckpointWithoutOutput (layernorm recompute) sets fp8 = (False is not
        # None) and so always enters Transformer Engine's fp8 state: NameError without TE.
        _require(importlib.util.find_spec("transformer_engine") is not None,
                 "model.recompute.modules has layernorm, whose recompute in megatron-core 0.16.1 needs Transformer "
                 "Engine (not installed here): drop layernorm (core_attn, mlp and moe work without it).")
    if "moe_act" in modules:
        _require(m.moe.grouped_gemm,
                 "model.recompute.modules has moe_act, which megatron-core implements only inside its grouped "
                 "expert MLP: set model.moe.grouped_gemm=true (GPU with Transformer Engine) or use moe instead.")
        from mod_train.model.expert_mlp import grouped_gemm_missing

        missing = grouped_gemm_missing()
        _require(missing is None,
                 f"model.recompute.modules has moe_act, which megatron-core implements only inside its grouped "
                 f"expert MLP, and model.moe.grouped_gemm falls back to the sequential experts here: {missing}. "
                 f"Use moe instead of moe_act.")


def _validate_fp8_shapes(cfg: Config, ffn: int, mod_caps: List[float]) -> None:
    """Transformer Engine runs an fp8 GEMM only on matrices with rows divisible by 8 and columns by 16
    (its check_dim_for_fp8_exec, for inputs and weights); otherwise it stops the run mid-step. Expert
    inputs are padded by megatron-core itself; the output layer is not fp8."""
    m, par = cfg.model, cfg.parallel
    kv = m.hidden_size // m.num_attention_heads
    widths = [("model.hidden_size", m.hidden_size), ("FFN hidden size / parallel.tp", ffn // par.tp),
              ("attention heads x head dim / parallel.tp", m.num_attention_heads * kv // par.tp)]
    for what, n in widths:
        _require(n % 16 == 0, f"train.precision=fp8: Transformer Engine's fp8 GEMMs need matrix widths divisible "
                              f"by 16, and {what} = {n}. Change the model size (or parallel.tp), or use "
                              f"train.precision=bf16.")
    rows = [("model.seq_length x parallel.micro_batch_size", m.seq_length * par.micro_batch_size)]
    rows += [(f"a MoD layer's routed tokens (capacity {c} x seq_length) x micro_batch_size",
              round(c * m.seq_length) * par.micro_batch_size) for c in sorted(set(mod_caps))]
    for what, n in rows:
        _require(n % 8 == 0, f"train.precision=fp8: Transformer Engine's fp8 GEMMs need token counts divisible by 8, "
                             f"and {what} = {n}. Change model.seq_length, parallel.micro_batch_size or the MoD "
                             f"capacity, or use train.precision=bf16.")


def _validate_resilience(cfg: Config) -> None:
    """train.max_skipped_steps, train.spike.*, train.step_timeout_s, parallel.collective_timeout_s,
    train.inject.*."""
    tr, par = cfg.train, cfg.parallel
    _require(tr.max_skipped_steps >= 1, f"train.max_skipped_steps must be >= 1, got {tr.max_skipped_steps}.")
    _require(par.collective_timeout_s > 0,
             f"parallel.collective_timeout_s must be > 0 seconds, got {par.collective_timeout_s}.")
    if tr.step_timeout_s is not None:
        _require(tr.step_timeout_s > 0, f"train.step_timeout_s must be > 0 seconds (or null: no watchdog), "
                                        f"got {tr.step_timeout_s}.")
    if tr.spike.action != "off":
        _require(tr.spike.window >= 2, f"train.spike.window must be >= 2 losses, got {tr.spike.window}.")
        _require(tr.spike.threshold_sigmas > 0,
                 f"train.spike.threshold_sigmas must be > 0, got {tr.spike.threshold_sigmas}.")
    # Skipping an update that DeepSpeed has not flagged drops the step's gradients before
    # engine.step(); under ZeRO 2/3 they are already reduced into the optimizer's partitions during
    # the backward pass (non-finite ones are dropped by DeepSpeed's own overflow check instead).
    discards = tr.spike.action == "skip" or tr.inject.skip_update_at_step is not None
    _require(not discards or par.zero_stage <= 1,
             f"train.spike.action=skip (and train.inject.skip_update_at_step) skip an update with finite gradients, "
             f"which needs parallel.zero_stage 0 or 1 (got {par.zero_stage}). Use train.spike.action=rollback or "
             f"log under ZeRO 2/3.")
    _require(tr.spike.action != "rollback" or cfg.checkpoint.save,
             "train.spike.action=rollback reloads the last checkpoint: it needs checkpoint.save=true.")
