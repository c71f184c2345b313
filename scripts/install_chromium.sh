#!/bin/sh
# Install Debian's headless Chromium (and chromedriver) for the HTML report tests
# (tests/test_report_html.py drives /usr/bin/chromium over the DevTools protocol).
#
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs apt-get and root (or
# password-less sudo). Anywhere else, or with QDIFF_SKIP_CHROMIUM=1, it says why it skipped and
# exits 0; the browser tests then skip with that reason. A failed apt-get is an error.
set -eu

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "install_chromium: $CHROMIUM is already installed"
    exit 0
fi
if [ "${QDIFF_SKIP_CHROMIUM:-0}" = "1" ]; then
    echo "install_chromium: skipped: QDIFF_SKIP_CHROMIUM=1 (the HTML report browser tests will be skipped)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: skipped: no apt-get on this system (install Chromium at $CHROMIUM to run the HTML report browser tests)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_chromium: skipped: not root and no password-less sudo (run 'sudo $0' to run the HTML report browser tests)"
    exit 0
fi

echo "install_chromium: installing Debian's chromium and chromium-driver with apt-get"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
    || ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; then
    echo "install_chromium: apt-get failed; set QDIFF_SKIP_CHROMIUM=1 to run the tests without the browser checks" >&2
    exit 1
fi
if [ ! -x "$CHROMIUM" ]; then
    echo "install_chromium: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
echo "install_chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
