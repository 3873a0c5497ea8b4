//! POWER XIVE interrupt controller model in native exploitation mode (seed 002).
//!
//! Sources with ESB pages and the PQ state machine, event queues in guest memory,
//! the per-vCPU thread interrupt management area (TIMA), and the host control API
//! with the semantics of KVM's XIVE device. The VMM wires it in as an `IrqChip`.
