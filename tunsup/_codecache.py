"""A bytecode cache for the methods attrs generates: a cold-start cost.

attrs writes the ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``... of
every class it builds as Python source and ``compile()``\\ s it when the class
is defined.  ``tunsup run`` defines about 130 such classes (its own and
trio's): their compilation was ~22 ms of a ~115 ms cold start, more than
any single import.  Python caches the bytecode of modules in ``.pyc``
files; nothing caches this.  So, as ``.pyc`` files do, this module keeps
the code objects compiled from those scripts in one marshal file in the
package's ``__pycache__``, keyed by the script's exact text and its file
name: a class whose generated source changed (an attrs upgrade, a field
added) misses and is compiled as before.  The file is tagged with the
interpreter's version and the size and time of attrs' code generator
(``attr/_make.py``) and ignored when either differs, or when it is
unreadable or malformed.

One wrinkle: attrs salts each ``__hash__`` with ``hash()`` of a string,
which differs from process to process (``PYTHONHASHSEED``).  The salt is
replaced by a fixed marker in the key and in the source that is compiled,
and this process's salt is put back in place of the marker in the compiled
constants (checked: exactly one).  The code a class gets is therefore
exactly the code attrs would have compiled, less the column of that one
literal; ``tests/test_codecache.py`` compares both for every class of the
package.

Trust: the file is read from where the package's own ``.pyc`` files are
and is trusted as they are.  It is written by ``scripts/setup`` (``python
-m tunsup._codecache``, as ``compileall`` writes ``.pyc`` files) and, when
bytecode may be written (no ``PYTHONDONTWRITEBYTECODE``), by a command that
missed: atomically (a temporary file renamed over it), never on the path
of a start-up.  Anything unexpected (another attrs with another internal
shape, a marker not found) falls back to attrs' own compile.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import struct
import sys
import zlib

from ._trusted import read_trusted, remove_other_tags

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import CodeType
    from typing import Any

# Stands for the hash salt in the compiled source.  hash() of a str is a
# 64-bit value, so the marker equals a real salt with probability 2**-64;
# even then the swap below stays exact (the salt replaces the marker).
_MARK = 0x5EED_0F_A77_25_CAC4E
_SALT_OPEN = "hash((\n"
_FILE = "attrs-methods.{tag}.marshal"  # one file per tag
#: At most this many entries are kept: a cache that outgrew it (many
#: versions of the code) keeps only what the last command used.
_MAX_ENTRIES = 4000
#: A cache file larger than this is not read (nor written): ~0.5 MB today.
_MAX_BYTES = 16 << 20
#: The file: this header (magic, CRC-32 of the rest), then the marshal data.
_HEAD = struct.Struct("<8sI")
_MAGIC = b"tsattrs1"

_Key = tuple[str, str]


class CodeCache:
    """Compiled attrs scripts by (file name, script with the salt marked)."""

    def __init__(self, path: str | None, tag: str, flags: int) -> None:
        self.path = path
        self.tag = tag
        self.flags = flags
        self.entries: dict[_Key, CodeType] = self._load() if path else {}
        self.used: dict[_Key, CodeType] = {}
        self.hits = 0
        self.misses = 0

    def _load(self) -> dict[_Key, CodeType]:
        assert self.path is not None
        try:
            blob = read_trusted(self.path, _MAX_BYTES)
            # The checksum first: marshal trusts the lengths it reads (five
            # bytes can make it reserve gigabytes).
            payload = memoryview(blob)[_HEAD.size:]
            if (len(blob) < _HEAD.size
                    or _HEAD.unpack_from(blob) != (_MAGIC, zlib.crc32(payload) & 0xFFFFFFFF)):
                return {}
            data = marshal.loads(payload)
        except Exception:  # unreadable, damaged, foreign: it is only a cache
            return {}
        if (not isinstance(data, tuple) or len(data) != 2 or data[0] != self.tag
                or not isinstance(data[1], dict)):
            return {}
        return data[1]

    def code_for(self, script: str, filename: str) -> CodeType:
        """The code ``compile(script, filename, "exec")`` gives (with attrs'
        compiler flags), from the cache when it holds it."""
        salt, marked = _mark_salt(script)
        key = (filename, marked)
        code = self.entries.get(key)
        if code is None or type(code).__name__ != "code":
            code = compile(marked, filename, "exec", flags=self.flags, dont_inherit=True)
            self.misses += 1
        else:
            self.hits += 1
        self.used[key] = code
        if salt is None:
            return code
        swapped, count = _swap_const(code, _MARK, salt)
        if count != 1:  # not the shape expected: compile as attrs does
            fresh: CodeType = compile(script, filename, "exec", flags=self.flags,
                                      dont_inherit=True)
            return fresh
        return swapped

    def save(self) -> bool:
        """Write the cache if this process compiled anything (atomically);
        True if written.  Errors are ignored: it is only a cache."""
        if self.path is None or not self.misses:
            return False
        entries = {**self.entries, **self.used}
        if len(entries) > _MAX_ENTRIES:
            entries = dict(self.used)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        created = False
        try:
            payload = marshal.dumps((self.tag, entries))
            data = _HEAD.pack(_MAGIC, zlib.crc32(payload) & 0xFFFFFFFF) + payload
            if len(data) > _MAX_BYTES:
                return False
            directory = os.path.dirname(self.path)
            os.makedirs(directory, exist_ok=True)
            # A new file of our own (never through a link someone left).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            created = True
            with open(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            created = False
            remove_other_tags(self.path, _FILE)
        except (OSError, ValueError):
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return False
        self.entries, self.misses = entries, 0
        return True


def _mark_salt(script: str) -> tuple[int | None, str]:
    """(the hash salt, the script with the salt replaced by the marker), or
    (None, script) when it has no ``__hash__`` attrs salted."""
    at = script.find("def __hash__(self")
    at = script.find(_SALT_OPEN, at) if at >= 0 else -1
    if at < 0:
        return None, script
    start = at + len(_SALT_OPEN)
    end = script.find(",\n", start)
    if end < 0:
        return None, script
    literal = script[start:end].strip()
    try:
        salt = int(literal)
    except ValueError:
        return None, script
    return salt, f"{script[:start]}{script[start:end].replace(literal, str(_MARK))}{script[end:]}"


def _swap_const(code: CodeType, old: int, new: int, *, only: str | None = "__hash__"
                ) -> tuple[CodeType, int]:
    """``code`` with the int constant ``old`` replaced by ``new`` in it and
    in the code nested in it (at the top, only in functions named ``only``:
    attrs puts the salt in ``__hash__`` alone, and a script holds up to a
    dozen methods); and how many were replaced."""
    count = 0
    consts = []
    for const in code.co_consts:
        if type(const) is int and const == old:
            const = new
            count += 1
        elif type(const) is tuple and any(type(c) is int and c == old for c in const):
            # ``hash((salt,))`` (no field hashed): folded into one constant.
            const = tuple(new if type(c) is int and c == old else c for c in const)
            count += 1
        elif type(const) is type(code) and (only is None or const.co_name == only):
            const, inner = _swap_const(const, old, new, only=None)
            count += inner
        consts.append(const)
    return (code.replace(co_consts=tuple(consts)) if count else code), count


def _cache_path(tag: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    name = _FILE.format(tag=tag)
    prefix = sys.pycache_prefix
    if prefix:
        return os.path.join(prefix, here.lstrip(os.sep), name)
    return os.path.join(here, "__pycache__", name)


_installed: CodeCache | None = None


def install(path: str | None = None) -> CodeCache | None:
    """Route attrs' compilation of generated methods through the cache
    (once per process; classes defined before are not affected).  Returns
    the cache; None when this attrs does not have the internal shape it
    expects (then attrs compiles as always), or when attrs is not imported
    yet: then the cache is installed as soon as attrs' code generator
    exists, so that the classes attrs defines for itself while it is
    imported (its validators: ~20 classes, 4-8 ms of every cold start)
    take their code from it too; :func:`installed` returns it."""
    if _installed is not None:
        return _installed
    if "attr" not in sys.modules:
        # Nothing outside attrs can run between the definition of its
        # code generator (``attr._make``, which ``attr/__init__`` imports
        # through ``attr.converters`` first) and its validators' classes,
        # but the import system: a finder that finds nothing hooks in at
        # the first import after it.
        if not any(isinstance(f, _HookWhenAttrsCompiles) for f in sys.meta_path):
            sys.meta_path.insert(0, _HookWhenAttrsCompiles(path))
        return None
    return _hook(path, None)


def installed() -> CodeCache | None:
    """The cache attrs compiles through, if installed."""
    return _installed


class _HookWhenAttrsCompiles:
    """A meta path finder that finds nothing: asked for any module once
    ``attr._make._compile_and_eval`` exists, it installs the cache
    (:func:`_hook`) and removes itself."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        make = sys.modules.get("attr._make")
        if getattr(make, "_compile_and_eval", None) is not None:
            # A new list, not the one the import system is going through
            # right now: removing from that one would skip the next finder.
            sys.meta_path = [f for f in sys.meta_path if f is not self]
            _hook(self.path, make)


