//! Interop tests of nestio's vfio-user implementation against an independent one, the
//! rust-vmm `vfio_user` crate 0.1.7 (dev-dependency). This crate has no library code;
//! everything lives in `tests/`:
//!
//! - `their_client_our_server.rs`: their `Client` against nestio's `Server` serving a
//!   test device (sparse fd-backed region, irqs, DMA through a checked map table);
//! - `our_client_their_server.rs`: nestio's `Client` (as a `VfioDevice`) against their
//!   `Server` with a recording `ServerBackend`;
//! - `their_server_wire.rs` / `their_client_wire.rs`: hand-built messages that pin each
//!   spec violation of vfio_user 0.1.7 (the tests assert the buggy behaviour and cite the
//!   spec, so they fail once upstream fixes the bug);
//! - `our_server_wire.rs`: the same probes against nestio's server, asserting the
//!   spec-correct behaviour;
//! - `common/`: a deadlock guard (aborts the test process after 30 s), an independent
//!   encoding of the wire format, and a recording proxy that forwards bytes and fds and
//!   can cut a connection to turn a hang into an observable EOF.
//!
//! Design: both directions go through a proxy so that every assertion about the peer
//! can be backed by the exact bytes it sent; nothing relies on timing (waits are on
//! recorded messages, never on sleeps).
