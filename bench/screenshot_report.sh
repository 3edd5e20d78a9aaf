#!/usr/bin/env bash
# Render a `dpo-zoo compare` report.html in headless Chromium and save a full-page PNG, to check that
# the self-contained report (tables + base64 plots) renders without any network access.
#
#   bench/screenshot_report.sh reports/compare/report.html [out.png] [width] [height]
#
# Needs Debian's `chromium` package (`apt-get install -y chromium`). The page makes no requests: the
# plots are data: URIs, and the browser runs with background networking off.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTH] [HEIGHT]" >&2
    exit 2
fi
report="$1"
out="${2:-${report%.html}.png}"
width="${3:-1400}"
height="${4:-4200}"

if [[ ! -f "$report" ]]; then
    echo "$0: no such file: $report" >&2
    exit 2
fi
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$browser" ]]; then
    echo "$0: no Chromium found; install it with: apt-get install -y chromium" >&2
    exit 2
fi

report_abs="$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
# A throw-away profile, so nothing of a user's browser profile is read or written.
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT

"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-extensions --hide-scrollbars --user-data-dir="$profile" \
    --window-size="${width},${height}" --screenshot="$out_abs" "file://${report_abs}" \
    >/dev/null 2>&1

if [[ ! -s "$out_abs" ]]; then
    echo "$0: Chromium wrote no screenshot to $out_abs" >&2
    exit 1
fi
echo "$out_abs"
