"""Every GPU figure of mod-train from one command, within a wall-time budget, on a machine that reaches
no package registry (docs/gpu.md has the device command).

    python3 bench/gpu_suite.py --kit .gpu_kit/cp312 --out "$OUT"                 # the H200: 8 minutes
    python bench/gpu_suite.py --kit .gpu_kit/cp311 --device cpu --scale tiny --budget-s 150 --out /tmp/r

First it installs the kit (bench/gpu_kit.py's wheels) offline into --site (`pip install --no-index
--no-deps --target`), then runs the parts below in order, each a child process of the repository's
bench scripts with PYTHONPATH=<site>:<repo>:

  env         GPU, driver, Python/torch/CUDA versions, the kit's packages importable, bf16 matmul peak
  smoke       the tiny dense and MoD models train --smoke-steps steps on the device; their loss at every
              logged step within SMOKE_LOSS_TOL of the same run in fp32 on the CPU; host syncs on
              unlogged steps counted with torch.cuda.set_sync_debug_mode (bench/gpu_smoke.py)
  throughput  bench/throughput.py per preset: ms/step, tokens/s, TFLOP/s, MFU (vs the env part's
              peak), peak memory, x its dense twin; the dense presets against bench/reference_gpt.py
  mod_layer   bench/mod_layer.py: the MoD layer at capacity 1.0/0.5/0.25/0.125 vs dense
  memory      bench/memory.py: peak memory of a training step without activation recomputation,
              selective (mlp) and full (torch.cuda.max_memory_allocated), x no recomputation
  sampling    the dense and MoD twins trained for a share of the budget on the bundled corpus (stopped
              by SIGTERM, which checkpoints), then bench/sampling.py at batch 1 and 32
  isoflop     bench/isoflop.py (dense vs MoD) at the largest FLOP budget that fits the time left,
              on the bundled corpus

Budget: each part gets its share (SHARES; TINY_SHARES at --scale tiny) of the time still left,
over the parts still to run (so time a part does not use flows on); env always gets ENV_MIN_S. A part, or an item in it (one preset, one model), starts only if its
estimated cost fits what the part has left (priors in Scale, then what the part measured); what
does not fit is recorded as skipped with the reason, and a child still running at its part's end is
killed and recorded as timed out. results.json and summary.md are rewritten after every item, so a
run cut short still returns what it measured. At most three files go to --out: summary.md (machine,
every command, the figures), results.json, suite.log (every child's output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

PARTS = ("env", "smoke", "throughput", "mod_layer", "memory", "sampling", "isoflop")
# Time shares at GPU scale, where a preset's run costs its steps; at tiny scale every child costs
# about its start-up (imports), so the shares are more even.
SHARES = {"env": 0.03, "smoke": 0.14, "throughput": 0.40, "mod_layer": 0.06, "memory": 0.07, "sampling": 0.20,
          "isoflop": 0.10}
TINY_SHARES = {"env": 0.05, "smoke": 0.30, "throughput": 0.30, "mod_layer": 0.08, "memory": 0.05, "sampling": 0.17,
               "isoflop": 0.05}
# bf16 on the GPU against fp32 on the CPU, same seed and synthetic data: the largest difference of
# the LM loss at any logged step (nats) that still counts as tracking.
SMOKE_LOSS_TOL = 0.1
OUT_FILES = ("summary.md", "results.json", "suite.log")
ENV_MIN_S = 60.0


@dataclass(frozen=True)
class Scale:
    """What each part runs at one scale, and the priors (seconds) for items not yet measured."""

    smoke_models: Tuple[str, ...]
    throughput_models: Tuple[str, ...]  # in priority order: the dense twin first
    dense_twin: str
    with_reference: Tuple[str, ...]
    step_args: Tuple[str, ...]  # --steps/--warmup/--micro-batch/--vocab of throughput.py and reference_gpt.py
    mod_layer_args: Tuple[str, ...]
    sampling_models: Tuple[str, str]
    sampling_max_steps: int
    sampling_args: Tuple[str, ...]
    train_args: Tuple[str, ...]  # for the sampling twins and isoFLOP runs
    tokenizer_vocab: int
    isoflop_dense: str
    isoflop_variants: str
    shares: Dict[str, float]
    prior_s: Dict[str, float] = field(default_factory=dict)
    memory_args: Tuple[str, ...] = ()  # bench/memory.py's


SCALES = {
    "gpu": Scale(
        smoke_models=("tiny", "tiny_mod"),
        throughput_models=("gpt_350m", "gpt_350m_mod", "gpt_1b", "gpt_350m_moe", "gpt_350m_mode_staged",
                           "gpt_350m_mode_integrated", "gpt_125m"),
        dense_twin="gpt_350m", with_reference=("gpt_350m", "gpt_1b", "gpt_125m"),
        step_args=("--steps", "10", "--warmup", "3", "--micro-batch", "4", "--vocab", "32000"),
        mod_layer_args=("--hidden", "2048", "--heads", "16", "--seq", "4096", "--batch", "4", "--rounds", "3"),
        sampling_models=("gpt_350m", "gpt_350m_mod"), sampling_max_steps=3000,
        sampling_args=("--prompt-len", "32", "--new-tokens", "96", "--repeats", "3"),
        train_args=("parallel.micro_batch_size=8", "optim.lr=6e-4", "optim.min_lr=6e-5"),
        tokenizer_vocab=8192, isoflop_dense="gpt_125m", isoflop_variants="dense,mod", shares=SHARES,
        prior_s={"smoke": 60, "throughput": 35, "reference": 60, "mod_layer": 40,
                 "prep": 40, "train": 60, "sample": 60, "isoflop_startup": 30, "isoflop": 120, "memory": 60},
        memory_args=("--scale", "gpu")),
    "tiny": Scale(
        smoke_models=("tiny", "tiny_mod"),
        throughput_models=("tiny", "tiny_mod", "tiny_moe", "tiny_mode_staged", "tiny_mode_integrated"),
        dense_twin="tiny", with_reference=("tiny",),
        step_args=("--steps", "3", "--warmup", "1", "--micro-batch", "2", "--vocab", "512"),
        mod_layer_args=("--hidden", "64", "--heads", "4", "--seq", "128", "--batch", "2", "--iters", "2",
                        "--warmup", "1", "--rounds", "1"),
        sampling_models=("tiny", "tiny_mod"), sampling_max_steps=30,
        sampling_args=("--prompt-len", "8", "--new-tokens", "8", "--repeats", "1"),
        train_args=("parallel.micro_batch_size=4",),
        tokenizer_vocab=512, isoflop_dense="tiny", isoflop_variants="dense,mod", shares=TINY_SHARES,
        # on 2 idle CPU cores; a child costs ~8 s of imports and start-up
        prior_s={"smoke": 12, "throughput": 12, "reference": 8, "mod_layer": 10,
                 "prep": 10, "train": 12, "sample": 12, "isoflop_startup": 10, "isoflop": 40, "memory": 25},
        # one fresh process per setting on the CPU (its resident-set high-water mark)
        memory_args=("--scale", "cpu", "--settings", "none,full", "--zero", "none", "model.num_layers=2",
                     "model.seq_length=256")),
}


def allot(left_s: float, share: float, shares_to_come: float) -> float:
    """Seconds a part gets: its share of the time left, over the shares of the parts still to run
    (its own included), so what earlier parts did not use flows on."""
    if shares_to_come <= 0:
        return max(left_s, 0.0)
    return max(left_s, 0.0) * min(share / shares_to_come, 1.0)


class Clock:
    """Time left for a part (``allotted`` from now) and for the whole run (``deadline``)."""

    def __init__(self, allotted_s: float, deadline: float):
        self.start = time.monotonic()
        self.end = min(self.start + allotted_s, deadline)

    def left(self) -> float:
        return max(self.end - time.monotonic(), 0.0)

    def used(self) -> float:
        return time.monotonic() - self.start

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


class Recorder:
    """results.json, summary.md and suite.log in --out, rewritten as the run goes."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"suite": header, "parts": {}, "commands": []}
        self.log_path = out / "suite.log"
        self.log_path.write_text("")

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(text.rstrip("\n"), flush=True)

    def part(self, name: str) -> dict:
        return self.results["parts"].setdefault(name, {"status": "pending", "items": {}})

    def save(self) -> None:
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out / "results.json")
        tmp = self.out / ".summary.md.tmp"
        tmp.write_text(render_summary(self.results))
        tmp.replace(self.out / "summary.md")


