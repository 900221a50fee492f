#!/usr/bin/env bash
# The test command: set-up, then lint, type checks, layering, and every test (network-namespace
# tests included; they need root, which CI has).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check spt plugins tests bench scripts examples
echo "== mypy"; mypy spt plugins/spt_relay_fallback/spt_relay_fallback plugins/spt_filetransfer/spt_filetransfer plugins/spt_selfupdate/spt_selfupdate
echo "== import layers"; lint-imports
echo "== pytest"; python -m pytest -q -p no:cacheprovider "$@"
