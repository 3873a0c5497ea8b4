//! MMIO exit round trip to an in-process device versus a vfio-user device, and the cost
//! of interrupt delivery from a device's eventfd to the guest, as ratios from one run.
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
    let socket = dir.join("sample.sock");
    let listener = nestio_vfio_user::bind(&socket).expect("bind vfio-user socket");
    let remote = nestio_emulated::sample::sample_device().expect("sample device");
    std::thread::spawn(move || {
        let server =
            nestio_vfio_user::Server::new(remote, nestio_vfio_user::ServerConfig::default());
        let _ = server.serve_listener(listener);
    });
    let local: Arc<dyn nestio_device_model::VfioDevice> =
        nestio_emulated::sample::sample_device().expect("sample device");
    match nestio_vmm::bench::exit_costs(nestio_vmm::payloads::SAMPLETEST, local, socket.clone()) {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
    let _ = std::fs::remove_file(&socket);
}
