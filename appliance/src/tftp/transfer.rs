//! One read transfer as a sans-IO state machine, in the style of smoltcp's sockets: the I/O
//! layer feeds it packets and timer expiries with the time, drains [`Transfer::poll_transmit`]
//! and sleeps until [`Transfer::deadline`]. Tests replay transcripts without sockets or
//! clocks.
//!
//! Blocks are counted with a `u64` internally (block 0 is the OACK) and cut to 16 bits on
//! the wire, so the block number wraps 65535 -> 0 for files over 32 MiB at 512-byte blocks,
//! as tftp-hpa, curl, atftp and EDK2 expect.
//!
//! Rules, with their RFC:
//! - Windows (RFC 7440): up to `window` blocks are sent before an ACK is awaited. An ACK of
//!   block k inside what was sent means the client has everything up to k; the next window
//!   starts at k + 1, which also resends what followed a lost block (the client ACKs the
//!   last block it got in order).
//! - No Sorcerer's Apprentice (RFC 1123 4.2.3.1): a duplicate or stale ACK is ignored. Only a
//!   timeout retransmits, so a delayed packet cannot double every later one.
//! - Retransmission: the unacknowledged window again after `interval`, which doubles up to
//!   `max_interval`; after `retries` timeouts in a row without progress the transfer fails.
//! - Budget: whatever the first interval (a client's `timeout` option sets it), a transfer
//!   without progress for [`Timing::budget`] fails; the server derives the budget from its
//!   own schedule ([`Timing::budget_of`]), so a client cannot stretch how long it holds a slot.

use std::time::{Duration, Instant};

use super::packet::{ErrorCode, Opcode, Repr};

/// Retransmission policy of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// First retransmission interval (the client's `timeout` option when it sent one).
    pub initial: Duration,
    /// Cap of the doubling.
    pub max_interval: Duration,
    /// Timeouts in a row before the transfer is abandoned.
    pub retries: u32,
    /// Longest time without progress (since the start or the last ACK that moved the
    /// window) before the transfer is abandoned, however many retries are left.
    pub budget: Duration,
}

impl Timing {
    /// How long the server's own schedule waits without progress before giving up: the
    /// first interval, then `retries` intervals doubling from it up to `max_interval`.
    pub fn budget_of(initial: Duration, max_interval: Duration, retries: u32) -> Duration {
        let cap = max_interval.max(initial);
        let mut total = initial;
        let mut interval = initial;
        let mut left = retries;
        // The doubling reaches the cap within a few dozen steps; the rest are all `cap`.
        while left > 0 && interval < cap && !interval.is_zero() {
            interval = interval.saturating_mul(2).min(cap);
            total = total.saturating_add(interval);
            left -= 1;
        }
        total.saturating_add(cap.saturating_mul(left))
    }
}

/// The terms the state machine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub block_size: u16,
    pub window: u16,
    /// Bytes to send.
    pub size: u64,
    /// Whether an OACK opens the transfer (and ACK 0 must come before DATA 1).
    pub oack: bool,
    pub timing: Timing,
}

/// A packet the I/O layer must send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// The OACK negotiated for this transfer.
    Oack { retransmit: bool },
    /// `len` bytes of the file from `offset`, as DATA `block`.
    Data {
        block: u16,
        offset: u64,
        len: usize,
        retransmit: bool,
    },
    /// Tell the client why the transfer ends.
    Error {
        code: ErrorCode,
        message: &'static str,
    },
}

/// How the transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No progress after every retry.
    TimedOut,
    /// The client sent an ERROR (error 8 refuses our OACK).
    ClientError(ErrorCode),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Done,
    Failed(Failure),
}

/// Why a packet changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// ACK of the block acknowledged last: the client retransmitted, or the network
    /// duplicated. Resending on it would be the Sorcerer's Apprentice bug.
    DuplicateAck,
    /// ACK of a block not sent yet or acknowledged long ago.
    OutOfWindow,
    /// The transfer has ended.
    Finished,
    /// Not an ACK or ERROR (a client never sends anything else to a read transfer).
    Unexpected(Opcode),
}

/// What a packet did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Blocks up to this one (absolute number) are acknowledged; more may be sent.
    Advanced(u64),
    /// The last block is acknowledged.
    Completed,
    /// The client ended the transfer.
    Aborted(ErrorCode),
    Ignored(Ignored),
}

