#!/usr/bin/env python3
"""Boot the same test Linux (vmlinux + initramfs from linux/build.sh, ACPI on, the same
kernel command line) under several VMMs, one after the other, with 1 and 2 vCPUs, and
print when each milestone appeared on the serial console (host clock, seconds since the
VMM process started; in brackets, since the kernel's banner, which leaves out QEMU's
firmware), the guest's ICMP round trips through the e1000, the time of a 64 KiB DMA
by nestio's sample device into guest RAM (`nestio.dmabench`, linux/README.md; not for
qemu72, which has no vfio-user), and every time as a ratio to nestio's at the same
vCPU count.

VMMs (the guest pings 10.0.2.2 through an emulated e1000 in each):

- `nestio`: `nestio run --acpi on`, nestio's e1000 served by `nestio device e1000 --net
  user` and the sample device by `nestio device sample`, each in another process, over
  vfio-user (nestio's own client);
- `qemu72`: Debian's QEMU 7.2 + KVM (`qemu-system-x86_64` on PATH) with QEMU's own
  in-process e1000 on its user network — the baseline nobody here wrote;
- `qemu`: the QEMU in `NESTIO_QEMU` (>= 10.1, vfio-user-pci) with nestio's e1000 over
  vfio-user (QEMU's client);
- `ch`: the Cloud Hypervisor in `NESTIO_CH` with nestio's e1000 over vfio-user
  (`--user-device`, Cloud Hypervisor's client).

`qemu` and `ch` are included when their variable is set (or named with --vmms).
The kernel command line has no `noapic` (Cloud Hypervisor routes PCI INTx only through
the I/O APIC) and ends the guest with an ACPI power-off (`nestio.end=poweroff`; nestio
and QEMU end it earlier, at the debug-exit port write).

Usage: scripts/boot_compare.py [--runs N] [--cpus 1,2] [--pings N] [--dma N] [--vmms LIST]
(needs target/release/nestio: run `cargo build --release -p nestio` first, and
qemu-system-x86_64 for qemu72)
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CMDLINE = "console=ttyS0 reboot=k noxsave clearcpuid=smap,popcnt nestio.mode=ping nestio.end=poweroff"
MEMORY_MB = 128
MILESTONES = [
    ("kernel banner", lambda l: "Linux version" in l),
    ("e1000 probed", lambda l: "e1000" in l and "eth0: Intel(R) PRO/1000" in l),
    ("/init", lambda l: "NESTIO-INIT: start" in l),
    ("first ping reply", lambda l: "bytes from 10.0.2.2" in l),
    ("exit", lambda l: "NESTIO-INIT: exit" in l),
]
RTT = re.compile(r"bytes from 10\.0\.2\.2: icmp_seq=(\d+) .*time=([0-9.]+) ms")
CPUS_LINE = re.compile(r"NESTIO-CPUS: (\d+) in /proc/cpuinfo")
DMA_LINE = re.compile(r"NESTIO-DMA: ok 64 KiB x \d+: median ([0-9.]+) us \(([0-9.]+) MB/s\)")
VMM_TITLES = {
    "nestio": "nestio (vfio-user e1000)",
    "qemu72": "QEMU 7.2 + KVM (own e1000)",
    "qemu": "QEMU (vfio-user-pci → nestio e1000)",
    "ch": "Cloud Hypervisor (--user-device → nestio e1000)",
}


def linux_paths():
    env_k = os.environ.get("NESTIO_LINUX_VMLINUX")
    env_i = os.environ.get("NESTIO_LINUX_INITRAMFS")
    if env_k and env_i:
        return env_k, env_i
    out = subprocess.run([os.path.join(REPO, "linux/build.sh")], check=True,
                         capture_output=True, text=True).stdout
    kv = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
    return kv["NESTIO_LINUX_VMLINUX"], kv["NESTIO_LINUX_INITRAMFS"]


class Result:
    """Milestone times, echo round trips and the CPU count one guest reported."""

    def __init__(self):
        self.seen = {}
        self.rtts = []
        self.cpus = None
        self.dma_us = None
        self.dma_fail = None
        self.status = None
        self.console = []

    def rtt_median(self):
        # The first echo also waits for ARP: leave it out when there are others.
        r = self.rtts[1:] if len(self.rtts) > 1 else self.rtts
        return statistics.median(r) if r else None


def timed(cmd, log, timeout):
    """Run cmd; return a Result from its stdout lines (console kept in `log`)."""
    res = Result()
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         stderr=subprocess.STDOUT)
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    with open(log, "w") as f:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            f.write(line)
            f.flush()
            t = time.monotonic() - start
            for name, hit in MILESTONES:
                if name not in res.seen and hit(line):
                    res.seen[name] = t
            m = RTT.search(line)
            if m:
                res.rtts.append(float(m.group(2)))
            m = CPUS_LINE.search(line)
            if m:
                res.cpus = int(m.group(1))
            m = DMA_LINE.search(line)
            if m:
                res.dma_us = float(m.group(1))
            if "NESTIO-DMA: fail" in line:
                res.dma_fail = line.strip()
    res.status = p.wait()
    killer.cancel()
    return res


class Device:
    """`nestio device KIND --once` on a fresh socket, killed on exit."""

    def __init__(self, nestio, workdir, kind, *extra):
        self.kind = kind
        self.sock = os.path.join(workdir, f"{kind}.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen([nestio, "device", kind, *extra, "--once",
                                      "--socket", self.sock], stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        # The device says "serving on PATH" once it listens.
        for line in self.proc.stderr:
            if "serving on" in line:
                break
        else:
            sys.exit(f"nestio device {self.kind} ended before serving")
        threading.Thread(target=lambda: self.proc.stderr.read(), daemon=True).start()
        return self.sock

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def command(vmm, bins, kernel, initrd, cpus, cmdline, socks):
    """The command line of one VMM; `socks` are nestio's device sockets (none for qemu72)."""
    if vmm == "nestio":
        return [bins["nestio"], "run", "--kernel", kernel, "--initrd", initrd,
                "--memory", f"{MEMORY_MB}M", "--cpus", str(cpus), "--acpi", "on",
                "--cmdline", cmdline] + [a for s in socks for a in ("--device", "vfio-user=" + s)]
    qemu_common = ["-enable-kvm", "-cpu", "qemu64,+xsaveerptr", "-smp", str(cpus),
                   "-m", f"{MEMORY_MB}M", "-nodefaults", "-nographic", "-serial", "stdio",
                   "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
    if vmm == "qemu72":
        return [bins["qemu72"]] + qemu_common + [
            "-machine", "q35", "-netdev", "user,id=n0", "-device", "e1000,netdev=n0,romfile="]
    if vmm == "qemu":
        devs = []
        for s in socks:
            devs += ["-device",
                     '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"}}' % s]
        return [bins["qemu"]] + qemu_common + [
            "-object", f"memory-backend-memfd,id=ram,size={MEMORY_MB}M,share=on",
            "-machine", "q35,memory-backend=ram"] + devs
    if vmm == "ch":
        return [bins["ch"], "--kernel", kernel, "--initramfs", initrd, "--cmdline", cmdline,
                "--cpus", f"boot={cpus}", "--memory", f"size={MEMORY_MB}M,shared=on",
                "--serial", "tty", "--console", "off"] + [
                    a for s in socks for a in ("--user-device", "socket=" + s)]
    raise ValueError(vmm)


def boot(vmm, bins, kernel, initrd, cpus, cmdline, workdir, dma, timeout):
    log = os.path.join(workdir, f"{vmm}-{cpus}cpu-{int(time.time())}.log")
    if vmm == "qemu72":
        res = timed(command(vmm, bins, kernel, initrd, cpus, cmdline, []), log, timeout)
    elif dma:
        with Device(bins["nestio"], workdir, "e1000", "--net", "user") as e1000, \
                Device(bins["nestio"], workdir, "sample") as sample:
            res = timed(command(vmm, bins, kernel, initrd, cpus,
                                f"{cmdline} nestio.dmabench={dma}", [e1000, sample]), log,
                        timeout)
    else:
        with Device(bins["nestio"], workdir, "e1000", "--net", "user") as e1000:
            res = timed(command(vmm, bins, kernel, initrd, cpus, cmdline, [e1000]), log,
                        timeout)
    res.log = log
    return res


def fmt(t, first):
    if t is None:
        return "-"
    if first is None:
        return f"{t:.2f}"
    return f"{t:.2f} (+{t - first:.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="boots per VMM and vCPU count")
    ap.add_argument("--cpus", default="1,2", help="vCPU counts, comma separated")
    ap.add_argument("--pings", type=int, default=5, help="echo requests per boot (>= 2)")
    ap.add_argument("--dma", type=int, default=20,
                    help="timed 64 KiB sample-device DMAs per boot (0: no sample device)")
    ap.add_argument("--vmms", default=None,
                    help="comma separated of nestio,qemu72,qemu,ch (default: nestio, qemu72, "
                         "and qemu/ch when NESTIO_QEMU/NESTIO_CH are set)")
    ap.add_argument("--logs", default=None, help="keep the consoles in this directory")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds one guest may run before it is killed")
    args = ap.parse_args()

    bins = {"nestio": os.path.join(REPO, "target/release/nestio"),
            "qemu72": shutil.which("qemu-system-x86_64"),
            "qemu": os.environ.get("NESTIO_QEMU"),
            "ch": os.environ.get("NESTIO_CH") or shutil.which("cloud-hypervisor")}
    if args.vmms:
        vmms = [v.strip() for v in args.vmms.split(",") if v.strip()]
    else:
        vmms = ["nestio", "qemu72"] + [v for v in ("qemu", "ch") if bins[v]]
    for v in vmms:
        if v not in VMM_TITLES:
            sys.exit(f"unknown VMM {v!r}: use nestio, qemu72, qemu, ch")
        if not bins[v] or not os.access(bins[v], os.X_OK):
            hint = {"nestio": "cargo build --release -p nestio",
                    "qemu72": "apt-get install qemu-system-x86",
                    "qemu": "set NESTIO_QEMU to a qemu-system-x86_64 with vfio-user-pci",
                    "ch": "set NESTIO_CH to a cloud-hypervisor binary"}[v]
            sys.exit(f"{v}: no executable ({bins[v]}): {hint}")
    for v in ("qemu", "ch"):
        if v not in vmms:
            print(f"SKIP: {VMM_TITLES[v]}: not given "
                  f"({'NESTIO_QEMU' if v == 'qemu' else 'NESTIO_CH'} unset)")
    cpu_counts = [int(c) for c in args.cpus.split(",")]
    if args.pings < 2:
        sys.exit("--pings must be at least 2 (the first echo includes ARP)")
    cmdline = f"{BASE_CMDLINE} nestio.count={args.pings}"
    kernel, initrd = linux_paths()
    workdir = args.logs or tempfile.mkdtemp(prefix="nestio-boot-compare.")
    os.makedirs(workdir, exist_ok=True)
    print(f"kernel {kernel}\ninitramfs {initrd}\ncommand line: {cmdline}\n"
          f"{MEMORY_MB} MiB, consoles in {workdir}\n", flush=True)

    rows = []
    for run in range(args.runs):
        for cpus in cpu_counts:
            for vmm in vmms:
                dma = 0 if vmm == "qemu72" else args.dma
                res = boot(vmm, bins, kernel, initrd, cpus, cmdline, workdir, dma, args.timeout)
                ok = len(res.rtts) >= args.pings and (dma == 0 or res.dma_us is not None)
                if dma and res.dma_us is None:
                    print(f"  DMA: {res.dma_fail or 'no NESTIO-DMA line'}")
                print(f"{vmm} {cpus} vCPU run {run + 1}: "
                      f"{'ok' if ok else 'FAILED'} ({len(res.rtts)}/{args.pings} replies, "
                      f"{res.cpus} CPUs seen, exit status {res.status}; {res.log})",
                      flush=True)
                rows.append((vmm, cpus, run + 1, res))

    names = [n for n, _ in MILESTONES]
    print()
    print("| VMM | vCPUs | run | " + " | ".join(names)
          + " | ICMP RTT median (min) ms | 64 KiB DMA median us (MB/s) |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    for vmm, cpus, run, res in rows:
        first = res.seen.get("kernel banner")
        cells = [fmt(res.seen.get(n), None if n == "kernel banner" else first) for n in names]
        med = res.rtt_median()
        rtt = f"{med:.3f} ({min(res.rtts):.3f})" if med is not None else "-"
        dma = f"{res.dma_us:.1f} ({65536 / res.dma_us:.1f})" if res.dma_us else "-"
        print(f"| {VMM_TITLES[vmm]} | {cpus} | {run} | " + " | ".join(cells)
              + f" | {rtt} | {dma} |")

    # Ratios to nestio at the same vCPU count (best run of each).
    def best(vmm, cpus, key):
        vals = [r.seen.get(key) for v, c, _, r in rows if v == vmm and c == cpus]
        vals = [x for x in vals if x is not None]
        return min(vals) if vals else None

    def best_rtt(vmm, cpus):
        vals = [r.rtt_median() for v, c, _, r in rows if v == vmm and c == cpus]
        vals = [x for x in vals if x is not None]
        return min(vals) if vals else None

    def best_dma(vmm, cpus):
        vals = [r.dma_us for v, c, _, r in rows if v == vmm and c == cpus and r.dma_us]
        return min(vals) if vals else None

    if "nestio" in vmms:
        print()
        print("Ratios to nestio at the same vCPU count (best run; < 1: faster than nestio):")
        print()
        print("| VMM | vCPUs | /init | first ping reply | ICMP RTT | 64 KiB DMA time |")
        print("|---|---|---|---|---|---|")
        for cpus in cpu_counts:
            base = (best("nestio", cpus, "/init"), best("nestio", cpus, "first ping reply"),
                    best_rtt("nestio", cpus), best_dma("nestio", cpus))
            for vmm in vmms:
                vals = (best(vmm, cpus, "/init"), best(vmm, cpus, "first ping reply"),
                        best_rtt(vmm, cpus), best_dma(vmm, cpus))
                cells = [f"{v / b:.2f}" if v is not None and b else "-"
                         for v, b in zip(vals, base)]
                print(f"| {VMM_TITLES[vmm]} | {cpus} | " + " | ".join(cells) + " |")

    failed = [f"{v} {c} vCPU run {r}" for v, c, r, res in rows
              if len(res.rtts) < args.pings or (args.dma and v != "qemu72" and not res.dma_us)]
    if failed:
        print("\nFAILED (missing ping replies or DMA result): " + ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
