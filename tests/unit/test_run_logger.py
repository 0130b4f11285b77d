"""The run logger and its sinks (the main rank's logger against an MLflow store is in
test_tracking.py, which shares one migrated store), throughput/MFU, the routing heatmap, metric names, and the
tracking package's import shape (no circle with the trainer, no private names across files)."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mod_train.config.schema import TrackingConfig
from mod_train.tracking import keys as K
from mod_train.tracking.flatten import run_params
from mod_train.tracking.run_logger import RunLogger, open_run_logger
from mod_train.tracking.sinks import Sink, TensorBoardMissing, TensorBoardSink, check_tensorboard
from mod_train.tracking.throughput import throughput_metrics

REPO = Path(__file__).resolve().parents[2]
TRACKING = REPO / "mod_train" / "tracking"


class RecordingSink(Sink):
    def __init__(self):
        self.rows, self.artifacts, self.closed = [], [], None

    def log_metrics(self, step, metrics):
        self.rows.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))

    def close(self, status):
        self.closed = status


def test_run_logger_fans_out_to_every_sink():
    a, b = RecordingSink(), RecordingSink()
    logger = RunLogger([a, b], run_id="abc")
    logger.log(3, {K.LM_LOSS: 2.5})
    logger.log_artifact("x.png", artifact_path="routing")
    logger.close("RUNNING")
    for sink in (a, b):
        assert sink.rows == [(3, {K.LM_LOSS: 2.5})]
        assert sink.artifacts == [("x.png", "routing")]
        assert sink.closed == "RUNNING"
    assert logger.run_id == "abc"  # no MLflow sink: the id it was opened with (the one to resume)


def _open(tmp_path, is_main=True, **tracking):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="runlogger", **tracking)
    config = {"model": {"hidden_size": 8}, "train": {"exit_interval": 5}, "checkpoint": {"resume": "auto"}}
    return open_run_logger(cfg, tmp_path / "run", is_main=is_main, max_steps=10, run_id=None, config=config,
                           resolved_yaml="model:\n  hidden_size: 8\n", tags={"model.family": "dense"})


def test_other_ranks_get_a_logger_without_sinks(tmp_path, capsys):
    logger = _open(tmp_path, is_main=False)
    logger.log(1, {K.LM_LOSS: 3.0})
    logger.close("FINISHED")
    assert logger.sinks == [] and capsys.readouterr().out == ""
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardSink(tmp_path)
    for step in range(1, 8):  # this invocation got to step 7; its last checkpoint was step 5
        first.log_metrics(step, {K.LM_LOSS: float(step)})
    first.close("FAILED")
    resumed = TensorBoardSink(tmp_path, first_step=6)
    for step in range(6, 9):
        resumed.log_metrics(step, {K.LM_LOSS: 10.0 * step})
    resumed.close("FINISHED")
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars(K.LM_LOSS)] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0), (7, 70.0), (8, 80.0)]


def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TensorBoardMissing, match=r"pip install -e '\.\[tensorboard\]'.*tracking\.tensorboard=false"):
        check_tensorboard()
    # every rank fails alike, before anything is written
    with pytest.raises(TensorBoardMissing):
        _open(tmp_path, is_main=False, tensorboard=True)
    # and mod-train refuses it at start (exit 2, before any process group), naming the extra
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.preflight import PreflightError, preflight

    cfg = to_config(compose(["data=mock", "model.vocab_size=512", f"train.run_dir={tmp_path / 'tb_run'}",
                             "tracking.tensorboard=true"]))
    with pytest.raises(PreflightError, match=r"\[tensorboard\]"):
        preflight(cfg, validate(cfg), main_rank=True)
    assert not (tmp_path / "tb_run").exists()


def test_run_params_splits_per_invocation_keys_into_tags():
    params, tags = run_params({"train": {"exit_interval": None, "max_steps": 4}, "checkpoint": {"resume": "auto"}})
    assert params == {"train.max_steps": "4"}
    assert tags == {"invocation.train.exit_interval": "None", "invocation.checkpoint.resume": "auto"}


def test_throughput_metrics():
    m = throughput_metrics(seconds_per_step=0.5, tokens_per_step=1000, flops_per_token=6e9, world_size=2,
                           consumed_samples=64, global_batch_size=8, total_flops=1.2e13, peak_tflops=100.0)
    assert m[K.ITER_TIME_MS] == 500.0 and m[K.TOKENS_PER_S] == 2000.0
    assert math.isclose(m[K.TFLOPS_PER_DEVICE], 6e9 * 2000 / 2 / 1e12)  # 6 TFLOP/s on each of 2 devices
    assert math.isclose(m[K.MFU], 0.06)
    assert m[K.CONSUMED_SAMPLES] == 64.0 and m[K.GLOBAL_BATCH_SIZE] == 8.0 and m[K.TOTAL_FLOPS] == 1.2e13
    assert K.MEMORY_GB not in m
    bare = throughput_metrics(seconds_per_step=0.0, tokens_per_step=10, flops_per_token=1.0, world_size=1,
                              consumed_samples=0, global_batch_size=1, total_flops=0.0, memory_gb=1.5)
    assert K.MFU not in bare and bare[K.MEMORY_GB] == 1.5 and math.isfinite(bare[K.TOKENS_PER_S])


def test_routing_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    from mod_train.tracking.plots import plot_routing_heatmap

    png = plot_routing_heatmap({1: [0.5, 0.25, 0.25], 3: [0.1, 0.2, 0.7]}, tmp_path / "r" / "h.png",
                               ["e0", "e1", "no-op"], title="t")
    assert png == tmp_path / "r" / "h.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_routing_heatmap({}, tmp_path / "empty.png", ["e0"]) is None


def test_metric_key_helpers():
    assert K.valid_key(K.LM_LOSS) == "valid lm loss"
    assert K.moe_layer_key(2, K.MOE_NOOP_FRAC) == "moe/layer2/noop_frac"
    assert K.mod_layer_key(3, "aux_loss") == "mod/layer3/aux_loss"
    assert K.is_moe_layer_stat("moe/layer12/noop_frac", K.MOE_NOOP_FRAC)
    assert not K.is_moe_layer_stat("mod/layer1/noop_frac", K.MOE_NOOP_FRAC)
    assert not K.is_moe_layer_stat("moe/layerx/noop_frac", K.MOE_NOOP_FRAC)


def test_tracking_imports_no_private_names_and_not_the_trainer():
    for path in sorted(TRACKING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mod_train"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
                assert not node.module.startswith("mod_train.train"), f"{path.name} imports the trainer"
    # importing the sync CLI (which the trainer's run directory feeds) does not load the trainer
    code = "import sys, mod_train.tracking.sync; assert 'mod_train.train' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
