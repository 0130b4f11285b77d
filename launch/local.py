"""`mod-launch`: run `mod-train` on N local processes via torchrun, with the same Hydra overrides.

    mod-launch --nproc 2 model=tiny parallel.zero_stage=2 train.max_steps=50

The config is composed and validated here first, so a layout that does not fit N processes
fails before any process starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional, Sequence

from mod_train.distributed.world import free_port


def torchrun_command(nproc: int, overrides: Sequence[str], master_port: Optional[int] = None) -> List[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc), "--nnodes", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(master_port or free_port()),
        "-m", "mod_train.train", *overrides,
    ]


def check_config(nproc: int, overrides: Sequence[str]) -> None:
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate

    validate(to_config(compose(overrides)), world_size=nproc)


def launch(nproc: int, overrides: Sequence[str], env: Optional[dict] = None, check: bool = True) -> int:
    if check:
        check_config(nproc, overrides)
    run_env = dict(os.environ if env is None else env)
    # Two cores shared by N ranks: one intra-op thread per rank avoids oversubscription.
    run_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(nproc, overrides), env=run_env)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="mod-launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (GPUs, or CPU ranks)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny train.max_steps=50")
    args = parser.parse_args(argv)
    from mod_train.config.validate import ConfigError

    try:
        code = launch(args.nproc, args.overrides)
    except ConfigError as e:
        print(f"mod-launch: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
