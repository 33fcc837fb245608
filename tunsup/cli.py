"""Command line: ``tunsup`` and ``python -m tunsup``.

Heavy imports (trio, pyroute2) happen inside the commands that need them, so
that client commands stay fast: an ordinary client command line (``status``,
``up X.conf``, ``down X``...) and ``run``'s are even read without argparse
(see :func:`_client_args`), whose import and parser cost a client start more
than its whole round trip to the service.
"""

from __future__ import annotations

# Not contextlib (it loads collections and functools: milliseconds of
# every client start).
import os
import sys

from ._errors import ConfigError, ExitCode

# Annotations only: ``typing`` and argparse stay out of client starts.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from types import SimpleNamespace
    from typing import NoReturn

    from ._instrument import StepTimer
    from .config.settings import TunnelOptions
    from .config.sources import ConfigSource, Loaded
    from .engine.lock import InstanceLock
else:
    # What types.SimpleNamespace is (types.py defines it so), without
    # importing types.
    SimpleNamespace = type(sys.implementation)

CLIENT_COMMANDS = ("status", "stop", "up", "down", "reload", "logs")
DNS_CHOICES = ("auto", "resolved", "resolvconf", "file", "none")
CAP_NET_ADMIN = 12


#: The client commands' command lines, for the fast path (:func:`_client_args`):
#: command -> (positional dests, {option: (dest, converter; None for a flag)},
#: defaults).  It must say what :func:`_parser` says; tests/test_cli.py
#: checks that both read every command line alike.
_COMMON_OPTIONS: dict[str, tuple[str, Callable[[str], object] | None]] = {
    "-c": ("config", str), "--config": ("config", str),
    "--runtime-dir": ("runtime_dir", str), "--debug": ("debug", None)}
_COMMON_DEFAULTS: dict[str, object] = {"config": None, "runtime_dir": None, "debug": False}
_CLIENT_LINES: dict[str, tuple[tuple[str, ...],
                               dict[str, tuple[str, Callable[[str], object] | None]],
                               dict[str, object]]] = {
    "status": ((), {"--json": ("json", None)}, {"json": False}),
    "stop": ((), {"--timeout": ("timeout", float), "--force": ("force", None),
                  "--state-dir": ("state_dir", str)},
             {"timeout": 90.0, "force": False, "state_dir": None}),
    "up": (("conf",), {}, {}),
    "down": (("name",), {}, {}),
    "reload": ((), {}, {}),
    "logs": ((), {"-f": ("follow", None), "--follow": ("follow", None),
                  "-n": ("lines", int), "--lines": ("lines", int), "--json": ("json", None)},
             {"follow": False, "lines": 100, "json": False}),
}


def _dns_choice(value: str) -> str:
    if value not in DNS_CHOICES:
        raise ValueError(value)
    return value


#: ``run``'s command line (the service's own start pays for argparse too):
#: its CONF.conf files are the one list of positionals (``nargs="*"``).
_RUN_LINE: tuple[str, dict[str, tuple[str, Callable[[str], object] | None]], dict[str, object]] = (
    "confs",
    {"--state-dir": ("state_dir", str), "--dns": ("dns", _dns_choice),
     "--resolv-conf": ("resolv_conf", str), "--json-logs": ("json_logs", None)},
    {"state_dir": None, "dns": None, "resolv_conf": None, "json_logs": False},
)


