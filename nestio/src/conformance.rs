//! `nestio conformance --socket PATH`: run the vfio-user conformance suite
//! ([`nestio_vfio_user::conformance`]) against whatever server listens on PATH (a
//! `nestio device ...`, another implementation, a kernel VFIO device served by
//! `nestio device vfio`), print one line per check and exit non-zero on any failure.
//!
//! The suite needs the session to itself: the server must have no owner (nestio's
//! server answers a second client's VERSION with EBUSY, which fails the `version`
//! check). `--wait` retries the connect while the server is still starting (the guest's
//! /init starts both processes at once).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nestio_vfio_user::conformance::{self, Options};

use crate::CmdResult;

/// `nestio conformance`.
#[derive(clap::Args, Debug)]
pub struct ConformanceArgs {
    /// The vfio-user server's UNIX socket.
    #[arg(long)]
    socket: PathBuf,
    /// Seconds any reply may take before the server counts as gone.
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    reply_timeout: f64,
    /// Seconds to keep retrying the connect while the server is starting (0: once).
    #[arg(long, default_value_t = 0.0, value_parser = parse_wait)]
    wait: f64,
}

/// Errors of `nestio conformance`.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceCliError {
    /// The socket did not accept a connection.
    #[error("cannot connect to the vfio-user server at {path}: {source}; is a server listening there (nestio device ... --socket {path})?")]
    Connect {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The suite could not start.
    #[error(transparent)]
    Suite(#[from] conformance::ConformanceError),
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds in (0, 3600]")),
    }
}

fn parse_wait(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds in [0, 3600]")),
    }
}

fn connect(args: &ConformanceArgs) -> Result<UnixStream, ConformanceCliError> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait);
    loop {
        match UnixStream::connect(&args.socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "server not there yet; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(ConformanceCliError::Connect {
                    path: args.socket.display().to_string(),
                    source,
                })
            }
        }
    }
}

pub fn run(args: ConformanceArgs) -> CmdResult {
    let t0 = Instant::now();
    let stream = connect(&args)?;
    let connected = t0.elapsed();
    let opts = Options {
        reply_timeout: Duration::from_secs_f64(args.reply_timeout),
        ..Options::default()
    };
    let report = conformance::run(stream, &opts).map_err(ConformanceCliError::from)?;
    println!("{report}");
    eprintln!(
        "nestio: conformance: connected after {:.2} s, suite ran in {:.2} s",
        connected.as_secs_f64(),
        (t0.elapsed() - connected).as_secs_f64()
    );
    Ok(if report.failed() > 0 { 1 } else { 0 })
}
