"""Typed configuration for every Hydra group.

Each dataclass is the schema of one group under ``conf/``. Hydra merges the YAML files
onto these types, so an unknown key, a wrong type or a value outside a :class:`Choice` fails at
start with the key named.
Cross-field rules (layout vs world size, heads vs TP, ...) live in ``validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """A string option with a fixed set of values, checked by OmegaConf when the config is composed.

    OmegaConf matches a YAML/override string against the member NAMES, so every member is named
    exactly as its value (``sigmoid = "sigmoid"``). A member is a ``str``: it compares and hashes
    equal to its value (``cfg.model.mod.router_weight == "sigmoid"``), and ``str()`` / f-strings
    give the value (Python 3.11 would otherwise print ``RouterWeight.sigmoid``).
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class RouterWeight(Choice):
    """How the MoD router score scales the block output of a routed token."""

    sigmoid = "sigmoid"
    logit = "logit"
    none = "none"  # tests only: the router then gets no gradient


class CausalRouting(Choice):
    """The causal decision used at sampling time."""

    aux_loss = "aux_loss"  # BCE on the router's sigmoid
    predictor = "predictor"  # a small MLP on a stop-gradient copy of the layer input


class TokenDispatcher(Choice):
    alltoall = "alltoall"
    allgather = "allgather"


class LoadBalancing(Choice):
    """How an MoE router keeps its experts evenly loaded (megatron-core's implementations)."""

    aux_loss = "aux_loss"  # GShard/Switch load-balancing loss over the micro-batch
    seq_aux_loss = "seq_aux_loss"  # the same loss per sequence (DeepSeek-V2/V3)
    # Aux-loss-free (arXiv 2408.15664): a per-expert bias added to the sigmoid scores for the top-k
    # selection only, moved by bias_update_rate after each applied step towards balanced load.
    expert_bias = "expert_bias"
    none = "none"  # no balancing


class MoDEMode(Choice):
    """MoDE variants (MoD paper §3.5)."""

    none = "none"
    staged = "staged"
    integrated = "integrated"


class RecomputeGranularity(Choice):
    """megatron-core's recompute_granularity (null in the config: no recomputation)."""

    full = "full"  # whole transformer layers, chosen by method / num_layers
    selective = "selective"  # the submodules in model.recompute.modules, in every layer


class RecomputeMethod(Choice):
    """megatron-core's recompute_method (full granularity only)."""

    uniform = "uniform"  # checkpoint every group of num_layers consecutive layers
    block = "block"  # checkpoint the first num_layers layers of each pipeline stage, keep the rest


class RecomputeModule(Choice):
    """megatron-core's recompute_modules (selective granularity), named as megatron names them.
    ``mla_up_proj`` is left out: mod-train has no multi-latent attention."""

    core_attn = "core_attn"  # the attention kernel (softmax(QK^T)V)
    mlp = "mlp"  # the dense MLP
    moe = "moe"  # the whole MoE layer (router, dispatch, experts)
    moe_act = "moe_act"  # the activation inside megatron's grouped expert MLP
    layernorm = "layernorm"  # input and pre-MLP norms (outputs discarded, recomputed in backward)
    shared_experts = "shared_experts"  # an MoE layer's shared experts


class Normalization(Choice):
    RMSNorm = "RMSNorm"
    LayerNorm = "LayerNorm"


class Activation(Choice):
    swiglu = "swiglu"
    gelu = "gelu"


class PositionEmbedding(Choice):
    rope = "rope"
    learned_absolute = "learned_absolute"


class LRSchedule(Choice):
    cosine = "cosine"
    constant = "constant"
    wsd = "wsd"


class Precision(Choice):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    # bf16 weights, matmuls in Transformer Engine's fp8 (GPUs with fp8 tensor cores; refused elsewhere)
    fp8 = "fp8"


class Fp8Recipe(Choice):
    """How Transformer Engine scales fp8 tensors (train.precision=fp8)."""

    delayed = "delayed"  # scale from the amax history of earlier steps (megatron's "delayed")
    current = "current"  # scale from this tensor's own amax (megatron's "tensorwise"; TE >= 2.2)


