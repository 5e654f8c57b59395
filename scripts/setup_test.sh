#!/usr/bin/env bash
# Test set-up on top of scripts/setup.sh: Debian's headless Chromium, which the report test
# (tests/integration/test_report_browser.py) opens report.html in, and shellcheck, which
# tests/unit/test_cluster_files.py runs on cluster/local_head.sh (skipped without it).
# Idempotent: only what is missing is apt-installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); elif command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
    echo "missing: ${missing[*]}; this user cannot install packages: run 'apt-get install ${missing[*]}' as root" >&2
    exit 1
  fi
  "${SUDO[@]}" apt-get update -qq
  # Through env: sudo would drop a plain variable assignment.
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "test setup done: $(chromium --version 2>/dev/null || echo chromium), shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
