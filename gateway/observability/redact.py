"""Secret scrubbing for everything the gateway writes: log records, error messages, span status text.

Two layers:
- patterns: `Authorization: ...`, `x-api-key: ...`, `Bearer <token>`, `sk-...` style keys (OpenAI, Anthropic
  `sk-ant-...`, this gateway's `sk-gw-...`), URL credentials (`https://user:pass@host`) and credential-looking
  query parameters (`?api-key=...`);
- literals: the exact values of configured secrets (upstream keys read from `api_key_env`, the admin key),
  registered at startup with :func:`add_secret`.

:func:`install` hooks the logging record factory once per process, so every record from every logger (ours,
aiohttp's, redis's) is scrubbed when it is created, before any handler (or pytest's caplog) sees it. A
:class:`RedactingFilter` is also added to the root logger for code that builds records by hand.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback

REDACTED = "[REDACTED]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Header-ish "name: value" / "'name': 'value'" / name=value, with an optional auth scheme.
    (
        re.compile(
            r"(?i)\b(authorization|proxy-authorization|x-api-key|api-key|x-admin-key|x-goog-api-key)"
            r"""(['"]?\s*[:=]\s*['"]?)(?:(?:bearer|basic|token)\s+)?[^\s'",;}\]]+"""
        ),
        r"\1\2" + REDACTED,
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 " + REDACTED),
    (re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_-]{8,}"), r"\1-" + REDACTED),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"), REDACTED),
    # scheme://user:password@host
    # (bounded repetitions: these run over untrusted upstream text and must stay linear)
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,30}://)[^/@\s:'\"]{1,256}:[^/@\s'\"]{0,512}@"), r"\1" + REDACTED + "@"),
    # ?api-key=... &token=... &sig=...
    (
        re.compile(r"(?i)([?&](?:api[-_]?key|key|token|access_token|sig|signature|secret)=)[^&\s'\"]+"),
        r"\1" + REDACTED,
    ),
)

_lock = threading.Lock()
_secrets: set[str] = set()
_literal: re.Pattern[str] | None = None


def add_secret(value: str | None) -> None:
    """Scrub this exact value wherever it appears (values shorter than 6 characters are ignored)."""
    global _literal
    if not value or len(value) < 6 or value in _secrets:
        return
    with _lock:
        _secrets.add(value)
        alts = sorted(_secrets, key=len, reverse=True)
        _literal = re.compile("|".join(re.escape(s) for s in alts))


def scrub(text: str) -> str:
    """`text` with every known secret and secret-looking token replaced by [REDACTED]."""
    if not text:
        return text
    lit = _literal
    if lit is not None:
        text = lit.sub(REDACTED, text)
    for pat, repl in _PATTERNS:
        text = pat.sub(repl, text)
    return text


def scrub_record(record: logging.LogRecord) -> None:
    """Format the record's message now (args included) and scrub it, the traceback and the stack."""
    if getattr(record, "_gw_scrubbed", False):
        return
    try:
        msg = record.getMessage()
    except Exception:  # a broken format string: keep what we can
        msg = f"{record.msg} {record.args!r}"
    record.msg = scrub(msg)
    record.args = None
    if record.exc_info and record.exc_info[0] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = scrub(text)
        record.exc_info = None  # handlers must not re-render the raw exception
    elif record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    record._gw_scrubbed = True


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


_installed = False


def install() -> None:
    """Scrub every log record of this process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        logging.getLogger().addFilter(RedactingFilter())
