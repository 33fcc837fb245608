"""The client commands' fast start: a plain client command line is read
without argparse, exactly as argparse would read it, and a client command
imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunsup import cli

LINES = [
    ["status"], ["status", "--json"], ["status", "--runtime-dir", "/r", "--debug"],
    ["status", "--runtime-dir=/r"], ["status", "-c", "x.toml"], ["status", "-c=x.toml"],
    ["stop"], ["stop", "--timeout", "2.5", "--force", "--state-dir", "/s"],
    ["stop", "--timeout=7"], ["stop", "--timeout", "nan"],
    ["up", "a.conf"], ["up", "--debug", "a.conf", "--runtime-dir", "/r"],
    ["down", "wg0"], ["reload"], ["reload", "-c", "x.toml"],
    ["logs"], ["logs", "-f", "-n", "5", "--json"], ["logs", "--lines=0", "--follow"],
    ["status", "--json", "--json"], ["logs", "-n", "3", "-n", "4"],
    # run: the service's own start is read without argparse too.
    ["run"], ["run", "a.conf"], ["run", "a.conf", "b.conf", "--debug"],
    ["run", "--debug", "--dns", "file", "--resolv-conf", "/r.conf", "a.conf"],
    ["run", "-c", "x.toml", "--state-dir=/s", "--runtime-dir", "/r", "--json-logs"],
    ["run", "--dns=none", "a.conf", "b.conf"], ["run", "-c", "x.toml", "a.conf"],
]

# Lines the fast path leaves to argparse (help, errors, argparse niceties).
OTHERS = [
    [], ["check", "a.conf"], ["status", "--help"], ["status", "-h"],
    ["status", "--js"], ["status", "extra"], ["up"], ["up", "a", "b"], ["down", "-x"],
    ["stop", "--timeout"], ["stop", "--timeout", "soon"], ["stop", "--timeout", "-1"],
    ["logs", "-fn", "3"], ["status", "--json=1"], ["up", "--", "-a.conf"],
    ["status", "--runtime-dir", "--debug"],
    ["run", "--dns", "bogus", "a.conf"], ["run", "a.conf", "--debug", "b.conf"],
    ["run", "--help"], ["run", "--deb", "a.conf"], ["run", "--json-logs=1"],
    ["run", "--", "a.conf"], ["run", "--state-dir"],
]


@pytest.mark.parametrize("argv", LINES, ids=" ".join)
def test_fast_client_line_reads_as_argparse_reads_it(argv: list[str]) -> None:
    fast = cli._client_args(argv)
    assert fast is not None
    expected = vars(cli._parser().parse_args(argv))
    got = vars(fast)
    # nan != nan: compare its text
    assert {k: repr(v) for k, v in got.items()} == {k: repr(v) for k, v in expected.items()}


@pytest.mark.parametrize("argv", OTHERS, ids=" ".join)
def test_other_lines_are_left_to_argparse(argv: list[str]) -> None:
    assert cli._client_args(argv) is None


def test_fast_table_knows_every_client_option() -> None:
    """Every option argparse knows for a client command, the fast path
    knows too (same destination), and no other."""
    import argparse

    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(cli._CLIENT_LINES) == set(cli.CLIENT_COMMANDS)
    listed, run_options, _run_defaults = cli._RUN_LINE
    lines = {**cli._CLIENT_LINES, "run": ((listed,), run_options, _run_defaults)}
    for command, (positionals, options, _defaults) in lines.items():
        known = {**options, **cli._COMMON_OPTIONS}
        argparse_options = {}
        argparse_positionals = []
        for action in sub.choices[command]._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings:
                argparse_positionals.append(action.dest)
            for option in action.option_strings:
                argparse_options[option] = action.dest
        assert {o: d for o, (d, _c) in known.items()} == argparse_options, command
        assert list(positionals) == argparse_positionals, command


def test_client_command_imports_nothing_heavy(tmp_path: object) -> None:
    """`tunsup status` (here: no service runs) loads neither trio, pyroute2,
    attrs, cattrs nor argparse, typing or logging, nor the socket and signal
    wrappers (their enums cost every client start milliseconds)."""
    code = (
        "import sys\n"
        "from tunsup.cli import main\n"
        f"rc = main(['status', '--runtime-dir', {str(tmp_path)!r}])\n"
        "import json\n"
        "print(json.dumps([rc, sorted(sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    rc, modules = json.loads(out.splitlines()[-1])
    assert rc == 3  # not running
    heavy = {"trio", "pyroute2", "attr", "attrs", "cattrs", "argparse", "typing", "logging",
             "subprocess", "socket", "signal", "selectors"}
    assert heavy.isdisjoint(modules), heavy & set(modules)


ROOT = Path(__file__).resolve().parent.parent


def _modules_imported_by(argv: list[str]) -> set[str]:
    """The modules the installed command (bin/tunsup, as pip installs it)
    imports for ``argv``, from ``python -X importtime``; ``-S``: the
    interpreter's own site (.pth files, an editable install's finder) is
    not tunsup's."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-S", "-X", "importtime", str(ROOT / "bin" / "tunsup"),
                          *argv], capture_output=True, text=True, timeout=60, env=env)
    modules = {line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines()
               if line.startswith("import time:") and "imported package" not in line}
    assert "tunsup.cli" in modules, res.stderr
    return modules


