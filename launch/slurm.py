"""Slurm support: validate a config against an allocation, render sbatch scripts, submit them, and
the small helpers the rendered jobs call (``job-start``, ``requeue-check``).

The command line is ``mod-submit`` (:mod:`launch.submit`); docs/slurm.md explains the jobs. Templates
live in ``slurm/`` at the repository root; ``{{name}}`` placeholders are filled here. The rendered
scripts are written to ``<run_dir>/slurm/`` and kept there. What the jobs themselves call
(``job-start``, ``requeue-check``) is in :mod:`launch.slurm_job`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from launch.slurm_job import JOB_FILE
from mod_train.config.validate import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO / "slurm"
NODE_SCRIPT = TEMPLATE_DIR / "node.sh"


class SlurmError(ConfigError):
    """A Slurm setting that cannot work (or a failed sbatch); the message says what to change."""


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise SlurmError(msg)


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Allocation:
    """What one training job asks Slurm for, resolved from ``cfg.slurm``."""

    nodes: int
    gpus_per_node: int
    procs_per_node: int  # torchrun --nproc-per-node
    cpus_per_task: Optional[int]  # the node task's CPUs (all its ranks)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def omp_threads(self) -> int:
        return max(1, (self.cpus_per_task or self.procs_per_node) // self.procs_per_node)


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(value: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME_RE.match(str(value).strip())
    _require(m is not None, f"slurm.time='{value}' is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, "
                            f"D-HH, D-HH:MM or D-HH:MM:SS).")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def allocation_of(cfg) -> Allocation:
    s = cfg.slurm
    _require(s.nodes >= 1, f"slurm.nodes must be >= 1, got {s.nodes}.")
    _require(s.gpus_per_node >= 0, f"slurm.gpus_per_node must be >= 0, got {s.gpus_per_node}.")
    procs = s.procs_per_node if s.procs_per_node is not None else (s.gpus_per_node or 1)
    _require(procs >= 1, f"slurm.procs_per_node must be >= 1, got {procs}.")
    if s.gpus_per_node:
        _require(procs <= s.gpus_per_node,
                 f"slurm.procs_per_node={procs} ranks but slurm.gpus_per_node={s.gpus_per_node}: every rank needs "
                 f"its own GPU. Set slurm.procs_per_node to at most {s.gpus_per_node} (or null).")
        _require(procs == s.gpus_per_node,
                 f"slurm.gpus_per_node={s.gpus_per_node} but only slurm.procs_per_node={procs} ranks per node: "
                 f"{s.gpus_per_node - procs} GPU(s) per node would be allocated and idle. Ask for "
                 f"slurm.gpus_per_node={procs} or leave slurm.procs_per_node=null.")
    cpus = s.cpus_per_task
    if cpus is None and not s.gpus_per_node:
        cpus = procs  # CPU ranks: at least one core each
    if cpus is not None:
        _require(cpus >= procs, f"slurm.cpus_per_task={cpus} is fewer than the {procs} ranks per node.")
    return Allocation(nodes=s.nodes, gpus_per_node=s.gpus_per_node, procs_per_node=procs, cpus_per_task=cpus)


def _with_vocab(cfg, vocab_size: int):
    model = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    return dataclasses.replace(cfg, model=model)


def check(cfg, check_files: bool = True, vocab_size: Optional[int] = None) -> Allocation:
    """Every Slurm rule, then the usual config validation at the allocation's world size.

    ``check_files=False``: data and tokenizer may not exist yet (prep mode, or files visible only on
    the cluster); ``vocab_size`` then stands in for the tokenizer's vocabulary.
    """
    from mod_train.config.validate import validate

    s, par = cfg.slurm, cfg.parallel
    _require(not (s.require_partition and not s.partition),
             "slurm.partition is not set, and this cluster needs one (slurm.require_partition=true): add "
             "slurm.partition=<name> (`sinfo -s` lists them).")
    _require(not (s.require_account and not s.account),
             "slurm.account is not set, and this cluster needs one (slurm.require_account=true): add "
             "slurm.account=<name> (`sacctmgr show associations user=$USER format=account` lists yours).")
    limit = parse_time(s.time)
    _require(0 < s.signal_seconds < limit,
             f"slurm.signal_seconds={s.signal_seconds} must be positive and below the time limit slurm.time="
             f"{s.time} ({limit} s): the warning has to come before the end.")
    _require(s.max_requeues >= 0, f"slurm.max_requeues must be >= 0, got {s.max_requeues}.")
    _require(s.rendezvous in ("c10d", "static"), f"slurm.rendezvous must be c10d or static, got '{s.rendezvous}'.")
    _require(s.gpu_directive in ("gpus-per-node", "gres"),
             f"slurm.gpu_directive must be gpus-per-node or gres, got '{s.gpu_directive}'.")
    c = s.container
    _require(c.runtime in ("none", "pyxis", "apptainer"),
             f"slurm.container.runtime must be none, pyxis or apptainer, got '{c.runtime}'.")
    _require(c.runtime == "none" or bool(c.image),
             f"slurm.container.runtime={c.runtime} needs slurm.container.image.")
    if s.master_port is not None:
        _require(1024 <= s.master_port <= 65535, f"slurm.master_port={s.master_port} is not a usable port.")

    alloc = allocation_of(cfg)
    unit = "GPUs" if alloc.gpus_per_node else "ranks"
    per_node = "slurm.gpus_per_node" if alloc.gpus_per_node else "slurm.procs_per_node"
    mp = par.tp * par.pp * par.cp
    world = alloc.world_size
    what = f"slurm.nodes x {per_node} = {alloc.nodes} x {alloc.procs_per_node} = {world} {unit}"
    if world < mp:
        need_nodes = -(-mp // alloc.procs_per_node)
        raise SlurmError(f"the layout does not fit: parallel.tp x parallel.pp x parallel.cp = {par.tp} x {par.pp} x "
                         f"{par.cp} = {mp} ranks per model replica, but {what}. Use slurm.nodes={need_nodes} or a "
                         f"smaller layout.")
    if world % mp:
        usable = world // mp * mp
        raise SlurmError(f"{what} is not a multiple of parallel.tp x parallel.pp x parallel.cp = {mp}: only {usable} "
                         f"could be used and {world - usable} would idle. Choose slurm.nodes and {per_node} so that "
                         f"their product is a multiple of {mp}, or change the layout.")
    if alloc.nodes > 1:
        _require(alloc.procs_per_node % par.tp == 0,
                 f"parallel.tp={par.tp} does not divide {per_node}={alloc.procs_per_node}: tensor-parallel groups "
                 f"(consecutive ranks) would span nodes, where every layer's all-reduce crosses the network. "
                 f"Choose a TP size that divides the {unit} per node.")
    if par.global_batch_size:
        dp = world // mp
        most = par.global_batch_size // par.micro_batch_size
        _require(dp <= most,
                 f"{what} gives {dp} data-parallel replicas, more than parallel.global_batch_size / "
                 f"parallel.micro_batch_size = {par.global_batch_size} / {par.micro_batch_size} = {most} can use: "
                 f"{(dp - most) * mp} {unit} would idle. Use fewer nodes or a larger global batch.")

    vcfg = cfg
    if not check_files and cfg.model.vocab_size is None:
        vcfg = _with_vocab(cfg, vocab_size or cfg.model.make_vocab_size_divisible_by)
    try:
        validate(vcfg, world_size=world, check_files=check_files, has_cuda=alloc.gpus_per_node > 0)
    except ConfigError as e:
        if isinstance(e, SlurmError):
            raise
        raise SlurmError(f"{e} (world size {world} = {what})") from None
    return alloc


# ---------------------------------------------------------------------------------------- rendering
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render(template: str, values: Dict[str, object]) -> str:
    """Fill ``{{name}}`` placeholders; a placeholder without a value is an error."""
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    _require(not missing, f"template placeholders without a value: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def _q(value) -> str:
    return shlex.quote(str(value))


def _template(name: str, override: Optional[str] = None) -> str:
    path = Path(override) if override else TEMPLATE_DIR / name
    _require(path.is_file(), f"sbatch template not found: {path}")
    return path.read_text()


def _directives(lines: Sequence[Tuple[str, object]], extra: Sequence[str] = ()) -> str:
    out = [f"#SBATCH --{k}={v}" if v is not True else f"#SBATCH --{k}" for k, v in lines if v not in (None, False)]
    out += [f"#SBATCH {a if a.startswith('-') else '--' + a}" for a in extra]
    return "\n".join(out)


def _env_exports(env: Dict[str, str]) -> str:
    return "\n".join(f"export {k}={_q(v)}" for k, v in sorted((env or {}).items()))


def _setup(lines: Sequence[str]) -> str:
    return "\n".join(lines) if lines else "# (slurm.setup: no extra set-up lines)"


@dataclass
class RunPaths:
    workdir: Path
    run_dir: Path

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"


def run_paths(cfg) -> RunPaths:
    workdir = Path(cfg.slurm.workdir or os.getcwd()).resolve()
    run_dir = Path(cfg.train.run_dir)
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    return RunPaths(workdir=workdir, run_dir=run_dir)


def _python(cfg) -> str:
    return cfg.slurm.python or sys.executable


def _host_python(cfg) -> str:
    """The interpreter for the job's own helpers (launch.slurm_job, stdlib only), run by the batch
    shell outside any container: the training interpreter, or python3 when that one is in a container."""
    return _python(cfg) if cfg.slurm.container.runtime == "none" else "python3"


def _job_name(cfg, paths: RunPaths, suffix: str = "") -> str:
    base = cfg.slurm.job_name or f"mod-{paths.run_dir.name}"
    return base + suffix


def _common_directives(cfg, name: str, output: str, partition: Optional[str]):
    s = cfg.slurm
    return [("job-name", name), ("output", output), ("partition", partition), ("account", s.account),
            ("qos", s.qos)]


def torchrun_command(cfg, alloc: Allocation) -> str:
    """One torchrun per node. ``@NODE_RANK@`` is replaced by node.sh with the node's $SLURM_NODEID."""
    s = cfg.slurm
    lines = [f"{_q(_python(cfg))} -m torch.distributed.run --nnodes={alloc.nodes} "
             f"--nproc-per-node={alloc.procs_per_node}"]
    if s.rendezvous == "c10d":
        lines.append('--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" '
                     '--rdzv-id="${SLURM_JOB_ID}_${RESTART}"')
    else:
        lines.append('--node-rank=@NODE_RANK@ --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"')
    lines.append('--max-restarts=0 --tee=3 --log-dir="$RUN_DIR/logs/job${SLURM_JOB_ID}_restart${RESTART}/node@NODE_RANK@"'
                 + "".join(" " + _q(a) for a in s.torchrun_args))
    return " \\\n  ".join(lines)


