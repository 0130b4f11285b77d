"""checkpoint/read.py, the one reader of checkpoint files: which directory, and errors that name the
file that is missing or corrupt."""

import json

import pytest
import torch

from mod_train.checkpoint.layout import CheckpointDir
from mod_train.checkpoint.read import (
    CheckpointReadError,
    check_deepspeed_readable,
    load_deepspeed_model_state,
    load_model_dir,
    load_weights_from,
    read_complete,
    read_rng_state,
    resolve_iter_dir,
    saved_config,
    saved_layout,
    saved_train_state,
)
from mod_train.config.load import compose, to_config, to_plain_dict


def _commit(root, step, record):
    ckpt = CheckpointDir(root)
    staging = ckpt.begin(step)
    (staging / "state").mkdir()
    return ckpt.commit(step, record)


def test_resolve_root_step_latest_and_errors(tmp_path):
    root = tmp_path / "ck"
    a = _commit(root, 2, {"x": 1})
    b = _commit(root, 5, {"x": 2})
    assert resolve_iter_dir(root) == b and resolve_iter_dir(root, "2") == a and resolve_iter_dir(a) == a
    with pytest.raises(CheckpointReadError, match=r"does not exist"):
        resolve_iter_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointReadError, match=r"no complete checkpoint under .*empty"):
        resolve_iter_dir(tmp_path / "empty")
    with pytest.raises(CheckpointReadError, match=r"step 7 \(iter_0000007\).*iter_0000002, iter_0000005"):
        resolve_iter_dir(root, "7")
    with pytest.raises(CheckpointReadError, match=r"step number or 'latest', got 'newest'"):
        resolve_iter_dir(root, "newest")
    with pytest.raises(CheckpointReadError, match=r"already a single checkpoint"):
        resolve_iter_dir(a, "2")


def test_complete_json_entries_and_a_corrupt_file_named(tmp_path):
    cfg = to_config(compose(["model=tiny", "model.vocab_size=128"]))
    it = _commit(tmp_path / "ck", 3, {"config": to_plain_dict(cfg), "layout": {"tp": 2},
                                      "train_state": {"step": 3, "consumed_train_samples": 24}})
    assert saved_layout(it) == {"tp": 2}
    assert saved_train_state(it)["consumed_train_samples"] == 24
    assert saved_config(read_complete(it)).model.num_layers == cfg.model.num_layers
    with pytest.raises(CheckpointReadError, match=r"x\.json has no 'config' entry"):
        saved_config({"step": 3}, "x.json")
    with pytest.raises(CheckpointReadError, match=r"does not fit this mod-train's schema"):
        saved_config({"config": {"model": {"no_such_key": 1}}}, "x.json")

    (it / "complete.json").write_text('{"step": 3, "trunc')
    with pytest.raises(CheckpointReadError, match=rf"cannot read {it / 'complete.json'}"):
        read_complete(it)
    other = _commit(tmp_path / "ck2", 1, {"step_info": 1})
    with pytest.raises(CheckpointReadError, match=r"complete.json has no 'train_state' entry"):
        saved_train_state(other)


def test_deepspeed_files_missing_or_corrupt_are_named(tmp_path):
    it = _commit(tmp_path / "ck", 1, {})
    with pytest.raises(CheckpointReadError, match=r"state has neither mp_rank_00_model_states.pt"):
        load_deepspeed_model_state(it)
    bad = it / "state" / "mp_rank_00_model_states.pt"
    bad.write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(CheckpointReadError, match=rf"cannot read {bad}"):
        load_deepspeed_model_state(it, zero_stage=1)
    torch.save({"module": {"0.w": torch.ones(2)}}, bad)
    assert list(load_deepspeed_model_state(it, zero_stage=1)) == ["w"]  # the chunk prefix goes
    torch.save({"optimizer": {}}, bad)
    with pytest.raises(CheckpointReadError, match=rf"{bad} has no 'module' entry"):
        load_deepspeed_model_state(it)
    torch.save({}, it / "state" / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointReadError, match=r"holds model-parallel shards \(mp_rank_01_model_states.pt"):
        load_deepspeed_model_state(it)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(CheckpointReadError, match=r"has no DeepSpeed 'state' directory"):
        load_deepspeed_model_state(bare)


def test_rng_and_model_dir_errors_name_the_file(tmp_path):
    it = _commit(tmp_path / "ck", 1, {})
    assert read_rng_state(it, 0) is None  # a checkpoint without RNG files is fine
    (it / "rng").mkdir()
    (it / "rng" / "rank_00001.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointReadError, match=r"cannot read .*rng/rank_00001.pt"):
        read_rng_state(it, 1)
    with pytest.raises(CheckpointReadError, match=rf"{it / 'model'} is not a layout-free model directory"):
        load_model_dir([], it)
    with pytest.raises(CheckpointReadError, match=r"holds no layout-free weights: give a checkpoint iter_\* directory"):
        load_weights_from([], it)
    (it / "model").mkdir()
    (it / "model" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(CheckpointReadError, match=rf"cannot load the weights in {it / 'model'}"):
        load_model_dir([], it)
    with pytest.raises(CheckpointReadError, match=rf"cannot load the weights in {it / 'model'}"):
        load_weights_from([], it)  # an iter_* directory reads its model/


def test_deepspeed_readable_layouts():
    cfg = to_config(compose(["model=tiny", "model.vocab_size=128"]))
    check_deepspeed_readable(cfg)  # tp1 pp1 ep1: fine, any dp / ZeRO stage
    cfg.parallel.tp, cfg.parallel.ep = 2, 2
    with pytest.raises(CheckpointReadError, match=r"written with parallel.tp=2, parallel.ep=2; without a layout-free"):
        check_deepspeed_readable(cfg)


def test_load_weights_from_a_model_dir_or_an_iter_dir(megatron_tp1, tmp_path):
    """checkpoint.init_from's reader: save_model's directory, or an iter_* directory holding it."""
    from mod_train.checkpoint.model_io import save_model
    from tests.unit.test_inference import build

    source, _ = build("model=tiny_mod", seed=1)
    save_model([source], tmp_path / "iter_0000001" / "model")
    want = {k: v for k, v in source.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    for path in (tmp_path / "iter_0000001", tmp_path / "iter_0000001" / "model"):
        target, _ = build("model=tiny_mod", seed=2)
        assert load_weights_from([target], path) == tmp_path / "iter_0000001" / "model"
        got = target.state_dict()
        assert [k for k in want if not torch.equal(got[k], want[k])] == []
