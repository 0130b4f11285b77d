"""model.mod.capacity_schedule: capacity 1.0 -> target in equal phases (k static within a phase),
applied to every MoD layer before each step and again after a rollback; validated at start."""

import pytest

from mod_train.callbacks.capacity_schedule import CapacityScheduleCallback, scheduled_capacity
from mod_train.checkpoint.state import TrainState
from mod_train.config.schema import CapacitySchedule


def test_phases_fall_from_one_to_the_target():
    caps = [scheduled_capacity(0.125, step, steps=8, phases=4) for step in range(1, 12)]
    assert caps[:2] == [1.0, 1.0]  # phase 0: every token routed
    assert caps[2] == caps[3] and caps[4] == caps[5] and caps[6] == caps[7]  # static within a phase
    assert caps[0] > caps[2] > caps[4] > caps[6] > 0.125
    assert caps[8:] == [0.125] * 3  # after the schedule: the target
    assert scheduled_capacity(0.25, 1, steps=0, phases=4) == 0.25  # off


def test_callback_sets_k_of_every_mod_layer(megatron_tp1):
    from tests.unit.test_inference import build, mod_layers

    model, cfg = build("model=tiny_mod", "model.mod.capacity_schedule.steps=4", "model.mod.capacity_schedule.phases=2")
    assert cfg.model.mod.capacity_schedule.steps == 4
    cb = CapacityScheduleCallback([model], cfg.model.mod.capacity_schedule)
    layers = [layer for _, layer in mod_layers(model)]
    s = cfg.model.seq_length
    cb.on_step_begin(TrainState(step=0))
    assert [layer.k_for(s) for layer in layers] == [s] * len(layers)
    cb.on_step_begin(TrainState(step=2))  # step 3: phase 1
    assert all(layer.capacity == pytest.approx(1 - 0.875 / 2) for layer in layers)
    cb.on_step_begin(TrainState(step=4))  # step 5: the target
    assert [layer.k_for(s) for layer in layers] == [round(0.125 * s)] * len(layers)
    cb.on_restore(TrainState(step=0))  # rolled back to the start: the schedule restarts
    assert all(layer.capacity == 1.0 for layer in layers)
    with pytest.raises(ValueError, match="capacity must be in"):
        layers[0].set_capacity(0.0)


def test_schedule_validated():
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import ConfigError, validate

    cfg = to_config(compose(["model=tiny_mod", "model.vocab_size=128", "model.mod.capacity_schedule.phases=0"]))
    with pytest.raises(ConfigError, match="capacity_schedule needs steps >= 0"):
        validate(cfg, world_size=1, check_files=False, has_cuda=False)
    assert CapacitySchedule().steps == 0
