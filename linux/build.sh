#!/usr/bin/env bash
# Build the nestio guest Linux: a patched Debian linux-source-6.1 kernel (tinyconfig plus
# linux/config.fragment) and an initramfs holding one static /init (linux/init/init.c).
#
# Usage: linux/build.sh            (prints the paths of vmlinux and initramfs.cpio)
# Env:   NESTIO_LINUX_CACHE   cache directory (default: <repo>/target/linux)
#        NESTIO_LINUX_JOBS    make -j (default 2)
#        NESTIO_LINUX_BZIMAGE=1  also build arch/x86/boot/bzImage
#        NESTIO_LINUX_NO_INSTALL=1  never call apt-get; fail if something is missing
#        NESTIO_LINUX_NESTIO=PATH   a static nestio binary: also build initramfs-vfio.cpio
#                                   (the initramfs plus /bin/nestio, stripped; for
#                                   nestio.mode=vfio, issue 18)
#
# Incremental: the kernel is rebuilt only when config.fragment or patches/ change (the
# stamp is their hash), the initramfs only when init/init.c changes. Patches are applied
# to the unpacked source once; when they change, the old set is reversed first, so only
# the touched files recompile.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${NESTIO_LINUX_CACHE:-$REPO/target/linux}"
JOBS="${NESTIO_LINUX_JOBS:-2}"
TARBALL=/usr/src/linux-source-6.1.tar.xz
SRC="$CACHE/linux-source-6.1"
OUT="$CACHE/out"
MAKE=(make -C "$SRC" ARCH=x86_64 -j"$JOBS")

log() { printf 'nestio-linux: %s\n' "$*" >&2; }
die() { printf 'nestio-linux: error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$CACHE" "$OUT"
exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"

# --- 1. host packages --------------------------------------------------------------
need=()
command -v gcc >/dev/null || need+=(build-essential)
command -v make >/dev/null || need+=(make)
command -v bc >/dev/null || need+=(bc)
command -v flex >/dev/null || need+=(flex)
command -v bison >/dev/null || need+=(bison)
command -v xz >/dev/null || need+=(xz-utils)
[ -e /usr/include/gelf.h ] || need+=(libelf-dev)   # objtool
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev) # static /init
[ -e "$TARBALL" ] || need+=(linux-source-6.1)
[ -x /bin/busybox ] || need+=(busybox-static)          # `ping -c 3` in the guest
if [ "${#need[@]}" -gt 0 ]; then
    [ "${NESTIO_LINUX_NO_INSTALL:-0}" = 1 ] && die "missing packages: ${need[*]} (install them or unset NESTIO_LINUX_NO_INSTALL)"
    [ "$(id -u)" = 0 ] || die "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
[ -e "$TARBALL" ] || die "$TARBALL is missing after installing linux-source-6.1"

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
mapfile -t PATCHES < <(find "$HERE/patches" -name '*.patch' | sort)

# --- 2. source + patches -----------------------------------------------------------
if [ ! -e "$SRC/Makefile" ]; then
    log "unpacking $TARBALL into $CACHE"
    rm -rf "$SRC" "$CACHE/applied"
    tar -C "$CACHE" -xf "$TARBALL"
fi
want_patches="$(hash_of /dev/null "${PATCHES[@]}")"
have_patches="$(cat "$CACHE/applied/hash" 2>/dev/null || true)"
if [ "$want_patches" != "$have_patches" ]; then
    if [ -d "$CACHE/applied" ]; then
        log "reverting the previously applied patches"
        mapfile -t OLD < <(find "$CACHE/applied" -name '*.patch' | sort -r)
        for p in "${OLD[@]}"; do
            patch -d "$SRC" -p1 -R -s -N < "$p" || die "cannot revert $p; delete $SRC to start over"
        done
    fi
    rm -rf "$CACHE/applied"
    mkdir -p "$CACHE/applied.new"
    for p in "${PATCHES[@]}"; do
        log "applying $(basename "$p")"
        patch -d "$SRC" -p1 -s -N < "$p" || die "patch $p does not apply; delete $SRC to start over"
        cp "$p" "$CACHE/applied.new/"
    done
    echo "$want_patches" > "$CACHE/applied.new/hash"
    mv "$CACHE/applied.new" "$CACHE/applied"
fi

# --- 3. configuration --------------------------------------------------------------
FRAG="$HERE/config.fragment"
want_config="$(hash_of "$FRAG")"
if [ "$want_config" != "$(cat "$CACHE/config.hash" 2>/dev/null || true)" ] || [ ! -e "$SRC/.config" ]; then
    log "configuring: tinyconfig + $(basename "$FRAG")"
    "${MAKE[@]}" -s tinyconfig >&2
    (cd "$SRC" && ARCH=x86_64 ./scripts/kconfig/merge_config.sh -m .config "$FRAG" >/dev/null)
    "${MAKE[@]}" -s olddefconfig >&2
    bad=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                grep -qxF "$line" "$SRC/.config" || { log "option not taken: $line"; bad=1; } ;;
            "# CONFIG_"*" is not set")
                sym="${line#\# }"; sym="${sym%% *}"
                if grep -q "^$sym=" "$SRC/.config"; then log "option still on: $sym"; bad=1; fi ;;
        esac
    done < "$FRAG"
    [ "$bad" = 0 ] || die "the kernel configuration does not match $FRAG (see above)"
    echo "$want_config" > "$CACHE/config.hash"
