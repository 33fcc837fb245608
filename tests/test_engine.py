"""Supervisor contract that needs no network: single use, stop before run."""

from __future__ import annotations

import pytest
import trio

from tunsup import ExitCode
from tunsup.engine.supervisor import Supervisor
from tunsup.host import Host


class _Net:
    closed = 0

    async def close(self) -> None:
        self.closed += 1


def _host() -> Host:
    async def unused(*args: object, **kwargs: object) -> None:
        raise AssertionError("no host change expected")

    return Host(net=_Net(), start_helper=unused, run_hook=unused,  # type: ignore[arg-type]
                dns_backend=lambda kind: None)


def test_a_supervisor_runs_once() -> None:
    async def main() -> None:
        sup = Supervisor([], _host(), handle_signals=False)
        assert await sup.run() == ExitCode.OK
        with pytest.raises(RuntimeError, match="only once"):
            await sup.run()

    trio.run(main)


def test_a_start_after_stop_is_an_error() -> None:
    async def main() -> None:
        host = _host()
        sup = Supervisor([], host, handle_signals=False)
        sup.stop("test")
        with pytest.raises(RuntimeError, match="stopped before it started"):
            await sup.run()
        assert host.net.closed == 0  # type: ignore[attr-defined]

    trio.run(main)