def _hook(path: str | None, make: Any) -> CodeCache | None:
    """Install the cache into ``make`` (``attr._make``; imported if None)."""
    global _installed
    if _installed is not None:
        return _installed
    if make is None:
        try:
            from attr import _make as make
        except ImportError:
            return None
    _make = make
    original: Any = getattr(_make, "_compile_and_eval", None)
    code = getattr(original, "__code__", None)
    # Exactly what attrs 22-26 do there: compile(script, filename), eval.
    if (code is None or code.co_varnames[:4] != ("script", "globs", "locs", "filename")
            or code.co_names != ("compile", "eval")):
        return None
    import __future__

    # compile() there inherits the __future__ flags of attrs' own module.
    future = 0
    for feature in __future__.all_feature_names:
        future |= getattr(__future__, feature).compiler_flag
    flags = code.co_flags & future
    try:
        # attrs' version would cost an importlib.metadata import (~25 ms):
        # its code generator's file identifies it as well (as a .pyc's
        # source does).
        st = os.stat(_make.__file__)
    except (OSError, TypeError):
        return None
    tag = (f"{sys.implementation.cache_tag}-{sys.hexversion:x}-O{sys.flags.optimize}"
           f"-{st.st_size}-{st.st_mtime_ns}")
    cache = CodeCache(_cache_path(tag) if path is None else path, tag, flags)

    def compile_and_eval(script: str, globs: dict[str, Any] | None,
                         locs: Mapping[str, object] | None = None,
                         filename: str = "") -> None:
        eval(cache.code_for(script, filename), globs, locs)

    _make._compile_and_eval = compile_and_eval
    _installed = cache
    return cache


