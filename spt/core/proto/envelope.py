"""The message envelope printed by `spt ready` and `spt ring` (SPEC.md §3.4). Pure.

What lives here: the escaping rules (`escape`, `unescape`), the body and JSON-payload checks
(`check_body`, `compact_json`), rendering one event into `<EVENT …>` lines or, past 65,536 bytes,
`<EVENT-PART …>` lines (`render_event`), and parsing lines back into events, parts reassembled
(`EventParser`, `parse_events`).

Rules this module keeps:
1. `type` and `from` come first, in that order; other attributes follow in the caller's order.
2. Escaping order is `&`, `<`, `>`, `"`, then `\\n`→`<br>`; decoding reverses it with `&amp;` last.
   Only `\\n` becomes `<br>`: a `\\r` stays raw, so readers split on `\\n` alone.
3. A line is measured in UTF-8 bytes without its newline. Chunking splits the raw body at
   character boundaries and encodes each chunk on its own, so no escape is ever cut; `json`
   rides on part 1 only. The one envelope that may exceed the limit is part 1 when the escaped
   JSON payload alone does not fit (a 64 KiB payload can escape to more than 64 KiB).
4. Bad user input raises UsageError (`BAD_BODY`, `BAD_JSON`, exit 2); bad lines from elsewhere
   raise RemoteProtocolError; a caller asking for an impossible envelope gets LocalProtocolError.

What must not: I/O or randomness. The part-group id arrives as `chunk_id`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from spt.core.errors import LocalProtocolError, RemoteProtocolError, UsageError
from spt.core.proto.body import MAX_BODY_BYTES, check_body

MAX_ENVELOPE_BYTES: Final = 65_536
MAX_JSON_BYTES: Final = 64 * 1024
MAX_PARTS: Final = 4096

EVENT_TAG: Final = "EVENT"
PART_TAG: Final = "EVENT-PART"
RESERVED_ATTRS: Final = frozenset({"type", "from", "seq"})

_NAME: Final = r"[A-Za-z_][A-Za-z0-9_.-]*"
_NAME_RE: Final = re.compile(_NAME)
_ATTR_TEXT: Final = r'[^"<>]*(?:<br>[^"<>]*)*'
_LINE_RE: Final = re.compile(
    rf'<(?P<tag>{PART_TAG}|{EVENT_TAG})(?P<attrs>(?: {_NAME}="{_ATTR_TEXT}")*)>'
    r"(?P<body>[^<>]*(?:<br>[^<>]*)*)</(?P=tag)>"
)
_ATTR_RE: Final = re.compile(rf' ({_NAME})="({_ATTR_TEXT})"')
_SEQ_RE: Final = re.compile(r"([1-9][0-9]*)/([1-9][0-9]*)")
_CHUNK_ID_RE: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")


def escape(text: str) -> str:
    """Encode a body or attribute value: `&` `<` `>` `"` to entities, then `\\n` to `<br>`."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\n", "<br>")
    )


def unescape(text: str) -> str:
    """Decode `escape` output: `<br>` first, then `&lt;` `&gt;` `&quot;`, and `&amp;` last."""
    return (
        text.replace("<br>", "\n")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", '"')
        .replace("&amp;", "&")
    )


