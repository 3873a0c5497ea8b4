#!/usr/bin/env bash
# Record QEMU's sPAPR TCE / DDW behaviour driven by a real pseries Linux, as the oracle
# nestio's TCE model is replayed against (crates/iommu/tests/qemu_tce_replay.rs).
#
# Usage: oracle/ppc64/record-tce.sh [OUTDIR]     (default: oracle/ppc64/tce)
# Env:   NESTIO_PPC64_LINUX_DIR   kernel cache of build-linux.sh (default
#                                 <repo>/target/oracle/ppc64-linux)
#        NESTIO_PPC64_NO_INSTALL=1  never call apt-get
#
# Builds (or reuses) the tiny pseries kernel with build-linux.sh, then boots it twice
# under Debian's qemu-system-ppc64 (TCG, `-M pseries,x-vof=on`) with a 64-bit-DMA
# virtio-net (`iommu_platform=on,disable-legacy=on`: Linux asks for a DDW, maps all RAM
# into it with H_PUT_TCE_INDIRECT) and a 32-bit e1000 (default window, H_PUT_TCE),
# eth0 (the virtio-net) pinging slirp's gateway from the raw-syscall init (xive-init/):
#   ddw-1shl59.trace  the default 64-bit window address (1 << 59)
#   ddw-4g.trace      -global spapr-pci-host-bridge.dma64_win_addr=0x100000000
# Each run's `-trace 'spapr_iommu_*'` log is normalised by tce_normalize.py (every
# call with its arguments and result; runs of calls differing only by address are
# compressed; repeated translations deduplicated) and its guest console kept as
# NAME.console (only the xive-init lines and the kernel's DMA window lines).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/tce}"
ORACLE=nestio-record-tce
# shellcheck source=oracle/ppc64/lib.sh
. "$HERE/lib.sh"

need_tools qemu-system-ppc64:qemu-system-ppc python3:python3
build_kernel
mkdir -p "$OUT"
make_work_dir
# The kernel has no AltiVec/VSX, so a C-library /init dies of SIGILL: use the raw-syscall
# init of the XIVE recording (xive-init/: eth0 up, 3 pings to 10.0.2.2, power off) as
# an initrd over the built-in one. eth0 is the virtio-net (the DDW user).
GEN_CPIO="$KDIR/build/usr/gen_init_cpio"
[ -x "$GEN_CPIO" ] || die "no $GEN_CPIO (built with the kernel by build-linux.sh)"
"$HERE/xive-init/build.sh" "$WORK/initrd.cpio" "$GEN_CPIO"

run() {
    local name="$1" dma64="$2"; shift 2
    log "$name: booting (dma64_win_addr=$dma64)"
    local start=$SECONDS
    # TCG; the guest powers off at the end of /init (QEMU exits), 300 s at most.
    timeout 300 qemu-system-ppc64 -M pseries,x-vof=on -accel tcg -m 1G -smp 1 \
        -nographic -no-reboot -nodefaults -serial none -chardev stdio,id=c0,signal=off \
        -device spapr-vty,chardev=c0 \
        -kernel "$VMLINUX" -initrd "$WORK/initrd.cpio" -append 'console=hvc0 quiet' \
        -netdev user,id=n0 -device virtio-net-pci,netdev=n0,iommu_platform=on,disable-legacy=on \
        -netdev user,id=n1 -device e1000,netdev=n1 \
        -trace 'spapr_iommu_*' -D "$WORK/$name.log" "$@" \
        < /dev/null > "$WORK/$name.out" 2>&1 || {
            tail -20 "$WORK/$name.out" >&2
            die "$name: QEMU failed or timed out"
        }
    log "$name: $((SECONDS - start)) s, $(wc -l < "$WORK/$name.log") trace lines"
    grep -q 'xive-init: power off' "$WORK/$name.out" || { tail -20 "$WORK/$name.out" >&2; die "$name: /init did not finish"; }
    python3 "$HERE/tce_normalize.py" "$WORK/$name.log" "$name" "$dma64" > "$OUT/$name.trace"
    grep -aE 'xive-init:|DMA window|ibm,|iommu' "$WORK/$name.out" | tr -d '\r' > "$OUT/$name.console" || true
    log "$name: $(wc -l < "$OUT/$name.trace") recorded lines -> $OUT/$name.trace"
}

run ddw-1shl59 0x800000000000000
run ddw-4g 0x100000000 -global spapr-pci-host-bridge.dma64_win_addr=0x100000000
