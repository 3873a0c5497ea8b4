/*
 * nestio guest /init: one static program instead of a shell and busybox (each
 * fork+exec costs up to a second on hosts that emulate guest kernel code).
 *
 * It mounts proc, sysfs and devtmpfs, configures eth0 with a static IPv4 address
 * and a default route, then acts according to the kernel command line:
 *
 *   nestio.mode=ping     (default) ping the target like `ping -c COUNT TARGET`
 *   nestio.mode=boot     only report that userspace started
 *   nestio.mode=shell    a tiny console command loop (help, ping, cat, ls, exit)
 *   nestio.mode=vfio     bind the PCI device nestio.pci (default 0000:00:01.0) to
 *                        vfio-pci (unbinding its driver; needs CONFIG_VFIO_PCI and
 *                        `vfio.enable_unsafe_noiommu_mode=1`), report its VFIO group,
 *                        then, when /bin/nestio exists, run
 *                        `nestio device vfio --probe` on it, then ping
 *                        nestio.target nestio.count times through the in-guest
 *                        chain (`nestio device vfio --once` serving the device,
 *                        `nestio check e1000-ping` driving it from user space with
 *                        DMA to physical addresses), then hand the device back to
 *                        Linux's e1000 driver and ping the same way with it, for
 *                        the timing comparison (issue 18)
 *   nestio.pci=ADDR      the device of nestio.mode=vfio
 *   nestio.target=IP     ping target            (default 10.0.2.2)
 *   nestio.ip=IP[/LEN]   address of eth0        (default 10.0.2.15/24)
 *   nestio.gw=IP         default gateway        (default 10.0.2.2; "none" for no route)
 *   nestio.iface=NAME    interface              (default eth0)
 *   nestio.count=N       echo requests          (default 3; 0: do not ping, only
 *                        answer with nestio.answer)
 *   nestio.ping=builtin|busybox   who pings: this program (default) or busybox's
 *                        `ping -c COUNT TARGET` (/bin/busybox in the initramfs; one
 *                        fork+exec more)
 *   nestio.timeout=MS    wait for each reply    (default 5000)
 *   nestio.end=reboot|poweroff|halt             (default reboot: with reboot=k the
 *                        kernel writes 0xfe to port 0x64, which ends the VM)
 *   nestio.answer=N      after pinging, stay up until the kernel has answered N echo
 *                        requests from outside (Icmp OutEchoReps in /proc/net/snmp),
 *                        so a test can ping the guest (default 0: do not wait)
 *   nestio.wait=MS       the longest that wait lasts (default 60000)
 *   nestio.dmabench=N    after pinging, drive nestio's sample device (PCI
 *                        1b36:7e57, no kernel driver: its BAR0 through sysfs):
 *                        check one DMA read and one DMA write against a page of
 *                        this process, then time N 64 KiB checksum DMAs of guest
 *                        RAM at 16 MiB (default 0: skip)
 *
 * Markers on the console, for tests and humans:
 *   NESTIO-INIT: start ...        userspace runs
 *   NESTIO-CPUS: N in /proc/cpuinfo   processors the kernel brought up
 *   NESTIO-NET: eth0 up ...       interface configured (carrier seen or not)
 *   NESTIO-PING: ok 3/3           all echo requests answered ("fail N/M" otherwise)
 *   NESTIO-PING: busybox exit S   busybox ping ended with status S (0: replies came)
 *   NESTIO-ANSWER: waiting for N echo requests   (nestio.answer=N) ping me now
 *   NESTIO-ANSWER: ok N/N         the kernel answered them ("fail K/N" on timeout)
 *   NESTIO-DMA: ok 64 KiB x N: median U us (M MB/s) ...   (nestio.dmabench=N;
 *                                 "NESTIO-DMA: fail REASON" otherwise)
 *   NESTIO-VFIO: bound ADDR group G   the device is on vfio-pci, group /dev/vfio/G
 *   NESTIO-VFIO: probe exit S     `nestio device vfio --probe` ended with status S
 *   NESTIO-VFIO: conformance pass N fail M na K restricted R (exit S, server exit T)
 *                                 then the vfio-user conformance suite against
 *                                 `nestio device vfio --once` on the same device
 *   NESTIO-E1000-PING: ...        the user-space driver's lines (per-echo round trips,
 *                                 then "ok N/N median X ms" or "fail K/N")
 *   NESTIO-VFIO: chain ping ok    every echo through the in-guest chain was answered
 *   NESTIO-VFIO: linux e1000 ping ok N/N median Y ms   the same with Linux's driver
 *   NESTIO-VFIO: median round trip: user-space chain X ms, Linux e1000 Y ms (ratio R)
 *   NESTIO-INIT: exit STATUS      just before the VM is ended
 *
 * Exit status (0 ok, 1 echo replies missing, 2 no interface, 3 not pinged from outside
 * within nestio.wait, 4 a device check failed: the sample device's DMA (nestio.dmabench)
 * or the vfio mode): before ending the VM, init writes STATUS to the
 * debug-exit I/O port 0xf4; nestio's VMM makes that byte its process exit status
 * (QEMU's isa-debug-exit reports (STATUS << 1) | 1).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <signal.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define DEBUG_EXIT_PORT 0xf4
#define CMDLINE_MAX 4096

struct config {
	char mode[16];
	char pci[16];
	char iface[IFNAMSIZ];
	struct in_addr ip, mask, gw, target;
	int have_gw;
	int count;
	int timeout_ms;
	char end[16];
	int answer;
	int wait_ms;
	int busybox_ping;
	int dmabench;
};

static double uptime(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_BOOTTIME, &ts) != 0)
		return 0.0;
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ---- command line ------------------------------------------------------------ */

static int parse_ip(const char *s, struct in_addr *out)
{
	return inet_pton(AF_INET, s, out) == 1 ? 0 : -1;
}

