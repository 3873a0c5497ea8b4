#!/usr/bin/env bash
# Real VMMs drive nestio's devices unmodified: boot the project's test Linux (the same
# vmlinux + initramfs that `nestio run --kernel` boots) in a vfio-user-capable QEMU and
# in Cloud Hypervisor, with nestio's e1000 and sample device each served by a separate
# `nestio device ... --once` process, and check what the guest saw:
#
#   - Linux's e1000 driver bound nestio's e1000 and the guest's /init got 3/3 ICMP echo
#     replies from the user network's gateway 10.0.2.2 (`NESTIO-PING: ok 3/3`);
#   - the guest enumerated nestio's sample device (`[1b36:7e57]` class 0xff0000) and its
#     /init drove it from userspace (`nestio.dmabench=`, linux/README.md): a DMA read
#     and a DMA write of a guest page checked byte for byte, then 64 KiB checksum DMAs
#     timed (`NESTIO-DMA: ok ...`) — the device reaching guest RAM through the VMM's
#     vfio-user client (QEMU: its sealed memfd; Cloud Hypervisor: an unsealed one);
#   - no kernel warning, oops or e1000 error line on the console;
#   - the VMM ended the way the guest asked (QEMU: isa-debug-exit status (0<<1)|1;
#     Cloud Hypervisor: exit 0 after the guest's ACPI power-off).
#
# Usage:
#   NESTIO_QEMU=/path/to/qemu-system-x86_64 NESTIO_CH=/path/to/cloud-hypervisor \
#       scripts/interop_vmms.sh
#
# Environment:
#   NESTIO_QEMU   a qemu-system-x86_64 with `-device vfio-user-pci` (QEMU >= 10.1).
#                 Unset: the qemu-system-x86_64 on PATH if it has vfio-user-pci, else
#                 the QEMU part is SKIPPED (Debian 12's QEMU 7.2 has no vfio-user).
#   NESTIO_CH     a cloud-hypervisor binary. Unset: `cloud-hypervisor` on PATH, else
#                 the Cloud Hypervisor part is SKIPPED.
#   NESTIO        the nestio binary (default: target/release/nestio, then
#                 target/debug/nestio).
#   NESTIO_LINUX_VMLINUX, NESTIO_LINUX_INITRAMFS
#                 the guest (default: what linux/build.sh prints; it builds once).
#   NESTIO_INTEROP_TIMEOUT   seconds one guest may run (default 600).
#   NESTIO_INTEROP_CPUS      vCPUs of each guest (default 1).
#   NESTIO_INTEROP_LOGS      keep consoles and device logs in this directory
#                            (default: a temporary directory, removed on success).
#
# Exit status: 0 every VMM that was given passed (nothing given: 0 after a loud SKIP
# line), 1 a VMM failed (its console and the device logs are printed), 2 usage or
# set-up error (a given binary missing or not able to do vfio-user, no nestio binary).
#
# Nothing here fetches or builds QEMU or Cloud Hypervisor: build them from their public
# sources yourself (README.md, "Use with QEMU / Cloud Hypervisor").
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
TIMEOUT="${NESTIO_INTEROP_TIMEOUT:-600}"
CPUS="${NESTIO_INTEROP_CPUS:-1}"
MEM_MB=128
# The test kernel's command line minus `noapic` (Cloud Hypervisor routes PCI INTx only
# through the I/O APIC, described in ACPI; QEMU does either), plus the init's options.
BASE_CMDLINE="console=ttyS0 reboot=k noxsave clearcpuid=smap,popcnt nestio.mode=ping nestio.dmabench=20"

say() { printf 'interop: %s\n' "$*" >&2; }
die() { printf 'interop: error: %s\n' "$*" >&2; exit 2; }

# --- inputs -------------------------------------------------------------------------
NESTIO_BIN="${NESTIO:-}"
if [ -z "$NESTIO_BIN" ]; then
    for c in "$REPO/target/release/nestio" "$REPO/target/debug/nestio"; do
        [ -x "$c" ] && { NESTIO_BIN="$c"; break; }
    done
fi
[ -n "$NESTIO_BIN" ] && [ -x "$NESTIO_BIN" ] ||
    die "no nestio binary: run 'cargo build --release -p nestio' or set NESTIO=/path/to/nestio"

