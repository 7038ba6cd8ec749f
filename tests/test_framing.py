"""Unit tests of the newline framer and the JSON-object line decoder."""

from __future__ import annotations

import doctest
import random
import traceback

import pytest

from claudepool.errors import ClaudepoolError, CorruptFrame, FrameTooLarge, ProtocolError
from claudepool.protocol import framing
from claudepool.protocol.framing import DEFAULT_MAX_LINE_BYTES, LineFramer, decode_object

SECRET = "sk-ant-api03-SECRET-do-not-log-7f3a9c"


def feed_all(framer: LineFramer, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


# -- construction -------------------------------------------------------------------------------


def test_default_max_line_bytes_is_16_mib() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 16 * 1024 * 1024
    assert LineFramer().max_line_bytes == DEFAULT_MAX_LINE_BYTES


def test_custom_bound_is_kept() -> None:
    assert LineFramer(max_line_bytes=7).max_line_bytes == 7
    assert LineFramer(1).max_line_bytes == 1


@pytest.mark.parametrize("bound", [0, -1, -(2**40)])
def test_non_positive_bound_raises_value_error(bound: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        LineFramer(max_line_bytes=bound)


def test_new_framer_holds_nothing() -> None:
    framer = LineFramer(16)
    assert framer.pending_bytes == 0
    assert framer.finish() == b""


def test_module_doctest_passes() -> None:
    result = doctest.testmod(framing)
    assert result.attempted >= 3
    assert result.failed == 0


# -- splitting ----------------------------------------------------------------------------------


def test_single_complete_line() -> None:
    framer = LineFramer(64)
    assert framer.feed(b'{"a":1}\n') == [b'{"a":1}']
    assert framer.pending_bytes == 0


def test_line_split_across_two_chunks() -> None:
    framer = LineFramer(64)
    assert framer.feed(b'{"a":') == []
    assert framer.pending_bytes == 5
    assert framer.feed(b"1}\n") == [b'{"a":1}']
    assert framer.pending_bytes == 0


def test_line_split_across_many_chunks() -> None:
    framer = LineFramer(64)
    assert framer.feed(b"ab") == []
    assert framer.feed(b"cd") == []
    assert framer.feed(b"ef") == []
    assert framer.pending_bytes == 6
    assert framer.feed(b"g\nh") == [b"abcdefg"]
    assert framer.pending_bytes == 1
    assert framer.finish() == b"h"


def test_byte_by_byte() -> None:
    data = b'{"type":"system"}\n{"type":"result"}\n\n{"x":"\xc3\xa9"}\n'
    framer = LineFramer(64)
    out: list[bytes] = []
    for i in range(len(data)):
        out.extend(framer.feed(data[i : i + 1]))
    assert out == [b'{"type":"system"}', b'{"type":"result"}', b"", b'{"x":"\xc3\xa9"}']
    assert framer.pending_bytes == 0
    assert framer.finish() == b""


def test_many_lines_in_one_chunk() -> None:
    lines = [f'{{"n":{i}}}'.encode() for i in range(100)]
    framer = LineFramer(64)
    assert framer.feed(b"\n".join(lines) + b"\n") == lines
    assert framer.pending_bytes == 0


def test_chunk_completing_pending_line_and_carrying_more_lines() -> None:
    framer = LineFramer(64)
    assert framer.feed(b"one-") == []
    assert framer.feed(b"part\ntwo\nthree\nfour-") == [b"one-part", b"two", b"three"]
    assert framer.pending_bytes == len(b"four-")
    assert framer.feed(b"end\n") == [b"four-end"]


def test_newline_alone_completes_pending_line() -> None:
    framer = LineFramer(64)
    framer.feed(b"abc")
    assert framer.feed(b"\n") == [b"abc"]
    assert framer.pending_bytes == 0


def test_empty_lines_are_emitted_as_empty_bytes() -> None:
    framer = LineFramer(64)
    assert framer.feed(b"\n\n") == [b"", b""]
    assert framer.feed(b"a\n\nb\n") == [b"a", b"", b"b"]


def test_empty_chunk_without_pending_returns_nothing() -> None:
    framer = LineFramer(64)
    assert framer.feed(b"") == []
    assert framer.pending_bytes == 0
    assert framer.finish() == b""


def test_empty_chunk_with_pending_keeps_the_tail() -> None:
    framer = LineFramer(64)
    framer.feed(b"partial")
    assert framer.feed(b"") == []
    assert framer.pending_bytes == 7
    assert framer.feed(b"") == []
    assert framer.feed(b"!\n") == [b"partial!"]


def test_crlf_is_kept_as_part_of_the_line() -> None:
    framer = LineFramer(64)
    assert framer.feed(b'{"a":1}\r\n{"b":2}\r\n') == [b'{"a":1}\r', b'{"b":2}\r']


def test_crlf_split_between_chunks_is_kept() -> None:
    framer = LineFramer(64)
    assert framer.feed(b"abc\r") == []
    assert framer.pending_bytes == 4
    assert framer.feed(b"\n") == [b"abc\r"]


def test_lone_cr_does_not_split() -> None:
    framer = LineFramer(64)
    assert framer.feed(b"a\rb\rc\n") == [b"a\rb\rc"]


def test_lines_are_bytes_and_survive_later_feeds() -> None:
    framer = LineFramer(64)
    framer.feed(b"first-")
    joined = framer.feed(b"line\nsecond\n")
    assert all(type(line) is bytes for line in joined)
    framer.feed(b"overwrite-the-buffer-")
    framer.feed(b"again\n")
    assert joined == [b"first-line", b"second"]


def test_non_ascii_bytes_pass_through_untouched() -> None:
    raw = "héllo 😀 中文".encode() + b"\xff\x00"
    framer = LineFramer(64)
    assert framer.feed(raw + b"\n") == [raw]


# -- the size bound -----------------------------------------------------------------------------


def test_complete_line_exactly_at_limit_is_accepted() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"x" * 8 + b"\n") == [b"x" * 8]


def test_complete_line_one_byte_over_limit_raises() -> None:
    framer = LineFramer(8)
    with pytest.raises(FrameTooLarge, match="9 bytes exceeds the limit of 8"):
        framer.feed(b"x" * 9 + b"\n")


def test_joined_line_exactly_at_limit_is_accepted() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"xxxxx") == []
    assert framer.feed(b"yyy\n") == [b"xxxxxyyy"]


