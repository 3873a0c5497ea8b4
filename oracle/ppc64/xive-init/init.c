/* A /init for the XIVE oracle that needs no C library: raw ppc64 system calls only, so
 * it runs on a kernel without AltiVec/VSX (a static glibc program dies of SIGILL
 * there). It brings eth0 up as 10.0.2.15/24, sends 3 ICMP echo requests to slirp's
 * gateway 10.0.2.2 (each reply arrives by an e1000 interrupt through the XIVE), prints
 * "xive-init:" lines and powers off. Loaded as an external initrd over the kernel's
 * built-in initramfs (its /init wins). */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

static long sys(long nr, long a, long b, long c, long d, long e, long f)
{
    register long r0 __asm__("r0") = nr;
    register long r3 __asm__("r3") = a;
    register long r4 __asm__("r4") = b;
    register long r5 __asm__("r5") = c;
    register long r6 __asm__("r6") = d;
    register long r7 __asm__("r7") = e;
    register long r8 __asm__("r8") = f;
    __asm__ volatile("sc\n\tbns+ 1f\n\tneg %1, %1\n1:"
                     : "+r"(r0), "+r"(r3), "+r"(r4), "+r"(r5), "+r"(r6), "+r"(r7), "+r"(r8)
                     :
                     : "r9", "r10", "r11", "r12", "cr0", "ctr", "memory");
    return r3;
}

#define SYS_exit 1
#define SYS_write 4
#define SYS_ioctl 54
#define SYS_reboot 88
#define SYS_socket 326
#define SYS_sendto 335
#define SYS_recvfrom 337
#define SYS_setsockopt 339

static u64 slen(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void say(const char *s) { sys(SYS_write, 1, (long)s, slen(s), 0, 0, 0); }
static void num(long v)
{
    char b[24];
    int i = 23;
    b[i] = 0;
    if (v < 0) { say("-"); v = -v; }
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    say(b + i);
}

struct sockaddr_in { u16 family; u16 port; u32 addr; u8 zero[8]; };
struct ifreq { char name[16]; union { struct sockaddr_in addr; short flags; u8 pad[24]; } u; };
struct timeval { long sec; long usec; };

#define AF_INET 2
#define SOCK_DGRAM 2
#define SOCK_RAW 3
#define IPPROTO_ICMP 1
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define SIOCSIFFLAGS 0x8914
#define IFF_UP 1
#define SOL_SOCKET 1
#define SO_RCVTIMEO 18 /* powerpc: SO_RCVTIMEO_OLD, a struct timeval */

static u32 ip(u8 a, u8 b, u8 c, u8 d) { return a | b << 8 | c << 16 | (u32)d << 24; }

static void ifreq_addr(struct ifreq *r, u32 addr)
{
    for (int i = 0; i < (int)sizeof *r; i++) ((u8 *)r)[i] = 0;
    r->name[0] = 'e'; r->name[1] = 't'; r->name[2] = 'h'; r->name[3] = '0';
    r->u.addr.family = AF_INET;
    r->u.addr.addr = addr;
}

static u16 csum(const u8 *p, int n)
{
    u32 s = 0;
    for (int i = 0; i + 1 < n; i += 2) s += p[i] | p[i + 1] << 8;
    if (n & 1) s += p[n - 1];
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

void _start_c(void)
{
    struct ifreq r;
    long s = sys(SYS_socket, AF_INET, SOCK_DGRAM, 0, 0, 0, 0);
    ifreq_addr(&r, ip(10, 0, 2, 15));
    long a = sys(SYS_ioctl, s, SIOCSIFADDR, (long)&r, 0, 0, 0);
    ifreq_addr(&r, ip(255, 255, 255, 0));
    long m = sys(SYS_ioctl, s, SIOCSIFNETMASK, (long)&r, 0, 0, 0);
    ifreq_addr(&r, 0);
    r.u.flags = IFF_UP;
    long u = sys(SYS_ioctl, s, SIOCSIFFLAGS, (long)&r, 0, 0, 0);
    say("xive-init: eth0 up: "); num(a); say(" "); num(m); say(" "); num(u); say("\n");
    long raw = sys(SYS_socket, AF_INET, SOCK_RAW, IPPROTO_ICMP, 0, 0, 0);
    struct timeval tv = {2, 0};
    sys(SYS_setsockopt, raw, SOL_SOCKET, SO_RCVTIMEO, (long)&tv, sizeof tv, 0);
    struct sockaddr_in gw = {AF_INET, 0, ip(10, 0, 2, 2), {0}};
    int replies = 0;
    /* Up to 10 requests until 3 replies: the first may go out before the link is up. */
    for (int seq = 1; seq <= 10 && replies < 3; seq++) {
        u8 pkt[16] = {8, 0, 0, 0, 0x12, 0x34, 0, (u8)seq, 'x', 'i', 'v', 'e', 0, 0, 0, 0};
        u16 c = csum(pkt, sizeof pkt);
        pkt[2] = c & 0xff;
        pkt[3] = c >> 8;
        sys(SYS_sendto, raw, (long)pkt, sizeof pkt, 0, (long)&gw, sizeof gw);
        u8 buf[128];
        long n = sys(SYS_recvfrom, raw, (long)buf, sizeof buf, 0, 0, 0);
        say("xive-init: echo "); num(seq); say(" -> "); num(n); say("\n");
        if (n >= 28 && buf[20] == 0)
            replies++;
    }
    say("xive-init: replies "); num(replies); say("\n");
    say("xive-init: power off\n");
    sys(SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc, 0, 0, 0);
    sys(SYS_exit, 0, 0, 0, 0, 0, 0);
    for (;;)
        ;
}

/* Entry: the kernel starts /init with r1 = the stack; set up the TOC pointer from our
 * own address (ELFv2: r12 = entry) and call the C code. */
__asm__(".globl _start\n"
        "_start:\n"
        "  bcl 20,31,1f\n"
        "1: mflr 12\n"
        "  addis 2,12,(.TOC.-1b)@ha\n"
        "  addi 2,2,(.TOC.-1b)@l\n"
        "  li 0,0\n"
        "  stdu 0,-128(1)\n"
        "  bl _start_c\n"
        "  nop\n"
        "2: b 2b\n");
