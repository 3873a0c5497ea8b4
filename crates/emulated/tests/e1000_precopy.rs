//! The e1000's PRE_COPY: an empty pre-copy stream while it keeps running, the state in
//! STOP_COPY, and a PRE_COPY given up goes back to RUNNING with its stream closed.

use nestio_device_model::migration::read_stream;
use nestio_device_model::{MigState, MigrationFlags, VfioDevice};
use nestio_emulated::e1000::{E1000Config, E1000};

fn e1000() -> std::sync::Arc<E1000> {
    let backend = nestio_net::open_backend("user", None).unwrap();
    E1000::new(E1000Config::new(backend)).unwrap()
}

#[test]
fn e1000_precopy_then_stop_copy_resumes() {
    let src = e1000();
    let flags = src.migration_flags().unwrap();
    assert!(flags.supports(MigState::PreCopy) && flags.0 & MigrationFlags::P2P == 0);
    // A register the driver sets (receive address low), changed during PRE_COPY.
    const RAL0: u64 = 0x5400;
    assert_eq!(
        src.mig_set_state(MigState::PreCopy).unwrap(),
        MigState::PreCopy
    );
    assert!(
        read_stream(&src, 4096).unwrap().is_empty(),
        "nothing streams ahead"
    );
    src.region_write(0, RAL0, &0x1234_5678u32.to_le_bytes())
        .unwrap();
    assert_eq!(
        src.mig_set_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    let stream = read_stream(&src, 4096).unwrap();
    assert!(
        stream.starts_with(b"NE1K"),
        "the state follows in STOP_COPY"
    );

    let dst = e1000();
    dst.mig_set_state(MigState::Resuming).unwrap();
    dst.mig_data_write(&stream).unwrap();
    assert_eq!(
        dst.mig_set_state(MigState::Running).unwrap(),
        MigState::Running
    );
    let mut v = [0u8; 4];
    dst.region_read(0, RAL0, &mut v).unwrap();
    assert_eq!(
        u32::from_le_bytes(v),
        0x1234_5678,
        "written during PRE_COPY, resumed"
    );

    let back = e1000();
    back.mig_set_state(MigState::PreCopy).unwrap();
    assert_eq!(
        back.mig_set_state(MigState::Running).unwrap(),
        MigState::Running
    );
    assert!(back.mig_data_read(&mut [0u8; 4]).is_err(), "stream closed");
}