def test_joined_line_one_byte_over_limit_raises() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"xxxxx") == []
    with pytest.raises(FrameTooLarge, match="9 bytes exceeds the limit of 8"):
        framer.feed(b"yyyy\n")


def test_oversize_joined_line_is_not_kept_in_the_buffer() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"ab") == []
    with pytest.raises(FrameTooLarge):
        framer.feed(b"cde\n")
    assert framer.pending_bytes == 0


def test_pending_tail_exactly_at_limit_is_accepted() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"x" * 8) == []
    assert framer.pending_bytes == 8
    assert framer.feed(b"\n") == [b"x" * 8]


def test_pending_tail_at_limit_after_complete_lines_is_accepted() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"ok\n" + b"x" * 8) == [b"ok"]
    assert framer.pending_bytes == 8


def test_pending_tail_one_byte_over_limit_raises_in_one_chunk() -> None:
    framer = LineFramer(8)
    with pytest.raises(FrameTooLarge, match="unterminated line"):
        framer.feed(b"x" * 9)
    assert framer.pending_bytes == 0


def test_pending_tail_one_byte_over_limit_raises_when_grown() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"x" * 8) == []
    with pytest.raises(FrameTooLarge, match="unterminated line"):
        framer.feed(b"x")
    assert framer.pending_bytes == 0


def test_pending_tail_over_limit_after_complete_lines_raises() -> None:
    framer = LineFramer(8)
    with pytest.raises(FrameTooLarge, match="unterminated line"):
        framer.feed(b"ok\n" + b"x" * 9)
    assert framer.pending_bytes == 0


def test_oversize_line_after_good_lines_in_same_chunk_raises() -> None:
    framer = LineFramer(8)
    with pytest.raises(FrameTooLarge, match="20 bytes"):
        framer.feed(b"fine\nalso-ok\n" + b"z" * 20 + b"\nlater\n")


def test_limit_counts_bytes_not_characters() -> None:
    framer = LineFramer(3)
    with pytest.raises(FrameTooLarge):
        framer.feed("éé\n".encode())  # 2 characters, 4 bytes
    assert LineFramer(4).feed("éé\n".encode()) == ["éé".encode()]


def test_newline_is_not_counted_against_the_limit() -> None:
    framer = LineFramer(1)
    assert framer.feed(b"a\nb\n\n") == [b"a", b"b", b""]