def _client_args(argv: Sequence[str]) -> SimpleNamespace | None:
    """A plain client or ``run`` command line read without argparse, with the
    values argparse would give; None for anything else (``--help``, an
    unknown or abbreviated option, a missing value, a value that starts with
    ``-``, ``run``'s files not all in one run...), which argparse then reads,
    and reports, as always."""
    if not argv:
        return None
    if argv[0] == "run":
        listed, options, defaults = _RUN_LINE
        positional_dests: tuple[str, ...] = ()
    elif argv[0] in _CLIENT_LINES:
        listed = None
        positional_dests, options, defaults = _CLIENT_LINES[argv[0]]
    else:
        return None
    values: dict[str, object] = {**_COMMON_DEFAULTS, **defaults, "command": argv[0]}
    positionals: list[str] = []
    runs = 0  # runs of consecutive positionals
    previous_positional = False
    rest = iter(argv[1:])
    for arg in rest:
        if not arg.startswith("-"):
            runs += not previous_positional
            previous_positional = True
            positionals.append(arg)
            continue
        previous_positional = False
        name, eq, value = arg.partition("=")
        spec = options.get(name) or _COMMON_OPTIONS.get(name)
        if spec is None:
            return None
        dest, convert = spec
        if convert is None:
            if eq:
                return None
            values[dest] = True
            continue
        if not eq:
            value = next(rest, "-")
            if value.startswith("-"):
                return None
        try:
            values[dest] = convert(value)
        except ValueError:
            return None
    if listed is not None:
        # argparse reads a nargs="*" list split by options its own way.
        if runs > 1:
            return None
        values[listed] = positionals
        return SimpleNamespace(**values)
    if len(positionals) != len(positional_dests):
        return None
    values.update(zip(positional_dests, positionals, strict=True))
    return SimpleNamespace(**values)


