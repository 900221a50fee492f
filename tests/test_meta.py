"""Meta-tests: imports are clean and cheap, and the layering holds."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import spt

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(spt.__path__, "spt."))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_cleanly_with_warnings_as_errors(module):
    subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"], check=True, capture_output=True)


def test_cli_import_loads_no_heavy_modules():
    code = (
        "import sys, spt.cli, spt.cli._state, spt.core.ipc\n"
        "heavy = [m for m in ('aioquic', 'cryptography', 'zeroconf', 'asyncio', 'spake2', 'stevedore', 'pluggy')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == ""


FORBIDDEN_IN_PROTO = {"asyncio", "socket", "selectors", "time", "aioquic.asyncio"}


@pytest.mark.parametrize("path", sorted((ROOT / "spt/core/proto").glob("*.py")), ids=lambda p: p.name)
def test_sans_io_core_touches_no_sockets_or_clocks(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not (imported & FORBIDDEN_IN_PROTO)


def test_core_never_imports_the_plugin_distributions():
    for path in (ROOT / "spt").rglob("*.py"):
        text = path.read_text()
        for dist in ("spt_relay_fallback", "spt_filetransfer", "spt_selfupdate"):
            assert f"import {dist}" not in text and f"from {dist}" not in text, path


def test_no_log_call_passes_a_logrecord_attribute_as_an_extra_field():
    # logging raises KeyError for `extra={"msg": …}` and the like, but only when the record is
    # made: a debug line or a rare warning then crashes the code path it reports on
    import logging

    reserved = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
    found = []
    for path in [*(ROOT / "spt").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "extra" and isinstance(kw.value, ast.Dict):
                        found += [
                            f"{path.relative_to(ROOT)}:{node.lineno}: {k.value}"
                            for k in kw.value.keys
                            if isinstance(k, ast.Constant) and k.value in reserved
                        ]
    assert found == []
