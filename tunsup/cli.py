"""Command line: ``tunsup`` and ``python -m tunsup``.

Heavy imports (trio, pyroute2) happen inside the commands that need them, so
that client commands stay fast.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from ._instrument import StepTimer

DNS_CHOICES = ("auto", "resolved", "resolvconf", "file", "none")
CAP_NET_ADMIN = 12


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="tunsup",
        description="Crash-safe tunnel supervisor: runs WireGuard tunnels (wg-quick files) "
        "through wireguard-go and always gives the host back as it found it.",
        epilog="Exit codes: 0 clean; 1 runtime failure, host restored; 2 usage or config "
        "error, nothing applied; 3 teardown incomplete.",
    )
    p.add_argument("--version", action="version", version=f"tunsup {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run tunnels in the foreground until SIGTERM/SIGINT",
        description="Bring up every tunnel (wg-quick .conf files and/or the [[tunnel]] "
        "entries of a TOML file), supervise them, and tear everything down on "
        "SIGTERM or SIGINT.",
    )
    run.add_argument("confs", nargs="*", metavar="CONF.conf", help="wg-quick configuration file")
    run.add_argument("-c", "--config", metavar="FILE", help="supervisor TOML file")
    run.add_argument("--state-dir", metavar="DIR", help="state directory (default /var/lib/tunsup)")
    run.add_argument("--runtime-dir", metavar="DIR", help="runtime directory (default /run/tunsup)")
    run.add_argument("--dns", choices=DNS_CHOICES, help="DNS backend (default: auto)")
    run.add_argument("--resolv-conf", metavar="PATH", help="file rewritten by the file DNS backend")
    run.add_argument("--debug", action="store_true", help="log debug messages")

    cleanup = sub.add_parser(
        "cleanup",
        help="undo what a crashed or killed run left behind",
        description="Replay, in reverse, the journal of every dead tunsup instance in the "
        "state directory: stop orphaned helpers (only if pid and start time match), "
        "remove the routes, addresses and links tunsup created, restore DNS. Exit 0 when "
        "the host is restored, 3 when something could not be undone, 1 when a live "
        "instance owns the state.",
    )
    cleanup.add_argument("-c", "--config", metavar="FILE", help="supervisor TOML file")
    cleanup.add_argument("--state-dir", metavar="DIR",
                         help="state directory (default /var/lib/tunsup)")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="print what would be undone, object by object; change nothing")
    cleanup.add_argument("--debug", action="store_true", help="log debug messages")

    check = sub.add_parser(
        "check",
        help="validate .conf or .toml files (exit 0 or 2)",
        description="Validate wg-quick .conf files and supervisor .toml files without "
        "touching the host.",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser(
        "demo",
        help="bring a tunnel up between two throwaway namespaces, ping, tear down",
        description="Create two network namespaces joined by a veth pair, run tunsup in "
        "each with generated keys, ping across the tunnel, print status and timings, "
        "stop, verify that nothing is left behind, and remove the namespaces. Needs root.",
    )
    demo.add_argument("--debug", action="store_true", help="show tunsup's own log lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args.files)
        if args.command == "cleanup":
            return _cleanup(args)
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(debug=args.debug)
    except ConfigError as exc:
        print(f"tunsup: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    raise AssertionError(args.command)


def _check(files: Sequence[str]) -> int:
    from .config import load_supervisor_config
    from .wgquick import load_conf

    status = ExitCode.OK
    for path in files:
        try:
            if path.endswith(".toml"):
                cfg = load_supervisor_config(path)
                for entry in cfg.tunnels:
                    load_conf(entry.config)
                print(f"{path}: ok ({len(cfg.tunnels)} tunnel(s))")
            else:
                spec = load_conf(path)
                routes = len(spec.allowed_ips)
                print(f"{path}: ok (interface {spec.name}, {len(spec.peers)} peer(s), "
                      f"{routes} allowed IP prefix(es))")
        except ConfigError as exc:
            print(f"{exc}", file=sys.stderr)
            status = ExitCode.USAGE
    return status


def _has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_NET_ADMIN))
    except OSError:
        pass
    return os.geteuid() == 0


def _step_timer(debug: bool) -> StepTimer | None:
    """The blocking guard: on with --debug (100 ms) or TUNSUP_STEP_LIMIT_MS."""
    from ._instrument import StepTimer

    limit = os.environ.get("TUNSUP_STEP_LIMIT_MS")
    if limit:
        import logging

        return StepTimer(float(limit) / 1000, level=logging.ERROR)
    return StepTimer(0.1) if debug else None


def _run(args: argparse.Namespace) -> int:
    from .config import apply_overrides, config_for_confs, load_supervisor_config
    from .wgquick import load_conf

    if not args.confs and not args.config:
        print("tunsup run: give at least one CONF.conf or -c FILE", file=sys.stderr)
        return ExitCode.USAGE
    overrides = {
        "state_dir": args.state_dir,
        "runtime_dir": args.runtime_dir,
        "dns_backend": args.dns,
        "resolv_conf": args.resolv_conf,
    }
    extra = config_for_confs(args.confs)
    if args.config:
        cfg = load_supervisor_config(args.config)
        taken = {t.name: t.config for t in cfg.tunnels}
        for entry in extra.tunnels:
            if entry.name in taken:
                raise ConfigError(entry.config, None, f"interface {entry.name} is already "
                                  f"defined by {taken[entry.name]}")
        import attrs

        cfg = attrs.evolve(cfg, tunnels=cfg.tunnels + extra.tunnels)
    else:
        cfg = extra
    cfg = apply_overrides(cfg, **overrides)
    if not cfg.tunnels:
        print(f"tunsup run: {args.config} defines no [[tunnel]]", file=sys.stderr)
        return ExitCode.USAGE
    specs = [load_conf(entry.config) for entry in cfg.tunnels]

    # Everything below is checked before anything is applied.
    if not _has_net_admin():
        print("tunsup run: needs root (CAP_NET_ADMIN) to configure interfaces", file=sys.stderr)
        return ExitCode.USAGE
    for entry in cfg.tunnels:
        if shutil.which(entry.helper[0]) is None:
            print(f"tunsup run: helper {entry.helper[0]!r} not found in PATH "
                  "(install it: apt-get install wireguard-go)", file=sys.stderr)
            return ExitCode.USAGE
    if cfg.dns.backend == "file" and not os.path.isdir(os.path.dirname(
            os.path.abspath(cfg.dns.resolv_conf))):
        print(f"tunsup run: directory of {cfg.dns.resolv_conf} does not exist", file=sys.stderr)
        return ExitCode.USAGE

    from . import instance

    try:
        lock = instance.acquire(cfg.runtime_dir, cfg.state_dir)
    except instance.LockHeld as exc:
        print(f"tunsup run: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"tunsup run: cannot lock {exc.filename}: {exc.strerror}", file=sys.stderr)
        return ExitCode.USAGE

    import trio

    from ._log import setup_logging, stop_logging
    from .engine import Supervisor
    from .helpers import RestartPolicy
    from .host import real_host
    from .journal import Journal, JournalObserver
    from .tunnel import Tunnel, TunnelOptions

    setup_logging(debug=args.debug)
    try:
        journal = Journal(cfg.state_dir, lock.pid, lock.start_time)
        host = real_host(resolv_conf=cfg.dns.resolv_conf,
                         route_progress=lambda n: journal.fault.total("routes", n))
        tunnels = [
            Tunnel(spec, host, TunnelOptions(
                helper=entry.helper,
                stop_grace=entry.stop_grace,
                start_timeout=entry.start_timeout,
                stop_timeout=cfg.stop_timeout,
                dns_backend=cfg.dns.backend,
                kill_switch=entry.kill_switch,
                lan=entry.lan,
                resolve_interval=entry.resolve_interval,
                tun_mode=entry.tun_mode,
                tun_header=entry.tun_header,
                probe_interval=entry.probe_interval,
                probe_timeout=entry.probe_timeout,
                restart=RestartPolicy(
                    max_restarts=entry.restart_max,
                    window=entry.restart_window,
                    backoff_initial=entry.backoff_initial,
                    backoff_max=entry.backoff_max,
                    reset_after=entry.backoff_reset,
                ),
            ), observer=JournalObserver(journal, spec.name))
            for spec, entry in zip(specs, cfg.tunnels, strict=True)
        ]
        timer = _step_timer(args.debug)
        code = trio.run(Supervisor(tunnels, host, journal=journal, on_failure=cfg.on_failure).run,
                        instruments=[timer] if timer is not None else [])
        if timer is not None:
            timer.report()
    finally:
        lock.release()
        stop_logging()
    return int(code)


def _cleanup(args: argparse.Namespace) -> int:
    from .config import DEFAULT_STATE_DIR, load_supervisor_config

    state_dir = args.state_dir
    if state_dir is None:
        state_dir = load_supervisor_config(args.config).state_dir if args.config \
            else DEFAULT_STATE_DIR
    if not os.path.isdir(state_dir):
        print(f"tunsup cleanup: {state_dir} does not exist: nothing to clean up")
        return ExitCode.OK
    if not _has_net_admin() and not args.dry_run:
        print("tunsup cleanup: needs root (CAP_NET_ADMIN)", file=sys.stderr)
        return ExitCode.USAGE

    from . import instance

    try:
        lock_fd = instance.lock_state(state_dir)
    except instance.LockHeld as exc:
        print(f"tunsup cleanup: a live instance owns {state_dir}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE

    import trio

    from ._log import setup_logging, stop_logging
    from .host import real_host
    from .recovery import recover

    setup_logging(debug=args.debug)
    try:
        host = real_host()

        async def main() -> object:
            try:
                return await recover(state_dir, host, dry_run=args.dry_run,
                                     out=lambda line: print(line, flush=True))
            finally:
                with trio.CancelScope(shield=True):
                    await host.net.close()

        report = trio.run(main)
    finally:
        os.close(lock_fd)
        stop_logging()
    from .recovery import RecoveryReport

    assert isinstance(report, RecoveryReport)
    for line in report.undone:
        print(f"undone: {line}")
    for line in report.failures:
        print(f"NOT undone: {line}", file=sys.stderr)
    for name in report.quarantined:
        print(f"damaged journal kept aside as {name}", file=sys.stderr)
    if report.live:
        print("tunsup cleanup: live instance(s) own: " + ", ".join(report.live), file=sys.stderr)
        return ExitCode.FAILURE
    if not report.complete:
        if report.unreadable:
            print(f"tunsup cleanup: {report.unreadable} journal record(s) were unreadable; "
                  "what they described may still be on the host", file=sys.stderr)
        return ExitCode.TEARDOWN_INCOMPLETE
    if not args.dry_run:
        if report.recovered:
            print(f"host restored ({len(report.undone)} object(s) undone)")
        else:
            print("nothing to clean up")
    return ExitCode.OK
