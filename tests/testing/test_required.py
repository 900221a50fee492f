"""No silent skips (spt.testing.required): tests marked `root` / `lab` are required as root and
skip, folded into one summary line, as a normal user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

CASES = '''
import pytest

@pytest.mark.root
def test_root_that_skips():
    pytest.skip("no tmpfs here")

@pytest.mark.lab
def test_lab(netns_lab):
    assert netns_lab().lan(1).hosts == ["h1"]

@pytest.mark.netns
def test_netns_alias():
    pass

@pytest.mark.root
@pytest.mark.skipif(True, reason="a skipif that held")
def test_root_skipif():
    pass

def test_plain():
    pass

@pytest.mark.skip(reason="an ordinary skip")
def test_plain_skip():
    pass
'''


def run_pytest(folder: Path, *, as_user: int | None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(folder)]
    if as_user is not None:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run pytest as another user"
        argv = [setpriv, f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
    return subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.fixture
def cases() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="spt-required-"))  # readable by the normal user too
    try:
        folder.chmod(0o755)
        (folder / "pytest.ini").write_text("[pytest]\n")
        (folder / "test_cases.py").write_text(CASES)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_as_root_a_marked_test_that_skips_fails(cases: Path) -> None:
    result = run_pytest(cases, as_user=None)
    out = result.stdout
    assert result.returncode == 1, out
    assert "FAILED test_cases.py::test_root_that_skips" in out
    assert "ERROR test_cases.py::test_root_skipif" in out  # skipped at setup: an error there
    assert "a test marked `root` must run as root, and it skipped" in out
    assert "1 failed, 3 passed, 1 skipped, 1 error" in out, out


def test_as_a_normal_user_root_tests_skip_in_one_summary_line(cases: Path) -> None:
    result = run_pytest(cases, as_user=65534)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    summary = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(summary) == 2, out  # ours (4 folded) and the ordinary skip
    assert any(line.startswith("SKIPPED [4] ") and "needs root" in line for line in summary), out
    assert "1 passed, 5 skipped" in out, out
