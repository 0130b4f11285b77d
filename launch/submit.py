"""`mod-submit`: run mod-train as Slurm jobs, with the same Hydra overrides as mod-launch.

    mod-submit [train] [--dry-run] [-m/--multirun] OVERRIDES...     one training job (per sweep point)
    mod-submit prep    [--dry-run] [--no-train]  OVERRIDES...     tokenizer -> tokenization array -> merge
                                                                  -> training, chained with afterok

The config is composed and validated for the allocation first (world size = slurm.nodes x
slurm.gpus_per_node, or x slurm.procs_per_node on CPU clusters); the rendered scripts are written
to <train.run_dir>/slurm/ and kept there; --dry-run prints them instead of calling sbatch.

    mod-submit slurm=gpu slurm.nodes=4 slurm.partition=batch slurm.account=proj parallel.tp=4 parallel.pp=2 \\
        train.run_dir=runs/big train.max_steps=100000
    mod-submit prep 'slurm.prep.inputs=[/data/raw/*.jsonl]' slurm.prep.vocab_size=32000 \\
        data.tokenizer_model=/data/tok/tok.model 'data.paths=[/data/tok/corpus]' train.run_dir=runs/big
    mod-submit -m model.mod.capacity=0.125,0.25,0.5 train.run_dir=runs/capacity     # 3 jobs

See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from launch import slurm as S


# ---------------------------------------------------------------------------------------- sweeps
def sweep_points(overrides: Sequence[str]) -> List[List[str]]:
    """Hydra multirun semantics: the cartesian product of every sweep (a,b / range() / choice())."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def _slug(text: str) -> str:
    # Only characters that need no quoting in a Hydra override or a shell (no "=", ",", "/").
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")[:80]


def point_overrides(base: Sequence[str], point: Sequence[str], index: int, run_dir: str) -> List[str]:
    """A sweep point's overrides with its own train.run_dir (<run_dir>/<index>_<key>-<value>_...),
    unless the sweep sets train.run_dir itself."""
    swept = [p for p in point if p not in base]
    if any(p.split("=", 1)[0].lstrip("+~") == "train.run_dir" for p in swept):
        return list(point)
    label = "_".join(_slug(s.split("=", 1)[0].split(".")[-1]) + "-" + _slug(s.split("=", 1)[1]) for s in swept)
    own = f"train.run_dir={run_dir.rstrip('/')}/{index}_{label}"
    return [p for p in point if p.split("=", 1)[0].lstrip("+~") != "train.run_dir"] + [own]


# ---------------------------------------------------------------------------------------- modes
def _compose(overrides: Sequence[str]):
    from mod_train.config.load import compose, to_config

    return to_config(compose(list(overrides)))


def _show(title: str, path: Path, text: str) -> None:
    print(f"# ===== {title}: {path}\n{text}", flush=True)


def submit_train(overrides: Sequence[str], dry_run: bool = False, check_files: bool = True,
                 dependency: Optional[str] = None, cfg=None) -> Optional[str]:
    cfg = cfg or _compose(overrides)
    alloc = S.check(cfg, check_files=check_files)
    paths = S.run_paths(cfg)
    script = S.write_train_files(cfg, S.render_train(cfg, overrides, alloc, paths), paths)
    if dry_run:
        _show("training job", script, script.read_text())
        print(f"# would run: sbatch --parsable{' --dependency=' + dependency if dependency else ''} {script}")
        return None
    job = S.sbatch(script, dependency)
    S.record_submission(paths, {"stage": "train", "job": job, "dependency": dependency,
                                "overrides": list(overrides)})
    print(f"submitted training job {job}: {alloc.nodes} node(s) x {alloc.procs_per_node} rank(s) "
          f"(world {alloc.world_size}); log {paths.slurm_dir}/train-{job}.out", flush=True)
    return job


