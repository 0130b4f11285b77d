"""The GPU check kit: wheels of every package bench/gpu_suite.py needs that a bare GPU image lacks,
for a machine that reaches no package registry (the H200 lent to some tasks: Python 3.12, torch,
numpy, sentencepiece, ... but no megatron-core, DeepSpeed, Hydra/OmegaConf or pydantic).

    python bench/gpu_kit.py                          # cp312 manylinux x86_64 -> .gpu_kit/cp312/
    python bench/gpu_kit.py --python-version 3.11    # this machine's Python (the CPU rehearsal)
    make gpu-kit                                     # the first line, with the project's .venv

The packages are the closure of ROOTS over their declared requirements (markers evaluated for the
target Python and Linux x86_64, no extras), at the versions installed in the environment running
this script (the project's .venv: the versions the tests run against), minus what the image already
has (IMAGE_PACKAGES; torch's own dependencies are all there). MLflow is not in the kit: the suite
runs with tracking.enabled=false and mod_train imports mlflow only when tracking is on.

Binary wheels come from the registry (`pip download --only-binary`); packages published only as
sdists (deepspeed, antlr4-python3-runtime) are built into wheels here, without build isolation, and
must come out pure Python (py3-none-any), or the build is refused. The folder gets the wheels and
manifest.json (name, version, file, sha256, size, source); a second run with the same plan and
intact files reuses them. The size printed at the end is what travels (the 64 MiB limit counts it
together with the repository's tracked files).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KIT_ROOT = REPO / ".gpu_kit"
MANIFEST = "manifest.json"

# What the GPU checks import beyond the image (mod_train's runtime with tracking off).
ROOTS = ("megatron-core", "deepspeed", "hydra-core", "omegaconf")

# The H200 image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17). The closure
# stops at these: the image brings them and their own dependencies.
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Shipped although the image has them: small, and the kit's packages need versions newer than an
# image may hold (pydantic 2.14 wants typing-extensions>=4.16, megatron-core packaging>=24.2). The
# kit's folder comes first on PYTHONPATH, so these copies win.
ALWAYS_SHIP = {canonicalize_name("typing-extensions"), canonicalize_name("packaging")}

MANYLINUX = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]


@dataclass(frozen=True)
class Target:
    python_version: str  # "3.12"

    @property
    def tag(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    def marker_env(self) -> Dict[str, str]:
        return {"python_version": self.python_version, "python_full_version": self.python_version + ".0",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                "os_name": "posix", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "extra": ""}


@dataclass
class KitEntry:
    name: str
    version: str
    file: str
    sha256: str
    size: int
    source: str  # "registry wheel" | "built from sdist"


def plan(target: Target, roots: Sequence[str] = ROOTS) -> Dict[str, str]:
    """name -> version of every package the kit holds: the closure of ``roots`` over requirements
    that apply to ``target``, stopping at the image's packages (except ALWAYS_SHIP)."""
    env = target.marker_env()
    todo, out = [canonicalize_name(r) for r in roots], {}
    while todo:
        name = todo.pop()
        if name in out:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_kit: {name} is not installed in {sys.prefix}; run this with the project's "
                             f"environment (make gpu-kit uses .venv/bin/python)") from None
        out[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not Marker(str(req.marker)).evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep in ALWAYS_SHIP:
                out.setdefault(dep, metadata.distribution(dep).version)
            elif dep not in IMAGE_PACKAGES:
                todo.append(dep)
    return dict(sorted(out.items()))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(kit: Path) -> Optional[dict]:
    path = kit / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def is_current(kit: Path, target: Target, wanted: Dict[str, str]) -> bool:
    """True when the kit already holds exactly ``wanted``, each file intact."""
    m = read_manifest(kit)
    if not m or m.get("python") != target.tag:
        return False
    if {e["name"]: e["version"] for e in m["wheels"]} != wanted:
        return False
    return all((kit / e["file"]).is_file() and sha256_of(kit / e["file"]) == e["sha256"] for e in m["wheels"])


def wheel_name_matches(filename: str, name: str) -> bool:
    return canonicalize_name(filename.split("-")[0]) == name


def fetch(name: str, version: str, target: Target, dest: Path) -> KitEntry:
    """One package's wheel into ``dest``: the registry's binary for the target, else built here."""
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", target.python_version, "--implementation", "cp", "--abi", target.tag,
               "--abi", "abi3", "--abi", "none", *[a for p in MANYLINUX for a in ("--platform", p)],
               "-d", tmp, f"{name}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        source = "registry wheel"
        if r.returncode != 0 and "No matching distribution" in r.stderr:
            # Only an sdist: build it with this environment (no isolation: deepspeed's setup.py
            # imports torch) and accept the result only if it is pure Python.
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp,
                   f"{name}=={version}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            source = "built from sdist"
        if r.returncode != 0:
            tail = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("WARNING: Location"))
            raise RuntimeError(f"gpu_kit: could not get {name}=={version}: {' '.join(cmd)}\n{tail[-2000:]}")
        wheels = [p for p in Path(tmp).glob("*.whl") if wheel_name_matches(p.name, name)]
        if len(wheels) != 1:
            raise RuntimeError(f"gpu_kit: expected one wheel of {name}, got {[p.name for p in wheels]}")
        wheel = wheels[0]
        if source == "built from sdist" and not wheel.name.endswith("-py3-none-any.whl"):
            raise RuntimeError(f"gpu_kit: {wheel.name} was built here but is not pure Python: it would not run "
                               f"on the target ({target.tag} manylinux x86_64); build it there or find a wheel")
        final = dest / wheel.name
        final.write_bytes(wheel.read_bytes())
    return KitEntry(name, version, final.name, sha256_of(final), final.stat().st_size, source)