class ContainerRuntime(Choice):
    none = "none"
    pyxis = "pyxis"
    apptainer = "apptainer"


class TokenizerModelType(Choice):
    bpe = "bpe"
    unigram = "unigram"


class Rendezvous(Choice):
    c10d = "c10d"
    static = "static"


class SpikeAction(Choice):
    off = "off"  # no spike detection (no per-step loss reduction)
    log = "log"  # count and log spikes, apply the update
    skip = "skip"  # skip the spiking step's update
    rollback = "rollback"  # reload the last checkpoint, skip the data of the spike window


@dataclass
class CapacitySchedule:
    steps: int = 0
    phases: int = 4


@dataclass
class ModConfig:
    """Mixture-of-Depths routing (Raposo et al. 2024). Off by default: a dense model."""

    enabled: bool = False
    # Which layers are MoD: an explicit list of 0-based layer indices wins; otherwise every
    # `every`-th layer starting at `offset` (every=2, offset=1: layers 1, 3, 5, ... as in the paper).
    layers: Optional[List[int]] = None
    every: int = 2
    offset: int = 1
    # Fraction of the sequence routed through the block; k = round(capacity * seq_len).
    capacity: float = 0.125
    # Optional per-layer capacities, aligned with the resolved list of MoD layers.
    capacities: Optional[List[float]] = None
    # How the router score scales the block output of a routed token: "sigmoid", "logit" or "none"
    # ("none" only makes sense for tests: the router then gets no gradient).
    router_weight: RouterWeight = RouterWeight.sigmoid
    # Causal decision used at sampling time: "aux_loss" (BCE on the router's sigmoid) or
    # "predictor" (a small MLP on a stop-gradient copy of the layer input).
    causal: CausalRouting = CausalRouting.aux_loss
    aux_loss_coeff: float = 0.01
    predictor_hidden: int = 0  # 0: hidden_size // 8
    # Calibrated causal routing: each MoD layer keeps a threshold on its causal logits, a running
    # estimate (this rate per step; 0 keeps it at 0, i.e. `logit > 0`) of the (1 - capacity)
    # quantile of the causal logits, so that the causal decision routes the trained share of
    # tokens. Saved with the model; used by causal validation and mod-generate.
    threshold_update_rate: float = 0.05
    # causal=aux_loss: the BCE gradient reaches the router weight AND, through the router's input,
    # the residual stream. true: the BCE sees a detached input (the weight still learns from it).
    aux_loss_detach_input: bool = False
    # Capacity schedule (a MoD twin upcycled from a dense model learns to skip gradually): the
    # capacity of every MoD layer falls from 1.0 to its target in equal phases over the first
    # capacity_schedule.steps steps (k static within a phase); steps=0: the target from the start.
    capacity_schedule: CapacitySchedule = field(default_factory=CapacitySchedule)


@dataclass
class MoEConfig:
    """Mixture-of-Experts MLP (megatron-core's MoE layer). num_experts=0: no MoE."""

    num_experts: int = 0
    layers: Optional[List[int]] = None
    every: int = 1
    offset: int = 0
    top_k: int = 2
    aux_loss_coeff: float = 0.01
    z_loss_coeff: Optional[float] = None
    capacity_factor: Optional[float] = None  # None: dropless
    token_dispatcher: TokenDispatcher = TokenDispatcher.alltoall
    ffn_hidden_size: Optional[int] = None
    shared_expert_ffn_hidden_size: Optional[int] = None
    # MoDE variants (MoD paper §3.5): "none" | "staged" | "integrated"
    mode: MoDEMode = MoDEMode.none
    # Integrated MoDE: no-op columns in the router besides the experts. None: top_k, so that a
    # token can send all its top_k slots to no-ops and skip the MLP entirely (one column cannot:
    # top-k picks distinct columns).
    num_noop_experts: Optional[int] = None
    # aux_loss | seq_aux_loss (both weighted by aux_loss_coeff) | expert_bias | none. expert_bias
    # scores experts with a sigmoid (megatron requires it) and ignores aux_loss_coeff.
    load_balancing: LoadBalancing = LoadBalancing.aux_loss
    # expert_bias: each applied step moves every expert's bias by this much (sign of its load
    # deficit over the global batch); megatron's moe_router_bias_update_rate.
    bias_update_rate: float = 1e-3
    # megatron-core's grouped expert MLP (TEGroupedMLP: one grouped GEMM for all local experts)
    # where Transformer Engine provides it; elsewhere the sequential experts, said once at start.
    grouped_gemm: bool = False