@dataclass
class Context:
    args: argparse.Namespace
    scale: Scale
    rec: Recorder
    env: Dict[str, str]  # for the children
    work: Path
    deadline: float
    clock: Clock = None  # the running part's

    def run(self, part: str, label: str, cmd: Sequence[str], timeout_s: Optional[float] = None,
            extra_env: Optional[Dict[str, str]] = None, stop_after_s: Optional[float] = None,
            ) -> Tuple[Optional[int], str, float]:
        """Run one child: (exit code or None if killed at the part's end, stdout, seconds). With
        ``stop_after_s`` it gets SIGTERM then (mod-train checkpoints and exits 124)."""
        timeout_s = self.clock.left() if timeout_s is None else min(timeout_s, self.clock.left())
        env = {**self.env, **(extra_env or {})}
        shown = display(cmd)
        prefix = " ".join(f"{k}={v}" for k, v in (extra_env or {}).items())
        self.rec.log(f"\n$ {prefix + ' ' if prefix else ''}{shown}    # {part}: {label}, at most {timeout_s:.0f} s")
        t0 = time.monotonic()
        # The child writes straight into suite.log (what it printed survives a kill of the suite);
        # its part of the log is read back for its RESULT line.
        offset = self.rec.log_path.stat().st_size
        with self.rec.log_path.open("ab") as log:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        code = None
        try:
            if stop_after_s is not None and stop_after_s < timeout_s:
                try:
                    proc.wait(timeout=max(stop_after_s, 0.0))
                except subprocess.TimeoutExpired:
                    kill_group(proc, signal.SIGTERM)
            code = proc.wait(timeout=max(timeout_s - (time.monotonic() - t0), 1.0))
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGKILL)
            proc.wait()
        wall = time.monotonic() - t0
        with self.rec.log_path.open("rb") as log:
            log.seek(offset)
            out = log.read().decode(errors="replace")
        self.rec.log(f"# exit {code if code is not None else 'KILLED (time share used up)'} after {wall:.1f} s")
        self.rec.results["commands"].append({"part": part, "item": label, "cmd": (prefix + " " + shown).strip(),
                                             "exit": code, "wall_s": round(wall, 1)})
        return code, out, wall


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a child and everything it started (it leads its own session)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def display(cmd: Sequence) -> str:
    """A command as it reads from the repository root (python, relative paths)."""
    words = ["python" if str(c) == sys.executable else str(c).replace(str(REPO) + "/", "") for c in cmd]
    return " ".join(shlex.quote(w) for w in words)


