//! The connection core shared by client and server: one socket, requests in both
//! directions, and replies matched to their waiters.
//!
//! Design: a send lock serialises whole messages. There is no dedicated reader thread:
//! *whoever needs a message reads*. A thread waiting for the reply to its `msg_id` becomes
//! the reader if nobody else is; it reads messages one by one and
//! - returns at once when the message is its own reply (the hot path: one thread sends
//!   and reads its own reply, no hand-off, no condvar signal when nobody waits);
//! - parks a reply for another waiter in a map and wakes the waiters (Condvar);
//! - handles a *command* from the peer inline through the [`Incoming::Handle`] callback
//!   (client: the server's DMA_READ/WRITE, served while the client itself waits for a
//!   reply — that is what keeps server->client DMA deadlock-free on one socket), queues it
//!   for [`Endpoint::next_command`] ([`Incoming::Queue`], the server's main loop), or
//!   refuses it with an error reply ([`Incoming::Refuse`]).
//!
//! When the socket fails or closes, every waiter gets [`EndpointError::Closed`]; nobody
//! hangs on a dead peer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::proto::{Command, Header, MsgType};
use crate::socket::{send_message, Message, Receiver, SocketError};

/// Most commands queued for the main loop while another thread reads.
pub const MAX_QUEUED: usize = 4096;

/// A handler for commands from the peer: returns the reply payload or an errno.
pub type Handler = Box<dyn Fn(&Message) -> Result<Vec<u8>, i32> + Send + Sync>;

/// What to do with commands from the peer.
pub enum Incoming {
    /// Queue for [`Endpoint::next_command`].
    Queue,
    /// Handle inline, whoever is reading.
    Handle(Handler),
    /// Reply EINVAL (this direction carries no commands).
    Refuse,
}

/// Errors of an endpoint.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EndpointError {
    /// The connection is gone.
    #[error("vfio-user connection closed: {0}")]
    Closed(String),
    /// The peer did not answer in time; the connection has been closed.
    #[error("vfio-user peer sent no reply within {0:?}; connection closed")]
    TimedOut(Duration),
    /// The message could not be built (too large).
    #[error("cannot build message: {0}")]
    Build(String),
}

struct State {
    reader_busy: bool,
    waiters: usize,
    expected: HashSet<u16>,
    parked: HashMap<u16, Message>,
    incoming: VecDeque<Message>,
    closed: Option<(bool, String)>,
    next_id: u16,
}

/// One side of a vfio-user connection. See the module documentation.
pub struct Endpoint {
    sock: UnixStream,
    send_lock: Mutex<()>,
    /// Used only by the thread that holds the reader role (`reader_busy`).
    receiver: Mutex<Receiver>,
    state: Mutex<State>,
    cond: Condvar,
    incoming: Incoming,
    max_msg_size: AtomicUsize,
    /// Reply timeout in nanoseconds (u64::MAX: none).
    timeout_ns: AtomicU64,
    name: &'static str,
}

enum Routed {
    Done,
    Handle(Message),
    Mine(Message),
}

impl Endpoint {
    /// An endpoint on `sock` accepting messages up to `max_msg_size` bytes.
    pub fn new(
        sock: UnixStream,
        max_msg_size: usize,
        incoming: Incoming,
        name: &'static str,
    ) -> Self {
        Endpoint {
            sock,
            send_lock: Mutex::new(()),
            receiver: Mutex::new(Receiver::new()),
            state: Mutex::new(State {
                reader_busy: false,
                waiters: 0,
                expected: HashSet::new(),
                parked: HashMap::new(),
                incoming: VecDeque::new(),
                closed: None,
                next_id: 1,
            }),
            cond: Condvar::new(),
            incoming,
            max_msg_size: AtomicUsize::new(max_msg_size),
            timeout_ns: AtomicU64::new(u64::MAX),
            name,
        }
    }

