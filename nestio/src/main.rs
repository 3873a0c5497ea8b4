//! The `nestio` command line: serve an emulated device over vfio-user, run a VM with
//! devices passed through, run the demo, measure.

mod bench;
mod bench_levels;
mod channel;
mod check;
mod conformance;
mod demo;
mod device;
mod inspect;
mod migrate;
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
    /// Show a running VM's state (through its `nestio run --control` socket).
    Status(migrate::VmArgs),
    /// Stop a running VM (through its control socket).
    Stop(migrate::VmArgs),
    /// Live-migrate a running VM to a `nestio run --migrate-listen` destination.
    Migrate(migrate::MigrateArgs),
    /// Run the vfio-user conformance suite against a server; exit 1 on any failure.
    Conformance(conformance::ConformanceArgs),
    /// Drive a device served over vfio-user as a guest driver would (e.g. ping through
    /// an e1000 that `nestio device vfio` serves): checks a whole chain.
    Check(check::CheckArgs),
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
        Command::Status(a) => migrate::status(a),
        Command::Stop(a) => migrate::stop(a),
        Command::Migrate(a) => migrate::migrate(a),
        Command::Conformance(a) => conformance::run(a),
        Command::Check(a) => check::run(a),
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

/// `--seccomp` of `nestio device` and `nestio run`.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxOpts {
    /// seccomp sandbox installed after set-up on every thread (in `nestio run` the vCPU,
    /// control, console-input and export threads each also get a narrower list of their
    /// own): `on` (a system call outside the allowlist ends the process with a one-line
    /// report naming it, exit status 159), `log` (allow it but log it in the kernel log:
    /// `dmesg | grep type=1326` shows `syscall=N`) or `off`.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    seccomp: nestio_sandbox::Mode,
    /// Give up root after set-up: run as this user (a name or a numeric uid), with its
    /// primary group only. Descriptors opened during set-up (KVM, sockets) stay usable.
    #[arg(long, value_name = "NAME|UID", value_parser = parse_user)]
    user: Option<nestio_sandbox::User>,
}

impl SandboxOpts {
    /// The sandbox these options describe.
    pub fn sandbox(&self) -> nestio_sandbox::Sandbox {
        nestio_sandbox::Sandbox::new(self.seccomp)
    }

    /// End of set-up: switch to `--user` if given, then install `profile` on every
    /// thread of this process (see [`nestio_sandbox`]).
    pub fn install_process(
        &self,
        profile: nestio_sandbox::Profile,
    ) -> Result<(), nestio_sandbox::SandboxError> {
        if let Some(user) = &self.user {
            user.drop_to()?;
        }
        self.sandbox().install_process(profile)
    }
}

fn parse_user(s: &str) -> Result<nestio_sandbox::User, String> {
    nestio_sandbox::User::resolve(s).map_err(|e| e.to_string())
}

/// A system call no profile allows (`execve` of `/bin/true`), for the sandbox test: with
/// the sandbox on it never returns; without it the process becomes `/bin/true`.
pub fn forbidden_call_for_tests() {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: a NUL-terminated path and NULL-terminated argv/envp arrays.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    eprintln!(
        "nestio: the test's forbidden call returned: {}",
        std::io::Error::last_os_error()
    );
}

/// What every subcommand returns: an exit status, or an error to print.
pub type CmdResult = Result<i32, Box<dyn std::error::Error + Send + Sync>>;