def result_line(stdout: str) -> Optional[dict]:
    """The JSON of the last ``RESULT {...}`` line the bench scripts print."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def tail(stdout: str, n: int = 3) -> str:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-600:]


def item(ctx: Context, part: str, name: str, estimate_s: float, fn: Callable[[], dict]) -> Optional[dict]:
    """Run one item if its estimate fits the part's time left; record it either way."""
    items = ctx.rec.part(part)["items"]
    if not ctx.clock.fits(estimate_s):
        items[name] = {"status": "skipped", "reason": f"would overrun: needs ~{estimate_s:.0f} s, "
                                                      f"{ctx.clock.left():.0f} s left of the part's share"}
        ctx.rec.save()
        return None
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - one failed item must not stop the suite
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    out.setdefault("status", "done")
    out["wall_s"] = round(time.monotonic() - t0, 1)
    items[name] = out
    ctx.rec.save()
    return out


def outcome(code: Optional[int], stdout: str, parsed: Optional[dict]) -> dict:
    if code is None and parsed is not None:  # its figures were out before the kill (exiting is slow)
        return {"status": "done", "note": "killed at the end of the part's time share, after its result"}
    if code is None:
        return {"status": "timed out", "error": "killed at the end of the part's time share"}
    if code != 0 or parsed is None:
        return {"status": "failed", "error": f"exit {code}: {tail(stdout)}"}
    return {"status": "done"}


# ---------------------------------------------------------------------------------------------- parts
def probe_env() -> dict:
    """In the child (``gpu_suite.py --probe-env``): versions, the kit importable, the matmul peak."""
    import torch
    import deepspeed
    import hydra
    import megatron.core
    import omegaconf
    import pydantic

    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(REPO))
    from throughput import measured_matmul_tflops

    from mod_train.model.fusions import decide, describe, probe

    cuda = torch.cuda.is_available()
    # What the runs below decide at start (model/fusions.py) for the presets' swiglu/rope/RMSNorm.
    fusions = describe(decide(probe(), activation="swiglu", position_embedding="rope", normalization="RMSNorm"))
    props = torch.cuda.get_device_properties(0) if cuda else None
    if not cuda:
        # DeepSpeed JIT-builds its CPU comm op in every process's first init; build it here, once,
        # inside env's time, so no later child is killed mid-build (a killed build leaves a lock
        # that every later child waits on).
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "gpu_memory_gib": props.total_memory / 2**30 if cuda else None,
            "sms": props.multi_processor_count if cuda else None, "cpu_count": os.cpu_count(),
            "megatron_core": megatron.core.__version__, "deepspeed": deepspeed.__version__,
            "hydra": hydra.__version__, "omegaconf": omegaconf.__version__, "pydantic": pydantic.VERSION,
            "megatron_from": str(Path(megatron.core.__file__).parent),
            # the best of two, as clocks ramp up during the first
            "peak_tflops": max(measured_matmul_tflops(cuda) for _ in range(2)),
            "peak_dtype": "bf16 8192^3" if cuda else "fp32 1024^3", "fusions": fusions}


def part_env(ctx: Context) -> None:
    def run() -> dict:
        code, out, _ = ctx.run("env", "versions and matmul peak", [sys.executable, __file__, "--probe-env"])
        parsed = result_line(out)
        res = outcome(code, out, parsed)
        if parsed:
            res.update(parsed)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True) \
            if ctx.args.device == "cuda" and shutil_which("nvidia-smi") else None
        res["nvidia_smi"] = smi.stdout.strip() if smi is not None and smi.returncode == 0 else None
        return res

    item(ctx, "env", "machine", 0.0, run)  # always: every other figure is read against it


def shutil_which(name: str) -> Optional[str]:
    import shutil

    return shutil.which(name)


def peak_tflops(ctx: Context) -> Optional[float]:
    return ctx.rec.part("env")["items"].get("machine", {}).get("peak_tflops")


