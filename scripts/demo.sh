#!/usr/bin/env bash
# Ferrite's first quickstart command: prepare the guest assets if they are missing, build
# ferrite, and boot a demo VM (the project's test guest, 2 vCPUs, 512 MiB, one 64 MiB disk)
# with its serial console on this terminal. Type `help` at the guest prompt; Ctrl-A x quits.
#
# Usage: scripts/demo.sh [--linux]
#   --linux   boot the Debian cloud kernel with the busybox initramfs instead (on a VT-x/AMD-V
#             host it reaches a shell in seconds; on an emulating host such as kvm_pvm it only
#             gets as far as that host allows, see docs/benchmarks.md)
# Environment: FERRITE_ASSETS (default <repo>/assets)
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT_DIR"
export FERRITE_ASSETS=${FERRITE_ASSETS:-$ROOT_DIR/assets}

linux=0
if [[ ${1:-} == --linux ]]; then
    linux=1
elif [[ -n ${1:-} ]]; then
    echo "unknown option $1 (usage: scripts/demo.sh [--linux])" >&2
    exit 2
fi

need=(testguest.elf)
((linux)) && need+=(vmlinux initrd.img)
for asset in "${need[@]}"; do
    if [[ ! -e $FERRITE_ASSETS/$asset ]]; then
        echo "demo: building guest assets into $FERRITE_ASSETS (first run only)"
        FERRITE_ASSETS_SKIP_ROOTFS=1 scripts/guest-assets.sh "$FERRITE_ASSETS"
        break
    fi
done

cargo build --release -p ferrite
disk=$FERRITE_ASSETS/demo-disk.img
[[ -e $disk ]] || truncate -s 64M "$disk"

if ((linux)); then
    exec target/x86_64-unknown-linux-gnu/release/ferrite run --kernel "$FERRITE_ASSETS/vmlinux" \
        --initrd "$FERRITE_ASSETS/initrd.img" --cpus 2 --memory 512M --disk "$disk" \
        --cmdline "console=ttyS0 i8042.noaux"
fi
echo "demo: booting the test guest; try: cpus, mem, pci, blk, blk-write 0 0 8 42, blk-check 0 0 8 42, time, poweroff (Ctrl-A x quits)"
exec target/x86_64-unknown-linux-gnu/release/ferrite run --kernel "$FERRITE_ASSETS/testguest.elf" --cpus 2 --memory 512M \
    --disk "$disk"