static int parse_ip_len(const char *s, struct in_addr *ip, struct in_addr *mask)
{
	char buf[64];
	char *slash;
	long len = 24;

	if (strlen(s) >= sizeof(buf))
		return -1;
	strcpy(buf, s);
	slash = strchr(buf, '/');
	if (slash) {
		char *end;

		*slash = '\0';
		errno = 0;
		len = strtol(slash + 1, &end, 10);
		if (errno || *end || len < 0 || len > 32)
			return -1;
	}
	if (parse_ip(buf, ip))
		return -1;
	mask->s_addr = htonl(len == 0 ? 0 : 0xffffffffu << (32 - len));
	return 0;
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

static void copy_word(char *dst, size_t cap, const char *src)
{
	snprintf(dst, cap, "%s", src);
}

static void defaults(struct config *c)
{
	memset(c, 0, sizeof(*c));
	copy_word(c->mode, sizeof(c->mode), "ping");
	copy_word(c->pci, sizeof(c->pci), "0000:00:01.0");
	copy_word(c->iface, sizeof(c->iface), "eth0");
	parse_ip_len("10.0.2.15/24", &c->ip, &c->mask);
	parse_ip("10.0.2.2", &c->gw);
	c->have_gw = 1;
	parse_ip("10.0.2.2", &c->target);
	c->count = 3;
	c->timeout_ms = 5000;
	copy_word(c->end, sizeof(c->end), "reboot");
	c->answer = 0;
	c->wait_ms = 60000;
	c->busybox_ping = 0;
}

/* Apply one `key=value` word; unknown nestio.* keys are reported, others ignored. */
static void apply_word(struct config *c, const char *word)
{
	const char *v = strchr(word, '=');
	size_t klen;
	int bad = 0;

	if (strncmp(word, "nestio.", 7) != 0 || !v)
		return;
	klen = (size_t)(v - word);
	v++;
#define KEY(k) (klen == strlen(k) && strncmp(word, k, klen) == 0)
	if (KEY("nestio.mode")) {
		if (strcmp(v, "ping") && strcmp(v, "boot") && strcmp(v, "shell") &&
		    strcmp(v, "vfio"))
			bad = 1;
		else
			copy_word(c->mode, sizeof(c->mode), v);
	} else if (KEY("nestio.pci")) {
		if (strlen(v) != 12 || strchr(v, '/'))
			bad = 1;
		else
			copy_word(c->pci, sizeof(c->pci), v);
	} else if (KEY("nestio.target")) {
		bad = parse_ip(v, &c->target);
	} else if (KEY("nestio.ip")) {
		bad = parse_ip_len(v, &c->ip, &c->mask);
	} else if (KEY("nestio.gw")) {
		if (strcmp(v, "none") == 0)
			c->have_gw = 0;
		else
			bad = parse_ip(v, &c->gw), c->have_gw = !bad;
	} else if (KEY("nestio.iface")) {
		if (strlen(v) == 0 || strlen(v) >= IFNAMSIZ)
			bad = 1;
		else
			copy_word(c->iface, sizeof(c->iface), v);
	} else if (KEY("nestio.count")) {
		bad = parse_int(v, 0, 1000000, &c->count);
	} else if (KEY("nestio.timeout")) {
		bad = parse_int(v, 1, 3600000, &c->timeout_ms);
	} else if (KEY("nestio.ping")) {
		if (strcmp(v, "builtin") == 0)
			c->busybox_ping = 0;
		else if (strcmp(v, "busybox") == 0)
			c->busybox_ping = 1;
		else
			bad = 1;
	} else if (KEY("nestio.answer")) {
		bad = parse_int(v, 0, 1000000, &c->answer);
	} else if (KEY("nestio.dmabench")) {
		bad = parse_int(v, 0, 100000, &c->dmabench);
	} else if (KEY("nestio.wait")) {
		bad = parse_int(v, 1, 3600000, &c->wait_ms);
	} else if (KEY("nestio.end")) {
		if (strcmp(v, "reboot") && strcmp(v, "poweroff") && strcmp(v, "halt"))
			bad = 1;
		else
			copy_word(c->end, sizeof(c->end), v);
	} else {
		say("NESTIO-INIT: unknown option %s (ignored)\n", word);
		return;
	}
#undef KEY
	if (bad)
		say("NESTIO-INIT: bad value in %s (default kept)\n", word);
}

static void read_cmdline(struct config *c)
{
	char buf[CMDLINE_MAX];
	ssize_t n;
	char *save = NULL, *w;
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);

	if (fd < 0) {
		say("NESTIO-INIT: cannot read /proc/cmdline: %s\n", strerror(errno));
		return;
	}
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = '\0';
	for (w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save))
		apply_word(c, w);
}

/* ---- network setup ----------------------------------------------------------- */

static void set_sin(struct sockaddr *sa, struct in_addr a)
{
	struct sockaddr_in sin;

	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr = a;
	memcpy(sa, &sin, sizeof(sin));
}

static int if_up(int fd, const char *name)
{
	struct ifreq ifr;

	memset(&ifr, 0, sizeof(ifr));
	copy_word(ifr.ifr_name, sizeof(ifr.ifr_name), name);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	return ioctl(fd, SIOCSIFFLAGS, &ifr);
}

static int carrier(const char *iface)
{
	char path[96], c = '0';
	int fd;

	snprintf(path, sizeof(path), "/sys/class/net/%s/carrier", iface);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	if (read(fd, &c, 1) != 1)
		c = '0';
	close(fd);
	return c == '1';
}

