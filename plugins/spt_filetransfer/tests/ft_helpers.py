"""Helpers for the file-transfer tests: two real nodes in one subnet with a perch to send to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3

from spt.testing.nodes import DEFAULT_CONFIG, Node, NodeFactory, fresh_code
from spt.testing.traffic import listed
from spt.testing.wait import wait_for

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n"
PERCH = "bob"


def join_pair(a: Node, b: Node, perch: str = PERCH) -> None:
    """Put started nodes `a` and `b` in subnet `home`, make `perch` on `b`, wait until `a` sees it."""
    a.cli("subnet", "create", "home", check=True)
    code = fresh_code(a, "home", margin=6)  # a join that starts near the 30-s step is not caught by it
    b.cli("subnet", "join", "home", "--code", code, "--peer", a.address, check=True)
    b.cli("ready", perch, "--once", "--timeout", "0.1")
    wait_for(lambda: listed(a, perch), what=f"{perch}'s row on {a.name}")


def make_pair(factory: NodeFactory, *, a_env=None, b_start=True) -> tuple[Node, Node]:
    a = factory("a", label="alpha", config=CONFIG, env=a_env)
    b = factory("b", label="beta", config=CONFIG, start=b_start)
    if b_start:
        join_pair(a, b)
    return a, b


def file_hash(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def random_file(path: Path, mib: int) -> Path:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(mib):
            fh.write(i.to_bytes(8, "big") + block[8:])  # every chunk distinct
    return path


def status(node: Node, tid: str | None = None) -> list[dict]:
    args = ["file", "status", "--json"] + ([tid] if tid else [])
    result = node.cli(*args)
    if result.returncode != 0:
        return []
    return json.loads(result.stdout)["transfers"]


def one(node: Node, tid: str) -> dict:
    found = status(node, tid)
    return found[0] if found else {}


def inbox(node: Node, perch: str = PERCH) -> Path:
    return node.home / "endpoints" / perch / "inbox"
