#!/usr/bin/env bash
# Build Ferrite's guest assets into OUTDIR, only from Debian packages and this repository.
#
#   vmlinuz       the Debian cloud kernel (bzImage) from linux-image-cloud-amd64
#   vmlinux       the ELF kernel extracted from that bzImage (PVH entry note checked)
#   initrd.img    an uncompressed newc cpio: busybox-static, the virtio modules, an /init
#                 that prints FERRITE-INITRD-START first, loads the modules and reports
#   rootfs.ext4   a Debian bookworm minbase root file system (debootstrap + mkfs.ext4 -d)
#   testguest.elf the freestanding test guest built from testguest/
#
# Cached: OUTDIR/MANIFEST records the inputs of every asset; an asset whose inputs did not
# change is not rebuilt. The test guest is always rebuilt (cargo is incremental) and copied
# only when it changed. OUTDIR/VERSIONS lists the package versions the assets came from.
#
# Usage: scripts/guest-assets.sh [--skip-rootfs] [--skip-testguest] [--no-install] OUTDIR
# Environment:
#   FERRITE_ASSETS_SKIP_ROOTFS=1     same as --skip-rootfs (fast CI)
#   FERRITE_ASSETS_SKIP_TESTGUEST=1  same as --skip-testguest
#   FERRITE_ROOTFS_SIZE              size of rootfs.ext4 (default 1G, sparse)
#   FERRITE_DEBIAN_MIRROR            debootstrap mirror (default: read from the apt configuration)
set -euo pipefail

readonly KERNEL_META=linux-image-cloud-amd64
readonly BUSYBOX_PKG=busybox-static
readonly ROOTFS_SUITE=bookworm
readonly ROOTFS_VARIANT=minbase
# Bump a recipe number when the way an asset is built changes, to force a rebuild.
readonly KERNEL_RECIPE=1
readonly INITRD_RECIPE=2
readonly ROOTFS_RECIPE=1
# The virtio drivers put in the initramfs; /init loads them in this order, except that the
# build moves a module after the modules its .modinfo says it depends on.
readonly MODULES=(
    virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio
    virtio_blk failover net_failover virtio_net virtio_console virtio_balloon virtio-rng
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
)
readonly HOST_PACKAGES=(lz4 cpio debootstrap e2fsprogs xz-utils zstd binutils ca-certificates)

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT_DIR

log() { printf '[guest-assets %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

skip_rootfs=${FERRITE_ASSETS_SKIP_ROOTFS:-0}
skip_testguest=${FERRITE_ASSETS_SKIP_TESTGUEST:-0}
install_deps=1
outdir=
while (($#)); do
    case "$1" in
    --skip-rootfs) skip_rootfs=1 ;;
    --skip-testguest) skip_testguest=1 ;;
    --no-install) install_deps=0 ;;
    -h | --help) usage 0 ;;
    -*) usage ;;
    *)
        [[ -z $outdir ]] || usage
        outdir=$1
        ;;
    esac
    shift
done
[[ -n $outdir ]] || usage
mkdir -p "$outdir"
OUTDIR=$(cd "$outdir" && pwd)
readonly OUTDIR
readonly MANIFEST="$OUTDIR/MANIFEST"

# One builder at a time per OUTDIR (a developer and CI may share a cache).
exec 9>"$OUTDIR/.lock"
flock 9

