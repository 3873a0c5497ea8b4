#!/usr/bin/env bash
# Cross-compile the bare-metal XIVE scenario client: build.sh SCENARIO OUT.elf
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCEN="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
OUTF="$2"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
CC=powerpc64le-linux-gnu-gcc
OBJCOPY=powerpc64le-linux-gnu-objcopy
python3 "$HERE/gen.py" "$SCEN" "$W/scenario.h"
$CC -mbig-endian -c "$HERE/prologue.S" -o "$W/prologue.o"
$OBJCOPY -O binary -j .text "$W/prologue.o" "$W/prologue.bin"
$CC -c "$HERE/entry.S" -o "$W/entry.o" -Wa,-I"$W"
$CC -c "$HERE/main.c" -o "$W/main.o" -I"$W" -O2 -ffreestanding -fno-pic -mcmodel=medium \
    -fno-stack-protector -mno-vsx -mno-altivec -msoft-float -Wall -Wextra
$CC -nostdlib -static -no-pie -Wl,-T,"$HERE/link.ld" -Wl,--build-id=none -Wl,--no-warn-rwx-segments \
    "$W/entry.o" "$W/main.o" -o "$OUTF"
