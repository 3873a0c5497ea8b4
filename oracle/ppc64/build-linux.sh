#!/usr/bin/env bash
# Build a tiny pseries (ppc64le) Linux used as an independent client of QEMU's sPAPR
# models (TCE/DDW IOMMU, XIVE): Debian's linux-source-6.1 cross-built with Debian's
# gcc-powerpc64le-linux-gnu, tinyconfig + the fragment below (FACTS §10), with a built-in
# uncompressed initramfs holding one static /init (source below).
#
# Usage: oracle/ppc64/build-linux.sh [OUTDIR]      (default: <repo>/target/oracle/ppc64-linux)
# Prints (and writes OUTDIR/paths.env):
#   NESTIO_PPC64_VMLINUX=OUTDIR/vmlinux
# Env: NESTIO_PPC64_JOBS         make -j (default 2)
#      NESTIO_PPC64_NO_INSTALL=1 never call apt-get; fail if something is missing
#
# Boot it (TCG, ~seconds):
#   qemu-system-ppc64 -M pseries,x-vof=on -nographic -no-reboot -m 1G \
#     -kernel OUTDIR/vmlinux -append 'console=hvc0' \
#     -netdev user,id=n0 -device virtio-net-pci,netdev=n0,iommu_platform=on,disable-legacy=on
# /init mounts proc/sys/dev, prints /proc/interrupts, then for every network interface
# (other than lo) in turn: address 10.0.2.15/24, up, 3 ICMP echoes to 10.0.2.2 (slirp's
# gateway answers), down; then powers off (RTAS power-off, QEMU exits). Its lines start
# with "nestio-init:" so a caller can grep them.
#
# Caching: the kernel is rebuilt only when the configuration (fragment + /init source +
# this script's BUILD_VERSION) changes; its hash is OUTDIR/vmlinux.hash. Concurrent
# callers with the same OUTDIR serialise on `flock OUTDIR/.lock`: the second waits and
# then finds the kernel up to date.
set -euo pipefail

BUILD_VERSION=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$REPO/target/oracle/ppc64-linux}"
JOBS="${NESTIO_PPC64_JOBS:-2}"
TARBALL=/usr/src/linux-source-6.1.tar.xz
CROSS=powerpc64le-linux-gnu-

