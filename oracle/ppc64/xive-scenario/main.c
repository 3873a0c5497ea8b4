/* Bare-metal pseries client program (VOF): negotiates XIVE exploitation with
 * client-architecture-support, runs the XIVE scenario compiled into scenario.h
 * (hcalls, ESB and TIMA loads/stores in real mode, event-queue dumps) and prints every
 * result with H_PUT_TERM_CHAR in the format crates/xive/tests/scenario.rs produces
 * from nestio's model. Then it halts (QEMU is stopped by the caller's timeout or the
 * "end" line). */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned char u8;

long hcall(u64 op, u64 *args);

/* The compiler may call these for array initialisation. */
void *memset(void *d, int c, unsigned long n)
{
    volatile u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, unsigned long n)
{
    volatile u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

#define H_PUT_TERM_CHAR 0x58
#define H_VOF_CLIENT 0xF005

static u64 be64(u64 v) { return __builtin_bswap64(v); }
static u32 be32(u32 v) { return __builtin_bswap32(v); }

static void put(const char *s, u64 n)
{
    while (n) {
        u64 k = n > 16 ? 16 : n, a[9] = {0}, c[2] = {0, 0};
        for (u64 i = 0; i < k; i++)
            c[i / 8] |= (u64)(u8)s[i] << (56 - 8 * (i % 8));
        a[0] = 0;
        a[1] = k;
        a[2] = c[0];
        a[3] = c[1];
        hcall(H_PUT_TERM_CHAR, a);
        s += k;
        n -= k;
    }
}

static char line[256];
static u64 len;

static void add(const char *s) { while (*s && len < sizeof line) line[len++] = *s++; }
static void hex(u64 v)
{
    char b[19];
    int i = 18;
    b[i] = 0;
    do {
        b[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    b[--i] = 'x';
    b[--i] = '0';
    add(b + i);
}
static void dec(long v)
{
    char b[24];
    int i = 23, neg = v < 0;
    unsigned long u = neg ? -(unsigned long)v : (unsigned long)v;
    b[i] = 0;
    do {
        b[--i] = '0' + u % 10;
        u /= 10;
    } while (u);
    if (neg)
        b[--i] = '-';
    add(b + i);
}
static void sp(void) { add(" "); }
static void flush(void)
{
    add("\r\n");
    put(line, len);
    len = 0;
}

/* client-architecture-support through VOF's client-interface hcall. */
static u8 cas_vec[160] __attribute__((aligned(8)));
static u32 ci_args[16] __attribute__((aligned(8)));
static const char cas_name[] = "ibm,client-architecture-support";
static const char call_method[] = "call-method";
static const char open_name[] = "open";
static const char root_path[] = "/";

/* A client-interface call: service, nargs, nret, then the cells. */
static long ci(const char *service, int nargs, int nret, const u32 *in, u32 *out)
{
    ci_args[0] = be32((u32)(u64)service);
    ci_args[1] = be32(nargs);
    ci_args[2] = be32(nret);
    for (int i = 0; i < nargs; i++)
        ci_args[3 + i] = be32(in[i]);
    for (int i = 0; i < nret; i++)
        ci_args[3 + nargs + i] = 0;
    u64 a[9] = {(u64)ci_args};
    long rc = hcall(H_VOF_CLIENT, a);
    for (int i = 0; i < nret; i++)
        out[i] = be32(ci_args[3 + nargs + i]);
    return rc;
}

static long cas(void)
{
    u32 *w = (u32 *)cas_vec;
    int i = 0;
    /* PVR list: POWER9, POWER10, ISA 3.1 and 3.0 logical PVRs, then the terminator
     * (a pair with a PVR bit outside its mask). */
    w[i++] = be32(0xffff0000); w[i++] = be32(0x004e0000);
    w[i++] = be32(0xffff0000); w[i++] = be32(0x00800000);
    w[i++] = be32(0xffffffff); w[i++] = be32(0x0f000006);
    w[i++] = be32(0xffffffff); w[i++] = be32(0x0f000005);
    w[i++] = be32(0xfffffffe); w[i++] = be32(0x0f000001);
    u8 *v = (u8 *)&w[i];
    int n = 0;
    v[n++] = 4;             /* five option vectors follow */
    v[n++] = 2;             /* vector 1: 3 bytes */
    v[n++] = 0; v[n++] = 0; v[n++] = 0;
    v[n++] = 0; v[n++] = 0; /* vector 2: 1 byte */
    v[n++] = 0; v[n++] = 0; /* vector 3: 1 byte */
    v[n++] = 0; v[n++] = 0; /* vector 4: 1 byte */
    v[n++] = 25;            /* vector 5: 26 bytes, byte 23 = XIVE exploitation */
    for (int k = 1; k <= 26; k++)
        v[n++] = k == 23 ? 0x40 : 0;
    u32 root, r[2], in[3];
    in[0] = (u32)(u64)root_path;
    long rc = ci(open_name, 1, 1, in, &root);
    if (rc)
        return rc;
    in[0] = (u32)(u64)cas_name;
    in[1] = root;
    in[2] = (u32)(u64)cas_vec;
    rc = ci(call_method, 3, 2, in, r);
    return rc ? rc : (long)r[0];
}

#include "scenario.h"

#define ESB_BASE 0x0006010000000000ul
#define TIMA_OS 0x0006030203180000ul + (2ul << 16)

static u64 mmio_ld(u64 a, int size)
{
    switch (size) {
    case 1: return *(volatile u8 *)a;
    case 2: return __builtin_bswap16(*(volatile unsigned short *)a);
    case 4: return be32(*(volatile u32 *)a);
    default: return be64(*(volatile u64 *)a);
    }
}

static void mmio_st(u64 a, int size, u64 v)
{
    switch (size) {
    case 1: *(volatile u8 *)a = v; break;
    case 2: *(volatile unsigned short *)a = __builtin_bswap16(v); break;
    case 4: *(volatile u32 *)a = be32(v); break;
    default: *(volatile u64 *)a = be64(v); break;
    }
    __asm__ volatile("sync" ::: "memory");
}

void main(void)
{
    add("scenario: start");
    flush();
    for (u64 i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        const struct op *o = &ops[i];
        u64 a[9] = {o->a[0], o->a[1], o->a[2], o->a[3], o->a[4], o->a[5], 0, 0, 0};
        dec(i + 1);
        sp();
        switch (o->kind) {
        case OP_CAS:
            add("cas ");
            dec(cas());
            break;
        case OP_HCALL: {
            long rc = hcall(o->a[6], a);
            add("hcall ");
            hex(o->a[6]);
            add(" rc=");
            dec(rc);
            for (int k = 0; k < 4; k++) {
                sp();
                hex(a[k]);
            }
            break;
        }
        case OP_ESB_LOAD:
            add("esb_load ");
            hex(mmio_ld(ESB_BASE + (o->a[0] << 17) + 0x10000 + o->a[1], 8));
            break;
        case OP_ESB_STORE:
            mmio_st(ESB_BASE + (o->a[0] << 17) + (o->a[2] ? 0x10000 : 0) + o->a[1], 8, 0);
            add("esb_store");
            break;
        case OP_TIMA_LOAD:
            add("tima_load ");
            hex(mmio_ld(TIMA_OS + o->a[0], (int)o->a[1]));
            break;
        case OP_TIMA_STORE:
            mmio_st(TIMA_OS + o->a[0], (int)o->a[1], o->a[2]);
            add("tima_store");
            break;
        case OP_QUEUE:
            add("queue");
            for (u64 k = 0; k < o->a[1]; k++) {
                sp();
                hex(be32(((volatile u32 *)o->a[0])[k]));
            }
            break;
        }
        flush();
    }
    add("scenario: end");
    flush();
    for (;;)
        ;
}
