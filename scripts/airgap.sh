#!/usr/bin/env bash
# The air-gapped build for real (SPEC §7.7, issue 11): a virtualenv with spt and every plugin
# distribution EXCEPT spt-relay-fallback, then the whole suite but what needs the relay run there.
# Called by scripts/test.sh after the main run; `bash scripts/airgap.sh` runs it alone.
#
# Left out: the relay plugin's own tests (they import it) and every test marked `relay` (NAT
# traversal, relayed paths, the relay's listener and transit, the relay's decoders in the fuzz
# targets, the plugin list that names it); and the tests that cannot differ here, as they call
# pure functions of modules that cannot reach the relay distribution (import-linter keeps spt off
# plugins/) and build no plugin manager: the sans-IO protocol's (tests/core/proto) and the fuzz
# targets (decoders fed random bytes: a second pass only draws other inputs; about 260 s of the
# run's work). Everything else runs as in the main venv, daemons, CLI and plugin loading
# included, with the air-gap capture (tests/netns/test_airgap.py: unicast only to members plus
# mDNS, nothing to the configured relay or update source). About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-airgap
if [ ! -x "$VENV/bin/python" ]; then
  if [ -x /usr/bin/python3 ]; then /usr/bin/python3 -m venv "$VENV"; else python3 -m venv "$VENV"; fi
fi
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat \
  -e '.[dev]' -e plugins/spt_filetransfer -e plugins/spt_selfupdate -e examples/spt_location \
  > "$VENV/pip-install.log" 2>&1; then
  cat "$VENV/pip-install.log" >&2
  echo "airgap: pip install failed (log above)" >&2
  exit 1
fi
if "$VENV/bin/python" -c "import spt_relay_fallback" 2>/dev/null; then
  echo "airgap: spt_relay_fallback is importable in $VENV; it must not be installed there" >&2
  exit 1
fi
echo "== air-gapped build: $("$VENV/bin/python" -m pip list 2>/dev/null | grep -c -i '^spt') spt distributions, no relay"
"$VENV/bin/python" -m pytest -q -rfEs -p no:cacheprovider -n 3 --dist loadfile \
  --ignore=plugins/spt_relay_fallback --ignore=tests/core/proto --ignore=tests/fuzz -m "not relay" "$@"
