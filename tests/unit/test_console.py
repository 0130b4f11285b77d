"""The quiet console: only rank 0 prints, known dependency warnings are counted and summarised once,
MOD_TRAIN_LOGLEVEL / train.log_all_ranks bring them back. Each case installs the console in a fresh
Python process (it replaces sys.stdout and warnings.showwarning), without torch: fast."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap

import pytest

from mod_train.tracking.console import ConsolePolicy, QuietConsole, is_known_dependency_warning

GENERATED = "a generated text: Apex is not installed, it is deprecated"
SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from mod_train.tracking.console import configure_console
    configure_console(log_all_ranks={all_ranks})
    print("hello from the trainer")
    print("{generated}")
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
    warnings.warn("Apex is not installed. Falling back to Torch Norm")
    warnings.warn("something new about our own code")
    logging.getLogger("megatron.core.x").warning("Megatron-FSDP without Transformer Engine.")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
    logging.getLogger("megatron.core.y").info("an INFO line of a dependency")
    logging.getLogger("mod_train").error("a real error")
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
""")


def run_rank(rank: int, level: str = "", all_ranks: bool = False) -> str:
    env = {"RANK": str(rank), "PATH": "/usr/bin:/bin"}
    if level:
        env["MOD_TRAIN_LOGLEVEL"] = level
    # logging as Hydra leaves it: a root handler at INFO
    code = "import logging; logging.basicConfig(level=logging.INFO)\n" + SCRIPT.format(all_ranks=all_ranks, generated=GENERATED)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_rank_0_prints_its_own_lines_and_one_summary():
    out = run_rank(0)
    assert "hello from the trainer" in out
    assert GENERATED in out  # program output stays, even when it says a known word
    out = out.replace(GENERATED, "")
    assert "something new about our own code" in out  # unknown warnings still show
    assert "a real error" in out
    for noise in ("Transformer Engine", "Apex", "Megatron-FSDP", "Setting accelerator", "built successfully",
                  "an INFO line"):
        assert noise not in out, out
    summary = [line for line in out.splitlines() if "suppressed" in line]
    assert summary == ["mod-train: suppressed 5 known dependency warnings (set MOD_TRAIN_LOGLEVEL=INFO to see them)"]


def test_other_ranks_print_only_errors():
    out = run_rank(1)
    assert out.strip().splitlines() == ["ERROR:mod_train:a real error"], out


def test_log_all_ranks_lets_another_rank_print_but_keeps_the_summary():
    out = run_rank(1, all_ranks=True)
    assert "hello from the trainer" in out and "something new" in out and GENERATED in out
    assert "Apex" not in out.replace(GENERATED, "")
    assert "suppressed 5 known dependency warnings" in out


@pytest.mark.parametrize("rank", [0, 1])
def test_loglevel_info_brings_everything_back_on_every_rank(rank):
    out = run_rank(rank, level="INFO")
    for line in ("hello from the trainer", "Transformer Engine and Apex", "Megatron-FSDP", "Setting accelerator",
                 "built successfully", "an INFO line", "a real error"):
        assert line in out, (line, out)
    assert "suppressed" not in out


def test_policy_from_env():
    assert ConsolePolicy.from_env(0) == ConsolePolicy(0, logging.WARNING, True, True)
    assert ConsolePolicy.from_env(3) == ConsolePolicy(3, logging.WARNING, False, True)
    assert ConsolePolicy.from_env(3, log_all_ranks=True).show_this_rank
    warning = ConsolePolicy.from_env(3, env_level="warning")  # shown as is, but only on rank 0
    assert warning == ConsolePolicy(3, logging.WARNING, False, False)
    assert ConsolePolicy.from_env(2, env_level="DEBUG") == ConsolePolicy(2, logging.DEBUG, True, False)
    with pytest.raises(ValueError, match="MOD_TRAIN_LOGLEVEL='LOUD'"):
        ConsolePolicy.from_env(0, env_level="LOUD")


def test_counting_and_known_patterns():
    console = QuietConsole(ConsolePolicy.from_env(0))
    assert not console.allow("UserWarning: Apex is not installed. Falling back to Torch Norm")
    assert not console.allow("`torch.distributed.all_gather_into_tensor` is deprecated.")
    assert console.allow("lm loss went up")
    assert console.allow("Apex is not installed", logging.ERROR)  # errors always show
    assert console.suppressed == 2 and "suppressed 2 known" in console.summary()
    assert not is_known_dependency_warning("MLflow tracking at http://x is unreachable")
    # stdout: only the known prints go, never program output that mentions a known word
    assert not console.allow_print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert console.allow_print("The API was deprecated in the last version")
    assert console.suppressed == 3
    assert QuietConsole(ConsolePolicy.from_env(0)).summary() is None  # nothing suppressed: no line
