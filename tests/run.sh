#!/usr/bin/env bash
# The one test command (README "Running the tests"; .ci/run calls exactly this).
#
# Sets up everything a fresh machine needs, then runs the whole suite with trial:
#   - Debian's chromium for the browser tests (apt-get, only where it is missing);
#   - a virtual environment in .venv with the package (its build runs the frontend build
#     with npm from the npm registry) and the test dependencies from PyPI;
#   - trial over tests/, then mypy over the package.
# Prints one plain "N passed, N failed" line and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    echo "== installing Debian's chromium for the browser tests"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$python" -m venv .venv
fi
echo "== installing cloud-console (with its frontend build) and the test dependencies"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat

echo "== trial"
log=$(mktemp)
status=0
PYTHONPATH=. .venv/bin/python -m twisted.trial --jobs=2 tests 2>&1 | tee "$log" || status=$?
summary=$(grep -E '^(PASSED|FAILED) \(' "$log" | tail -n 1 || true)
count() { printf '%s' "$summary" | grep -oE "$1=[0-9]+" | cut -d= -f2 || true; }
passed=$(count successes); failures=$(count failures); errors=$(count errors)
unexpected=$(count unexpectedSuccesses)
failed=$(( ${failures:-0} + ${errors:-0} + ${unexpected:-0} ))
[ -n "$summary" ] || failed=$(( failed + 1 ))
rm -f "$log"

echo "== mypy"
if ! .venv/bin/python -m mypy; then
    failed=$(( failed + 1 ))
    status=1
fi

echo "${passed:-0} passed, ${failed} failed"
if [ "$status" -ne 0 ] || [ "$failed" -ne 0 ]; then
    exit 1
fi