def part_smoke(ctx: Context) -> None:
    scale, args = ctx.scale, ctx.args
    estimate = scale.prior_s["smoke"]
    for model in scale.smoke_models:
        def run(model=model) -> dict:
            def cmd(tag):
                return [sys.executable, str(BENCH / "gpu_smoke.py"), "--model", model, "--steps",
                        str(args.smoke_steps), "--log-interval", "10", "--run-dir", str(ctx.work / f"smoke_{model}_{tag}")]
            res: dict = {}
            if args.device == "cuda":
                # The fp32 CPU reference runs beside the GPU run (the CPU is idle meanwhile).
                ref = subprocess.Popen(cmd("cpu"), cwd=REPO, env={**ctx.env, "CUDA_VISIBLE_DEVICES": ""},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
                code, out, _ = ctx.run("smoke", f"{model} on the device", cmd("device"))
                try:
                    ref_out, _ = ref.communicate(timeout=max(ctx.clock.left(), 1.0))
                except subprocess.TimeoutExpired:
                    kill_group(ref, signal.SIGKILL)
                    ref_out, _ = ref.communicate()
                with ctx.rec.log_path.open("a") as f:
                    f.write(f"\n# {model}: the fp32 CPU reference (CUDA_VISIBLE_DEVICES= {display(cmd('cpu'))}), "
                            f"exit {ref.returncode}\n{ref_out}")
                ctx.rec.results["commands"].append({"part": "smoke", "item": f"{model} fp32 CPU reference",
                                                    "cmd": "CUDA_VISIBLE_DEVICES= " + display(cmd("cpu")),
                                                    "exit": ref.returncode})
                reference = result_line(ref_out)
            else:
                code, out, _ = ctx.run("smoke", f"{model} on the CPU", cmd("device"))
                reference = None  # the device is the CPU: the run is its own fp32 reference
            ours = result_line(out)
            res.update(outcome(code, out, ours))
            if ours is None:
                return res
            res.update({k: ours[k] for k in ("device", "loss", "ms_per_step", "syncs_counted", "syncs_unlogged",
                                             "syncs_unlogged_steps", "syncs_logged", "syncs_where")})
            ref_loss = reference["loss"] if reference else ours["loss"]
            res["reference_loss"] = ref_loss
            res["reference"] = "fp32 on the CPU" if reference else "the same run (device is the CPU)"
            common_steps = [s for s in ours["loss"] if s in ref_loss]
            diff = max((abs(ours["loss"][s] - ref_loss[s]) for s in common_steps), default=None)
            losses = list(ours["loss"].values())
            res["max_loss_diff"] = diff
            res["loss_tracks"] = diff is not None and diff <= SMOKE_LOSS_TOL
            res["loss_falls"] = len(losses) >= 2 and losses[-1] < losses[0]
            if args.device == "cuda" and reference is None:
                res["loss_tracks"] = False
                res["error"] = "the CPU reference run failed: " + tail(ref_out)
            return res

        done = item(ctx, "smoke", model, estimate, run)
        if done and done.get("wall_s"):
            estimate = done["wall_s"]


def part_throughput(ctx: Context) -> None:
    """Our step for every preset first (one throughput.py run each), then the plain-PyTorch
    reference of the dense ones (reference_gpt.py, as throughput.py would run it), so a short
    budget loses references before presets."""
    scale = ctx.scale
    items = ctx.rec.part("throughput")["items"]
    estimate = scale.prior_s["throughput"]
    for model in scale.throughput_models:
        def run(model=model) -> dict:
            cmd = [sys.executable, str(BENCH / "throughput.py"), "--scale", ctx.args.scale, *scale.step_args,
                   "--models", model, "--dense", model, "--no-reference"]
            code, out, _ = ctx.run("throughput", model, cmd)
            parsed = result_line(out)
            res = outcome(code, out, parsed)
            r = parsed["results"].get(model, {}) if parsed else {}
            if "error" in r:
                res.update(status="failed", error=r["error"])
            elif r:
                res["ours"] = {"ms": r.get("ms"), "tokens_per_s": r.get("tokens/s"), "tflops": r.get("TFLOP/s/device"),
                               "memory_gb": r.get("memory (GB)"), "flops_per_token": r.get("flops/token"),
                               "loss_first_last": r.get("loss first/last")}
                res["bench_peak_tflops"] = parsed.get("peak_tflops_measured")
            return res

        done = item(ctx, "throughput", model, estimate, run)
        if done and done.get("status") == "done":
            estimate = done["wall_s"]
    estimate = scale.prior_s["reference"]
    for model in scale.with_reference:
        ours = items.get(model, {}).get("ours")
        if not ours:
            continue

        def run_ref(model=model, ours=ours) -> dict:
            cmd = [sys.executable, str(BENCH / "reference_gpt.py"), "--model", model, *scale.step_args]
            code, out, _ = ctx.run("throughput", f"{model} reference", cmd)
            parsed = result_line(out)
            res = outcome(code, out, parsed)
            if parsed:
                res["ms"], res["tokens_per_s"] = parsed.get("ms_per_step"), parsed.get("tokens_per_s")
                res["memory_gb"] = parsed.get("memory_gb")
                if res["tokens_per_s"] and ours.get("flops_per_token"):
                    res["tflops"] = ours["flops_per_token"] * res["tokens_per_s"] / 1e12
            return res

        done = item(ctx, "throughput", f"{model} (reference)", estimate, run_ref)
        if done and done.get("status") == "done":
            estimate = done["wall_s"]
            items[model]["reference"] = {k: done.get(k) for k in ("ms", "tokens_per_s", "tflops", "memory_gb")}
    # Ratios against the env part's peak and the dense twin, once all are in.
    items = ctx.rec.part("throughput")["items"]
    peak = peak_tflops(ctx)
    dense_ms = items.get(scale.dense_twin, {}).get("ours", {}).get("ms")
    for model, r in items.items():
        ours, ref = r.get("ours") or {}, r.get("reference") or {}
        if ours.get("tflops") and peak:
            ours["mfu"] = ours["tflops"] / peak
        if ours.get("ms") and dense_ms:
            ours["x_dense"] = ours["ms"] / dense_ms
        if ours.get("ms") and ref.get("ms"):
            r["ours_over_reference"] = ours["ms"] / ref["ms"]
    ctx.rec.save()


def script_item(ctx: Context, part: str, name: str, script: str, args, keep) -> None:
    """One budgeted item that runs a bench script printing a result line; ``keep(parsed)``: the
    fields of that line recorded with the outcome."""
    def run() -> dict:
        code, out, _ = ctx.run(part, name, [sys.executable, str(BENCH / script), *args])
        parsed = result_line(out)
        res = outcome(code, out, parsed)
        if parsed:
            res.update(keep(parsed))
        return res

    item(ctx, part, name, ctx.scale.prior_s[part], run)


def part_mod_layer(ctx: Context) -> None:
    script_item(ctx, "mod_layer", "capacities", "mod_layer.py", ctx.scale.mod_layer_args,
                lambda parsed: {k: v for k, v in parsed.items() if k != "args"})


def part_memory(ctx: Context) -> None:
    script_item(ctx, "memory", "recompute", "memory.py", ctx.scale.memory_args,
                lambda parsed: {"rows": parsed["rows"], "overrides": parsed["overrides"]})


def prepared_data(ctx: Context) -> Optional[Tuple[Path, Path]]:
    """(tokenizer model, indexed prefix) of the bundled corpus, made once for sampling and isoflop."""
    data = ctx.work / "data"
    tokenizer, prefix = data / "tokenizer.model", data / "corpus_text_document"
    if Path(str(prefix) + ".idx").is_file():
        return tokenizer, prefix
    corpus = REPO / "data_prep" / "corpus" / "corpus.jsonl"
    code, out, _ = ctx.run("data", "tokenizer", [sys.executable, "-m", "data_prep.train_tokenizer", "--input",
                                                 corpus, "--output-prefix", data / "tokenizer", "--vocab-size",
                                                 str(ctx.scale.tokenizer_vocab)])
    if code != 0:
        return None
    code, out, _ = ctx.run("data", "indexed dataset", [sys.executable, "-m", "data_prep.tokenize_corpus", "--input",
                                                       corpus, "--tokenizer-model", tokenizer, "--output-prefix",
                                                       prefix, "--workers", str(min(os.cpu_count() or 2, 8))])
    return (tokenizer, prefix) if code == 0 else None


def data_overrides(tokenizer: Path, prefix: Path) -> List[str]:
    return ["data=demo", f"data.tokenizer_model={tokenizer}", f"data.paths=[{prefix}]"]


def part_sampling(ctx: Context) -> None:
    scale = ctx.scale
    prior = scale.prior_s
    data: dict = {}

    def prep() -> dict:
        got = prepared_data(ctx)
        if got is None:
            return {"status": "failed", "error": "data preparation failed (suite.log)"}
        data["paths"] = got
        return {"tokenizer": str(got[0]), "prefix": str(got[1])}

    if not item(ctx, "sampling", "data", prior["prep"], prep) or "paths" not in data:
        return
    # Each twin trains for an equal part of what is left after sampling's own estimate.
    train_s = (ctx.clock.left() - prior["sample"]) / 2
    if train_s < prior["train"]:
        reason = (f"would overrun: each twin needs ~{prior['train']:.0f} s of training and sampling "
                  f"~{prior['sample']:.0f} s, {ctx.clock.left():.0f} s left of the part's share")
        for name in [f"train {m}" for m in scale.sampling_models] + ["sample"]:
            ctx.rec.part("sampling")["items"][name] = {"status": "skipped", "reason": reason}
        return
    checkpoints = []
    for model in scale.sampling_models:
        def train(model=model, train_s=train_s) -> dict:
            run_dir = ctx.work / f"sampling_{model}"
            cmd = [sys.executable, "-m", "mod_train.train", f"model={model}", *data_overrides(*data["paths"]),
                   f"train.max_steps={scale.sampling_max_steps}", "train.log_interval=10",
                   "train.eval_interval=1000000", f"checkpoint.save_interval={scale.sampling_max_steps}",
                   "tracking.enabled=false", f"train.run_dir={run_dir}", *scale.train_args]
            code, out, _ = ctx.run("sampling", f"train {model}", cmd, stop_after_s=train_s)
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
                if (run_dir / "metrics.jsonl").is_file() else []
            losses = [r for r in rows if "lm loss" in r]
            status = "done" if code in (0, 124) else "timed out" if code is None else "failed"
            res = {"status": status, "exit": code,
                   "steps": losses[-1]["step"] if losses else 0,
                   "loss_last": losses[-1]["lm loss"] if losses else None}
            if code is not None and code not in (0, 124):
                res["error"] = tail(out)
            elif (run_dir / "checkpoints").is_dir():
                checkpoints.append(run_dir / "checkpoints")
            return res

        item(ctx, "sampling", f"train {model}", prior["train"], train)
    if len(checkpoints) != 2:
        ctx.rec.part("sampling")["items"]["sample"] = {"status": "skipped", "reason": "no two trained checkpoints"}
        return

    def sample() -> dict:
        cmd = [sys.executable, str(BENCH / "sampling.py"), "--checkpoints", *checkpoints, "--batch", "1", "32",
               *scale.sampling_args]
        code, out, _ = ctx.run("sampling", "sample", cmd)
        parsed = result_line(out)
        res = outcome(code, out, parsed)
        if parsed:
            res["mod_over_dense"] = parsed["mod_over_dense"]
            res["rows"] = {k: {f: v[f] for f in ("batch", "tokens_per_s", "mod_routed_share")}
                           for k, v in parsed["rows"].items()}
        return res

    item(ctx, "sampling", "sample", prior["sample"], sample)


def part_isoflop(ctx: Context) -> None:
    scale, prior = ctx.scale, ctx.scale.prior_s
    variants = scale.isoflop_variants.split(",")
    # Seconds of training per variant once each has started up; the FLOP rate from the throughput
    # part's dense run of the same preset if there was one, else 30% of the measured peak.
    train_s = ctx.clock.left() / len(variants) - prior["isoflop_startup"]
    thr = ctx.rec.part("throughput")["items"].get(scale.isoflop_dense, {}).get("ours", {})
    rate = (thr["tflops"] if thr.get("tflops") else 0.3 * (peak_tflops(ctx) or 0.0)) * 1e12
    budget = 0.5 * rate * train_s  # half: evaluation, data loading and a margin
    if not ctx.clock.fits(prior["isoflop"]) or budget <= 0:
        ctx.rec.part("isoflop")["items"]["run"] = {
            "status": "skipped", "reason": f"would overrun: needs ~{prior['isoflop']:.0f} s, "
                                           f"{ctx.clock.left():.0f} s left of the part's share"}
        return

    def run() -> dict:
        got = prepared_data(ctx)
        if got is None:
            return {"status": "failed", "error": "data preparation failed (suite.log)"}
        cmd = [sys.executable, str(BENCH / "isoflop.py"), "--budget", f"{budget:.3g}", "--dense", scale.isoflop_dense,
               "--only", scale.isoflop_variants, "--no-mode", "--eval-iters", "10", *data_overrides(*got),
               *scale.train_args]
        code, out, _ = ctx.run("isoflop", "dense vs MoD", cmd)
        parsed = result_line(out)
        res = outcome(code, out, parsed)
        res["budget_flops"] = budget
        too_few = [line for line in out.splitlines() if "buys only" in line]
        if code not in (0, None) and too_few:  # the time left buys too few steps to compare
            res = {"status": "skipped", "reason": f"would overrun: {too_few[-1].strip()}", "budget_flops": budget}
        if parsed:
            res["rows"] = parsed["rows"]
        return res

    item(ctx, "isoflop", "run", 0.0, run)


PART_FUNCS = {"env": part_env, "smoke": part_smoke, "throughput": part_throughput, "mod_layer": part_mod_layer,
              "memory": part_memory,
              "sampling": part_sampling, "isoflop": part_isoflop}


# -------------------------------------------------------------------------------------------- summary
def fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def render_summary(results: dict) -> str:
    s, parts = results["suite"], results["parts"]
    env = parts.get("env", {}).get("items", {}).get("machine", {})
    out = ["# mod-train GPU check (bench/gpu_suite.py)", "",
           f"Command: `{s['command']}`", "",
           f"Started {s['started']} UTC on {s['host']}; device `{s['device']}`, scale `{s['scale']}`, "
           f"budget {s['budget_s']:.0f} s.", ""]
    if s.get("kit"):
        out += [f"Kit: {s['kit']}", ""]
    if env.get("status") == "done":
        out += [f"Machine: {env.get('device')} ({fmt(env.get('gpu_memory_gib'), '.0f')} GiB, {env.get('sms')} SMs), "
                f"nvidia-smi: {env.get('nvidia_smi') or '-'}; {env.get('cpu_count')} CPUs; Python {env.get('python')}, "
                f"torch {env.get('torch')} (CUDA {env.get('cuda')}), megatron-core {env.get('megatron_core')}, "
                f"deepspeed {env.get('deepspeed')}, hydra {env.get('hydra')}, pydantic {env.get('pydantic')}. "
                f"Measured matmul peak: **{fmt(env.get('peak_tflops'), '.1f')} TFLOP/s** ({env.get('peak_dtype')}).", ""]
        if env.get("fusions"):
            out += [f"Fused kernels as the runs decide them at start: {env['fusions'].removeprefix('fusions: ')}.", ""]
    out += ["## Parts", "", "| part | status | time share (s) | used (s) | note |", "|---|---|---:|---:|---|"]
    for name in PARTS:
        p = parts.get(name)
        if p:
            out.append(f"| {name} | {p['status']} | {fmt(p.get('allotted_s'), '.0f')} | {fmt(p.get('used_s'), '.0f')} | "
                       f"{p.get('reason', '')} |")
    out.append("")
    smoke = parts.get("smoke", {}).get("items", {})
    if smoke:
        reference = "the same run in fp32 on the CPU" if s["device"] == "cuda" else "the same run (the device is the CPU)"
        out += ["## bf16 smoke", "", f"Loss at logged steps vs {reference}, "
                f"tolerance {SMOKE_LOSS_TOL} nats; host syncs on unlogged steps (CUDA sync debug mode, from step 2).", "",
                "| model | status | loss (logged steps) | reference | max diff | tracks | syncs unlogged (steps) | syncs logged |",
                "|---|---|---|---|---:|---|---|---:|"]
        for m, r in smoke.items():
            loss = ", ".join(f"{v:.3f}" for v in r.get("loss", {}).values())
            ref = ", ".join(f"{v:.3f}" for v in r.get("reference_loss", {}).values())
            syncs = f"{r.get('syncs_unlogged')} ({r.get('syncs_unlogged_steps')})" if r.get("syncs_counted") else "not counted (CPU)"
            out.append(f"| {m} | {r['status']} {r.get('reason', r.get('error', ''))} | {loss} | {ref} | "
                       f"{fmt(r.get('max_loss_diff'), '.4f')} | {r.get('loss_tracks', '-')} | {syncs} | "
                       f"{r.get('syncs_logged', '-') if r.get('syncs_counted') else '-'} |")
        out.append("")
    thr = parts.get("throughput", {}).get("items", {})
    if thr:
        out += ["## Throughput (bench/throughput.py, one preset per run)", "",
                "| model | status | ms/step | tokens/s | TFLOP/s | MFU | mem GB | x dense | reference ms | ours / reference |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        peak = env.get("peak_tflops")
        for m, r in thr.items():
            o, ref = r.get("ours") or {}, r.get("reference") or {}
            if m.endswith("(reference)"):  # its own row: the plain-PyTorch GPT's figures
                o, ref = {**r, "mfu": r["tflops"] / peak if r.get("tflops") and peak else None}, {}
            note = r.get("reason", r.get("error", ""))
            out.append(f"| {m} | {r['status']} {note} | {fmt(o.get('ms'), '.1f')} | {fmt(o.get('tokens_per_s'), '.0f')} | "
                       f"{fmt(o.get('tflops'), '.2f')} | {fmt(o.get('mfu'), '.1%')} | {fmt(o.get('memory_gb'), '.1f')} | "
                       f"{fmt(o.get('x_dense'), '.3f')} | {fmt(ref.get('ms'), '.1f')} | {fmt(r.get('ours_over_reference'), '.3f')} |")
        out.append("")
    ml = parts.get("mod_layer", {}).get("items", {}).get("capacities")
    if ml:
        out += ["## MoD layer (bench/mod_layer.py, fwd+bwd, x dense)", ""]
        if ml["status"] == "done":
            caps = {k: v for k, v in ml.items() if k.startswith("mod_") and k.endswith("_ratio")}
            out += ["| dense ms | " + " | ".join(f"cap {k[4:-6]}" for k in caps) + " |",
                    "|---:|" + "---:|" * len(caps),
                    f"| {fmt(ml.get('dense_ms'), '.2f')} | " + " | ".join(f"{v:.3f}" for v in caps.values()) + " |", ""]
        else:
            out += [f"{ml['status']}: {ml.get('reason', ml.get('error', ''))}", ""]
    mem = parts.get("memory", {}).get("items", {}).get("recompute")
    if mem:
        out += ["## Memory (bench/memory.py: peak of a training step, activation recomputation)", ""]
        if mem.get("rows"):
            out += [f"`{' '.join(mem['overrides'])}`; per rank, MB.", "",
                    "| setting | ZeRO | DP | before | peak | step | x none | s/step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in mem["rows"]:
                if "error" in r:
                    out.append(f"| {r['setting']} | {r['zero']} | {r['dp']} | failed: {r['error']} | | | | |")
                    continue
                out.append(f"| {r['setting']} | {r['zero']} | {r['dp']} | {r['before'] / 1e6:.0f} | {r['peak'] / 1e6:.0f} | "
                           f"{r['step'] / 1e6:.0f} | {fmt(r.get('x_none'), '.3f')} | {fmt(r.get('s_per_step'), '.2f')} |")
        else:
            out.append(f"{mem['status']}: {mem.get('reason', mem.get('error', ''))}")
        out.append("")
    sam = parts.get("sampling", {}).get("items", {})
    if sam:
        out += ["## Sampling (bench/sampling.py, twins trained on the bundled corpus)", ""]
        for k, r in sam.items():
            if k.startswith("train"):
                out.append(f"- {k}: {r['status']} {r.get('reason', r.get('error', ''))} steps {r.get('steps', '-')}, "
                           f"last loss {fmt(r.get('loss_last'), '.3f')}")
        smp = sam.get("sample", {})
        if smp.get("rows"):
            out += ["", "| model | batch | tokens/s | MoD routed share |", "|---|---:|---:|---|"]
            for k, r in smp["rows"].items():
                share = ", ".join(f"{x:.0%}" for x in r["mod_routed_share"]) or "-"
                out.append(f"| {k} | {r['batch']} | {r['tokens_per_s']:.1f} | {share} |")
            out += ["", "MoD / dense: " + ", ".join(f"batch {b}: {x:.3f}x" for b, x in smp["mod_over_dense"].items())]
        elif smp:
            out.append(f"- sample: {smp['status']} {smp.get('reason', smp.get('error', ''))}")
        out.append("")
    iso = parts.get("isoflop", {}).get("items", {}).get("run")
    if iso:
        out += ["## isoFLOP (bench/isoflop.py)", ""]
        if iso.get("rows"):
            out += [f"Budget {iso['budget_flops']:.3g} training FLOPs per model.", "",
                    "| model | layers | steps | tokens | valid loss | ms/step |", "|---|---:|---:|---:|---:|---:|"]
            for r in iso["rows"]:
                out.append(f"| {r['name']} | {r.get('layers', '-')} | {r.get('steps', '-')} | {r.get('tokens', '-')} | "
                           f"{fmt(r.get('valid_loss'), '.4f')} | {fmt(r.get('ms_per_step'), '.1f')} |")
        else:
            out.append(f"{iso['status']}: {iso.get('reason', iso.get('error', ''))}")
        out.append("")
    out += ["## Commands", "", "Run from the repository root with PYTHONPATH=<kit site>:<repo> "
            "(full output in suite.log).", "", "| part | item | exit | s | command |", "|---|---|---|---:|---|"]
    for c in results["commands"]:
        out.append(f"| {c['part']} | {c['item']} | {c['exit']} | {fmt(c.get('wall_s'), '.1f')} | `{c['cmd']}` |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- main
def install_kit(kit: Path, site: Path) -> Tuple[str, str]:
    """pip install the kit's wheels into ``site`` with no registry; (the command, a one-line summary)."""
    manifest = json.loads((kit / "manifest.json").read_text())
    wheels = [str(kit / e["file"]) for e in manifest["wheels"]]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--disable-pip-version-check", "--target", str(site), *wheels]
    stamp = site / ".mod_train_kit"
    if stamp.is_file() and stamp.read_text() == json.dumps(manifest["wheels"]):
        return "(already installed) " + " ".join(cmd[:11]), _kit_line(manifest, kit)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"gpu_suite: installing the kit failed:\n{' '.join(cmd)}\n{r.stderr[-3000:]}")
    stamp.write_text(json.dumps(manifest["wheels"]))
    return " ".join(cmd[:11]) + f" {kit}/*.whl", _kit_line(manifest, kit)


def _kit_line(manifest: dict, kit: Path) -> str:
    names = ", ".join(f"{e['name']} {e['version']}" for e in manifest["wheels"])
    return f"{kit} ({manifest['python']}, {len(manifest['wheels'])} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB): {names}"


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out", help="result folder (default $OUT)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall time for everything (default 8 minutes)")
    p.add_argument("--kit", default=None, help="kit folder to install offline (bench/gpu_kit.py); none: use "
                                               "the packages this Python already has")
    p.add_argument("--site", default="/tmp/mod_train_kit_site", help="where the kit is installed")
    p.add_argument("--work", default=None, help="scratch folder (default <out>/../gpu_suite_work)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--scale", choices=sorted(SCALES), default=None, help="default: gpu on CUDA, tiny on CPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--smoke-steps", type=int, default=30)
    p.add_argument("--install-only", action="store_true", help="install the kit into --site, run nothing")
    p.add_argument("--probe-env", action="store_true", help=argparse.SUPPRESS)  # the env part's child
    args = p.parse_args(argv)
    if args.probe_env:
        print("RESULT " + json.dumps(probe_env()), flush=True)
        return {}
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")

    import torch  # the image's; everything else is imported by the children

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    args.scale = args.scale or ("gpu" if args.device == "cuda" else "tiny")
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.parent / (out.name + "_work")
    work.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    path = [str(REPO)]
    kit_line, install_cmd = None, None
    if args.kit:
        site = Path(args.site).resolve()
        install_cmd, kit_line = install_kit(Path(args.kit).resolve(), site)
        path.insert(0, str(site))
    if args.install_only:
        print(f"{install_cmd}\n# kit: {kit_line}")
        return {}
    env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    header = {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "bench/gpu_suite.py",
                                                          *(argv if argv is not None else sys.argv[1:])]),
              "install": install_cmd, "kit": kit_line, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)", "device": args.device,
              "scale": args.scale, "budget_s": args.budget_s, "smoke_loss_tol": SMOKE_LOSS_TOL, "shares": SCALES[args.scale].shares}
    rec = Recorder(out, header)
    if install_cmd:
        rec.log(f"$ {install_cmd}\n# kit: {kit_line}")
    ctx = Context(args, SCALES[args.scale], rec, env, work, deadline)
    for name in PARTS:
        if name not in parts:
            continue
        part = rec.part(name)
        shares = ctx.scale.shares
        shares_to_come = sum(shares[x] for x in PARTS[PARTS.index(name):] if x in parts)
        allotted = allot(deadline - time.monotonic(), shares[name], shares_to_come)
        if name == "env":  # cheap and needed by the rest: never starved by a small budget
            allotted = max(allotted, min(ENV_MIN_S, deadline - time.monotonic()))
        ctx.clock = Clock(allotted, deadline)
        part.update(status="running", allotted_s=round(allotted, 1))
        rec.save()
        rec.log(f"\n## part {name}: {allotted:.0f} s of {deadline - time.monotonic():.0f} s left")
        try:
            PART_FUNCS[name](ctx)
        except Exception as e:  # noqa: BLE001 - record and go on with the next part
            part["error"] = f"{type(e).__name__}: {e}"
        statuses = {i.get("status") for i in part["items"].values()}
        if not statuses or statuses == {"skipped"}:
            part["status"] = "skipped"
            part["reason"] = next((i.get("reason") for i in part["items"].values()), "nothing fitted")
        elif statuses == {"done"} and "error" not in part:
            part["status"] = "done"
        else:
            part["status"] = "partial"
            part["reason"] = ", ".join(f"{k}: {v['status']}" for k, v in part["items"].items() if v["status"] != "done")
        part["used_s"] = round(ctx.clock.used(), 1)
        rec.save()
    rec.results["suite"]["wall_s"] = round(time.monotonic() - t_start, 1)
    rec.save()
    rec.log(f"\ngpu_suite: done in {time.monotonic() - t_start:.0f} s; {out}/summary.md, results.json, suite.log")
    return rec.results


if __name__ == "__main__":
    main()
