"""`python -m mod_train.train` without a launcher: a world of one with a store port of its own."""

import os
import socket

import pytest

from mod_train.distributed.init import ensure_env_for_single_process
from tests.helpers import restored_env

WORLD_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_world_env():
    """The test's changes to the launcher variables never reach later tests' child processes."""
    with restored_env(*WORLD_KEYS):
        for k in WORLD_KEYS:
            os.environ.pop(k, None)
        yield


def test_an_inherited_busy_master_port_is_not_reused(clean_world_env):
    # The parent (here: this test) holds the port its own MASTER_PORT names, as a pytest process
    # with a gloo world of one does; a child training run must not try to listen on it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        os.environ["MASTER_PORT"] = str(busy)
        ensure_env_for_single_process()
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
        assert int(os.environ["MASTER_PORT"]) != busy


def test_a_launcher_set_world_is_left_alone(clean_world_env):
    os.environ.update(RANK="3", WORLD_SIZE="8", MASTER_PORT="29123")
    ensure_env_for_single_process()
    assert os.environ["MASTER_PORT"] == "29123" and os.environ["RANK"] == "3"
