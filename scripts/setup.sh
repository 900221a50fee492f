#!/usr/bin/env bash
# Sets up everything spt needs on a fresh Debian machine: the system packages the tests and the
# network lab use (as root), then a virtualenv in .venv with spt, its three plugin distributions
# and the development tools. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(python3-venv iproute2 iptables tcpdump conntrack openssh-client openssh-server tmux)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: not root, so not installing ${missing[*]} (network-lab tests will skip)" >&2
  fi
fi

# The system interpreter, where there is one: every uid can run it, which the tests that switch
# to an unprivileged user need (an interpreter under /root is unreachable for them).
if [ ! -x .venv/bin/python ]; then
  if [ -x /usr/bin/python3 ]; then /usr/bin/python3 -m venv .venv; else python3 -m venv .venv; fi
fi
# editable_mode=compat: a plain path entry instead of an import-hook finder per package, which
# would cost every `spt` invocation ~30 ms of start-up (bench/cli_startup.py).
# Its output (setuptools' warnings included) goes to a log, shown only when the install fails.
if ! .venv/bin/python -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat \
  -e '.[dev]' -e plugins/spt_relay_fallback -e plugins/spt_filetransfer -e plugins/spt_selfupdate \
  -e examples/spt_location > .venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log >&2
  echo "setup: pip install failed (log above)" >&2
  exit 1
fi
# Bytecode for the editable trees, as installing a wheel writes it: a process started under
# PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module it loads at every start
# (~160 ms of CPU per daemon start, ~10 ms per CLI call). A module edited later is compiled
# afresh when loaded (its source is newer), so this never goes stale in effect.
.venv/bin/python -m compileall -q spt plugins examples >/dev/null
