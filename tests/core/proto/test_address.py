"""Address syntax (SPEC.md §4.1, step 1)."""

from __future__ import annotations

import pytest

from spt.core.errors import EXIT_USAGE, UsageError
from spt.core.proto.address import Address, parse_address


@pytest.mark.parametrize(
    ("text", "subnet", "endpoint_id", "node"),
    [
        ("sergey", None, "sergey", None),
        ("home:sergey", "home", "sergey", None),
        ("sergey@desktop", None, "sergey", "desktop"),
        ("home:sergey@bcead52b", "home", "sergey", "bcead52b"),
        ("Home:Sergey@DeskTop", "Home", "Sergey", "DeskTop"),
        ("a.b_c-d@my.host_1-x", None, "a.b_c-d", "my.host_1-x"),
        ("tmp.0badc0de", None, "tmp.0badc0de", None),
        ("x@" + "ab" * 32, None, "x", "ab" * 32),
        ("x@BEEF", None, "x", "BEEF"),
    ],
)
def test_valid_addresses_parse_into_their_parts(text, subnet, endpoint_id, node) -> None:
    assert parse_address(text) == Address(subnet=subnet, id=endpoint_id, node=node, text=text)


def test_the_address_keeps_the_text_as_typed() -> None:
    address = parse_address("HOME:Sergey")
    assert address.text == "HOME:Sergey"
    assert str(address) == "HOME:Sergey"


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        "home:",
        ":sergey",
        "sergey@",
        "@desktop",
        "a:b:c",
        "a@b@c",
        "a@b:c",
        "home net:sergey",
        "-home:sergey",
        "home:.sergey",
        "ser gey",
        "sergey/x",
        "sergey@desk top",
        "sergey@" + "a" * 65,  # not a label (over 63) and not a key prefix (over 64)
        "sergey@" + "ab" * 32 + "g",
        "s" * 65,
        "h" * 33 + ":sergey",
        "sergey\n",
    ],
)
def test_bad_syntax_is_bad_address_with_exit_2(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_address(text)
    err = info.value
    assert err.instance_token == "BAD_ADDRESS"
    assert err.instance_exit_code == EXIT_USAGE
    assert err.subject == text
    assert err.status_line().startswith(f"BAD_ADDRESS:{text}")
    assert err.message


def test_a_64_hex_node_qualifier_is_a_full_key() -> None:
    key = "0123456789abcdef" * 4
    assert parse_address(f"sergey@{key}").node == key
