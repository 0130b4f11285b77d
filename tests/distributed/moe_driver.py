"""Run under torchrun: the MoE / MoDE cases of tests/distributed/test_moe.py in one process group.

Argument: a JSON file {"out": dir, "cases": [...]}; each case is one of
  {"kind": "weights", "name", "overrides"}: build the model only; rank 0 writes every parameter,
      experts under their *global* index, to <out>/<name>/weights.pt;
  {"kind": "train", "name", "overrides"}: one run into <out>/<name>;
  {"kind": "resume", "name", "overrides", "stop_after"}: <name>/straight, and <name>/resumed
      stopped after stop_after steps and resumed (like resume_driver.py).
"""

import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mod_train.config.load import compose, to_config
from mod_train.trainer import run
from tests.distributed.resume_driver import straight_and_resumed
from tests.helpers_train import run_dir_overrides


def _global_name(name: str, ep_rank: int, num_local: int) -> str:
    m = re.search(r"local_experts\.(\d+)\.", name)
    if m is None:
        return name
    return name[: m.start(1)] + str(ep_rank * num_local + int(m.group(1))) + name[m.end(1):]


def dump_weights(overrides, path: Path) -> None:
    from megatron.core import parallel_state as ps

    from mod_train.config.validate import validate
    from mod_train.distributed.init import init_distributed, seed_everything, shutdown
    from mod_train.model.build import build_model_chunks

    cfg = to_config(compose(overrides))
    derived = validate(cfg)
    init_distributed(cfg.parallel, cfg.train.seed)
    seed_everything(cfg.train.seed)  # as Trainer does before building the model
    chunks = build_model_chunks(cfg, derived)
    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    num_local = cfg.model.moe.num_experts // ep
    local = {_global_name(n, ep_rank, num_local): p.detach().clone() for n, p in chunks[0].named_parameters()}
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    if dist.get_rank() == 0:
        merged = {}
        for part in everything:
            for name, tensor in part.items():
                if name in merged:  # replicated (dense, or the same expert on another DP rank)
                    assert torch.equal(merged[name], tensor), f"{name} differs between ranks"
                merged[name] = tensor
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(merged, path)
    shutdown(keep_process_group=True)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for case in spec["cases"]:
        base, name = case["overrides"], case["name"]
        if case["kind"] == "weights":
            dump_weights(base, out / name / "weights.pt")
        elif case["kind"] == "train":
            run(to_config(compose(base + run_dir_overrides(out / name))), keep_process_group=True)
        else:
            straight_and_resumed(base, out / name, case["stop_after"])


if __name__ == "__main__":
    main(sys.argv[1])
