"""SPT_TRACE: one line per point, whatever a peer put in the names it carries."""

import subprocess
import sys


def test_a_point_naming_a_peers_frame_type_stays_one_line(tmp_path):
    out = tmp_path / "trace"
    code = "from spt.core import trace; trace.start('alpha'); trace.mark('quic', 'x\\n1 beta forged', 'in')"
    subprocess.run([sys.executable, "-c", code], check=True, env={"SPT_TRACE": str(out)}, timeout=30)
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    stamp, label, point = lines[0].split(" ", 2)
    assert (label, point) == ("alpha", "quic x\\n1 beta forged in") and stamp.isdigit()
