"""The bytecode of the modules ``tunsup run`` imports, in one file: a
cold-start cost.

A cold ``tunsup run`` imports about 225 modules from source files (the
standard library's, trio's, attrs', its own).  For each, the import system
walks ``sys.path`` with its path finders (Python code), stats the source,
opens and reads the ``.pyc``, checks its header and unmarshals it: some
40 µs a module beyond the unmarshalling, ~9 ms of a ~130 ms start.

The bundle is one file in the package's ``__pycache__`` holding, for each
module a command imports, the module's code as marshal bytes with its
source file's path, size and modification time (ns), whether it is a
package, and an index of all that; with it ``sys.path`` as it was when it
was written (all but its first entry, the script's directory) and the
modification time of every directory a module was found in, and of every
directory named like a bundled top-level module on that path (one that
gains an ``__init__`` would become the package an import finds).

:func:`install` reads the index (the rest stays on disk until a module is
imported, then one ``pread``) and puts :class:`BundleFinder` first in
:data:`sys.meta_path`, but only when it was written by this interpreter
(its cache tag, bytecode magic, optimisation level, frozen modules on or
off), ``sys.path`` is the same, none of those directories changed (a
module added, removed or shadowed there changes its directory's time) and
the script's directory shadows no bundled top-level module: then a name
resolves to the same file as the usual finders would find.  Otherwise
nothing is installed (:func:`why_not` says why) and imports go as always.
The finder answers, while ``sys.path`` stays as it was, for a bundled
module whose source file still has its size and time, with a spec whose
loader is a :class:`importlib.machinery.SourceFileLoader` in all but where
the code comes from, so ``__file__``, ``__cached__``, tracebacks' source
lines and resources are what they were; for anything else it says nothing
and the usual finders answer.  Code that cannot be read whole or does not
unmarshal is loaded from its ``.pyc`` or source as usual.  ``run`` takes
the finder off (:func:`uninstall`) once its start's imports are done:
what a long-running service imports later goes the usual way.

The build (:func:`build`) keeps a module only when the path finder, asked
on the recorded ``sys.path`` (or its parent package's path), finds the
very file it was imported from: never a module the builder found through
its own first path entry (its working directory), nor one inside a
namespace package.

Trust: the file is read from where the package's own ``.pyc`` files are,
through the code cache's checks (a regular file, owned by root or this
user, writable by nobody else, opened without blocking) and trusted as
they are (only its index has a checksum).  It is written by
``scripts/setup`` (``python -m tunsup._bundle``), atomically, never on the
path of a start-up.
"""

from __future__ import annotations

import marshal
import os
import struct
import sys
import zlib

# The import system's own classes, as importlib.machinery gives them, but
# without importing importlib (and with it warnings, contextlib...): this
# module is imported before the modules the bundle serves.
from _frozen_importlib import ModuleSpec
from _frozen_importlib_external import (
    BYTECODE_SUFFIXES,
    EXTENSION_SUFFIXES,
    MAGIC_NUMBER,
    SOURCE_SUFFIXES,
    PathFinder,
    SourceFileLoader,
)

from ._trusted import open_trusted, remove_other_tags

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import CodeType, ModuleType
    from typing import Any

_MAGIC = b"tunsupB2"
#: magic, CRC-32 of the index, length of the index.
_HEAD = struct.Struct("<8sII")
_FILE = "modules.{tag}.marshal"
#: A larger file is not read (nor written): ~4.6 MB today.
_MAX_BYTES = 64 << 20

#: One bundled module: source path, is a package, source mtime (ns) and
#: size, and where its code lies after the index (offset, length).
Entry = tuple[str, bool, int, int, int, int]


def tag() -> str:
    """This interpreter's: bytecode, and which modules are frozen, differ
    with each of these."""
    magic = MAGIC_NUMBER.hex()
    os_spec = getattr(os, "__spec__", None)
    frozen = "F" if getattr(os_spec, "origin", None) == "frozen" else "S"
    return f"{sys.implementation.cache_tag}-{magic}-O{sys.flags.optimize}{frozen}"


def bundle_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    name = _FILE.format(tag=tag())
    prefix = sys.pycache_prefix
    if prefix:
        return os.path.join(prefix, here.lstrip(os.sep), name)
    return os.path.join(here, "__pycache__", name)


def _dir_times(dirs: list[str]) -> dict[str, int | None]:
    times: dict[str, int | None] = {}
    for d in dirs:
        try:
            times[d] = os.stat(d).st_mtime_ns
        except OSError:
            times[d] = None
    return times


class _Loader(SourceFileLoader):
    """A source file loader whose code comes from the bundle."""

    def __init__(self, fullname: str, path: str, finder: BundleFinder,
                 span: tuple[int, int]) -> None:
        super().__init__(fullname, path)
        self._finder, self._span = finder, span

    def get_code(self, fullname: str) -> CodeType | None:
        code = self._finder.code(fullname, *self._span) if fullname == self.name else None
        if code is None:  # not what was written: load it as usual
            return super().get_code(fullname)
        return code


