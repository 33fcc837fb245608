"""The control protocol, shared by the server (:mod:`tunsup.control.server`) and the
trio-free client (:mod:`tunsup.control.client`).

Newline-delimited JSON over the unix stream socket ``runtime_dir/control.sock``.
Every frame is one JSON object on one line (UTF-8, no raw newlines inside):

* request   ``{"id": ID, "op": OP, ...arguments}`` — ID is a number or string
  chosen by the client and echoed back;
* response  ``{"id": ID, "ok": true, "result": {...}}`` or
  ``{"id": ID, "ok": false, "error": {"code": CODE, "message": TEXT}}``;
* log line  ``{"log": {"seq", "ts", "level", "logger", "tunnel", "msg"}}``
  streamed after a ``logs`` request;
* event     ``{"event": {"type": "exit", "code": N, "complete": BOOL,
  "failures": [...]}}`` sent to log subscribers as the service exits.

A request frame over ``ControlSettings.max_request`` bytes, a frame that is not a JSON
object, an unknown op or a peer without permission gets an error frame
(``id`` null when unknown) and the connection is closed.  An op that fails
(no such tunnel, ...) gets an error response and the connection stays open.
"""

from __future__ import annotations

# The C accelerator of :mod:`json`, used directly: ``import json`` loads its
# decoder and encoder modules, and with them ``re`` and ``enum`` (about
# 10 ms of a client command's start, which should take about 20 in all).
# The same C scanner and encoder do the work behind json.loads/json.dumps.
import _json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SOCKET_NAME = "control.sock"
#: Largest frame a client accepts (a status with many peers is large).
MAX_RESPONSE = 16 * 1024 * 1024

OPS = ("ping", "status", "up", "down", "reload", "logs")

# Error codes.
BAD_FRAME = "bad-frame"  # not JSON, not an object, missing/invalid id or op
TOO_LARGE = "too-large"
UNKNOWN_OP = "unknown-op"
FORBIDDEN = "forbidden"
BUSY = "busy"  # too many connections
IDLE = "idle-timeout"
TIMEOUT = "timeout"  # the op did not finish within the request timeout
BAD_ARGS = "bad-args"
CONFIG = "config"  # a configuration file is invalid (client exit code 2)
NOT_FOUND = "not-found"
CONFLICT = "conflict"
FAILED = "failed"  # the op ran and failed; the host was restored
INCOMPLETE = "incomplete"  # teardown incomplete (client exit code 3)
STOPPING = "stopping"  # the service is stopping
INTERNAL = "internal"


def socket_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


class _DecoderOptions:
    """What :func:`_json.make_scanner` reads of a ``json.JSONDecoder``: its
    defaults (strict, plain dicts, NaN and Infinity accepted)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                      "-Infinity": float("-inf")}.__getitem__


# (typeshed wants a JSONDecoder; the scanner reads only these attributes.)
_scan = _json.make_scanner(_DecoderOptions())  # type: ignore[arg-type]


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps(frame, separators=(",", ":"), ensure_ascii=...): markers,
# default, string encoder, indent, key and item separators, sort_keys,
# skipkeys, allow_nan.
def _encoder(ascii_only: bool) -> Any:
    quote = _json.encode_basestring_ascii if ascii_only else _json.encode_basestring
    return _json.make_encoder({}, _not_serializable, quote, None, ":", ",", False, False, True)


def encode(frame: dict[str, Any]) -> bytes:
    """One frame: compact JSON and a newline (as ``json.dumps``, which
    escapes newlines inside strings, so a frame never spans lines).  Total: a
    string that is not valid Unicode (a lone surrogate) is sent \\u-escaped."""
    text = "".join(_encoder(False)(frame, 0))
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return "".join(_encoder(True)(frame, 0)).encode() + b"\n"


_SPACE = " \t\n\r"


def decode(line: bytes | str) -> Any:
    """One frame's JSON value, as ``json.loads`` reads it; ValueError (a
    ``json.JSONDecodeError`` where json's own scanner raises one) when it is
    not exactly one JSON value."""
    text = line.decode("utf-8", "surrogatepass") if isinstance(line, bytes) else line
    start = len(text) - len(text.lstrip(_SPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"not JSON (at character {exc.value})") from None
    if text[end:].strip(_SPACE):
        raise ValueError(f"extra data after the JSON value (at character {end})")
    return value


def error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def response(request_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}