QEMU="${NESTIO_QEMU:-}"
CH="${NESTIO_CH:-}"
qemu_has_vfio_user() { "$1" -nodefaults -device help 2>/dev/null | grep -q '"vfio-user-pci"'; }
if [ -n "$QEMU" ]; then
    [ -x "$QEMU" ] || die "NESTIO_QEMU=$QEMU is not an executable file"
    qemu_has_vfio_user "$QEMU" ||
        die "NESTIO_QEMU=$QEMU has no '-device vfio-user-pci' (needs QEMU >= 10.1 built with vfio-user)"
elif command -v qemu-system-x86_64 >/dev/null 2>&1 && qemu_has_vfio_user qemu-system-x86_64; then
    QEMU="$(command -v qemu-system-x86_64)"
fi
if [ -n "$CH" ]; then
    [ -x "$CH" ] || die "NESTIO_CH=$CH is not an executable file"
    "$CH" --help 2>&1 | grep -q -- '--user-device' ||
        die "NESTIO_CH=$CH has no --user-device option (needs Cloud Hypervisor >= 23)"
elif command -v cloud-hypervisor >/dev/null 2>&1; then
    CH="$(command -v cloud-hypervisor)"
fi

if [ -z "$QEMU" ] && [ -z "$CH" ]; then
    echo "SKIP: interop_vmms: neither NESTIO_QEMU (a qemu-system-x86_64 with vfio-user-pci) nor NESTIO_CH (cloud-hypervisor) given, and none on PATH"
    exit 0
fi
[ -e /dev/kvm ] || die "/dev/kvm is missing: both VMMs need KVM"

VMLINUX="${NESTIO_LINUX_VMLINUX:-}"
INITRD="${NESTIO_LINUX_INITRAMFS:-}"
if [ -z "$VMLINUX" ] || [ -z "$INITRD" ]; then
    paths="$("$REPO/linux/build.sh")" || die "linux/build.sh failed (see above)"
    VMLINUX="$(sed -n 's/^NESTIO_LINUX_VMLINUX=//p' <<<"$paths")"
    INITRD="$(sed -n 's/^NESTIO_LINUX_INITRAMFS=//p' <<<"$paths")"
fi
[ -r "$VMLINUX" ] && [ -r "$INITRD" ] || die "guest kernel/initramfs not readable: $VMLINUX $INITRD"

if [ -n "${NESTIO_INTEROP_LOGS:-}" ]; then
    WORK="$NESTIO_INTEROP_LOGS"; mkdir -p "$WORK"; KEEP=1
else
    WORK="$(mktemp -d /tmp/nestio-interop.XXXXXX)"; KEEP=0
fi

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    PIDS=()
}
trap 'cleanup; [ "$KEEP" = 1 ] || [ "${FAILED:-0}" != 0 ] || rm -rf "$WORK"' EXIT

# start_device KIND SOCKET LOG [ARGS...]: `nestio device KIND --once`, waits until it
# listens ("serving on" on its stderr), records its pid.
start_device() {
    local kind="$1" sock="$2" log="$3"; shift 3
    rm -f "$sock"
    "$NESTIO_BIN" device "$kind" --once --socket "$sock" "$@" </dev/null >"$log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local i
    for i in $(seq 1 300); do
        grep -q "serving on" "$log" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { say "nestio device $kind exited early:"; cat "$log" >&2; return 1; }
        sleep 0.1
    done
    say "nestio device $kind never served on $sock"; return 1
}