static int net_setup(const struct config *c)
{
	struct ifreq ifr;
	struct rtentry rt;
	char ip[INET_ADDRSTRLEN], mask[INET_ADDRSTRLEN], gw[INET_ADDRSTRLEN];
	double t0;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		say("NESTIO-NET: socket: %s\n", strerror(errno));
		return -1;
	}
	if (if_up(fd, "lo") < 0)
		say("NESTIO-NET: lo up: %s\n", strerror(errno));

	memset(&ifr, 0, sizeof(ifr));
	copy_word(ifr.ifr_name, sizeof(ifr.ifr_name), c->iface);
	set_sin(&ifr.ifr_addr, c->ip);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0) {
		say("NESTIO-NET: %s: cannot set the address: %s (is the e1000 driver bound? see the kernel log)\n",
		    c->iface, strerror(errno));
		close(fd);
		return -1;
	}
	set_sin(&ifr.ifr_netmask, c->mask);
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0) {
		say("NESTIO-NET: %s: cannot set the netmask: %s\n", c->iface, strerror(errno));
		close(fd);
		return -1;
	}
	if (if_up(fd, c->iface) < 0) {
		say("NESTIO-NET: %s: cannot bring it up: %s\n", c->iface, strerror(errno));
		close(fd);
		return -1;
	}
	/* The e1000 reports link from its watchdog, shortly after going up; packets
	 * sent before that are dropped by the noop qdisc. */
	t0 = now_ms();
	while (!carrier(c->iface) && now_ms() - t0 < 10000)
		usleep(10000);

	if (c->have_gw) {
		memset(&rt, 0, sizeof(rt));
		set_sin(&rt.rt_dst, (struct in_addr){ .s_addr = 0 });
		set_sin(&rt.rt_genmask, (struct in_addr){ .s_addr = 0 });
		set_sin(&rt.rt_gateway, c->gw);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = (char *)c->iface;
		if (ioctl(fd, SIOCADDRT, &rt) < 0 && errno != EEXIST)
			say("NESTIO-NET: default route: %s\n", strerror(errno));
	}
	close(fd);
	inet_ntop(AF_INET, &c->ip, ip, sizeof(ip));
	inet_ntop(AF_INET, &c->mask, mask, sizeof(mask));
	inet_ntop(AF_INET, &c->gw, gw, sizeof(gw));
	say("NESTIO-NET: %s up %s netmask %s gw %s carrier %s (uptime %.2f s)\n", c->iface, ip,
	    mask, c->have_gw ? gw : "none", carrier(c->iface) ? "yes" : "no", uptime());
	return 0;
}

/* ---- ping -------------------------------------------------------------------- */

static uint16_t checksum(const void *data, size_t len)
{
	const uint8_t *p = data;
	uint32_t sum = 0;

	while (len > 1) {
		sum += (uint32_t)p[0] << 8 | p[1];
		p += 2;
		len -= 2;
	}
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons((uint16_t)~sum);
}

#define PING_DATA 56

/*
 * Returns the number of replies; prints like iputils ping. When `rtts` is not NULL it
 * receives the round trip (ms) of each reply, in order (room for `count`).
 */
static int ping_rtts(struct in_addr target, int count, int timeout_ms, double *rtts)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_addr = target };
	uint16_t id = (uint16_t)getpid();
	double min = 0, max = 0, sum = 0;
	int received = 0, sent = 0, seq;
	char name[INET_ADDRSTRLEN];
	int fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP);

	inet_ntop(AF_INET, &target, name, sizeof(name));
	if (fd < 0) {
		say("NESTIO-PING: raw ICMP socket: %s\n", strerror(errno));
		return 0;
	}
	say("PING %s (%s) %d(%d) bytes of data.\n", name, name, PING_DATA,
	    PING_DATA + 8 + 20);
	for (seq = 1; seq <= count; seq++) {
		uint8_t pkt[8 + PING_DATA];
		struct icmphdr *h = (struct icmphdr *)pkt;
		double sent_at = now_ms(), deadline = sent_at + timeout_ms;
		size_t i;
		int got = 0;

		memset(pkt, 0, sizeof(pkt));
		h->type = ICMP_ECHO;
		h->un.echo.id = htons(id);
		h->un.echo.sequence = htons((uint16_t)seq);
		for (i = 8; i < sizeof(pkt); i++)
			pkt[i] = (uint8_t)i;
		h->checksum = checksum(pkt, sizeof(pkt));
		if (sendto(fd, pkt, sizeof(pkt), 0, (struct sockaddr *)&to, sizeof(to)) < 0) {
			say("ping: sendto %s: %s\n", name, strerror(errno));
			usleep(200000);
			sent++;
			continue;
		}
		sent++;
		while (!got) {
			uint8_t buf[1500];
			struct pollfd pfd = { .fd = fd, .events = POLLIN };
			double left = deadline - now_ms();
			struct sockaddr_in from;
			socklen_t flen = sizeof(from);
			ssize_t n;
			size_t ihl;
			const struct icmphdr *r;

			if (left <= 0)
				break;
			if (poll(&pfd, 1, (int)left + 1) <= 0)
				continue;
			n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &flen);
			if (n < (ssize_t)sizeof(struct iphdr))
				continue;
			ihl = (size_t)(buf[0] & 0xf) * 4;
			if (ihl < 20 || (size_t)n < ihl + 8)
				continue;
			r = (const struct icmphdr *)(buf + ihl);
			if (r->type != ICMP_ECHOREPLY || ntohs(r->un.echo.id) != id ||
			    ntohs(r->un.echo.sequence) != seq || from.sin_addr.s_addr != target.s_addr)
				continue;
			{
				double rtt = now_ms() - sent_at;
				char src[INET_ADDRSTRLEN];

				inet_ntop(AF_INET, &from.sin_addr, src, sizeof(src));
				say("%zd bytes from %s: icmp_seq=%d ttl=%d time=%.3f ms (uptime %.2f s)\n",
				    n - (ssize_t)ihl, src, seq, buf[8], rtt, uptime());
				if (!received || rtt < min)
					min = rtt;
				if (rtt > max)
					max = rtt;
				sum += rtt;
				if (rtts)
					rtts[received] = rtt;
				received++;
				got = 1;
			}
		}
		if (!got)
			say("no reply from %s for icmp_seq=%d within %d ms\n", name, seq, timeout_ms);
	}
	close(fd);
	say("\n--- %s ping statistics ---\n", name);
	say("%d packets transmitted, %d received, %d%% packet loss\n", sent, received,
	    sent ? (sent - received) * 100 / sent : 0);
	if (received)
		say("rtt min/avg/max = %.3f/%.3f/%.3f ms\n", min, sum / received, max);
	return received;
}

static int ping(struct in_addr target, int count, int timeout_ms)
{
	return ping_rtts(target, count, timeout_ms, NULL);
}

/* ---- being pinged ------------------------------------------------------------ */

/*
 * The kernel's count of echo replies sent (Icmp OutEchoReps in /proc/net/snmp: a
 * header line of names and a line of values, both starting "Icmp: "); -1 if unknown.
 */
