//! Per-thread hooks: the VMM calls [`ThreadHooks::enter`] at the start of each thread
//! it starts for running the VM (and in the control loop once the vCPU runs), with the
//! thread's [`ThreadRole`]. An embedder uses it to confine each thread to what its role
//! needs — `nestio run` installs a seccomp filter per role (`nestio_sandbox`) — or to
//! name, pin or account threads. The VMM itself attaches no meaning to it.
//!
//! Threads started while the VM is built (`Vm::new`: INTx resample threads, a vfio-user
//! client's twin-socket thread) exist before any hook could confine them; an embedder
//! covers them with a process-wide measure after `Vm::new` (nestio installs its VMM
//! seccomp filter on every thread at that point) and before [`crate::Vm::run`].

use std::fmt;
use std::sync::Arc;

/// What a VMM thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// A vCPU thread (index 0 for the one vCPU), called before its first KVM_RUN.
    Vcpu(u32),
    /// The control loop: the thread that called `Vm::run`, once the vCPU and console
    /// input threads have started (it keeps the role until it exits).
    Control,
    /// The serial console's input pump, called before it reads any input.
    SerialInput,
}

/// The hook called by each VMM thread as it starts (none by default).
#[derive(Clone, Default)]
pub struct ThreadHooks(Option<Arc<dyn Fn(ThreadRole) + Send + Sync>>);

impl ThreadHooks {
    /// Call `hook` with each thread's role, on that thread.
    pub fn new(hook: impl Fn(ThreadRole) + Send + Sync + 'static) -> Self {
        ThreadHooks(Some(Arc::new(hook)))
    }

    /// Called by a thread of `role` as it starts (nothing without a hook).
    pub fn enter(&self, role: ThreadRole) {
        if let Some(h) = &self.0 {
            h(role);
        }
    }
}

impl fmt::Debug for ThreadHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ThreadHooks(set)"
        } else {
            "ThreadHooks(none)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[test]
    fn hooks_see_each_role_on_the_calling_thread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hooks = ThreadHooks::new(move |role| {
            s.lock()
                .push((role, std::thread::current().name().map(String::from)))
        });
        let h = hooks.clone();
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || h.enter(ThreadRole::Vcpu(0)))
            .unwrap()
            .join()
            .unwrap();
        hooks.enter(ThreadRole::Control);
        ThreadHooks::default().enter(ThreadRole::SerialInput);
        let seen = seen.lock();
        assert_eq!(seen.len(), 2, "no hook, no call");
        assert_eq!(seen[0], (ThreadRole::Vcpu(0), Some("vcpu0".into())));
        assert_eq!(seen[1].0, ThreadRole::Control);
        assert_eq!(format!("{:?}", ThreadHooks::default()), "ThreadHooks(none)");
    }
}
