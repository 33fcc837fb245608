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

import json
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


def encode(frame: dict[str, Any]) -> bytes:
    """One frame: compact JSON and a newline (``json.dumps`` escapes newlines
    inside strings, so a frame never spans lines).  Total: a string that is
    not valid Unicode (a lone surrogate) is sent \\u-escaped."""
    text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(frame, separators=(",", ":")).encode() + b"\n"


def error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def response(request_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}