def test_pending_buffer_is_bounded_for_a_peer_that_never_sends_newline() -> None:
    limit = 1000
    framer = LineFramer(limit)
    for _ in range(limit // 7):
        assert framer.feed(b"q" * 7) == []
        assert framer.pending_bytes <= limit
    assert framer.pending_bytes == 994
    # It gives up as soon as the tail passes the bound, and drops what it held.
    with pytest.raises(FrameTooLarge, match="unterminated line of over 1001 bytes"):
        framer.feed(b"q" * 7)
    assert framer.pending_bytes == 0


def test_frame_too_large_is_a_protocol_error() -> None:
    framer = LineFramer(2)
    with pytest.raises(ProtocolError) as info:
        framer.feed(b"abc\n")
    assert isinstance(info.value, FrameTooLarge)
    assert isinstance(info.value, ClaudepoolError)
    assert info.value.code == "frame_too_large"
    assert info.value.status == 413


def test_frame_too_large_message_does_not_echo_the_line() -> None:
    framer = LineFramer(8)
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(SECRET.encode() + b"\n")
    assert SECRET not in str(info.value)
    framer = LineFramer(8)
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(SECRET.encode())
    assert SECRET not in str(info.value)


# -- finish and pending_bytes -------------------------------------------------------------------


def test_finish_returns_unterminated_tail_and_empties_buffer() -> None:
    framer = LineFramer(64)
    assert framer.feed(b'{"a":1}\n{"b":') == [b'{"a":1}']
    assert framer.pending_bytes == 5
    tail = framer.finish()
    assert tail == b'{"b":'
    assert type(tail) is bytes
    assert framer.pending_bytes == 0
    assert framer.finish() == b""


def test_finish_after_clean_stream_returns_empty() -> None:
    framer = LineFramer(64)
    framer.feed(b"a\nb\n")
    assert framer.finish() == b""


def test_finish_keeps_a_trailing_cr() -> None:
    framer = LineFramer(64)
    framer.feed(b"abc\r")
    assert framer.finish() == b"abc\r"


def test_framer_is_usable_after_finish() -> None:
    framer = LineFramer(64)
    framer.feed(b"old-tail")
    assert framer.finish() == b"old-tail"
    assert framer.feed(b"new\n") == [b"new"]


def test_pending_bytes_tracks_the_unfinished_tail() -> None:
    framer = LineFramer(64)
    assert framer.pending_bytes == 0
    framer.feed(b"abc")
    assert framer.pending_bytes == 3
    framer.feed(b"de")
    assert framer.pending_bytes == 5
    framer.feed(b"\nxy")
    assert framer.pending_bytes == 2
    framer.feed(b"\n")
    assert framer.pending_bytes == 0


# -- decode_object ------------------------------------------------------------------------------


def test_decode_object_returns_dict() -> None:
    assert decode_object(b'{"type":"result","usage":{"input_tokens":3},"list":[1,2]}') == {
        "type": "result",
        "usage": {"input_tokens": 3},
        "list": [1, 2],
    }


def test_decode_object_accepts_trailing_cr_and_whitespace() -> None:
    assert decode_object(b'{"a":1}\r') == {"a": 1}
    assert decode_object(b'  {"a":1}  ') == {"a": 1}


def test_decode_object_decodes_unicode() -> None:
    assert decode_object('{"t":"é😀"}'.encode()) == {"t": "é😀"}
    assert decode_object(b'{"t":"\\u00e9\\ud83d\\ude00"}') == {"t": "é😀"}


def test_decode_object_empty_object() -> None:
    assert decode_object(b"{}") == {}


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"   ",
        b"not json",
        b'{"a":1',
        b'{"a":1}}',
        b'{"a":1} {"b":2}',
        b"{'a':1}",
        b'{"a":NaN}',
        b'{"a":"\xff"}',
        b"\xef\xbb\xbf{}\x00",
    ],
)
def test_decode_object_rejects_invalid_json(line: bytes) -> None:
    with pytest.raises(CorruptFrame, match="not valid JSON"):
        decode_object(line)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"[1,2,3]", "list"),
        (b"[]", "list"),
        (b"42", "int"),
        (b"-1.5", "float"),
        (b'"a string"', "str"),
        (b"null", "NoneType"),
        (b"true", "bool"),
    ],
)
def test_decode_object_rejects_non_objects(line: bytes, kind: str) -> None:
    with pytest.raises(CorruptFrame, match="not an object") as info:
        decode_object(line)
    assert kind in str(info.value)


def test_corrupt_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_object(b"nope")
    assert isinstance(info.value, CorruptFrame)
    assert info.value.code == "corrupt_frame"
    assert info.value.status == 400