fi

# --- 4. kernel ---------------------------------------------------------------------
want_kernel="$(hash_of "$FRAG" /dev/null "${PATCHES[@]}")-bz${NESTIO_LINUX_BZIMAGE:-0}"
if [ "$want_kernel" != "$(cat "$OUT/kernel.hash" 2>/dev/null || true)" ] || [ ! -e "$OUT/vmlinux" ]; then
    targets=(vmlinux)
    [ "${NESTIO_LINUX_BZIMAGE:-0}" = 1 ] && targets+=(bzImage)
    log "building ${targets[*]} (make -j$JOBS; the first build takes a few minutes)"
    start=$(date +%s)
    "${MAKE[@]}" -s "${targets[@]}" >&2
    log "kernel built in $(( $(date +%s) - start )) s"
    cp "$SRC/vmlinux" "$OUT/vmlinux.new" && mv "$OUT/vmlinux.new" "$OUT/vmlinux"
    if [ "${NESTIO_LINUX_BZIMAGE:-0}" = 1 ]; then
        cp "$SRC/arch/x86/boot/bzImage" "$OUT/bzImage.new" && mv "$OUT/bzImage.new" "$OUT/bzImage"
    fi
    echo "$want_kernel" > "$OUT/kernel.hash"
else
    log "kernel up to date"
fi

# --- 5. /init and the initramfs ------------------------------------------------------
INIT_C="$HERE/init/init.c"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX is missing (apt-get install busybox-static)"
want_init="$( (hash_of "$INIT_C"; sha256sum "$BUSYBOX"; echo busybox-v1) | sha256sum | cut -d' ' -f1)"
if [ "$want_init" != "$(cat "$OUT/initramfs.hash" 2>/dev/null || true)" ] || [ ! -e "$OUT/initramfs.cpio" ]; then
    log "building /init and the initramfs"
    gcc -static -O2 -Wall -Wextra -Werror -o "$OUT/init" "$INIT_C"
    strip "$OUT/init"
    gcc -O2 -o "$OUT/gen_init_cpio" "$SRC/usr/gen_init_cpio.c"
    cat > "$OUT/initramfs.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0555 0 0
dir /sys 0555 0 0
dir /tmp 01777 0 0
file /init $OUT/init 0755 0 0
dir /bin 0755 0 0
file /bin/busybox $BUSYBOX 0755 0 0
slink /bin/ping busybox 0777 0 0
slink /bin/sh busybox 0777 0 0
EOF
    # Uncompressed: unpacking gzip in the guest costs ~30 s on an emulating host.
    "$OUT/gen_init_cpio" "$OUT/initramfs.list" > "$OUT/initramfs.cpio.new"
    mv "$OUT/initramfs.cpio.new" "$OUT/initramfs.cpio"
    echo "$want_init" > "$OUT/initramfs.hash"
else
    log "initramfs up to date"
fi

# --- 6. optional: the initramfs with a static nestio (nestio.mode=vfio) ---------------
if [ -n "${NESTIO_LINUX_NESTIO:-}" ]; then
    [ -x "$NESTIO_LINUX_NESTIO" ] || die "NESTIO_LINUX_NESTIO=$NESTIO_LINUX_NESTIO is not an executable"
    want_vfio="$( (cat "$OUT/initramfs.hash"; sha256sum < "$NESTIO_LINUX_NESTIO") | sha256sum | cut -d' ' -f1)"
    if [ "$want_vfio" != "$(cat "$OUT/initramfs-vfio.hash" 2>/dev/null || true)" ] || [ ! -e "$OUT/initramfs-vfio.cpio" ]; then
        log "building initramfs-vfio.cpio with $NESTIO_LINUX_NESTIO"
        strip -o "$OUT/nestio" "$NESTIO_LINUX_NESTIO"
        { cat "$OUT/initramfs.list"; echo "file /bin/nestio $OUT/nestio 0755 0 0"; } > "$OUT/initramfs-vfio.list"
        "$OUT/gen_init_cpio" "$OUT/initramfs-vfio.list" > "$OUT/initramfs-vfio.cpio.new"
        mv "$OUT/initramfs-vfio.cpio.new" "$OUT/initramfs-vfio.cpio"
        echo "$want_vfio" > "$OUT/initramfs-vfio.hash"
    fi
fi

{
    echo "NESTIO_LINUX_VMLINUX=$OUT/vmlinux"
    if [ -e "$OUT/initramfs-vfio.cpio" ] && [ -n "${NESTIO_LINUX_NESTIO:-}" ]; then
        echo "NESTIO_LINUX_INITRAMFS_VFIO=$OUT/initramfs-vfio.cpio"
    fi
    echo "NESTIO_LINUX_INITRAMFS=$OUT/initramfs.cpio"
    if [ -e "$OUT/bzImage" ]; then echo "NESTIO_LINUX_BZIMAGE=$OUT/bzImage"; fi
} | tee "$OUT/paths.env"
