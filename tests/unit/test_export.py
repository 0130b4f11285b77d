"""mod-export in one process: a checkpoint without model/ (DeepSpeed files, TP1) -> the model's own
state dict; the file's format is checked when read."""

import pytest
import torch

from mod_train.config.load import to_plain_dict
from mod_train.export import main
from mod_train.inference.errors import InferenceError
from mod_train.inference.export import EXPORT_FORMAT, load_export
from tests.unit.test_inference import build


def test_export_cli_of_a_deepspeed_only_checkpoint(megatron_tp1, tmp_path, capsys):
    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.engine.step import ModelChunks

    model, cfg = build("model=tiny_mod")
    ckpt = CheckpointDir(tmp_path / "ck")
    staging = ckpt.begin(4)
    (staging / "state").mkdir()
    torch.save({"module": ModelChunks([model]).state_dict()}, staging / "state" / "mp_rank_00_model_states.pt")
    ckpt.commit(4, {"config": to_plain_dict(cfg)})

    out = tmp_path / "out" / "model.pt"
    assert main(["--checkpoint", str(tmp_path / "ck"), "--out", str(out)]) == 0
    assert "(step 4," in capsys.readouterr().out
    record = load_export(out)
    assert record["format"] == EXPORT_FORMAT and record["step"] == 4 and record["vocab_size"] == 128
    want = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    assert sorted(record["state_dict"]) == sorted(want)
    for name, value in want.items():
        assert torch.equal(record["state_dict"][name], value), name

    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InferenceError, match=r"other.pt is not a mod-export file"):
        load_export(tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"mod-export: error: no complete checkpoint for step 9"):
        main(["--checkpoint", str(tmp_path / "ck"), "--iter", "9", "--out", str(out)])