class BundleFinder:
    """Finds the modules of a bundle whose sources are unchanged."""

    def __init__(self, index: dict[str, Entry], fd: int, base: int) -> None:
        self.index = index
        #: The bundle, open; -1 once closed (then modules load as usual).
        self._fd, self._base = fd, base
        #: ``sys.path`` as it was checked: once it changes (a program adds
        #: a directory), the usual finders decide alone.
        self.search_path = list(sys.path)
        #: Modules whose code came from the bundle.
        self.served = 0

    def find_spec(self, name: str, path: object = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        entry = self.index.get(name)
        if entry is None or self._fd < 0 or sys.path != self.search_path:
            return None
        origin, is_package, mtime_ns, size, start, length = entry
        try:
            st = os.stat(origin)
        except (OSError, ValueError):
            return None
        if st.st_mtime_ns != mtime_ns or st.st_size != size:
            return None
        loader = _Loader(name, origin, self, (start, length))
        spec = ModuleSpec(name, loader, origin=origin, is_package=is_package)
        spec.has_location = True
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(origin)]
        return spec

    def code(self, name: str, start: int, length: int) -> CodeType | None:
        """The code of ``name``, or None when it cannot be read whole or
        is not a code object."""
        if self._fd < 0:
            return None
        try:
            data = os.pread(self._fd, length, self._base + start)
            code = marshal.loads(data) if len(data) == length else None
        except Exception:
            return None
        if type(code).__name__ != "code":
            return None
        self.served += 1
        return code

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def invalidate_caches(self) -> None:
        pass


def _shadowed(top_level: set[str], directory: str) -> bool:
    """Whether ``directory`` (the first entry of ``sys.path``) holds a
    module or a regular package that an import of a bundled top-level name
    would find before the bundled one (as the path finder looks: a package
    directory with an ``__init__``, or a file with a module suffix).  What
    cannot be listed (a zip application) counts as shadowing."""
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    suffixes = (*SOURCE_SUFFIXES, *BYTECODE_SUFFIXES, *EXTENSION_SUFFIXES)
    for name in names:
        stem = name.partition(".")[0]
        if stem not in top_level:
            continue
        if name == stem:
            package = os.path.join(directory or ".", name)
            if any(os.path.exists(os.path.join(package, f"__init__{suffix}"))
                   for suffix in suffixes):
                return True
        elif name.endswith(suffixes):
            return True
    return False


def _valid_index(index: object, search_path: object, dir_times: object,
                 size: int) -> bool:
    """Whether the index has the shape :func:`build` writes, every code
    span inside the file's ``size`` bytes."""
    if not (isinstance(index, dict) and isinstance(search_path, list)
            and isinstance(dir_times, dict)):
        return False
    if not all(isinstance(p, str) for p in search_path):
        return False
    if not all(isinstance(d, str) and (t is None or type(t) is int)
               for d, t in dir_times.items()):
        return False
    for name, entry in index.items():
        if not (isinstance(name, str) and type(entry) is tuple and len(entry) == 6):
            return False
        origin, is_package, mtime_ns, src_size, start, length = entry
        if not (isinstance(origin, str) and "\0" not in origin and type(is_package) is bool
                and all(type(n) is int for n in (mtime_ns, src_size, start, length))
                and start >= 0 and length > 0 and start + length <= size):
            return False
    return True


def _load(path: str) -> tuple[dict[str, Entry], list[str], dict[str, int | None],
                              int, int] | None:
    """(index, sys.path, directory times, an open fd, where the code
    starts) of the bundle at ``path``, or None when it is not one."""
    try:
        fd, size = open_trusted(path, _MAX_BYTES)
    except (OSError, ValueError):
        return None
    try:
        head = os.pread(fd, _HEAD.size, 0)
        magic, crc, length = _HEAD.unpack(head)
        if magic != _MAGIC or _HEAD.size + length > size:
            raise ValueError("not a bundle")
        raw = os.pread(fd, length, _HEAD.size)
        if len(raw) != length or zlib.crc32(raw) & 0xFFFFFFFF != crc:
            raise ValueError("index damaged")
        index, search_path, dir_times = marshal.loads(raw)
        base = _HEAD.size + length
        if not _valid_index(index, search_path, dir_times, size - base):
            raise ValueError("index malformed")
    except Exception:
        os.close(fd)
        return None
    return index, search_path, dir_times, fd, base


_installed: BundleFinder | None = None
_why_not = "not asked for"


def install(path: str | None = None) -> BundleFinder | None:
    """Put the bundle's finder first in :data:`sys.meta_path` when the
    bundle at ``path`` (default: :func:`bundle_path`) was written for this
    interpreter, this ``sys.path`` and these directories; returns it, or
    None when nothing was installed (:func:`why_not` says why).  Once per
    process: a second call returns the first one's finder."""
    global _installed, _why_not
    if _installed is not None:
        return _installed
    where = path or bundle_path()
    loaded = _load(where)
    if loaded is None:
        _why_not = f"no usable bundle at {where}"
        return None
    index, search_path, dir_times, fd, base = loaded
    if sys.path[1:] != search_path:
        _why_not = "another sys.path than the bundle's"
    elif _dir_times(list(dir_times)) != dir_times:
        _why_not = "a directory on the search path changed since the bundle was built"
    elif sys.path and _shadowed({name.partition(".")[0] for name in index}, sys.path[0]):
        _why_not = f"the script's directory {sys.path[0] or '.'} holds a module of that name"
    else:
        finder = _installed = BundleFinder(index, fd, base)
        sys.meta_path.insert(0, finder)
        return finder
    os.close(fd)
    return None


