"""eval.lm_eval during training: a MoD model trained on 2 data-parallel processes runs a local
lm-eval task on rank 0 every 2 steps (the other rank waits), scores in metrics.jsonl per step;
a layout where rank 0 does not hold the whole model is refused at start."""

import pytest

pytest.importorskip("lm_eval")

from tests.helpers_train import REPO, losses, run_dir_overrides, tiny_overrides, torchrun  # noqa: E402

pytestmark = pytest.mark.slow


def test_lm_eval_during_training_dp2(tiny_data, tmp_path):
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import ConfigError, validate

    task = REPO / "tests/data/lm_eval/choice.yaml"
    extra = ["model=tiny_mod", "model.num_layers=2", "model.hidden_size=32", "train.max_steps=4",
             "checkpoint.save_interval=4", f"eval.lm_eval.tasks=[{task}]", "eval.lm_eval.interval=2",
             "eval.lm_eval.limit=3"]
    run = tmp_path / "run"
    r = torchrun(2, ["-m", "mod_train.train", *tiny_overrides(tiny_data, *extra), *run_dir_overrides(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    acc = losses(run, "lm_eval/modtrain_choice/acc")
    assert sorted(acc) == [2, 4] and all(0.0 <= v <= 1.0 for v in acc.values())
    assert sorted(losses(run, "lm_eval/modtrain_choice/sample_len").values()) == [3.0, 3.0]
    assert sorted(losses(run)) == [1, 2, 3, 4]  # training went on after each evaluation

    cfg = to_config(compose([*tiny_overrides(tiny_data, *extra), "parallel=tp2", "model.vocab_size=512"]))
    with pytest.raises(ConfigError, match="eval.lm_eval runs on rank 0"):
        validate(cfg, world_size=2, check_files=False, has_cuda=False)
