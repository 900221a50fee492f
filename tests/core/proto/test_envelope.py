"""The message envelope (SPEC.md §3.4): escaping, chunking, parsing, limits."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spt.core.errors import EXIT_USAGE, LocalProtocolError, RemoteProtocolError, UsageError
from spt.core.proto import envelope
from spt.core.proto.envelope import (
    MAX_BODY_BYTES,
    MAX_ENVELOPE_BYTES,
    Event,
    EventParser,
    check_body,
    compact_json,
    escape,
    parse_events,
    render_event,
    unescape,
)

SPEC_LINE = '<EVENT type="msg" from="alice@laptop">line one<br>a &lt;b&gt; &amp; &quot;c&quot;</EVENT>'
CID = "9f2c41d07a5be318"

# Text built from tokens that break naive escaping, mixed with arbitrary characters.
tricky = st.lists(
    st.one_of(
        st.sampled_from(
            ["<br>", "&lt;", "&amp;", "&quot;", "</EVENT>", "<EVENT-PART", "\n", "\r", '"', "&", "<", ">"]
        ),
        st.characters(blacklist_categories=("Cs",)),  # lone surrogates are not UTF-8: BAD_BODY
    ),
    max_size=60,
).map("".join)


def size(line: str) -> int:
    return len(line.encode("utf-8"))


# --- escaping -------------------------------------------------------------------------------


def test_the_spec_example_line_byte_for_byte() -> None:
    lines = render_event("msg", "alice@laptop", 'line one\na <b> & "c"', chunk_id=CID)
    assert lines == [SPEC_LINE]
    assert parse_events(lines) == [Event("msg", "alice@laptop", 'line one\na <b> & "c"')]


def test_escape_order_is_amp_lt_gt_quot_then_newline() -> None:
    assert escape('&<>"\n') == "&amp;&lt;&gt;&quot;<br>"
    assert escape("&lt;") == "&amp;lt;"
    assert escape("<br>") == "&lt;br&gt;"


def test_amp_is_decoded_last() -> None:
    assert unescape("&amp;lt;") == "&lt;"
    assert unescape("&amp;amp;") == "&amp;"
    assert unescape("&lt;br&gt;") == "<br>"
    assert unescape("a<br>b") == "a\nb"


def test_a_closing_tag_cannot_appear_inside_a_body() -> None:
    (line,) = render_event("msg", "a", "x</EVENT>y", chunk_id=CID)
    assert line.count("</EVENT>") == 1
    assert line.endswith("</EVENT>")


def test_carriage_returns_stay_raw() -> None:
    (line,) = render_event("msg", "a", "x\r\ny", chunk_id=CID)
    assert ">x\r<br>y</EVENT>" in line


@given(tricky)
def test_escape_round_trips(text: str) -> None:
    encoded = escape(text)
    assert "\n" not in encoded
    assert '"' not in encoded
    assert "<" not in encoded.replace("<br>", "")
    assert unescape(encoded) == text


@given(st.text())
def test_escape_round_trips_any_text(text: str) -> None:
    assert unescape(escape(text)) == text


# --- attributes -----------------------------------------------------------------------------


def test_type_and_from_come_first_then_attributes_in_order() -> None:
    (line,) = render_event(
        "file", "bob", "see", attrs={"ring": "1", "id": "t1", "name": 'a "b".txt'}, chunk_id=CID
    )
    assert line == '<EVENT type="file" from="bob" ring="1" id="t1" name="a &quot;b&quot;.txt">see</EVENT>'
    (event,) = parse_events([line])
    assert event.ring
    assert event.attrs == {"ring": "1", "id": "t1", "name": 'a "b".txt'}


def test_json_payload_is_compacted_and_escaped() -> None:
    (line,) = render_event("msg", "bob", "hi", attrs={"json": '{ "k" : [1, 2],\n "s": "<x>" }'}, chunk_id=CID)
    json_attr = "{&quot;k&quot;:[1,2],&quot;s&quot;:&quot;&lt;x&gt;&quot;}"
    assert line == f'<EVENT type="msg" from="bob" json="{json_attr}">hi</EVENT>'
    (event,) = parse_events([line])
    assert event.json == '{"k":[1,2],"s":"<x>"}'
    assert json.loads(event.json or "") == {"k": [1, 2], "s": "<x>"}


@pytest.mark.parametrize("name", ["type", "from", "seq", "bad name", "x=", ""])
def test_reserved_or_unusable_attribute_names_are_our_bug(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        render_event("msg", "bob", "hi", attrs={name: "v"}, chunk_id=CID)


@given(
    type_=st.text(min_size=1, max_size=10),
    from_=tricky,
    body=tricky,
    attrs=st.dictionaries(st.sampled_from(["ring", "id", "name", "size", "path", "x.y", "reply_to"]), tricky),
)
def test_render_then_parse_round_trips(type_: str, from_: str, body: str, attrs: dict[str, str]) -> None:
    lines = render_event(type_, from_, body, attrs=attrs, chunk_id=CID)
    assert len(lines) == 1
    assert "\n" not in lines[0]
    assert parse_events(lines) == [Event(type_, from_, body, attrs)]


# --- chunking -------------------------------------------------------------------------------


def test_a_line_of_exactly_the_limit_is_not_split() -> None:
    overhead = size(render_event("msg", "alice", "", chunk_id=CID)[0])
    body = "x" * (MAX_ENVELOPE_BYTES - overhead)
    (line,) = render_event("msg", "alice", body, chunk_id=CID)
    assert size(line) == MAX_ENVELOPE_BYTES
    lines = render_event("msg", "alice", body + "x", chunk_id=CID)
    assert len(lines) == 2
    assert lines[0].startswith(f'<EVENT-PART seq="1/2" id="{CID}" type="msg" from="alice">')
    assert lines[1].startswith(f'<EVENT-PART seq="2/2" id="{CID}" type="msg" from="alice">')
    assert all(line.endswith("</EVENT-PART>") for line in lines)


def test_a_large_body_is_split_into_parts_that_each_fit() -> None:
    body = ('é"&<\n€😀' * 40_000)[:300_000]
    lines = render_event("msg", "alice", body, attrs={"ring": "1", "json": '{"a": 1}'}, chunk_id=CID)
    assert len(lines) > 1
    assert all(size(line) <= MAX_ENVELOPE_BYTES for line in lines)
    assert 'json="' in lines[0]
    assert all('json="' not in line for line in lines[1:])
    assert all(' ring="1"' in line for line in lines)
    (event,) = parse_events(lines)
    assert event == Event("msg", "alice", body, {"ring": "1", "json": '{"a":1}'})


def test_a_one_mebibyte_body_round_trips() -> None:
    body = "a&\n" * (MAX_BODY_BYTES // 3)
    lines = render_event("msg", "alice", body, chunk_id=CID)
    assert all(size(line) <= MAX_ENVELOPE_BYTES for line in lines)
    assert parse_events(lines)[0].body == body


def test_each_part_decodes_on_its_own_so_no_escape_is_cut() -> None:
    body = "&" * 70_000  # every character escapes to five bytes
    lines = render_event("msg", "alice", body, chunk_id=CID)
    bodies = [line[line.index(">") + 1 : line.rindex("</EVENT-PART>")] for line in lines]
    assert all(b.replace("&amp;", "") == "" for b in bodies)
    assert "".join(unescape(b) for b in bodies) == body


def test_the_seq_field_grows_past_nine_parts() -> None:
    with mock.patch.object(envelope, "MAX_ENVELOPE_BYTES", 120):
        lines = render_event("msg", "alice", "0123456789" * 60, chunk_id=CID)
        assert len(lines) >= 10
        assert all(size(line) <= 120 for line in lines)
        assert f'seq="10/{len(lines)}"' in lines[9]
        assert parse_events(lines)[0].body == "0123456789" * 60


@settings(max_examples=150)
@given(body=tricky, json_payload=st.one_of(st.none(), st.just('{"k": "v"}')), limit=st.integers(140, 400))
def test_chunked_events_round_trip_and_fit(body: str, json_payload: str | None, limit: int) -> None:
    attrs = {"ring": "1"} if json_payload is None else {"json": json_payload}
    with mock.patch.object(envelope, "MAX_ENVELOPE_BYTES", limit):
        lines = render_event("msg", "a&b", body, attrs=attrs, chunk_id=CID)
    assert all(size(line) <= limit for line in lines)
    expected_attrs = attrs if json_payload is None else {"json": '{"k":"v"}'}
    assert parse_events(lines) == [Event("msg", "a&b", body, expected_attrs)]


def test_parts_arriving_out_of_order_reassemble() -> None:
    lines = render_event("msg", "alice", "x" * 200_000, chunk_id=CID)
    parser = EventParser()
    results = [parser.feed(line) for line in reversed(lines)]
    assert results[:-1] == [None] * (len(lines) - 1)
    assert results[-1] == Event("msg", "alice", "x" * 200_000)
    assert not parser.pending


def test_two_groups_are_kept_apart_by_id() -> None:
    one = render_event("msg", "alice", "a" * 70_000, chunk_id="one")
    two = render_event("msg", "bob", "b" * 70_000, chunk_id="two")
    events = parse_events([one[0], two[0], one[1], two[1]])
    assert [e.from_ for e in events] == ["alice", "bob"]


def test_an_incomplete_group_is_an_error() -> None:
    lines = render_event("msg", "alice", "x" * 70_000, chunk_id=CID)
    with pytest.raises(RemoteProtocolError):
        parse_events(lines[:-1])


def test_a_chunk_id_is_needed_only_to_split() -> None:
    assert render_event("msg", "alice", "short", chunk_id="") == [
        '<EVENT type="msg" from="alice">short</EVENT>'
    ]
    with pytest.raises(LocalProtocolError):
        render_event("msg", "alice", "x" * 70_000, chunk_id="")


def test_the_spec_part_example_shape() -> None:
    lines = render_event("msg", "alice", "z" * 150_000, chunk_id=CID)
    assert len(lines) == 3
    assert lines[0].startswith('<EVENT-PART seq="1/3" id="9f2c41d07a5be318" type="msg" from="alice">')


# --- parsing errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "TIMEOUT",
        '<EVENT type="msg" from="a">x</EVENT-PART>',
        '<EVENT from="a" type="msg">x</EVENT>',
        '<EVENT type="msg">x</EVENT>',
        '<EVENT type="msg" from="a">x<y</EVENT>',
        '<EVENT type="msg" from="a">x>y</EVENT>',
        '<EVENT type="msg" from="a" ring="1" ring="1">x</EVENT>',
        '<EVENT-PART id="x" seq="1/2" type="msg" from="a">x</EVENT-PART>',
        '<EVENT-PART seq="0/2" id="x" type="msg" from="a">x</EVENT-PART>',
        '<EVENT-PART seq="3/2" id="x" type="msg" from="a">x</EVENT-PART>',
        '<EVENT-PART seq="2/2" id="x" type="msg" from="a" json="1">x</EVENT-PART>',
    ],
)
def test_malformed_lines_are_remote_errors(line: str) -> None:
    with pytest.raises(RemoteProtocolError):
        EventParser().feed(line)


def test_blank_lines_and_trailing_newlines_are_ignored() -> None:
    assert parse_events(["", SPEC_LINE + "\n", "\n"]) == [
        Event("msg", "alice@laptop", 'line one\na <b> & "c"')
    ]


def test_parts_must_agree_on_type_and_from() -> None:
    lines = render_event("msg", "alice", "x" * 70_000, chunk_id=CID)
    forged = lines[1].replace('from="alice"', 'from="mallory"')
    with pytest.raises(RemoteProtocolError):
        parse_events([lines[0], forged])


def test_a_repeated_part_is_an_error() -> None:
    lines = render_event("msg", "alice", "x" * 200_000, chunk_id=CID)
    with pytest.raises(RemoteProtocolError):
        parse_events([lines[0], lines[0]])


# --- limits ---------------------------------------------------------------------------------


def assert_usage(exc: pytest.ExceptionInfo[UsageError], token: str) -> None:
    assert exc.value.instance_token == token
    assert exc.value.instance_exit_code == EXIT_USAGE


def test_a_body_over_one_mebibyte_is_bad_body() -> None:
    check_body("x" * MAX_BODY_BYTES)
    with pytest.raises(UsageError) as info:
        render_event("msg", "a", "x" * (MAX_BODY_BYTES + 1), chunk_id=CID)
    assert_usage(info, "BAD_BODY")
    with pytest.raises(UsageError) as info:
        check_body("é" * (MAX_BODY_BYTES // 2 + 1))  # counted in bytes, not characters
    assert_usage(info, "BAD_BODY")


def test_a_body_that_is_not_utf8_is_bad_body() -> None:
    with pytest.raises(UsageError) as info:
        check_body(b"ok \xff\xfe")
    assert_usage(info, "BAD_BODY")
    with pytest.raises(UsageError) as info:
        render_event("msg", "a", "lone \udc80 surrogate", chunk_id=CID)
    assert_usage(info, "BAD_BODY")
    assert check_body("caf\u00e9".encode()) == "café"


@pytest.mark.parametrize("bad", ["", "{", "{'a': 1}", "NaN", "[Infinity]", "1e400", "[1,]", '{"a": 1} x'])
def test_invalid_json_payloads_are_bad_json(bad: str) -> None:
    with pytest.raises(UsageError) as info:
        compact_json(bad)
    assert_usage(info, "BAD_JSON")
    with pytest.raises(UsageError):
        render_event("msg", "a", "b", attrs={"json": bad}, chunk_id=CID)


def test_json_payload_limit_is_64_kib_compacted() -> None:
    fits = json.dumps(["x" * (64 * 1024 - 4)])  # ["xxx…"] is exactly 64 KiB
    assert len(compact_json(fits)) == 64 * 1024
    spaced = fits.replace("[", "[ " + " " * 5000)  # whitespace does not count
    assert compact_json(spaced) == fits
    with pytest.raises(UsageError) as info:
        compact_json(json.dumps(["x" * (64 * 1024 - 3)]))
    assert_usage(info, "BAD_JSON")


def test_a_json_payload_that_alone_overflows_rides_on_part_one() -> None:
    payload = json.dumps(['"' * 20_000])  # escapes to well over 64 KiB
    lines = render_event("msg", "a", "x" * 70_000, attrs={"json": payload}, chunk_id=CID)
    assert lines[0].startswith('<EVENT-PART seq="1/')
    assert all(size(line) <= MAX_ENVELOPE_BYTES for line in lines[1:])
    (event,) = parse_events(lines)
    assert event.body == "x" * 70_000
    assert event.json == compact_json(payload)
