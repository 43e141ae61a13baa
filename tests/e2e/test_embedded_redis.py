"""The embedded Redis keeps every queued command on disk: only its owner may read it, and
only a client with its password may talk to it."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import pytest
import redis

from calls_worker.adapters.embedded import running_redis, start_redis


def test_the_embedded_redis_is_private_and_asks_for_a_password(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    server = start_redis(data_dir)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, socket_timeout=5).ping()
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        client.lpush("calls.commands", "a command")
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        for name in ("password", "redis.conf"):
            assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
        assert server.password not in server.shown_url
        again = running_redis(data_dir)  # a second command finds it, with the same password
        assert again is not None
        assert again.url == server.url
    finally:
        server.stop()
    restarted = start_redis(data_dir)  # the password is kept across a restart
    try:
        assert restarted.password == server.password
        assert redis.Redis.from_url(restarted.url).lrange("calls.commands", 0, -1) == [b"a command"]
    finally:
        restarted.stop()


def test_a_stop_never_reaches_the_server_started_after_it(tmp_path: Path) -> None:
    """SHUTDOWN is sent once: the server closes the connection as it exits, and a client
    that took that for a fault to retry (redis-py does, for seconds) shut down the server
    started again on the same port meanwhile, as a soak's broker restart does."""
    data_dir = tmp_path / "redis"
    server = start_redis(data_dir)
    pid = int((data_dir / "redis.pid").read_text())
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the server did not exit"
        time.sleep(0.01)
    restarted = start_redis(data_dir, port=server.port)
    try:
        stopping.join(30)
        assert not stopping.is_alive()
        time.sleep(1)
        assert redis.Redis.from_url(restarted.url, socket_timeout=5).ping()
        log = (data_dir / "redis.log").read_text()
        assert log.count("User requested shutdown") == 1
    finally:
        restarted.stop()
    assert not (data_dir / "redis.pid").exists()  # stop returns once the server has exited
