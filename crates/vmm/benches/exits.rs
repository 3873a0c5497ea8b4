//! MMIO exit round trip to an in-process device versus vfio-user devices whose BAR
//! writes wait for their reply (`posted-writes=off`), are posted as no_reply messages
//! (`posted-ring=off`, "before") and are posted through nestio's shared-memory ring (the
//! default, "after"): the MMIO write ratios, vfio-user / in-process, from one guest run.
//! `NESTIO_RING_POLL_US` sets the server's ring polling window (default 50 µs).
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
    // NESTIO_BENCH_UNPINNED=1 leaves the threads where the scheduler puts them.
    let _pin = std::env::var_os("NESTIO_BENCH_UNPINNED")
        .is_none()
        .then(nestio_vfio_user::bench::Pin::current);
    let dir = std::env::temp_dir().join(format!("nestio-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Three servers (a server serves one client at a time).
    let mut config = nestio_vfio_user::ServerConfig::default();
    if let Some(ring) = nestio_vfio_user::bench::ring_config_from_env() {
        config.posted_ring = Some(ring);
    }
    println!("server ring config: {:?}", config.posted_ring);
    let mut sockets = Vec::new();
    for name in ["sync", "posted", "ring"] {
        let socket = dir.join(format!("sample-{name}.sock"));
        let listener = nestio_vfio_user::bind(&socket).expect("bind vfio-user socket");
        let remote = nestio_emulated::sample::sample_device().expect("sample device");
        let config = config.clone();
        std::thread::spawn(move || {
            let server = nestio_vfio_user::Server::new(remote, config);
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
        sockets[2].clone(),
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
