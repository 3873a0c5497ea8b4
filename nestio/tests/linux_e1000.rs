//! A real Linux guest under `nestio run --kernel`, with Linux's own e1000 driver
//! driving an e1000 served by a separate `nestio device` process over vfio-user.
//!
//! The kernel and initramfs come from `linux/build.sh` (scripts/test.sh builds them
//! first; a cached rebuild takes under a second). Without a built kernel the tests SKIP
//! loudly, except under CI=true where that is a failure, as is a missing /dev/kvm (and,
//! for the tap test, missing root, /dev/net/tun, `ip` or `ping`).
//!
//! - user network: the guest configures 10.0.2.15 and pings the gateway 10.0.2.2 three
//!   times (`NESTIO-PING: ok 3/3`, exit status 0);
//! - tap in a network namespace: the guest pings the host kernel's address on the tap,
//!   then stays up (`nestio.answer=3`) while the host pings the guest from inside the
//!   namespace; the namespace is deleted whatever happens.
//!
//! Both read the whole guest console and fail on kernel warnings, oopses, and e1000
//! error lines (hardware error, TX unit hang).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One guest at a time: each boot takes ~10 s of a CPU on these hosts.
static SERIAL: Mutex<()> = Mutex::new(());

/// Longest a guest may run before the test kills it.
const VM_TIMEOUT: Duration = Duration::from_secs(240);

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn skip_or_fail(test: &str, why: &str) {
    if ci() {
        panic!("{test}: {why} (CI=true: this test must run)");
    }
    eprintln!("SKIP: {test}: {why}");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `(vmlinux, initramfs)` from linux/build.sh, or None after a loud SKIP.
fn guest_linux(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !Path::new("/dev/kvm").exists() {
        skip_or_fail(test, "/dev/kvm is missing");
        return None;
    }
    let paths_env = repo().join("target/linux/out/paths.env");
    if !paths_env.exists() && !ci() {
        skip_or_fail(
            test,
            &format!(
                "no guest kernel ({} missing): run linux/build.sh (first build ~4 min) or scripts/test.sh",
                paths_env.display()
            ),
        );
        return None;
    }
    let out = Command::new(repo().join("linux/build.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run linux/build.sh");
    assert!(out.status.success(), "{test}: linux/build.sh failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("linux/build.sh printed no {key}: {text}"))
    };
    Some((get("NESTIO_LINUX_VMLINUX="), get("NESTIO_LINUX_INITRAMFS=")))
}

/// A child process killed (and its socket removed) on drop.
struct Proc {
    child: Child,
    socket: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// `nestio device e1000 --net NET --once --socket S`, optionally inside a netns.
fn device(net: &str, netns: Option<&str>, tag: &str) -> Proc {
    let socket = std::env::temp_dir().join(format!("nestio-lx-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns])
                .arg(env!("CARGO_BIN_EXE_nestio"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_nestio")),
    };
    cmd.args(["device", "e1000", "--net", net, "--once", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null());
    let mut p = Proc {
        child: cmd.spawn().expect("spawn nestio device"),
        socket: Some(socket),
    };
    let t0 = Instant::now();
    let path = p.socket.clone().unwrap_or_default();
    // Listening, not merely bound (the file appears before listen()); `ip netns exec`
    // execs nestio, so the child's pid shows the namespace's socket table.
    while !common::listening(p.child.id(), &path) {
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!("nestio device exited early: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "nothing ever listened on {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

/// A running `nestio run --kernel ...`: its console lines arrive on `lines` with their
/// arrival time.
struct Guest {
    proc: Proc,
    lines: Receiver<(Duration, String)>,
    console: Vec<String>,
    started: Instant,
}

impl Guest {
    fn start(kernel: &Path, initrd: &Path, socket: &Path, cmdline: Option<&str>) -> Guest {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nestio"));
        cmd.arg("run")
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd)
            .args(["--memory", "128M"])
            .arg("--device")
            .arg(format!("vfio-user={}", socket.display()));
        if let Some(c) = cmdline {
            cmd.args(["--cmdline", c]);
        }
        Guest::spawn(cmd)
    }

    /// Start any VMM whose stdout is the guest's serial console.
    fn spawn(mut cmd: Command) -> Guest {
        cmd.stdin(Stdio::null());
        Guest::spawn_with_stdin(cmd)
    }

    /// [`Guest::spawn`] with the caller's choice of stdin.
    fn spawn_with_stdin(mut cmd: Command) -> Guest {
        let started = Instant::now();
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = child.stdout.take().expect("stdout pipe");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                if tx.send((started.elapsed(), text)).is_err() {
                    break;
                }
            }
        });
        Guest {
            proc: Proc {
                child,
                socket: None,
            },
            lines: rx,
            console: Vec::new(),
            started,
        }
    }

    /// Collect console lines until one contains `marker` (true) or the guest's output
    /// ends or the timeout passes (false).
    fn wait_for(&mut self, marker: &str) -> bool {
        loop {
            let left = VM_TIMEOUT.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok((t, line)) => {
                    let hit = line.contains(marker);
                    if hit || line.contains("NESTIO-") || line.contains("Run /init") {
                        eprintln!("  [{:6.2} s] {line}", t.as_secs_f64());
                    }
                    self.console.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Read the rest of the console and the exit status (killed after the timeout).
    fn finish(mut self) -> (Option<i32>, Vec<String>) {
        self.wait_for("\u{0}never");
        let status = loop {
            match self.proc.child.try_wait() {
                Ok(Some(st)) => break st.code(),
                Ok(None) if self.started.elapsed() < VM_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.proc.child.kill();
                    break None;
                }
            }
        };
        (status, std::mem::take(&mut self.console))
    }
}

fn check_console(console: &[String]) {
    let text = console.join("\n");
    assert!(
        text.contains("e1000 0000:00:01.0 eth0: Intel(R) PRO/1000 Network Connection"),
        "Linux's e1000 driver did not probe the device:\n{text}"
    );
    let bad = nestio_vmm::linux::platform::kernel_problems(&text);
    assert!(bad.is_empty(), "kernel reported problems {bad:?}:\n{text}");
}

/// Boots the guest against an e1000 device process on the user network and checks
/// `nestio run` exited 0. Returns the device process (kept alive until the caller is
/// done), the console lines and the joined console text; None after a loud SKIP.
fn run_user_net_guest(
    test: &str,
    tag: &str,
    cmdline: Option<&str>,
) -> Option<(Proc, Vec<String>, String)> {
    let (kernel, initrd) = guest_linux(test)?;
    let dev = device("user", None, tag);
    let socket = dev.socket.clone().unwrap_or_default();
    let guest = Guest::start(&kernel, &initrd, &socket, cmdline);
    let (status, console) = guest.finish();
    let text = console.join("\n");
    assert_eq!(
        status,
        Some(0),
        "nestio run's exit status; console:\n{text}"
    );
    Some((dev, console, text))
}

#[test]
fn linux_e1000_pings_user_gateway_through_device_process() {
    let test = "linux_e1000_pings_user_gateway_through_device_process";
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dev, console, text)) = run_user_net_guest(test, "user", None) else {
        return;
    };
    assert!(text.contains("NESTIO-INIT: start mode=ping"), "{text}");
    assert!(text.contains("NESTIO-NET: eth0 up 10.0.2.15"), "{text}");
    for seq in 1..=3 {
        assert!(
            text.contains(&format!("bytes from 10.0.2.2: icmp_seq={seq} ")),
            "reply {seq} missing:\n{text}"
        );
    }
    assert!(text.contains("3 packets transmitted, 3 received"), "{text}");
    assert!(text.contains("NESTIO-PING: ok 3/3"), "{text}");
    check_console(&console);
    drop(dev);
}

/// The issue's own words: `ping -c 3 10.0.2.2` (busybox's ping, exec'd by init) gets
/// 3 replies through Linux's e1000 driver.
#[test]
fn linux_e1000_busybox_ping_c3_gets_three_replies() {
    let test = "linux_e1000_busybox_ping_c3_gets_three_replies";
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cmdline = format!(
        "{} nestio.mode=ping nestio.ping=busybox",
        nestio_vmm::linux::platform::BASE_CMDLINE
    );
    let Some((dev, console, text)) = run_user_net_guest(test, "bbping", Some(&cmdline)) else {
        return;
    };
    assert!(
        text.contains("NESTIO-PING: running busybox ping -c 3 10.0.2.2"),
        "{text}"
    );
    for seq in 0..3 {
        assert!(
            text.contains(&format!("bytes from 10.0.2.2: seq={seq} ")),
            "busybox reply {seq} missing:\n{text}"
        );
    }
    assert!(
        text.contains("3 packets transmitted, 3 packets received, 0% packet loss"),
        "{text}"
    );
    assert!(text.contains("NESTIO-PING: busybox exit 0"), "{text}");
    check_console(&console);
    drop(dev);
}

use nestio_net::netns::{ip, Netns};

#[test]
fn linux_e1000_tap_pings_both_ways_in_netns() {
    let test = "linux_e1000_tap_pings_both_ways_in_netns";
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail(test, "needs root (tap device, network namespace)");
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        skip_or_fail(test, "/dev/net/tun is missing");
        return;
    }
    if Command::new("ping").arg("-V").output().is_err() {
        skip_or_fail(
            test,
            "`ping` is not installed (apt-get install iputils-ping)",
        );
        return;
    }
    let Some((kernel, initrd)) = guest_linux(test) else {
        return;
    };
    let pid = std::process::id();
    let ns = format!("nestio-lx-{pid}");
    // A namespace of this name can only be left over from an earlier process with our
    // pid that died without cleaning up (e.g. a deadlock guard's abort): remove it.
    let _ = ip(&["netns", "del", &ns]);
    if let Err(e) = ip(&["netns", "add", &ns]) {
        skip_or_fail(test, &format!("cannot create a network namespace: {e}"));
        return;
    }
    let _ns = Netns(ns.clone());
    let tap = format!("nlx{}", pid % 1_000_000_000);
    let dev = device(&format!("tap={tap}"), Some(&ns), "tap");
    ip(&["-n", &ns, "addr", "add", "10.0.5.1/24", "dev", &tap]).unwrap();
    ip(&["-n", &ns, "link", "set", &tap, "up"]).unwrap();

    let cmdline = format!(
        "{} nestio.mode=ping nestio.ip=10.0.5.2/24 nestio.target=10.0.5.1 nestio.gw=none \
         nestio.answer=3 nestio.wait=60000",
        nestio_vmm::linux::platform::BASE_CMDLINE
    );
    let socket = dev.socket.clone().unwrap_or_default();
    let mut guest = Guest::start(&kernel, &initrd, &socket, Some(&cmdline));
    let waiting = guest.wait_for("NESTIO-ANSWER: waiting");
    let host_ping = waiting.then(|| {
        Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-c", "3", "-i", "0.2", "-W", "5",
            ])
            .arg("10.0.5.2")
            .output()
            .expect("run ping in the namespace")
    });
    let (status, console) = guest.finish();
    let text = console.join("\n");
    assert!(waiting, "the guest never waited to be pinged:\n{text}");
    let host_ping = host_ping.unwrap_or_else(|| unreachable!());
    let ping_out = String::from_utf8_lossy(&host_ping.stdout);
    assert!(
        host_ping.status.success() && ping_out.contains("3 received"),
        "the host's ping of the guest failed: {ping_out}{}\nguest console:\n{text}",
        String::from_utf8_lossy(&host_ping.stderr)
    );
    assert_eq!(
        status,
        Some(0),
        "nestio run's exit status; console:\n{text}"
    );
    assert!(text.contains("NESTIO-NET: eth0 up 10.0.5.2"), "{text}");
    assert!(text.contains("bytes from 10.0.5.1: icmp_seq=3 "), "{text}");
    assert!(text.contains("NESTIO-PING: ok 3/3"), "{text}");
    assert!(text.contains("NESTIO-ANSWER: ok 3/3"), "{text}");
    check_console(&console);
    drop(dev);
}

#[test]
fn demo_linux_shows_milestones() {
    let test = "demo_linux_shows_milestones";
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Checks the kernel is there (and builds it under CI); the demo runs build.sh too.
    if guest_linux(test).is_none() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["demo", "--linux"])
        .stdin(Stdio::null())
        .output()
        .expect("run nestio demo --linux");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "linux/build.sh",
        "e1000 0000:00:01.0 eth0: Intel(R) PRO/1000 Network Connection",
        "NESTIO-PING: ok 3/3",
        "[4] milestones",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    // Every milestone was seen (none reads "never").
    for m in [
        "e1000 probed",
        "/init running",
        "first ping reply",
        "VM exit",
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(m))
            .unwrap_or_else(|| panic!("milestone {m} missing:\n{text}"));
        assert!(line.contains("s after VM start"), "{line}");
    }
    // The filtered transcript leaves out most boot chatter.
    assert!(!text.contains("Dentry cache hash table"), "{text}");
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a UDP socket")
        .port()
}

/// Interop with a NIC we did not write: QEMU's own e1000 model, in a QEMU + KVM guest
/// running the same Linux, wired to nestio's e1000 by the `udp` backend (QEMU's
/// `-netdev dgram` framing: one Ethernet frame per datagram). nestio's Linux guest pings
/// the QEMU guest; ARP and ICMP frames cross between the two implementations both ways.
#[test]
fn linux_e1000_pings_a_qemu_guest_over_udp() {
    let test = "linux_e1000_pings_a_qemu_guest_over_udp";
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        skip_or_fail(
            test,
            "QEMU is not installed (apt-get install qemu-system-x86; scripts/test.sh does)",
        );
        return;
    }
    let Some((kernel, initrd)) = guest_linux(test) else {
        return;
    };
    let (ours, theirs) = (free_udp_port(), free_udp_port());

    // The QEMU guest: 10.0.3.1, does not ping, stays up until it has answered 3 echo
    // requests. Its init reports its status through isa-debug-exit: QEMU then exits
    // with (status << 1) | 1. QEMU's default CPU model lacks XSAVEERPTR, so on an AMD
    // host Linux applies its FXSAVE-leak workaround (FNCLEX/EMMS/FILD on every FPU
    // restore), which the instruction emulator of these hosts cannot execute; nestio's
    // VMM passes the host's CPUID, which has the bit. `-cpu host` is refused here (the
    // nested KVM rejects QEMU's ARCH_CAPABILITIES write), so the bit is added by name.
    // `acpi=off`: the peer boots from QEMU's MP table, as it did before the test kernel
    // gained CONFIG_ACPI (QEMU's own ACPI tables cost this guest tens of seconds here).
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-enable-kvm",
        "-cpu",
        "qemu64,+xsaveerptr",
        "-m",
        "128M",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
    ])
    .args(["-serial", "stdio", "-kernel"])
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initrd)
    .arg("-append")
    .arg(format!(
        "{} acpi=off nestio.ip=10.0.3.1/24 nestio.gw=none nestio.count=0 nestio.answer=3 \
             nestio.wait=180000",
        nestio_vmm::linux::platform::BASE_CMDLINE
    ))
    .arg("-netdev")
    .arg(format!(
        "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={theirs},\
             remote.type=inet,remote.host=127.0.0.1,remote.port={ours}"
    ))
    .args(["-device", "e1000,netdev=n0,mac=52:54:00:0e:10:01,romfile="])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"]);
    let mut peer = Guest::spawn(cmd);
    let waiting = peer.wait_for("NESTIO-ANSWER: waiting");
    if !waiting {
        let (status, console) = peer.finish();
        panic!(
            "the QEMU guest never came up (status {status:?}):\n{}",
            console.join("\n")
        );
    }

    // nestio: the e1000 device process on the other end of the wire, and a Linux guest
    // at 10.0.3.2 pinging the QEMU guest.
    let dev = device(
        &format!("udp=127.0.0.1:{ours},127.0.0.1:{theirs}"),
        None,
        "qemu",
    );
    let socket = dev.socket.clone().unwrap_or_default();
    let cmdline = format!(
        "{} nestio.ip=10.0.3.2/24 nestio.gw=none nestio.target=10.0.3.1 nestio.count=3",
        nestio_vmm::linux::platform::BASE_CMDLINE
    );
    let guest = Guest::start(&kernel, &initrd, &socket, Some(&cmdline));
    let (status, console) = guest.finish();
    let text = console.join("\n");
    let (peer_status, peer_console) = peer.finish();
    let peer_text = peer_console.join("\n");
    assert_eq!(
        status,
        Some(0),
        "nestio run's exit status; console:\n{text}\nQEMU guest:\n{peer_text}"
    );
    for seq in 1..=3 {
        assert!(
            text.contains(&format!("bytes from 10.0.3.1: icmp_seq={seq} ")),
            "reply {seq} from the QEMU guest missing:\n{text}"
        );
    }
    assert!(text.contains("NESTIO-PING: ok 3/3"), "{text}");
    check_console(&console);
    // The other side saw the same three requests through QEMU's e1000 and answered them.
    assert!(
        peer_text.contains("NESTIO-ANSWER: ok 3/3"),
        "QEMU guest:\n{peer_text}"
    );
    assert_eq!(
        peer_status,
        Some(1),
        "QEMU's exit status: init status 0 through isa-debug-exit; console:\n{peer_text}"
    );
    drop(dev);
}