@dataclass
class RecomputeConfig:
    """Activation recomputation through megatron-core's own (TransformerConfig.recompute_*):
    activations are dropped in the forward pass and recomputed in the backward pass. A recomputed
    MoD layer reuses the top-k selection of its forward pass (model/recompute.py)."""

    granularity: Optional[RecomputeGranularity] = None  # null: off
    method: RecomputeMethod = RecomputeMethod.uniform  # full only
    # full + uniform: layers per checkpointed group (divides the layers of a pipeline stage);
    # full + block: layers recomputed per pipeline stage (virtual stage with parallel.vpp).
    num_layers: int = 1
    modules: List[RecomputeModule] = field(default_factory=lambda: [RecomputeModule.core_attn])  # selective only


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (= heads)
    ffn_hidden_size: Optional[int] = None  # None: 4 x hidden (gelu) or 8/3 x hidden rounded (swiglu)
    seq_length: int = 64
    # None: taken from the tokenizer. If set, it must match the tokenizer exactly.
    vocab_size: Optional[int] = None
    # The embedding table is padded to a multiple of this (independent of TP, see validate.pad_vocab).
    make_vocab_size_divisible_by: int = 128
    normalization: Normalization = Normalization.RMSNorm
    activation: Activation = Activation.swiglu
    position_embedding: PositionEmbedding = PositionEmbedding.rope
    rotary_base: int = 10000
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool = False
    mod: ModConfig = field(default_factory=ModConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved schedule)
    ep: int = 1
    # Expert tensor parallel size: how many ranks split each expert's weights (megatron-core's
    # expert_tensor_parallel_size); None: the dense TP size. A value other than parallel.tp needs
    # parallel.ep > 1 (see validate.py).
    etp: Optional[int] = None
    cp: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 1
    micro_batch_size: int = 2
    # Samples per optimizer step over all data-parallel ranks; None = micro x DP (no accumulation).
    global_batch_size: Optional[int] = None
    # How long a collective may wait before the process group raises (torch.distributed timeout).
    collective_timeout_s: float = 1800.0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    schedule: LRSchedule = LRSchedule.cosine
    decay_steps: Optional[int] = None  # None: train.max_steps
    wsd_decay_fraction: float = 0.2  # WSD: fraction of decay_steps spent in the final decay


@dataclass
class DataConfig:
    # Required unless ``mock``.
    tokenizer_model: Optional[str] = MISSING
    # Indexed dataset prefixes (path without .bin/.idx) and optional blending weights.
    paths: List[str] = field(default_factory=list)
    weights: Optional[List[float]] = None
    split: str = "98,2,0"
    seed: int = 1234
    cache_dir: Optional[str] = None  # None: <run_dir>/data_cache
    # Synthetic tokens from megatron-core's MockGPTDataset (Megatron-LM's --mock-data), for
    # benchmarks and smoke tests: no tokenizer or data files; model.vocab_size sets the vocabulary.
    mock: bool = False
    # Packed sequences hold several documents separated by the tokenizer's EOD token. Each option
    # is megatron-core's GPTDataset option of the same name (Megatron-LM's --reset-position-ids,
    # --reset-attention-mask, --eod-mask-loss): positions restart after every EOD (learned absolute
    # position embeddings only: rope is relative, see README "Packed documents"), attention stays
    # inside a document (a per-sample [s, s] mask travels with the batch), the loss skips positions
    # whose input token is EOD (their target, the next document's first token, cannot be predicted).
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class SpikeConfig:
    # A loss above the mean of the last ``window`` accepted losses by ``threshold_sigmas``
    # standard deviations is a spike; ``action`` says what happens then.
    action: SpikeAction = SpikeAction.off
    threshold_sigmas: float = 6.0
    window: int = 50


