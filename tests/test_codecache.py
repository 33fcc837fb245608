"""The bytecode cache of attrs' generated methods (tunsup/_codecache.py).

Each check runs in fresh interpreters, with different hash seeds, as the
cache is used: one process writes it, another reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Defines the same class in every process (its hash salt differs per seed).
_PROBE = """
import attrs

@attrs.frozen
class Probe:
    a: int
    b: str

# The shapes of generated code the package itself may not have.
@attrs.frozen(cache_hash=True)
class CachedHash:
    a: int

@attrs.frozen
class Empty:
    pass

@attrs.frozen
class NoFieldHashed:
    a: int = attrs.field(eq=False)

@attrs.define(slots=False, eq=True, unsafe_hash=True)
class DictClass:
    a: int
    b: str = attrs.field(eq=str.lower)

@attrs.frozen
class Twice:
    a: int

TwiceFirst = Twice

@attrs.frozen
class Twice:
    a: int
    b: int
"""

_WRITE = """
import sys
from tunsup import _codecache
_codecache.install(sys.argv[1])  # before attrs is imported, as `tunsup run` does
_codecache._import_command_modules()
{probe}
cache = _codecache.installed()
cache.save()
print(len(cache.entries))
"""

# Fingerprints every method attrs generated for the classes of the
# package (and trio): with the cache from the file given, or, without an
# argument, with attrs' own compile.
_FINGERPRINT = """
import hashlib, json, sys, types
from tunsup import _codecache
if len(sys.argv) > 1:
    _codecache.install(sys.argv[1])  # before attrs is imported, as `tunsup run` does
import attrs
_codecache._import_command_modules()
{probe}
cache = _codecache.installed()
fields = ("co_code", "co_names", "co_varnames", "co_freevars", "co_cellvars",
          "co_filename", "co_name", "co_qualname", "co_firstlineno", "co_flags",
          "co_argcount", "co_kwonlyargcount", "co_posonlyargcount", "co_nlocals",
          "co_stacksize", "co_exceptiontable")

def shape(code):
    return (tuple(repr(getattr(code, f)) for f in fields),
            tuple(shape(c) if isinstance(c, types.CodeType) else (type(c).__name__, repr(c))
                  for c in code.co_consts))

prints = {{}}
for name, module in list(sys.modules.items()):
    if not name.startswith(("tunsup", "trio", "__main__", "attr.")):
        continue
    for attr, cls in list(vars(module).items()):
        if not (isinstance(cls, type) and attrs.has(cls) and cls.__module__ == name):
            continue
        for meth, fn in vars(cls).items():
            code = getattr(fn, "__code__", None)
            if code is not None and code.co_filename.startswith("<attrs generated"):
                prints[f"{{name}}.{{attr}}.{{meth}}"] = hashlib.sha256(
                    repr(shape(code)).encode()).hexdigest()
salt = hash("<attrs generated hash __main__.Probe>")
print(json.dumps({{
    "prints": prints,
    "hits": cache.hits if cache else None, "misses": cache.misses if cache else None,
    "validators_cached": sorted({{f for f, _ in cache.used if "attr.validators" in f}})
                         if cache else [],
    "probe_hash_ok": hash(Probe(1, "x")) == hash((salt, 1, "x")),
    "probe_eq": Probe(1, "x") == Probe(1, "x") and Probe(1, "x") != Probe(2, "x"),
    "probe_repr": repr(Probe(1, "x")),
}}))
"""


def _python(code: str, *args: str, seed: str, extra_env: dict[str, str] | None = None,
            flags: tuple[str, ...] = ()) -> str:
    env = dict(os.environ, PYTHONHASHSEED=seed, **(extra_env or {}))
    res = subprocess.run([sys.executable, *flags, "-c", code, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_a_cached_class_gets_exactly_the_code_attrs_would_compile(tmp_path: Path) -> None:
    """The cache is written by a process with one hash seed and read by one
    with another; every generated method of every class is compared with
    what attrs itself compiles in a process with the reader's seed."""
    path = str(tmp_path / "cache.marshal")
    written = int(_python(_WRITE.format(probe=_PROBE), path, seed="1"))
    assert written >= 100  # tunsup's and trio's classes
    script = _FINGERPRINT.format(probe=_PROBE)
    cached = json.loads(_python(script, path, seed="7"))
    compiled = json.loads(_python(script, seed="7"))
    assert cached["misses"] == 0 and cached["hits"] >= 100
    assert len(compiled["prints"]) >= 300
    different = sorted(k for k in compiled["prints"]
                       if cached["prints"].get(k) != compiled["prints"][k])
    assert different == [], different[:10]
    assert cached["prints"].keys() == compiled["prints"].keys()
    for name in ("Probe", "CachedHash", "Empty", "NoFieldHashed", "DictClass", "TwiceFirst",
                 "Twice"):
        assert f"__main__.{name}.__init__" in cached["prints"], name
    assert "__main__.CachedHash.__hash__" in cached["prints"]
    # attrs' own validators, defined while attrs is imported, hit it too.
    assert any(k.startswith("attr.validators.") for k in cached["prints"])
    assert len(cached["validators_cached"]) >= 10, cached["validators_cached"]
    # The salt of this process, not of the one that wrote the cache.
    assert cached["probe_hash_ok"] and compiled["probe_hash_ok"]
    assert cached["probe_eq"]
    assert cached["probe_repr"] == "Probe(a=1, b='x')"


