"""The bytecode of the modules ``tunsup run`` imports, in one file: a
cold-start cost.

A cold ``tunsup run`` imports about 215 modules from source files (the
standard library's, trio's, attrs', its own).  For each, the import system
walks ``sys.path`` with its path finders (Python code), stats the source,
opens and reads the ``.pyc``, checks its header and unmarshals it: some
40 µs a module beyond the unmarshalling, ~9 ms of a ~130 ms start (40
alternating cold starts to READY, 2026-12-03: medians 137 → 128 ms).

The bundle is one file in the package's ``__pycache__`` holding, for each
module a command imports, the module's code as marshal bytes with its
source file's path, size and modification time (ns), whether it is a
package, and an index of all that; with it ``sys.path`` as it was when it
was written (all but its first entry, the script's directory) and the
modification time of every directory a module was found in.

:func:`install` reads the file (one ``read``; only the index is
unmarshalled) and puts :class:`BundleFinder` first in
:data:`sys.meta_path`, but only when it was written by this interpreter
(its cache tag, bytecode magic and optimisation level), ``sys.path`` is the
same, none of those directories changed (a module added, removed or
shadowed there changes its directory's time) and the script's directory
shadows no bundled top-level module: then a name resolves to the same file
as the usual finders would find.  Otherwise nothing is installed and
imports go as always.  The finder answers, while ``sys.path`` stays as
it was, for a bundled module whose source file still has its size and
time, with a spec whose loader is a
:class:`importlib.machinery.SourceFileLoader` in all but where the code
comes from, so ``__file__``, ``__cached__``, tracebacks' source lines and
resources are what they were; for anything else it says nothing and the
usual finders answer.  Each module's code is unmarshalled when it is
imported (unmarshalling all 4.3 MB up front costs what the lookups save:
an earlier try, 2026-12-02); code that fails to unmarshal is loaded from
its ``.pyc`` or source as usual.

Trust: the file is read from where the package's own ``.pyc`` files are,
through the code cache's checks (a regular file, owned by root or this
user, writable by nobody else, opened without blocking) and trusted as
they are.  It is written by ``scripts/setup`` (``python -m
tunsup._bundle``), atomically, never on the path of a start-up.
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
    SourceFileLoader,
)

from ._trusted import map_trusted

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import CodeType, ModuleType
    from typing import Any

_MAGIC = b"tunsupB1"
#: magic, CRC-32 of the index, length of the index.
_HEAD = struct.Struct("<8sII")
_FILE = "modules.{tag}.marshal"
#: A larger file is not read (nor written): ~4.5 MB today.
_MAX_BYTES = 64 << 20

#: One bundled module: source path, is a package, source mtime (ns) and
#: size, and where its code lies after the index (offset, length).
Entry = tuple[str, bool, int, int, int, int]


def tag() -> str:
    """This interpreter's: bytecode differs with each of these."""
    magic = MAGIC_NUMBER.hex()
    return f"{sys.implementation.cache_tag}-{magic}-O{sys.flags.optimize}"


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
        start, length = self._span
        try:
            code = marshal.loads(self._finder.view[start:start + length])
        except Exception:  # not what was written: load it as usual
            return super().get_code(fullname)
        if fullname != self.name or type(code).__name__ != "code":
            return super().get_code(fullname)
        self._finder.served += 1
        return code  # type: ignore[no-any-return]


class BundleFinder:
    """Finds the modules of a bundle whose sources are unchanged."""

    def __init__(self, index: dict[str, Entry], view: memoryview) -> None:
        self.index, self.view = index, view
        #: ``sys.path`` as it was checked: once it changes (a program adds
        #: a directory), the usual finders decide alone.
        self.search_path = list(sys.path)
        #: Modules whose code came from the bundle.
        self.served = 0

    def find_spec(self, name: str, path: object = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        entry = self.index.get(name)
        if entry is None or sys.path != self.search_path:
            return None
        origin, is_package, mtime_ns, size, start, length = entry
        try:
            st = os.stat(origin)
        except OSError:
            return None
        if st.st_mtime_ns != mtime_ns or st.st_size != size:
            return None
        loader = _Loader(name, origin, self, (start, length))
        spec = ModuleSpec(name, loader, origin=origin, is_package=is_package)
        spec.has_location = True
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(origin)]
        return spec

    def invalidate_caches(self) -> None:
        pass


