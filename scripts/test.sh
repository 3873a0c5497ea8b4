#!/usr/bin/env bash
# Runs every nestio test. Installs the system packages the tests use (tshark, iproute2)
# when missing and we are root; otherwise the tests that need them SKIP loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v tshark >/dev/null 2>&1 || need+=(tshark)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "WARNING: ${need[*]} missing and cannot install (not root / no apt): the tests that need them will SKIP" >&2
    fi
fi

echo "== cargo test (workspace)"
cargo test --workspace "$@"
