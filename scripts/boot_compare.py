#!/usr/bin/env python3
"""Boot the test Linux under nestio and under QEMU + KVM, one after the other, and
print when each milestone appeared on the serial console (host clock, seconds since
the VMM process started; in brackets, since the kernel's banner, which leaves out
QEMU's firmware).

Both guests run the same kernel and initramfs (linux/build.sh), the same command line,
and ping 10.0.2.2 three times through an emulated e1000: nestio's out-of-process e1000
(`nestio device e1000 --net user`) assigned over vfio-user, or QEMU's in-process e1000
on its user network.

Usage: scripts/boot_compare.py [--runs N]   (needs target/release/nestio: run
`cargo build --release -p nestio` first, and qemu-system-x86_64)
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMDLINE = "console=ttyS0 reboot=k noapic noxsave clearcpuid=smap,popcnt nestio.mode=ping"
MILESTONES = [
    ("kernel banner", lambda l: "Linux version" in l),
    ("e1000 probed", lambda l: "e1000" in l and "eth0: Intel(R) PRO/1000" in l),
    ("/init", lambda l: "NESTIO-INIT: start" in l),
    ("first ping reply", lambda l: "bytes from 10.0.2.2" in l),
    ("exit", lambda l: "NESTIO-INIT: exit" in l),
]


def linux_paths():
    out = subprocess.run([os.path.join(REPO, "linux/build.sh")], check=True,
                         capture_output=True, text=True).stdout
    kv = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
    return kv["NESTIO_LINUX_VMLINUX"], kv["NESTIO_LINUX_INITRAMFS"]


def timed(cmd, timeout=240):
    """Run cmd; return {milestone: seconds} from its stdout lines."""
    seen = {}
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    for raw in p.stdout:
        line = raw.decode(errors="replace")
        t = time.monotonic() - start
        for name, hit in MILESTONES:
            if name not in seen and hit(line):
                seen[name] = t
    p.wait()
    killer.cancel()
    return seen


def nestio_run(nestio, kernel, initrd):
    sock = os.path.join(tempfile.mkdtemp(), "e1000.sock")
    dev = subprocess.Popen([nestio, "device", "e1000", "--net", "user", "--once",
                            "--socket", sock], stdin=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        # The device says "serving on PATH" once it listens.
        for line in dev.stderr:
            if "serving on" in line:
                break
        else:
            sys.exit("nestio device e1000 ended before serving")
        threading.Thread(target=lambda: dev.stderr.read(), daemon=True).start()
        return timed([nestio, "run", "--kernel", kernel, "--initrd", initrd,
                      "--memory", "128M", "--device", "vfio-user=" + sock,
                      "--cmdline", CMDLINE])
    finally:
        dev.kill()
        dev.wait()


def qemu_run(kernel, initrd):
    return timed(["qemu-system-x86_64", "-enable-kvm", "-cpu", "qemu64,+xsaveerptr", "-m", "128M", "-nographic",
                  "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE,
                  "-netdev", "user,id=n0", "-device", "e1000,netdev=n0,romfile=",
                  "-device", "isa-debug-exit,iobase=0xf4,iosize=1"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    nestio = os.path.join(REPO, "target/release/nestio")
    if not os.path.exists(nestio):
        sys.exit("build it first: cargo build --release -p nestio")
    kernel, initrd = linux_paths()
    rows = []
    for i in range(args.runs):
        rows.append(("nestio", i + 1, nestio_run(nestio, kernel, initrd)))
        rows.append(("QEMU 7.2 + KVM", i + 1, qemu_run(kernel, initrd)))
    names = [n for n, _ in MILESTONES]
    print("| VMM | run | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for vmm, run, seen in rows:
        first = seen.get("kernel banner")
        cells = []
        for n in names:
            t = seen.get(n)
            if t is None:
                cells.append("-")
            elif n == "kernel banner" or first is None:
                cells.append(f"{t:.2f}")
            else:
                cells.append(f"{t:.2f} (+{t - first:.2f})")
        print(f"| {vmm} | {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
