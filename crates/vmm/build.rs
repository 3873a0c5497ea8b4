//! Builds the guest payloads (the separate cargo workspace in `../../guest`) with the host
//! toolchain and exports their paths as `NESTIO_GUEST_<NAME>` for tests and the CLI.
//!
//! The nested cargo gets its own target directory under OUT_DIR and a clean environment
//! (no RUSTFLAGS, no clippy/rustc wrappers from the outer build); the guest workspace's
//! `.cargo/config.toml` supplies the bare-metal flags, which is why cargo runs in that
//! directory.

use std::path::PathBuf;
use std::process::Command;

const PAYLOADS: &[&str] = &[
    "hello",
    "cputest",
    "pcitest",
    "sampletest",
    "e1000ping",
    "hcalltest",
    "smptest",
    "fslmctest",
    "xivetest",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest = manifest.join("../../guest");
    let guest = guest.canonicalize().unwrap_or(guest);
    for p in ["lib", "payloads", "Cargo.toml", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--offline", "--target-dir"])
        .arg(&out);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CLIPPY_ARGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .expect("cannot run cargo to build the guest payloads");
    if !output.status.success() {
        panic!(
            "building the guest payloads in {} failed:\n{}",
            guest.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let bin_dir = out.join("x86_64-unknown-linux-gnu/release");
    for p in PAYLOADS {
        let path = bin_dir.join(p);
        if !path.exists() {
            panic!("guest payload {} was not built", path.display());
        }
        println!(
            "cargo:rustc-env=NESTIO_GUEST_{}={}",
            p.to_uppercase(),
            path.display()
        );
    }
}