def _shadowed(top_level: set[str], directory: str) -> bool:
    """Whether ``directory`` (the first entry of ``sys.path``) holds a
    module or a regular package that an import of a bundled top-level name
    would find before the bundled one (as the path finder looks: a package
    directory with an ``__init__``, or a file with a module suffix)."""
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return False
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


def _load(path: str) -> tuple[dict[str, Entry], list[str], dict[str, int | None],
                              memoryview] | None:
    try:
        data = memoryview(map_trusted(path, _MAX_BYTES))
        magic, crc, length = _HEAD.unpack_from(data)
        if magic != _MAGIC or _HEAD.size + length > len(data):
            return None
        head = data[_HEAD.size:_HEAD.size + length]
        if zlib.crc32(head) & 0xFFFFFFFF != crc:
            return None
        index, search_path, dir_times = marshal.loads(head)
    except (OSError, ValueError, EOFError, TypeError, struct.error):
        return None
    if not (isinstance(index, dict) and isinstance(search_path, list)
            and isinstance(dir_times, dict)):
        return None
    view = data[_HEAD.size + length:]
    return index, search_path, dir_times, view


def install(path: str | None = None) -> BundleFinder | None:
    """Put the bundle's finder first in :data:`sys.meta_path` when the
    bundle at ``path`` (default: :func:`bundle_path`) was written for this
    interpreter, this ``sys.path`` and these directories; returns it, or
    None when nothing was installed."""
    loaded = _load(path or bundle_path())
    if loaded is None:
        return None
    index, search_path, dir_times, view = loaded
    if sys.path[1:] != search_path or _dir_times(list(dir_times)) != dir_times:
        return None
    if sys.path and _shadowed({name.partition(".")[0] for name in index}, sys.path[0]):
        return None
    global _installed
    finder = _installed = BundleFinder(index, view)
    sys.meta_path.insert(0, finder)
    return finder


_installed: BundleFinder | None = None


def installed() -> BundleFinder | None:
    """The finder :func:`install` put in place, if it did."""
    return _installed


def build(modules: Callable[[], None], path: str | None = None) -> int:
    """Run ``modules`` (which imports what the commands use) and write the
    bundle of every module imported from a source file; returns how many.
    Atomic: a temporary file renamed over the bundle."""
    modules()
    index: dict[str, Entry] = {}
    chunks: list[bytes] = []
    offset = 0
    dirs = {entry for entry in sys.path[1:]}
    for name, module in sorted(sys.modules.items()):
        spec: Any = getattr(module, "__spec__", None)
        loader = getattr(spec, "loader", None)
        if (spec is None or type(loader) is not SourceFileLoader
                or not (spec.origin or "").endswith(".py")
                or type(module).__name__ == "_Deferred"):
            continue
        try:
            code = marshal.dumps(loader.get_code(name))
            st = os.stat(spec.origin)
        except (OSError, ImportError, ValueError):
            continue
        is_package = spec.submodule_search_locations is not None
        index[name] = (spec.origin, is_package, st.st_mtime_ns, st.st_size, offset, len(code))
        chunks.append(code)
        offset += len(code)
        dirs.add(os.path.dirname(spec.origin))
    head = marshal.dumps((index, sys.path[1:], _dir_times(sorted(dirs))))
    data = b"".join([_HEAD.pack(_MAGIC, zlib.crc32(head) & 0xFFFFFFFF, len(head)), head,
                     *chunks])
    if len(data) > _MAX_BYTES:
        raise ValueError(f"bundle of {len(data)} bytes is over {_MAX_BYTES}")
    import contextlib

    target = path or bundle_path()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
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
    count = build(_import_run_modules)
    print(f"tunsup._bundle: {count} modules bundled in {bundle_path()}", file=sys.stderr)
