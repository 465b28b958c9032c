#!/usr/bin/env bash
# The one test command (README "Running the tests"; .ci/run calls exactly this).
#
# Sets up everything a fresh machine needs, then runs the whole suite with trial:
#   - Debian's chromium for the browser tests (apt-get, only where it is missing);
#   - Debian's nginx for the reverse-proxy test (only where missing);
#   - Debian's openssh-client (ssh, ssh-keygen) for the SSH door's tests (only where missing);
#   - Debian's asciinema, a real consumer of the asciicast download (only where missing);
#   - for the real-guest tests (tests/guest.py): Debian's qemu-system-x86 and busybox-static
#     (only where missing), and Debian's cloud kernel, fetched with apt-get download and
#     unpacked with dpkg-deb -x (no maintainer scripts) into a cache outside the checkout;
#   - a virtual environment in .venv with the package (its build runs the frontend build
#     with npm from the npm registry) and the test dependencies from PyPI;
#   - trial over tests/, then mypy over the package.
# Prints one plain "N passed, N failed" line and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_update() {  # at most once per run, shared by the steps below
    [ -n "$apt_updated" ] || $sudo apt-get update -qq
    apt_updated=1
}

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    echo "== installing Debian's chromium for the browser tests"
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

if [ ! -x /usr/sbin/nginx ]; then
    echo "== installing Debian's nginx for the reverse-proxy test (tests/test_nginx.py)"
    apt_update
    # The test does not use the package's service (on a machine with systemd, Debian
    # starts it with its default site on port 80): it runs nginx in the foreground with
    # its own configuration, ports and paths.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx >/dev/null
fi

if ! command -v ssh >/dev/null 2>&1 || ! command -v ssh-keygen >/dev/null 2>&1; then
    echo "== installing Debian's openssh-client for the SSH door's tests (tests/test_ssh.py)"
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssh-client >/dev/null
fi

if ! command -v asciinema >/dev/null 2>&1; then
    echo "== installing Debian's asciinema, which checks the asciicast download (tests/test_export.py)"
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq asciinema >/dev/null
fi

guest_packages=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || guest_packages="qemu-system-x86"
[ -x /bin/busybox ] || guest_packages="$guest_packages busybox-static"
if [ -n "$guest_packages" ]; then
    echo "== installing Debian's$guest_packages for the real-guest tests"
    apt_update
    # shellcheck disable=SC2086  # the list is word-split on purpose
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $guest_packages >/dev/null
fi

# The guest kernel: the package linux-image-cloud-amd64 currently depends on (26 MB
# download against 70 MB for linux-image-amd64; it has the 8250 serial console, devtmpfs
# and gzip initramfs built in, which is all the busybox guest needs). Only its vmlinuz is
# kept, under the package's name, with a "vmlinuz" symlink that tests/guest.py reads.
guest_cache="${CLOUD_CONSOLE_GUEST_CACHE:-$HOME/.cache/cloud-console/guest}"
kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
kernel=$(kernel_package)
if [ -z "$kernel" ]; then apt_update; kernel=$(kernel_package); fi
[ -n "$kernel" ] || { echo "no package found for linux-image-cloud-amd64" >&2; exit 1; }
if [ ! -f "$guest_cache/$kernel/vmlinuz" ]; then
    echo "== fetching Debian's $kernel into $guest_cache for the real-guest tests"
    apt_update
    # In $TMPDIR, not the cache: as root, apt-get download fetches as the _apt user, who
    # must reach the directory (root's $HOME is private).
    unpack=$(mktemp -d)
    [ "$(id -u)" -ne 0 ] || chown _apt "$unpack" 2>/dev/null || true
    (cd "$unpack" && apt-get download -qq "$kernel")
    dpkg-deb -x "$unpack/${kernel}_"*.deb "$unpack/root"
    mkdir -p "$guest_cache/$kernel"
    cp "$unpack/root/boot/vmlinuz-"* "$guest_cache/$kernel/vmlinuz.part"
    mv "$guest_cache/$kernel/vmlinuz.part" "$guest_cache/$kernel/vmlinuz"
    rm -rf "$unpack"
fi
ln -sfn "$kernel/vmlinuz" "$guest_cache/vmlinuz"

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