def render_train(cfg, overrides: Sequence[str], alloc: Optional[Allocation] = None,
                 paths: Optional[RunPaths] = None) -> str:
    """The training job's sbatch script (slurm/train.sbatch.tmpl)."""
    s = cfg.slurm
    alloc = alloc or allocation_of(cfg)
    paths = paths or run_paths(cfg)
    sd = paths.slurm_dir
    gpus = []
    if alloc.gpus_per_node:
        gpus = [("gpus-per-node", alloc.gpus_per_node)] if s.gpu_directive == "gpus-per-node" \
            else [("gres", f"gpu:{alloc.gpus_per_node}")]
    directives = _directives([
        *_common_directives(cfg, _job_name(cfg, paths), f"{sd}/train-%j.out", s.partition),
        ("nodes", alloc.nodes), ("ntasks-per-node", 1), *gpus, ("cpus-per-task", alloc.cpus_per_task),
        ("mem", s.mem), ("time", s.time), ("exclusive", s.exclusive),
        ("signal", f"B:USR1@{s.signal_seconds}"), ("requeue" if s.requeue else "no-requeue", True),
        ("open-mode", "append"),
    ], s.sbatch_args)
    srun = [f"--nodes={alloc.nodes}", f"--ntasks={alloc.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if alloc.cpus_per_task:
        srun.append(f"--cpus-per-task={alloc.cpus_per_task}")  # srun does not inherit it (Slurm >= 22.05)
    prefix = ""
    c = s.container
    if c.runtime == "pyxis":
        srun += [f"--container-image={_q(c.image)}", f"--container-workdir={_q(paths.workdir)}"]
        if c.mounts:
            srun.append(f"--container-mounts={_q(','.join(c.mounts))}")
        srun += [_q(a) for a in c.args]
    elif c.runtime == "apptainer":
        flags = (["--nv"] if alloc.gpus_per_node else []) + [f"--bind {_q(m)}" for m in c.mounts] + \
            [_q(a) for a in c.args]
        prefix = f"apptainer exec {' '.join(flags + [_q(c.image)])} "
    srun += [_q(a) for a in s.srun_args]
    if s.requeue:
        requeue = f"""# ---- requeue after the warning (or a hang stopped by the step watchdog), unless training is
# finished or stopped making progress
if [ "$PREEMPTED" -gt 0 ] || [ "$RC" -ne 0 ]; then
  if {_q(_host_python(cfg))} -m launch.slurm_job requeue-check --run-dir "$RUN_DIR" --exit-code "$RC" \\
      --preempted "$([ "$PREEMPTED" -gt 0 ] && echo 1 || echo 0)"; then
    echo "[$(date '+%F %T')] requeueing job $SLURM_JOB_ID (restart $((RESTART + 1)))"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "scontrol requeue $SLURM_JOB_ID failed" >&2
  fi
fi"""
    else:
        requeue = "# slurm.requeue=false: a pre-empted job ends here (with its checkpoint); resubmit to resume."
    values = {
        "script": _q(sd / "train.sbatch"), "sbatch_directives": directives, "workdir": _q(paths.workdir),
        "setup": _setup(s.setup), "run_dir": _q(paths.run_dir), "slurm_dir": _q(sd),
        "host_python": _q(_host_python(cfg)),
        "omp_threads": alloc.omp_threads, "env_exports": _env_exports(s.env),
        "master_port": s.master_port or "$((20000 + SLURM_JOB_ID % 20000))",
        "nodes": alloc.nodes, "procs_per_node": alloc.procs_per_node, "rendezvous": s.rendezvous,
        "srun_args": " ".join(srun), "container_prefix": prefix, "torchrun": torchrun_command(cfg, alloc),
        "overrides": " ".join(_q(o) for o in overrides), "signal_seconds": s.signal_seconds,
        "max_requeues": s.max_requeues, "requeue_block": requeue,
    }
    return render(_template("train.sbatch.tmpl", s.template), values)


# ---------------------------------------------------------------------------------------- prep
@dataclass
class PrepPlan:
    inputs: List[str]  # one per array task, in shard order
    tokenizer_prefix: str
    shard_dir: Path
    output_prefix: str


def prep_plan(cfg, paths: RunPaths) -> PrepPlan:
    from data_prep._io import DataPrepError, expand_inputs

    p, d = cfg.slurm.prep, cfg.data
    _require(len(p.inputs) > 0, "slurm.prep.inputs is empty: give the corpus files/globs to prepare, e.g. "
                                "'slurm.prep.inputs=[/data/corpus/*.jsonl]' (one array task per file).")
    _require(str(d.tokenizer_model).endswith(".model"),
             f"data.tokenizer_model='{d.tokenizer_model}' must end in .model: the tokenizer job writes it there.")
    _require(len(d.paths) == 1, f"data.paths has {len(d.paths)} entries; `mod-submit prep` writes exactly one "
                                f"dataset (the merged shards): give one prefix.")
    _require(p.vocab_size >= 16, f"slurm.prep.vocab_size={p.vocab_size} is too small.")
    _require(p.model_type in ("bpe", "unigram"), f"slurm.prep.model_type must be bpe or unigram.")
    _require(p.cpus_per_task >= 1, "slurm.prep.cpus_per_task must be >= 1.")
    if cfg.model.vocab_size is not None:
        _require(cfg.model.vocab_size == p.vocab_size,
                 f"model.vocab_size={cfg.model.vocab_size} differs from slurm.prep.vocab_size={p.vocab_size}: the "
                 f"tokenizer will have {p.vocab_size} pieces. Set model.vocab_size=null.")
    parse_time(p.time)

    def absolute(x: str) -> Path:
        q = Path(x)
        return q if q.is_absolute() else paths.workdir / q

    try:
        cwd = os.getcwd()
        os.chdir(paths.workdir)
        try:
            files = [str(absolute(f)) for f in expand_inputs(list(p.inputs))]
        finally:
            os.chdir(cwd)
    except DataPrepError as e:
        raise SlurmError(f"slurm.prep.inputs: {e}") from None
    output = absolute(d.paths[0])
    shard_dir = absolute(p.shard_dir) if p.shard_dir else Path(str(output) + "_shards")
    return PrepPlan(inputs=files, tokenizer_prefix=str(absolute(d.tokenizer_model))[: -len(".model")],
                    shard_dir=shard_dir, output_prefix=str(output))


def render_prep(cfg, plan: PrepPlan, paths: RunPaths) -> Dict[str, str]:
    """The three data-preparation scripts: {file name: text}."""
    s, p = cfg.slurm, cfg.slurm.prep
    sd = paths.slurm_dir
    py = _q(_python(cfg))
    partition = p.partition or s.partition
    n = len(plan.inputs)

    def directives(stage: str, output: str, extra=()):
        return _directives([*_common_directives(cfg, _job_name(cfg, paths, f"-{stage}"), output, partition),
                            ("nodes", 1), ("ntasks", 1), ("cpus-per-task", p.cpus_per_task), ("time", p.time),
                            *extra], s.sbatch_args)

    common = {"workdir": _q(paths.workdir), "setup": _setup(s.setup), "env_exports": _env_exports(s.env),
              "python": py, "cpus": p.cpus_per_task, "text_key": _q(p.text_key)}
    array = f"0-{n - 1}" + (f"%{p.array_parallelism}" if p.array_parallelism else "")
    scripts = {
        "prep_tokenizer.sbatch": render(_template("prep_tokenizer.sbatch.tmpl"), {
            **common, "sbatch_directives": directives("tokenizer", f"{sd}/prep_tokenizer-%j.out"),
            "tokenizer_prefix": _q(plan.tokenizer_prefix), "inputs": " ".join(_q(i) for i in p.inputs),
            "vocab_size": p.vocab_size, "model_type": p.model_type, "max_sentences": p.max_sentences}),
        "prep_tokenize.sbatch": render(_template("prep_tokenize.sbatch.tmpl"), {
            **common, "sbatch_directives": directives("tokenize", f"{sd}/prep_tokenize-%A_%a.out",
                                                      [("array", array)]),
            "script": _q(sd / "prep_tokenize.sbatch"), "manifest": _q(sd / "shards.txt"),
            "shard_dir": _q(plan.shard_dir), "last_task": n - 1,
            "tokenizer_model": _q(plan.tokenizer_prefix + ".model")}),
        "prep_merge.sbatch": render(_template("prep_merge.sbatch.tmpl"), {
            **common, "sbatch_directives": directives("merge", f"{sd}/prep_merge-%j.out"),
            "shard_dir": _q(plan.shard_dir), "output_prefix": _q(plan.output_prefix), "num_shards": n}),
    }
    return scripts


# ---------------------------------------------------------------------------------------- files + sbatch
def write_train_files(cfg, script: str, paths: RunPaths) -> Path:
    """train.sbatch, node.sh and job.json (read by requeue-check) under <run_dir>/slurm/."""
    sd = paths.slurm_dir
    sd.mkdir(parents=True, exist_ok=True)
    (paths.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = sd / "train.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    node = sd / "node.sh"
    node.write_text(NODE_SCRIPT.read_text())
    node.chmod(0o755)
    ckpt = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else paths.run_dir / "checkpoints"
    if not ckpt.is_absolute():
        ckpt = paths.workdir / ckpt
    (sd / JOB_FILE).write_text(json.dumps({"max_steps": cfg.train.max_steps, "checkpoint_dir": str(ckpt),
                                           "max_requeues": cfg.slurm.max_requeues}, indent=1))
    return path


def sbatch(script: Path, dependency: Optional[str] = None, extra: Sequence[str] = (),
           env: Optional[dict] = None) -> str:
    """Submit with ``sbatch --parsable``; the job id."""
    cmd = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), *extra, str(script)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run mod-submit on a Slurm login node (or use --dry-run).") from None
    if r.returncode != 0:
        raise SlurmError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip().split(";")[0]


def record_submission(paths: RunPaths, entry: dict) -> None:
    f = paths.slurm_dir / "submissions.jsonl"
    with open(f, "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}) + "\n")
