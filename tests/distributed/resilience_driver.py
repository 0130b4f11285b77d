"""Run under torchrun: several training runs in one process group (imports are paid once per
launch). Argument: a JSON file {"cases": [{"name": str, "overrides": [...]}], "out": dir}; each
case trains in <out>/<name> and writes its metrics.jsonl and checkpoints."""

import json
import sys
from pathlib import Path

from mod_train.config.load import compose, to_config
from mod_train.trainer import run
from tests.helpers_train import run_dir_overrides


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for case in spec["cases"]:
        run(to_config(compose(case["overrides"] + run_dir_overrides(out / case["name"]))), keep_process_group=True)


if __name__ == "__main__":
    main(sys.argv[1])