@dataclass
class InjectConfig:
    """Test-only faults (all null in real runs): what the resilience tests inject."""

    nan_loss_at_step: Optional[int] = None  # the loss of this step becomes NaN
    spike_loss_at_step: Optional[int] = None  # the loss of this step is multiplied by spike_factor
    spike_factor: float = 100.0
    skip_update_at_step: Optional[int] = None  # skip this step's update (finite loss): reference runs
    hang_at_step: Optional[int] = None  # sleep (hang) at the start of this step
    hang_s: float = 3600.0
    # Each background checkpoint write (checkpoint.async_save) sleeps this long before writing, so a
    # test can kill -9 the job while a write is in flight.
    checkpoint_write_delay_s: Optional[float] = None
    ranks: Optional[List[int]] = None  # the global ranks the faults apply to (None: all)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    max_steps: int = 100
    # Stop this invocation after this many steps (saving a checkpoint first), like Megatron's
    # --exit-interval. A later invocation with checkpoint.resume=auto carries on.
    exit_interval: Optional[int] = None
    log_interval: int = 1
    eval_interval: int = 50
    eval_iters: int = 2
    seed: int = 1234
    precision: Precision = Precision.auto  # auto: bf16 on GPU, fp32 on CPU
    fp8_recipe: Fp8Recipe = Fp8Recipe.delayed  # only read with precision=fp8
    # Peak dense matmul TFLOP/s of one device, for MFU; None: looked up for known GPUs.
    peak_tflops: Optional[float] = None
    # Console output of ranks other than 0 (stdout, warnings, INFO logs): off keeps them quiet
    # (errors still show); MOD_TRAIN_LOGLEVEL=INFO/DEBUG also turns it on.
    log_all_ranks: bool = False
    # Resilience. A non-finite loss or gradient skips the update on every rank (one small
    # all-reduce per step); the run stops after max_skipped_steps skipped updates in a row.
    skip_nonfinite: bool = True
    max_skipped_steps: int = 10
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # A rank whose step (or evaluation, or checkpoint) runs longer than this dumps every thread's
    # stack to <run_dir>/watchdog/ and exits non-zero, so a requeued job resumes from the last
    # checkpoint. None: no watchdog.
    step_timeout_s: Optional[float] = None
    inject: InjectConfig = field(default_factory=InjectConfig)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    save_interval: int = 50
    # false: never write checkpoints (benchmarks); a stop signal then ends the run without one.
    save: bool = True
    keep_last: int = 2
    resume: str = "auto"  # "auto" | "none" | a checkpoint directory
    # Start from these weights instead of the random init (ignored when resuming): a directory written
    # by mod_train.checkpoint.model_io.save_model, or a checkpoint iter_N/ (its model/), any layout.
    init_from: Optional[str] = None
    # Write the checkpoint in the background: the loop waits only for a host snapshot of the state
    # (megatron dist-checkpointing's async save); the checkpoint becomes `latest` once every rank's
    # write has finished (checked at the following steps, the next save, or the end of the run).
    async_save: bool = False
    # Also write DeepSpeed's own files (state/): a second copy of weights and optimizer state that
    # resume does not need (model/ + optimizer/ + rng/ resume bitwise and reshard); for tools that
    # read DeepSpeed's format (zero_to_fp32). Synchronous only.
    deepspeed_files: bool = False


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None: a local store under the working directory
    experiment: str = "mod-train"
    run_name: Optional[str] = None
    # Also write the metrics as TensorBoard event files to <run_dir>/tensorboard (needs the
    # `tensorboard` extra: pip install -e '.[tensorboard]').
    tensorboard: bool = False


