//! The interrupt delay timers of the 82540EM (8254x software developer's manual,
//! sections 3.2.7.1 and 3.4.3.1, registers 13.4.30/31 and 13.4.41/44).
//!
//! Each direction has a pair of countdowns behind one [`DelayTimer`]:
//! - the *packet* timer (TIDV for transmit, RDTR for receive) is (re)started by every
//!   delayed completion: a transmit descriptor written back with RS and IDE set, or a
//!   received frame stored in host memory;
//! - the *absolute* timer (TADV, RADV) is started by the first delayed completion and
//!   not restarted by later ones, so a stream of completions cannot postpone the
//!   interrupt forever; a value of 0 disables it.
//!
//! Whichever expires first delivers the delayed cause (TXDW or RXT0, set in ICR only
//! then) and stops both, as does any other delivery of the same cause (an immediate
//! TXDW, a flush by writing FPD). Values are 16 bits in units of 1.024 µs, so no delay
//! exceeds [`MAX_DELAY`] and no arithmetic can overflow.
//!
//! Time does not pass for a device stopped for migration: [`DelayTimer::pause`] turns
//! running deadlines into remaining durations and [`DelayTimer::resume`] back; the
//! migration stream carries the remaining durations (see `state.rs`), which keeps a
//! stopped device's saved state identical from one save to the next.

use std::time::{Duration, Instant};

/// One delay tick: 1.024 µs.
pub const TICK_NS: u64 = 1024;
/// The longest delay a 16-bit delay register can ask for (0xFFFF ticks).
pub const MAX_DELAY: Duration = Duration::from_nanos(0xFFFF * TICK_NS);

/// The delay of a delay register value (bits 15:0; the rest is ignored); 0 is `None`.
pub fn ticks(reg: u32) -> Option<Duration> {
    let t = u64::from(reg & 0xFFFF);
    (t != 0).then(|| Duration::from_nanos(t * TICK_NS))
}

/// One countdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Countdown {
    /// Not counting.
    #[default]
    Idle,
    /// Expires at this time.
    Running(Instant),
    /// Counting stopped (device stopped) with this much left (at most [`MAX_DELAY`]).
    Paused(Duration),
}

impl Countdown {
    fn start(now: Instant, d: Duration) -> Self {
        // `d` is at most MAX_DELAY; an Instant that cannot be advanced by 67 ms does not
        // exist in practice, but a countdown that cannot start expires at once.
        Countdown::Running(now.checked_add(d).unwrap_or(now))
    }

    fn deadline(&self) -> Option<Instant> {
        match *self {
            Countdown::Running(t) => Some(t),
            _ => None,
        }
    }

    /// Time left: `None` when idle.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        match *self {
            Countdown::Idle => None,
            Countdown::Running(t) => Some(t.saturating_duration_since(now).min(MAX_DELAY)),
            Countdown::Paused(d) => Some(d),
        }
    }

    fn pause(&mut self, now: Instant) {
        if let Countdown::Running(_) = self {
            *self = Countdown::Paused(self.remaining(now).unwrap_or_default());
        }
    }

    fn resume(&mut self, now: Instant) {
        if let Countdown::Paused(d) = *self {
            *self = Countdown::start(now, d);
        }
    }
}

/// A packet timer and an absolute timer delaying one interrupt cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DelayTimer {
    /// TIDV / RDTR: restarted by every delayed completion.
    pub packet: Countdown,
    /// TADV / RADV: started by the first delayed completion only.
    pub absolute: Countdown,
}

impl DelayTimer {
    /// A delayed completion at `now`: restart the packet timer with `packet`, and start
    /// the absolute timer with `absolute` (if given) unless it is already counting.
    pub fn arm(&mut self, now: Instant, packet: Duration, absolute: Option<Duration>) {
        self.packet = Countdown::start(now, packet.min(MAX_DELAY));
        if self.absolute == Countdown::Idle {
            if let Some(a) = absolute {
                self.absolute = Countdown::start(now, a.min(MAX_DELAY));
            }
        }
    }

    /// A delayed cause is waiting.
    pub fn pending(&self) -> bool {
        self.packet != Countdown::Idle || self.absolute != Countdown::Idle
    }

