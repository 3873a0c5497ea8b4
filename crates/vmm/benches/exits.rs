//! MMIO exit round trip to an in-process device versus a vfio-user device whose BAR
//! writes wait for their reply (`posted-writes=off`, "before") and one whose writes are
//! posted (the default, "after"): the MMIO write ratios, vfio-user / in-process, of both
//! from one guest run.
//! `cargo bench -p nestio-vmm --bench exits` (needs /dev/kvm).

use std::sync::Arc;

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: /dev/kvm is missing; the exit benchmark needs KVM");
        return;
    }
    // All threads (vCPU, device server, client) on one CPU, so the result measures the
    // exit path rather than where the scheduler put the threads (a cross-CPU wake-up
    // costs tens of microseconds on a nested VM).
    let _pin = nestio_vfio_user::bench::Pin::current();
    let dir = std::env::temp_dir().join(format!("nestio-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Two servers (a server serves one client at a time): one for the device with
    // posted writes off ("before"), one with them on ("after").
    let mut sockets = Vec::new();
    for name in ["sync", "posted"] {
        let socket = dir.join(format!("sample-{name}.sock"));
        let listener = nestio_vfio_user::bind(&socket).expect("bind vfio-user socket");
        let remote = nestio_emulated::sample::sample_device().expect("sample device");
        std::thread::spawn(move || {
            let server =
                nestio_vfio_user::Server::new(remote, nestio_vfio_user::ServerConfig::default());
            let _ = server.serve_listener(listener);
        });
        sockets.push(socket);
    }
    let local: Arc<dyn nestio_device_model::VfioDevice> =
        nestio_emulated::sample::sample_device().expect("sample device");
    let r = nestio_vmm::bench::posted_write_costs(
        nestio_vmm::payloads::SAMPLETEST,
        local,
        sockets[0].clone(),
        sockets[1].clone(),
    );
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    match r {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
