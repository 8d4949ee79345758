"""A request body's framing decoded as it arrives: chunked (RFC 9112, section 7.1) or sized.

A lean ingest (``api.lean_ingest``) reads its body where it arrives, not through
httptools: ``ChunkedBody`` and ``SizedBody`` hand over the body's bytes of each
read, say where the body ended (what follows is the next request, ``rest``), and
``BadFraming`` when the chunked framing is not HTTP. They take and refuse the
bodies httptools, uvicorn's parser, takes and refuses, so that both routes agree.
"""

from __future__ import annotations

import re

MAX_CHUNK_LINE_BYTES = 4096
"""A chunk-size line (with its extensions) or a trailer line longer than this is
malformed framing."""
MAX_TRAILER_BYTES = 16384
# A chunk-size line and a trailer field as httptools (uvicorn's parser) reads them, so
# that both routes take and refuse the same bodies (tests/unit/test_ingest_framing
# checks the two side by side, and found this grammar over every line of up to 6
# symbols): leading zeros; extensions `;name`, `;name=value`, the name maybe empty,
# the value maybe empty, a token, a token then a quoted string, or a quoted string;
# no space anywhere; no `;` last; no control byte (a bare LF above all: how a request
# is smuggled past a proxy that takes it for a line's end); no trailer field that
# frames the message.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_VALUE = rb"(?:" + _TOKEN + rb"+(?:" + _QUOTED + rb")?|" + _QUOTED + rb")?"
CHUNK_SIZE_LINE = re.compile(
    rb"0*[0-9A-Fa-f]{1,15}(?:;" + _TOKEN + rb"*(?:=" + _VALUE + rb")?)*(?<!;)"
)
HEX_DIGITS = b"0123456789abcdefABCDEF"
"""A chunk size of these alone, 1 to 15 of them, is one ``CHUNK_SIZE_LINE`` takes (its
match costs a line 1,700 instructions; deleting these, some 300)."""
TRAILER_FIELD = re.compile(_TOKEN + rb"+:[\t\x20-\x7e\x80-\xff]*")
FRAMING_FIELDS = (b"content-length", b"transfer-encoding")


class BadFraming(Exception):
    """The chunked framing is not HTTP: answered as uvicorn answers a parser error."""


class SizedBody:
    """A body of a known length (Content-Length), as it arrives."""

    __slots__ = ("_left", "broken", "ended", "rest")

    def __init__(self, size: int) -> None:
        self._left = size
        self.ended = size == 0
        self.rest = b""  # what followed the body in the last read (the next request)
        self.broken: BadFraming | None = None  # (never: a length cannot be malformed)

    def decode(self, data: bytes) -> bytes:
        """The body's bytes in ``data``."""
        if len(data) < self._left:
            self._left -= len(data)
            return data
        body, self.rest = data[: self._left], data[self._left :]
        self._left, self.ended = 0, True
        return body


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedBody:
    """A chunked body (RFC 9112, section 7.1) decoded as it arrives.

    Not httptools: fed the body too, it tells no position where the body ends in a
    read, so a pipelined request after it could not be read as a request.
    """

    __slots__ = ("_left", "_pending", "_state", "_trailer_bytes", "broken", "ended", "rest")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0  # of the current chunk's data
        self._pending = b""  # an unfinished size or trailer line, or chunk end
        self._trailer_bytes = 0
        self.ended = False
        self.rest = b""
        self.broken: BadFraming | None = None  # what was wrong, once the framing broke

    def decode(self, data: bytes) -> bytes:
        """The body's bytes in ``data``, up to where the framing broke, if it did
        (``broken``: nothing more is decoded)."""
        if self._state == _DATA and len(data) < self._left and not self._pending:
            self._left -= len(data)  # the middle of a long chunk
            return data
        if self._state == _SIZE and not self._pending:
            whole = self._whole_chunk(data)
            if whole is not None:
                return whole
        buffer = self._pending + data if self._pending else data
        parts: list[bytes] = []
        position = 0
        while position < len(buffer) and not self.ended and self.broken is None:
            try:
                step = self._step(buffer, position, parts)
            except BadFraming as error:
                self.broken = error
                break
            if step is None:
                break
            position = step
        if self.ended:
            self._pending, self.rest = b"", buffer[position:]
        else:
            self._pending = buffer[position:]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _whole_chunk(self, data: bytes) -> bytes | None:
        """The data of ``data`` if it is one whole chunk, its size line and CRLF included;
        else None (``decode``'s general way). A token stream's line comes so, one chunk a
        read: this way it is decoded in one step, not three (about 1 us a line less)."""
        end = data.find(b"\r\n", 0, MAX_CHUNK_LINE_BYTES)
        if end < 0:
            return None
        line = data[:end]
        if 0 < end <= 15 and not line.translate(None, HEX_DIGITS):
            size = int(line, 16)  # (hex digits alone, as a token stream's: no regular expression)
        elif CHUNK_SIZE_LINE.fullmatch(line):
            size = int(line.split(b";", 1)[0], 16)
        else:
            return None  # (the general way refuses it)
        start = end + 2
        if size == 0 or len(data) != start + size + 2 or not data.endswith(b"\r\n"):
            return None
        return data[start : start + size]

    def _step(self, buffer: bytes, position: int, parts: list[bytes]) -> int | None:
        """Decode from ``position`` on: a chunk's data (into ``parts``), its CRLF, or
        a line; where it stopped, or None if ``buffer`` ends before a whole line."""
        if self._state == _DATA:
            end = min(position + self._left, len(buffer))
            parts.append(buffer[position:end])
            self._left -= end - position
            if self._left == 0:
                self._state = _DATA_END
            return end
        if self._state == _DATA_END:
            if len(buffer) - position < 2:
                return None
            if buffer[position : position + 2] != b"\r\n":
                raise BadFraming("no CRLF after a chunk's data")
            self._state = _SIZE
            return position + 2
        end = buffer.find(b"\r\n", position)
        # Too long whether it came in one read or in pieces: checked on the whole line
        # too, not only on what waits for its end (a long line was taken or refused as
        # the network cut it). Unended, one byte more may be its CR.
        if end < 0:
            if len(buffer) - position > MAX_CHUNK_LINE_BYTES + 1:
                raise BadFraming("a chunk-size or trailer line is too long")
            return None
        if end - position > MAX_CHUNK_LINE_BYTES:
            raise BadFraming("a chunk-size or trailer line is too long")
        self._line(buffer[position:end])
        return end + 2

    def _line(self, line: bytes) -> None:
        if self._state == _TRAILER:
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                raise BadFraming("the trailer is too long")
            if line and not TRAILER_FIELD.fullmatch(line):
                raise BadFraming("a malformed trailer field")
            if line.split(b":", 1)[0].lower() in FRAMING_FIELDS:
                raise BadFraming("a trailer field that frames the message")
            self.ended = not line
            return
        if not CHUNK_SIZE_LINE.fullmatch(line):
            raise BadFraming("a malformed chunk size")
        self._left = int(line.split(b";", 1)[0], 16)
        self._state = _DATA if self._left else _TRAILER
