"""`mod-launch`: run `mod-train` on N local processes via torchrun, with the same Hydra overrides.

    mod-launch --nproc 2 model=tiny parallel.zero_stage=2 train.max_steps=50

The config is composed and validated here first, so a layout that does not fit N processes
fails before any process starts (exit code 2, the message as ``mod-train`` prints it). The run
directory is locked for the whole launch (one job per run directory, ``mod_train/run_lock.py``);
SIGTERM/SIGINT/SIGHUP are passed on to torchrun, which stops the ranks (they checkpoint at the end
of their step), and if ``mod-launch`` itself dies torchrun and the ranks die with it
(``mod_train/distributed/parent_death.py``), so no rank outlives its launcher.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import List, Optional, Sequence

from mod_train.distributed.parent_death import parent_death_preexec
from mod_train.distributed.world import free_port


def torchrun_command(nproc: int, overrides: Sequence[str], master_port: Optional[int] = None) -> List[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc), "--nnodes", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(master_port or free_port()),
        "-m", "mod_train.train", *overrides,
    ]


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def check_config(nproc: int, overrides: Sequence[str], start: bool = False):
    """Compose and validate for ``nproc`` processes; with ``start`` also the preflight checks
    (checkpoint fit, run-directory lock, storage): returns the held RunLock then."""
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import ConfigError, validate

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (processes on this machine), got {nproc}.")
    cfg = to_config(compose(overrides))
    derived = validate(cfg, world_size=nproc)
    if not start:
        return None
    from mod_train.preflight import preflight

    return preflight(cfg, derived, main_rank=True, overrides=overrides)


def launch(nproc: int, overrides: Sequence[str], env: Optional[dict] = None, check: bool = True) -> int:
    lock = check_config(nproc, overrides, start=True) if check else None
    run_env = dict(os.environ if env is None else env)
    # Two cores shared by N ranks: one intra-op thread per rank avoids oversubscription.
    run_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    if lock is not None:
        run_env = lock.export_env(run_env)  # rank 0 joins our lock instead of refusing it
    previous = {}
    child: Optional[subprocess.Popen] = None

    def forward(signum, _frame) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    try:
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        # torchrun gets SIGTERM if mod-launch dies (its graceful path: it stops the ranks, which
        # checkpoint at the end of the step); the ranks get SIGKILL if torchrun dies.
        child = subprocess.Popen(torchrun_command(nproc, overrides), env=run_env,
                                 preexec_fn=parent_death_preexec(signal.SIGTERM))
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # pragma: no cover - SIGINT is forwarded above
                continue
    finally:
        if child is not None and child.poll() is None:  # an exception here: never leave torchrun behind
            child.kill()
            child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if lock is not None:
            lock.release()


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