def _parser() -> argparse.ArgumentParser:
    import argparse

    from . import __version__

    p = argparse.ArgumentParser(
        prog="tunsup",
        description="Crash-safe tunnel supervisor: runs WireGuard tunnels (wg-quick files) "
        "through wireguard-go and always gives the host back as it found it.",
        epilog="Exit codes of run: 0 clean; 1 runtime failure, host restored; 2 usage or "
        "config error, nothing applied; 3 teardown incomplete. Each command's --help gives "
        "its own.",
    )
    p.add_argument("--version", action="version", version=f"tunsup {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run tunnels in the foreground until SIGTERM/SIGINT (the service)",
        description="Bring up every tunnel (wg-quick .conf files and/or the [[tunnel]] "
        "entries of a TOML file), supervise them, answer on the control socket "
        "RUNTIME_DIR/control.sock, reload the configuration on SIGHUP, and tear "
        "everything down on SIGTERM or SIGINT.",
    )
    run.add_argument("confs", nargs="*", metavar="CONF.conf", help="wg-quick configuration file")
    run.add_argument("-c", "--config", metavar="FILE", help="supervisor TOML file")
    run.add_argument("--state-dir", metavar="DIR", help="state directory (default /var/lib/tunsup)")
    run.add_argument("--runtime-dir", metavar="DIR", help="runtime directory (default /run/tunsup)")
    run.add_argument("--dns", choices=DNS_CHOICES, help="DNS backend (default: auto)")
    run.add_argument("--resolv-conf", metavar="PATH", help="file rewritten by the file DNS backend")
    run.add_argument("--debug", action="store_true", help="log debug messages")
    run.add_argument("--json-logs", action="store_true",
                     help="write log lines to stderr as JSON objects (one per line)")

    cleanup = sub.add_parser(
        "cleanup",
        help="undo what a crashed or killed run left behind",
        description="Replay, in reverse, the journal of every dead tunsup instance in the "
        "state directory: end the hooks and stop the helpers it left running (only if pid "
        "and start time match), remove the routes, addresses and links tunsup created, "
        "restore DNS; each journal within stop_timeout (from -c FILE; default 30 s); then "
        "remove the dead service's pid file and control socket. Down "
        "hooks the dead instance's teardown had already gone past are never run again. "
        "--keep-kill-switch keeps the kill switch of tunnels still configured, for the next "
        "'run' to take over (make-before-break). "
        "Exit 0 when the host is restored, 3 when something could not be undone (it stays "
        "recorded: see --drop), 1 when a live instance owns the state.",
    )
    cleanup.add_argument("-c", "--config", metavar="FILE", help="supervisor TOML file")
    cleanup.add_argument("--state-dir", metavar="DIR",
                         help="state directory (default /var/lib/tunsup)")
    cleanup.add_argument("--runtime-dir", metavar="DIR",
                         help="runtime directory of the dead service, whose pid file and "
                         "control socket are removed once the host is restored (default "
                         "/run/tunsup)")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="print what would be undone, object by object; change nothing")
    cleanup.add_argument("--drop", action="store_true",
                         help="undo what can be undone, then print and forget (remove from "
                         "the journals) what cannot, instead of keeping it for a later "
                         "cleanup; exit 0. Check the printed objects on the host by hand. "
                         "With --dry-run: show what would be dropped")
    scope = cleanup.add_mutually_exclusive_group()
    scope.add_argument("--keep-kill-switch", action="store_true",
                       help="keep the kill switch (unreachable routes, and a full tunnel's "
                       "rules) of each tunnel still configured: with -c FILE those of its "
                       "[[tunnel]] entries, else every one; the host stays closed until "
                       "'run' starts the tunnel again (which takes them over) or 'cleanup "
                       "--all' (for a systemd ExecStopPost=, see README)")
    scope.add_argument("--all", action="store_true",
                       help="undo everything, kill switches included (the default)")
    cleanup.add_argument("--debug", action="store_true", help="log debug messages")

    check = sub.add_parser(
        "check",
        help="validate .conf or .toml files (exit 0 or 2)",
        description="Validate wg-quick .conf files and supervisor .toml files without "
        "touching the host.",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--debug", action="store_true", help="print details of each file")

    def client(name: str, help: str, description: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=description)
        c.add_argument("-c", "--config", metavar="FILE",
                       help="supervisor TOML file (for its runtime_dir)")
        c.add_argument("--runtime-dir", metavar="DIR",
                       help="runtime directory of the service (default /run/tunsup)")
        c.add_argument("--debug", action="store_true",
                       help="trace the control protocol on stderr")
        return c

    status = client(
        "status", "show the running service and its tunnels",
        "Show the service and, per tunnel, its state, helper pid, uptime, restarts and "
        "per peer endpoint, last handshake and rx/tx bytes. Exit codes (LSB): 0 running, "
        "1 dead but its pid file remains, 3 not running, 4 unknown (no permission or no "
        "answer).")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    stop = client(
        "stop", "stop the service, showing its teardown as it happens",
        "Send SIGTERM to the service (found through its pid file; pid and start time are "
        "verified), print its teardown as it happens and wait for it to exit. Exit codes: "
        "0 stopped with a complete teardown (or not running), 3 teardown incomplete, "
        "4 still running after --timeout (or not permitted to signal it).")
    stop.add_argument("--timeout", type=float, default=90.0, metavar="S",
                      help="seconds to wait for the exit (default 90)")
    stop.add_argument("--force", action="store_true",
                      help="after the timeout, SIGKILL the service and run crash recovery")
    stop.add_argument("--state-dir", metavar="DIR", help="state directory (for --force)")

    up = client(
        "up", "bring up one more tunnel in the running service",
        "Ask the running service to bring up the tunnel of a wg-quick file, without "
        "touching the others. Exit codes: 0 up, 1 failed (host restored), 2 invalid file, "
        "3 failed and teardown incomplete, 7 the service is not running.")
    up.add_argument("conf", metavar="CONF.conf", help="wg-quick configuration file")

    down = client(
        "down", "take one tunnel of the running service down",
        "Ask the running service to tear one tunnel down, without touching the others. "
        "Exit codes: 0 down, 1 no such tunnel, 3 teardown incomplete, 7 the service is "
        "not running.")
    down.add_argument("name", metavar="NAME", help="tunnel (interface) name")

    client("reload", "reload the configuration (as SIGHUP does)",
           "Ask the running service to read its configuration again: new tunnels come up, "
           "removed ones go down, changed ones are restarted, unchanged ones are untouched.")

    logs = client(
        "logs", "show the service's recent log lines",
        "Print the service's recent log lines (helper output included, tagged by tunnel); "
        "with -f, keep printing new ones as they come.")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=100, metavar="N",
                      help="how many recent lines (default 100)")
    logs.add_argument("--json", action="store_true", help="one JSON object per line")

    demo = sub.add_parser(
        "demo",
        help="bring a tunnel up between two throwaway namespaces, ping, tear down",
        description="Create two network namespaces joined by a veth pair, run tunsup in "
        "each with generated keys, ping across the tunnel, print status and timings, "
        "stop, verify that nothing is left behind, and remove the namespaces. Needs root.",
    )
    demo.add_argument("--debug", action="store_true", help="show tunsup's own log lines")
    return p


