"""mod_train.compat: the registry (families, when each patch applies), upstream checks,
idempotence, RNG tracker semantics, and a single-process (gloo, world size 1) megatron GPTModel
forward+backward on CPU."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from mod_train import compat
from mod_train.compat import PATCHES, Family, Patch, PatchRegistry, UpstreamChanged, apply_cpu_patches
from mod_train.compat.patch import is_marked
from mod_train.compat.rng import FORK_WARNING, DropForkCpuRngWarning
from mod_train.compat.torch_shim import CPU_TORCH
from mod_train.distributed.world import default_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only adapter")

ALL_NAMES = tuple(p.name for p in PATCHES)


@pytest.fixture(scope="module", autouse=True)
def cpu_patches():
    return apply_cpu_patches()


@pytest.fixture(scope="module")
def gloo_world():
    """A world of one (gloo) with megatron's parallel_state at TP=PP=EP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tests.helpers import free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    yield
    ps.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("patch", PATCHES, ids=ALL_NAMES)
def test_upstream_check_passes(patch):
    patch.upstream_check()  # also after apply: checks look at the upstream objects


def test_patch_names_unique_and_documented():
    assert len(set(ALL_NAMES)) == len(ALL_NAMES) == 23
    assert all(p.target and isinstance(p.family, Family) for p in PATCHES)
    # The one adaptation that is not about the CPU is named as such, and only it.
    assert [(p.name, p.family) for p in PATCHES if not p.cpu_only] == [("moe-te-general-gemm", Family.no_te)]
    assert {p.family for p in PATCHES} == set(Family)
    assert sum(p.name.startswith("cuda-device:") for p in PATCHES) == 13  # the device-site table


