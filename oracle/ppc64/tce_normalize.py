#!/usr/bin/env python3
"""Turn QEMU's `-trace 'spapr_iommu_*'` log (backend `log`) into a small, stable
recording that nestio's TCE model replays (crates/iommu/tests/qemu_tce_replay.rs).

Usage: tce_normalize.py RAW_LOG NAME DMA64_WIN_ADDR > NAME.trace

Output: one event per line, `kind key=value ...`, numbers in hex. Kinds:
  query   buid addr avail max pgmask            ibm,query-pe-dma-window (success)
  create  buid addr pg win start liobn          ibm,create-pe-dma-window (success)
  remove  liobn                                 ibm,remove-pe-dma-window
  reset   buid addr                             ibm,reset-pe-dma-window (or the
                                                default window restored by a remove)
  put     liobn ioba tce ret                    H_PUT_TCE
  get     liobn ioba ret tce                    H_GET_TCE
  indirect liobn ioba list i tce ret            H_PUT_TCE_INDIRECT (i: index of the
                                                last entry written or the failing one;
                                                tce: that entry)
  stuff   liobn ioba tce npages ret             H_STUFF_TCE (ioba: QEMU traces the
                                                address *after* the loop)
  xlate   liobn addr gpa perm mask              a device access translated (addr is
                                                the offset in the window)
Compression (every call keeps its arguments and result): a run of consecutive events of
one kind that differ only in `ioba` (or `addr`), by a constant step, is one line with
`rep=N step=S` (N >= 2 events, the first one's values given). `xlate` events are kept
once per distinct (liobn, page, gpa, perm, mask) between two TCE-changing events.
"""
import re
import sys

LINE = re.compile(r"(?:\d+@[\d.]+:)?(spapr_iommu_\w+)\s+(.*)")
NUM = re.compile(r"(\w+)=(0x[0-9a-fA-F]+|-?\d+)")

# QEMU 7.2 event name -> (our kind, {qemu field: our field})
EVENTS = {
    "spapr_iommu_put": "put",
    "spapr_iommu_pci_put": "put",
    "spapr_iommu_get": "get",
    "spapr_iommu_pci_get": "get",
    "spapr_iommu_indirect": "indirect",
    "spapr_iommu_pci_indirect": "indirect",
    "spapr_iommu_stuff": "stuff",
    "spapr_iommu_pci_stuff": "stuff",
    "spapr_iommu_xlate": "xlate",
    "spapr_iommu_ddw_query": "query",
    "spapr_iommu_ddw_create": "create",
    "spapr_iommu_ddw_remove": "remove",
    "spapr_iommu_ddw_reset": "reset",
}
H = r"(0x[0-9a-fA-F]+|-?\d+)"
# QEMU 7.2's format strings (strings /usr/bin/qemu-system-ppc64 | grep ^spapr_iommu).
FORMATS = {
    "xlate": re.compile(r"liobn=%s %s -> %s perm=%s mask=%s" % (H, H, H, H, H)),
    "query": re.compile(r"buid=%s addr=%s, %s windows available, max window size=%s, mask=%s" % (H, H, H, H, H)),
    "create": re.compile(r"buid=%s addr=%s, page size=%s, requested=%s, start addr=%s, liobn=%s" % (H, H, H, H, H, H)),
}
FIELDS = {
    "xlate": ["liobn", "addr", "gpa", "perm", "mask"],
    "query": ["buid", "addr", "avail", "max", "pgmask"],
    "create": ["buid", "addr", "pg", "win", "start", "liobn"],
}
RENAME = {"tcevalue": "tce", "tcelist": "list", "iobaN": "i", "tceN": "tce"}


def parse(path):
    for raw in open(path, errors="replace"):
        m = LINE.match(raw.strip())
        if not m or m.group(1) not in EVENTS:
            continue
        kind = EVENTS[m.group(1)]
        if kind in FORMATS:
            mm = FORMATS[kind].search(m.group(2))
            if not mm:
                sys.exit("unrecognised %s event: %s" % (kind, raw.strip()))
            fields = dict(zip(FIELDS[kind], (int(v, 0) for v in mm.groups())))
        else:
            fields = {RENAME.get(k, k): int(v, 0) for k, v in NUM.findall(m.group(2))}
        yield kind, fields


def fmt(kind, f):
    def h(v):
        return ("-0x%x" % -v) if v < 0 else ("0x%x" % v)

    return kind + "".join(" %s=%s" % (k, h(v)) for k, v in f.items())


def main():
    raw, name, dma64 = sys.argv[1], sys.argv[2], int(sys.argv[3], 0)
    events = []
    epoch = 0
    seen = set()
    for kind, f in parse(raw):
        if kind == "xlate":
            page = f.get("addr", 0) & ~0xFFF
            key = (f.get("liobn"), page, f.get("gpa"), f.get("perm"), f.get("mask"), epoch)
            if key in seen:
                continue
            seen.add(key)
        elif kind not in ("get", "query"):
            epoch += 1
        events.append((kind, f))

    out = ["# nestio sPAPR TCE oracle recording %s: QEMU spapr_iommu_* events of a pseries Linux 6.1" % name,
           "# regenerate: oracle/ppc64/record-tce.sh (see its header); replayed by crates/iommu/tests/qemu_tce_replay.rs",
           "config dma64_win_addr=0x%x" % dma64]
    i = 0
    while i < len(events):
        kind, f = events[i]
        step_key = "addr" if kind == "xlate" else "ioba"
        n, step = 1, None
        while i + n < len(events):
            k2, f2 = events[i + n]
            if k2 != kind or set(f2) != set(f) or step_key not in f:
                break
            if any(f2[k] != f[k] for k in f if k != step_key):
                break
            d = f2[step_key] - events[i + n - 1][1][step_key]
            if step is None:
                if d == 0:
                    break
                step = d
            elif d != step:
                break
            n += 1
        line = fmt(kind, f)
        if n > 1:
            line += " rep=%d step=0x%x" % (n, step) if step >= 0 else " rep=%d step=-0x%x" % (n, -step)
        out.append(line)
        i += n
    print("\n".join(out))


if __name__ == "__main__":
    main()