    /// When the cause is due (the earlier running countdown).
    pub fn deadline(&self) -> Option<Instant> {
        match (self.packet.deadline(), self.absolute.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// If a running countdown has expired at `now`, stop both and return true.
    pub fn expire(&mut self, now: Instant) -> bool {
        if self.deadline().is_some_and(|t| t <= now) {
            self.clear();
            return true;
        }
        false
    }

    /// Stop both countdowns (the cause was delivered, or the device was reset).
    pub fn clear(&mut self) {
        *self = DelayTimer::default();
    }

    /// The device stopped: keep the time left, stop counting.
    pub fn pause(&mut self, now: Instant) {
        self.packet.pause(now);
        self.absolute.pause(now);
    }

    /// The device runs again: count the time left from `now`.
    pub fn resume(&mut self, now: Instant) {
        self.packet.resume(now);
        self.absolute.resume(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn register_values() {
        assert_eq!(ticks(0), None);
        assert_eq!(ticks(0xFFFF_0000), None, "only bits 15:0 count");
        assert_eq!(ticks(8), Some(Duration::from_nanos(8192)));
        assert_eq!(ticks(0x8000_FFFF), Some(MAX_DELAY));
        assert_eq!(MAX_DELAY, Duration::from_nanos(67_107_840));
    }

    #[test]
    fn packet_timer_restarts_and_absolute_caps() {
        let t0 = Instant::now();
        let mut t = DelayTimer::default();
        assert!(!t.pending());
        assert_eq!(t.deadline(), None);
        t.arm(t0, us(100), Some(us(250)));
        assert_eq!(t.deadline(), Some(t0 + us(100)));
        assert!(!t.expire(t0 + us(99)));
        // Each completion restarts the packet timer; the absolute one stays put.
        for k in 1..=4u64 {
            t.arm(t0 + us(50 * k), us(100), Some(us(250)));
        }
        // Packet would be due at 300 µs; the absolute timer caps it at 250 µs.
        assert_eq!(t.deadline(), Some(t0 + us(250)));
        assert!(!t.expire(t0 + us(249)));
        assert!(t.pending());
        assert!(t.expire(t0 + us(250)));
        assert!(!t.pending(), "expiry stops both countdowns");
        // The next completion starts a new absolute period.
        t.arm(t0 + us(400), us(100), Some(us(250)));
        assert_eq!(t.absolute, Countdown::Running(t0 + us(650)));
    }

    #[test]
    fn without_absolute_only_the_packet_timer_counts() {
        let t0 = Instant::now();
        let mut t = DelayTimer::default();
        t.arm(t0, us(100), None);
        t.arm(t0 + us(90), us(100), None);
        assert_eq!(t.absolute, Countdown::Idle);
        assert!(!t.expire(t0 + us(189)));
        assert!(t.expire(t0 + us(190)));
    }

    #[test]
    fn pause_keeps_the_time_left() {
        let t0 = Instant::now();
        let mut t = DelayTimer::default();
        t.arm(t0, MAX_DELAY, Some(us(1000)));
        t.pause(t0 + us(400));
        assert_eq!(t.packet, Countdown::Paused(MAX_DELAY - us(400)));
        assert_eq!(t.absolute, Countdown::Paused(us(600)));
        assert_eq!(t.deadline(), None, "a paused timer never expires");
        assert!(!t.expire(t0 + Duration::from_secs(3600)));
        let t1 = t0 + Duration::from_secs(10);
        t.resume(t1);
        assert_eq!(t.deadline(), Some(t1 + us(600)));
        // Pausing a timer already past its deadline leaves nothing to wait.
        t.pause(t1 + Duration::from_secs(1));
        assert_eq!(t.absolute, Countdown::Paused(Duration::ZERO));
        t.resume(t1 + Duration::from_secs(2));
        assert!(t.expire(t1 + Duration::from_secs(2)));
    }

    #[test]
    fn hostile_durations_are_clamped() {
        let t0 = Instant::now();
        let mut t = DelayTimer::default();
        t.arm(t0, Duration::MAX, Some(Duration::MAX));
        assert_eq!(t.deadline(), Some(t0 + MAX_DELAY));
    }
}