    /// Change the receive limit (after negotiation).
    pub fn set_max_msg_size(&self, n: usize) {
        self.max_msg_size.store(n, Ordering::Relaxed);
    }

    /// How long [`Endpoint::request`] waits for a reply before closing the connection
    /// (None: forever).
    pub fn set_reply_timeout(&self, t: Option<Duration>) {
        let ns = t.map_or(u64::MAX, |d| d.as_nanos().min(u64::MAX as u128 - 1) as u64);
        self.timeout_ns.store(ns, Ordering::Relaxed);
        // A peer that stops reading must not block a sender forever either: each
        // `sendmsg` waits at most as long (SO_SNDTIMEO).
        self.set_send_timeout(t);
    }

    /// Bound each `sendmsg` to `t` (`None`: no bound). A send that times out means the
    /// peer stopped reading; the connection is then closed (see [`Endpoint::send`]).
    /// [`Endpoint::set_reply_timeout`] sets this too.
    pub fn set_send_timeout(&self, t: Option<Duration>) {
        let _ = self
            .sock
            .set_write_timeout(t.map(|d| d.max(Duration::from_millis(1))));
    }

    /// The reply timeout.
    pub fn reply_timeout(&self) -> Option<Duration> {
        match self.timeout_ns.load(Ordering::Relaxed) {
            u64::MAX => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Is the connection closed?
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Close: shut the socket down (wakes a blocked reader) and fail every waiter.
    pub fn shutdown(&self, why: &str) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some((false, why.to_string()));
        }
        st.parked.clear();
        st.incoming.clear();
        drop(st);
        self.cond.notify_all();
    }

    fn mark_closed(&self, st: &mut State, clean: bool, why: String) {
        if st.closed.is_none() {
            tracing::debug!(endpoint = self.name, reason = %why, "vfio-user connection closed");
            st.closed = Some((clean, why));
        }
    }

    /// Send one message (whole, under the send lock).
    pub fn send(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), EndpointError> {
        let r = {
            let _g = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
            send_message(&self.sock, header, payload, fds)
        };
        r.map_err(|e| {
            // SO_SNDTIMEO expired: the peer stopped reading, maybe mid-message; the
            // stream is out of step, so close it.
            let stalled = matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
            let why = if stalled {
                format!("the peer stopped reading: a send timed out ({e})")
            } else {
                format!("send failed: {e}")
            };
            let mut st = self.lock();
            self.mark_closed(&mut st, false, why.clone());
            drop(st);
            if stalled {
                let _ = self.sock.shutdown(std::net::Shutdown::Both);
            }
            self.cond.notify_all();
            EndpointError::Closed(why)
        })
    }

    /// Reply to `req`: payload or an error reply; nothing if the command asked for none.
    pub fn reply(
        &self,
        req: &Header,
        result: Result<&[u8], i32>,
        fds: &[RawFd],
    ) -> Result<(), EndpointError> {
        if req.no_reply() {
            if let Err(errno) = result {
                tracing::warn!(cmd = req.cmd, errno, "no_reply command failed");
            }
            return Ok(());
        }
        match result {
            Ok(p) => {
                let h = req
                    .reply(p.len())
                    .map_err(|e| EndpointError::Build(e.to_string()))?;
                self.send(&h, p, fds)
            }
            Err(errno) => self.send(&req.error_reply(errno), &[], &[]),
        }
    }

