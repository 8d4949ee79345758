"""Property tests of a lean ingest's chunked framing (``api.body_framing``), against
h11 (a maintained parser, uvicorn's other one) and httptools (the ASGI route's).

A framing the broker reads otherwise than the proxy before it is a smuggled request
or a line lost or merged. So, for random chunked bodies, valid and broken, each fed
in random reads:

- however it is cut, the lean decoder gives the same body, the same verdict (ended,
  refused, unfinished) and the same bytes after the body;
- a body it takes, h11 takes too, with the same bytes and the same end;
- it takes and refuses what httptools does (both routes of one broker agree).

Where h11 takes what the lean decoder refuses, RFC 9112 sides with the refusal (or
allows it): h11 takes any bytes after a ``;`` (control bytes, a bare CR, a ``;``
last: section 7.1.1's chunk-ext is tokens and quoted strings), whitespace before the
size line's CRLF (no OWS there in 7.1), a bare LF ending the trailer section (2.2: a
recipient MAY take it, so refusing it is allowed) and a framing field in the trailer
(RFC 9110, 6.5.1). One refusal the RFC does not allow: whitespace around an
extension's ``;`` and ``=`` (BWS, which a recipient MUST take): httptools refuses it
too, and a refusal smuggles nothing. The lean decoder takes more than h11 in one
case, sizes of over 20 hex digits (leading zeros: 1*HEXDIG, h11's own limit).
"""

from __future__ import annotations

import re

import h11
import httptools
from hypothesis import given
from hypothesis import strategies as st

from api.body_framing import MAX_CHUNK_LINE_BYTES, ChunkedBody
from tests.support.properties import bounded, pieces

HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
ENDED, REFUSED, UNFINISHED = "ended", "refused", "unfinished"

Outcome = tuple[str, bytes, bytes]
"""A verdict, the body's bytes given, and (once ended) the bytes after the body."""


def lean_outcome(data: bytes, cuts: list[int]) -> Outcome:
    framing = ChunkedBody()
    body = b""
    reads = pieces(data, cuts)
    for index, read in enumerate(reads):
        body += framing.decode(read)
        if framing.broken is not None:
            return REFUSED, body, b""
        if framing.ended:
            return ENDED, body, framing.rest + b"".join(reads[index + 1 :])
    return UNFINISHED, body, b""


def h11_outcome(data: bytes, cuts: list[int]) -> Outcome:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(HEAD)
    assert isinstance(connection.next_event(), h11.Request)
    body = b""
    reads = pieces(data, cuts)
    for index, read in enumerate(reads):
        connection.receive_data(read)
        for _ in range(len(read) + 2):  # (an event per byte at most, then NEED_DATA)
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError:
                return REFUSED, body, b""
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                rest = connection.trailing_data[0] + b"".join(reads[index + 1 :])
                return ENDED, body, rest
    return UNFINISHED, body, b""


class _Body:
    def __init__(self) -> None:
        self.body = b""
        self.complete = False

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def httptools_outcome(data: bytes) -> tuple[str, bytes]:
    """The verdict and body of httptools (what follows the body is parsed as a request
    too, its errors not the body's)."""
    body = _Body()
    try:
        httptools.HttpRequestParser(body).feed_data(HEAD + data)
    except httptools.HttpParserError:
        if not body.complete:
            return REFUSED, body.body
    return (ENDED if body.complete else UNFINISHED), body.body


# -- bodies -------------------------------------------------------------------------------------

TOKEN = st.text("!#$%&'*+.^_`|~09AZaz-", min_size=1, max_size=4).map(str.encode)
QUOTED = st.text(" \tab\\\"\x80'=;", max_size=5).map(
    lambda text: b'"' + re.sub(rb'(["\\])', rb"\\\1", text.encode("latin-1")) + b'"'
)
EXTENSION = st.builds(
    lambda name, value: b";" + name + (b"=" + value if value is not None else b""),
    TOKEN,
    st.none() | TOKEN | QUOTED,
)
TRAILER = st.builds(
    lambda name, value: name + b":" + value + b"\r\n",
    TOKEN.filter(lambda name: name.lower() not in (b"content-length", b"transfer-encoding")),
    st.text(' \tab:;"\x80\xff', max_size=6).map(lambda text: text.encode("latin-1")),
)


