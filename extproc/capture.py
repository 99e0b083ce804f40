"""Opt-in capture of routed requests, for `signalbox replay` (issue 17). Off by default.

With `--capture-prompts FILE` the router phase appends one JSON line per routed request: its
id, time, path, the headers policies read (never a key header), its decision (policy, backend,
class) and its body, cut to MAX_BODY_CHARS and with anything that looks like a key replaced by
"[redacted]". The file stops growing at MAX_FILE_BYTES (a warning says so once). Each line is
one `write` in append mode, so the workers of a gateway can share the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from signalbox.core.envoygen.contract import KEY_HEADERS

log = logging.getLogger("signalbox.extproc")

# Its name in a local gateway's work directory, beside the request log (`signalbox up`).
CAPTURE_FILE = "captured.jsonl"
MAX_BODY_CHARS = 32_768
MAX_FILE_BYTES = 256 * 1024 * 1024
# Provider and gateway keys, bearer tokens, JWTs and AWS access keys, as they appear in text.
SECRETS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{16,}|sbx-[A-Za-z0-9_\-]{16,}|sk-ant-[A-Za-z0-9_\-]{16,}|AKIA[0-9A-Z]{16}|"
    r"AIza[0-9A-Za-z_\-]{30,}|eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}|"
    r"(?i:bearer)\s+[A-Za-z0-9._\-]{16,})"
)


def redact(text: str) -> str:
    return SECRETS.sub("[redacted]", text)


class Capture:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._full = False

    def record(self, request_id: str, path: str, headers: dict[str, str], body: bytes, decision: dict) -> None:
        if self._full:
            return
        try:
            if self.path.exists() and self.path.stat().st_size >= MAX_FILE_BYTES:
                self._full = True
                log.warning(
                    "prompt capture %s reached %d bytes: no more requests are captured", self.path, MAX_FILE_BYTES
                )
                return
            kept = {k: redact(v) for k, v in headers.items() if not k.startswith(":") and k not in KEY_HEADERS}
            line = json.dumps(
                {
                    "request_id": request_id,
                    "time": round(time.time(), 3),
                    "path": path,
                    "headers": kept,
                    "decision": decision,
                    "body": redact(body.decode("utf-8", "replace")[:MAX_BODY_CHARS]),
                    "truncated": len(body) > MAX_BODY_CHARS,
                },
                separators=(",", ":"),
            )
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:  # capture never fails a request
            log.warning("prompt capture failed: %s", exc)
