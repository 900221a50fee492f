"""No silent skips: tests that need root or the network-namespace lab (pytest plugin part).

Two markers, registered wherever spt is installed:

- ``@pytest.mark.root``: the test needs root (elevation, switching uids, mounting).
- ``@pytest.mark.lab`` (``@pytest.mark.netns`` is the same): the test builds a netns lab
  (`spt.testing.netns`), which needs root, CAP_NET_ADMIN, CAP_SYS_ADMIN, `ip` and `iptables`.

As a normal user both kinds skip, folded into ONE summary line (``-rs``) that says how many were
left out and why. As root they are required: a lab that cannot be built fails the test with the
reason (missing capability or tool), and any required test that skips anyway (a ``pytest.skip``
inside it, a ``skipif`` that held) is turned into a failure. CI runs as root, so it cannot pass
without the lab.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

ROOT_MARKER = "root"
LAB_MARKERS = ("lab", "netns")
NOT_ROOT = "needs root (netns lab, elevation); run as root, as CI does, to include these tests"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def requirement(item: pytest.Item) -> str | None:
    """"lab", "root" or None: what `item` is marked as needing."""
    if any(item.get_closest_marker(name) is not None for name in LAB_MARKERS):
        return "lab"
    if item.get_closest_marker(ROOT_MARKER) is not None:
        return "root"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "root: needs root; skips (one summary line) as a normal user, must run as root"
    )
    for name in LAB_MARKERS:
        config.addinivalue_line(
            "markers", f"{name}: builds a netns lab; skips as a normal user, fails as root when the lab "
            "cannot be built",
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if is_root():
        return
    skip = pytest.mark.skip(reason=NOT_ROOT)
    for item in items:
        if requirement(item) is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if is_root() and requirement(item) == "lab":
        from spt.testing.netns import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            pytest.fail(f"the netns lab is required when running as root, and cannot run: {reason}",
                        pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    need = requirement(item)
    if need is None and report.skipped and not is_root() and NOT_ROOT in str(report.longrepr):
        need = "root"  # the test kit met an elevated command (spt.testing.nodes.skip_unless_root)
    if need is None or not report.skipped or hasattr(report, "wasxfail"):
        return
    if is_root():
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a test marked `{need}` must run as root, and it skipped: {why}"
    else:
        # one fixed location and reason, so `-rs` folds them all into a single line
        report.longrepr = (__file__, None, NOT_ROOT)  # type: ignore[assignment]
