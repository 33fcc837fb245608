"""The supervisor-owned TUN device (``tunsup.host.tun``).

Devices are only ever created inside scratch namespaces, by a thread that
joined the namespace (``_netns.run_in_netns``).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import threading
from collections.abc import Callable

import pytest
import trio

from tunsup._errors import HostError
from tunsup.host import tun
from tunsup.host.tun import TunDevice, create_tun_sync, header_for_version
from tunsup.testing import netns as _netns

from .conftest import needs_netns, unique


def tun_info(ns: str, name: str) -> dict[str, object]:
    link = json.loads(_netns.ip("-d", "-j", "link", "show", "dev", name, ns=ns))[0]
    info: dict[str, object] = link["linkinfo"]["info_data"]
    return info


@needs_netns
@pytest.mark.parametrize("packet_info", [False, True])
def test_create_persistent_tun(netns: Callable[[str], str], packet_info: bool) -> None:
    ns = netns("tst")
    name = unique("tun")
    device = _netns.run_in_netns(ns, lambda: create_tun_sync(name, packet_info=packet_info))
    try:
        assert device.name == name and device.index > 0
        info = tun_info(ns, name)
        assert info["type"] == "tun" and info["persist"] is True
        assert info["pi"] is packet_info
        assert not os.get_blocking(device.fd)  # non-blocking, set after TUNSETIFF
        assert not os.get_inheritable(device.fd)  # only handed on explicitly
    finally:
        os.close(device.fd)
    # Persistent: closing tunsup's fd does not remove it (the undo deletes it).
    assert tun_info(ns, name)["persist"] is True
    _netns.ip("link", "del", name, ns=ns)


@needs_netns
def test_an_existing_device_is_never_adopted(netns: Callable[[str], str]) -> None:
    ns = netns("tst")
    name = unique("tun")
    _netns.ip("tuntap", "add", "dev", name, "mode", "tun", ns=ns)
    with pytest.raises(HostError, match=f"cannot create TUN device {name}: Device or resource"):
        _netns.run_in_netns(ns, lambda: create_tun_sync(name))
    assert tun_info(ns, name)["persist"] is True  # untouched


def test_bad_names_and_missing_device_file(tmp_path: object) -> None:
    with pytest.raises(HostError, match="invalid interface name"):
        create_tun_sync("x" * 16)
    with pytest.raises(HostError, match="cannot open"):
        create_tun_sync("wgx", tun_path="/nonexistent/tun")


def test_a_creation_given_up_on_rolls_itself_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker thread that finishes after its caller timed out removes
    the device it made: nothing is left that nobody knows about."""
    release, rolled_back = threading.Event(), threading.Event()
    read_end, write_end = os.pipe()
    os.close(read_end)

    def slow_create(name: str, *, packet_info: bool, tun_path: str) -> TunDevice:
        release.wait(10)
        return TunDevice(name, 7, write_end)

    def rollback(fd: int) -> None:
        assert fd == write_end
        os.close(fd)
        rolled_back.set()

    monkeypatch.setattr(tun, "create_tun_sync", slow_create)
    monkeypatch.setattr(tun, "_rollback", rollback)

    async def main() -> None:
        with pytest.raises(HostError, match=r"timed out after 0\.2 s"):
            await tun.create_tun("wgx", timeout=0.2)

    trio.run(main)
    assert not rolled_back.is_set()
    release.set()
    assert rolled_back.wait(10)


def test_header_for_version() -> None:
    assert header_for_version("wireguard-go v0.0.20220316\n\nUserspace ...") == "pi"
    assert header_for_version("wireguard-go v0.0.20230223") == "pi"
    assert header_for_version("wireguard-go v0.0.20231211") == "none"
    assert header_for_version("wireguard-go v0.0.20250522-dirty") == "none"
    assert header_for_version("boringtun 0.6.0") is None


def test_detect_header() -> None:
    async def main() -> tuple[str, str | None]:
        other = await tun.detect_header("/usr/bin/boringtun")  # not run at all
        real = None
        if shutil.which("wireguard-go"):
            real = await tun.detect_header("wireguard-go")
        return other, real

    other, real = trio.run(main)
    assert other == "none"
    if real is not None:
        import subprocess

        version = subprocess.run(["wireguard-go", "--version"], capture_output=True,
                                 text=True, check=False).stdout
        assert real == (header_for_version(version) or "none")


def fake_wireguard_go(tmp_path: pathlib.Path, body: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A ``wireguard-go`` in ``tmp_path`` that notes each run in the file
    returned second, then runs the shell commands ``body``."""
    runs = tmp_path / "runs"
    program = tmp_path / "wireguard-go"
    program.write_text(f"#!/bin/sh\necho run >> {runs}\n{body}\n")
    program.chmod(0o755)
    return program, runs


def ask_together(program: pathlib.Path, starts: int) -> list[str]:
    """The answers of ``detect_header(program)`` asked by ``starts``
    tasks at once (tunnels starting together)."""
    answers: list[str] = []

    async def main() -> None:
        async def ask() -> None:
            answers.append(await tun.detect_header(str(program)))

        async with trio.open_nursery() as nursery:
            for _ in range(starts):
                nursery.start_soon(ask)

    trio.run(main)
    return answers


def test_detect_header_asks_each_helper_binary_once(tmp_path: pathlib.Path) -> None:
    """`wireguard-go --version` runs once per binary, not on every `up`; a
    binary replaced on disk (an upgrade) is asked again."""
    program, runs = fake_wireguard_go(tmp_path, "echo 'wireguard-go v0.0.20230223'")

    async def ask() -> str:
        return await tun.detect_header(str(program))

    assert [trio.run(ask) for _ in range(3)] == ["pi", "pi", "pi"]
    assert runs.read_text().count("run") == 1
    fake_wireguard_go(tmp_path, "echo 'wireguard-go v0.0.20250522-newer'")  # another binary
    assert trio.run(ask) == "none"
    assert runs.read_text().count("run") == 2


def test_detect_header_asks_once_for_tunnels_starting_together(tmp_path: pathlib.Path) -> None:
    """Tunnels starting at once (up to max_parallel) share one
    ``--version`` run of their helper binary: they used to run one each,
    since none was answered yet when the others asked."""
    program, runs = fake_wireguard_go(tmp_path, "echo 'wireguard-go v0.0.20220316'")
    assert ask_together(program, 8) == ["pi"] * 8
    assert runs.read_text().count("run") == 1
    assert not tun._ASKING


def test_detect_header_waiters_ask_themselves_when_the_first_gets_no_answer(
        tmp_path: pathlib.Path) -> None:
    """A run that fails (here: exit status 1) gives no remembered answer;
    the starts that waited for it ask in turn instead of waiting forever."""
    program, runs = fake_wireguard_go(tmp_path, "exit 1")
    assert ask_together(program, 3) == ["none"] * 3
    assert runs.read_text().count("run") == 3
    assert not tun._ASKING
