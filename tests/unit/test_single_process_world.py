"""`python -m mod_train.train` without a launcher: a world of one with a store port of its own."""

import socket

from mod_train.distributed.init import ensure_env_for_single_process


def test_an_inherited_busy_master_port_is_not_reused(monkeypatch):
    # The parent (here: this test) holds the port its own MASTER_PORT names, as a pytest process
    # with a gloo world of one does; a child training run must not try to listen on it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("MASTER_PORT", str(busy))
        ensure_env_for_single_process()
        import os

        assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
        assert int(os.environ["MASTER_PORT"]) != busy


def test_a_launcher_set_world_is_left_alone(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_PORT", "29123")
    ensure_env_for_single_process()
    import os

    assert os.environ["MASTER_PORT"] == "29123" and os.environ["RANK"] == "3"