def entry() -> NoReturn:
    """The ``tunsup`` program: :func:`main`, then a fast exit.

    Once ``main`` has returned, everything tunsup owns is closed and
    flushed (the service has restored the host, removed its socket and pid
    file, stopped its log writer), so the interpreter's finalization —
    50 to 90 ms of module teardown with trio and pyroute2 loaded — is
    skipped: ``tunsup stop`` waits for the process to exit.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `tunsup logs -f | head`
        code = ExitCode.FAILURE
    except KeyboardInterrupt:  # Ctrl-C in a client command
        code = 130
    try:  # noqa: SIM105 (contextlib costs client starts ms)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args: argparse.Namespace | SimpleNamespace | None = _client_args(argv)
    if args is None:
        args = _parser().parse_args(argv)
    if args.command in _COMPILING_COMMANDS:
        # Before their modules are imported (see _bundle), and before
        # anything defines an attrs class (see _codecache).
        from . import _bundle

        _bundle.install()
        from . import _codecache

        _codecache.install()
        try:
            return _dispatch(args)
        finally:
            _codecache.save_if_allowed()
    return _dispatch(args)


#: The commands that import the engine (and with it ~130 attrs classes).
_COMPILING_COMMANDS = frozenset({"run", "check", "cleanup"})


def _dispatch(args: argparse.Namespace | SimpleNamespace) -> int:
    try:
        if args.command == "run":
            from . import _signals

            # For the rest of the process's life SIGTERM/SIGINT/SIGHUP are
            # recorded, never fatal: the supervisor acts on them while it
            # runs (one that came earlier stops it at once), and once its
            # teardown has begun no later signal can change the exit status.
            _signals.absorb()
            return _run(args)
        if args.command == "check":
            return _check(args.files, debug=args.debug)
        if args.command == "cleanup":
            return _cleanup(args)
        if args.command in CLIENT_COMMANDS:
            from .cli_client import run_client_command

            return run_client_command(args)
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(debug=args.debug)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"tunsup: {line}", file=sys.stderr)
        return ExitCode.USAGE
    raise AssertionError(args.command)


def _check(files: Sequence[str], *, debug: bool = False) -> int:
    """Validate each file as ``run`` would (``run -c FILE.toml`` or ``run
    FILE``): the same code path, :func:`tunsup.config.sources.prepare`."""
    from .config.sources import ConfigSource, prepare

    status = ExitCode.OK
    for path in files:
        try:
            if path.endswith(".toml"):
                cfg = prepare(ConfigSource(toml=path)).loaded.config
                print(f"{path}: ok ({len(cfg.tunnels)} tunnel(s))")
                if debug:
                    for entry in cfg.tunnels:
                        print(f"  tunnel {entry.name}: {entry.config}, helper "
                              f"{' '.join(entry.helper)}")
            else:
                spec = prepare(ConfigSource(confs=(path,))).loaded.specs[0]
                routes = len(spec.allowed_ips)
                print(f"{path}: ok (interface {spec.name}, {len(spec.peers)} peer(s), "
                      f"{routes} allowed IP prefix(es))")
        except ConfigError as exc:
            print(f"{exc}", file=sys.stderr)
            status = ExitCode.USAGE
    confs = tuple(path for path in files if not path.endswith(".toml"))
    if status == ExitCode.OK and len(confs) > 1:
        # Together, as `run` would run them: conflicts between tunnels.
        try:
            prepare(ConfigSource(confs=confs))
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


def _run(args: argparse.Namespace | SimpleNamespace) -> int:
    """:func:`_run_service` with the cyclic garbage collector off, and as it
    was after.

    A cold start creates a few hundred thousand objects (imports, attrs
    classes, the configuration) and no garbage worth collecting: the ~65
    collections they would set off cost ~4 % of the start.  Once the
    service is built, ``gc.freeze`` puts all of it out of the collector's
    sight and the collector runs again (see :func:`_run_service`)."""
    import gc

    from . import _lazy

    # Before the configuration's modules (shutil) and trio import them.
    _lazy.defer()
    was = gc.isenabled()
    gc.disable()
    try:
        return _run_service(args)
    finally:
        if was:
            gc.enable()


def _run_service(args: argparse.Namespace | SimpleNamespace) -> int:
    from .config.sources import ConfigSource, prepare

    if not args.confs and not args.config:
        print("tunsup run: give at least one CONF.conf or -c FILE", file=sys.stderr)
        return ExitCode.USAGE
    overrides = {
        "state_dir": args.state_dir,
        "runtime_dir": args.runtime_dir,
        "dns_backend": args.dns,
        "resolv_conf": args.resolv_conf,
    }
    source = ConfigSource(tuple(args.confs), args.config, overrides)
    # Every check of the configuration (shared with `tunsup check`).
    prepared = prepare(source)
    loaded, group = prepared.loaded, prepared.group
    cfg = loaded.config

    # Everything below is checked before anything is applied.
    if not _has_net_admin():
        print("tunsup run: needs root (CAP_NET_ADMIN) to configure interfaces", file=sys.stderr)
        return ExitCode.USAGE

    # The instance lock (and the pid file, with pid and start time).
    from .engine import lock as instance_lock

    try:
        lock = instance_lock.acquire(cfg.runtime_dir, cfg.state_dir)
    except instance_lock.LockHeld as exc:
        print(f"tunsup run: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        # (pidfile.write's FileExistsError names no file: its text says all.)
        what = f"cannot lock {exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        print(f"tunsup run: {what}", file=sys.stderr)
        return ExitCode.USAGE

    from . import _prefetch

    try:
        # The helpers' --version runs end on the other CPU while trio and
        # the engine are imported (~100 ms): see tunsup._prefetch.
        options = [cfg.tunnel_options(entry) for _, entry in loaded.entries()]
        _prefetch.start({o.helper[0] for o in options
                         if o.tun_mode == "owned" and o.tun_header == "auto"})
        return _start_service(args, loaded, group, lock, options, source)
    finally:
        try:
            lock.release()
        finally:
            _prefetch.discard()


def _start_service(args: argparse.Namespace | SimpleNamespace, loaded: Loaded,
                   group: int | None, lock: InstanceLock, options: list[TunnelOptions],
                   source: ConfigSource) -> int:
    """The service's part of ``run``, once the configuration is checked and
    the instance lock held (released by the caller)."""
    cfg = loaded.config
    from ._findlib import pthread_from_libc

    with pthread_from_libc():  # trio's import runs no ldconfig (~2 ms)
        import trio

    from ._log import HUB, setup_logging, stop_logging
    from .engine.journal import Journal, JournalObserver
    from .engine.tunnel import Tunnel
    from .host import real_host
    from .service import run_service

    setup_logging(debug=args.debug, json_lines=args.json_logs)
    try:
        journal = Journal(cfg.state_dir, lock.pid, lock.start_time)
        host = real_host(resolv_conf=cfg.dns.resolv_conf,
                         route_progress=lambda n: journal.fault.total("routes", n))
        tunnels = [Tunnel(spec, host, opts, observer=JournalObserver(journal, spec.name))
                   for (spec, _), opts in zip(loaded.entries(), options, strict=True)]
        settings = cfg.control.settings(group)
        timer = _step_timer(args.debug)

        async def service() -> int:
            return await run_service(tunnels, host, source=source, loaded=loaded, hub=HUB,
                                     settings=settings, journal=journal,
                                     on_failure=cfg.on_failure, collector_paused=True)

        # Everything imported and built so far lives as long as the process:
        # out of the collector's sight, a full collection (set off by a burst
        # of connections, say) scans only what came later, and does not
        # stall the event loop for tens of milliseconds.  The collector,
        # paused for the start (_collector_paused), stays paused through the
        # tunnels' bring-up too: run_service gives it back once they are up.
        import gc

        _bundle_done()
        gc.freeze()
        code = trio.run(service, instruments=[timer] if timer is not None else [])
        if timer is not None:
            timer.report()
    finally:
        stop_logging()
    return int(code)


def _bundle_done() -> None:
    """The start's imports are done: take the bundle's finder off (what the
    service imports later goes the usual way) and say (at debug level) how
    many modules came from it, or why none did."""
    import logging

    from . import _bundle

    log = logging.getLogger("tunsup")
    finder = _bundle.uninstall()
    if finder is not None:
        log.debug("imports: %d modules from the bundle %s", finder.served,
                  _bundle.bundle_path())
    else:
        log.debug("imports: no module bundle (%s)", _bundle.why_not())


def _cleanup(args: argparse.Namespace | SimpleNamespace) -> int:
    from ._paths import DEFAULT_STATE_DIR
    from .config.settings import TunnelOptions
    from .config.toml import load_supervisor_config

    DEFAULT_STOP_TIMEOUT = TunnelOptions().stop_timeout

    cfg = load_supervisor_config(args.config) if args.config else None
    state_dir = args.state_dir
    if state_dir is not None:
        given: str | None = "--state-dir"
    elif cfg is not None:
        state_dir = cfg.state_dir
        given = f"state_dir of {args.config}"
    else:
        state_dir, given = DEFAULT_STATE_DIR, None
    timeout = cfg.stop_timeout if cfg is not None else DEFAULT_STOP_TIMEOUT
    if not os.path.isdir(state_dir):
        if given is not None:
            # Pointed at a place that is not there: a wrong path, not a clean
            # host.  Saying "nothing to clean up" would hide a leftover.
            print(f"tunsup cleanup: state directory {state_dir} ({given}) does not exist: "
                  "nothing was cleaned up", file=sys.stderr)
            return ExitCode.USAGE
        print(f"tunsup cleanup: {state_dir} does not exist: nothing to clean up")
        return ExitCode.OK
    if not _has_net_admin() and not args.dry_run:
        print("tunsup cleanup: needs root (CAP_NET_ADMIN)", file=sys.stderr)
        return ExitCode.USAGE

    from .engine import lock as instance_lock

    try:
        lock_fd: int | None = instance_lock.lock_state(state_dir)
    except instance_lock.LockHeld as exc:
        print(f"tunsup cleanup: a live instance owns {state_dir}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except OSError as exc:
        if not args.dry_run:
            # Recovery records what it undoes: without a writable state
            # directory it could undo and forget to say so.
            print(f"tunsup cleanup: cannot lock {state_dir}: {exc.strerror or exc}; nothing "
                  "was cleaned up ('--dry-run' shows what is left)", file=sys.stderr)
            return ExitCode.TEARDOWN_INCOMPLETE
        # A dry run writes nothing: it may read a state it cannot lock.
        lock_fd = None

    import trio

    from ._log import setup_logging, stop_logging
    from .engine.recovery import recover
    from .host import real_host

    keep = _kept_tunnels(args, cfg)
    setup_logging(debug=args.debug)
    try:
        host = real_host()

        async def main() -> object:
            try:
                return await recover(state_dir, host, dry_run=args.dry_run, drop=args.drop,
                                     timeout=timeout, out=lambda line: print(line, flush=True),
                                     keep=keep)
            finally:
                with trio.CancelScope(shield=True):
                    await host.net.close()

        report = trio.run(main)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        stop_logging()
    from .engine.recovery import RecoveryReport

    assert isinstance(report, RecoveryReport)
    for line in report.undone:
        print(f"undone: {line}")
    for line in report.failures:
        print(f"NOT undone: {line}", file=sys.stderr)
    if report.failures:
        print("tunsup cleanup: what was not undone stays recorded; 'tunsup cleanup --drop' "
              "forgets it once handled", file=sys.stderr)
    for name in report.quarantined:
        print(f"damaged journal kept aside as {name}", file=sys.stderr)
    if report.live:
        print("tunsup cleanup: live instance(s) own: " + ", ".join(report.live), file=sys.stderr)
        return ExitCode.FAILURE
    if report.dropped:
        print(f"tunsup cleanup: dropped {len(report.dropped)} object(s) that could not be "
              "undone (listed above): check them on the host by hand", file=sys.stderr)
    if not report.complete:
        if report.unreadable:
            print(f"tunsup cleanup: {report.unreadable} journal record(s) were unreadable; "
                  "what they described may still be on the host", file=sys.stderr)
        return ExitCode.TEARDOWN_INCOMPLETE
    if not args.dry_run:
        if report.kept:
            print(f"host restored ({len(report.undone)} object(s) undone) but for the kill "
                  f"switch of tunnels still configured ({len(report.kept)} object(s) kept: "
                  "'tunsup run' takes them over, 'tunsup cleanup --all' removes them)")
        elif report.recovered:
            print(f"host restored ({len(report.undone)} object(s) undone)")
        else:
            print("nothing to clean up")
    _stale_runtime_files(args, state_dir, report.recovered)
    return ExitCode.OK


def _kept_tunnels(args: argparse.Namespace | SimpleNamespace,
                  cfg: object) -> Callable[[str], bool] | None:
    """``--keep-kill-switch``: which tunnels' kill switches stay (by
    interface name: a ``.conf`` file's stem)."""
    if not args.keep_kill_switch:
        return None
    from .config.toml import SupervisorConfig

    if not isinstance(cfg, SupervisorConfig):
        return lambda _name: True
    names = {os.path.splitext(os.path.basename(t.config))[0] for t in cfg.tunnels}
    return names.__contains__


