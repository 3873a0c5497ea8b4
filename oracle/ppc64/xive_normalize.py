#!/usr/bin/env python3
"""Keep the XIVE events of a QEMU `-trace 'spapr_xive_*' -trace 'xive_*'` log that
nestio's replay needs, one per line, in log order: `EVENT key=value ...`.

Kept: source claims, device level changes, every H_INT_* hcall with its arguments,
ESB loads/stores and TIMA loads/stores with their values, and the accept/set_cppr
traces that name the vCPU of a TIMA access. Dropped: the router's and presenter's
internal notifications, which the replay recomputes. A `pid@time:` prefix (QEMU's -msg timestamp=on) is removed.
Usage: xive_normalize.py LOG > TRACE
"""
import re
import sys

KEEP = {
    "spapr_xive_claim_irq", "spapr_xive_free_irq", "spapr_xive_set_irq",
    "spapr_xive_get_source_info", "spapr_xive_set_source_config",
    "spapr_xive_get_source_config", "spapr_xive_get_queue_info",
    "spapr_xive_set_queue_config", "spapr_xive_get_queue_config",
    "spapr_xive_set_os_reporting_line", "spapr_xive_get_os_reporting_line",
    "spapr_xive_esb", "spapr_xive_sync", "spapr_xive_reset",
    "xive_source_esb_read", "xive_source_esb_write",
    "xive_tctx_tm_read", "xive_tctx_tm_write",
    # QEMU 7.2's TIMA access traces do not name the vCPU; these two do (target=N),
    # next to the access they belong to (accept before the acknowledge load's trace,
    # set_cppr after the CPPR store's trace).
    "xive_tctx_accept", "xive_tctx_set_cppr",
}
prefix = re.compile(r"^\d+@[\d.]+:")

print("# QEMU 7.2 sPAPR XIVE trace (oracle/ppc64/record-xive.sh); replayed by "
      "crates/xive/tests/qemu_replay.rs")
with open(sys.argv[1], errors="replace") as f:
    for line in f:
        line = prefix.sub("", line.strip())
        if line.split(" ", 1)[0] in KEEP:
            print(line)
