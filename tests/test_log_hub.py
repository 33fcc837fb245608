"""The log ring buffer, its subscribers, tunnel tags and JSON lines."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading

import pytest

from tunsup import _log
from tunsup._log import LogHub, entry_from_record, tag_tunnel


def _entry(msg: str) -> dict[str, object]:
    return {"seq": 0, "ts": 1.0, "level": "INFO", "logger": "x", "tunnel": None, "msg": msg}


def test_ring_is_bounded_and_numbered() -> None:
    hub = LogHub(capacity=3)
    for i in range(5):
        hub.publish(_entry(str(i)))
    assert [e["msg"] for e in hub.recent(10)] == ["2", "3", "4"]
    assert [e["seq"] for e in hub.recent(2)] == [4, 5]
    assert hub.recent(0) == []


def test_subscribe_gives_backlog_and_every_later_entry_once() -> None:
    hub = LogHub(capacity=100)
    for i in range(3):
        hub.publish(_entry(f"old {i}"))
    got: list[str] = []
    past, unsubscribe = hub.subscribe(lambda e: got.append(str(e["msg"])), backlog=2)
    assert [e["msg"] for e in past] == ["old 1", "old 2"]
    threads = [threading.Thread(target=lambda n=n: [hub.publish(_entry(f"{n}-{i}"))
                                                   for i in range(200)]) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"{n}-{i}" for n in range(4) for i in range(200))
    unsubscribe()
    hub.publish(_entry("after"))
    assert "after" not in got
    assert hub.subscribers == 0


def test_a_broken_subscriber_does_not_break_logging() -> None:
    hub = LogHub()

    def broken(entry: object) -> None:
        raise RuntimeError("boom")

    hub.subscribe(broken)
    got: list[object] = []
    hub.subscribe(got.append)
    hub.publish(_entry("still here"))
    assert len(got) == 1


def test_records_reach_the_hub_tagged_by_tunnel_and_stderr_as_json(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    hub = LogHub()
    _log.setup_logging(json_lines=True, hub=hub)
    try:
        _log_some()
    finally:
        _log.stop_logging()  # flushes the writer thread
    entries = hub.recent(10)
    assert [(e["logger"], e["tunnel"], e["level"]) for e in entries] == [
        ("tsthub0", "tsthub0", "INFO"), ("tunsup", None, "WARNING"), ("tunsup", None, "ERROR")]
    assert entries[0]["msg"] == "[wireguard-go out] hello"
    assert "ValueError: bad" in str(entries[2]["msg"])
    lines = stderr.getvalue().splitlines()
    objects = [json.loads(line) for line in lines]  # one object per line, traceback included
    assert [o["msg"] for o in objects[:2]] == ["[wireguard-go out] hello", "plain"]
    assert objects[0]["tunnel"] == "tsthub0"
    assert "ValueError: bad" in objects[2]["msg"]
    assert len(objects) == 3


def _log_some() -> None:
    tunnel_log = logging.getLogger("tunsup.tsthub0")
    tag_tunnel(tunnel_log, "tsthub0")
    tag_tunnel(tunnel_log, "tsthub0")  # idempotent
    assert len(tunnel_log.filters) == 1
    tunnel_log.info("[wireguard-go out] %s", "hello")
    logging.getLogger("tunsup").warning("plain")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("tunsup").exception("with a traceback")


def test_entry_of_a_record() -> None:
    record = logging.LogRecord("tunsup.dns", logging.INFO, __file__, 1, "set %s", ("x",), None)
    entry = entry_from_record(record)
    assert entry["logger"] == "dns" and entry["msg"] == "set x" and entry["tunnel"] is None


def test_records_reach_stderr_as_human_lines_and_the_hub_as_the_same_entries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry per record serves the hub and the stderr line (written by
    the writer thread); nothing is logged to stderr after stop_logging."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    hub = LogHub()
    _log.setup_logging(hub=hub)
    try:
        _log_some()
    finally:
        _log.stop_logging()
    logging.getLogger("tunsup").error("after the stop")
    entries = hub.recent(10)
    lines = stderr.getvalue().splitlines()
    assert [line.split(" ", 1)[1].split(": ", 1)[0] for line in lines[:2]] == [
        "INFO    tsthub0", "WARNING tunsup"]
    assert lines[0].endswith("tsthub0: [wireguard-go out] hello")
    assert lines[:2] == [_log.format_log(e) for e in entries[:2]]
    assert "ValueError: bad" in stderr.getvalue()
    assert "after the stop" not in stderr.getvalue()
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