WORK=$(mktemp -d "$OUTDIR/.work.XXXXXX")
readonly WORK
cleanup() {
    # debootstrap may leave proc/sys mounted in its target when it fails.
    local mnt
    while read -r mnt; do
        [[ $mnt == "$WORK"/* ]] && umount -l "$mnt" 2>/dev/null
    done < <(findmnt -rn -o TARGET | sort -r)
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

apt_updated=0
apt_update_once() {
    if ((apt_updated == 0)); then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
        apt_updated=1
    fi
}

ensure_host_packages() {
    local missing=() pkg
    for pkg in "${HOST_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]})) || return 0
    ((install_deps)) || die "missing host packages: ${missing[*]} (run without --no-install, as root)"
    ((EUID == 0)) || die "missing host packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}"
    apt_update_once
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
}

candidate_version() {
    apt-cache policy "$1" | awk '/^ *Candidate:/ {print $2; exit}'
}

# Resolve package names and versions; refresh the apt lists once if they do not know them.
resolve_versions() {
    local attempt
    for attempt in 1 2; do
        KERNEL_PKG=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
            awk '/^ *Depends: linux-image-/ {print $2; exit}')
        if [[ -n $KERNEL_PKG ]]; then
            KERNEL_VERSION=$(candidate_version "$KERNEL_PKG")
            BUSYBOX_VERSION=$(candidate_version "$BUSYBOX_PKG")
            if [[ -n $KERNEL_VERSION && $KERNEL_VERSION != "(none)" &&
                -n $BUSYBOX_VERSION && $BUSYBOX_VERSION != "(none)" ]]; then
                return 0
            fi
        fi
        ((attempt == 1 && EUID == 0)) || break
        apt_update_once
    done
    die "cannot resolve $KERNEL_META / $BUSYBOX_PKG from the apt lists (apt-get update?)"
}

manifest_get() {
    [[ -f $MANIFEST ]] || return 0
    awk -F '\t' -v k="$1" '$1 == k {print $2}' "$MANIFEST"
}

manifest_set() {
    local tmp="$WORK/manifest"
    { [[ -f $MANIFEST ]] && awk -F '\t' -v k="$1" '$1 != k' "$MANIFEST"; } >"$tmp" || true
    printf '%s\t%s\n' "$1" "$2" >>"$tmp"
    sort -o "$tmp" "$tmp"
    mv "$tmp" "$MANIFEST"
}

# up_to_date KEY INPUTS FILE...: the manifest says KEY was built from INPUTS and all FILEs exist.
up_to_date() {
    local key=$1 inputs=$2 file
    shift 2
    [[ "$(manifest_get "$key")" == "$inputs" ]] || return 1
    for file in "$@"; do
        [[ -s "$OUTDIR/$file" ]] || return 1
    done
}

# Where unpack_package puts a package's files.
package_dir() { printf '%s\n' "$WORK/pkg-$1"; }

# Download and unpack one Debian package into package_dir (never installed on the host).
unpack_package() {
    local pkg=$1 version=$2 dir
    dir=$(package_dir "$pkg")
    [[ ! -d $dir ]] || return 0
    mkdir -p "$WORK/debs" "$dir"
    log "downloading $pkg=$version"
    local -a sandbox=()
    ((EUID == 0)) && sandbox=(-o APT::Sandbox::User=root)
    if ! (cd "$WORK/debs" && apt-get "${sandbox[@]}" download -qq "$pkg=$version" >&2); then
        apt_update_once
        (cd "$WORK/debs" && apt-get "${sandbox[@]}" download -qq "$pkg=$version" >&2)
    fi
    dpkg-deb -x "$WORK/debs/${pkg}_"*.deb "$dir"
}

kernel_release() {
    local dir=$1 release
    release=$(find "$dir/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n 1)
    [[ -n $release ]] || die "no /lib/modules/<release> in $KERNEL_PKG"
    printf '%s\n' "$release"
}

# Print the decimal offset of the compressed payload inside a bzImage (boot protocol >= 2.08).
bzimage_payload_offset() {
    local image=$1 setup_sects payload_offset
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$image" | tr -d ' ')
    ((setup_sects != 0)) || setup_sects=4
    payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$image" | tr -d ' ')
    printf '%s\n' $(((setup_sects + 1) * 512 + payload_offset))
}

# Check that FILE is a complete ELF with the PVH entry note (Xen note type 0x12).
check_pvh_elf() {
    local file=$1
    [[ "$(head -c 4 "$file" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]] || return 1
    # Every PT_LOAD segment must be inside the file (a truncated stream fails here).
    local size end=0 type offset filesz
    size=$(stat -c %s "$file")
    while read -r type offset _ _ filesz _; do
        [[ $type == LOAD ]] || continue
        ((offset + filesz > end)) && end=$((offset + filesz))
    done < <(readelf -lW "$file")
    ((end > 0 && end <= size)) || return 1
    readelf -nW "$file" | grep -Eq '^ *Xen +0x[0-9a-f]+[[:space:]]+(Unknown note type: \(0x00000012\)|XEN_ELFNOTE_PHYS32_ENTRY)'
}

# Decompress the LZ4 (legacy frame, magic 0x184C2102) vmlinux out of a bzImage.
extract_vmlinux() {
    local image=$1 out=$2 offset magic
    offset=$(bzimage_payload_offset "$image")
    magic=$(od -An -tx1 -j "$offset" -N4 "$image" | tr -d ' ')
    if [[ $magic != 02214c18 ]]; then
        # Not where the header says: fall back to scanning for the magic.
        offset=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$image" | head -n 1 | cut -d: -f1)
        [[ -n $offset ]] || die "no LZ4 stream in $image (kernel not LZ4-compressed?)"
    fi
    # The stream is followed by other data, so lz4 reports an error after a good decode.
    tail -c +$((offset + 1)) "$image" | lz4 -dc >"$out" 2>/dev/null || true
    check_pvh_elf "$out" || die "extracted vmlinux is not a complete ELF with the PVH note"
}

build_kernel() {
    local inputs="$KERNEL_PKG=$KERNEL_VERSION recipe=$KERNEL_RECIPE"
    if up_to_date kernel "$inputs" vmlinuz vmlinux; then
        log "vmlinuz, vmlinux: up to date ($KERNEL_PKG $KERNEL_VERSION)"
        return 0
    fi
    local dir release
    unpack_package "$KERNEL_PKG" "$KERNEL_VERSION"
    dir=$(package_dir "$KERNEL_PKG")
    release=$(kernel_release "$dir")
    log "extracting vmlinux from vmlinuz-$release"
    cp "$dir/boot/vmlinuz-$release" "$WORK/vmlinuz"
    extract_vmlinux "$WORK/vmlinuz" "$WORK/vmlinux"
    mv "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
    mv "$WORK/vmlinux" "$OUTDIR/vmlinux"
    manifest_set kernel "$inputs"
    manifest_set kernel-release "$release"
}

# The initramfs /init. Its first action prints the marker, so a console line proves userspace ran.
# Kernel command line: ferrite.init=poweroff (default) | shell | reboot | root (with ferrite.root=DEV)
init_script() {
    cat <<'EOF'
#!/bin/sh
echo FERRITE-INITRD-START
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mode=poweroff
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    ferrite.init=*) mode=${arg#ferrite.init=} ;;
    ferrite.root=*) root=${arg#ferrite.root=} ;;
    esac
done
release=$(uname -r)
while read -r module; do
    if insmod "/lib/modules/$release/$module.ko"; then
        echo "FERRITE-MODULE $module loaded"
    else
        echo "FERRITE-MODULE $module failed"
    fi
done </etc/ferrite/modules
echo "FERRITE-KERNEL $release"
echo "FERRITE-CPUS $(grep -c '^processor' /proc/cpuinfo)"
echo "FERRITE-MEMORY $(grep MemTotal /proc/meminfo)"
for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev" ] || continue
    echo "FERRITE-PCI ${dev##*/} $(cat "$dev/vendor"):$(cat "$dev/device") class=$(cat "$dev/class")"
done
for dev in /sys/bus/virtio/devices/*; do
    [ -e "$dev" ] || continue
    driver=none
    [ -e "$dev/driver" ] && driver=$(basename "$(readlink "$dev/driver")")
    echo "FERRITE-VIRTIO ${dev##*/} device=$(cat "$dev/device") driver=$driver"
done
for dev in /sys/block/*; do
    [ -e "$dev" ] || continue
    echo "FERRITE-BLOCK ${dev##*/} sectors=$(cat "$dev/size") ro=$(cat "$dev/ro")"