def uninstall() -> BundleFinder | None:
    """Take the finder off :data:`sys.meta_path` and close the bundle
    (later imports, and reloads, go the usual way); returns it."""
    global _installed, _why_not
    finder, _installed = _installed, None
    if finder is not None:
        # A new list: an import going through the old one is not disturbed.
        sys.meta_path = [f for f in sys.meta_path if f is not finder]
        finder.close()
        _why_not = "taken off once the start's imports were done"
    return finder


def why_not() -> str:
    """Why :func:`install` installed nothing (or the finder is gone)."""
    return _why_not


def _search_path_finds(name: str, origin: str) -> bool:
    """Whether the path finder, asked on ``sys.path[1:]`` (a top-level
    name) or the parent package's path, finds ``name`` at ``origin``."""
    parent, _, _ = name.rpartition(".")
    if parent:
        package = sys.modules.get(parent)
        parent_spec = getattr(package, "__spec__", None)
        if parent_spec is None or parent_spec.origin in (None, "frozen"):
            return False  # a namespace or frozen parent: not bundled
        search = list(getattr(package, "__path__", []))
    else:
        search = sys.path[1:]
    try:
        spec = PathFinder.find_spec(name, search)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin == origin


def build(modules: Callable[[], None], path: str | None = None) -> int:
    """Run ``modules`` (which imports what the commands use) and write the
    bundle of every module imported from a source file that the recorded
    search path finds there; returns how many.  Atomic: a temporary file
    renamed over the bundle.  ValueError when ``tunsup`` itself came from
    elsewhere than the search path gives (run from a source tree beside
    an installed copy)."""
    import contextlib

    target = path or bundle_path()
    # First: creating the directory changes its parent's time.
    os.makedirs(os.path.dirname(target), exist_ok=True)
    modules()
    here = sys.modules[__package__ or "tunsup"].__spec__
    if here is None or not _search_path_finds(here.name, here.origin or ""):
        raise ValueError(f"tunsup was imported from {here and here.origin}, not from where "
                         "sys.path finds it: run this outside the source tree")
    index: dict[str, Entry] = {}
    chunks: list[bytes] = []
    offset = 0
    dirs = set(sys.path[1:])
    for name, module in sorted(sys.modules.items()):
        spec: Any = getattr(module, "__spec__", None)
        loader = getattr(spec, "loader", None)
        if (spec is None or type(loader) is not SourceFileLoader
                or not (spec.origin or "").endswith(".py")
                or type(module).__name__ == "_Deferred"
                or not _search_path_finds(name, spec.origin)):
            continue
        try:
            before = os.stat(spec.origin)
            code = marshal.dumps(loader.get_code(name))
            st = os.stat(spec.origin)
        except (OSError, ImportError, ValueError):
            continue
        if (before.st_mtime_ns, before.st_size) != (st.st_mtime_ns, st.st_size):
            continue  # changed while compiled: which text the code is of is unknown
        is_package = spec.submodule_search_locations is not None
        index[name] = (spec.origin, is_package, st.st_mtime_ns, st.st_size, offset, len(code))
        chunks.append(code)
        offset += len(code)
        dirs.add(os.path.dirname(spec.origin))
    # A directory named like a bundled top-level module, anywhere on the
    # path: one that gains an __init__ becomes what an import finds.
    for entry in sys.path[1:]:
        for top in {name.partition(".")[0] for name in index}:
            candidate = os.path.join(entry, top)
            if os.path.isdir(candidate):
                dirs.add(candidate)
    head = marshal.dumps((index, sys.path[1:], _dir_times(sorted(dirs))))
    data = b"".join([_HEAD.pack(_MAGIC, zlib.crc32(head) & 0xFFFFFFFF, len(head)), head,
                     *chunks])
    if len(data) > _MAX_BYTES:
        raise ValueError(f"bundle of {len(data)} bytes is over {_MAX_BYTES}")
    tmp = f"{target}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a build of a process with this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    remove_other_tags(target, _FILE)
    return len(index)


def _import_run_modules() -> None:
    """What ``tunsup run`` imports (and every other module of the
    package a command may use), with trio imported as ``run`` does."""
    from . import _codecache, _lazy
    from ._findlib import pthread_from_libc

    _lazy.defer()
    with pthread_from_libc():
        import trio  # noqa: F401
    _codecache._import_command_modules()


if __name__ == "__main__":
    try:
        count = build(_import_run_modules)
    except (OSError, ValueError) as exc:
        print(f"tunsup._bundle: not built: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"tunsup._bundle: {count} modules bundled in {bundle_path()}", file=sys.stderr)
