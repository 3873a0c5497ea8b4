#!/usr/bin/env bash
# Build the XIVE oracle's /init (no C library) and an initrd holding it:
#   build.sh OUT.cpio GEN_INIT_CPIO
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
powerpc64le-linux-gnu-gcc -static -nostdlib -ffreestanding -fno-pic -no-pie -O2 \
    -mno-vsx -mno-altivec -msoft-float -fno-stack-protector -Wall -Wextra \
    -o "$W/init" "$HERE/init.c"
printf 'file /init %s 0755 0 0\n' "$W/init" > "$W/list"
"$2" "$W/list" > "$1"
