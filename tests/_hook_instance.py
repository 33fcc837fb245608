"""A tunsup instance reduced to its hooks, run as its own process so that a
test can SIGKILL it (or let it end) mid-teardown and leave its journal.

``python -m tests._hook_instance STATE_DIR STOP_TIMEOUT PRE_DOWN POST_DOWN``
applies (PreUp, PostDown) and (PostUp, PreDown) hooks of tunnel ``tsh0``
through the journaled effect stack, exactly as a tunnel does, then unwinds
them within STOP_TIMEOUT and exits 3 if that was incomplete — leaving the
journal behind, as ``run`` does.  ``python -m tests._hook_instance recover
STATE_DIR`` recovers such journals (to be killed mid-recovery).  Nothing
here touches the network.
"""

from __future__ import annotations

import logging
import os
import sys

import trio

from tunsup.engine.effects import EffectContext, Hooks
from tunsup.engine.journal import Journal, JournalObserver
from tunsup.engine.undo import EffectStack
from tunsup.host import Host, hooks
from tunsup.host import process as helpers
from tunsup.pidfile import process_start_time
from tunsup.testing import FakeNet

TUNNEL = "tsh0"


def hooks_only_host() -> Host:
    return Host(net=FakeNet(), start_helper=helpers.start_helper, run_hook=hooks.run_hook,
                dns_backend=lambda kind: None,  # type: ignore[arg-type,return-value]
                uapi_dir="/nonexistent")


async def main(state_dir: str, stop_timeout: float, pre_down: str, post_down: str) -> int:
    log = logging.getLogger("tunsup.hooktest")
    start = process_start_time(os.getpid())
    assert start is not None
    journal = Journal(state_dir, os.getpid(), start)
    observer = JournalObserver(journal, TUNNEL)
    async with trio.open_nursery() as nursery:
        ctx = EffectContext(host=hooks_only_host(), log=log, nursery=nursery,
                            on_hook=observer.hook_started)
        stack = EffectStack(ctx, log=log, observer=observer)
        await stack.apply(Hooks(TUNNEL, "PreUp", (), "PostDown", (post_down,)))
        await stack.apply(Hooks(TUNNEL, "PostUp", (), "PreDown", (pre_down,)))
        print("up", flush=True)
        report = await stack.unwind(stop_timeout)
    return 0 if report.complete else 3


async def recover_only(state_dir: str) -> int:
    from tunsup.engine.recovery import recover

    report = await recover(state_dir, hooks_only_host())
    return 0 if report.complete else 3


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if sys.argv[1] == "recover":
        sys.exit(trio.run(recover_only, sys.argv[2]))
    sys.exit(trio.run(main, sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]))
