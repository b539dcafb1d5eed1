"""What user code started survives a kill -9 of the server only until the next start."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import START_PROCESSES, process_alive

pytestmark = [pytest.mark.e2e, pytest.mark.image]


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_processes_left_by_an_image_of_a_killed_server_die_at_the_next_start(
    tmp_path, start_server
):
    server = start_server(tmp_path, zmq=False)
    client = server.tcp_client()
    client.result("create_session", client_id="alice")
    pidfile = tmp_path / "background.pid"
    client.result("evaluate", code=START_PROCESSES.format(pidfile=pidfile))
    pids = json.loads(client.result("evaluate", code="pids")["result"])
    _wait(lambda: pidfile.exists() and pidfile.read_text().strip())
    pids.append(int(pidfile.read_text()))
    image_pid = client.result("ping")["image"]["pid"]
    server.kill()  # SIGKILL: nothing in the server runs any more
    _wait(lambda: not process_alive(image_pid))
    assert all(process_alive(pid) for pid in pids), "the processes should outlive the killed server"
    server.start()
    _wait(lambda: not any(process_alive(pid) for pid in pids))
    assert "killed 3 processes a previous image left behind" in server.log_text()
