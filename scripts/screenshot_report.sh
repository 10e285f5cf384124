#!/usr/bin/env bash
# Screenshot an edentune HTML report in headless Chromium (checks that the self-contained page renders).
# Usage: scripts/screenshot_report.sh REPORT.html [OUT.png]
# Installs Debian's chromium with apt-get when no chromium is on PATH (needs root).
set -euo pipefail
report="${1:?usage: $0 REPORT.html [OUT.png]}"
out="${2:-report.png}"
[ -f "$report" ] || { echo "error: $report: no such file" >&2; exit 2; }

browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "chromium not found; installing it with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  browser="$(command -v chromium)"
fi

url="file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
# No network, no background services: the page must render from the file alone.
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
  --screenshot="$out" --window-size=1200,2000 "$url" 2>/dev/null
[ -s "$out" ] || { echo "error: no screenshot written" >&2; exit 1; }
echo "wrote $out"
