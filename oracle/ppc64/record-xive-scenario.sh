#!/usr/bin/env bash
# Second XIVE oracle: return codes and output registers. Cross-compiles the bare-metal
# pseries client in xive-scenario/ (powerpc64le-linux-gnu-gcc; VOF enters it in 32-bit
# big-endian mode, it switches to 64-bit little-endian itself, negotiates XIVE
# exploitation with client-architecture-support through VOF's client-interface hcall
# 0xF005) with the scenario compiled in, runs it under Debian's QEMU 7.2
# (`-M pseries,ic-mode=xive,x-vof=on`, TCG, 1 vCPU) and keeps its console output —
# every hcall's return code and registers, every ESB/TIMA load value, event-queue
# contents — in OUTDIR/scenario.qemu.out. crates/xive/tests/scenario.rs runs the same
# scenario on nestio's model and compares line by line (documented QEMU differences
# aside).
#
# Usage: oracle/ppc64/record-xive-scenario.sh [OUTDIR]   (default: oracle/ppc64/xive)
# Env:   NESTIO_PPC64_NO_INSTALL=1  never call apt-get
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/xive}"
ORACLE=nestio-record-xive-scenario
# shellcheck source=oracle/ppc64/lib.sh
. "$HERE/lib.sh"

need_tools qemu-system-ppc64:qemu-system-ppc powerpc64le-linux-gnu-gcc:gcc-powerpc64le-linux-gnu python3:python3
mkdir -p "$OUT"
make_work_dir
W="$WORK"
"$HERE/xive-scenario/build.sh" "$HERE/xive-scenario/scenario.txt" "$W/scenario.elf"
# The client spins after its last line: QEMU is stopped once "scenario: end" appears
# (or after 60 s).
timeout 60 qemu-system-ppc64 -M pseries,ic-mode=xive,x-vof=on -accel tcg -m 256M -smp 1 \
    -nographic -no-reboot -nodefaults -serial none -chardev stdio,id=c0,signal=off \
    -device spapr-vty,chardev=c0 -kernel "$W/scenario.elf" < /dev/null > "$W/raw" 2>&1 &
qemu=$!
for _ in $(seq 600); do
    grep -q '^scenario: end' "$W/raw" 2>/dev/null && break
    kill -0 "$qemu" 2>/dev/null || break
    sleep 0.1
done
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null || true
tr -d '\r' < "$W/raw" > "$W/out"
grep -q '^scenario: end' "$W/out" || { cat "$W/out" >&2; die "the scenario did not finish"; }
sed -n '/^scenario: start/,/^scenario: end/p' "$W/out" > "$OUT/scenario.qemu.out"
log "$(wc -l < "$OUT/scenario.qemu.out") lines -> $OUT/scenario.qemu.out"
