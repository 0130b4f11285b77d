"""`total FLOPs` through the trainer (one process, two launches): integrated MoDE is charged at the
no-op share measured over each logged interval, the total survives a stop and resume, and MFU's
per-token count is the same measured one."""

import math
import subprocess
import sys

import pytest

from tests.helpers_train import REPO, losses, run_dir_overrides, tiny_overrides


@pytest.mark.slow
def test_integrated_mode_total_flops_at_the_measured_noop_share_across_resume(tiny_data, tmp_path):
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.model.flops import train_flops_per_token

    run = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_data, "model=tiny_mode_integrated", "train.max_steps=6",
                                 "checkpoint.save_interval=1000", "tracking.enabled=false"), *run_dir_overrides(run)]
    for extra in (["train.exit_interval=3"], ["checkpoint.resume=auto"]):  # stop at 3, resume to 6
        r = subprocess.run([sys.executable, "-m", "mod_train.train", *overrides, *extra], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    cfg = to_config(compose([o for o in overrides if not o.startswith(("data.", "train.run_dir", "tracking."))]
                            + ["model.vocab_size=512"]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    tokens_per_step = d.global_batch_size * cfg.model.seq_length

    def flops(noop):
        return train_flops_per_token(cfg.model, d.ffn_hidden_size, d.padded_vocab_size, d.mod_layers,
                                     d.mod_capacities, d.moe_layers, noop_fraction=noop)

    # log_interval=1: each step is its own interval; its share is the mean over the MoE layers of
    # the logged per-layer no-op share (one micro-batch size, so slot-weighted == step mean).
    noop = {layer: losses(run, f"moe/layer{layer + 1}/noop_frac") for layer in d.moe_layers}
    total = losses(run, "total FLOPs")
    assert sorted(total) == list(range(1, 7))
    expected = 0.0
    for step in range(1, 7):
        share = sum(noop[layer][step] for layer in d.moe_layers) / len(d.moe_layers)
        assert 0.0 < share < 1.0
        expected += flops(share) * tokens_per_step
        assert math.isclose(total[step], expected, rel_tol=1e-6), (step, total[step], expected)
    assert total[6] < 6 * flops(0.0) * tokens_per_step  # no-op slots cost nothing
    # throughput uses the same measured count
    tflops = losses(run, "TFLOP/s/device")
    tokens_per_s = losses(run, "tokens/s")
    share6 = sum(noop[layer][6] for layer in d.moe_layers) / len(d.moe_layers)
    assert math.isclose(tflops[6], flops(share6) * tokens_per_s[6] / 1e12, rel_tol=1e-6)
