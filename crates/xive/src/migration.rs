//! Save and restore of the whole controller, in the seed's order (FACTS §4).
//!
//! The guest must be stopped (vCPUs paused: no hcall, ESB or TIMA access) from `save`
//! until `resume` or `restore`, as KVM's device is saved only with the VM stopped;
//! devices may keep triggering meanwhile.
//!
//! **Save** ([`Xive::save`], one critical section, so no event interleaves):
//! 1. stop the sources: each source that is not OFF is set to PENDING (its old PQ
//!    kept), so an event that arrives from now on only sets Q and is not lost — the
//!    way QEMU stops a KVM XIVE; OFF sources stay off;
//! 2. EQ_SYNC: every configured queue's pages are marked dirty
//!    ([`crate::GuestMemory::mark_dirty`]), so the migration sends the entries the
//!    router wrote;
//! 3. record the sources (kind, level, routing), 4. the queues (configuration and
//!    producer position), 5. the VP state of every vCPU.
//!
//! **Restore** ([`Xive::restore`], into a fresh model with its vCPUs connected, or
//! [`Xive::resume`] in place): queues first, then source allocation and targeting,
//! then VP state, then PQ last — and a source whose PQ went to QUEUED while it was
//! stopped (an event arrived during the save window) is triggered again, which
//! forwards the event (saved RESET) or keeps it queued (saved PENDING).

use std::collections::BTreeMap;

use crate::control::{ControlError, EqConfig};
use crate::eq::ALWAYS_NOTIFY;
use crate::esb::Pq;
use crate::router::Xive;
use crate::source::{Eas, Source};
use crate::vp::VpState;

/// Errors of restoring a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    /// The destination refused part of the state.
    #[error("restoring XIVE {what} failed: {err}")]
    Control {
        /// What was being restored.
        what: String,
        /// Cause.
        err: ControlError,
    },
    /// `resume` without a previous `save`.
    #[error("the XIVE was not stopped by save(): nothing to resume")]
    NotSaved,
}

/// One source in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceSnapshot {
    /// Number.
    pub lisn: u32,
    /// Level-sensitive.
    pub lsi: bool,
    /// Level.
    pub asserted: bool,
    /// Routing.
    pub eas: Eas,
    /// PQ before the save stopped it.
    pub pq: Pq,
    /// An event arrived during the save window: trigger again at restore.
    pub requeue: bool,
}

/// One configured queue in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Server.
    pub server: u32,
    /// Priority.
    pub prio: u8,
    /// Guest address.
    pub qaddr: u64,
    /// log2 size.
    pub qshift: u32,
    /// Producer generation.
    pub toggle: u32,
    /// Producer index.
    pub index: u32,
}

/// The whole controller.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct XiveSnapshot {
    /// NR_SERVERS.
    pub nr_servers: u32,
    /// Sources, by number.
    pub sources: Vec<SourceSnapshot>,
    /// Configured queues.
    pub queues: Vec<QueueSnapshot>,
    /// VP state per connected server.
    pub vps: Vec<(u32, VpState)>,
}

impl Xive {
    /// Save (see the module documentation). The sources stay stopped until
    /// [`Xive::resume`] (or the model is dropped after a migration).
    pub fn save(&self) -> XiveSnapshot {
        let mut st = self.state.lock();
        // 1. stop the sources, keeping the PQ of the first save.
        if st.frozen.is_none() {
            let mut frozen = BTreeMap::new();
            for (&l, s) in st.sources.iter_mut() {
                frozen.insert(l, s.pq);
                if s.pq != Pq::Off {
                    s.pq = Pq::Pending;
                }
            }
            st.frozen = Some(frozen);
        }
        // 2. EQ_SYNC.
        for srv in st.servers.values() {
            for q in srv.eqs.iter().filter(|q| q.enabled()) {
                self.mem.mark_dirty(q.qaddr, 1u64 << q.qshift);
            }
        }
        let frozen = st.frozen.clone().unwrap_or_default();
        // 3. sources.
        let sources = st
            .sources
            .iter()
            .map(|(&lisn, s)| {
                let pq = frozen.get(&lisn).copied().unwrap_or(s.pq);
                SourceSnapshot {
                    lisn,
                    lsi: s.lsi,
                    asserted: s.asserted,
                    eas: s.eas,
                    pq,
                    requeue: pq != Pq::Off && s.pq == Pq::Queued,
                }
            })
            .collect();
        // 4. queues, 5. VP state.
        let mut queues = Vec::new();
        let mut vps = Vec::new();
        for (&server, srv) in &st.servers {
            for (prio, q) in srv.eqs.iter().enumerate() {
                if q.enabled() {
                    queues.push(QueueSnapshot {
                        server,
                        prio: prio as u8,
                        qaddr: q.qaddr,
                        qshift: q.qshift,
                        toggle: q.toggle,
                        index: q.index,
                    });
                }
            }
            vps.push((server, VpState::from_w01(srv.tima.w01())));
        }
        XiveSnapshot {
            nr_servers: st.nr_servers,
            sources,
            queues,
            vps,
        }
    }

    /// Restart the sources stopped by [`Xive::save`] in place: PQ back to its saved
    /// value, events that arrived meanwhile forwarded.
    pub fn resume(&self) -> Result<(), MigrationError> {
        self.with(|st, p| {
            let frozen = st.frozen.take().ok_or(MigrationError::NotSaved)?;
            for (l, pq) in frozen {
                let Some(s) = st.sources.get_mut(&l) else {
                    continue;
                };
                let requeue = pq != Pq::Off && s.pq == Pq::Queued;
                s.pq = pq;
                if requeue && s.trigger() {
                    self.route(st, p, l);
                }
            }
            Ok(())
        })
    }

    /// Restore `snap` into this model, whose vCPUs are already connected (in the
    /// seed's order: queues, source targeting, VP state, then PQ).
    pub fn restore(&self, snap: &XiveSnapshot) -> Result<(), MigrationError> {
        let ctl = |what: String| move |err| MigrationError::Control { what, err };
        for q in &snap.queues {
            let attr = (u64::from(q.server) << 3) | u64::from(q.prio);
            let c = EqConfig {
                flags: ALWAYS_NOTIFY,
                qshift: q.qshift,
                qaddr: q.qaddr,
                qtoggle: q.toggle,
                qindex: q.index,
            };
            self.set_eq_config(attr, &c)
                .map_err(ctl(format!("queue {}/{}", q.server, q.prio)))?;
        }
        {
            let mut st = self.state.lock();
            for s in &snap.sources {
                if s.lisn >= self.cfg.nr_irqs {
                    return Err(MigrationError::Control {
                        what: format!("source {}", s.lisn),
                        err: ControlError::TooBig {
                            irq: u64::from(s.lisn),
                            nr: self.cfg.nr_irqs,
                        },
                    });
                }
                let mut src = Source::new(s.lsi, s.asserted);
                src.eas = s.eas;
                st.sources.insert(s.lisn, src);
            }
        }
        for &(server, vp) in &snap.vps {
            self.set_vp_state(server, vp)
                .map_err(ctl(format!("VP state of vCPU {server}")))?;
        }
        self.with(|st, p| {
            for s in &snap.sources {
                let Some(src) = st.sources.get_mut(&s.lisn) else {
                    continue;
                };
                src.pq = s.pq;
                if s.requeue && src.trigger() {
                    self.route(st, p, s.lisn);
                }
            }
        });
        Ok(())
    }
}