/// What a timer expiry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Not due yet (a stale timer): nothing happens.
    NotYet,
    /// The window is sent again; the next interval is this long.
    Retransmit {
        tries: u32,
        next: Duration,
    },
    /// Out of retries.
    GaveUp,
    Finished,
}

pub struct Transfer {
    p: Params,
    /// Absolute number of the final block (a short one, possibly empty).
    last_block: u64,
    /// Lowest block not yet acknowledged (0 while the OACK is unacknowledged).
    next_unacked: u64,
    /// Next block `poll_transmit` returns.
    next_send: u64,
    /// Last block of the window being sent (inclusive).
    window_end: u64,
    /// Every block below this has been sent at least once.
    sent_upto: u64,
    interval: Duration,
    deadline: Instant,
    /// The start, or the last ACK that moved the window: the budget runs from here.
    stalled_since: Instant,
    tries: u32,
    state: State,
    pending_error: Option<(ErrorCode, &'static str)>,
}

impl Transfer {
    pub fn new(p: Params, now: Instant) -> Self {
        let block_size = u64::from(p.block_size.max(1));
        let last_block = p.size / block_size + 1;
        let mut t = Self {
            p,
            last_block,
            next_unacked: 0,
            next_send: 0,
            window_end: 0,
            sent_upto: 0,
            interval: p.timing.initial,
            deadline: now,
            stalled_since: now,
            tries: 0,
            state: State::Running,
            pending_error: None,
        };
        t.deadline = t.next_deadline(now);
        if !p.oack {
            // Without an OACK the first window goes out at once, as if ACK 0 had come.
            t.open_window(0);
        }
        t
    }

    /// When the budget runs out if nothing moves.
    fn give_up_at(&self) -> Instant {
        later(self.stalled_since, self.p.timing.budget)
    }

    /// The next timer: one interval from `now`, or the end of the budget if sooner.
    fn next_deadline(&self, now: Instant) -> Instant {
        later(now, self.interval).min(self.give_up_at())
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Blocks acknowledged so far (the OACK not counted).
    pub fn acked(&self) -> u64 {
        self.next_unacked.saturating_sub(1)
    }

    /// File offset of the first byte not acknowledged yet: nothing before it is ever sent
    /// again, so a reader may forget it.
    pub fn resend_from(&self) -> u64 {
        self.acked().saturating_mul(u64::from(self.p.block_size))
    }

    /// Number of DATA blocks (the last one short, possibly empty).
    pub fn blocks(&self) -> u64 {
        self.last_block
    }

    /// When [`Transfer::on_timeout`] is due; `None` once the transfer has ended.
    pub fn deadline(&self) -> Option<Instant> {
        (self.state == State::Running).then_some(self.deadline)
    }

    /// After block `acked` (absolute) is acknowledged: the next window starts after it.
    fn open_window(&mut self, acked: u64) {
        self.next_unacked = acked + 1;
        self.next_send = acked + 1;
        self.window_end = (acked + u64::from(self.p.window.max(1))).min(self.last_block);
    }

    /// The next packet to send, if any. Call until `None` after every event.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some((code, message)) = self.pending_error.take() {
            return Some(Transmit::Error { code, message });
        }
        if self.state != State::Running || self.next_send > self.window_end {
            return None;
        }
        let abs = self.next_send;
        self.next_send += 1;
        let retransmit = abs < self.sent_upto;
        self.sent_upto = self.sent_upto.max(abs + 1);
        if abs == 0 {
            return Some(Transmit::Oack { retransmit });
        }
        let bs = u64::from(self.p.block_size);
        let offset = (abs - 1) * bs;
        let len = self.p.size.saturating_sub(offset).min(bs);
        Some(Transmit::Data {
            // The wire carries the low 16 bits: 65535 is followed by 0.
            block: (abs & 0xffff) as u16,
            offset,
            len: usize::try_from(len).unwrap_or(0),
            retransmit,
        })
    }

    /// A packet from the client's TID.
    pub fn on_packet(&mut self, repr: &Repr<'_>, now: Instant) -> Handled {
        if self.state != State::Running {
            return Handled::Ignored(Ignored::Finished);
        }
        match *repr {
            Repr::Ack { block } => self.on_ack(block, now),
            Repr::Error { code, .. } => {
                self.state = State::Failed(Failure::ClientError(code));
                Handled::Aborted(code)
            }
            ref other => Handled::Ignored(Ignored::Unexpected(other.opcode())),
        }
    }

