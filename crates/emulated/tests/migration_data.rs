//! The migration data stream behaves the same on every device: the e1000 and the
//! sample device share `nestio_device_model::migration::MigrationData`, so a MIG_DATA_READ or
//! MIG_DATA_WRITE in a state without an open stream gets the same errno from both.

use nestio_device_model::{MigState, VfioDevice};
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_emulated::sample::SampleDevice;
use nestio_net::NoneBackend;

fn devices() -> Vec<(&'static str, Box<dyn VfioDevice>)> {
    vec![
        (
            "e1000",
            Box::new(E1000::new(E1000Config::new(Box::new(NoneBackend::new().unwrap()))).unwrap()),
        ),
        ("sample", Box::new(SampleDevice::new().unwrap())),
    ]
}

fn errno(r: nestio_device_model::Result<impl std::fmt::Debug>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.errno(),
    }
}

/// Every request without an open stream, on both devices: the same errno (EINVAL, see
/// `MigrationData`), and nothing read or written.
#[test]
fn wrong_state_data_requests_get_the_same_errno_on_every_device() {
    for (name, dev) in devices() {
        let mut buf = [0u8; 64];
        let mut seen = Vec::new();
        for state in [MigState::Running, MigState::Stop, MigState::Resuming] {
            assert_eq!(dev.mig_set_state(state).unwrap(), state, "{name}");
            seen.push(("read", state, errno(dev.mig_data_read(&mut buf))));
        }
        // Back through STOP to RUNNING (RESUMING -> STOP would apply the empty stream).
        dev.reset().unwrap();
        for state in [MigState::Running, MigState::Stop, MigState::StopCopy] {
            assert_eq!(dev.mig_set_state(state).unwrap(), state, "{name}");
            seen.push(("write", state, errno(dev.mig_data_write(&[0u8; 16]))));
        }
        for (what, state, e) in seen {
            assert_eq!(
                e,
                libc::EINVAL,
                "{name}: MIG_DATA {what} in {state:?} answered errno {e}"
            );
        }
    }
}

/// A stream longer than the device accepts is refused with EINVAL by both devices, and
/// the device stays in RESUMING.
#[test]
fn oversized_resume_stream_is_einval_on_every_device() {
    let big = vec![0u8; 1 << 20];
    for (name, dev) in devices() {
        dev.mig_set_state(MigState::Resuming).unwrap();
        let mut sent = 0usize;
        let e = loop {
            match dev.mig_data_write(&big) {
                Ok(()) => sent += big.len(),
                Err(e) => break e,
            }
            assert!(sent <= 64 << 20, "{name}: accepted {sent} bytes");
        };
        assert_eq!(e.errno(), libc::EINVAL, "{name}: {e}");
        assert_eq!(dev.mig_state().unwrap(), MigState::Resuming, "{name}");
    }
}

/// Saving then resuming through the shared stream: chunks of any size, a short read at
/// the end, and the read position survives between requests.
#[test]
fn stream_round_trip_in_odd_chunks() {
    let src = SampleDevice::new().unwrap();
    src.region_write(
        nestio_device_model::pci_index::BAR0,
        0x08,
        &0x1234_5678u32.to_le_bytes(),
    )
    .unwrap();
    src.mig_set_state(MigState::StopCopy).unwrap();
    let mut stream = Vec::new();
    let mut chunk = [0u8; 4093];
    loop {
        let n = src.mig_data_read(&mut chunk).unwrap();
        stream.extend_from_slice(&chunk[..n]);
        if n == 0 {
            break;
        }
    }
    assert_eq!(stream.len(), nestio_emulated::sample::STREAM_LEN);
    assert_eq!(
        src.mig_data_read(&mut chunk).unwrap(),
        0,
        "stays at the end"
    );
    let dst = SampleDevice::new().unwrap();
    dst.mig_set_state(MigState::Resuming).unwrap();
    for c in stream.chunks(777) {
        dst.mig_data_write(c).unwrap();
    }
    dst.mig_set_state(MigState::Running).unwrap();
    assert_eq!(dst.registers().scratch, 0x1234_5678);
}