/// The serial console takes input: `--console-input stdin` feeds the process's stdin to
/// the guest's UART, and init's shell (`nestio.mode=shell`) reads commands from it.
#[test]
fn linux_shell_reads_commands_from_the_console() {
    let test = "linux_shell_reads_commands_from_the_console";
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((kernel, initrd)) = guest_linux(test) else {
        return;
    };
    let dev = device("user", None, "shell");
    let socket = dev.socket.clone().unwrap_or_default();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nestio"));
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--device")
        .arg(format!("vfio-user={}", socket.display()))
        .args(["--console-input", "stdin", "--cmdline"])
        .arg(format!(
            "{} nestio.mode=shell",
            nestio_vmm::linux::platform::BASE_CMDLINE
        ))
        .stdin(Stdio::piped());
    let mut guest = Guest::spawn_with_stdin(cmd);
    let mut input = guest.proc.child.stdin.take().expect("stdin pipe");
    let mut say = |line: &str| {
        use std::io::Write;
        input
            .write_all(line.as_bytes())
            .expect("write to nestio run's stdin");
    };
    assert!(guest.wait_for("NESTIO-SHELL: ready"), "{:?}", guest.console);
    say("ping 10.0.2.2 2\n");
    assert!(
        guest.wait_for("2 packets transmitted, 2 received"),
        "{:?}",
        guest.console
    );
    // A line longer than the UART's 64-byte FIFO arrives whole.
    say(&format!("cat /proc{}version\n", "/".repeat(80)));
    assert!(guest.wait_for("Linux version 6.1"), "{:?}", guest.console);
    say("exit 7\n");
    let (status, console) = guest.finish();
    let text = console.join("\n");
    assert_eq!(
        status,
        Some(7),
        "the shell's exit status ends the VM:\n{text}"
    );
    // The guest's tty echoed what it received.
    assert!(
        console.iter().any(|l| l.ends_with("ping 10.0.2.2 2")),
        "{text}"
    );
    assert!(!text.contains("No such file"), "{text}");
    check_console(&console);
    drop(dev);
}
