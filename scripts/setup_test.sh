#!/usr/bin/env bash
# Test set-up on top of scripts/setup.sh: Debian's headless Chromium, which the report test
# (tests/integration/test_report_browser.py) opens report.html in. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); elif command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
    echo "chromium is missing and this user cannot install packages: run 'apt-get install chromium' as root" >&2
    exit 1
  fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium
fi
echo "test setup done: $(chromium --version 2>/dev/null || echo chromium)"