    /// Send a command and wait for its reply (an error reply is returned as a message
    /// with the error flag: the caller maps the errno). Waits at most the endpoint's
    /// reply timeout.
    pub fn request(
        &self,
        cmd: Command,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Message, EndpointError> {
        self.request_timeout(cmd, payload, fds, self.reply_timeout())
    }

    /// [`Endpoint::request`] with an explicit timeout. When it expires the connection is
    /// closed (a late reply could no longer be matched safely).
    pub fn request_timeout(
        &self,
        cmd: Command,
        payload: &[u8],
        fds: &[RawFd],
        timeout: Option<Duration>,
    ) -> Result<Message, EndpointError> {
        let id = {
            let mut st = self.lock();
            if let Some((_, why)) = &st.closed {
                return Err(EndpointError::Closed(why.clone()));
            }
            let mut id = st.next_id;
            while st.expected.contains(&id) {
                id = id.wrapping_add(1);
            }
            st.next_id = id.wrapping_add(1);
            st.expected.insert(id);
            id
        };
        let h = match Header::command(id, cmd, payload.len()) {
            Ok(h) => h,
            Err(e) => {
                self.lock().expected.remove(&id);
                return Err(EndpointError::Build(e.to_string()));
            }
        };
        if let Err(e) = self.send(&h, payload, fds) {
            self.lock().expected.remove(&id);
            return Err(e);
        }
        let deadline = timeout.map(|t| (Instant::now() + t, t));
        let m = self
            .wait(Some(id), deadline)?
            .ok_or_else(|| EndpointError::Closed("connection closed before the reply".into()))?;
        // The reply names the command it answers; another command under our msg_id
        // means the peer is out of step with us: nothing more on this stream can be
        // trusted.
        if m.header.cmd != cmd as u16 {
            let why = format!(
                "reply to message {id} names command {} but we sent {}",
                m.header.cmd, cmd as u16
            );
            tracing::warn!(endpoint = self.name, "{why}");
            let mut st = self.lock();
            self.mark_closed(&mut st, false, why.clone());
            drop(st);
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            self.cond.notify_all();
            return Err(EndpointError::Closed(why));
        }
        Ok(m)
    }

    /// Send a command that wants no reply.
    pub fn post(&self, cmd: Command, payload: &[u8], fds: &[RawFd]) -> Result<(), EndpointError> {
        let id = {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id = id.wrapping_add(1);
            id
        };
        let mut h = Header::command(id, cmd, payload.len())
            .map_err(|e| EndpointError::Build(e.to_string()))?;
        h.flags |= crate::proto::hdr_flags::NO_REPLY;
        self.send(&h, payload, fds)
    }

    /// The next command from the peer (queue mode). `Ok(None)`: the peer closed the
    /// connection cleanly; `Err`: the stream broke (garbage, truncated message).
    pub fn next_command(&self) -> Result<Option<Message>, EndpointError> {
        self.wait(None, None)
    }

    /// [`Endpoint::next_command`], giving up at `deadline` with
    /// [`EndpointError::TimedOut`]`(timeout)` (the connection is then closed): a peer that
    /// sends nothing, or a message too slowly, cannot hold the caller past it.
    pub fn next_command_until(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Option<Message>, EndpointError> {
        self.wait(None, Some((deadline, timeout)))
    }

    /// Wait for the reply `id` (Some) or for the next queued command (None).
    fn wait(
        &self,
        id: Option<u16>,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Option<Message>, EndpointError> {
        let mut st = self.lock();
        loop {
            match id {
                Some(id) => {
                    if let Some(m) = st.parked.remove(&id) {
                        st.expected.remove(&id);
                        return Ok(Some(m));
                    }
                }
                None => {
                    if let Some(m) = st.incoming.pop_front() {
                        return Ok(Some(m));
                    }
                }
            }
            if let Some((clean, why)) = st.closed.clone() {
                if let Some(id) = id {
                    st.expected.remove(&id);
                    return Err(EndpointError::Closed(why.clone()));
                }
                return if clean {
                    Ok(None)
                } else {
                    Err(EndpointError::Closed(why))
                };
            }
            if st.reader_busy {
                st.waiters += 1;
                st = match deadline {
                    None => self.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
                    Some((d, t)) => {
                        let now = Instant::now();
                        if now >= d {
                            st.waiters -= 1;
                            return Err(self.timed_out(&mut st, id, t));
                        }
                        self.cond
                            .wait_timeout(st, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                };
                st.waiters -= 1;
                continue;
            }
            st.reader_busy = true;
            drop(st);
            let r = self
                .receiver
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .recv_until(
                    &self.sock,
                    self.max_msg_size.load(Ordering::Relaxed),
                    deadline.map(|(d, _)| d),
                );
            st = self.lock();
            st.reader_busy = false;
            let routed = match r {
                Ok(Some(m)) => self.route(&mut st, m, id),
                Ok(None) => {
                    self.mark_closed(&mut st, true, "peer closed the connection".into());
                    Routed::Done
                }
                Err(SocketError::TimedOut) => {
                    let t = deadline.map_or(Duration::ZERO, |(_, t)| t);
                    let e = self.timed_out(&mut st, id, t);
                    if st.waiters > 0 {
                        self.cond.notify_all();
                    }
                    return Err(e);
                }
                Err(e) => {
                    let clean = matches!(&e, SocketError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset);
                    self.mark_closed(&mut st, clean, e.to_string());
                    Routed::Done
                }
            };
            if st.waiters > 0 {
                self.cond.notify_all();
            }
            match routed {
                Routed::Done => {}
                Routed::Mine(m) => return Ok(Some(m)),
                Routed::Handle(m) => {
                    drop(st);
                    self.handle(m);
                    st = self.lock();
                }
            }
        }
    }

    /// Give up on reply `id`: close the connection (a late reply could not be matched).
    fn timed_out(&self, st: &mut State, id: Option<u16>, t: Duration) -> EndpointError {
        if let Some(id) = id {
            st.expected.remove(&id);
        }
        let what = if id.is_some() {
            "no reply"
        } else {
            "no message"
        };
        tracing::warn!(endpoint = self.name, timeout = ?t, "{what} in time; closing the connection");
        self.mark_closed(st, false, format!("no reply within {t:?}"));
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        EndpointError::TimedOut(t)
    }

    fn route(&self, st: &mut State, m: Message, id: Option<u16>) -> Routed {
        match m.header.msg_type() {
            MsgType::Reply => {
                let mid = m.header.msg_id;
                if id == Some(mid) {
                    st.expected.remove(&mid);
                    return Routed::Mine(m);
                }
                if st.expected.contains(&mid) {
                    st.parked.insert(mid, m);
                } else {
                    tracing::warn!(
                        endpoint = self.name,
                        msg_id = mid,
                        cmd = m.header.cmd,
                        "dropping a reply nobody waits for"
                    );
                }
                Routed::Done
            }
            MsgType::Command => match &self.incoming {
                Incoming::Queue => {
                    if id.is_none() && st.incoming.is_empty() {
                        return Routed::Mine(m);
                    }
                    if st.incoming.len() >= MAX_QUEUED {
                        self.mark_closed(
                            st,
                            false,
                            format!("peer sent more than {MAX_QUEUED} commands without waiting"),
                        );
                        let _ = self.sock.shutdown(std::net::Shutdown::Both);
                    } else {
                        st.incoming.push_back(m);
                    }
                    Routed::Done
                }
                Incoming::Handle(_) | Incoming::Refuse => Routed::Handle(m),
            },
        }
    }

    fn handle(&self, m: Message) {
        let result = match &self.incoming {
            Incoming::Handle(h) => {
                if m.header.check_flags().is_err() {
                    Err(libc::EINVAL)
                } else {
                    h(&m)
                }
            }
            _ => {
                tracing::warn!(
                    endpoint = self.name,
                    cmd = m.header.cmd,
                    "peer sent a command on a reply-only channel"
                );
                Err(libc::EINVAL)
            }
        };
        let r = match &result {
            Ok(p) => self.reply(&m.header, Ok(p), &[]),
            Err(e) => self.reply(&m.header, Err(*e), &[]),
        };
        if let Err(e) = r {
            tracing::debug!(endpoint = self.name, error = %e, "cannot send reply");
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
