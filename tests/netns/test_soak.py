"""The 60-second soak (bench/soak.py, issue 11 must-show 6): three nodes, a steady message ring,
one link flapping; RSS and fds flat within 10 %, spools drained, 0 lost, 0 duplicated."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from soak import check, run_soak

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_a_minute_of_traffic_with_a_flapping_link_stays_flat_and_loses_nothing(netns_lab):
    out = io.StringIO()
    result = run_soak(netns_lab(), seconds=60, rate=100, flap_every=15, flap_down=4, report_every=15, out=out)
    print(out.getvalue(), *result.notes, sep="\n")
    assert result.flaps >= 3
    assert len(result.samples) >= 4
    assert result.sent > 0 and result.samples[-1].delivered > 0
    assert check(result) == [], out.getvalue()
