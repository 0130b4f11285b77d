"""Layout-free model weights: megatron-core distributed checkpointing (``torch_dist`` backend).

Every GPTModel chunk describes its parameters as ``ShardedTensor``s of the *global* model
(``sharded_state_dict()``): keys use global layer numbers (``decoder.layers.7.mlp...``) and each
tensor knows which slice of the full tensor this rank holds (TP split, expert-parallel split,
replica id for DP/TP copies). A directory written by ``save_model`` under one layout (TP, PP,
virtual PP, EP, DP) therefore loads into any other: ``load_model`` asks for the slices the new
layout holds. Nothing depends on DeepSpeed or on the ZeRO stage: the weights are the module's
own parameters (fp32 on CPU; under bf16 the fp32 master copy lives in the optimizer and is
saved by ``save_optimizer``).

The chunks of one rank (virtual pipeline) are nested under ``model0``, ``model1``, ... as in
Megatron-LM; only the ShardedTensor keys matter on disk, so a vpp=2 checkpoint loads into vpp=None
and back.

Optimizer state (Adam ``exp_avg`` / ``exp_avg_sq``, plus the fp32 master weights under bf16) is
stored the same way by ``save_optimizer``: one ShardedTensor per parameter with the parameter's
own mapping and an ``optimizer.<state>.`` prefix, read from / written to DeepSpeed's ZeRO
partitions (stages 0-3) through ``deepspeed.utils.safe_{get,set}_full_*``. That is what lets
``checkpoint.resume`` continue with the optimizer state under a different layout (docs/layouts.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from mod_train.distributed.world import barrier
from mod_train.model.unwrap import unwrap_model

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # sub-directory of iter_N/ written by save_model
OPTIM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_OPTIM_PREFIX = "optimizer."
_INFO_FILE = "mod_train_model.json"


def _chunk_key(i: int) -> str:
    return f"model{i}"


def sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    """``{"model0": chunk0.sharded_state_dict(), ...}``: ShardedTensors keyed by global names.

    ``non_homogeneous_layers``: every layer is stored under its own global number
    (``decoder.layers.3.``) instead of stacked along a leading layer axis, because MoD layers carry
    a router that dense layers do not have (a stacked tensor would have holes).
    """
    return {_chunk_key(i): unwrap_model(c).sharded_state_dict(metadata={"non_homogeneous_layers": True})
            for i, c in enumerate(chunks)}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(chunks: Sequence[torch.nn.Module], directory: Union[str, Path], info: Optional[dict] = None,
               extra: Optional[dict] = None, background: Optional[Callable] = None) -> Path:
    """Write this rank's chunks into ``directory`` (all ranks call it; collective).

    ``info``: JSON-able description stored next to the tensors (config, layout, ...).
    ``extra``: more sharded entries to store alongside the model (e.g. optimizer moments).
    ``background``: write asynchronously; called with megatron's AsyncRequest, which it must
    schedule before returning (checkpoint.background.BackgroundWrites.schedule): the writer then
    holds a snapshot of the tensors as they are now.
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    state = sharded_state_dict(chunks)
    if extra:
        state.update(extra)
    _save(state, directory, background)
    if _rank() == 0 and info is not None:
        (directory / _INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    barrier()
    return directory


def _save(state: dict, directory: Path, background: Optional[Callable]) -> None:
    from megatron.core import dist_checkpointing

    if background is None:
        dist_checkpointing.save(state, str(directory), sharded_strategy=_sync_save_strategy())
        return
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    # megatron's own async strategy (same torch_dist files); one writer process per rank and request.
    background(dist_checkpointing.save(state, str(directory), async_sharded_save=True,
                                       sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)))


def _sync_save_strategy():
    """megatron's ``torch_dist`` format, written synchronously by torch.distributed.checkpoint.

    megatron's own strategy always goes through its async writer, which starts a ``spawn``
    multiprocessing manager and forks one writer process per file even for a synchronous save;
    on CPU with gloo that costs seconds per save (and re-imports the launching module). The
    files and metadata are the same, so ``dist_checkpointing.load`` reads them unchanged.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_state = mcore_to_pyt_state_dict(state, False)
            dcp_save(pyt_state, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False,
                                              can_run_decentralized_global_plan=False))

    return SyncTorchDistSave("torch_dist", 1)


def read_info(directory: Union[str, Path]) -> dict:
    p = Path(directory) / _INFO_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def is_model_dir(directory: Union[str, Path]) -> bool:
    """A directory written by dist-checkpointing (``save_model``)."""
    return (Path(directory) / "metadata.json").is_file()


def model_dir_of(path: Union[str, Path]) -> Path:
    """``path`` itself if ``save_model`` wrote it, or ``path/model`` for a training checkpoint iter_N/."""
    p = Path(path).expanduser()
    if not is_model_dir(p) and is_model_dir(p / MODEL_DIR):
        return p / MODEL_DIR
    return p


def load_model(chunks: Sequence[torch.nn.Module], directory: Union[str, Path], strict: bool = True) -> None:
    """Fill this rank's chunks from ``directory`` written by ``save_model`` under any layout (collective)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not is_model_dir(directory):
        raise FileNotFoundError(f"{directory} is not a model directory written by save_model "
                                f"(no metadata.json from megatron dist-checkpointing)")
    loaded = dist_checkpointing.load(sharded_state_dict(chunks), str(directory))
    for i, chunk in enumerate(chunks):
        state = loaded[_chunk_key(i)]
        missing, unexpected = unwrap_model(chunk).load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"{directory}: chunk {i} does not match the checkpoint: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------- optimizer state
