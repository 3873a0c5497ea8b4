//! The `nestio` command line: serve an emulated device over vfio-user, run a VM with
//! devices passed through, run the demo, measure.

mod bench;
mod demo;
mod device;
mod inspect;
mod run;

use clap::{Parser, Subcommand};

/// nestio: pass devices emulated in another process, or at another nesting level,
/// through to KVM guests over vfio-user.
#[derive(Parser, Debug)]
#[command(name = "nestio", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve an emulated device over vfio-user on a UNIX socket.
    Device(device::DeviceArgs),
    /// Run a KVM guest with devices passed through.
    Run(run::RunArgs),
    /// The main job on a built-in default: an out-of-process e1000 passed through to a
    /// guest that pings the gateway over it.
    Demo(demo::DemoArgs),
    /// Measure costs against floors measured in the same run.
    Bench(bench::BenchArgs),
    /// Hex-dump a running nested guest's memory by its guest-physical address (through
    /// its parent level's memory socket, `PATH.mem` of `nestio run --export`).
    Inspect(inspect::InspectArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Device(a) => device::run(a),
        Command::Run(a) => run::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Inspect(a) => inspect::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("nestio: error: {e}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            std::process::exit(1);
        }
    }
}

/// What every subcommand returns: an exit status, or an error to print.
pub type CmdResult = Result<i32, Box<dyn std::error::Error + Send + Sync>>;
