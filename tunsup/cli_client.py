"""The CLI's client commands (``status``, ``stop``, ``up``, ``down``,
``reload``, ``logs``): they talk to a running service over its control
socket and import neither trio, pyroute2 nor cattrs (an import-linter
contract keeps it so), so that they start fast.
"""

from __future__ import annotations

import sys

from ._errors import ExitCode
from .control import client

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from types import SimpleNamespace

    Args = argparse.Namespace | SimpleNamespace


#: Longest ``stop --timeout`` (11.6 days; its waits count milliseconds in
#: a C int, which ends at 24.8 days).
MAX_STOP_TIMEOUT = 1e6


def run_client_command(args: Args) -> int:
    """Run ``args.command``, one of :data:`tunsup.cli.CLIENT_COMMANDS`."""
    runtime_dir = client.runtime_dir_of(args.runtime_dir, args.config)
    if args.command == "status":
        return client.status(runtime_dir, as_json=args.json, debug=args.debug)
    if args.command == "stop":
        # (Written so that NaN fails it too.)
        if not 0 < args.timeout <= MAX_STOP_TIMEOUT:
            print(f"tunsup stop: --timeout must be a number of seconds above 0 and at most "
                  f"{MAX_STOP_TIMEOUT:.0f}, not {args.timeout:g}", file=sys.stderr)
            return ExitCode.USAGE
        return client.stop(runtime_dir, timeout=args.timeout, force=args.force,
                           cleanup=_cleanup_command(args), debug=args.debug)
    if args.command == "up":
        return client.up(runtime_dir, args.conf, debug=args.debug)
    if args.command == "down":
        return client.down(runtime_dir, args.name, debug=args.debug)
    if args.command == "reload":
        return client.reload(runtime_dir, debug=args.debug)
    if args.command == "logs":
        if args.lines < 0:
            print(f"tunsup logs: -n must be 0 or more, not {args.lines}", file=sys.stderr)
            return ExitCode.USAGE
        return client.logs(runtime_dir, lines=args.lines, follow=args.follow,
                           as_json=args.json, debug=args.debug)
    raise AssertionError(args.command)


def _cleanup_command(args: Args) -> Callable[[], int]:
    """What ``stop --force`` runs after SIGKILL: ``tunsup cleanup`` (crash
    recovery) in a fresh interpreter, with the same paths."""

    def cleanup() -> int:
        import subprocess

        argv = [sys.executable, "-m", "tunsup", "cleanup"]
        if args.config:
            argv += ["-c", args.config]
        if args.state_dir:
            argv += ["--state-dir", args.state_dir]
        if args.runtime_dir:
            argv += ["--runtime-dir", args.runtime_dir]
        return subprocess.run(argv, check=False).returncode

    return cleanup
