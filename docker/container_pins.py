"""Print pip constraints (``name==version``) that freeze the base image's framework packages.

Used by both Dockerfiles after the base image provides torch: with the output as PIP_CONSTRAINT,
installing our dependencies can never replace NVIDIA's torch / Transformer Engine / NCCL build
(GPU image) or the CPU torch wheel (CPU image) with a generic PyPI build; pip fails instead.

Only these packages are frozen (NGC's own /etc/pip/constraint.txt pins everything, which would
reject e.g. the newer ``packaging`` that megatron-core needs). Exit status 1 if torch is missing.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

# Normalized distribution names (PEP 503) built against the container's CUDA / torch.
FROZEN = re.compile(
    r"^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer-engine.*|flash-attn.*"
    r"|apex|nvidia-.*|cuda-.*|nccl.*|cudnn.*)$"
)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _valid(version: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pip vendors packaging; a missing top-level copy is no reason to fail
        return True
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        norm = _normalize(name)
        if FROZEN.match(norm) and _valid(dist.version):
            out[norm] = dist.version
    return out


def main() -> int:
    found = pins()
    if "torch" not in found:
        print("container_pins: torch is not installed in this image", file=sys.stderr)
        return 1
    for name, version in sorted(found.items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
