"""The benchmarks under bench/ run end to end on CPU at tiny sizes (their GPU figures are measured
on a GPU machine; here we check that the commands work and report what they claim to)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def test_throughput_bench_trains_each_preset_and_the_reference(tmp_path):
    out = tmp_path / "throughput.json"
    r = subprocess.run([sys.executable, "bench/throughput.py", "--scale", "tiny", "--models", "tiny", "tiny_mod",
                        "--vocab", "512", "--steps", "3", "--warmup", "1", "--json", str(out)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(out.read_text())
    res = summary["results"]
    assert set(res) == {"tiny", "tiny_mod", "tiny (reference)"}
    assert not [name for name, row in res.items() if "error" in row], res
    for row in res.values():
        assert row["ms"] > 0 and 0 < row["mfu"] < 1.5  # 1.5: the CPU's matmul peak is measured, noisy
    assert res["tiny"]["x_dense"] == 1.0 and res["tiny_mod"]["x_dense"] > 0
    # MoD counts only routed tokens (12.5% of layers 1 and 3) plus its routers.
    assert res["tiny_mod"]["flops/token"] < 0.8 * res["tiny"]["flops/token"]
    assert summary["tiny_ours_vs_reference"] > 0
    assert "our step / reference step" in r.stdout


def test_reference_gpt_has_the_shape_of_our_dense_model(megatron_tp1):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from reference_gpt import from_preset
    finally:
        sys.path.remove(str(REPO / "bench"))
    from mod_train.model.build import build_model_chunks, count_parameters

    for preset in ("tiny", "gpt_350m"):
        with torch.device("meta"):
            reference, cfg, d = from_preset(preset, 32000)
            ours = build_model_chunks(cfg, d)
        assert sum(p.numel() for p in reference.parameters()) == count_parameters(ours), preset
    with pytest.raises(SystemExit, match="not a dense model"):
        from_preset("tiny_mod", 512)


def test_mod_layer_bench_prints_a_ratio_per_capacity():
    r = subprocess.run([sys.executable, "bench/mod_layer.py", "--hidden", "32", "--heads", "4", "--seq", "64",
                        "--batch", "2", "--iters", "1", "--warmup", "1", "--rounds", "1"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert {f"mod_{c}_ratio" for c in (1.0, 0.5, 0.25, 0.125)} <= set(result)
    assert all(result[f"mod_{c}_ratio"] > 0 for c in (1.0, 0.5, 0.25, 0.125))


def test_sampling_bench_reports_speed_and_routed_share():
    r = subprocess.run([sys.executable, "bench/sampling.py", "--models", "tiny", "tiny_mod", "--vocab", "512",
                        "--prompt-len", "4", "--new-tokens", "8", "--repeats", "1", "--batch", "1", "3"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rows = result["rows"]
    assert rows["dense b1"]["tokens"] == rows["mod b1"]["tokens"] == 12
    assert rows["dense b3"]["tokens"] == rows["mod b3"]["tokens"] == 36
    for batch in (1, 3):
        mod = rows[f"mod b{batch}"]
        assert rows[f"dense b{batch}"]["mod_routed_share"] == []
        assert len(mod["mod_routed_share"]) == 2 and all(0 <= s <= 1 for s in mod["mod_routed_share"])
        assert result["mod_over_dense"][str(batch)] > 0


def test_isoflop_bench_spends_the_same_budget_on_each_model(tiny_data, tmp_path):
    out = tmp_path / "isoflop.json"
    budget = 2e10
    r = subprocess.run([sys.executable, "bench/isoflop.py", "--budget", str(budget), "--dense", "tiny",
                        "--only", "dense,mod_matched", "--eval-iters", "2", "--json", str(out),
                        f"data.tokenizer_model={tiny_data['tokenizer']}", f"data.paths=[{tiny_data['prefix']}]"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "mod_matched"}
    for row in rows.values():
        step_flops = row["flops"] / row["steps"]
        assert budget - step_flops < row["flops"] <= budget  # as many whole steps as the budget buys
        assert 0 < row["valid_loss"] < 10 and row["train_loss"] is not None
    # The FLOP-matched MoD model is deeper (MoD layers are cheap) and within a layer's FLOPs of dense.
    dense, matched = rows["dense"], rows["mod_matched"]
    assert matched["layers"] > dense["layers"]
    assert abs(matched["forward_flops_per_token"] - dense["forward_flops_per_token"]) < \
        0.25 * dense["forward_flops_per_token"]
    assert "valid loss" in r.stdout


def test_mock_data_trains_and_save_false_writes_no_checkpoint(tmp_path):
    """`data=mock` needs no tokenizer or files; `checkpoint.save=false` leaves no checkpoint, even
    at max_steps where a checkpoint is otherwise always written."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mod_train.train", "data=mock", "model.vocab_size=300",
                        "train.max_steps=3", "train.log_interval=1", "checkpoint.save=false",
                        "tracking.enabled=false", f"train.run_dir={run}"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "lm loss" in row] == [1, 2, 3]
    assert all(0 < row["lm loss"] < 10 for row in rows if "lm loss" in row)
    assert not (run / "checkpoints").exists() and "saved checkpoint" not in r.stdout
