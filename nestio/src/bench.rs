//! `nestio bench`: costs measured against floors measured in the same run, printed as
//! ratios (this machine is shared and noisy: compare ratios, not absolute times).

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use clap::Args;
use nestio_device::VfioDevice;
use nestio_devices::e1000::{E1000Config, E1000};
use nestio_devices::e1000_bench::{self, DmaVia, IrqMode};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Round trips per protocol measurement.
    #[arg(long, default_value_t = 20000)]
    iterations: u64,
    /// Packets per e1000 measurement.
    #[arg(long, default_value_t = 1000)]
    packets: u64,
    /// Which benchmarks: protocol, e1000, or all.
    #[arg(long, default_value = "all", value_parser = ["all", "protocol", "e1000"])]
    only: String,
}

pub fn run(args: BenchArgs) -> CmdResult {
    if args.only != "e1000" {
        let r = nestio_vfio_user::bench::run(args.iterations)?;
        println!("{r}");
    }
    if args.only != "protocol" {
        for (mode, via) in [
            (IrqMode::Msi, DmaVia::SharedFd),
            (IrqMode::Msi, DmaVia::Messages),
        ] {
            let (client, server) = served_e1000()?;
            println!("e1000 over vfio-user (interrupts {mode:?}, DMA {via:?}):");
            let dev: Arc<dyn VfioDevice> = client.clone();
            let report = e1000_bench::run(dev, mode, via, args.packets)?;
            println!("{report}");
            drop(client);
            let _ = server.join();
        }
        let backend = nestio_net::open_backend("user", None)?;
        let local = E1000::new(E1000Config::new(backend))?;
        println!("e1000 in process (no vfio-user hop, MSI):");
        println!(
            "{}",
            e1000_bench::run(local, IrqMode::Msi, DmaVia::SharedFd, args.packets)?
        );
    }
    Ok(0)
}

/// An e1000 on the `user` network served over a socketpair by a server thread.
fn served_e1000(
) -> Result<(Arc<Client>, std::thread::JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
    let backend = nestio_net::open_backend("user", None)?;
    let dev = E1000::new(E1000Config::new(backend))?;
    let (a, b) = UnixStream::pair()?;
    let h = std::thread::spawn(move || {
        let server = Server::new(dev, ServerConfig::default());
        if let Err(e) = server.serve_stream(b) {
            eprintln!("nestio bench: e1000 server session ended with an error: {e}");
        }
    });
    let client = Arc::new(Client::from_stream(a, ClientConfig::default())?);
    Ok((client, h))
}
