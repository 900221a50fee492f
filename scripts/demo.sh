#!/usr/bin/env bash
# spt's main job on one machine: several nodes side by side, each step timed. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