static long out_echo_reps(void)
{
	char buf[8192], *names = NULL, *values = NULL, *save1 = NULL, *save2 = NULL;
	char *n, *v;
	ssize_t len;
	int fd = open("/proc/net/snmp", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	len = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (len <= 0)
		return -1;
	buf[len] = '\0';
	for (char *line = buf; line && *line;) {
		char *next = strchr(line, '\n');

		if (next)
			*next++ = '\0';
		if (strncmp(line, "Icmp: ", 6) == 0) {
			if (!names)
				names = line + 6;
			else if (!values)
				values = line + 6;
		}
		line = next;
	}
	if (!names || !values)
		return -1;
	for (n = strtok_r(names, " ", &save1), v = strtok_r(values, " ", &save2); n && v;
	     n = strtok_r(NULL, " ", &save1), v = strtok_r(NULL, " ", &save2)) {
		if (strcmp(n, "OutEchoReps") == 0)
			return strtol(v, NULL, 10);
	}
	return -1;
}

/* Wait until the kernel has answered `want` more echo requests; returns how many. */
static int be_pinged(int want, int wait_ms)
{
	long base = out_echo_reps(), now = base;
	double t0 = now_ms();

	if (base < 0) {
		say("NESTIO-ANSWER: cannot read Icmp OutEchoReps from /proc/net/snmp\n");
		return 0;
	}
	say("NESTIO-ANSWER: waiting for %d echo requests (at most %d ms)\n", want, wait_ms);
	while (now - base < want && now_ms() - t0 < wait_ms) {
		usleep(20000);
		now = out_echo_reps();
		if (now < 0)
			now = base;
	}
	return (int)(now - base < want ? now - base : want);
}

/* ---- shell mode -------------------------------------------------------------- */

static void cat(const char *path)
{
	char buf[4096];
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0) {
		say("cat: %s: %s\n", path, strerror(errno));
		return;
	}
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, (size_t)n, stdout);
	close(fd);
	fflush(stdout);
}

static void ls(const char *path)
{
	struct dirent *d;
	DIR *dir = opendir(path);

	if (!dir) {
		say("ls: %s: %s\n", path, strerror(errno));
		return;
	}
	while ((d = readdir(dir)))
		say("%s\n", d->d_name);
	closedir(dir);
}

/* Returns the exit status the user asked for. */
static int shell(const struct config *c)
{
	char line[256];

	say("NESTIO-SHELL: ready (commands: help, ping [IP [COUNT]], cat FILE, ls [DIR], exit [STATUS])\n");
	for (;;) {
		char *argv[4] = { 0 };
		char *save = NULL;
		int argc = 0;

		say("nestio# ");
		if (!fgets(line, sizeof(line), stdin)) {
			say("\nNESTIO-SHELL: console closed\n");
			return 0;
		}
		for (char *w = strtok_r(line, " \t\r\n", &save); w && argc < 4;
		     w = strtok_r(NULL, " \t\r\n", &save))
			argv[argc++] = w;
		if (argc == 0)
			continue;
		if (strcmp(argv[0], "help") == 0) {
			say("ping [IP [COUNT]] | cat FILE | ls [DIR] | exit [STATUS]\n");
		} else if (strcmp(argv[0], "ping") == 0) {
			struct in_addr t = c->target;
			int n = 3;

			if (argc > 1 && parse_ip(argv[1], &t)) {
				say("ping: bad address %s\n", argv[1]);
				continue;
			}
			if (argc > 2 && parse_int(argv[2], 1, 1000, &n)) {
				say("ping: bad count %s\n", argv[2]);
				continue;
			}
			ping(t, n, c->timeout_ms);
		} else if (strcmp(argv[0], "cat") == 0 && argc > 1) {
			cat(argv[1]);
		} else if (strcmp(argv[0], "ls") == 0) {
			ls(argc > 1 ? argv[1] : "/");
		} else if (strcmp(argv[0], "exit") == 0) {
			int st = 0;

			if (argc > 1 && parse_int(argv[1], 0, 255, &st))
				say("exit: bad status %s, using 0\n", argv[1]);
			return st;
		} else {
			say("%s: unknown command (try help)\n", argv[0]);
		}
	}
}

/* ---- busybox ping ------------------------------------------------------------- */

