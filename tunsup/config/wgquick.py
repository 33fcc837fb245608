"""Parse wg-quick ``.conf`` files into a :class:`~tunsup.config.spec.TunnelSpec`.

The accepted format is the INI dialect of ``wg-quick(8)`` and ``wg(8)``: one
``[Interface]`` section and any number of ``[Peer]`` sections; section names
and keys are case-insensitive; ``#`` starts a comment anywhere on a line.

Every problem is reported, in file order, as a
:class:`~tunsup._errors.ConfigError` (several as a
:class:`~tunsup._errors.ConfigErrors`) that names the file and the 1-based
line.  Checks that need a whole section (MTU against IPv6 addresses, a
``[Peer]`` without ``PublicKey``) run as soon as the section ends.

Key material never reaches a message: bad keys are reported without their
value, and any echoed value that looks like a key is hidden.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

import attrs

from .._errors import ConfigError, config_errors
from .._input import read_config_text
from .ifname import IFNAME_RULE, is_valid_ifname
from .keys import InvalidKey, Key
from .spec import (
    RT_TABLE_MAIN,
    Endpoint,
    IPAddress,
    IPInterface,
    IPNetwork,
    PeerSpec,
    RouteTable,
    TunnelSpec,
)

__all__ = ["load_conf", "parse_conf"]

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
#: Unknown key and section names are echoed only when they look like names.
_SHOWABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9 _-]{0,31}")
#: Long runs of base64 (or hex) characters might be a key; never echo them.
_KEYLIKE = re.compile(r"[A-Za-z0-9+/=]{40,}")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,16}")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: The usual AllowedIPs item (``a.b.c.d/len``, no leading zeros), read
#: without ipaddress's string parser; anything else goes to ipaddress.
_IPV4_PREFIX = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(3[0-2]|[12]?[0-9]))?")

_U32_MAX = 2**32 - 1
_RT_TABLE_LOCAL = 255


class _Invalid(Exception):
    """A problem with the line being parsed; the parser adds file and line."""


# --- small value parsers ------------------------------------------------------


#: Longest value quoted whole in a message (a domain name has at most 253).
SHOWN_CHARS = 256


def _show(value: str) -> str:
    """Quote a user-supplied value for a message, unless it could be a key;
    a long one by its start (a 4 MiB line must not make a 16 MB message)."""
    if _KEYLIKE.search(value):
        return "<value hidden: it looks like key material>"
    if len(value) > SHOWN_CHARS:
        return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"
    return repr(value)


def _items(name: str, value: str) -> list[str]:
    """Split a comma list; empty entries are an error."""
    items = [item.strip() for item in value.split(",")]
    if "" in items:
        raise _Invalid(f"{name} has an empty entry (a stray comma?)")
    return items


def _number(name: str, value: str, lo: int, hi: int) -> int:
    if _DECIMAL.fullmatch(value) and lo <= (n := int(value)) <= hi:
        return n
    raise _Invalid(f"{name} must be a number from {lo} to {hi}, not {_show(value)}")


def _key(name: str, value: str) -> Key:
    try:
        return Key.from_base64(value)
    except InvalidKey as e:
        raise _Invalid(f"{name} is not a valid WireGuard key: {e}") from None


def _is_dns_name(name: str) -> bool:
    """Letters, digits and hyphens in dot-separated labels; a trailing dot is fine."""
    bare = name.removesuffix(".")
    labels = bare.split(".")
    return (
        0 < len(bare) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        # An all-numeric last label is a mistyped IPv4 address, not a name.
        and not labels[-1].isdigit()
    )


# --- sections -----------------------------------------------------------------


@attrs.define
class _Section:
    #: Line of the section header.
    line: int
    #: Canonical key name -> line of its first occurrence.
    seen: dict[str, int] = attrs.Factory(dict)


@attrs.define
class _Interface(_Section):
    private_key: Key | None = None
    # dicts as ordered sets: item -> line it was given on
    addresses: dict[IPInterface, int] = attrs.Factory(dict)
    listen_port: int | None = None
    mtu: int | None = None
    dns_servers: dict[IPAddress, int] = attrs.Factory(dict)
    dns_search: dict[str, int] = attrs.Factory(dict)
    table: RouteTable = "auto"
    fwmark: int | None = None
    hooks: dict[str, list[str]] = attrs.Factory(
        lambda: {"PreUp": [], "PostUp": [], "PreDown": [], "PostDown": []}
    )


@attrs.define
class _Peer(_Section):
    public_key: Key | None = None
    preshared_key: Key | None = None
    #: Its AllowedIPs networks and the line of each, in file order, no
    #: duplicates (:attr:`_Parser.routes` finds those).
    allowed_ips: list[IPNetwork] = attrs.Factory(list)
    allowed_lines: list[int] = attrs.Factory(list)
    endpoint: Endpoint | None = None
    endpoint_line: int = 0
    keepalive: int | None = None

    def spec(self) -> PeerSpec:
        assert self.public_key is not None
        return PeerSpec(
            public_key=self.public_key,
            preshared_key=self.preshared_key,
            allowed_ips=tuple(self.allowed_ips),
            endpoint=self.endpoint,
            persistent_keepalive=self.keepalive,
            line=self.line,
            endpoint_line=self.endpoint_line,
            allowed_lines=tuple(self.allowed_lines),
        )


S = TypeVar("S", bound=_Section)


@attrs.frozen
class _Field(Generic[S]):
    """How one key of a section is handled."""

    handle: Callable[[_Parser, S, str, int], None]
    repeatable: bool = False


# --- [Interface] handlers -----------------------------------------------------


def _private_key(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    sec.private_key = _key("PrivateKey", value)


def _address(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    for item in _items("Address", value):
        try:
            if "%" in item:
                raise ValueError("scoped addresses are not supported")
            iface = ipaddress.ip_interface(item)
        except ValueError:
            raise _Invalid(
                f"Address {_show(item)} is not an IP address with an optional /prefix"
            ) from None
        sec.addresses.setdefault(iface, line)


def _listen_port(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    sec.listen_port = _number("ListenPort", value, 0, 65535)


def _mtu(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    sec.mtu = _number("MTU", value, 576, 65535)


def _dns(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    for item in _items("DNS", value):
        try:
            sec.dns_servers.setdefault(ipaddress.ip_address(item), line)
        except ValueError:
            domain = item.removeprefix("~")  # "~example.com", "~.": routing domains
            if not ((item == "~." and domain == ".") or _is_dns_name(domain)):
                raise _Invalid(
                    f"DNS {_show(item)} is neither an IP address nor a valid domain name"
                ) from None
            sec.dns_search.setdefault(item, line)


def _table(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    word = value.lower()
    if word == "off":
        sec.table = "off"
    elif word == "auto":
        sec.table = "auto"
    elif word == "main":
        sec.table = RT_TABLE_MAIN
    elif _DECIMAL.fullmatch(value) and 0 < int(value) <= _U32_MAX:
        if int(value) == _RT_TABLE_LOCAL:
            raise _Invalid("Table 255 is the kernel's local table; choose another number")
        sec.table = int(value)
    else:
        raise _Invalid(
            f"Table must be off, auto, main or a number from 1 to {_U32_MAX}, not {_show(value)}"
        )


def _fwmark(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    if value.lower() == "off":
        mark = 0
    elif _HEX.fullmatch(value):
        mark = int(value, 16)
    elif _DECIMAL.fullmatch(value):
        mark = int(value)
    else:
        mark = -1
    if not 0 <= mark <= _U32_MAX:
        raise _Invalid(
            f"FwMark must be off or a number from 0 to {_U32_MAX} (decimal or 0x hex), "
            f"not {_show(value)}"
        )
    sec.fwmark = mark or None


def _hook(name: str) -> _Field[_Interface]:
    def handle(p: _Parser, sec: _Interface, value: str, line: int) -> None:
        sec.hooks[name].append(value)  # verbatim; the engine expands %i

    return _Field(handle, repeatable=True)


def _save_config(p: _Parser, sec: _Interface, value: str, line: int) -> None:
    word = value.lower()
    if word == "true":
        raise _Invalid(
            "SaveConfig = true is not supported: tunsup never rewrites your configuration file"
        )
    if word != "false":
        raise _Invalid(f"SaveConfig must be true or false, not {_show(value)}")


# --- [Peer] handlers ----------------------------------------------------------


def _public_key(p: _Parser, sec: _Peer, value: str, line: int) -> None:
    key = _key("PublicKey", value)
    for other in p.peers:
        if other is not sec and other.public_key == key:
            raise _Invalid(
                f"PublicKey is the same as the one at line {other.seen['PublicKey']}; "
                "each [Peer] needs its own key"
            )
    sec.public_key = key


def _preshared_key(p: _Parser, sec: _Peer, value: str, line: int) -> None:
    sec.preshared_key = _key("PresharedKey", value)


def _allowed_ips(p: _Parser, sec: _Peer, value: str, line: int) -> None:
    for item in _items("AllowedIPs", value):
        try:
            if "%" in item:
                raise ValueError("scoped addresses are not supported")
            net = ip_network(item)
        except ValueError:
            raise _Invalid(
                f"AllowedIPs {_show(item)} is not an IP network (address/prefix)"
            ) from None
        # One lookup per network (hashing an ipaddress network is slow:
        # 10,000 AllowedIPs); a network given again for the same peer is
        # kept once, at its first line, as before.
        known = len(p.routes)
        owner, first = p.routes.setdefault(net, (sec, line))
        if len(p.routes) > known:
            sec.allowed_ips.append(net)
            sec.allowed_lines.append(line)
        elif owner is not sec:
            raise _Invalid(
                f"AllowedIPs {net} is already given at line {first} "
                f"for the [Peer] at line {owner.line}; a network can route to one peer only"
            )


def ip_network(item: str) -> IPNetwork:
    """``ipaddress.ip_network(item, strict=False)`` (wg masks host bits
    too), a third faster for a plain IPv4 prefix (10,000 AllowedIPs)."""
    m = _IPV4_PREFIX.fullmatch(item)
    if m is None:
        return ipaddress.ip_network(item, strict=False)
    a, b, c, d, length = m.groups()
    address = (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)
    return ipaddress.IPv4Network((address, int(length) if length else 32), strict=False)


def _endpoint(p: _Parser, sec: _Peer, value: str, line: int) -> None:
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        try:
            if not sep:
                raise ValueError
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _Invalid(
                f"Endpoint {_show(value)} must be host:port or [IPv6 address]:port"
            ) from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise _Invalid(f"Endpoint {_show(value)} has no port; write host:port")
        if ":" in host:
            raise _Invalid(
                f"Endpoint {_show(value)}: write an IPv6 address in brackets, "
                "as in [2001:db8::1]:51820"
            )
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if not _is_dns_name(host):
                raise _Invalid(
                    f"Endpoint host {_show(host)} is neither an IP address nor a valid host name"
                ) from None
    sec.endpoint = Endpoint(host, _number("Endpoint port", port, 1, 65535))
    sec.endpoint_line = line


def _keepalive(p: _Parser, sec: _Peer, value: str, line: int) -> None:
    if value.lower() == "off":
        sec.keepalive = None
    else:
        sec.keepalive = _number("PersistentKeepalive", value, 0, 65535) or None


_INTERFACE_FIELDS: dict[str, _Field[_Interface]] = {
    "PrivateKey": _Field(_private_key),
    "Address": _Field(_address, repeatable=True),
    "ListenPort": _Field(_listen_port),
    "MTU": _Field(_mtu),
    "DNS": _Field(_dns, repeatable=True),
    "Table": _Field(_table),
    "FwMark": _Field(_fwmark),
    "PreUp": _hook("PreUp"),
    "PostUp": _hook("PostUp"),
    "PreDown": _hook("PreDown"),
    "PostDown": _hook("PostDown"),
    "SaveConfig": _Field(_save_config),
}

_PEER_FIELDS: dict[str, _Field[_Peer]] = {
    "PublicKey": _Field(_public_key),
    "PresharedKey": _Field(_preshared_key),
    "AllowedIPs": _Field(_allowed_ips, repeatable=True),
    "Endpoint": _Field(_endpoint),
    "PersistentKeepalive": _Field(_keepalive),
}
#: Each section's keys by their lower-case spelling (keys are matched
#: case-insensitively): built once, not for each of 10,000 lines.
_INTERFACE_KEYS = {k.lower(): k for k in _INTERFACE_FIELDS}
_PEER_KEYS = {k.lower(): k for k in _PEER_FIELDS}


# --- the parser ---------------------------------------------------------------


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.interface: _Interface | None = None
        self.interface_done = False
        self.peers: list[_Peer] = []
        self.section: _Interface | _Peer | None = None
        #: Every AllowedIPs network -> the peer it routes to.
        #: (and the line it was first given on).
        self.routes: dict[IPNetwork, tuple[_Peer, int]] = {}
        #: Inside a section whose header was refused: its keys are skipped.
        self.skipping = False
        self.errors: list[ConfigError] = []

    def parse(self, text: str) -> TunnelSpec:
        # As wg-quick (and TunnelEntry.name): the file name without ".conf";
        # Path.stem would name "/x/.conf" ".conf".
        name = os.path.basename(self.path).removesuffix(".conf")
        if not is_valid_ifname(name):
            self.errors.append(ConfigError(
                self.path,
                None,
                f"interface name {name!r} (the file name without .conf) must be {IFNAME_RULE}",
            ))
        for lineno, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
            line = raw.partition("#")[0].strip()
            if not line:
                continue
            try:
                if line.startswith("["):
                    self._header(line, lineno)
                elif not self.skipping:
                    self._entry(line, lineno)
            except _Invalid as e:
                self.errors.append(ConfigError(self.path, lineno, str(e)))
        self._close()
        # Checks at a section's end are found after its later lines: file order.
        errors = sorted(self.errors, key=lambda e: e.line or 0)
        if self.interface is None:
            errors.append(ConfigError(self.path, None, "no [Interface] section"))
        error = config_errors(errors)
        if error is not None:
            raise error
        assert self.interface is not None
        return self._spec(name, self.interface)

    def _header(self, text: str, line: int) -> None:
        self._close()
        # Until this header is accepted, the keys below it belong nowhere and
        # are not reported one by one.
        self.skipping = True
        if not text.endswith("]"):
            raise _Invalid("malformed section header; expected [Interface] or [Peer]")
        title = text[1:-1].strip()
        if title.lower() == "interface":
            if self.interface is not None:
                raise _Invalid(
                    f"second [Interface] section (the first is at line {self.interface.line}); "
                    "a file has exactly one"
                )
            self.interface = self.section = _Interface(line)
            self.skipping = False
        elif title.lower() == "peer":
            self.section = _Peer(line)
            self.peers.append(self.section)
            self.skipping = False
        else:
            shown = f" [{title}]" if _SHOWABLE_NAME.fullmatch(title) else ""
            raise _Invalid(f"unknown section{shown}; expected [Interface] or [Peer]")

    def _entry(self, text: str, line: int) -> None:
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise _Invalid("expected 'Key = value' or a [Section] header")
        if self.section is None:
            self.skipping = True  # one report for the keys up to the next header
            raise _Invalid("key outside any section; start with [Interface] or [Peer]")
        if isinstance(self.section, _Interface):
            self._apply(_INTERFACE_FIELDS, _INTERFACE_KEYS, _PEER_FIELDS, self.section,
                        key, value, line)
        else:
            self._apply(_PEER_FIELDS, _PEER_KEYS, _INTERFACE_FIELDS, self.section,
                        key, value, line)

    def _apply(
        self,
        fields: Mapping[str, _Field[S]],
        by_lower: Mapping[str, str],
        other_fields: Mapping[str, object],
        sec: S,
        key: str,
        value: str,
        line: int,
    ) -> None:
        title = "[Interface]" if isinstance(sec, _Interface) else "[Peer]"
        name = by_lower.get(key.lower())
        if name is None:
            raise _Invalid(_unknown_key(key, title, by_lower, other_fields))
        if not value:
            raise _Invalid(f"{name} needs a value")
        field = fields[name]
        if not field.repeatable and name in sec.seen:
            raise _Invalid(f"{name} is given twice (first at line {sec.seen[name]})")
        sec.seen.setdefault(name, line)
        field.handle(self, sec, value, line)

    def _close(self) -> None:
        """Run the checks that need the whole of the section that just ended."""
        sec, self.section = self.section, None
        # A PublicKey line that was refused has been reported already.
        if isinstance(sec, _Peer) and "PublicKey" not in sec.seen:
            self.errors.append(ConfigError(self.path, sec.line, "[Peer] has no PublicKey"))
        if isinstance(sec, _Interface):
            self.interface_done = True
            v6 = [ln for a, ln in sec.addresses.items() if a.version == 6]
            if sec.mtu is not None and sec.mtu < 1280 and v6:
                self.errors.append(ConfigError(
                    self.path,
                    sec.seen["MTU"],
                    f"MTU {sec.mtu} is below 1280, the minimum for IPv6 "
                    f"(the Address at line {v6[0]} is IPv6)",
                ))

    def _spec(self, name: str, i: _Interface) -> TunnelSpec:
        return TunnelSpec(
            name=name,
            source=self.path,
            private_key=i.private_key,
            addresses=tuple(i.addresses),
            listen_port=i.listen_port,
            mtu=i.mtu,
            dns_servers=tuple(i.dns_servers),
            dns_search=tuple(i.dns_search),
            table=i.table,
            fwmark=i.fwmark,
            pre_up=tuple(i.hooks["PreUp"]),
            post_up=tuple(i.hooks["PostUp"]),
            pre_down=tuple(i.hooks["PreDown"]),
            post_down=tuple(i.hooks["PostDown"]),
            peers=tuple(peer.spec() for peer in self.peers if peer.public_key is not None),
            lines=(("[Interface]", i.line),
                   *((k, i.seen[k]) for k in ("ListenPort", "Table", "FwMark") if k in i.seen)),
        )


def _unknown_key(
    key: str, title: str, by_lower: Mapping[str, str], other_fields: Mapping[str, object]
) -> str:
    if not _SHOWABLE_NAME.fullmatch(key):
        return f"unknown key in {title}"
    message = f"unknown key {key!r} in {title}"
    other = {k.lower(): k for k in other_fields}.get(key.lower())
    if other is not None:
        elsewhere = "[Peer]" if title == "[Interface]" else "[Interface]"
        return f"{message}; {other} belongs in {elsewhere}"
    import difflib  # only for a bad file: off the start path

    close = difflib.get_close_matches(key.lower(), by_lower, n=1)
    return f"{message}; did you mean {by_lower[close[0]]!r}?" if close else message


# --- public API ---------------------------------------------------------------


def parse_conf(text: str, path: str) -> TunnelSpec:
    """Parse the contents of a wg-quick file.

    *path* names the file in messages and gives the interface name (its stem,
    as in wg-quick).  Raises :class:`ConfigError` (a :class:`ConfigErrors`
    when there are several problems: all of them, in file order).
    """
    return _Parser(path).parse(text)


def load_conf(path: str | os.PathLike[str]) -> TunnelSpec:
    """Read a wg-quick file (UTF-8, a regular file of at most
    ``MAX_CONFIG_BYTES``) and parse it; see :func:`parse_conf`."""
    name = os.fspath(path)
    return parse_conf(read_config_text(name), name)
