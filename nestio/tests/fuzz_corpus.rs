//! Replays the committed cargo-fuzz corpora (fuzz/corpus/<target>/) through the same entry
//! points the fuzz targets call, so every input a fuzzer once found interesting stays a
//! regression test in the ordinary test run (without sanitizers).

use std::path::PathBuf;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        f(&data);
        n += 1;
    }
    assert!(n > 0, "corpus {} is empty", dir.display());
    eprintln!("{target}: replayed {n} inputs");
}

#[test]
fn corpus_decode() {
    replay("decode", nestio_vfio_user::fuzz_decode);
}

#[test]
fn corpus_dispatch() {
    replay("dispatch", nestio_vfio_user::fuzz_dispatch);
}

#[test]
fn corpus_net_user() {
    replay("net_user", nestio_net::fuzz_user_backend);
}

#[test]
fn corpus_e1000() {
    replay("e1000", nestio_emulated::e1000::fuzz_e1000);
}

#[test]
fn corpus_nested_walk() {
    replay("nested_walk", nestio_nested::fuzz_walk);
}

#[test]
fn corpus_client() {
    replay("client", nestio_vfio_user::fuzz_client);
}

#[test]
fn corpus_migration() {
    replay("migration", nestio_emulated::fuzz_migration);
}

#[test]
fn corpus_handoff() {
    replay("handoff", nestio_vmm::fuzz_handoff);
}

#[test]
fn corpus_bar_channel() {
    replay("bar_channel", nestio_nested::fuzz_bar_channel);
}

#[test]
fn corpus_sessions() {
    replay("sessions", nestio_vfio_user::fuzz_sessions);
}

#[test]
fn corpus_hypercall() {
    replay("hypercall", nestio_vmm::hypercall::fuzz::fuzz_hypercall);
}

#[test]
fn corpus_fsl_mc() {
    replay("fsl_mc", nestio_emulated::fsl_mc::fuzz_fsl_mc);
}

#[test]
fn corpus_xive() {
    replay("xive", |d| {
        nestio_xive::fuzz::fuzz_xive(d);
        nestio_vmm::irqchip::xive::fuzz_xive_chip(d);
    });
}

#[test]
fn corpus_smmuv3() {
    replay("smmuv3", nestio_iommu::smmuv3::fuzz::fuzz_smmuv3);
}

#[test]
fn corpus_tce() {
    replay("tce", nestio_vmm::hypercall::tce::fuzz_tce);
}

#[test]
fn corpus_vm_migration() {
    replay("vm_migration", nestio_vmm::migration::fuzz_stream);
}

#[test]
fn corpus_posted_ring() {
    replay("posted_ring", nestio_vfio_user::posted_ring::fuzz_ring);
}

#[test]
fn corpus_conformance() {
    replay("conformance", nestio_vfio_user::fuzzing::fuzz_conformance);
}