@dataclass
class SlurmContainerConfig:
    """Run every node's torchrun in a container: ``pyxis`` (srun --container-image) or ``apptainer``."""

    runtime: ContainerRuntime = ContainerRuntime.none
    image: Optional[str] = None
    mounts: List[str] = field(default_factory=list)  # "src:dst" (pyxis) or apptainer --bind specs
    args: List[str] = field(default_factory=list)  # extra srun (pyxis) or `apptainer exec` flags


@dataclass
class SlurmPrepConfig:
    """`mod-submit prep`: data preparation as Slurm jobs (tokenizer, tokenization array, merge)."""

    # Input files/globs/directories; every resulting file is one task of the tokenization array.
    inputs: List[str] = field(default_factory=list)
    vocab_size: int = 32000
    model_type: TokenizerModelType = TokenizerModelType.bpe
    text_key: str = "text"
    max_sentences: int = 0  # tokenizer training on a random sample of N lines (0: all)
    shard_dir: Optional[str] = None  # None: <data.paths[0]>_shards
    cpus_per_task: int = 4
    time: str = "04:00:00"
    partition: Optional[str] = None  # None: slurm.partition (prep needs no GPUs: a CPU partition is fine)
    array_parallelism: Optional[int] = None  # at most N array tasks at once (sbatch --array=...%N)


@dataclass
class SlurmConfig:
    """`mod-submit`: how a run is laid out on a Slurm allocation (see docs/slurm.md).

    Read only by ``launch/slurm.py``; the trainer ignores it.
    """

    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU cluster (gloo), ranks per node from procs_per_node
    procs_per_node: Optional[int] = None  # ranks per node; None: gpus_per_node, or 1 without GPUs
    cpus_per_task: Optional[int] = None  # CPUs of each node's task (all its ranks); None: Slurm's default
    mem: Optional[str] = None  # --mem per node, e.g. "0" (all) or "480G"
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    require_partition: bool = False  # the cluster has no default partition: fail at submit without one
    require_account: bool = False
    exclusive: bool = False
    gpu_directive: str = "gpus-per-node"  # "gpus-per-node" | "gres" (--gres=gpu:N, older clusters)
    job_name: Optional[str] = None  # None: the run directory's name
    # Pre-emption: Slurm sends SIGUSR1 to the batch shell `signal_seconds` before the time limit;
    # the trainer checkpoints at the end of the current step and the job requeues itself.
    signal_seconds: int = 300
    requeue: bool = True
    max_requeues: int = 3  # consecutive requeues without a new checkpoint before giving up
    rendezvous: Rendezvous = Rendezvous.c10d  # torchrun's; the host is the allocation's first node
    master_port: Optional[int] = None  # None: 20000 + job id % 20000
    python: Optional[str] = None  # interpreter on the nodes; None: the one running mod-submit
    workdir: Optional[str] = None  # None: the directory mod-submit runs in
    setup: List[str] = field(default_factory=list)  # shell lines run first (module load ..., source ...)
    env: Dict[str, str] = field(default_factory=dict)  # exported in the job (NCCL_*, ...)
    sbatch_args: List[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. ["--constraint=h100"]
    srun_args: List[str] = field(default_factory=list)
    torchrun_args: List[str] = field(default_factory=list)
    template: Optional[str] = None  # None: slurm/train.sbatch.tmpl
    container: SlurmContainerConfig = field(default_factory=SlurmContainerConfig)
    prep: SlurmPrepConfig = field(default_factory=SlurmPrepConfig)


@dataclass
class LmEvalConfig:
    # lm-evaluation-harness during training (extra `hf`): task names or local task YAML files, run
    # on rank 0 after every `interval`-th step (all ranks wait; TP=PP=EP=1, rank 0 holds the whole
    # model), scored with the causal forward; logged as lm_eval/<task>/<metric>. interval=0: off.
    tasks: List[str] = field(default_factory=list)
    interval: int = 0
    limit: Optional[int] = None  # at most N documents per task


@dataclass
class EvalConfig:
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
