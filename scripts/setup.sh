#!/usr/bin/env bash
# Install diffalign for development in ./.venv: the package with its test and demo extras, and Debian's Chromium
# for the demo's real-browser test (Playwright drives /usr/bin/chromium; `playwright install` is never needed).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --upgrade pip
.venv/bin/pip install -e ".[dev,demo]"   # pip resolves torch + torchvision together
if [ -x /usr/bin/chromium ]; then
  echo "chromium: found /usr/bin/chromium"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the demo's browser test will skip"
else
  echo "chromium not installed (needs root + apt: apt-get install chromium): the demo's browser test will skip"
fi
