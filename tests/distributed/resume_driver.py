"""Run under torchrun: for each case, train N steps straight, then N/2 + stop + resume N/2, in one
process group (imports are paid once per launch). Argument: a JSON file with
{"cases": [{"name": str, "overrides": [...]}], "out": dir}. Each run writes its metrics.jsonl."""

import json
import sys
from pathlib import Path

from mod_train.config.load import compose, to_config
from mod_train.train import run
from tests.helpers_train import run_dir_overrides


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for case in spec["cases"]:
        base = case["overrides"]
        straight = out / case["name"] / "straight"
        resumed = out / case["name"] / "resumed"
        run(to_config(compose(base + run_dir_overrides(straight))), keep_process_group=True)
        half = case.get("stop_after", 10)
        run(to_config(compose(base + run_dir_overrides(resumed) + [f"train.exit_interval={half}"])),
            keep_process_group=True)
        run(to_config(compose(base + run_dir_overrides(resumed) + ["checkpoint.resume=auto"])),
            keep_process_group=True)


if __name__ == "__main__":
    main(sys.argv[1])
