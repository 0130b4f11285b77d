"""Run under torchrun: a list of jobs in ONE process group (imports and the group are paid once).

Argument: a JSON file ``{"jobs": [...]}``; each job is one of

    {"kind": "init",   "overrides": [...], "out": dir}        build the model with these overrides
                                                              (seeded as mod-train does) and write it
                                                              with model_io.save_model
    {"kind": "train",  "overrides": [...], "run_dir": dir}    mod-train (metrics.jsonl, checkpoints)
    {"kind": "export", "checkpoint": dir, "out": file}        mod-export (world of one only)

Jobs run in order; parallel_state is torn down and rebuilt between them (different TP/PP/DP per
job in the same process group).
"""

import json
import sys
from pathlib import Path


def _init(job: dict) -> None:
    from mod_train.checkpoint.model_io import save_model
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.distributed.init import init_distributed, seed_everything, shutdown
    from mod_train.model.build import build_model_chunks

    cfg = to_config(compose(job["overrides"]))
    derived = validate(cfg)
    init_distributed(cfg.parallel, cfg.train.seed)
    seed_everything(cfg.train.seed)
    chunks = build_model_chunks(cfg, derived)
    save_model(chunks, job["out"])
    shutdown(keep_process_group=True)


def _train(job: dict) -> None:
    from mod_train.config.load import compose, to_config
    from mod_train.trainer import run
    from tests.helpers_train import run_dir_overrides

    run(to_config(compose(job["overrides"] + run_dir_overrides(Path(job["run_dir"])))), keep_process_group=True)


def _export(job: dict) -> None:
    from mod_train.inference.export import export_checkpoint

    export_checkpoint(job["checkpoint"], job["out"])


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    handlers = {"init": _init, "train": _train, "export": _export}
    for job in spec["jobs"]:
        handlers[job["kind"]](job)


if __name__ == "__main__":
    main(sys.argv[1])