/* Run `busybox ping -c COUNT -W SECS TARGET`; returns its exit status (-1: could not run). */
static int busybox_ping(const struct config *c)
{
	char count[16], wait_s[16], target[INET_ADDRSTRLEN];
	char *argv[] = { "ping", "-c", count, "-W", wait_s, target, NULL };
	int st;
	pid_t pid;

	snprintf(count, sizeof(count), "%d", c->count);
	snprintf(wait_s, sizeof(wait_s), "%d", (c->timeout_ms + 999) / 1000);
	if (!inet_ntop(AF_INET, &c->target, target, sizeof(target)))
		return -1;
	say("NESTIO-PING: running busybox ping -c %s %s\n", count, target);
	pid = fork();
	if (pid < 0) {
		say("NESTIO-PING: fork: %s\n", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		execv("/bin/busybox", argv);
		say("NESTIO-PING: exec /bin/busybox: %s\n", strerror(errno));
		_exit(127);
	}
	while (waitpid(pid, &st, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* ---- sample device DMA (nestio.dmabench=N) ------------------------------------ */

/*
 * nestio's sample device (crates/emulated/src/sample.rs) has no Linux driver, so init
 * drives it from userspace: sysfs `enable` turns on memory decoding, a config-space
 * write sets bus mastering, BAR0 (`resource0`) is mapped and its DMA engine
 * programmed. Physical addresses of a page of this process come from
 * /proc/self/pagemap (init runs as root). The device reaches guest RAM through
 * whichever vfio-user client the VMM is, so this checks and times that client's DMA
 * path: the checksum command reads guest memory, the fill command writes it.
 */
#define SAMPLE_VENDOR 0x1b36
#define SAMPLE_DEVICE 0x7e57
#define SR_INT_MASK 0x14
#define SR_SRC_LO 0x20
#define SR_SRC_HI 0x24
#define SR_DST_LO 0x28
#define SR_DST_HI 0x2c
#define SR_LEN 0x30
#define SR_CMD 0x34
#define SR_STATUS 0x38
#define SR_PATTERN 0x3c
#define SR_RESULT 0x40
#define SCMD_FILL 2
#define SCMD_CHECKSUM 3
#define SST_DONE (1u << 1)
#define SST_ERROR (1u << 2)
#define DMA_BENCH_LEN 65536u
#define DMA_BENCH_SRC 0x1000000ull /* 16 MiB: the kernel image, RAM in every VMM */

static volatile uint32_t *sample_bar;

static void sr_write(unsigned off, uint32_t v)
{
	sample_bar[off / 4] = v;
}

static uint32_t sr_read(unsigned off)
{
	return sample_bar[off / 4];
}

/* The sysfs directory of the first 1b36:7e57 function, or -1. */
static int find_sample(char *dir, size_t cap)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	int found = -1;

	if (!d)
		return -1;
	while (found < 0 && (e = readdir(d)) != NULL) {
		char path[300], buf[32];
		unsigned long ven = 0, dev = 0;
		FILE *f;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", e->d_name);
		if ((f = fopen(path, "r")) != NULL) {
			if (fgets(buf, sizeof(buf), f))
				ven = strtoul(buf, NULL, 16);
			fclose(f);
		}
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", e->d_name);
		if ((f = fopen(path, "r")) != NULL) {
			if (fgets(buf, sizeof(buf), f))
				dev = strtoul(buf, NULL, 16);
			fclose(f);
		}
		if (ven == SAMPLE_VENDOR && dev == SAMPLE_DEVICE) {
			snprintf(dir, cap, "/sys/bus/pci/devices/%s", e->d_name);
			found = 0;
		}
	}
	closedir(d);
	return found;
}

static uint32_t adler32(const unsigned char *p, size_t n)
{
	uint32_t a = 1, b = 0;

	while (n--) {
		a = (a + *p++) % 65521;
		b = (b + a) % 65521;
	}
	return (b << 16) | a;
}

/* Guest-physical address of the (locked) page at `v`, or 0. */
static uint64_t phys_of(const void *v)
{
	uint64_t entry = 0;
	long page = sysconf(_SC_PAGESIZE);
	int fd = open("/proc/self/pagemap", O_RDONLY);
	off_t at = (off_t)((uintptr_t)v / (uintptr_t)page) * 8;

	if (fd < 0)
		return 0;
	if (pread(fd, &entry, sizeof(entry), at) != (ssize_t)sizeof(entry))
		entry = 0;
	close(fd);
	if (!(entry >> 63) || (entry & ((1ull << 55) - 1)) == 0)
		return 0;
	return (entry & ((1ull << 55) - 1)) * (uint64_t)page + (uintptr_t)v % (uintptr_t)page;
}

/* Run one programmed command (CMD write, STATUS polled); 0 or the failing status. */
static uint32_t dma_go(uint32_t cmd)
{
	uint32_t st = 0;
	int i;

	sr_write(SR_CMD, cmd);
	for (i = 0; i < 1000000; i++) {
		st = sr_read(SR_STATUS);
		if (st & (SST_DONE | SST_ERROR))
			break;
	}
	return (st & SST_DONE) && !(st & SST_ERROR) ? 0 : (st ? st : 0xffffffffu);
}

static void dma_program(uint64_t src, uint64_t dst, uint32_t len, uint32_t pattern)
{
	sr_write(SR_SRC_LO, (uint32_t)src);
	sr_write(SR_SRC_HI, (uint32_t)(src >> 32));
	sr_write(SR_DST_LO, (uint32_t)dst);
	sr_write(SR_DST_HI, (uint32_t)(dst >> 32));
	sr_write(SR_LEN, len);
	sr_write(SR_PATTERN, pattern);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* 0 when every check passed (the NESTIO-DMA: ok line printed), -1 otherwise. */
static int dma_bench(int n)
{
	char dir[300], path[340];
	unsigned char *page;
	uint16_t command = 0;
	uint32_t st, want, first = 0;
	uint64_t phys;
	double *us, t0;
	int fd, i, ok = 1;
	size_t k;

	if (find_sample(dir, sizeof(dir)) < 0) {
		say("NESTIO-DMA: fail no sample device 1b36:7e57 in /sys/bus/pci/devices\n");
		return -1;
	}
	snprintf(path, sizeof(path), "%s/enable", dir);
	fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, "1", 1) != 1) {
		say("NESTIO-DMA: fail %s: %s\n", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	close(fd);
	snprintf(path, sizeof(path), "%s/config", dir);
	fd = open(path, O_RDWR);
	if (fd < 0 || pread(fd, &command, 2, 4) != 2) {
		say("NESTIO-DMA: fail %s: %s\n", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	command |= 0x6; /* memory space, bus master */
	if (pwrite(fd, &command, 2, 4) != 2) {
		say("NESTIO-DMA: fail bus master through %s: %s\n", path, strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	snprintf(path, sizeof(path), "%s/resource0", dir);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0) {
		say("NESTIO-DMA: fail %s: %s\n", path, strerror(errno));
		return -1;
	}
	sample_bar = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (sample_bar == MAP_FAILED) {
		say("NESTIO-DMA: fail mmap %s: %s\n", path, strerror(errno));
		return -1;
	}
	sr_write(SR_INT_MASK, 0x7); /* no interrupts: nobody here handles them */

	/* A DMA read and a DMA write of a page of ours, checked byte for byte. */
	page = aligned_alloc(4096, 4096);
	if (!page || mlock(page, 4096) != 0) {
		say("NESTIO-DMA: fail a locked page: %s\n", strerror(errno));
		return -1;
	}
	for (k = 0; k < 4096; k++)
		page[k] = (unsigned char)(k * 7 + 3);
	phys = phys_of(page);
	if (!phys) {
		say("NESTIO-DMA: fail no physical address in /proc/self/pagemap\n");
		return -1;
	}
	dma_program(phys, 0, 4096, 0);
	if ((st = dma_go(SCMD_CHECKSUM)) != 0 || sr_read(SR_RESULT) != adler32(page, 4096)) {
		say("NESTIO-DMA: fail checksum of the page at %#llx: status %#x result %#x want %#x\n",
		    (unsigned long long)phys, st, sr_read(SR_RESULT), adler32(page, 4096));
		return -1;
	}
	dma_program(0, phys, 4096, 0x5aa5c33cu);
	if ((st = dma_go(SCMD_FILL)) != 0) {
		say("NESTIO-DMA: fail fill of the page at %#llx: status %#x\n",
		    (unsigned long long)phys, st);
		return -1;
	}
	for (k = 0; k < 4096; k += 4) {
		uint32_t w;

		memcpy(&w, page + k, 4);
		if (w != 0x5aa5c33cu) {
			say("NESTIO-DMA: fail the device's fill left %#x at offset %zu\n", w, k);
			return -1;
		}
	}

	/* The timed part: the same 64 KiB of guest RAM read by N checksum commands. */
	us = calloc((size_t)n, sizeof(*us));
	if (!us)
		return -1;
	dma_program(DMA_BENCH_SRC, 0, DMA_BENCH_LEN, 0);
	for (i = 0; i < n && ok; i++) {
		t0 = now_ms();
		st = dma_go(SCMD_CHECKSUM);
		us[i] = (now_ms() - t0) * 1e3;
		want = sr_read(SR_RESULT);
		if (st != 0) {
			say("NESTIO-DMA: fail 64 KiB checksum %d: status %#x\n", i, st);
			ok = 0;
		} else if (i == 0) {
			first = want;
		} else if (want != first) {
			say("NESTIO-DMA: fail 64 KiB checksum %d: %#x, the first was %#x\n", i, want, first);
			ok = 0;
		}
	}
	if (ok) {
		qsort(us, (size_t)n, sizeof(*us), cmp_double);
		say("NESTIO-DMA: ok 64 KiB x %d: median %.1f us (%.1f MB/s), best %.1f us; "
		    "page read + write checked at %#llx\n",
		    n, us[n / 2], DMA_BENCH_LEN / us[n / 2], us[0], (unsigned long long)phys);
	}
	free(us);
	return ok ? 0 : -1;
}

/* ---- nestio.mode=vfio: hand the device to vfio-pci (issue 18) --------------- */

static int write_str(const char *path, const char *v)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, v, strlen(v));
	close(fd);
	return n == (ssize_t)strlen(v) ? 0 : -1;
}

/*
 * The vfio-user conformance suite against the kernel-bound device (issue 18): a
 * `nestio device vfio --once` server and `nestio conformance` against it, the
 * suite's report copied to the console and its summary line parsed into
 *   NESTIO-VFIO: conformance pass N fail M na K restricted R (exit S, server exit T)
 * Returns 0 when the suite ran and nothing failed, 4 otherwise.
 */
static int vfio_conformance(const struct config *c, const char *group)
{
	static const char sock[] = "/tmp/conformance.sock";
	char *srv_argv[] = { "nestio", "device", "vfio", "--once", "--group", (char *)group,
			     "--device", (char *)c->pci, "--socket", (char *)sock, NULL };
	char *cli_argv[] = { "nestio", "conformance", "--socket", (char *)sock,
			     "--wait", "60", NULL };
	char out[32768], *sum;
	size_t len = 0;
	ssize_t n;
	int pfd[2], st, srv_st = -1, cli_st = -1;
	int pass = -1, fail = -1, na = -1, restricted = -1;
	pid_t srv, cli;
	double t0 = now_ms();

	say("NESTIO-VFIO: conformance start (uptime %.2f s)\n", uptime());
	unlink(sock);
	if (pipe2(pfd, O_CLOEXEC) < 0)
		return 4;
	srv = fork();
	if (srv < 0)
		return 4;
	if (srv == 0) {
		execv("/bin/nestio", srv_argv);
		_exit(127);
	}
	cli = fork();
	if (cli < 0) {
		kill(srv, SIGKILL);
		return 4;
	}
	if (cli == 0) {
		/* stdout and stderr through one pipe: their lines stay whole and in order. */
		dup2(pfd[1], 1);
		dup2(pfd[1], 2);
		execv("/bin/nestio", cli_argv);
		_exit(127);
	}
	close(pfd[1]);
	/* Copy the report to the console as it comes; keep it to find the summary. */
	for (;;) {
		char buf[1024];

		n = read(pfd[0], buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		fwrite(buf, 1, (size_t)n, stdout);
		fflush(stdout);
		if (len + (size_t)n < sizeof(out)) {
			memcpy(out + len, buf, (size_t)n);
			len += (size_t)n;
		}
	}
	close(pfd[0]);
	out[len] = 0;
	while (waitpid(cli, &st, 0) < 0 && errno == EINTR)
		;
	cli_st = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	/* --once: the server ends with its client; give it 10 s, then end it. */
	for (int i = 0; i < 1000 && waitpid(srv, &st, WNOHANG) != srv; i++)
		usleep(10000);
	if (kill(srv, 0) == 0 && waitpid(srv, &st, WNOHANG) != srv) {
		kill(srv, SIGKILL);
		while (waitpid(srv, &st, 0) < 0 && errno == EINTR)
			;
		st = -1;
	}
	srv_st = (st != -1 && WIFEXITED(st)) ? WEXITSTATUS(st) : -1;
	sum = strstr(out, "CONFORMANCE summary: ");
	if (sum)
		sscanf(sum, "CONFORMANCE summary: pass %d fail %d na %d restricted %d",
		       &pass, &fail, &na, &restricted);
	say("NESTIO-VFIO: conformance pass %d fail %d na %d restricted %d (exit %d, server exit %d)\n",
	    pass, fail, na, restricted, cli_st, srv_st);
	say("NESTIO-VFIO: conformance took %.2f s\n", (now_ms() - t0) / 1000.0);
	return (cli_st == 0 && fail == 0 && pass > 0) ? 0 : 4;
}

/* fork + exec /bin/nestio with `argv`, stdout to `out_fd` when >= 0; the pid or -1. */
static pid_t spawn_nestio(char *const argv[], int out_fd)
{
	pid_t pid = fork();

	if (pid < 0) {
		say("NESTIO-VFIO: fork: %s\n", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		if (out_fd >= 0 && dup2(out_fd, STDOUT_FILENO) < 0)
			_exit(127);
		execv("/bin/nestio", argv);
		say("NESTIO-VFIO: exec /bin/nestio: %s\n", strerror(errno));
		_exit(127);
	}
	return pid;
}

/* The exit status of `pid` (-1: killed or not waitable); waits at most `wait_ms`
 * (0: forever), then kills it. */
static int reap(pid_t pid, int wait_ms)
{
	double t0 = now_ms();
	int st;

	for (;;) {
		pid_t r = waitpid(pid, &st, wait_ms ? WNOHANG : 0);

		if (r == pid)
			return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
		if (r < 0 && errno != EINTR)
			return -1;
		if (wait_ms && now_ms() - t0 > wait_ms) {
			say("NESTIO-VFIO: pid %d still running after %d ms: killing it\n", (int)pid,
			    wait_ms);
			kill(pid, SIGKILL);
			wait_ms = 0;
		} else if (r == 0) {
			usleep(20000);
		}
	}
}

static int cmp_double(const void *a, const void *b);

#define VFIO_CHAIN_SOCKET "/tmp/e1000.sock"
#define VFIO_MAX_PINGS 64

/*
 * The ping through the in-guest chain (issue 18): `nestio device vfio --once` serves
 * the vfio-pci device on a socket, `nestio check e1000-ping` drives it from another
 * process (nestio's e1000 driver over a vfio-user client, DMA at IOVA = physical
 * address of locked pages: noiommu). Its output is copied to the console; the median
 * round trip of its "ok" line goes to `*median_ms`. 0 when every echo was answered.
 */
static int vfio_chain_ping(const struct config *c, const char *group, double *median_ms)
{
	char count[16], peer[INET_ADDRSTRLEN], ip[INET_ADDRSTRLEN];
	char *serve[] = { "nestio", "device", "vfio", "--group", (char *)group, "--device",
			  (char *)c->pci, "--socket", VFIO_CHAIN_SOCKET, "--once", NULL };
	char *check[] = { "nestio", "check", "e1000-ping", "--socket", VFIO_CHAIN_SOCKET,
			  "--count", count, "--peer", peer, "--ip", ip, NULL };
	char line[512];
	struct stat sb;
	double t0;
	pid_t server, client;
	int pipefd[2], st, sst, ok = 0, got = 0, want = 0;
	FILE *out;

	snprintf(count, sizeof(count), "%d",
		 c->count <= 0 ? 3 : c->count > VFIO_MAX_PINGS ? VFIO_MAX_PINGS : c->count);
	inet_ntop(AF_INET, &c->target, peer, sizeof(peer));
	inet_ntop(AF_INET, &c->ip, ip, sizeof(ip));
	unlink(VFIO_CHAIN_SOCKET);
	server = spawn_nestio(serve, -1);
	if (server < 0)
		return -1;
	t0 = now_ms();
	while (stat(VFIO_CHAIN_SOCKET, &sb) < 0) {
		if (waitpid(server, &st, WNOHANG) == server) {
			say("NESTIO-VFIO: the vfio-user server ended before listening (status %d)\n",
			    WIFEXITED(st) ? WEXITSTATUS(st) : -1);
			return -1;
		}
		if (now_ms() - t0 > 30000) {
			say("NESTIO-VFIO: no %s after 30 s\n", VFIO_CHAIN_SOCKET);
			reap(server, 1);
			return -1;
		}
		usleep(20000);
	}
	if (pipe2(pipefd, O_CLOEXEC) < 0) {
		say("NESTIO-VFIO: pipe: %s\n", strerror(errno));
		reap(server, 1);
		return -1;
	}
	client = spawn_nestio(check, pipefd[1]);
	close(pipefd[1]);
	out = fdopen(pipefd[0], "r");
	while (out && fgets(line, sizeof(line), out)) {
		double m;

		say("%s", line);
		if (sscanf(line, "NESTIO-E1000-PING: ok %d/%d median %lf", &got, &want, &m) == 3) {
			*median_ms = m;
			ok = got == want;
		}
	}
	if (out)
		fclose(out);
	else
		close(pipefd[0]);
	st = client < 0 ? -1 : reap(client, 0);
	/* The server ends once its one owner (the check) has gone. */
	sst = reap(server, 10000);
	say("NESTIO-VFIO: user-space chain ping exit %d, server exit %d\n", st, sst);
	return st == 0 && ok ? 0 : -1;
}

/* Hand the device back from vfio-pci to Linux's e1000 driver. */
static int rebind_e1000(const struct config *c)
{
	char path[128];

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", c->pci);
	if (write_str(path, "\n") < 0) {
		say("NESTIO-VFIO: clear %s: %s\n", path, strerror(errno));
		return -1;
	}
	if (write_str("/sys/bus/pci/drivers/vfio-pci/unbind", c->pci) < 0) {
		say("NESTIO-VFIO: unbind %s from vfio-pci: %s\n", c->pci, strerror(errno));
		return -1;
	}
	if (write_str("/sys/bus/pci/drivers/e1000/bind", c->pci) < 0) {
		say("NESTIO-VFIO: bind %s to e1000: %s\n", c->pci, strerror(errno));
		return -1;
	}
	say("NESTIO-VFIO: %s back on Linux's e1000 driver (uptime %.2f s)\n", c->pci, uptime());
	return 0;
}

/*
 * The same pings with Linux's own e1000 driver on the same device, for the timing
 * comparison; the median round trip goes to `*median_ms`. 0 when all were answered.
 */
static int vfio_kernel_ping(const struct config *c, double *median_ms)
{
	double rtts[VFIO_MAX_PINGS];
	int n = c->count > 0 ? c->count : 3, got;

	if (n > VFIO_MAX_PINGS)
		n = VFIO_MAX_PINGS;
	if (rebind_e1000(c) < 0 || net_setup(c) < 0)
		return -1;
	got = ping_rtts(c->target, n, c->timeout_ms, rtts);
	if (got > 0) {
		qsort(rtts, (size_t)got, sizeof(rtts[0]), cmp_double);
		*median_ms = rtts[got / 2];
	}
	say("NESTIO-VFIO: linux e1000 ping %s %d/%d median %.3f ms\n", got == n ? "ok" : "fail",
	    got, n, got > 0 ? *median_ms : 0.0);
	return got == n ? 0 : -1;
}

/* Ping through the chain, then with Linux's driver; both medians. 0 or 4 (failed). */
static int vfio_ping_both(const struct config *c, const char *group)
{
	double chain = 0, kern = 0;
	int chain_ok = vfio_chain_ping(c, group, &chain) == 0;

	say("NESTIO-VFIO: chain ping %s\n", chain_ok ? "ok" : "fail");
	if (!chain_ok || vfio_kernel_ping(c, &kern) < 0)
		return 4;
	say("NESTIO-VFIO: median round trip: user-space chain %.3f ms, Linux e1000 %.3f ms "
	    "(ratio %.2f)\n", chain, kern, kern > 0 ? chain / kern : 0.0);
	return 0;
}

static int vfio_mode(const struct config *c)
{
	char path[128], link[128], group[160];
	char *argv[] = { "nestio", "device", "vfio", "--probe", "--group", group,
			 "--device", (char *)c->pci, "--socket", "/tmp/vfio.sock", NULL };
	ssize_t n;
	const char *g;
	int st;
	pid_t pid;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", c->pci);
	if (write_str(path, "vfio-pci") < 0) {
		say("NESTIO-VFIO: %s: %s\n", path, strerror(errno));
		return 4;
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", c->pci);
	if (write_str(path, c->pci) < 0 && errno != ENOENT)
		say("NESTIO-VFIO: unbind: %s\n", strerror(errno));
	if (write_str("/sys/bus/pci/drivers/vfio-pci/bind", c->pci) < 0) {
		say("NESTIO-VFIO: bind %s to vfio-pci: %s\n", c->pci, strerror(errno));
		return 4;
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", c->pci);
	n = readlink(path, link, sizeof(link) - 1);
	if (n < 0) {
		say("NESTIO-VFIO: %s: %s\n", path, strerror(errno));
		return 4;
	}
	link[n] = 0;
	g = strrchr(link, '/');
	g = g ? g + 1 : link;
	/* A noiommu group's node is /dev/vfio/noiommu-G. */
	snprintf(group, sizeof(group), "/dev/vfio/noiommu-%s", g);
	if (access(group, F_OK) < 0)
		snprintf(group, sizeof(group), "/dev/vfio/%s", g);
	say("NESTIO-VFIO: bound %s group %s (%s)\n", c->pci, g, group);
	if (access("/bin/nestio", X_OK) < 0) {
		say("NESTIO-VFIO: no /bin/nestio in this initramfs; bound only\n");
		return 0;
	}
	pid = fork();
	if (pid < 0)
		return 4;
	if (pid == 0) {
		execv("/bin/nestio", argv);
		say("NESTIO-VFIO: exec /bin/nestio: %s\n", strerror(errno));
		_exit(127);
	}
	while (waitpid(pid, &st, 0) < 0) {
		if (errno != EINTR)
			return 4;
	}
	st = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	say("NESTIO-VFIO: probe exit %d\n", st);
	if (st != 0)
		return 4;
	/* Conformance first (it ends with a device reset), then the pings. */
	if (vfio_conformance(c, group) != 0)
		return 4;
	return vfio_ping_both(c, group);
}

/* ---- the end ----------------------------------------------------------------- */

static void end_vm(const struct config *c, int status)
{
	say("NESTIO-INIT: exit %d (uptime %.2f s)\n", status, uptime());
	/*
	 * fflush only hands the lines to the tty layer; the serial driver sends them
	 * byte by byte afterwards. Wait until the console has transmitted everything, or
	 * the VM ends with the last lines (the results the host reads) still queued.
	 */
	tcdrain(STDOUT_FILENO);
	sync();
	if (ioperm(DEBUG_EXIT_PORT, 1, 1) == 0)
		outb((unsigned char)status, DEBUG_EXIT_PORT);
	else
		say("NESTIO-INIT: ioperm(0x%x): %s; ending without an exit status\n",
		    DEBUG_EXIT_PORT, strerror(errno));
	if (strcmp(c->end, "poweroff") == 0)
		reboot(RB_POWER_OFF);
	else if (strcmp(c->end, "halt") == 0)
		reboot(RB_HALT_SYSTEM);
	else
		reboot(RB_AUTOBOOT);
	say("NESTIO-INIT: reboot: %s\n", strerror(errno));
	for (;;)
		pause();
}

static void mount_one(const char *src, const char *dst, const char *type)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, MS_NOSUID | MS_NOEXEC, NULL) < 0 && errno != EBUSY)
		say("NESTIO-INIT: mount %s on %s: %s\n", type, dst, strerror(errno));
}

/* Processors the kernel brought up: the "processor" lines of /proc/cpuinfo. */
static int count_cpus(void)
{
	char line[256];
	int n = 0;
	FILE *f = fopen("/proc/cpuinfo", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, "processor", 9) == 0)
			n++;
	fclose(f);
	return n;
}

int main(void)
{
	struct config c;
	int status = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	mount_one("proc", "/proc", "proc");
	mount_one("sysfs", "/sys", "sysfs");
	mount_one("devtmpfs", "/dev", "devtmpfs");
	defaults(&c);
	read_cmdline(&c);
	say("NESTIO-INIT: start mode=%s (uptime %.2f s)\n", c.mode, uptime());
	say("NESTIO-CPUS: %d in /proc/cpuinfo\n", count_cpus());

	if (strcmp(c.mode, "boot") == 0) {
		end_vm(&c, 0);
	}
	if (strcmp(c.mode, "vfio") == 0) {
		end_vm(&c, vfio_mode(&c));
	}
	if (net_setup(&c) < 0) {
		if (strcmp(c.mode, "shell") != 0)
			end_vm(&c, 2);
	}
	if (strcmp(c.mode, "shell") == 0) {
		status = shell(&c);
	} else if (c.busybox_ping) {
		int st = busybox_ping(&c);

		say("NESTIO-PING: busybox exit %d\n", st);
		if (st != 0)
			status = 1;
	} else {
		int got = c.count > 0 ? ping(c.target, c.count, c.timeout_ms) : 0;

		if (c.count == 0) {
			say("NESTIO-PING: skipped (nestio.count=0)\n");
		} else if (got == c.count) {
			say("NESTIO-PING: ok %d/%d\n", got, c.count);
		} else {
			say("NESTIO-PING: fail %d/%d\n", got, c.count);
			status = 1;
		}
		if (c.answer > 0) {
			int answered = be_pinged(c.answer, c.wait_ms);

			say("NESTIO-ANSWER: %s %d/%d\n", answered == c.answer ? "ok" : "fail",
			    answered, c.answer);
			if (answered != c.answer && status == 0)
				status = 3;
		}
		if (c.dmabench > 0 && dma_bench(c.dmabench) < 0 && status == 0)
			status = 4;
	}
	end_vm(&c, status);
	return status;
}
