//! POWER XIVE interrupt controller model in native exploitation mode (seed 002).
//!
//! # The model
//!
//! The XIVE is an interrupt controller a PAPR guest drives itself:
//!
//! 1. **Sources** ([`source`]): every interrupt — a per-vCPU IPI, a device's MSI or
//!    level-sensitive line — is a source number (LISN) with two bits of state, PQ, in
//!    its *event state buffer* ([`esb`]), driven by loads and stores on its two ESB
//!    pages (trigger page, management page). A trigger that finds PQ = 00 is forwarded;
//!    the rest are coalesced until the guest EOIs.
//! 2. **Routing** ([`router`]): a forwarded event looks up the source's routing entry
//!    (target server, priority, event data "EISN", masked) and is written to the event
//!    queue of (server, priority).
//! 3. **Event queues** ([`eq`]) live in guest memory: rings of 32-bit entries with a
//!    generation bit, so the guest drains them without clearing them.
//! 4. **Presenter** ([`tima`]): each server (vCPU) has a thread interrupt management
//!    area whose OS ring records pending priorities (IPB), the current priority
//!    (CPPR) and signals the vCPU (NSR) when a pending priority beats CPPR; the
//!    guest acknowledges with a load and lowers its priority with a store. The
//!    signal leaves the model through the [`Notify`] callback the VMM supplies (on
//!    the x86 VMM: an interrupt vector injected into that vCPU).
//!
//! The host drives it through the control API of KVM's XIVE device ([`control`]:
//! CTRL, SOURCE, SOURCE_CONFIG, EQ_CONFIG, SOURCE_SYNC, VP state, with its errno); the
//! guest through the `H_INT_*` hypercalls ([`hcall`], with PAPR return codes) and the
//! ESB/TIMA MMIO pages ([`Xive::esb_load`], [`Xive::tima_load`] ...; the device-region
//! layout of KVM's mmap — TIMA at page 0, ESB pages from page 4 — is
//! [`Layout::region_page`]). Migration ([`migration`]) saves and restores it in the
//! seed's order, and the per-vCPU VP state is [`vp`].
//!
//! A VP that is off its thread (its vCPU ceded) is not notified: the event escalates
//! instead, once per cede, and the VMM wakes the vCPU ([`escalation`]).
//!
//! Guest memory is reached only through the small [`GuestMemory`] trait, so the crate
//! depends on no VMM.
//!
//! # Concurrency
//!
//! One [`Xive`] is shared by the vCPU threads (hypercalls, MMIO) and the threads that
//! turn device eventfds into triggers. All state is under one lock; the [`Notify`]
//! callbacks an operation produces are collected and called **after** the lock is
//! released, so a notifier may call back into the model (or block briefly) without
//! deadlocking it.

pub mod control;
pub mod eq;
pub mod esb;
pub mod escalation;
#[cfg(feature = "harness")]
pub mod fuzz;
pub mod hcall;
pub mod mem;
pub mod migration;
pub mod router;
pub mod source;
pub mod tima;
pub mod vp;

pub use control::ControlError;
pub use esb::Pq;
pub use mem::{GuestMemory, MemError, VecMemory};
pub use router::{Layout, Notify, Xive, XiveConfig};