done
for dev in /sys/class/net/*; do
    [ -e "$dev" ] || continue
    echo "FERRITE-NET ${dev##*/} $(cat "$dev/address")"
done
echo FERRITE-INITRD-READY
case "$mode" in
shell)
    echo FERRITE-SHELL
    exec setsid cttyhack sh
    ;;
root)
    mkdir -p /newroot
    if mount -o ro "$root" /newroot; then
        # A minbase root file system has no init system: fall back to its shell.
        init=/sbin/init
        [ -x /newroot/sbin/init ] || init=/bin/sh
        echo "FERRITE-ROOT $root $init"
        umount /proc /sys
        exec switch_root /newroot "$init"
    fi
    echo "FERRITE-ROOT-FAILED $root"
    poweroff -f
    ;;
reboot) reboot -f ;;
*) poweroff -f ;;
esac
EOF
}

# Append one newc header + name (padded); device nodes and the trailer carry no data.
cpio_newc_entry() {
    local ino=$1 mode=$2 rdev_major=$3 rdev_minor=$4 name=$5
    local namesize=$((${#name} + 1)) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 1 0 0 0 0 "$rdev_major" "$rdev_minor" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# A second cpio archive (the kernel unpacks concatenated archives) with the device nodes,
# written directly so that building needs neither root nor mknod.
cpio_device_nodes() {
    local chr=$((0020000 | 0600))
    cpio_newc_entry 900001 "$chr" 5 1 dev/console
    cpio_newc_entry 900002 $((0020000 | 0666)) 1 3 dev/null
    cpio_newc_entry 900003 "$chr" 4 64 dev/ttyS0
    cpio_newc_entry 900004 $((0020000 | 0666)) 5 0 dev/tty
    cpio_newc_entry 0 0 0 0 'TRAILER!!!'
}

# Copy one module, decompressing .ko.xz / .ko.zst / .ko.gz to a plain .ko.
copy_module() {
    local moddir=$1 name=$2 dest=$3 src
    src=$(find "$moddir" -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" -o -name "$name.ko.gz" |
        head -n 1)
    [[ -n $src ]] || die "module $name not found in $KERNEL_PKG"
    case "$src" in
    *.ko.xz) xz -dc "$src" >"$dest/$name.ko" ;;
    *.ko.zst) zstd -qdc "$src" >"$dest/$name.ko" ;;
    *.ko.gz) gzip -dc "$src" >"$dest/$name.ko" ;;
    *) cp "$src" "$dest/$name.ko" ;;
    esac
}