def gathered_params(engine, modify: bool = False):
    """Context in which every parameter holds its full (TP-local) data: ZeRO-3 gathers, else no-op.
    ``modify``: what is written into the parameters inside is kept (data-parallel rank 0's copy)."""
    import contextlib

    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                                 modifier_rank=0 if modify else None)
    return contextlib.nullcontext()


def load_model_into_engine(engine, chunks: Sequence[torch.nn.Module], directory: Union[str, Path]) -> None:
    """``load_model`` into the chunks of a built engine (a rollback): ZeRO-3 shards re-partitioned.
    The optimizer's fp32 master copies follow with ``load_optimizer`` (set_optimizer_state)."""
    with gathered_params(engine, modify=True):
        load_model(chunks, directory)


def _trainable(chunks) -> List[torch.nn.Parameter]:
    seen, out = set(), []
    for c in chunks:
        for p in c.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _state_keys(engine) -> tuple:
    # Under bf16 the weights in the module are rounded; the fp32 master copy is optimizer state.
    return OPTIM_STATE_KEYS + (("fp32_param",) if engine.bfloat16_enabled() else ())


def _optimizer_request(chunks, values: Dict[int, Dict[str, torch.Tensor]]):
    """Sharded entries ``optimizer.<state>.<param key>`` holding ``values[id(param)][state]``.

    Each entry copies its parameter's mapping (TP split, PP/EP placement, replica id); a SwiGLU
    fc1 weight is a factory (stored as two halves) and is rebuilt around the optimizer tensor.
    Returns (entries, {entry name: (id(param), state)}).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    entries: dict = {}
    owner: Dict[str, tuple] = {}
    seen = set()
    for value in nested_values(sharded_state_dict(chunks)):
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            continue
        pid = id(value.data)
        if pid not in values or pid in seen:
            continue
        seen.add(pid)
        for state_key, tensor in values[pid].items():
            # Several parameters can share one checkpoint key at different offsets (megatron's
            # SequentialMLP stores every local expert under ``experts.experts.linear_fc1.weight``
            # with the expert index as a prepended axis): the entry name must still be unique.
            name = f"{_OPTIM_PREFIX}{state_key}.{value.key}"
            if name in entries:
                name = f"{name}@{len(entries)}"
            entries[name] = make_sharded_optimizer_tensor(value, tensor, prefix=f"{_OPTIM_PREFIX}{state_key}")
            owner[name] = (pid, state_key)
    missing = [pid for pid in values if pid not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameters have no entry in the model's sharded_state_dict")
    return entries, owner


def _raw_torch_optimizer(engine) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer when DeepSpeed does not partition (ZeRO stage 0, fp32), else None."""
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        return _inner_optimizer(engine)
    return None


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer whose ``state`` DeepSpeed fills (over flat fp32 partitions under ZeRO)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _ensure_optimizer_state(engine, step: Optional[int] = None) -> None:
    """Create Adam's state (zeros) if no step has run yet, and link DeepSpeed's per-param views.

    torch's AdamW creates its state lazily at the first ``step()``; DeepSpeed links the
    per-parameter fragments (``_hp_mapping.optim_fragment``) to it lazily as well. A resumed run
    writes moments before its first step, so both are done here. ``step`` (if given) sets Adam's
    step counter (bias correction) of every state entry.
    """
    opt = _inner_optimizer(engine)
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        # ZeRO-3 puts one fp32 sub-group into its param group only while stepping it: Adam's state
        # lives on the flat fp32 partitions (never created before the first step of a resumed run).
        pairs = [(t, opt.param_groups[zero.sub_group_to_group_id[i]])
                 for i, t in enumerate(zero.fp32_partitioned_groups_flat)]
    else:
        pairs = [(p, group) for group in opt.param_groups for p in group["params"]]
    for p, group in pairs:
        state = opt.state[p]
        if "exp_avg" not in state:
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device)
                             if group.get("capturable") or group.get("fused")
                             else torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if step is not None:
            state["step"].fill_(float(step))
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2, bf16 optimizer
        # Always re-link: DeepSpeed 0.19.8 links after stepping the FIRST param group only, so the
        # views of later groups (our no-weight-decay group) stay empty for the whole run.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def get_optimizer_state(engine, chunks) -> Dict[int, Dict[str, torch.Tensor]]:
    """id(param) -> {exp_avg, exp_avg_sq[, fp32_param]}: fp32, the parameter's (TP-local) shape.

    Collective over the data-parallel group under ZeRO (DeepSpeed gathers the partitions).
    Call inside ``gathered_params(engine)``.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _ensure_optimizer_state(engine)
    raw = _raw_torch_optimizer(engine)
    out: Dict[int, Dict[str, torch.Tensor]] = {}
    for p in _trainable(chunks):
        entry = {}
        for key in _state_keys(engine):
            if raw is not None:
                value = raw.state[p][key]
            elif key == "fp32_param":
                value = safe_get_full_fp32_param(p)
            else:
                value = safe_get_full_optimizer_state(p, key)
            if value is None:
                raise RuntimeError(f"DeepSpeed holds no '{key}' for a parameter of shape {tuple(p.shape)}")
            entry[key] = value.detach().float().reshape(p.shape).clone()
        out[id(p)] = entry
    return out


def set_optimizer_state(engine, chunks, values: Dict[int, Dict[str, torch.Tensor]], step: int) -> None:
    """Write per-parameter state into DeepSpeed's optimizer partitions and set Adam's step count."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _ensure_optimizer_state(engine, step)
    raw = _raw_torch_optimizer(engine)
    for p in _trainable(chunks):
        for key, value in values[id(p)].items():
            if raw is not None:
                raw.state[p][key].copy_(value.reshape(raw.state[p][key].shape))
            elif key == "fp32_param":
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
        if raw is None and "fp32_param" not in values[id(p)]:
            # fp32 under ZeRO: the optimizer steps its own fp32 partition, a copy of the weights made
            # when the engine was built; after a rollback it must be the reloaded weights.
            safe_set_full_fp32_param(p, p.detach().float())
    if "fp32_param" in _state_keys(engine) and hasattr(engine.optimizer, "update_lp_params"):
        engine.optimizer.update_lp_params()  # module weights = the restored fp32 masters