def save_if_allowed() -> None:
    """Write what this process compiled, unless bytecode is not to be
    written (``PYTHONDONTWRITEBYTECODE``, ``-B``), as Python does for
    ``.pyc`` files."""
    if _installed is not None and not sys.dont_write_bytecode:
        _installed.save()


def build(modules: Callable[[], None]) -> CodeCache | None:
    """Install, run ``modules`` (which imports what the commands use) and
    write the cache whatever ``PYTHONDONTWRITEBYTECODE`` says."""
    install()
    modules()
    cache = _installed  # installed once attrs was imported
    if cache is not None:
        cache.save()
    return cache


def _import_command_modules() -> None:
    """Import every module of the package a command may use (not the
    test helpers), and trio with it."""
    import pkgutil

    here = os.path.dirname(os.path.abspath(__file__))
    for info in pkgutil.walk_packages([here], "tunsup."):
        if info.name.startswith(("tunsup.testing", "tunsup.__main__")):
            continue
        __import__(info.name)


if __name__ == "__main__":
    built = build(_import_command_modules)
    if built is None:
        print("tunsup._codecache: this attrs is not supported; nothing cached", file=sys.stderr)
    else:
        print(f"tunsup._codecache: {len(built.entries)} attrs method scripts cached "
              f"in {built.path}", file=sys.stderr)