# Print the dependencies (module names) a plain .ko declares in its .modinfo section.
module_depends() {
    objcopy -O binary --only-section=.modinfo "$1" /dev/stdout | tr '\0' '\n' |
        sed -n 's/^depends=//p' | tr ',' '\n' | sed '/^$/d'
}

# Print MODULES in the listed order, except that a module's dependencies (from .modinfo)
# come first. Module names use '_' where file names may use '-'.
module_load_order() {
    local dir=$1 module
    local -A file_of=() state=()
    for module in "${MODULES[@]}"; do
        file_of[${module//-/_}]=$module
    done
    for module in "${MODULES[@]}"; do
        module_visit "${module//-/_}"
    done
}

# Depth-first step of module_load_order (uses its dir, file_of and state).
module_visit() {
    local name=$1 dep
    [[ ${state[$name]:-} == placed ]] && return 0
    [[ ${state[$name]:-} == visiting ]] && die "module dependency cycle through $name"
    [[ -n ${file_of[$name]:-} ]] || die "a listed module depends on $name, which is not in the list"
    state[$name]=visiting
    for dep in $(module_depends "$dir/${file_of[$name]}.ko"); do
        module_visit "$dep"
    done
    state[$name]=placed
    printf '%s\n' "${file_of[$name]}"
}

build_initrd() {
    local recipe_hash inputs
    recipe_hash=$({
        init_script
        printf '%s\n' "${MODULES[@]}"
        declare -f cpio_device_nodes cpio_newc_entry module_load_order module_visit module_depends copy_module
    } | sha256sum | cut -c1-16)
    inputs="$KERNEL_PKG=$KERNEL_VERSION $BUSYBOX_PKG=$BUSYBOX_VERSION init=$recipe_hash recipe=$INITRD_RECIPE"
    if up_to_date initrd "$inputs" initrd.img; then
        log "initrd.img: up to date"
        return 0
    fi
    local kdir bdir release stage="$WORK/initrd" applet
    unpack_package "$KERNEL_PKG" "$KERNEL_VERSION"
    unpack_package "$BUSYBOX_PKG" "$BUSYBOX_VERSION"
    kdir=$(package_dir "$KERNEL_PKG")
    bdir=$(package_dir "$BUSYBOX_PKG")
    release=$(kernel_release "$kdir")
    log "assembling initrd.img (busybox-static $BUSYBOX_VERSION, ${#MODULES[@]} modules of $release)"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,root,etc/ferrite,lib/modules/"$release"}
    cp "$bdir/bin/busybox" "$stage/bin/busybox"
    chmod 0755 "$stage/bin/busybox"
    # Applet links (bin/sh, sbin/insmod, ...) as the busybox build itself lists them.
    while read -r applet; do
        [[ $applet == /bin/busybox || -e "$stage$applet" ]] && continue
        mkdir -p "$(dirname "$stage$applet")"
        ln -s /bin/busybox "$stage$applet"
    done < <("$stage/bin/busybox" --list-full | sed 's|^|/|')
    local module
    for module in "${MODULES[@]}"; do
        copy_module "$kdir/lib/modules/$release" "$module" "$stage/lib/modules/$release"
    done
    module_load_order "$stage/lib/modules/$release" >"$stage/etc/ferrite/modules"
    init_script >"$stage/init"
    chmod 0755 "$stage/init"
    chmod 1777 "$stage/tmp"
    # Reproducible: fixed times, owners and order.
    find "$stage" -exec touch -h -d @0 {} +
    (cd "$stage" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --reproducible --quiet) >"$WORK/initrd.img"
    cpio_device_nodes >>"$WORK/initrd.img"
    mv "$WORK/initrd.img" "$OUTDIR/initrd.img"
    manifest_set initrd "$inputs"
}

debian_mirror() {
    if [[ -n ${FERRITE_DEBIAN_MIRROR:-} ]]; then
        printf '%s\n' "$FERRITE_DEBIAN_MIRROR"
        return 0
    fi
    local mirror
    mirror=$(apt-cache policy | awk -v s="$ROOTFS_SUITE/main" '$3 == s {print $2; exit}')
    printf '%s\n' "${mirror:-http://deb.debian.org/debian}"
}

build_rootfs() {
    if ((skip_rootfs)); then
        log "rootfs.ext4: skipped (FERRITE_ASSETS_SKIP_ROOTFS / --skip-rootfs)"
        return 0
    fi
    local size=${FERRITE_ROOTFS_SIZE:-1G} mirror debootstrap_version inputs
    mirror=$(debian_mirror)
    debootstrap_version=$(dpkg-query -W -f='${Version}' debootstrap)
    inputs="$ROOTFS_SUITE variant=$ROOTFS_VARIANT size=$size mirror=$mirror debootstrap=$debootstrap_version recipe=$ROOTFS_RECIPE"
    if up_to_date rootfs "$inputs" rootfs.ext4; then
        log "rootfs.ext4: up to date"
        return 0
    fi
    ((EUID == 0)) || die "debootstrap needs root to build rootfs.ext4 (or use --skip-rootfs)"
    local dir="$WORK/rootfs"
    log "debootstrap --variant=$ROOTFS_VARIANT $ROOTFS_SUITE from $mirror (takes a minute or more)"
    debootstrap --variant="$ROOTFS_VARIANT" "$ROOTFS_SUITE" "$dir" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        {
            tail -n 30 "$WORK/debootstrap.log" >&2
            die "debootstrap failed"
        }
    printf 'ferrite\n' >"$dir/etc/hostname"
    printf '/dev/vda / ext4 defaults 0 1\n' >"$dir/etc/fstab"
    sed -i 's/^root:[^:]*:/root::/' "$dir/etc/shadow"
    printf 'ferrite rootfs %s %s\n' "$ROOTFS_SUITE" "$ROOTFS_VARIANT" >"$dir/etc/ferrite-rootfs"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*_Packages
    local packages
    packages=$(dpkg-query --admindir="$dir/var/lib/dpkg" -W | wc -l)
    log "mkfs.ext4 -d ($packages packages) into a $size image"
    rm -f "$WORK/rootfs.ext4"
    mkfs.ext4 -q -F -L ferrite-root -d "$dir" "$WORK/rootfs.ext4" "$size" >/dev/null
    mv "$WORK/rootfs.ext4" "$OUTDIR/rootfs.ext4"
    manifest_set rootfs "$inputs"
    manifest_set rootfs-packages "$packages"
}

build_testguest() {
    if ((skip_testguest)); then
        log "testguest.elf: skipped (FERRITE_ASSETS_SKIP_TESTGUEST / --skip-testguest)"
        return 0
    fi
    local src="$ROOT_DIR/testguest"
    [[ -f $src/Cargo.toml ]] || die "$src/Cargo.toml is missing (or use --skip-testguest)"
    if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-none; then
        log "rustup target add x86_64-unknown-none"
        rustup target add x86_64-unknown-none >&2
    fi
    log "cargo build --release in testguest/"
    # The test guest has its own workspace and target directory: ignore an outer CARGO_TARGET_DIR.
    (cd "$src" && env -u CARGO_TARGET_DIR cargo build --release --quiet >&2)
    local elf="$src/target/x86_64-unknown-none/release/testguest"
    [[ -s $elf ]] || die "cargo build did not produce $elf"
    if cmp -s "$elf" "$OUTDIR/testguest.elf"; then
        log "testguest.elf: unchanged"
    else
        cp "$elf" "$WORK/testguest.elf"
        mv "$WORK/testguest.elf" "$OUTDIR/testguest.elf"
        log "testguest.elf: updated"
    fi
}

write_versions() {
    local tmp="$WORK/VERSIONS" rootfs_line
    rootfs_line=$(manifest_get rootfs)
    {
        printf '# Debian packages and inputs of the assets in this directory.\n'
        printf '%s %s\n' "$KERNEL_META" "$(candidate_version "$KERNEL_META")"
        printf '%s %s\n' "$KERNEL_PKG" "$KERNEL_VERSION"
        printf 'kernel-release %s\n' "$(manifest_get kernel-release)"
        printf '%s %s\n' "$BUSYBOX_PKG" "$BUSYBOX_VERSION"
        printf 'initrd-modules %s\n' "${MODULES[*]}"
        if [[ -n $rootfs_line ]]; then
            printf 'rootfs %s packages=%s\n' "$rootfs_line" "$(manifest_get rootfs-packages)"
        else
            printf 'rootfs not built\n'
        fi
    } >"$tmp"
    cmp -s "$tmp" "$OUTDIR/VERSIONS" || mv "$tmp" "$OUTDIR/VERSIONS"
}

main() {
    local start=$SECONDS
    ensure_host_packages
    resolve_versions
    build_kernel
    build_initrd
    build_rootfs
    build_testguest
    write_versions
    log "assets ready in $OUTDIR ($((SECONDS - start)) s)"
}

main
