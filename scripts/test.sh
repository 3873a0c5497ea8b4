#!/usr/bin/env bash
# Runs every nestio test. Installs the system packages the tests use (tshark, iproute2,
# iputils-ping, qemu-system-x86 as an independent e1000 peer, qemu-system-ppc/-arm and
# the powerpc64le/aarch64 cross compilers as oracles) when missing and we
# are root; otherwise the tests that need them SKIP loudly. As root with apt, also builds the guest Linux (linux/build.sh: the first build
# installs packages and takes a few minutes, later runs reuse target/linux/) so that
# the Linux guest tests run; elsewhere they use a kernel built before, or SKIP.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v tshark >/dev/null 2>&1 || need+=(tshark)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v iasl >/dev/null 2>&1 || need+=(acpica-tools)   # tests/acpi.rs: iasl -d oracle
# Independent oracles for the POWER and ARM models (oracle/): QEMU's own XIVE, sPAPR TCE
# and SMMUv3 models, and the cross compilers for their bare-metal payloads and kernels.
command -v g++ >/dev/null 2>&1 || need+=(g++)   # libfuzzer-sys's build script (fuzz/ check)
command -v qemu-system-ppc64 >/dev/null 2>&1 || need+=(qemu-system-ppc)
command -v qemu-system-aarch64 >/dev/null 2>&1 || need+=(qemu-system-arm)
command -v powerpc64le-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-powerpc64le-linux-gnu)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
[ -e /usr/src/linux-source-6.1.tar.xz ] || need+=(linux-source-6.1)   # kernel headers as oracle (fsl-mc, hvcall.h)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "WARNING: ${need[*]} missing and cannot install (not root / no apt): the tests that need them will SKIP" >&2
    fi
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== guest Linux (linux/build.sh; first build: a few minutes)"
    linux/build.sh
elif [ -e target/linux/out/paths.env ]; then
    echo "== guest Linux (linux/build.sh, cached; NESTIO_LINUX_NO_INSTALL=1)"
    NESTIO_LINUX_NO_INSTALL=1 linux/build.sh || echo "WARNING: linux/build.sh failed: the Linux guest tests will fail" >&2
else
    echo "WARNING: not root / no apt and no guest kernel built: the Linux guest tests will SKIP" >&2
fi

if [ -e target/linux/out/paths.env ]; then
    # Issue 18: the guest binds the emulated e1000 to vfio-pci and a static nestio in its
    # initramfs serves it over vfio-user (crates/kernel-vfio/tests/guest_vfio.rs).
    echo "== static nestio for the guest's initramfs (linux/build.sh NESTIO_LINUX_NESTIO)"
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --target x86_64-unknown-linux-gnu -p nestio
    export NESTIO_LINUX_NESTIO="$PWD/target/x86_64-unknown-linux-gnu/release/nestio"
    NESTIO_LINUX_NO_INSTALL=1 linux/build.sh >/dev/null
fi

# The fuzz targets are a separate workspace (cargo-fuzz builds them with sanitizers);
# their corpora are replayed by nestio/tests/fuzz_corpus.rs, and this keeps every
# target compiling (a broken fuzz/Cargo.toml once went unnoticed).
echo "== fuzz targets compile (fuzz/, cargo check --bins)"
(cd fuzz && CARGO_TARGET_DIR="$PWD/../target/fuzz-check" cargo check --bins --quiet)

echo "== cargo test (workspace)"
cargo test --workspace "$@"