def build(target: Target, kit: Path, roots: Sequence[str] = ROOTS, log=print) -> dict:
    """Make (or reuse) the kit for ``target`` in ``kit``; returns the manifest."""
    wanted = plan(target, roots)
    if is_current(kit, target, wanted):
        log(f"gpu_kit: {kit} is up to date ({len(wanted)} wheels)")
        return read_manifest(kit)
    kit.mkdir(parents=True, exist_ok=True)
    for old in kit.glob("*.whl"):
        old.unlink()
    entries = []
    for name, version in wanted.items():
        entries.append(fetch(name, version, target, kit))
        log(f"  {name}=={version}: {entries[-1].file} ({entries[-1].size / 1e6:.2f} MB, {entries[-1].source})")
    manifest = {"python": target.tag, "platform": "manylinux x86_64", "roots": list(roots),
                "image_packages_skipped": sorted(IMAGE_PACKAGES - ALWAYS_SHIP),
                "total_bytes": sum(e.size for e in entries), "wheels": [asdict(e) for e in entries]}
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def manifest_table(manifest: dict) -> str:
    """The manifest as Markdown (for bench/results and the log)."""
    lines = ["| package | version | file | size | sha256 (first 16) | source |", "|---|---|---|---:|---|---|"]
    for e in manifest["wheels"]:
        lines.append(f"| {e['name']} | {e['version']} | {e['file']} | {e['size'] / 1e6:.2f} MB | "
                     f"{e['sha256'][:16]} | {e['source']} |")
    lines.append(f"| **total** | | {len(manifest['wheels'])} wheels | {manifest['total_bytes'] / 1e6:.2f} MB | | |")
    return "\n".join(lines)


def tracked_bytes() -> Optional[int]:
    """Size of the repository's git-tracked files (what travels besides the kit)."""
    r = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if r.returncode != 0:
        return None
    return sum((REPO / p).stat().st_size for p in r.stdout.decode().split("\0") if p and (REPO / p).is_file())


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python-version", default="3.12", help="the target's Python (default 3.12, the H200 image)")
    p.add_argument("--out", default=None, help="kit folder (default .gpu_kit/cp<version>)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise SystemExit(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.12")
    target = Target(args.python_version)
    kit = Path(args.out) if args.out else DEFAULT_KIT_ROOT / target.tag
    manifest = build(target, kit)
    print(manifest_table(manifest))
    repo = tracked_bytes()
    total = manifest["total_bytes"] + (repo or 0)
    print(f"kit: {kit} ({manifest['total_bytes'] / 2**20:.1f} MiB); with the repository's tracked files: "
          f"{total / 2**20:.1f} MiB of the 64 MiB a device call carries")
    if total > 48 * 2**20:
        print("gpu_kit: WARNING: over 48 MiB: little room left under the 64 MiB limit", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
