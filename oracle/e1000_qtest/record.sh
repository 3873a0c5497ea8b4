#!/usr/bin/env bash
# Re-record QEMU's side of the e1000 register-level differential test
# (crates/emulated/tests/e1000_qtest.rs) into qemu-7.2.txt, and print every value with
# the differences marked. Needs Debian's qemu-system-x86 (7.2); nothing is fetched.
# After re-recording, review the KNOWN table in the test against the printed DIFF lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v qemu-system-x86_64 >/dev/null || {
    echo "qemu-system-x86_64 is missing: apt-get install qemu-system-x86" >&2
    exit 1
}
NESTIO_QTEST_RECORD=1 NESTIO_QTEST_DUMP=1 \
    cargo test -p nestio-emulated --test e1000_qtest -- --nocapture
