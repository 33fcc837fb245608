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


def run_client_command(args: Args) -> int:
    """Run ``args.command``, one of :data:`tunsup.cli.CLIENT_COMMANDS`."""
    runtime_dir = client.runtime_dir_of(args.runtime_dir, args.config)
    if args.command == "status":
        return client.status(runtime_dir, as_json=args.json, debug=args.debug)
    if args.command == "stop":
        if args.timeout <= 0:
            print("tunsup stop: --timeout must be > 0", file=sys.stderr)
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
        return client.logs(runtime_dir, lines=max(0, args.lines), follow=args.follow,
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
