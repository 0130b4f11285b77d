"""The resilience keys are validated once, at start, with messages that say what to change."""

import pytest

from mod_train.config.load import compose, to_config
from mod_train.config.validate import ConfigError, validate


def check(*overrides):
    return validate(to_config(compose(["data=mock", "model.vocab_size=300", *overrides])), world_size=2, has_cuda=False)


@pytest.mark.parametrize("overrides, message", [
    (["train.spike.action=skip", "parallel.zero_stage=2"], "needs parallel.zero_stage 0 or 1 .* Use train.spike.action=rollback"),
    (["train.inject.skip_update_at_step=3", "parallel.zero_stage=3"], "needs parallel.zero_stage 0 or 1"),
    (["train.spike.action=rollback", "checkpoint.save=false"], "rollback reloads the last checkpoint: it needs checkpoint.save=true"),
    (["train.spike.action=log", "train.spike.window=1"], r"train.spike.window(=1)? .*must be >= 2"),
    (["train.step_timeout_s=0"], r"train.step_timeout_s(=0.0)? .*must be > 0 seconds"),
    (["train.max_skipped_steps=0"], r"train.max_skipped_steps(=0)? .*must be >= 1"),
    (["parallel.collective_timeout_s=-1"], r"parallel.collective_timeout_s(=-1.0)? .*must be > 0"),
])
def test_bad_resilience_settings_fail_with_a_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(*overrides)


def test_resilience_settings_that_are_fine():
    check("train.spike.action=rollback", "parallel.zero_stage=3")  # rollback reloads: no gradient discard
    check("train.spike.action=skip", "parallel.zero_stage=1", "train.step_timeout_s=600")
    with pytest.raises(ConfigError, match="train.spike.action"):
        check("train.spike.action=sometimes")  # a typed choice: fails at compose
