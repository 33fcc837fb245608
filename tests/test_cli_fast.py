"""The client commands' fast start: a plain client command line is read
without argparse, exactly as argparse would read it, and a client command
imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

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
]

# Lines the fast path leaves to argparse (help, errors, argparse niceties).
OTHERS = [
    [], ["run", "a.conf"], ["check", "a.conf"], ["status", "--help"], ["status", "-h"],
    ["status", "--js"], ["status", "extra"], ["up"], ["up", "a", "b"], ["down", "-x"],
    ["stop", "--timeout"], ["stop", "--timeout", "soon"], ["stop", "--timeout", "-1"],
    ["logs", "-fn", "3"], ["status", "--json=1"], ["up", "--", "-a.conf"],
    ["status", "--runtime-dir", "--debug"],
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
    for command, (positionals, options, _defaults) in cli._CLIENT_LINES.items():
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
    attrs, cattrs nor argparse, typing or logging."""
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
             "subprocess"}
    assert heavy.isdisjoint(modules), heavy & set(modules)
