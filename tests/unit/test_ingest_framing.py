"""A lean ingest's body framing (``api.body_framing``): chunked and sized bodies decoded
as they arrive, in any split, with what follows the body kept for the next request."""

from __future__ import annotations

import itertools

import httptools
import pytest

from api.body_framing import MAX_CHUNK_LINE_BYTES, BadFraming, ChunkedBody, SizedBody

BODY = b'{"data": 1}\n{"data": "two"}\n'
CHUNKED = (
    b"b\r\n"
    + BODY[:11]
    + b"\r\n"
    + b"%x;ext=1\r\n" % len(BODY[11:])
    + BODY[11:]
    + b"\r\n"
    + b"0\r\n\r\n"
)
NEXT = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def decode_in_pieces(framing: ChunkedBody | SizedBody, data: bytes, size: int) -> bytes:
    body = b""
    for start in range(0, len(data), size):
        assert not framing.ended
        body += framing.decode(data[start : start + size])
        if framing.ended:
            rest = data[start + size :]
            framing.rest += rest
            break
    return body


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(CHUNKED + NEXT)])
def test_a_chunked_body_in_any_split(size: int) -> None:
    framing = ChunkedBody()
    assert decode_in_pieces(framing, CHUNKED + NEXT, size) == BODY
    assert framing.ended and framing.rest == NEXT


def test_trailers_are_read_and_dropped() -> None:
    framing = ChunkedBody()
    data = b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n" + NEXT
    assert framing.decode(data) == b"abc"
    assert framing.ended and framing.rest == NEXT


def test_a_long_chunk_over_many_reads() -> None:
    framing = ChunkedBody()
    data = b"%x\r\n" % 100_000 + b"x" * 100_000 + b"\r\n0\r\n\r\n"
    assert decode_in_pieces(framing, data, 4096) == b"x" * 100_000
    assert framing.ended and framing.rest == b""


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\nab\r\n",  # not hex
        b"\r\n",  # no size
        b" 2\r\nab\r\n",  # space before the size
        b"-2\r\nab\r\n",
        b"2\r\nabXY",  # no CRLF after the data
        b"1" * 16 + b"\r\n",  # a size past 2**60
        b"2\nab\r\n",  # a bare LF
        b"2" + b";x" * 3000,  # a size line that never ends
        b"2;a\nb\r\nab\r\n",  # a bare LF in an extension (httptools refuses it too)
        b"2 \r\nab\r\n",  # a space after the size
        b"2;\x01\x7f\r\nab\r\n",  # control bytes in an extension
    ],
)
def test_malformed_chunked_framing(data: bytes) -> None:
    """What came before the break is still given (it is stored); nothing after."""
    framing = ChunkedBody()
    given = b"abcab" if data.startswith(b"2\r\nab") else b"abc"  # (a chunk's data, read)
    assert framing.decode(b"3\r\nabc\r\n" + data) == given
    assert isinstance(framing.broken, BadFraming)
    assert framing.decode(b"3\r\nabc\r\n") == b""


def test_a_trailer_that_never_ends_is_malformed() -> None:
    framing = ChunkedBody()
    framing.decode(b"0\r\n")
    for _ in range(100):
        framing.decode(b"X-Long: " + b"y" * 1000 + b"\r\n")
        if framing.broken is not None:
            break
    assert framing.broken is not None and not framing.ended


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_a_sized_body(size: int) -> None:
    framing = SizedBody(len(BODY))
    assert decode_in_pieces(framing, BODY + NEXT, size) == BODY
    assert framing.ended and framing.rest == NEXT


def test_an_empty_sized_body_has_ended() -> None:
    assert SizedBody(0).ended


@pytest.mark.parametrize(
    "trailer",
    [
        b"not a header\r\n\r\n",  # no colon
        b"X-A: 1\nX-B: 2\r\n\r\n",  # a bare LF inside it
        b"X-A: \x01\r\n\r\n",  # a control byte
        b": 1\r\n\r\n",  # no name
    ],
)
def test_a_malformed_trailer_line_breaks_the_framing(trailer: bytes) -> None:
    """As httptools (uvicorn's parser) refuses it: the two routes decide alike."""
    framing = ChunkedBody()
    assert framing.decode(b"3\r\nabc\r\n0\r\n" + trailer + NEXT) == b"abc"
    assert isinstance(framing.broken, BadFraming) and not framing.ended


