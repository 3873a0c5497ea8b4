//! Packets per second through the e1000 served over vfio-user, driven by a guest
//! driver on the client side (`src/e1000_bench.rs`): ICMP echo to the `user`
//! network's gateway, 60-byte (64 with FCS) and 1500-byte frames, TX by descriptor +
//! doorbell, RX by DMA + interrupt. Each row is compared with a raw socketpair round
//! trip of the same size measured in the same run; the same driver against the
//! in-process device shows what the vfio-user hop costs.
//!
//! `cargo bench -p nestio-emulated --bench e1000_pps` (2000 round trips per size;
//! `NESTIO_BENCH_PACKETS=N` overrides); without `--bench` (as run by `cargo test
//! --benches`) a quick 100-round-trip pass checks that it works.
//!
//! On a small shared VM, thread hand-offs between CPUs cost tens of microseconds and
//! vary run to run; pinning the run to one CPU (`taskset -c 1 target/release/deps/
//! e1000_pps-* --bench`) gives stable numbers. Every figure is the best of 10
//! batches, device and floor batches interleaved.

use nestio_emulated::e1000_bench;

use std::sync::Arc;

use e1000_bench::{DmaVia, IrqMode};
use nestio_device_model::VfioDevice;
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_vfio_user::{Client, Server, ServerConfig};

fn served_client() -> (Arc<Client>, std::thread::JoinHandle<()>) {
    let backend = nestio_net::open_backend("user", None).expect("user backend");
    let dev = E1000::new(E1000Config::new(backend).with_msi(true)).expect("e1000");
    let path = std::env::temp_dir().join(format!("nestio-e1k-bench-{}.sock", std::process::id()));
    let listener = nestio_vfio_user::bind(&path).expect("bind");
    let p2 = path.clone();
    let h = std::thread::spawn(move || {
        let server = Server::new(dev, ServerConfig::default());
        if let Ok((s, _)) = listener.accept() {
            let _ = std::fs::remove_file(&p2);
            if let Err(e) = server.serve_stream(s) {
                eprintln!("server session ended with an error: {e}");
            }
        }
    });
    let client = Arc::new(Client::connect(&path).expect("connect"));
    (client, h)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let packets = std::env::var("NESTIO_BENCH_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 2000 } else { 100 });

    for (mode, via) in [
        (IrqMode::Msi, DmaVia::SharedFd),
        (IrqMode::Intx, DmaVia::SharedFd),
        (IrqMode::Msi, DmaVia::Messages),
    ] {
        let (client, server) = served_client();
        println!(
            "== over vfio-user ({mode:?}, DMA {via:?}, twin socket {}) ==",
            client.twin_socket()
        );
        let dev: Arc<dyn VfioDevice> = client.clone();
        let report = e1000_bench::run(dev, mode, via, packets).expect("measurement over vfio-user");
        println!("{report}");
        drop(client);
        server.join().expect("server thread");
    }

    let backend = nestio_net::open_backend("user", None).expect("user backend");
    let local = E1000::new(E1000Config::new(backend).with_msi(true)).expect("e1000");
    println!("== in process (no vfio-user hop, MSI) ==");
    let report = e1000_bench::run(local, IrqMode::Msi, DmaVia::SharedFd, packets)
        .expect("local measurement");
    println!("{report}");
}