@st.composite
def size_lines(draw: st.DrawFn, size: int) -> bytes:
    """A valid size line for ``size``: hex in either case, leading zeros (20 digits at
    most: h11's limit), extensions."""
    digits = b"%x" % size
    digits = digits.upper() if draw(st.booleans()) else digits
    zeros = draw(st.integers(0, 20 - len(digits)))
    return b"0" * zeros + digits + b"".join(draw(st.lists(EXTENSION, max_size=2)))


@st.composite
def valid_bodies(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """A valid chunked body and what follows it: (its bytes, its data, what follows)."""
    datas = draw(st.lists(st.binary(min_size=1, max_size=24), max_size=4))
    framed = b"".join(draw(size_lines(len(data))) + b"\r\n" + data + b"\r\n" for data in datas)
    framed += draw(size_lines(0)) + b"\r\n" + b"".join(draw(st.lists(TRAILER, max_size=2)))
    after = draw(st.sampled_from([b"", NEXT, NEXT[:7]]))
    return framed + b"\r\n" + after, b"".join(datas), after


BYTES_TO_INSERT = [b"\n", b"\r", b" ", b"\t", b";", b"=", b'"', b"\\", b"-", b"+", b"0", b"f"]
BYTES_TO_INSERT += [b"x", b"\x00", b"\x7f", b"\x80", b"0x", b"\r\n"]
SIZE_LINES = [b"-3", b"+3", b"0x3", b" 3", b"3 ", b"1" * 16, b"f" * 16, b"F" * 15]
SIZE_LINES += [b"0" * 30 + b"3", b"3;" + b"x" * (MAX_CHUNK_LINE_BYTES - 2), b"3;" + b"x" * 5000]


@st.composite
def broken_bodies(draw: st.DrawFn) -> bytes:
    """A valid body, changed once: a byte inserted or deleted, a CRLF shortened, a size
    line replaced (negative, signed, overflowing, long, spaced) or a chunk one byte off."""
    data, _, _ = draw(valid_bodies())
    at = draw(st.integers(0, len(data)))
    change = draw(st.sampled_from(["insert", "delete", "line end", "size line", "off by one"]))
    if change == "insert":
        return data[:at] + draw(st.sampled_from(BYTES_TO_INSERT)) + data[at:]
    if change == "delete":
        return data[:at] + data[at + 1 :]
    if change == "line end":
        end = data.find(b"\r\n", at)
        ending = draw(st.sampled_from([b"\n", b"\r", b"", b"\n\r", b"\r\r\n"]))
        return data if end < 0 else data[:end] + ending + data[end + 2 :]
    if change == "size line":
        line = draw(st.sampled_from(SIZE_LINES))
        return line + b"\r\nabc\r\n" + data
    extra = draw(st.sampled_from([b"", b"ab"]))  # a chunk longer or shorter than its size
    return b"3\r\nabcd\r\n" + data if extra else b"3\r\nab\r\n" + data


CUTS = st.lists(st.integers(0, 300), max_size=8)


@bounded(examples=300)
@given(valid_bodies(), CUTS)
def test_a_valid_body_is_read_as_h11_reads_it_in_any_split(
    case: tuple[bytes, bytes, bytes], cuts: list[int]
) -> None:
    data, body, after = case
    assert lean_outcome(data, cuts) == (ENDED, body, after)
    assert h11_outcome(data, cuts) == (ENDED, body, after)


OVER_20_DIGITS = re.compile(rb"(?:^|\n)[0-9A-Fa-f]{21}")


@bounded(examples=600)
@given(broken_bodies(), CUTS)
def test_a_changed_body_is_taken_only_as_h11_takes_it(data: bytes, cuts: list[int]) -> None:
    """In any split the lean decoder decides as in one read; a body it takes, h11 takes
    the same (but sizes of over 20 digits, which h11 refuses)."""
    lean = lean_outcome(data, cuts)
    assert lean == lean_outcome(data, [])
    if lean[0] == ENDED and not OVER_20_DIGITS.search(data):
        assert h11_outcome(data, cuts) == lean


@bounded(examples=600)
@given(broken_bodies() | valid_bodies().map(lambda case: case[0]))
def test_a_body_is_taken_and_refused_as_httptools_does(data: bytes) -> None:
    """Both routes decide alike (a line over MAX_CHUNK_LINE_BYTES aside: httptools has
    no bound)."""
    verdict, body, _ = lean_outcome(data, [])
    if any(len(line) > MAX_CHUNK_LINE_BYTES for line in data.split(b"\r\n")):
        return
    theirs = httptools_outcome(data)
    assert (verdict == ENDED) == (theirs[0] == ENDED)
    if verdict == ENDED:
        assert body == theirs[1]
