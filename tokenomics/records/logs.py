"""Structured request logs and the redacting log filter."""

import dataclasses
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from ..util import MiB, _write_all, log, rfc3339_ms, scrub

if TYPE_CHECKING:  # names used in annotations only
    from ..config import LoggingConfig
    from ..records.ledger import RequestRecord


LOG_TOKEN_PREFIX = 12           # chars of the token hash in log lines: enough to tell tokens apart


LOG_BODY_MAX_BYTES = 1 * MiB    # logged bodies are cut here: agents send ~100 KB, but one base64


# --- structured request logs -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LogOptions:
    """The `logging` options that shape request log lines. `file_path` "" means stderr only."""
    format: str = "json"
    disable_request: bool = False
    hide_token_hash: bool = False
    request_body: bool = False
    response_body: bool = False
    file_path: str = ""

    @classmethod
    def from_config(cls, cfg: "LoggingConfig", data_dir: str = "") -> "LogOptions":
        path = cfg.file.path if cfg.file.enabled else ""
        if path and data_dir and not os.path.isabs(path):
            path = os.path.join(data_dir, path)
        return cls(format=cfg.format, disable_request=cfg.disable_request,
                   hide_token_hash=cfg.hide_token_hash, request_body=cfg.request_body,
                   response_body=cfg.response_body, file_path=path)


_TEXT_PLAIN_RE = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")


def _text_value(value: Any) -> str:
    """A value for a text log line: bare when it is one harmless word, JSON-quoted otherwise,
    so that a model name or metadata value can never break the one-line-per-request shape."""
    if not isinstance(value, str):      # compact JSON escapes newlines: still one line
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return value if _TEXT_PLAIN_RE.fullmatch(value) else json.dumps(value, ensure_ascii=False)


def _body_text(body: bytes) -> str:
    if len(body) > LOG_BODY_MAX_BYTES:
        cut = len(body) - LOG_BODY_MAX_BYTES
        return body[:LOG_BODY_MAX_BYTES].decode("utf-8", "replace") + f"...[truncated {cut} bytes]"
    return body.decode("utf-8", "replace")


class RequestLogger:
    """One line per governed request, JSON (default) or text, on stderr and optionally appended
    to a 0600 file. Bodies are logged only when enabled, and the bodies given are the ones sent
    upstream (after masking/anonymizing), never the client's originals."""

    def __init__(self, options: LogOptions | None = None, *, stream=None, **overrides):
        opts = options or LogOptions()
        self.options = dataclasses.replace(opts, **overrides) if overrides else opts
        self._stream = stream           # None: sys.stderr at write time (follows redirection)
        self._fd: int | None = None
        self._warned = False
        if self.options.file_path and not self.options.disable_request:
            self._open(self.options.file_path)

    def _open(self, path: str) -> None:
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)      # an existing file keeps no wider mode than a new one

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def entry(self, rec: "RequestRecord", key_env: str, request_body: bytes | None = None,
              response_body: bytes | None = None) -> dict:
        """The log line's fields, before formatting and scrubbing."""
        o = self.options
        e: dict[str, Any] = {"timestamp": rfc3339_ms(rec.timestamp), "method": "POST",
                             "path": rec.endpoint}
        if not o.hide_token_hash:
            e["token_hash"] = rec.token_hash[:LOG_TOKEN_PREFIX]
        e.update(model=rec.model, provider=rec.provider, key_env=key_env, status=rec.status_code,
                 duration_ms=round(rec.duration_ms, 1),
                 tokens={"input": rec.input_tokens, "output": rec.output_tokens},
                 cost_usd=round(rec.cost_usd, 8), stream=rec.stream, retries=rec.retry_count,
                 rule_matches=rec.rule_matches, request_id=rec.request_id,
                 upstream_request_id=rec.upstream_request_id, upstream_id=rec.upstream_id,
                 metadata=rec.metadata)
        if rec.error:
            e["error"] = rec.error
        if rec.fallback_model:
            e["fallback_model"] = rec.fallback_model
        if o.request_body and request_body is not None:
            e["request_body"] = _body_text(request_body)
        if o.response_body and response_body is not None:
            e["response_body"] = _body_text(response_body)
        return e

    def format(self, rec: "RequestRecord", key_env: str, request_body: bytes | None = None,
               response_body: bytes | None = None) -> str:
        """The scrubbed line (no newline) that `log` writes."""
        e = self.entry(rec, key_env, request_body, response_body)
        if self.options.format == "text":
            words = [e["timestamp"], "POST", _text_value(e["path"]), str(e["status"]),
                     f"{e['duration_ms']}ms"]
            for k, v in e.items():
                if k in ("timestamp", "method", "path", "status", "duration_ms"):
                    continue
                if k == "tokens":
                    words.append(f"tokens={v['input']}/{v['output']}")
                elif k == "rule_matches":
                    if v:
                        words.append("rules=" + _text_value(",".join(
                            f"{m.get('rule', '')}:{m.get('action', '')}" for m in v)))
                elif v not in ("", {}, None):
                    words.append(f"{k}={_text_value(v)}")
            line = " ".join(words)
        else:
            line = json.dumps(e, separators=(",", ":"), ensure_ascii=False, default=str)
        return scrub(line, keep=(rec.request_id,) if rec.request_id else ())

    def log(self, rec: "RequestRecord", key_env: str, request_body: bytes | None = None,
            response_body: bytes | None = None) -> None:
        """Write the request's line, unless request logging is disabled. Never raises for I/O:
        a full disk or a closed stderr costs the log line, not the request."""
        if self.options.disable_request:
            return
        data = self.format(rec, key_env, request_body, response_body) + "\n"
        try:
            stream = self._stream or sys.stderr
            stream.write(data)
            stream.flush()
            if self._fd is not None:
                _write_all(self._fd, data.encode("utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: write to a closed stream
            if not self._warned:
                self._warned = True
                log.warning("request log write failed (%s); further failures are not reported",
                            type(exc).__name__)


class _RedactingFilter(logging.Filter):
    """Scrubs token and key shapes from every record it sees, message, arguments and traceback
    alike. A record logged with `extra={"request_id": rid}` keeps that request id visible."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", "")
        keep = (rid,) if isinstance(rid, str) and rid else ()
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format must not hide the record (nor leak its args)
            message = str(record.msg)
        clean = scrub(message, keep)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Format the traceback now, scrubbed: the handler's formatter reuses exc_text.
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, keep)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, keep)
        return True


def redacting_filter() -> logging.Filter:
    """A filter for the handler of the "tokenomics" logger (handler filters also see records of
    child loggers, logger filters do not): nothing token- or key-shaped reaches the output."""
    return _RedactingFilter()