# b"[" and a length of 2**31 - 1: marshal would reserve gigabytes for it.
@pytest.mark.parametrize("content", [b"", b"garbage", b"\xe3\x00\x00",
                                     b"tsattrs1\0\0\0\0[\xff\xff\xff\x7f", None])
def test_an_unreadable_or_foreign_cache_is_ignored_and_rewritten(
        tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "cache.marshal"
    if content is None:  # a valid file of another interpreter or attrs
        import marshal
        import zlib

        from tunsup import _codecache

        payload = marshal.dumps(("another-tag", {("<f>", "x = 1"): compile("x = 1", "<f>",
                                                                          "exec")}))
        content = _codecache._HEAD.pack(_codecache._MAGIC, zlib.crc32(payload)) + payload
    path.write_bytes(content)
    code = textwrap.dedent("""
        import sys
        from tunsup import _codecache
        _codecache.install(sys.argv[1])
        import tunsup.config.settings
        from tunsup.config.settings import RestartPolicy
        assert RestartPolicy() == RestartPolicy()
        cache = _codecache.installed()
        print(cache.hits, cache.misses, cache.save())
    """)
    hits, misses, saved = _python(code, str(path), seed="3").split()
    assert (hits, saved) == ("0", "True") and int(misses) > 0
    hits, misses, saved = _python(code, str(path), seed="4").split()
    assert int(hits) > 0 and (misses, saved) == ("0", "False")


def test_a_command_writes_the_cache_only_where_bytecode_may_be_written(
        tmp_path: Path) -> None:
    """``tunsup check`` installs the cache; what it compiled is written
    next to the package's bytecode (here under a pycache prefix), unless
    PYTHONDONTWRITEBYTECODE says no."""
    conf = tmp_path / "wg9.conf"
    conf.write_text("[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n"
                    "Address = 10.9.0.1/32\n")
    conf.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for dont_write, prefix in ((True, tmp_path / "no"), (False, tmp_path / "yes")):
        run_env = dict(env, PYTHONDONTWRITEBYTECODE="1") if dont_write else env
        res = subprocess.run([sys.executable, "-X", f"pycache_prefix={prefix}", "-m", "tunsup",
                              "check", str(conf)], cwd=ROOT, env=run_env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        written = list(prefix.rglob("attrs-methods.*.marshal"))
        assert (written == []) if dont_write else (len(written) == 1)
    # Run again, it compiles nothing (every class hits): nothing to write.
    before = written[0].stat().st_mtime_ns
    res = subprocess.run([sys.executable, "-X", f"pycache_prefix={tmp_path / 'yes'}", "-m",
                          "tunsup", "check", str(conf)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert written[0].stat().st_mtime_ns == before


@pytest.mark.parametrize("kind", ["fifo", "directory", "oversize", "world-writable",
                                  "bad-checksum"])
def test_a_cache_path_that_is_no_small_regular_file_is_ignored(tmp_path: Path, kind: str) -> None:
    """Hostile input is normal input: a FIFO at the cache's path must not
    hold up a start (opened without blocking), nor a directory or a huge
    file break it, and a file others than root may write is not run; the
    classes are compiled as attrs does."""
    path = tmp_path / "cache.marshal"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "oversize":
        with open(path, "wb") as f:
            f.truncate((16 << 20) + 1)
    else:  # a good cache, but anyone could have written it, or damaged
        good = str(tmp_path / "good.marshal")
        assert int(_python(_WRITE.format(probe=""), good, seed="1")) >= 100
        os.rename(good, path)
        if kind == "world-writable":
            path.chmod(0o666)
        else:
            data = bytearray(path.read_bytes())
            data[8] ^= 0xFF  # the checksum: the records themselves still decode
            path.write_bytes(bytes(data))
    code = textwrap.dedent("""
        import sys
        from tunsup import _codecache
        _codecache.install(sys.argv[1])
        from tunsup.config.settings import RestartPolicy
        assert RestartPolicy() == RestartPolicy()
        cache = _codecache.installed()
        print(len(cache.entries), cache.hits, cache.misses > 0)
    """)
    env = dict(os.environ, PYTHONHASHSEED="5")
    res = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "0", "True"]