    fn on_ack(&mut self, block: u16, now: Instant) -> Handled {
        // The absolute block this ACK names: the one at or after `next_unacked` whose low
        // 16 bits match. Less than a window is in flight, so this is unambiguous.
        let diff = block.wrapping_sub((self.next_unacked & 0xffff) as u16);
        let acked = self.next_unacked + u64::from(diff);
        if acked >= self.sent_upto {
            return Handled::Ignored(if diff == u16::MAX {
                Ignored::DuplicateAck
            } else {
                Ignored::OutOfWindow
            });
        }
        self.tries = 0;
        self.interval = self.p.timing.initial;
        self.stalled_since = now;
        self.deadline = self.next_deadline(now);
        if acked == self.last_block {
            self.next_unacked = acked + 1;
            self.state = State::Done;
            return Handled::Completed;
        }
        self.open_window(acked);
        Handled::Advanced(acked)
    }

    /// The timer fired at `now`.
    pub fn on_timeout(&mut self, now: Instant) -> Expired {
        if self.state != State::Running {
            return Expired::Finished;
        }
        if now < self.deadline {
            return Expired::NotYet;
        }
        self.tries += 1;
        if self.tries > self.p.timing.retries || now >= self.give_up_at() {
            self.state = State::Failed(Failure::TimedOut);
            self.pending_error = Some((ErrorCode::NotDefined, "transfer timed out"));
            return Expired::GaveUp;
        }
        let cap = self.p.timing.max_interval.max(self.p.timing.initial);
        self.interval = self.interval.saturating_mul(2).min(cap);
        self.deadline = self.next_deadline(now);
        // Resend everything unacknowledged: the OACK, or the window after the last ACK.
        match self.next_unacked.checked_sub(1) {
            None => {
                self.next_send = 0;
                self.window_end = 0;
            }
            Some(acked) => self.open_window(acked),
        }
        Expired::Retransmit {
            tries: self.tries,
            next: self.deadline.saturating_duration_since(now),
        }
    }
}