def test_installed_command_loads_no_stdlib_weight_for_a_client_command(
        tmp_path: Path) -> None:
    """`tunsup status`/`down` as installed import neither re nor enum (pip's
    entry-point wrapper, json's decoder and encoder and an IntEnum would
    load them), json, contextlib, collections, functools nor types: about
    15 ms of a command that should take about 20 in all."""
    unwanted = {"re", "enum", "json", "json.decoder", "contextlib", "collections",
                "functools", "types", "typing", "argparse", "socket", "signal"}
    for argv in (["status", "--runtime-dir", str(tmp_path)],
                 ["down", "wg9", "--runtime-dir", str(tmp_path)],
                 ["up", str(tmp_path / "wg9.conf"), "--runtime-dir", str(tmp_path)]):
        modules = _modules_imported_by(argv)
        assert unwanted.isdisjoint(modules), (argv, unwanted & modules)


def test_run_of_a_conf_file_loads_no_toml_machinery(tmp_path: Path) -> None:
    """What `run wg0.conf` imports and does before its event loop (read its
    command line and the file, load the service, start logging) builds no
    cattrs converter and loads neither tomllib nor difflib (they serve TOML
    files and error messages), nor argparse or logging.handlers (pickle)."""
    conf = tmp_path / "wg7.conf"
    conf.write_text("[Interface]\nPrivateKey = " + "A" * 43 + "=\n")
    code = (
        "import sys\n"
        "from tunsup import cli\n"
        f"args = cli._client_args(['run', '--dns', 'none', {str(conf)!r}])\n"
        "from tunsup.config.sources import ConfigSource, prepare\n"
        "prepare(ConfigSource(tuple(args.confs)))\n"
        "import tunsup.service, tunsup.engine.tunnel, tunsup.engine.journal, tunsup.host\n"
        "from tunsup import _log\n"
        "_log.setup_logging()\n"
        "_log.stop_logging()\n"
        "import json\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    modules = set(json.loads(out.splitlines()[-1]))
    assert "tunsup.config.toml" in modules  # the records are there...
    unwanted = {"cattrs", "tomllib", "difflib", "argparse", "logging.handlers", "pickle"}
    assert unwanted.isdisjoint(modules), unwanted & modules  # ...not their loader


def test_run_reads_its_configuration_with_the_collector_paused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` builds its service with the cyclic collector paused (a cold
    start's objects hold no garbage worth the collections) and gives it
    back as it was, also when the configuration is refused."""
    import gc

    from tunsup import _errors
    from tunsup.config import sources

    seen: list[bool] = []
    real_prepare = sources.prepare

    def prepare(source: sources.ConfigSource) -> sources.Prepared:
        seen.append(gc.isenabled())  # observed, then the real check
        return real_prepare(source)

    monkeypatch.setattr(sources, "prepare", prepare)
    bad = tmp_path / "wg8.conf"
    bad.write_text("[Interface]\nPrivateKey = nonsense\n")
    args = cli._client_args(["run", str(bad)])
    assert args is not None
    assert gc.isenabled()
    with pytest.raises(_errors.ConfigError):
        cli._run(args)
    assert seen == [False]
    assert gc.isenabled()
