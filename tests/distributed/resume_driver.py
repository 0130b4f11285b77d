"""Run under torchrun: for each case, train N steps straight, then N/2 + stop + resume N/2, in one
process group (imports are paid once per launch). Argument: a JSON file with
{"cases": [{"name": str, "overrides": [...]}], "out": dir}. Each run writes its metrics.jsonl."""

import json
import sys
from pathlib import Path

from mod_train.config.load import compose, to_config
from mod_train.trainer import run
from tests.helpers_train import run_dir_overrides


def straight_and_resumed(base: list, case_dir: Path, stop_after: int) -> None:
    """<case_dir>/straight: one run; <case_dir>/resumed: stopped after ``stop_after`` steps, resumed."""
    straight, resumed = case_dir / "straight", case_dir / "resumed"
    run(to_config(compose(base + run_dir_overrides(straight))), keep_process_group=True)
    run(to_config(compose(base + run_dir_overrides(resumed) + [f"train.exit_interval={stop_after}"])),
        keep_process_group=True)
    run(to_config(compose(base + run_dir_overrides(resumed) + ["checkpoint.resume=auto"])),
        keep_process_group=True)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for case in spec["cases"]:
        straight_and_resumed(case["overrides"], out / case["name"], case.get("stop_after", 10))


if __name__ == "__main__":
    main(sys.argv[1])
