"""The ``torch`` a patched megatron module sees on a CPU-only build (:data:`CPU_TORCH`).

Most CPU adaptations are "give one megatron module a ``torch`` namespace whose ``cuda`` attribute
means the CPU": the module's code is unchanged, only its global name ``torch`` is rebound, so
nothing outside that module sees a different torch.

Semantics: "the current CUDA device" is the CPU, "the CUDA default generator" is torch's default
CPU generator, and there is one stream (CPU ops run in program order).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from mod_train.compat.patch import UpstreamChanged, module, set_attr, upstream_attr

__all__ = ["CPU_TORCH", "check_torch_global", "install_cpu_torch", "is_cuda_device"]


def is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    # A bare int is a CUDA ordinal to torch (device=0 means cuda:0).
    return isinstance(device, int) and not isinstance(device, bool)


class _SerialEvent:
    """Event on the only CPU "stream": everything before it has already happened."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _SerialStream:
    """CPU ops run in program order, so there is exactly one stream: all instances are equal
    (the MoE alltoall dispatcher compares ``current_stream()`` with its side stream and would
    otherwise call ``Tensor.record_stream``, which CPU tensors do not have)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _SerialEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _SerialStream)

    def __hash__(self) -> int:
        return hash(_SerialStream)


class _CpuCudaNamespace(types.ModuleType):
    """What ``torch.cuda`` means inside a patched megatron module on a CPU-only build.

    Only the names megatron's training path calls are redefined; everything else is the real
    ``torch.cuda`` (so e.g. ``is_available()`` still says False).
    """

    Stream = _SerialStream
    Event = _SerialEvent

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda as seen by megatron modules on a CPU-only build")

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None) -> None:
        pass  # CPU collectives (gloo) and kernels are synchronous

    @staticmethod
    def current_stream(device=None) -> _SerialStream:
        return _SerialStream()

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext(stream)

    # "The CUDA default generator" is torch's default CPU generator.
    @staticmethod
    def get_rng_state(device="cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


# Tensor factories whose ``device=`` may be a "cuda" literal in megatron (e.g. schedules.py
# ``torch.zeros([], dtype=torch.int, device="cuda")``, transformer/utils.py causal masks).
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_like", "zeros_like", "ones_like", "full_like",
)


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return factory


class _CpuTorchNamespace(types.ModuleType):
    """The ``torch`` global given to one patched megatron module: real torch, except that
    ``torch.cuda`` is :class:`_CpuCudaNamespace` and tensor factories map a CUDA ``device=`` to
    the CPU."""

    def __init__(self) -> None:
        super().__init__("torch", "torch as seen by megatron modules on a CPU-only build")
        self.cuda = _CpuCudaNamespace()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = _CpuTorchNamespace()


def install_cpu_torch(module_name: str) -> None:
    """Rebind the global ``torch`` of one megatron module to :data:`CPU_TORCH` (idempotent)."""
    mod = module(module_name)
    if mod.__dict__.get("torch") is not CPU_TORCH:
        set_attr(mod, "torch", CPU_TORCH)


def check_torch_global(module_name: str) -> None:
    if upstream_attr(module(module_name), "torch") is not torch:
        raise UpstreamChanged(f"{module_name}: its global `torch` is not the torch module")
