"""Prefixes at scale (10,000 AllowedIPs): route selection and LAN
reconciliation compare them as integer spans, and they are written out as
text by a faster path; both give exactly what ipaddress gives (``subnet_of``,
``==``, ``str``) for both families and every prefix length."""

from __future__ import annotations

import ipaddress
import logging

from hypothesis import given
from hypothesis import strategies as st

from tunsup.config.spec import IPNetwork, network_text
from tunsup.engine.effects import select_routes, span
from tunsup.engine.routing import _reconcile_lan


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    # Few distinct addresses, so that nesting and equality happen often.
    if draw(st.booleans()):
        base = draw(st.sampled_from([0, 0x0A000000, 0x0A000100, 0xC0A80000, 0xFFFFFFFF]))
        return ipaddress.IPv4Network((base, draw(st.integers(0, 32))), strict=False)
    base6 = draw(st.sampled_from([0, 0x20010DB8 << 96, (0x20010DB8 << 96) | 1, (1 << 128) - 1]))
    return ipaddress.IPv6Network((base6, draw(st.integers(0, 128))), strict=False)


@given(networks())
def test_network_text_is_str(net: IPNetwork) -> None:
    assert network_text(net) == str(net)


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_network_text_of_any_ipv4_prefix(address: int, length: int) -> None:
    net = ipaddress.IPv4Network((address, length), strict=False)
    assert network_text(net) == str(net)


def _subnet_of(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]


@given(networks())
def test_span_bounds_the_network(net: IPNetwork) -> None:
    version, first, last = span(net)
    assert (version, first, last) == (net.version, int(net.network_address),
                                      int(net.broadcast_address))


@given(st.lists(networks(), max_size=12), st.lists(networks(), max_size=4))
def test_select_routes_decides_as_subnet_of(prefixes: list[IPNetwork],
                                            existing: list[IPNetwork]) -> None:
    expected = tuple(n for n in dict.fromkeys(prefixes)
                     if not any(_subnet_of(n, c) for c in existing))
    assert select_routes(prefixes, existing) == expected


@given(st.lists(networks(), max_size=12), st.lists(networks(), max_size=4),
       st.sampled_from(["direct", "tunnel"]))
def test_lan_reconciliation_decides_as_subnet_of(prefixes: list[IPNetwork],
                                                 lans: list[IPNetwork], lan: str) -> None:
    connected = [(n, f"eth{i}") for i, n in enumerate(lans)]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("tunsup.test-spans")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = Keep()
    log.addHandler(handler)
    try:
        kept = _reconcile_lan(tuple(prefixes), connected, log, lan)
    finally:
        log.removeHandler(handler)
    expected = tuple(p for p in prefixes
                     if lan != "direct" or not any(_subnet_of(p, n) for n in lans))
    assert kept == expected
    # One line per LAN more specific than a prefix (equal is not more specific).
    covers = sum(1 for p in prefixes for n in lans if _subnet_of(n, p) and n != p)
    assert sum("stays directly reachable" in r.getMessage() for r in records) == covers


_PIECES = st.sampled_from(["0", "1", "9", "10", "01", "00", "99", "100", "199", "200", "249",
                           "250", "255", "256", "300", "", " ", "x", "\u0661"])


@given(st.lists(_PIECES, min_size=1, max_size=5),
       st.sampled_from(["", "/0", "/8", "/08", "/24", "/32", "/33", "/", "/-1", "/255.0.0.0",
                        "/1a", " /8", "/\u0661"]))
def test_allowed_ips_read_as_ipaddress_reads_them(octets: list[str], suffix: str) -> None:
    """The fast IPv4 reading of an AllowedIPs item gives ipaddress's network,
    and whatever ipaddress refuses is refused."""
    from tunsup.config.wgquick import ip_network

    item = ".".join(octets) + suffix
    try:
        expected: IPNetwork | type[ValueError] = ipaddress.ip_network(item, strict=False)
    except ValueError:
        expected = ValueError
    try:
        got: IPNetwork | type[ValueError] = ip_network(item)
    except ValueError:
        got = ValueError
    assert got == expected
    if not isinstance(got, type):
        assert type(got) is type(expected)
