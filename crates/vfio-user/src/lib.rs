//! vfio-user: serve any [`nestio_device_model::VfioDevice`] over a UNIX socket, and use a
//! device served by another process as a local `VfioDevice`.
//!
//! - [`proto`]: the wire format (header, commands, typed payloads, VERSION JSON);
//! - [`socket`]: whole messages with fds over SCM_RIGHTS; owner-only listening sockets
//!   that never replace a live one; peer credentials;
//! - [`endpoint`]: the connection core (send lock, "whoever waits reads" reply
//!   demultiplexer, inline handling of the peer's commands);
//! - [`server`]: `Server` serving one device to one owner at a time (peer uid checked,
//!   handshake bounded, a second client refused with EBUSY, the device released when its
//!   owner leaves);
//! - [`client`]: `Client`, a `VfioDevice` backed by a remote server;
//! - [`nested_iommu`]: nestio's extension giving the device the guest's SMMUv3 stage 1
//!   (capability, BIND/UNBIND/INVALIDATE/FAULT, the server's bound DMA space);
//! - [`conformance`]: a conformance suite of named spec checks run against any server;
//! - [`posted_ring`]: nestio's extension: posted BAR writes through a shared-memory
//!   ring instead of a message each;
//! - [`region_port`]: region accesses (synchronous and posted) over a connection, and
//!   which BARs take posted writes — shared by the client, the VMM and the nested BAR
//!   channel;
//! - [`testdev`]: a small device used by tests, the fuzzer and the benchmark;
//! - [`bench`]: round-trip and throughput measurement.

#[cfg(feature = "harness")]
pub mod bench;
pub mod client;
pub mod conformance;
pub mod endpoint;
#[cfg(feature = "harness")]
pub mod fuzzing;
pub mod nested_iommu;
pub mod posted_ring;
pub mod proto;
pub mod region_port;
pub mod server;
pub mod socket;
#[cfg(feature = "harness")]
pub mod testdev;

pub use client::{Client, ClientConfig, ClientError};
#[cfg(feature = "harness")]
pub use fuzzing::{fuzz_client, fuzz_decode, fuzz_dispatch, fuzz_sessions};
pub use proto::{Capabilities, Command, Header, ProtoError};
pub use server::{
    bind, bind_for, listening, release_device, PeerPolicy, Server, ServerConfig, ServerError,
    ServerStats,
};
pub use server::{FeatureExtension, FeatureReply};
