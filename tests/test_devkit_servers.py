"""The start-and-wait of the test servers (nginx, Caddy, Tomcat runners): real child processes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from gateway.devkit.servers import accepts, free_port, stop_process, wait_ready


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    stopped: list[bool] = field(default_factory=list)

    def output(self) -> str:
        return "what the child wrote"

    def stop(self) -> None:
        self.stopped.append(True)
        stop_process(self.proc, 10)


def spawn(code: str) -> Child:
    return Child(subprocess.Popen([sys.executable, "-c", code]))


LISTEN = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
time.sleep(60)
"""


def test_ready_once_every_port_accepts() -> None:
    port = free_port()
    child = Child(subprocess.Popen([sys.executable, "-c", LISTEN, str(port)]))
    try:
        wait_ready(child, [port], accepts, name="child", what="listen on", timeout=30)
        assert accepts(port)
    finally:
        stop_process(child.proc, 10)
    assert child.proc.returncode is not None
    assert not child.stopped


def test_a_server_that_exits_while_starting_is_an_error_with_its_output() -> None:
    child = spawn("raise SystemExit(3)")
    child.proc.wait(timeout=30)
    with pytest.raises(RuntimeError, match=r"child exited with 3:\nwhat the child wrote"):
        wait_ready(child, [free_port()], accepts, name="child", what="listen on", timeout=30)


def test_a_late_server_is_stopped_and_named_with_what_it_still_owes() -> None:
    child = spawn("import time; time.sleep(60)")
    port = free_port()
    with pytest.raises(RuntimeError, match=rf"child did not listen on \[{port}\]:\nwhat the"):
        wait_ready(child, [port], accepts, name="child", what="listen on", timeout=0.3)
    assert child.stopped == [True]
    assert child.proc.poll() is not None  # nothing is left running
