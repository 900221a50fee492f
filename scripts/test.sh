#!/usr/bin/env bash
# The test command: set-up, then lint, type checks, layering, and every test (network-namespace
# tests included). As root (CI) the netns lab is required: a lab that cannot be built fails the
# run with the reason, and a test marked `root` or `lab` that skips fails (spt.testing.required).
# As a normal user those tests skip, folded into one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check spt plugins tests bench scripts examples
echo "== mypy"; mypy spt plugins/spt_relay_fallback/spt_relay_fallback plugins/spt_filetransfer/spt_filetransfer plugins/spt_selfupdate/spt_selfupdate
echo "== import layers"; lint-imports
if [ "$(id -u)" = 0 ]; then
    echo "== netns lab (required as root)"; python -m spt.testing.labcheck
else
    echo "== netns lab: not root, so tests marked root/lab skip (one summary line below)"
fi
# Three workers on two cores: most tests wait on sockets and timers, not the CPU. A file's tests
# stay on one worker, in order (some share a module-scoped subnet).
echo "== pytest"; python -m pytest -q -rfEs -p no:cacheprovider -n 3 --dist loadfile "$@"
echo "== air-gapped build (no relay distribution): scripts/airgap.sh"; bash scripts/airgap.sh