log() { printf 'nestio-ppc64-linux: %s\n' "$*" >&2; }
die() { printf 'nestio-ppc64-linux: error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SRC="$OUT/linux-source-6.1"
BUILD="$OUT/build"
exec 9>"$OUT/.lock"
log "waiting for the lock on $OUT/.lock"
flock 9 || die "cannot lock $OUT/.lock"

# --- 1. host packages --------------------------------------------------------------
need=()
command -v make >/dev/null || need+=(make)
command -v gcc >/dev/null || need+=(gcc)
command -v bc >/dev/null || need+=(bc)
command -v flex >/dev/null || need+=(flex)
command -v bison >/dev/null || need+=(bison)
command -v xz >/dev/null || need+=(xz-utils)
command -v perl >/dev/null || need+=(perl)
[ -e /usr/include/gelf.h ] || need+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v "${CROSS}gcc" >/dev/null || need+=(gcc-powerpc64le-linux-gnu)
[ -e /usr/powerpc64le-linux-gnu/lib/libc.a ] || need+=(libc6-dev-ppc64el-cross)
[ -e "$TARBALL" ] || need+=(linux-source-6.1)
if [ "${#need[@]}" -gt 0 ]; then
    [ "${NESTIO_PPC64_NO_INSTALL:-0}" = 1 ] && die "missing packages: ${need[*]} (install them or unset NESTIO_PPC64_NO_INSTALL)"
    [ "$(id -u)" = 0 ] || die "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    touch /tmp/apt.lock 2>/dev/null || true
    flock /tmp/apt.lock apt-get update -qq
    flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
[ -e "$TARBALL" ] || die "$TARBALL is missing after installing linux-source-6.1"

# --- 2. the configuration fragment and /init ---------------------------------------
FRAG="$OUT/config.fragment"
INIT_C="$OUT/init.c"
CPIO_LIST="$OUT/initramfs.list"
cat > "$FRAG.new" <<EOF
CONFIG_PPC64=y
CONFIG_PPC_BOOK3S_64=y
CONFIG_CPU_LITTLE_ENDIAN=y
CONFIG_PPC_PSERIES=y
CONFIG_PPC_SPLPAR=y
CONFIG_PPC_XIVE_SPAPR=y
CONFIG_PPC_OF_BOOT_TRAMPOLINE=y
CONFIG_HZ_100=y
CONFIG_PRINTK=y
CONFIG_PRINTK_TIME=y
CONFIG_TTY=y
CONFIG_HVC_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_INITRAMFS_SOURCE="$CPIO_LIST"
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_PROC_FS=y
CONFIG_SYSFS=y
CONFIG_DEVTMPFS=y
CONFIG_FUTEX=y
CONFIG_MULTIUSER=y
CONFIG_PCI=y
CONFIG_PCI_MSI=y
CONFIG_NET=y
CONFIG_INET=y
CONFIG_NETDEVICES=y
CONFIG_NET_CORE=y
CONFIG_ETHERNET=y
CONFIG_NET_VENDOR_INTEL=y
CONFIG_E1000=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_NET=y
# CONFIG_IPV6 is not set
# CONFIG_MODULES is not set
EOF
mv "$FRAG.new" "$FRAG"

cat > "$INIT_C.new" <<'EOF'
/* nestio ppc64 oracle /init: bring every NIC up in turn, ping slirp's gateway, power off. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static void cat(const char *path)
{
    char buf[1024];
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0)
            break;
        if (write(1, buf, (size_t)n) < 0)
            break;
    }
    close(fd);
}

static unsigned short csum(const void *data, size_t len)
{
    const unsigned char *p = data;
    unsigned long sum = 0;
    for (size_t i = 0; i + 1 < len; i += 2)
        sum += (unsigned)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        sum += (unsigned)(p[len - 1] << 8);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return htons((unsigned short)~sum);
}

static int set_addr(int s, const char *ifname, unsigned long req, const char *addr)
{
    struct ifreq ifr;
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, addr, &sin->sin_addr);
    return ioctl(s, req, &ifr);
}

static int set_up(int s, const char *ifname, int up)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        return -1;
    if (up)
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    else
        ifr.ifr_flags &= ~IFF_UP;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static void ping_on(const char *ifname)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) {
        printf("nestio-init: %s: socket: %s\n", ifname, strerror(errno));
        return;
    }
    if (set_addr(s, ifname, SIOCSIFADDR, "10.0.2.15") < 0 ||
        set_addr(s, ifname, SIOCSIFNETMASK, "255.255.255.0") < 0 || set_up(s, ifname, 1) < 0) {
        printf("nestio-init: %s: configure: %s\n", ifname, strerror(errno));
        close(s);
        return;
    }
    int r = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    if (r < 0) {
        printf("nestio-init: %s: raw socket: %s\n", ifname, strerror(errno));
    } else {
        struct timeval tv = { .tv_sec = 2 };
        setsockopt(r, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(r, SOL_SOCKET, SO_BINDTODEVICE, ifname, (socklen_t)strlen(ifname));
        struct sockaddr_in dst = { .sin_family = AF_INET };
        inet_pton(AF_INET, "10.0.2.2", &dst.sin_addr);
        int replies = 0;
        for (int seq = 1; seq <= 3; seq++) {
            unsigned char pkt[64];
            struct icmphdr *h = (struct icmphdr *)pkt;
            memset(pkt, 0xa5, sizeof pkt);
            h->type = ICMP_ECHO;
            h->code = 0;
            h->un.echo.id = htons(0x4e53);
            h->un.echo.sequence = htons((unsigned short)seq);
            h->checksum = 0;
            h->checksum = csum(pkt, sizeof pkt);
            if (sendto(r, pkt, sizeof pkt, 0, (struct sockaddr *)&dst, sizeof dst) < 0) {
                printf("nestio-init: %s: sendto: %s\n", ifname, strerror(errno));
                continue;
            }
            for (;;) {
                unsigned char in[256];
                ssize_t n = recv(r, in, sizeof in, 0);
                if (n < 0) {
                    printf("nestio-init: %s: no reply seq=%d (%s)\n", ifname, seq, strerror(errno));
                    break;
                }
                struct iphdr *ip = (struct iphdr *)in;
                size_t hl = (size_t)ip->ihl * 4;
                if ((size_t)n < hl + sizeof(struct icmphdr))
                    continue;
                struct icmphdr *rh = (struct icmphdr *)(in + hl);
                if (rh->type == ICMP_ECHOREPLY && rh->un.echo.id == htons(0x4e53) &&
                    ntohs(rh->un.echo.sequence) == seq) {
                    printf("nestio-init: %s: ping reply seq=%d\n", ifname, seq);
                    replies++;
                    break;
                }
            }
        }
        printf("nestio-init: %s: %d/3 replies\n", ifname, replies);
        close(r);
    }
    set_up(s, ifname, 0);
    close(s);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    printf("nestio-init: up\n");
    cat("/proc/interrupts");
    struct if_nameindex *ifs = if_nameindex();
    for (struct if_nameindex *i = ifs; i && i->if_index; i++)
        if (strcmp(i->if_name, "lo") != 0)
            ping_on(i->if_name);
    cat("/proc/interrupts");
    printf("nestio-init: power off\n");
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
EOF
mv "$INIT_C.new" "$INIT_C"

cat > "$CPIO_LIST.new" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0555 0 0
dir /sys 0555 0 0
file /init $OUT/init 0755 0 0
EOF
mv "$CPIO_LIST.new" "$CPIO_LIST"

want="$( (echo "v$BUILD_VERSION"; cat "$FRAG" "$INIT_C" "$CPIO_LIST"; "${CROSS}gcc" --version | head -1; stat -c %s "$TARBALL") | sha256sum | cut -d' ' -f1)"
if [ "$want" = "$(cat "$OUT/vmlinux.hash" 2>/dev/null || true)" ] && [ -e "$OUT/vmlinux" ]; then
    log "kernel up to date ($OUT/vmlinux)"
else
    # --- 3. source (unpacked once, pristine: objects go to $BUILD) -------------------
    if [ ! -e "$SRC/.unpacked-v4" ]; then
        # The whole tree: Kconfig sources other architectures' and Documentation's files.
        log "unpacking $TARBALL"
        rm -rf "$SRC"
        tar -C "$OUT" -xf "$TARBALL"
        touch "$SRC/.unpacked-v4"
    fi

    # --- 4. /init (static, ppc64le) ----------------------------------------------------
    log "building /init"
    "${CROSS}gcc" -static -O2 -Wall -Wextra -Werror -o "$OUT/init" "$INIT_C"
    "${CROSS}strip" "$OUT/init"

    # --- 5. configure ------------------------------------------------------------------
    MAKE=(make -C "$SRC" O="$BUILD" ARCH=powerpc CROSS_COMPILE="$CROSS" -j"$JOBS")
    mkdir -p "$BUILD"
    log "configuring: tinyconfig + $FRAG"
    "${MAKE[@]}" -s tinyconfig >&2
    (cd "$BUILD" && ARCH=powerpc CROSS_COMPILE="$CROSS" "$SRC/scripts/kconfig/merge_config.sh" -m .config "$FRAG" >/dev/null)
    "${MAKE[@]}" -s olddefconfig >&2
    bad=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                grep -qxF "$line" "$BUILD/.config" || { log "option not taken: $line"; bad=1; } ;;
            "# CONFIG_"*" is not set")
                sym="${line#\# }"; sym="${sym%% *}"
                if grep -q "^$sym=" "$BUILD/.config"; then log "option still on: $sym"; bad=1; fi ;;
        esac
    done < "$FRAG"
    [ "$bad" = 0 ] || die "the kernel configuration does not match $FRAG (see above)"

    # --- 6. build ----------------------------------------------------------------------
    log "building vmlinux (make -j$JOBS; ~200 s the first time)"
    start=$(date +%s)
    "${MAKE[@]}" -s vmlinux >&2
    log "kernel built in $(( $(date +%s) - start )) s"
    cp "$BUILD/vmlinux" "$OUT/vmlinux.new" && mv "$OUT/vmlinux.new" "$OUT/vmlinux"
    cp "$BUILD/.config" "$OUT/config"
    echo "$want" > "$OUT/vmlinux.hash"
fi

echo "NESTIO_PPC64_VMLINUX=$OUT/vmlinux" | tee "$OUT/paths.env"
