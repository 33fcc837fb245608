"""The ``[control]`` table of the supervisor TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunsup import ConfigError
from tunsup.config.sources import control_group
from tunsup.config.toml import ControlConfig, load_supervisor_config


def load(tmp_path: Path, text: str) -> ControlConfig:
    path = tmp_path / "t.toml"
    path.write_text(text)
    return load_supervisor_config(path).control


def test_defaults_and_values(tmp_path: Path) -> None:
    assert load(tmp_path, "") == ControlConfig(group=None, idle_timeout=30.0,
                                               request_timeout=10.0)
    cfg = load(tmp_path, '[control]\ngroup = "nogroup"\nidle_timeout = 2\n'
                         'request_timeout = 0.5\n')
    assert cfg == ControlConfig(group="nogroup", idle_timeout=2.0, request_timeout=0.5)
    assert load(tmp_path, "[control]\ngroup = 0\n").group == 0


@pytest.mark.parametrize(("text", "line", "message"), [
    ("[control]\ngroup = true\n", 2, "[control]: group must be a group name or a numeric"),
    ('[control]\ngroup = ""\n', 2, "[control]: group must be a group name"),
    ("[control]\ngroup = -1\n", 2, "[control]: group must be a group name"),
    ("[control]\nidle_timeout = 0\n", 2, "[control]: idle_timeout must be a number > 0"),
    ('[control]\nrequest_timeout = "1"\n', 2, "[control]: request_timeout must be a number > 0"),
    ("[control]\ngrp = 1\n", 2, "unknown key 'grp' in [control]; did you mean 'group'?"),
    ("control = 1\n", 1, "control must be a table"),
])
def test_errors_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert info.value.line == line
    assert info.value.message.startswith(message), info.value.message


def test_group_names_resolve_on_this_machine(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[control]\ngroup = "root"\n')
    assert control_group(load_supervisor_config(path), str(path)) == 0
    path.write_text("[control]\ngroup = 4242\n")
    assert control_group(load_supervisor_config(path), str(path)) == 4242
    path.write_text('[control]\ngroup = "no-such-group-here"\n')
    with pytest.raises(ConfigError, match="group 'no-such-group-here' does not exist"):
        control_group(load_supervisor_config(path), str(path))
