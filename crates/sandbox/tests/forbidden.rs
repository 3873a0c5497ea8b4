//! A forbidden system call ends only the sandboxed process, with a message naming the
//! call. The test re-runs this test binary as a child (selected by an environment
//! variable); the child installs a filter and makes a call outside its allowlist.

use std::process::{Command, Output};

use nestio_sandbox::{Mode, Profile, Sandbox, BLOCKED_EXIT_STATUS, BLOCKED_MESSAGE};

const CHILD: &str = "NESTIO_SANDBOX_TEST_CHILD";

/// Runs test `name` of this binary in a child process with `CHILD=role`.
fn child(name: &str, role: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, role)
        .output()
        .expect("run the child")
}

/// In the child: `execve("/bin/true")` after installing `mode` the way `how` says.
fn forbidden_exec(mode: Mode, process_wide: bool) {
    let sandbox = Sandbox::new(mode);
    if process_wide {
        sandbox.install_process(Profile::Device).unwrap();
    } else {
        sandbox.install_thread(Profile::Vcpu).unwrap();
    }
    // The child writes a marker so the parent knows the filter was installed.
    eprintln!("child: filter installed ({mode})");
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated path, argv and envp arrays ending in NULL.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    eprintln!(
        "child: execve returned: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(3);
}

#[test]
fn forbidden_call_kills_the_sandboxed_process_with_its_name() {
    if let Ok(role) = std::env::var(CHILD) {
        match role.as_str() {
            "process" => forbidden_exec(Mode::On, true),
            "thread" => {
                // A thread filter confines that thread only: the call is made from a
                // thread that installed the vCPU profile.
                std::thread::spawn(|| forbidden_exec(Mode::On, false))
                    .join()
                    .unwrap();
            }
            _ => {}
        }
        return;
    }
    for (role, filter) in [("process", "(device filter)"), ("thread", "(vcpu filter)")] {
        let out = child(
            "forbidden_call_kills_the_sandboxed_process_with_its_name",
            role,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("child: filter installed (on)"),
            "{role}: {stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(BLOCKED_EXIT_STATUS),
            "{role}: {stderr}"
        );
        let line = stderr
            .lines()
            .find(|l| l.contains(BLOCKED_MESSAGE))
            .unwrap_or_else(|| panic!("{role}: no report in {stderr}"));
        assert_eq!(
            line,
            format!(
                "nestio: system call 59 (execve) {BLOCKED_MESSAGE} {filter}; rerun with \
                 --seccomp=log to find it"
            ),
            "{role}"
        );
        assert!(!stderr.contains("execve returned"), "{role}: {stderr}");
    }
    // This (parent) process is unaffected: it still makes the call the child could not.
    let st = Command::new("/bin/true").status().unwrap();
    assert!(st.success());
}

#[test]
fn log_mode_lets_the_call_through() {
    if let Ok(role) = std::env::var(CHILD) {
        if role == "log" {
            forbidden_exec(Mode::Log, true);
        }
        return;
    }
    let out = child("log_mode_lets_the_call_through", "log");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("child: filter installed (log)"), "{stderr}");
    // execve succeeded: the child became /bin/true and exited 0, with no report.
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains(BLOCKED_MESSAGE), "{stderr}");
}

#[test]
fn process_filter_after_a_thread_filter_is_refused_with_a_reason() {
    if let Ok(role) = std::env::var(CHILD) {
        if role == "order" {
            let sandbox = Sandbox::new(Mode::On);
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                sandbox.install_thread(Profile::Vcpu).unwrap();
                ready_tx.send(()).unwrap();
                let _ = rx.recv();
            });
            ready_rx.recv().unwrap();
            let e = sandbox.install_process(Profile::Vmm).unwrap_err();
            eprintln!("child: {e}");
            tx.send(()).unwrap();
            t.join().unwrap();
            std::process::exit(7);
        }
        return;
    }
    let out = child(
        "process_filter_after_a_thread_filter_is_refused_with_a_reason",
        "order",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("cannot install the vmm seccomp filter on every thread: thread")
            && stderr.contains("already has a filter of its own"),
        "{stderr}"
    );
}