def test_upstream_check_fails_loudly_when_upstream_changes(monkeypatch):
    """A megatron upgrade that drops the CUDA call under a patch must fail, not pass silently."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    real_getsource = inspect.getsource

    def edited(obj):
        src = real_getsource(obj)
        if obj is rotary_pos_embedding:
            src = src.replace("torch.cuda.current_device()", "self.inv_freq.device")
        return src

    monkeypatch.setattr(inspect, "getsource", edited)
    patch = next(p for p in PATCHES if p.name.endswith("rotary_pos_embedding"))
    with pytest.raises(UpstreamChanged, match="rotary_pos_embedding"):
        patch.upstream_check()


def test_apply_is_idempotent(cpu_patches):
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    assert cpu_patches == ALL_NAMES
    setup = LanguageModule.setup_embeddings_and_output_layer
    norm_new = WrappedTorchNorm.__new__
    assert apply_cpu_patches() == ALL_NAMES
    assert apply_cpu_patches() == compat.applied_patches() == ALL_NAMES
    assert compat.apply_missing_te_patches() == ("moe-te-general-gemm",)  # already in effect
    assert compat.applied_patches() == ALL_NAMES
    # Nothing wrapped twice.
    assert LanguageModule.setup_embeddings_and_output_layer is setup
    assert not is_marked(setup.__wrapped__)
    assert WrappedTorchNorm.__new__ is norm_new
    assert random.torch is CPU_TORCH
    filters = logging.getLogger(random.__name__).filters
    assert sum(isinstance(f, DropForkCpuRngWarning) for f in filters) == 1


def _recording_registry(setup: dict):
    """The real patch list with applies that only record, on a setup the test controls."""
    applied = []
    patches = [Patch(p.name, p.family, p.target, lambda n=p.name: applied.append(n), p.upstream_check,
                     p.cpu_only) for p in PATCHES]
    return PatchRegistry(patches, cuda_available=lambda: setup["cuda"],
                         te_available=lambda: setup["te"]), applied


def test_gpu_with_te_patches_nothing_gpu_without_te_only_the_no_te_family():
    setup = {"cuda": True, "te": True}
    registry, applied = _recording_registry(setup)
    assert registry.apply_cpu() == () and registry.apply_missing_te() == () and applied == []
    setup["te"] = False  # a GPU image without Transformer Engine
    assert registry.apply_cpu() == ()
    assert registry.apply_missing_te() == ("moe-te-general-gemm",)
    assert applied == ["moe-te-general-gemm"] and registry.applied() == ("moe-te-general-gemm",)
    setup["cuda"] = False  # CPU: everything, each once
    assert registry.apply_cpu() == registry.applied() == ALL_NAMES  # registry order
    assert sorted(applied) == sorted(ALL_NAMES) and len(applied) == len(ALL_NAMES)


def test_registry_refuses_duplicate_names_and_names_unknown_ones():
    with pytest.raises(ValueError, match="duplicate"):
        PatchRegistry([PATCHES[0], PATCHES[0]])
    with pytest.raises(KeyError, match="rng-state"):
        compat.REGISTRY.get("no-such-patch")
    assert compat.REGISTRY.get("rng-state") is PATCHES[0]


def test_default_device(monkeypatch):
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cuda", 3)


# ------------------------------------------------------------------ the CPU torch namespace


def test_patched_modules_see_cpu_as_the_cuda_device():
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import GlobalMemoryBuffer

    t = CPU_TORCH
    assert t.zeros(2, device="cuda").device.type == "cpu"
    assert t.empty(2, device=torch.device("cuda", 1)).device.type == "cpu"
    assert t.ones(2, device=0).device.type == "cpu"  # a bare ordinal means a CUDA device
    assert t.tensor([1], device=t.cuda.current_device()).device.type == "cpu"
    assert t.cuda.is_available() is False  # everything not adapted is the real torch.cuda
    assert t.Tensor is torch.Tensor and t.nn is torch.nn
    assert t.cuda.current_stream() == t.cuda.Stream()
    t.cuda.synchronize()
    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool and mask[0, 1] and not mask[1, 0]
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.shape == (2, 3) and buf.device.type == "cpu"
    # torch itself is untouched.
    assert torch.cuda.current_device is not t.cuda.current_device


def test_alltoall_split_sizes_become_numpy_like_on_gpu():
    import numpy as np
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 1]
    t = torch.tensor([3, 1])
    assert token_dispatcher.maybe_move_tensor_to_cpu(t) is t


def test_sequence_parallel_torch_norm_marks_params_for_tp_grad_reduction():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                            normalization="RMSNorm", sequence_parallel=True,
                            tensor_model_parallel_size=2)
    norm = WrappedTorchNorm(cfg, 8)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert cfg.sequence_parallel  # the caller's config is not modified
    plain = WrappedTorchNorm(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2), 8)
    assert isinstance(plain, torch.nn.LayerNorm)
    assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())


def test_moe_aux_loss_tracker_initialises_on_cpu(gloo_world):
    from megatron.core.transformer.moe import moe_utils

    total = {}
    moe_utils.track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=total,
                                force_initialize=True, track_names=["load_balancing_loss"],
                                num_layers=2)
    assert total["load_balancing_loss"].device.type == "cpu"


def _gloo_threads() -> int:
    import os

    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "gloo_tcp_loop"
               for t in os.listdir("/proc/self/task"))


def test_initializing_parallel_state_again_reuses_its_process_groups(gloo_world):
    """reuse-process-groups: megatron's destroy_model_parallel leaves its groups alive (each gloo
    group with a thread polling 100 times a second); initializing again with the same layout hands
    back the same groups instead of a new set; asking for more (megatron's gloo side-groups) makes
    only those, and once megatron destroys them they are made anew; after the default group is
    replaced nothing of the old world is handed out."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tests.helpers import free_port

    def groups():
        return {"tp": ps.get_tensor_model_parallel_group(), "dp": ps.get_data_parallel_group(),
                "ep": ps.get_expert_model_parallel_group(), "mp": ps.get_model_parallel_group()}

    first, threads = groups(), _gloo_threads()
    assert threads >= len(first)  # one transport thread per gloo group this rank is in
    for _ in range(3):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    assert groups() == first and _gloo_threads() == threads
    dist.all_reduce(torch.ones(1), group=ps.get_tensor_model_parallel_group())  # a live group

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, create_gloo_process_groups=True)  # adds the gloo side-groups
    assert groups() == first and _gloo_threads() > threads
    ps.destroy_model_parallel()  # destroys its gloo side-groups: c10d no longer holds them
    ps.initialize_model_parallel(1, 1, create_gloo_process_groups=True)  # so they are made anew
    dist.all_reduce(torch.ones(1), group=ps.get_data_parallel_group_gloo())
    ps.destroy_model_parallel()

    world = dist.group.WORLD
    dist.destroy_process_group()  # a new world: none of the old groups may come back
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        assert dist.group.WORLD is not world
        assert all(g is not first[k] for k, g in groups().items())
        dist.all_reduce(torch.ones(1), group=ps.get_tensor_model_parallel_group())
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)  # as gloo_world left it