# check_console NAME CONSOLE STATUS WANT_STATUS: prints the verdict; returns 0 on pass.
check_console() {
    local name="$1" con="$2" st="$3" want="$4" bad=()
    grep -q 'NESTIO-PING: ok 3/3' "$con" || bad+=("no 'NESTIO-PING: ok 3/3' (the guest's pings through nestio's e1000)")
    grep -q 'e1000 .*eth0: Intel(R) PRO/1000 Network Connection' "$con" ||
        bad+=("Linux's e1000 driver never bound the device")
    grep -Eq '\[1b36:7e57\] type 00 class 0xff0000' "$con" ||
        bad+=("the guest never enumerated nestio's sample device [1b36:7e57]")
    grep -q 'NESTIO-DMA: ok' "$con" ||
        bad+=("no 'NESTIO-DMA: ok' (the guest's DMA checks through nestio's sample device)")
    if grep -Eq 'WARNING:|Oops|BUG:|Call Trace|e1000.*(Hardware Error|Detected Tx Unit Hang)' "$con"; then
        bad+=("kernel warning/oops/e1000 error on the console")
    fi
    [ "$st" = "$want" ] || bad+=("VMM exit status $st, expected $want")
    if [ "${#bad[@]}" -eq 0 ]; then
        local first dma
        first="$(grep -m1 -o 'time=[0-9.]* ms' "$con" || true)"
        dma="$(grep -m1 -o 'NESTIO-DMA: ok 64 KiB x [0-9]*: median [0-9.]* us ([0-9.]* MB/s)' "$con" || true)"
        echo "PASS: $name: Linux pinged 3/3 through nestio's e1000 (first echo $first), sample device DMA checked (${dma#NESTIO-DMA: ok })"
        return 0
    fi
    echo "FAIL: $name:"
    printf '  - %s\n' "${bad[@]}"
    echo "---- $name console ($con) ----"; cat "$con"
    echo "---- nestio device logs ----"; cat "$WORK/$name-e1000.log" "$WORK/$name-sample.log" 2>/dev/null
    return 1
}

# run_vmm NAME: devices up, the VMM runs the guest to its end (or the timeout), verdict.
run_vmm() {
    local name="$1"
    local e1000="$WORK/$name-e1000.sock" sample="$WORK/$name-sample.sock"
    local con="$WORK/$name-console.log" st want
    start_device e1000 "$e1000" "$WORK/$name-e1000.log" --net user || return 1
    start_device sample "$sample" "$WORK/$name-sample.log" || { cleanup; return 1; }
    local cmd=()
    case "$name" in
    qemu)
        # Guest RAM in a shared memfd (vfio-user DMA maps it in the device process);
        # qemu64 plus XSAVEERPTR: the CPU model this host's KVM runs Linux with.
        cmd=("$QEMU" -enable-kvm -cpu qemu64,+xsaveerptr -smp "$CPUS" -m "${MEM_MB}M"
            -object "memory-backend-memfd,id=ram,size=${MEM_MB}M,share=on"
            -machine "q35,memory-backend=ram" -nodefaults -nographic -serial stdio
            -no-reboot -kernel "$VMLINUX" -initrd "$INITRD"
            -append "$BASE_CMDLINE"
            -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$e1000\"}}"
            -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$sample\"}}"
            -device isa-debug-exit,iobase=0xf4,iosize=1)
        want=1 ;;
    ch)
        # Cloud Hypervisor ends on the guest's ACPI power-off (a reset would reboot).
        cmd=("$CH" --kernel "$VMLINUX" --initramfs "$INITRD"
            --cmdline "$BASE_CMDLINE nestio.end=poweroff"
            --cpus "boot=$CPUS" --memory "size=${MEM_MB}M,shared=on"
            --serial tty --console off
            --user-device "socket=$e1000" --user-device "socket=$sample")
        want=0 ;;
    esac
    say "$name: ${cmd[*]}"
    local t0=$SECONDS
    timeout --kill-after=5 "$TIMEOUT" "${cmd[@]}" </dev/null >"$con" 2>"$WORK/$name-stderr.log"
    st=$?
    say "$name: VMM exited with status $st after $((SECONDS - t0)) s"
    [ "$st" = 124 ] && say "$name: killed after ${TIMEOUT} s (NESTIO_INTEROP_TIMEOUT)"
    cat "$WORK/$name-stderr.log" >>"$con"
    cleanup
    check_console "$name" "$con" "$st" "$want"
}

FAILED=0
if [ -n "$QEMU" ]; then
    say "QEMU: $QEMU ($("$QEMU" --version | head -1))"
    run_vmm qemu || FAILED=1
else
    echo "SKIP: interop_vmms: QEMU: set NESTIO_QEMU to a qemu-system-x86_64 with vfio-user-pci (QEMU >= 10.1; Debian 12's 7.2 has none)"
fi
if [ -n "$CH" ]; then
    say "Cloud Hypervisor: $CH ($("$CH" --version 2>&1 | head -1))"
    run_vmm ch || FAILED=1
else
    echo "SKIP: interop_vmms: Cloud Hypervisor: set NESTIO_CH to a cloud-hypervisor binary (or put it on PATH)"
fi
[ "$FAILED" = 0 ] || { say "logs kept in $WORK"; exit 1; }
exit 0
