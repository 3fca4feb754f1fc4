"""How a grid waits for its children through a Prefect server that goes away and comes back
(flows.grid.wait_final), with the server's answers played by stand-ins and a fake clock."""

from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("prefect") is None,
                                reason="the pipeline extra is not installed")
log = logging.getLogger("test")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _run(final: bool):
    return SimpleNamespace(state=SimpleNamespace(is_final=lambda: final), name="child")


def _script(steps, clock):
    """A callable that plays ``steps`` in turn: an exception is raised, a value returned."""
    it = iter(steps)

    def call():
        step = next(it)
        if isinstance(step, BaseException):
            raise step
        return step
    return call


def test_each_outage_gets_its_own_patience_and_the_wait_resumes_when_the_server_answers():
    import httpx

    from flows.grid import wait_final

    clock, gone = Clock(), httpx.ConnectError("connection refused")
    # two outages of 0.9 x patience each (1.8 x in all), the server answering in between
    wait = _script([gone, gone, _run(True)], clock)
    probe = _script([gone] * 9 + [_run(False)] + [gone] * 9 + [_run(False)], clock)
    run = wait_final("f", log, wait, probe, patience=10, pause=1, clock=clock, sleep=clock.sleep)
    assert run.state.is_final() and clock.now == 18


def test_an_outage_past_its_patience_is_raised():
    import httpx

    from flows.grid import wait_final

    clock, gone = Clock(), httpx.ConnectError("connection refused")
    with pytest.raises(httpx.ConnectError):
        wait_final("f", log, _script([gone], clock), _script([gone] * 100, clock), patience=10,
                    pause=1, clock=clock, sleep=clock.sleep)
    assert clock.now == 11


def test_a_bug_or_a_refusal_is_raised_at_once_not_waited_out():
    import httpx

    from flows.grid import server_gone, wait_final

    clock = Clock()
    for error in (TypeError("a bug of texq's"), KeyError("state"),
                  httpx.HTTPStatusError("401", request=httpx.Request("GET", "http://x"),
                                        response=httpx.Response(401))):
        with pytest.raises(type(error)):
            wait_final("f", log, _script([error], clock), _script([], clock), clock=clock, sleep=clock.sleep)
        assert not server_gone(error)
    assert clock.now == 0
    assert server_gone(httpx.HTTPStatusError("503", request=httpx.Request("GET", "http://x"),
                                             response=httpx.Response(503)))
    assert server_gone(TimeoutError()) and server_gone(ConnectionRefusedError())