def _stale_runtime_files(args: argparse.Namespace | SimpleNamespace, state_dir: str,
                         recovered: Sequence[str]) -> None:
    """Once the host is restored: the pid file and control socket of a dead
    service (pid and start time checked; a live one's are never touched),
    which would make ``status`` keep saying the service died uncleanly.
    Only when that service's journal was among those just ``recovered``
    from ``state_dir``: a cleanup of another state directory must not
    remove the one sign that a crash left something on the host."""
    from . import pidfile
    from ._paths import DEFAULT_RUNTIME_DIR
    from .config.toml import load_supervisor_config
    from .control import protocol as _protocol
    from .engine import lock as instance
    from .engine.journal import journal_name

    runtime_dir = args.runtime_dir
    if runtime_dir is None:
        runtime_dir = (load_supervisor_config(args.config).runtime_dir if args.config
                       else DEFAULT_RUNTIME_DIR)
    sockets = [_protocol.socket_path(runtime_dir)]
    owner = pidfile.read(runtime_dir)
    if owner is None or owner.alive():
        return
    name = journal_name(owner.pid, owner.start_time)
    # (A dry run recovers nothing: the journal it would recover is there.)
    if name not in {os.path.basename(p) for p in recovered} and not (
            args.dry_run and os.path.exists(os.path.join(state_dir, name))):
        print(f"tunsup cleanup: the service named by {pidfile.pid_path(runtime_dir)} (pid "
              f"{owner.pid}, gone) left no journal in {state_dir}: its pid file and socket "
              "are left as they are (if it used another state directory, run cleanup with "
              "that one; if it had changed nothing, remove them)", file=sys.stderr)
        return
    if args.dry_run:
        for path in instance.stale_runtime_files(runtime_dir, sockets):
            print(f"would remove {path} (its service is gone)")
        return
    # The state lock is released by now: a state_dir that is also the
    # runtime_dir is locked again here.
    for path in instance.remove_stale_runtime_files(runtime_dir, sockets):
        print(f"removed {path} (its service is gone)")