def test_invalid_json_message_reports_length() -> None:
    line = b"x" * 37
    with pytest.raises(CorruptFrame, match="line of 37 bytes"):
        decode_object(line)


@pytest.mark.parametrize(
    "line",
    [
        SECRET.encode(),
        ('{"api_key":"' + SECRET + '"').encode(),
        ('{"api_key":"' + SECRET + '"}trailing').encode(),
        ('{"' + SECRET + '" 1}').encode(),
        b"\xff" + SECRET.encode(),
        ('["' + SECRET + '"]').encode(),
        ('"' + SECRET + '"').encode(),
    ],
)
def test_decode_error_never_echoes_line_content(line: bytes) -> None:
    with pytest.raises(CorruptFrame) as info:
        decode_object(line)
    exc = info.value
    assert SECRET not in str(exc)
    assert SECRET not in repr(exc)
    assert all(SECRET not in str(arg) for arg in exc.args)
    # Nor in the traceback a logger would print (the orjson error, which holds the document, is hidden).
    assert SECRET not in "".join(traceback.format_exception(exc))


# -- properties ---------------------------------------------------------------------------------

_ALPHABET = b'abc{}":,\r\t \x00\xc3\xa9\xff'


def _random_lines(rng: random.Random, max_len: int) -> list[bytes]:
    count = rng.randint(0, 30)
    return [bytes(rng.choice(_ALPHABET) for _ in range(rng.randint(0, max_len))) for _ in range(count)]


def _random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    chunks: list[bytes] = []
    i = 0
    while i < len(data):
        if rng.random() < 0.1:
            chunks.append(b"")  # empty reads happen too
        size = rng.choice([1, 1, 2, 3, rng.randint(1, 16), rng.randint(1, 200)])
        chunks.append(data[i : i + size])
        i += size
    if rng.random() < 0.5:
        chunks.append(b"")
    return chunks


@pytest.mark.parametrize("seed", range(40))
def test_random_chunkings_reproduce_the_lines(seed: int) -> None:
    rng = random.Random(seed)
    lines = _random_lines(rng, max_len=40)
    terminated = rng.random() < 0.5
    data = b"\n".join(lines) + (b"\n" if terminated and lines else b"")
    limit = max((len(line) for line in lines), default=0) + rng.randint(0, 3)
    framer = LineFramer(max(limit, 1))

    out = feed_all(framer, _random_chunks(rng, data))
    tail = framer.finish()

    if terminated or not lines:
        assert out == lines
        assert tail == b""
    else:
        assert out == lines[:-1]
        assert tail == lines[-1]
    assert framer.pending_bytes == 0


@pytest.mark.parametrize("seed", range(40))
def test_random_chunkings_match_a_reference_under_a_tight_limit(seed: int) -> None:
    rng = random.Random(1000 + seed)
    lines = _random_lines(rng, max_len=30)
    data = b"\n".join(lines)  # the last line is unterminated
    limit = rng.randint(1, 30)
    framer = LineFramer(limit)
    oversize = [i for i, line in enumerate(lines) if len(line) > limit]

    out: list[bytes] = []
    raised = False
    try:
        for chunk in _random_chunks(rng, data):
            out.extend(framer.feed(chunk))
            assert framer.pending_bytes <= limit
    except FrameTooLarge:
        raised = True

    if oversize:
        assert raised
        # Everything handed out before the error is a clean prefix that stops short of the bad line.
        assert out == lines[: len(out)]
        assert len(out) <= oversize[0]
    else:
        assert not raised
        assert out == lines[:-1]
        assert framer.finish() == (lines[-1] if lines else b"")


def test_lenient_feed_reports_an_oversize_line_in_place_and_keeps_the_rest() -> None:
    framer = LineFramer(4)
    items = framer.feed_lenient(b"ok\ntoolong\nfine\n")
    assert items[0] == b"ok"
    assert isinstance(items[1], FrameTooLarge)
    assert items[2] == b"fine"
    assert len(items) == 3


def test_lenient_feed_skips_an_oversize_unterminated_line_until_its_newline() -> None:
    framer = LineFramer(4)
    items = framer.feed_lenient(b"a\nxxxxxx")
    assert items[0] == b"a"
    assert isinstance(items[1], FrameTooLarge)
    assert framer.pending_bytes == 0
    # The rest of the oversize line is discarded, not taken for a new line...
    assert framer.feed_lenient(b"yyyyyyyyyyyy") == []
    # ...and framing resumes right after its newline.
    assert framer.feed_lenient(b"zz\nnext\n") == [b"next"]