# ------------------------------------------------------------------ RNG tracker


def _seed(seed: int, tp_rank: int = 0) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)


def _draw(name=None, n=4):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    if name is None:
        return torch.rand(n)
    with get_cuda_rng_tracker().fork(name):
        return torch.rand(n)


def test_fork_streams_are_independent_and_reproducible():
    mp, ep = "model-parallel-rng", "expert-parallel-rng"
    _seed(7)
    a1, a2, b1, d1 = _draw(mp), _draw(mp), _draw(ep), _draw()
    _seed(7)  # same draws in another interleaving: each named stream is its own generator
    b1_, d1_, a1_, a2_ = _draw(ep), _draw(), _draw(mp), _draw(mp)
    for x, y in [(a1, a1_), (a2, a2_), (b1, b1_), (d1, d1_)]:
        assert torch.equal(x, y)
    assert not torch.equal(a1, a2) and not torch.equal(a1, b1) and not torch.equal(a1, d1)


def test_fork_restores_the_default_cpu_generator(caplog):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    _seed(11)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        with get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
            torch.nn.functional.dropout(torch.ones(8), p=0.5, training=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(inside, torch.rand(3))
    assert FORK_WARNING not in caplog.text


def test_model_parallel_seed_depends_on_tp_rank():
    _seed(5, tp_rank=0)
    tp0, dp0 = _draw("model-parallel-rng"), _draw("data-parallel-rng")
    _seed(5, tp_rank=1)
    tp1, dp1 = _draw("model-parallel-rng"), _draw("data-parallel-rng")
    assert not torch.equal(tp0, tp1)
    assert torch.equal(dp0, dp1)


def test_tracker_states_save_and_restore(tmp_path):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    _seed(3)
    _draw("model-parallel-rng")
    path = tmp_path / "rng.pt"
    torch.save(get_cuda_rng_tracker().get_states(), path)
    expected = _draw("model-parallel-rng")
    _seed(99)  # clobber
    get_cuda_rng_tracker().set_states(torch.load(path))
    assert torch.equal(_draw("model-parallel-rng"), expected)


def test_activation_recompute_replays_forked_dropout():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    def block(x):
        with get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x * 3.0, p=0.5, training=True)

    _seed(21)
    x = torch.randn(64, requires_grad=True)
    block(x).sum().backward()
    plain = x.grad.clone()
    _seed(21)
    x.grad = None
    tensor_parallel.checkpoint(block, False, x).sum().backward()
    assert torch.equal(x.grad, plain)


# ------------------------------------------------------------------ GPTModel, world size 1


def test_gpt_model_forward_backward_single_process(gloo_world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        hidden_dropout=0.1, attention_dropout=0.1, use_cpu_initialization=True,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
    )
    _seed(1234)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16,
                     position_embedding_type="rope")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    _seed(1)
    loss, grads = step()
    assert torch.isfinite(loss) and 3.0 < loss.item() < 5.5  # ~ln(64) at init
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.device.type == "cpu" for p in model.parameters())
    _seed(1)  # same RNG states -> same dropout masks (through forks and recompute)
    loss_again, grads_again = step()
    assert torch.equal(loss, loss_again)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    _seed(2)
    assert not torch.equal(step()[0], loss)  # dropout is live