def compact_json(text: str) -> str:
    """`--json-payload` compacted (no whitespace), if it is valid JSON of at most 64 KiB.

    Raises UsageError BAD_JSON otherwise. NaN and Infinity are not JSON and are refused.
    """
    # Refuse absurd input before parsing it; compaction only ever shrinks valid JSON this much.
    if len(text) > 16 * MAX_JSON_BYTES:
        raise UsageError("BAD_JSON", "", f"the JSON payload is over {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
        compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(compact.encode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError are ValueErrors
        raise UsageError("BAD_JSON", "", f"the JSON payload is not valid JSON: {exc}") from exc
    if size > MAX_JSON_BYTES:
        raise UsageError("BAD_JSON", "", f"the JSON payload is {size} bytes compacted, over 64 KiB")
    return compact


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True, slots=True)
class Event:
    """One delivered event. `attrs` are the attributes after `type` and `from`, in order."""

    type: str
    from_: str
    body: str
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def ring(self) -> bool:
        """True when the sender is blocked waiting for a reply (`ring="1"`)."""
        return self.attrs.get("ring") == "1"

    @property
    def json(self) -> str | None:
        """The compacted `--json-payload`, or None."""
        return self.attrs.get("json")


# --- rendering ------------------------------------------------------------------------------


def _line(tag: str, attrs: Iterable[tuple[str, str]], escaped_body: str) -> str:
    rendered = "".join(f' {name}="{escape(value)}"' for name, value in attrs)
    return f"<{tag}{rendered}>{escaped_body}</{tag}>"


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _fit(body: str, start: int, capacity: int) -> int:
    """How many characters of `body` from `start` fit in `capacity` bytes once escaped."""
    hi = min(len(body) - start, max(capacity, 0))  # every character costs at least one byte
    if _size(escape(body[start : start + hi])) <= capacity:
        return hi
    lo = 0  # invariant: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _size(escape(body[start : start + mid])) <= capacity:
            lo = mid
        else:
            hi = mid
    return lo


def _split(body: str, first_capacity: int, capacity: int) -> list[str]:
    chunks: list[str] = []
    pos = 0
    while pos < len(body) or not chunks:
        room = first_capacity if not chunks else capacity
        count = _fit(body, pos, room)
        if count == 0 and chunks:
            raise LocalProtocolError("", "the envelope attributes leave no room for the body in 64 KiB")
        chunks.append(body[pos : pos + count])
        pos += count
        if len(chunks) > MAX_PARTS:
            raise LocalProtocolError("", f"a body would need more than {MAX_PARTS} parts")
    return chunks


def render_event(
    type: str,
    from_: str,
    body: str,
    *,
    attrs: Mapping[str, str] | None = None,
    chunk_id: str,
) -> list[str]:
    """The envelope lines (no newlines) for one event: one `<EVENT>` line, or `<EVENT-PART>` lines.

    `attrs` follow `type` and `from` in the given order; a `json` value is checked and compacted
    here (BAD_JSON). The body is checked (BAD_BODY). `chunk_id` becomes the `id` of the parts
    and is used only when the event has to be split.
    """
    text = check_body(body)
    extra = dict(attrs or {})
    for name in extra:
        if name in RESERVED_ATTRS or not _NAME_RE.fullmatch(name):
            raise LocalProtocolError(name, "not a usable envelope attribute name")
    if "json" in extra:
        extra["json"] = compact_json(extra["json"])
    head = [("type", type), ("from", from_), *extra.items()]
    whole = _line(EVENT_TAG, head, escape(text))
    if _size(whole) <= MAX_ENVELOPE_BYTES:
        return [whole]

    if not _CHUNK_ID_RE.fullmatch(chunk_id):
        raise LocalProtocolError(chunk_id, "a part-group id is 1–64 letters, digits, '_' or '-'")
    later_head = [(k, v) for k, v in head if k != "json"]
    width = 1
    while True:
        # Size the headers for the widest `seq` of this digit count, so every part fits.
        widest = f"{'9' * width}/{'9' * width}"
        first = _size(_line(PART_TAG, [("seq", widest), ("id", chunk_id), *head], ""))
        later = _size(_line(PART_TAG, [("seq", widest), ("id", chunk_id), *later_head], ""))
        chunks = _split(text, MAX_ENVELOPE_BYTES - first, MAX_ENVELOPE_BYTES - later)
        if len(str(len(chunks))) <= width:
            break
        width += 1
    if len(chunks) == 1:
        return [whole]  # only the JSON payload overflows; splitting the body cannot help
    n = len(chunks)
    return [
        _line(PART_TAG, [("seq", f"{i}/{n}"), ("id", chunk_id), *(head if i == 1 else later_head)], escape(c))
        for i, c in enumerate(chunks, start=1)
    ]


# --- parsing --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Group:
    total: int
    parts: dict[int, tuple[list[tuple[str, str]], str]] = field(default_factory=dict)


class EventParser:
    """Feed envelope lines one at a time; complete events come out, parts reassembled.

    Parts are grouped by `id` and may arrive in any order; the event is returned when its last
    missing part arrives. Malformed lines raise RemoteProtocolError.
    """

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}

    @property
    def pending(self) -> bool:
        """True while some part group is incomplete."""
        return bool(self._groups)

    def feed(self, line: str) -> Event | None:
        """Parse one line (a trailing newline is ignored); returns an event once it is complete."""
        line = line.rstrip("\r\n")
        match = _LINE_RE.fullmatch(line)
        if match is None:
            raise RemoteProtocolError(line[:80], "not an <EVENT> or <EVENT-PART> line")
        pairs = [(name, unescape(value)) for name, value in _ATTR_RE.findall(match.group("attrs"))]
        body = unescape(match.group("body"))
        if match.group("tag") == EVENT_TAG:
            return _event(pairs, body, line)
        return self._part(pairs, body, line)

    def _part(self, pairs: list[tuple[str, str]], body: str, line: str) -> Event | None:
        if len(pairs) < 2 or pairs[0][0] != "seq" or pairs[1][0] != "id":
            raise RemoteProtocolError(line[:80], 'an <EVENT-PART> starts with seq="i/n" and id')
        seq = _SEQ_RE.fullmatch(pairs[0][1])
        if seq is None:
            raise RemoteProtocolError(pairs[0][1], 'seq is "i/n"')
        index, total = int(seq.group(1)), int(seq.group(2))
        if index > total or total > MAX_PARTS:
            raise RemoteProtocolError(pairs[0][1], f"seq i/n needs 1 ≤ i ≤ n ≤ {MAX_PARTS}")
        group_id, rest = pairs[1][1], pairs[2:]
        group = self._groups.setdefault(group_id, _Group(total))
        if group.total != total or index in group.parts:
            raise RemoteProtocolError(group_id, f"part {index}/{total} does not fit its group")
        if index != 1 and any(name == "json" for name, _ in rest):
            raise RemoteProtocolError(group_id, "json belongs on part 1 only")
        group.parts[index] = (rest, body)
        if len(group.parts) < total:
            return None
        del self._groups[group_id]
        first_attrs = group.parts[1][0]
        head = first_attrs[:2]
        for i in range(2, total + 1):
            if group.parts[i][0][:2] != head:
                raise RemoteProtocolError(group_id, "parts of one event disagree on type or from")
        text = "".join(group.parts[i][1] for i in range(1, total + 1))
        if _size(text) > MAX_BODY_BYTES:
            raise RemoteProtocolError(group_id, f"reassembled body is over {MAX_BODY_BYTES} bytes")
        return _event(first_attrs, text, line)


def _event(pairs: list[tuple[str, str]], body: str, line: str) -> Event:
    if len(pairs) < 2 or pairs[0][0] != "type" or pairs[1][0] != "from":
        raise RemoteProtocolError(line[:80], "an event's first attributes are type and from")
    attrs = dict(pairs[2:])
    if len(attrs) != len(pairs) - 2:
        raise RemoteProtocolError(line[:80], "an attribute appears twice")
    return Event(type=pairs[0][1], from_=pairs[1][1], body=body, attrs=attrs)


def parse_events(lines: Iterable[str]) -> list[Event]:
    """Every event in `lines` (blank lines skipped), parts reassembled.

    Raises RemoteProtocolError for a malformed line, or when a part group is left incomplete.
    """
    parser = EventParser()
    events: list[Event] = []
    for line in lines:
        if not line.strip("\r\n"):
            continue
        event = parser.feed(line)
        if event is not None:
            events.append(event)
    if parser.pending:
        raise RemoteProtocolError("", "the lines end inside an <EVENT-PART> group")
    return events
