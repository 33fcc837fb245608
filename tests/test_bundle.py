"""tunsup._bundle: the modules of a start served from one file, exactly as
the usual import would give them, and never a stale or shadowed one.
Each check that imports runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from tunsup import _bundle
from tunsup.testing.service_process import ServiceProcess, ready_then_stopped

from .conftest import needs_netns
from .test_prefetch import run_args, write_conf


def _py(code: str, *, cwd: pathlib.Path, pythonpath: pathlib.Path | None = None,
        args: tuple[str, ...] = ()) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


_BUILD_MODULE = """
    import json, sys
    from tunsup import _bundle
    print(json.dumps({"count": _bundle.build(lambda: __import__("bmod"), sys.argv[1])}))
"""

_IMPORT_MODULE = """
    import json, sys
    from tunsup import _bundle
    finder = _bundle.install(sys.argv[1])
    out = {"installed": finder is not None}
    if finder is not None:
        import bmod
        out.update(value=bmod.VALUE, served=finder.served, file=bmod.__file__)
    print(json.dumps(out))
"""


@pytest.fixture
def module_bundle(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A directory on the search path with ``bmod.py`` (``VALUE = 1``), a
    bundle written with it imported, and an empty working directory."""
    pkgdir, cwd = tmp_path / "pkg", tmp_path / "cwd"
    pkgdir.mkdir()
    cwd.mkdir()
    (pkgdir / "bmod.py").write_text("VALUE = 1\n")
    path = tmp_path / "bundle.marshal"
    built = _py(_BUILD_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert isinstance(built["count"], int) and built["count"] > 5
    return pkgdir, cwd, path


def test_the_modules_of_a_start_come_from_the_bundle_as_they_would_from_their_files(
        tmp_path: pathlib.Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    path = tmp_path / "bundle.marshal"
    _py("""
        import json, sys
        from tunsup import _bundle
        print(json.dumps({"count": _bundle.build(_bundle._import_run_modules, sys.argv[1])}))
    """, cwd=cwd, args=(str(path),))
    probe = """
        import inspect, ipaddress, json, sys, traceback
        from tunsup import _bundle
        finder = _bundle.install(sys.argv[1]) if sys.argv[1] else None
        import trio, tunsup.service, tunsup.engine.tunnel
        try:
            ipaddress.ip_address("no address")
        except ValueError:
            tb = traceback.format_exc()
        print(json.dumps({
            "served": finder.served if finder else None,
            "files": {m: sys.modules[m].__file__ for m in ("trio", "trio._core._run",
                                                          "tunsup.service", "ipaddress")},
            "cached": trio.__cached__, "package": trio._core.__path__,
            "source": inspect.getsource(trio.run).splitlines()[0],
            "traceback": tb.splitlines()[-2],
        }))
    """
    bundled = _py(probe, cwd=cwd, args=(str(path),))
    plain = _py(probe, cwd=cwd, args=("",))
    served = bundled.pop("served")
    assert isinstance(served, int) and served >= 100, served
    assert plain.pop("served") is None
    assert bundled == plain
    assert "does not appear to be an IPv4 or IPv6 address" in str(bundled["traceback"])


def test_a_changed_source_is_imported_from_its_file(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    pkgdir, cwd, path = module_bundle
    same = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert same == {"installed": True, "value": 1, "served": 1,
                    "file": str(pkgdir / "bmod.py")}
    # Same size, a later time: only the time tells.
    source = pkgdir / "bmod.py"
    before = source.stat()
    source.write_text("VALUE = 2\n")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    changed = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert changed == {"installed": True, "value": 2, "served": 0,
                       "file": str(pkgdir / "bmod.py")}
    # Same time, another size.
    source.write_text("VALUE = 22\n")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    resized = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert resized["value"] == 22 and resized["served"] == 0


def test_a_module_added_beside_them_turns_the_bundle_off(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    pkgdir, cwd, path = module_bundle
    (pkgdir / "other.py").write_text("")
    assert _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),)) == {
        "installed": False}


def test_a_search_path_changed_after_the_start_is_obeyed(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        tmp_path: pathlib.Path) -> None:
    """A directory put first on ``sys.path`` once the finder is installed
    shadows a bundled module as it would without the bundle."""
    pkgdir, cwd, path = module_bundle
    first = tmp_path / "first"
    first.mkdir()
    (first / "bmod.py").write_text("VALUE = 4\n")
    result = _py("""
        import json, sys
        from tunsup import _bundle
        finder = _bundle.install(sys.argv[1])
        sys.path.insert(0, sys.argv[2])
        import bmod
        print(json.dumps({"installed": finder is not None, "value": bmod.VALUE}))
    """, cwd=cwd, pythonpath=pkgdir, args=(str(path), str(first)))
    assert result == {"installed": True, "value": 4}


def test_another_search_path_turns_the_bundle_off(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        tmp_path: pathlib.Path) -> None:
    _, cwd, path = module_bundle
    (tmp_path / "elsewhere").mkdir()
    assert _py(_IMPORT_MODULE, cwd=cwd, pythonpath=tmp_path / "elsewhere",
               args=(str(path),)) == {"installed": False}


@pytest.mark.parametrize(("entry", "shadows"), [
    ("bmod.py", True), ("bmod.cpython-311-x86_64-linux-gnu.so", True), ("bmod.pyc", True),
    ("bmod/__init__.py", True),
    # A namespace directory is found after a module of that name anywhere
    # on the path; a file without a module suffix is no module (the
    # `tunsup` script beside its Python).
    ("bmod/data.txt", False), ("bmod", False), ("bmodx.py", False),
])
def test_the_scripts_directory_must_not_shadow_a_bundled_module(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        entry: str, shadows: bool) -> None:
    pkgdir, cwd, path = module_bundle
    target = cwd / entry
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("VALUE = 3\n")
    result = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert result["installed"] is not shadows
    if not shadows:
        assert result["value"] == 1


def test_code_that_does_not_unmarshal_is_loaded_from_its_file(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    pkgdir, cwd, path = module_bundle
    data = bytearray(path.read_bytes())
    index = (_bundle._load(str(path)) or pytest.fail("unreadable"))[0]
    start, length = index["bmod"][4:6]
    _, _, head_length = _bundle._HEAD.unpack_from(data)
    at = _bundle._HEAD.size + head_length + start
    data[at:at + length] = b"\xff" * length
    path.write_bytes(bytes(data))
    result = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert result == {"installed": True, "value": 1, "served": 0,
                      "file": str(pkgdir / "bmod.py")}


def test_a_hostile_or_broken_file_is_not_used(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        tmp_path: pathlib.Path) -> None:
    _, _, path = module_bundle
    good = path.read_bytes()
    assert _bundle._load(str(path)) is not None
    cases: dict[str, Callable[[pathlib.Path], object]] = {
        "fifo": lambda p: os.mkfifo(p),
        "directory": lambda p: p.mkdir(),
        "empty": lambda p: p.write_bytes(b""),
        "garbage": lambda p: p.write_bytes(b"\0" * 100),
        "short": lambda p: p.write_bytes(good[:10]),
        "cut index": lambda p: p.write_bytes(good[:40]),
        "index altered": lambda p: p.write_bytes(good[:20] + bytes([good[20] ^ 1]) + good[21:]),
        "not marshal": lambda p: p.write_bytes(
            _bundle._HEAD.pack(_bundle._MAGIC, 0, 4) + b"\xff\xff\xff\xff"),
    }
    for name, make in cases.items():
        target = tmp_path / f"case-{name.replace(' ', '-')}"
        make(target)
        assert _bundle._load(str(target)) is None, name
    writable = tmp_path / "writable"
    writable.write_bytes(good)
    writable.chmod(0o666)
    assert _bundle._load(str(writable)) is None
    assert _bundle._load(str(tmp_path / "missing")) is None


@needs_netns
def test_the_installed_tunsup_runs_from_the_bundle(
        tmp_path: pathlib.Path, netns: Callable[[str], str]) -> None:
    """The ``tunsup`` script of the environment (as systemd runs it), with
    the bundle ``scripts/setup`` writes: the modules come from it and the
    tunnel comes up."""
    script = pathlib.Path(sys.executable).with_name("tunsup")
    if not script.exists():
        pytest.skip(f"no installed tunsup script beside {sys.executable} (scripts/setup)")
    subprocess.run([sys.executable, "-m", "tunsup._bundle"], check=True, timeout=120,
                   capture_output=True, cwd=tmp_path)
    ns = netns("bundle")
    svc = ServiceProcess(ns, [*run_args(tmp_path, write_conf(tmp_path, "tbndl1")), "--debug"],
                         str(tmp_path), "bundle", program=[str(script)])
    output = ready_then_stopped(svc)
    found = re.search(r"imports: (\d+) modules from the bundle", output)
    assert found, output
    assert int(found.group(1)) >= 100