class _Body:
    complete = False

    def on_body(self, body: bytes) -> None:
        """(the body is not what is compared)"""

    def on_message_complete(self) -> None:
        self.complete = True


def _httptools_takes(size_line: bytes, trailer: bytes) -> bool:
    """Whether httptools reads the whole body (refusing nothing, and finding its end)."""
    body = _Body()
    parser = httptools.HttpRequestParser(body)
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    try:
        parser.feed_data(head + size_line + b"\r\nabc\r\n0\r\n" + trailer + b"\r\n")
    except httptools.HttpParserError:
        return False
    return body.complete


def _lean_takes(size_line: bytes, trailer: bytes) -> bool:
    framing = ChunkedBody()
    framing.decode(size_line + b"\r\nabc\r\n0\r\n" + trailer + b"\r\n")
    return framing.ended and framing.broken is None


@pytest.mark.parametrize(
    ("size_line", "trailer"),
    [
        (b"3", b""),
        (b"3;a", b""),
        (b"3;a=b", b""),
        (b"3;a;b=c", b""),
        (b'3;a="b c"', b""),
        (b'3;a="b\\"c"', b""),
        (b'3;a="\tb\x80"', b""),
        (b"0000000000000000003", b""),  # leading zeros
        (b"3; a", b""),  # space after ';' (the lean route took it)
        (b"3;;", b""),  # an empty extension last (the lean route took it)
        (b"3;;x", b""),  # empty in the middle: httptools takes it
        (b"3;x=", b""),
        (b"3;=b", b""),
        (b'3;=""', b""),
        (b'3;=x""', b""),
        (b'3;=""x', b""),
        (b"3;\x80", b""),  # a name not a token (the lean route took it)
        (b'3;a="b', b""),  # a quoted string left open (the lean route took it)
        (b"3;a=b;", b""),
        (b"3;a =b", b""),
        (b"3;a= b", b""),
        (b"3 ;a", b""),
        (b"3\t", b""),
        (b"3", b"X-A: b\r\n"),
        (b"3", b"X-A:b\r\n"),
        (b"3", b"X-A : b\r\n"),
        (b"3", b"Content-Length: 5\r\n"),  # framing in a trailer (the lean route took it)
        (b"3", b"transfer-encoding: chunked\r\n"),
    ],
)
def test_a_chunk_size_line_and_a_trailer_are_read_as_httptools_reads_them(
    size_line: bytes, trailer: bytes
) -> None:
    """Both routes take and refuse the same bodies (uvicorn's route reads with httptools)."""
    assert _lean_takes(size_line, trailer) == _httptools_takes(size_line, trailer)


def test_every_short_chunk_size_line_is_read_as_httptools_reads_it() -> None:
    """Every line of up to 5 symbols after a size, of those that make extensions."""
    alphabet = [b";", b"x", b"=", b'"', b"\\", b" ", b"\x80"]
    differ = [
        line
        for length in range(6)
        for symbols in itertools.product(alphabet, repeat=length)
        if _lean_takes(line := b"3" + b"".join(symbols), b"") != _httptools_takes(line, b"")
    ]
    assert differ == []


LONGEST_LINE = b"3;" + b"x" * (MAX_CHUNK_LINE_BYTES - 2)


@pytest.mark.parametrize(
    ("line", "taken", "given"),
    [
        (LONGEST_LINE + b"\r\nabc\r\n0\r\n", True, b"abc"),
        (LONGEST_LINE + b"x\r\nabc\r\n0\r\n", False, b""),
        (b"3\r\nabc\r\n0\r\nX-A: " + b"y" * (MAX_CHUNK_LINE_BYTES - 5) + b"\r\n", True, b"abc"),
        (b"3\r\nabc\r\n0\r\nX-A: " + b"y" * (MAX_CHUNK_LINE_BYTES - 4) + b"\r\n", False, b"abc"),
    ],
)
@pytest.mark.parametrize("size", [1, 1000, MAX_CHUNK_LINE_BYTES + 64])
def test_a_line_too_long_is_refused_however_it_arrives(
    line: bytes, taken: bool, given: bytes, size: int
) -> None:
    """A chunk-size or trailer line over MAX_CHUNK_LINE_BYTES is malformed in one read as
    in pieces: it was taken whole, and refused cut (a body's fate was the network's)."""
    framing = ChunkedBody()
    body = decode_in_pieces(framing, line + b"\r\n", size)
    assert (framing.ended and framing.broken is None) == taken
    assert body == given