/// `at + d`, or far in the future when that overflows `Instant` (never a panic).
fn later(at: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> Timing {
        Timing {
            initial: 100 * MS,
            max_interval: 400 * MS,
            retries: 3,
            budget: Timing::budget_of(100 * MS, 400 * MS, 3),
        }
    }

    fn params(size: u64, block_size: u16, window: u16, oack: bool) -> Params {
        Params {
            block_size,
            window,
            size,
            oack,
            timing: timing(),
        }
    }

    /// Everything `poll_transmit` yields now, in a compact form: `O` for the OACK, `D<n>`
    /// for DATA n (`+len` when short), `R` prefix for retransmissions, `E<code>`.
    fn drain(t: &mut Transfer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(tx) = t.poll_transmit() {
            out.push(match tx {
                Transmit::Oack { retransmit } => format!("{}O", if retransmit { "R" } else { "" }),
                Transmit::Data {
                    block,
                    len,
                    retransmit,
                    ..
                } => {
                    let r = if retransmit { "R" } else { "" };
                    if len == usize::from(t.params().block_size) {
                        format!("{r}D{block}")
                    } else {
                        format!("{r}D{block}+{len}")
                    }
                }
                Transmit::Error { code, .. } => format!("E{}", u16::from(code)),
            });
        }
        out
    }

    fn ack(t: &mut Transfer, block: u16, now: Instant) -> Handled {
        t.on_packet(&Repr::Ack { block }, now)
    }

    #[test]
    fn lock_step_without_options() {
        let now = Instant::now();
        let mut t = Transfer::new(params(1000, 512, 1, false), now);
        assert_eq!(drain(&mut t), ["D1"]);
        assert_eq!(ack(&mut t, 1, now), Handled::Advanced(1));
        assert_eq!(drain(&mut t), ["D2+488"]);
        assert_eq!(ack(&mut t, 2, now), Handled::Completed);
        assert_eq!(t.state(), State::Done);
        assert_eq!(drain(&mut t), Vec::<String>::new());
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn empty_and_exact_block_files_end_with_a_short_block() {
        let now = Instant::now();
        let mut t = Transfer::new(params(0, 512, 1, false), now);
        assert_eq!(drain(&mut t), ["D1+0"]);
        assert_eq!(ack(&mut t, 1, now), Handled::Completed);

        let mut t = Transfer::new(params(512, 512, 1, false), now);
        assert_eq!(drain(&mut t), ["D1"]);
        assert_eq!(ack(&mut t, 1, now), Handled::Advanced(1));
        assert_eq!(drain(&mut t), ["D2+0"]);
        assert_eq!(ack(&mut t, 2, now), Handled::Completed);
    }

    #[test]
    fn oack_then_windows() {
        let now = Instant::now();
        // 10 blocks of 8 bytes, then an empty one; windows of 4.
        let mut t = Transfer::new(params(80, 8, 4, true), now);
        assert_eq!(drain(&mut t), ["O"]);
        assert_eq!(ack(&mut t, 0, now), Handled::Advanced(0));
        assert_eq!(drain(&mut t), ["D1", "D2", "D3", "D4"]);
        assert_eq!(ack(&mut t, 4, now), Handled::Advanced(4));
        assert_eq!(drain(&mut t), ["D5", "D6", "D7", "D8"]);
        assert_eq!(ack(&mut t, 8, now), Handled::Advanced(8));
        assert_eq!(drain(&mut t), ["D9", "D10", "D11+0"]);
        assert_eq!(ack(&mut t, 11, now), Handled::Completed);
    }

    #[test]
    fn ack_inside_the_window_moves_it_and_resends_what_followed() {
        let now = Instant::now();
        let mut t = Transfer::new(params(80, 8, 4, true), now);
        drain(&mut t);
        ack(&mut t, 0, now);
        assert_eq!(drain(&mut t), ["D1", "D2", "D3", "D4"]);
        // Block 3 was lost: the client ACKs 2, the last it has in order.
        assert_eq!(ack(&mut t, 2, now), Handled::Advanced(2));
        assert_eq!(drain(&mut t), ["RD3", "RD4", "D5", "D6"]);
        // A late duplicate of that ACK changes nothing.
        assert_eq!(ack(&mut t, 2, now), Handled::Ignored(Ignored::DuplicateAck));
        assert_eq!(drain(&mut t), Vec::<String>::new());
        // An ACK for a block never sent is ignored too.
        assert_eq!(ack(&mut t, 9, now), Handled::Ignored(Ignored::OutOfWindow));
    }

    #[test]
    fn duplicate_ack_is_not_answered() {
        // The Sorcerer's Apprentice: DATA 2 is late, the client's ACK 1 is repeated; a server
        // that answered each ACK 1 would send every later block twice.
        let now = Instant::now();
        let mut t = Transfer::new(params(2048, 512, 1, false), now);
        assert_eq!(drain(&mut t), ["D1"]);
        assert_eq!(ack(&mut t, 1, now), Handled::Advanced(1));
        assert_eq!(drain(&mut t), ["D2"]);
        assert_eq!(ack(&mut t, 1, now), Handled::Ignored(Ignored::DuplicateAck));
        assert_eq!(drain(&mut t), Vec::<String>::new());
        assert_eq!(ack(&mut t, 2, now), Handled::Advanced(2));
        assert_eq!(drain(&mut t), ["D3"]);
        assert_eq!(ack(&mut t, 2, now), Handled::Ignored(Ignored::DuplicateAck));
        assert_eq!(ack(&mut t, 3, now), Handled::Advanced(3));
        assert_eq!(drain(&mut t), ["D4"]);
    }

    #[test]
    fn timeouts_resend_the_window_with_backoff_then_give_up() {
        let t0 = Instant::now();
        let mut t = Transfer::new(params(8 * 10, 8, 3, true), t0);
        assert_eq!(drain(&mut t), ["O"]);
        assert_eq!(t.deadline(), Some(t0 + 100 * MS));
        // A stale timer does nothing.
        assert_eq!(t.on_timeout(t0 + 50 * MS), Expired::NotYet);
        // The OACK is resent when ACK 0 does not come.
        let t1 = t0 + 100 * MS;
        assert_eq!(
            t.on_timeout(t1),
            Expired::Retransmit {
                tries: 1,
                next: 200 * MS
            }
        );
        assert_eq!(drain(&mut t), ["RO"]);
        assert_eq!(ack(&mut t, 0, t1), Handled::Advanced(0));
        assert_eq!(drain(&mut t), ["D1", "D2", "D3"]);
        // Progress reset the interval to the initial one.
        assert_eq!(t.deadline(), Some(t1 + 100 * MS));
        let mut now = t1 + 100 * MS;
        for (tries, next) in [(1, 200), (2, 400), (3, 400)] {
            assert_eq!(
                t.on_timeout(now),
                Expired::Retransmit {
                    tries,
                    next: next * MS
                }
            );
            assert_eq!(drain(&mut t), ["RD1", "RD2", "RD3"]);
            now += next * MS;
        }
        assert_eq!(t.on_timeout(now), Expired::GaveUp);
        assert_eq!(t.state(), State::Failed(Failure::TimedOut));
        assert_eq!(drain(&mut t), ["E0"]);
        assert_eq!(t.deadline(), None);
        assert_eq!(ack(&mut t, 3, now), Handled::Ignored(Ignored::Finished));
    }

    #[test]
    fn budget_follows_the_server_schedule() {
        const S: Duration = Duration::from_secs(1);
        // The defaults: 1 s, then 2, 4, 4, 4, 4.
        assert_eq!(Timing::budget_of(S, 4 * S, 5), 19 * S);
        assert_eq!(Timing::budget_of(100 * MS, 400 * MS, 3), 1100 * MS);
        assert_eq!(Timing::budget_of(S, 4 * S, 0), S);
        // A first interval above the cap stays flat.
        assert_eq!(Timing::budget_of(5 * S, 4 * S, 2), 15 * S);
        // No overflow, no long loop.
        assert_eq!(
            Timing::budget_of(S, 4 * S, u32::MAX),
            S + 2 * S + 4 * S * (u32::MAX - 1)
        );
        assert_eq!(
            Timing::budget_of(Duration::MAX, Duration::MAX, u32::MAX),
            Duration::MAX
        );
    }

    /// What a client's `timeout` makes of a silent transfer: the timer fired at each
    /// deadline until the transfer gives up; returns the offsets of retransmissions and of
    /// the end.
    fn silent_schedule(initial: Duration, budget: Duration) -> (Vec<Duration>, Duration) {
        let t0 = Instant::now();
        let timing = Timing {
            initial,
            max_interval: 4 * 1000 * MS,
            retries: 5,
            budget,
        };
        let mut t = Transfer::new(
            Params {
                timing,
                ..params(10_000, 512, 1, true)
            },
            t0,
        );
        assert_eq!(drain(&mut t), ["O"]);
        let mut resent = Vec::new();
        while let Some(d) = t.deadline() {
            match t.on_timeout(d) {
                Expired::Retransmit { .. } => {
                    assert_eq!(drain(&mut t), ["RO"]);
                    resent.push(d - t0);
                }
                Expired::GaveUp => {
                    assert_eq!(drain(&mut t), ["E0"]);
                    return (resent, d - t0);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("never gave up")
    }

    #[test]
    fn a_client_timeout_cannot_stretch_the_budget() {
        let s = 1000 * MS;
        let budget = Timing::budget_of(s, 4 * s, 5);
        // The server's own schedule ends at its budget.
        let (resent, end) = silent_schedule(s, budget);
        assert_eq!(resent, [s, 3 * s, 7 * s, 11 * s, 15 * s]);
        assert_eq!(end, 19 * s);
        // A client asking 5 s (the most acknowledged) gets its interval, not more time.
        let (resent, end) = silent_schedule(5 * s, budget);
        assert_eq!(resent, [5 * s, 10 * s, 15 * s]);
        assert_eq!(end, 19 * s);
        // Had a client's 255 s got through, the slot would still be free at the budget:
        // no retransmission at all, and an end at 19 s instead of 255 + 5 * 255.
        let (resent, end) = silent_schedule(255 * s, budget);
        assert!(resent.is_empty(), "{resent:?}");
        assert_eq!(end, 19 * s);
    }

    #[test]
    fn progress_restarts_the_budget() {
        let t0 = Instant::now();
        let mut t = Transfer::new(params(8 * 100, 8, 1, false), t0);
        let budget = timing().budget;
        let mut now = t0;
        // An ACK just before each budget ends keeps the transfer alive well past one budget.
        for block in 1..=5u16 {
            drain(&mut t);
            now += budget - MS;
            while t.deadline().is_some_and(|d| d <= now) {
                let d = t.deadline().unwrap();
                assert!(matches!(t.on_timeout(d), Expired::Retransmit { .. }));
            }
            assert_eq!(ack(&mut t, block, now), Handled::Advanced(u64::from(block)));
        }
        assert!(now - t0 > 4 * budget);
        assert_eq!(t.state(), State::Running);
        assert_eq!(t.deadline(), Some(now + timing().initial));
    }

    #[test]
    fn resend_from_follows_the_acks() {
        let now = Instant::now();
        let mut t = Transfer::new(params(80, 8, 4, true), now);
        assert_eq!(t.resend_from(), 0);
        drain(&mut t);
        ack(&mut t, 0, now);
        assert_eq!(t.resend_from(), 0);
        drain(&mut t);
        ack(&mut t, 3, now);
        assert_eq!(t.resend_from(), 24);
    }

    #[test]
    fn client_error_ends_the_transfer() {
        let now = Instant::now();
        let mut t = Transfer::new(params(100, 512, 1, true), now);
        assert_eq!(drain(&mut t), ["O"]);
        // EDK2 asks for tsize alone, then refuses the OACK with error 8 to learn the size.
        let h = t.on_packet(
            &Repr::Error {
                code: ErrorCode::OptionRefused,
                message: b"",
            },
            now,
        );
        assert_eq!(h, Handled::Aborted(ErrorCode::OptionRefused));
        assert_eq!(
            t.state(),
            State::Failed(Failure::ClientError(ErrorCode::OptionRefused))
        );
        assert_eq!(drain(&mut t), Vec::<String>::new());
    }

    #[test]
    fn other_packets_are_ignored() {
        let now = Instant::now();
        let mut t = Transfer::new(params(100, 512, 1, false), now);
        drain(&mut t);
        let h = t.on_packet(
            &Repr::Data {
                block: 1,
                data: b"x",
            },
            now,
        );
        assert_eq!(h, Handled::Ignored(Ignored::Unexpected(Opcode::Data)));
        assert_eq!(t.state(), State::Running);
    }

    #[test]
    fn block_numbers_wrap_to_zero() {
        // 65536 full blocks of 8 bytes, then an empty one: abs blocks 1..=65537.
        let size = 8 * 65536;
        let now = Instant::now();
        let mut t = Transfer::new(params(size, 8, 4, false), now);
        let mut acked = 0u64;
        let mut seen_wrap = Vec::new();
        loop {
            let mut last = None;
            while let Some(tx) = t.poll_transmit() {
                let Transmit::Data { block, offset, .. } = tx else {
                    panic!("unexpected {tx:?}");
                };
                let abs = offset / 8 + 1;
                assert_eq!(u64::from(block), abs & 0xffff);
                if (65534..=65538).contains(&abs) {
                    seen_wrap.push(block);
                }
                last = Some(block);
            }
            let Some(block) = last else { break };
            match ack(&mut t, block, now) {
                Handled::Advanced(a) => {
                    assert!(a > acked);
                    acked = a;
                }
                Handled::Completed => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(t.state(), State::Done);
        assert_eq!(seen_wrap, [65534, 65535, 0, 1]);
        assert_eq!(t.blocks(), 65537);
    }

    #[test]
    fn ack_across_the_wrap_is_recognised() {
        // Window 4 straddling 65535 -> 0: an ACK of wire block 1 is absolute 65537.
        let now = Instant::now();
        let mut t = Transfer::new(params(8 * 70000, 8, 4, false), now);
        let mut acked = 0u64;
        while acked < 65532 {
            drain(&mut t);
            let Handled::Advanced(a) = ack(&mut t, ((acked + 4) & 0xffff) as u16, now) else {
                panic!("no progress at {acked}");
            };
            acked = a;
        }
        assert_eq!(drain(&mut t), ["D65533", "D65534", "D65535", "D0"]);
        assert_eq!(ack(&mut t, 0, now), Handled::Advanced(65536));
        assert_eq!(drain(&mut t), ["D1", "D2", "D3", "D4"]);
        // The ACK of wire 0 again is a duplicate, not a jump back 65536 blocks.
        assert_eq!(ack(&mut t, 0, now), Handled::Ignored(Ignored::DuplicateAck));
        assert_eq!(ack(&mut t, 2, now), Handled::Advanced(65538));
    }
}
