"""Incremental Server-Sent Events framing: split upstream bytes into whole events without copying data twice."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Event:
    raw: bytes  # the whole frame including its terminating blank line, as received
    event: str | None
    data: bytes  # the joined data lines (b"" when none)


class SSEDecoder:
    """Feed arbitrary byte slices; get back complete events. Handles \\n\\n and \\r\\n\\r\\n."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out: list[Event] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            frame = buf[start : end + 2]
            start = end + 2
            ev = _parse(frame)
            if ev is not None:
                out.append(ev)
        self._buf = buf[start:]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an event not yet terminated (a bound on it stops an endless event from growing memory)."""
        return len(self._buf)

    def tail(self) -> list[Event]:
        """A last event that was not terminated by a blank line (some servers do that)."""
        if not self._buf.strip():
            return []
        ev = _parse(self._buf + b"\n\n")
        self._buf = b""
        return [ev] if ev is not None else []


def _parse(frame: bytes) -> Event | None:
    event = None
    data: list[bytes] = []
    for line in frame.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        if line.startswith(b"data:"):
            v = line[5:]
            data.append(v[1:] if v.startswith(b" ") else v)
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
    if not data and event is None:
        return None
    return Event(frame, event, b"\n".join(data))


def encode_data(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"
