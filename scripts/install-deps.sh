#!/usr/bin/env bash
# Install what building, linting and testing Ferrite needs on a fresh Debian 12 machine:
# the apt packages (shell linter, static glibc), and the Rust pieces (x86_64-unknown-none target, rustfmt,
# clippy) for the main workspace and for testguest/ (which may pin its own toolchain).
# The guest assets' own packages are installed by scripts/guest-assets.sh; QEMU, which only
# the benchmarks need, by scripts/install-qemu.sh. Idempotent.
#
# Usage: scripts/install-deps.sh
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT_DIR
# libc6-dev carries the static glibc (libc.a) the static-pie binaries link against.
# iproute2 and iputils-ping: the network tests (namespaces, TAP, ping); qemu-utils: qemu-img
# checks the qcow2 images Ferrite writes; fio: the host's own disk ceiling in the benchmark;
# curl and openssl: the daemon tests talk HTTP over its Unix socket and make TLS certificates;
# prometheus: its promtool checks the daemon's /metrics.
# libclang-dev: the userfaultfd crate (post-copy migration) generates its kernel bindings.
readonly APT_PACKAGES=(shellcheck libc6-dev iproute2 iputils-ping qemu-utils fio curl openssl prometheus libclang-dev)

log() { printf '[install-deps] %s\n' "$*" >&2; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    ((EUID == 0)) || {
        log "error: missing ${missing[*]}; run as root or: apt-get install ${missing[*]}"
        exit 1
    }
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
    # Only promtool is wanted from the prometheus package, not a server on :9090.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

command -v rustup >/dev/null || {
    log "error: rustup is missing (https://rustup.rs)"
    exit 1
}

# Run in each directory so a rust-toolchain file there selects the toolchain to equip.
for dir in "$ROOT_DIR" "$ROOT_DIR/testguest"; do
    [[ -d $dir ]] || continue
    (
        cd "$dir"
        toolchain=$(rustup show active-toolchain | awk '{print $1}')
        components=$(rustup component list --installed)
        for component in rustfmt clippy; do
            if ! grep -q "^$component" <<<"$components"; then
                log "rustup component add $component ($toolchain)"
                rustup component add "$component" >&2
            fi
        done
        if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
            log "rustup target add x86_64-unknown-none ($toolchain)"
            rustup target add x86_64-unknown-none >&2
        fi
    )
done
log "ok"
