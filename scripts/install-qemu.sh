#!/usr/bin/env bash
# Install Debian bookworm's QEMU 7.2 (qemu-system-x86) for the benchmarks that compare against it.
#
# The machine image ships a newer qemu-utils (qemu-img); installing qemu-system-x86 naively makes
# apt remove it. Installing qemu-system-x86 and qemu-utils together at the same 7.2 version keeps
# qemu-img available. Idempotent: does nothing when both are already installed at 7.2.
# Only benchmarks need QEMU; tests do not.
#
# Usage: scripts/install-qemu.sh
set -euo pipefail

log() { printf '[install-qemu] %s\n' "$*" >&2; }

installed_version() {
    dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | awk '$3 == "installed" {print $4}'
}

is_72() { [[ $1 == 1:7.2* ]]; }

if is_72 "$(installed_version qemu-system-x86)" && is_72 "$(installed_version qemu-utils)" &&
    command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null; then
    log "already installed: $(qemu-system-x86_64 --version | head -n 1)"
    exit 0
fi

((EUID == 0)) || {
    log "error: run as root (apt-get install)"
    exit 1
}

# The newest 7.2 build that both packages have in the configured bookworm repositories.
version_72() {
    apt-cache madison "$1" | awk -F '|' '{gsub(/ /, "", $2)} $2 ~ /^1:7\.2/ {print $2}'
}
pick_version() {
    local v
    for v in $(version_72 qemu-system-x86); do
        if version_72 qemu-utils | grep -qxF "$v"; then
            printf '%s\n' "$v"
            return 0
        fi
    done
    return 1
}

version=$(pick_version) || {
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    version=$(pick_version)
} || {
    log "error: no matching 1:7.2 versions of qemu-system-x86 and qemu-utils in the apt sources"
    exit 1
}

log "installing qemu-system-x86=$version qemu-utils=$version"
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$version" "qemu-utils=$version" >&2
log "installed: $(qemu-system-x86_64 --version | head -n 1); $(qemu-img --version | head -n 1)"
