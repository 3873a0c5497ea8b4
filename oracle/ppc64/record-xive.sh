#!/usr/bin/env bash
# Record QEMU's sPAPR XIVE (exploitation mode) driven by a real pseries Linux, as the
# oracle nestio's XIVE model is replayed against (crates/xive/tests/qemu_replay.rs).
#
# Usage: oracle/ppc64/record-xive.sh [OUTDIR]     (default: oracle/ppc64/xive)
# Env:   NESTIO_PPC64_LINUX_DIR     kernel cache of build-linux.sh (default
#                                   <repo>/target/oracle/ppc64-linux)
#        NESTIO_PPC64_NO_INSTALL=1  never call apt-get
#
# Builds (or reuses) the tiny pseries kernel with build-linux.sh (helper h5's script,
# Debian linux-source-6.1 + gcc-powerpc64le-linux-gnu), then boots it under Debian's
# qemu-system-ppc64 (TCG, `-M pseries,ic-mode=xive,x-vof=on`, 2 vCPUs on one TCG
# thread so the log is in execution order) with an e1000. The /init is our own
# (xive-init/init.c: raw system calls, no C library, so it runs on a kernel without
# AltiVec/VSX), passed as an initrd over the kernel's built-in one: it brings eth0 up
# and pings slirp's gateway 3 times, each reply an e1000 interrupt through the XIVE. `-trace 'spapr_xive_*' -trace 'xive_*'` records every XIVE hcall with its
# arguments, every source claim and device level change, every ESB load/store and
# TIMA access with the value QEMU returned; xive_normalize.py keeps those lines (in
# order, one event per line) in OUTDIR/linux-e1000.trace, and the guest console's
# interrupt lines in OUTDIR/linux-e1000.console.
# crates/xive/tests/qemu_replay.rs runs this script live (CI=true, or a built kernel:
# ~6 s) into a temporary OUTDIR and replays that recording too; only the guest's XIVE
# setup calls must equal the committed ones (IPI and line counts vary with timing).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/xive}"
ORACLE=nestio-record-xive
# shellcheck source=oracle/ppc64/lib.sh
. "$HERE/lib.sh"

need_tools qemu-system-ppc64:qemu-system-ppc python3:python3
build_kernel
mkdir -p "$OUT"
make_work_dir
GEN_CPIO="$KDIR/build/usr/gen_init_cpio"
[ -x "$GEN_CPIO" ] || die "no $GEN_CPIO (built with the kernel by build-linux.sh)"
"$HERE/xive-init/build.sh" "$WORK/initrd.cpio" "$GEN_CPIO"

name=linux-e1000
log "$name: booting"
start=$SECONDS
timeout 300 qemu-system-ppc64 -M pseries,ic-mode=xive,x-vof=on -accel tcg,thread=single \
    -m 512M -smp 2 \
    -nographic -no-reboot -nodefaults -serial none -chardev stdio,id=c0,signal=off \
    -device spapr-vty,chardev=c0 \
    -kernel "$VMLINUX" -initrd "$WORK/initrd.cpio" -append 'console=hvc0 quiet' \
    -netdev user,id=n1 -device e1000,netdev=n1 \
    -trace 'spapr_xive_*' -trace 'xive_*' -D "$WORK/$name.log" \
    < /dev/null > "$WORK/$name.out" 2>&1 || true
log "$name: $((SECONDS - start)) s, $(wc -l < "$WORK/$name.log") trace lines"
grep -q 'xive-init: replies 3' "$WORK/$name.out" || { tail -20 "$WORK/$name.out" >&2; die "$name: /init did not get its 3 echo replies"; }
python3 "$HERE/xive_normalize.py" "$WORK/$name.log" > "$OUT/$name.trace"
grep -aE 'xive-init:|XIVE|xive|smp|e1000' "$WORK/$name.out" | tr -d '\r' > "$OUT/$name.console" || true
log "$name: $(wc -l < "$OUT/$name.trace") events -> $OUT/$name.trace"
