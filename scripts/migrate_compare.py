#!/usr/bin/env python3
"""Live-migrate the test Linux mid-ping under nestio and under QEMU 7.2 + KVM, in one
run, and print total time, downtime and lost pings of each, and the downtime ratio.

Both guests run the same kernel and initramfs (linux/build.sh) and command line, ping
10.0.2.2 every 200 ms (nestio.count=N) through an emulated e1000 and are migrated once
sequence 10 has been answered:
- nestio: source `nestio run --control` with an e1000 device process, destination
  `nestio run --migrate-listen` with a *new* e1000 process, `nestio migrate`
  (downtime as the source VMM measures it: vCPU pause to the destination's answer);
- QEMU: source and `-incoming` destination, each with its own in-process e1000 on its
  user network, QMP `migrate` with the same downtime limit (downtime as QEMU reports it
  in query-migrate).

Usage: scripts/migrate_compare.py [--nestio target/debug/nestio] [--count 60]
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "console=ttyS0 reboot=k noapic noxsave clearcpuid=smap,popcnt nestio.mode=ping"
TIMEOUT = 900


def linux_paths():
    out = subprocess.run([os.path.join(REPO, "linux/build.sh")], check=True,
                         capture_output=True, text=True).stdout
    kv = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
    return kv["NESTIO_LINUX_VMLINUX"], kv["NESTIO_LINUX_INITRAMFS"]


class Proc:
    """A process whose stdout+stderr lines are collected."""

    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        self.lines = []
        self.t = threading.Thread(target=self._pump, daemon=True)
        self.t.start()

    def _pump(self):
        for raw in self.p.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def text(self):
        return "".join(self.lines)

    def wait_for(self, what, timeout=TIMEOUT):
        end = time.monotonic() + timeout
        while what not in self.text():
            if self.p.poll() is not None and what not in self.text():
                sys.exit(f"process ended before {what!r}:\n{self.text()[-3000:]}")
            if time.monotonic() > end:
                sys.exit(f"no {what!r} within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def wait(self, timeout=TIMEOUT):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return None

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def seqs(text):
    return [int(m) for m in re.findall(r"icmp_seq=(\d+) ", text)]


def device(nestio, sock):
    d = Proc([nestio, "device", "e1000", "--net", "user", "--socket", sock])
    d.wait_for("serving on", 120)
    return d


def nestio_run(nestio, kernel, initrd, cmdline, tmp):
    s1, s2 = os.path.join(tmp, "src-e1000.sock"), os.path.join(tmp, "dst-e1000.sock")
    ctl, mig = os.path.join(tmp, "vm.ctl"), os.path.join(tmp, "mig.sock")
    d1, d2 = device(nestio, s1), device(nestio, s2)
    common = ["run", "--kernel", kernel, "--initrd", initrd, "--memory", "128M",
              "--cmdline", cmdline]
    dst = Proc([nestio] + common + ["--device", "vfio-user=" + s2,
                                    "--migrate-listen", "unix:" + mig])
    src = Proc([nestio] + common + ["--device", "vfio-user=" + s1, "--control", ctl])
    try:
        dst.wait_for("waiting for an incoming migration", 120)
        src.wait_for("icmp_seq=10 ")
        m = subprocess.run([nestio, "migrate", "--vm", ctl, "--to", "unix:" + mig,
                            "--downtime-ms", "300"], capture_output=True, text=True)
        if m.returncode != 0:
            sys.exit(f"nestio migrate failed:\n{m.stdout}{m.stderr}")
        r = re.search(r"total (\d+) ms, downtime (\d+) ms", m.stdout)
        dst.wait()
        src.wait(30)
        before, after = seqs(src.text()), seqs(dst.text())
        return {"total": int(r.group(1)), "downtime": int(r.group(2)),
                "last_src": max(before), "first_dst": min(after) if after else None,
                "answered": len(before) + len(after)}
    finally:
        for p in (src, dst, d1, d2):
            p.kill()


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r
    cmd("qmp_capabilities")
    return cmd


def qemu_run(kernel, initrd, cmdline, tmp):
    qm = os.path.join(tmp, "qemu-mig.sock")
    base = ["qemu-system-x86_64", "-enable-kvm", "-cpu", "qemu64,+xsaveerptr", "-m", "128M",
            "-nographic", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
            "-append", cmdline, "-netdev", "user,id=n0", "-device", "e1000,netdev=n0,romfile=",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
    dq, sq = os.path.join(tmp, "dst.qmp"), os.path.join(tmp, "src.qmp")
    dst = Proc(base + ["-incoming", "unix:" + qm, "-qmp", f"unix:{dq},server=on,wait=off"])
    src = Proc(base + ["-qmp", f"unix:{sq},server=on,wait=off"])
    try:
        src.wait_for("icmp_seq=10 ")
        c = qmp(sq)
        c("migrate-set-parameters", **{"downtime-limit": 300})
        c("migrate", uri="unix:" + qm)
        while True:
            st = c("query-migrate")["return"]
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        if st.get("status") != "completed":
            sys.exit(f"QEMU migration {st}")
        c("quit")
        dst.wait()
        before, after = seqs(src.text()), seqs(dst.text())
        return {"total": st.get("total-time"), "downtime": st.get("downtime"),
                "last_src": max(before), "first_dst": min(after) if after else None,
                "answered": len(before) + len(after)}
    finally:
        for p in (src, dst):
            p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nestio", default=os.path.join(REPO, "target/debug/nestio"))
    ap.add_argument("--count", type=int, default=60)
    args = ap.parse_args()
    if not os.path.exists(args.nestio):
        sys.exit(f"{args.nestio} missing: cargo build -p nestio first")
    kernel, initrd = linux_paths()
    cmdline = f"{BASE} nestio.count={args.count}"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("nestio (e1000 out of process)", nestio_run(args.nestio, kernel, initrd, cmdline, tmp)),
                ("QEMU 7.2 + KVM (e1000 in process)", qemu_run(kernel, initrd, cmdline, tmp))]
    print("| VMM | total ms | downtime ms | last seq on source | first seq on destination | answered |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['total']} | {r['downtime']} | {r['last_src']} | {r['first_dst']} | "
              f"{r['answered']}/{args.count} |")
    n, q = rows[0][1]["downtime"], rows[1][1]["downtime"]
    if q:
        print(f"downtime ratio nestio / QEMU: {n / q:.2f}")


if __name__ == "__main__":
    main()
