#!/bin/sh
# Re-record QEMU's observations of every SMMUv3 scenario (see README.md).
set -eu
cd "$(dirname "$0")/../../.."
command -v qemu-system-aarch64 >/dev/null || {
    echo "qemu-system-aarch64 missing: apt-get install qemu-system-arm" >&2
    exit 1
}
NESTIO_ORACLE_RECORD=1 cargo test -p nestio-iommu --test smmuv3_qemu -- --nocapture
git diff --stat -- oracle/aarch64/smmu/expected
