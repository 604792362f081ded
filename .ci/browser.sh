#!/usr/bin/env bash
# Provides Debian's chromium for the playground tests (Playwright drives /usr/bin/chromium).
# Used by `make test` and so by .ci/run. Installs it with apt-get when root or passwordless sudo
# is available; otherwise prints one line saying what to install and exits 1 (a missing browser
# is a broken setup, never a skipped test).
set -uo pipefail
CHROMIUM=/usr/bin/chromium
[ -x "$CHROMIUM" ] && exit 0
need="$CHROMIUM is missing: install Debian's chromium (sudo apt-get install -y chromium), then run make test again"
if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root() { sudo -n "$@"; }
else
    echo "browser: $need" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: $need (no apt-get here: install a chromium binary at $CHROMIUM)" >&2
    exit 1
fi
echo "browser: installing Debian's chromium with apt-get (once)" >&2
as_root apt-get update -q >/dev/null || echo "browser: apt-get update failed" >&2
if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || [ ! -x "$CHROMIUM" ]; then
    echo "browser: apt-get install chromium failed; $need" >&2
    exit 1
fi
