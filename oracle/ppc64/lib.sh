# Shared by the ppc64 oracle recorders (record-*.sh); sourced, never run. The caller
# sets `set -euo pipefail`, HERE (this directory) and ORACLE (its log prefix, e.g.
# nestio-record-tce) before sourcing.
#
# Env:   NESTIO_PPC64_LINUX_DIR     kernel cache of build-linux.sh (default
#                                   <repo>/target/oracle/ppc64-linux)
#        NESTIO_PPC64_NO_INSTALL=1  never call apt-get

REPO="$(cd "$HERE/../.." && pwd)"
KDIR="${NESTIO_PPC64_LINUX_DIR:-$REPO/target/oracle/ppc64-linux}"

log() { printf '%s: %s\n' "$ORACLE" "$*" >&2; }
die() { printf '%s: error: %s\n' "$ORACLE" "$*" >&2; exit 1; }

# need_tools CMD:PACKAGE...: apt-get install the packages whose command is missing
# (under /tmp/apt.lock, shared with the other builds), or die saying which are missing.
need_tools() {
    local need=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
    done
    [ "${#need[@]}" -gt 0 ] || return 0
    [ "${NESTIO_PPC64_NO_INSTALL:-0}" = 1 ] && die "missing packages: ${need[*]}"
    [ "$(id -u)" = 0 ] || die "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    touch /tmp/apt.lock 2>/dev/null || true
    flock /tmp/apt.lock apt-get update -qq
    flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

# build_kernel: build (or reuse) the pseries kernel with build-linux.sh into KDIR and
# set VMLINUX.
build_kernel() {
    "$HERE/build-linux.sh" "$KDIR" >/dev/null
    VMLINUX="$KDIR/vmlinux"
    [ -e "$VMLINUX" ] || die "no kernel at $VMLINUX"
}

# make_work_dir: a scratch directory in WORK, removed when the script exits.
make_work_dir() {
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
}