def submit_prep(overrides: Sequence[str], dry_run: bool = False, train: bool = True,
                dependency: Optional[str] = None) -> dict:
    """Tokenizer job, tokenization array, merge job and (unless train=False) the training job."""
    cfg = _compose(overrides)
    paths = S.run_paths(cfg)
    plan = S.prep_plan(cfg, paths)
    if train:
        S.check(cfg, check_files=False, vocab_size=cfg.slurm.prep.vocab_size)
    scripts = S.render_prep(cfg, plan, paths)
    sd = paths.slurm_dir
    sd.mkdir(parents=True, exist_ok=True)
    (sd / "shards.txt").write_text("".join(f + "\n" for f in plan.inputs))
    for name, text in scripts.items():
        (sd / name).write_text(text)
        (sd / name).chmod(0o755)
    train_script = None
    if train:
        train_script = S.write_train_files(cfg, S.render_train(cfg, overrides, paths=paths), paths)
    stages = [("tokenizer", sd / "prep_tokenizer.sbatch"), ("tokenize", sd / "prep_tokenize.sbatch"),
              ("merge", sd / "prep_merge.sbatch")] + ([("train", train_script)] if train else [])
    if dry_run:
        for stage, path in stages:
            _show(stage, path, path.read_text())
        print(f"# {len(plan.inputs)} shard(s) from {sd / 'shards.txt'} into {plan.shard_dir}")
        dep = dependency
        for stage, path in stages:
            print(f"# would run: sbatch --parsable{' --dependency=' + dep if dep else ''} {path}")
            dep = f"afterok:<{stage} job id>"
        return {}
    jobs = {}
    dep = dependency
    for stage, path in stages:
        jobs[stage] = S.sbatch(path, dep)
        dep = f"afterok:{jobs[stage]}"
    S.record_submission(paths, {"stage": "prep", "jobs": jobs, "overrides": list(overrides)})
    print(f"submitted: tokenizer {jobs['tokenizer']} -> tokenization array {jobs['tokenize']} "
          f"({len(plan.inputs)} task(s)) -> merge {jobs['merge']}"
          + (f" -> training {jobs['train']}" if train else "") + f"; scripts and logs in {sd}", flush=True)
    return jobs


def submit_sweep(overrides: Sequence[str], dry_run: bool = False, check_files: bool = True,
                 dependency: Optional[str] = None) -> List[Optional[str]]:
    """One Slurm job per point of a Hydra sweep, each in its own run directory."""
    points = sweep_points(overrides)
    base = [o for o in overrides if o in points[0] and all(o in p for p in points)]
    run_dir = _compose([o for o in points[0]]).train.run_dir
    jobs = []
    # Validate every point before submitting any, so a bad point does not leave half a sweep queued.
    planned = []
    for i, point in enumerate(points):
        ov = point_overrides(base, point, i, run_dir) if len(points) > 1 else point
        cfg = _compose(ov)
        S.check(cfg, check_files=check_files)
        planned.append((ov, cfg))
    for ov, cfg in planned:
        jobs.append(submit_train(ov, dry_run=dry_run, check_files=check_files, dependency=dependency, cfg=cfg))
    return jobs


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "train"
    if argv and argv[0] in ("train", "prep"):
        mode = argv.pop(0)
    p = argparse.ArgumentParser(prog=f"mod-submit {mode}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="render and print the scripts, do not submit")
    p.add_argument("--dependency", help="sbatch --dependency for the first job, e.g. afterok:1234")
    if mode == "train":
        p.add_argument("-m", "--multirun", action="store_true", help="one job per point of the Hydra sweep")
        p.add_argument("--no-check-files", action="store_true",
                       help="do not require data/tokenizer files on this machine (they exist only on the cluster)")
    else:
        p.add_argument("--no-train", action="store_true", help="only prepare the data")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. slurm.nodes=2 train.max_steps=1000")
    args = p.parse_args(argv)
    from mod_train.config.validate import ConfigError

    try:
        if mode == "prep":
            submit_prep(args.overrides, dry_run=args.dry_run, train=not args.no_train, dependency=args.dependency)
        elif args.multirun:
            submit_sweep(args.overrides, args.dry_run, not args.no_check_files, args.dependency)
        else:
            submit_train(args.overrides, args.dry_run, not args.no_check_files, args.dependency)
    except ConfigError as e:
        print(f"mod-submit: configuration error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