def save_optimizer(engine, chunks: Sequence[torch.nn.Module], directory: Union[str, Path],
                   background: Optional[Callable] = None) -> Path:
    """Adam moments (and fp32 masters under bf16) of every parameter, layout-free (collective).
    ``background``: as for ``save_model`` (the values are copies already: get_optimizer_state clones)."""
    directory = Path(directory)
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    with gathered_params(engine):
        entries, _ = _optimizer_request(chunks, get_optimizer_state(engine, chunks))
        _save(entries, directory, background)
    barrier()
    return directory


def load_optimizer(engine, chunks: Sequence[torch.nn.Module], directory: Union[str, Path], step: int) -> None:
    """Read ``save_optimizer``'s directory (written under any layout) into this engine (collective)."""
    from megatron.core import dist_checkpointing

    with gathered_params(engine):
        keys = _state_keys(engine)
        templates = {id(p): {k: torch.zeros(p.shape, dtype=torch.float32) for k in keys} for p in _trainable(chunks)}
        entries, owner = _optimizer_request(chunks, templates)
        loaded = dist_checkpointing.load(entries, str(directory))
        values: Dict[int, Dict[str, torch.Tensor]] = {pid: {} for pid in templates}
        for name, tensor in loaded.items():
            if name in owner:
                pid, key = owner[name]
                values[pid][key] = tensor
        incomplete = [pid for pid, v in values.items() if set(v) != set(keys)]
        if incomplete:
            raise RuntimeError(f"{directory}: optimizer state missing for {len(incomplete)} parameters")
        set_optimizer_state(engine, chunks, values, step)


def plain_tensors(directory: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Every model tensor of a ``save_model`` directory, unsharded, by its dist-checkpoint key
    (global layer numbers; norms under the names megatron maps them to, e.g.
    ``self_attention.linear_qkv.layer_norm_weight``). For GPTModel state-dict names use export.py."""
    from megatron.core.dist_checkpointing import load_plain_tensors

    plain = load_plain_tensors(str(directory))
    return {k: v for k, v in plain.items() if not k.startswith(_OPTIM_PREFIX) and torch.is_tensor(v)}


