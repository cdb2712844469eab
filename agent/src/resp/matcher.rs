//! Per-connection matching of requests to replies.
//!
//! Redis answers each request exactly once and in order, except where the
//! protocol says otherwise: pub/sub confirmations (one per channel), pushes
//! (pub/sub messages, `MONITOR` lines, RESP3 `>`), `CLIENT REPLY OFF|SKIP`.
//! So a FIFO of outstanding requests suffices, plus two kinds of markers for
//! what the parser could not follow:
//!
//! - `Gap`: the request stream lost sync here; an unknown number of requests
//!   (and so of replies) is missing. A reply at a gap belongs to the request
//!   after it only if it came after that request was sent (causality);
//!   earlier replies answer the skipped requests and are dropped.
//! - `Owed(n)`: `n` replies still due to requests already reported (timed out
//!   or evicted); they are absorbed so they do not shift later matches.

use std::collections::VecDeque;
use std::time::Duration;

use super::parser::{self, Elem, Frame, Parser, Side};
use super::{
    Chunk, Command, Config, ErrorPrefix, Event, Matched, NoReply, ReplyKind, Stats, Unanswered,
    UnansweredReason, commands,
};

/// Matches one connection's requests to its replies, as seen from one
/// socket: for a client socket requests are its writes and replies its
/// reads; for a Redis server socket the reverse.
#[derive(Debug)]
pub struct Matcher {
    requests: Parser,
    replies: Parser,
    core: Core,
}

impl Matcher {
    /// A connection seen from its first byte.
    pub fn new(config: Config) -> Self {
        Self {
            requests: Parser::new(Side::Request),
            replies: Parser::new(Side::Reply),
            core: Core::new(config),
        }
    }

    /// A connection that was already open: both streams start out of sync;
    /// requests are followed from the first request start found, replies
    /// from the first read after such a request.
    pub fn mid_stream(config: Config) -> Self {
        let mut core = Core::new(config);
        core.fifo.push_back(Slot::Gap);
        Self {
            requests: Parser::mid_stream(Side::Request),
            replies: Parser::mid_stream(Side::Reply),
            core,
        }
    }

    /// Bytes sent by the requesting side.
    pub fn on_request(&mut self, chunk: Chunk<'_>, out: &mut Vec<Event>) {
        let Self { requests, core, .. } = self;
        core.now_ns = core.now_ns.max(chunk.ts_ns);
        requests.feed(&chunk, &mut |event| match event {
            parser::Event::Frame(frame) => core.request(frame, out),
            parser::Event::Desync { partial } => core.request_desync(partial, out),
        });
    }

    /// Bytes sent by the answering side.
    pub fn on_reply(&mut self, chunk: Chunk<'_>, out: &mut Vec<Event>) {
        let Self { replies, core, .. } = self;
        core.now_ns = core.now_ns.max(chunk.ts_ns);
        // Out of sync, a reply can only be picked up at a read boundary: the
        // first read after a request was sent most likely starts its reply.
        if replies.is_desynced()
            && chunk.data.first().is_some_and(|&b| is_reply_type(b))
            && core.reply_resync(chunk.ts_ns, out)
        {
            replies.resync();
        }
        replies.feed(&chunk, &mut |event| match event {
            parser::Event::Frame(frame) => core.reply(frame, true, out),
            parser::Event::Desync { partial } => core.reply_desync(partial, out),
        });
    }

    /// Reports requests sent `timeout` or more before `now_ns` as
    /// [`UnansweredReason::Timeout`].
    pub fn expire(&mut self, now_ns: u64, timeout: Duration, out: &mut Vec<Event>) {
        let timeout_ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let core = &mut self.core;
        for slot in core.fifo.iter_mut() {
            let Slot::Request(pending) = slot else {
                continue;
            };
            let age_ns = now_ns.saturating_sub(pending.sent_ts_ns);
            if age_ns < timeout_ns {
                break; // later requests are younger
            }
            out.push(Event::Unanswered(Unanswered {
                command: pending.command,
                sent_ts_ns: pending.sent_ts_ns,
                age_ns,
                reason: UnansweredReason::Timeout,
            }));
            let owed = pending.replies_due();
            *slot = Slot::Owed(owed);
            core.outstanding -= 1;
            core.owed += owed;
        }
        core.merge_owed();
    }

    /// The connection closed at `now_ns`: every outstanding request is
    /// reported as [`UnansweredReason::Closed`].
    pub fn close(&mut self, now_ns: u64, out: &mut Vec<Event>) {
        self.core
            .drop_requests(now_ns, UnansweredReason::Closed, |_| true, out);
        self.core.fifo.clear();
        self.core.owed = 0;
    }

    /// Requests waiting for a reply.
    pub fn outstanding(&self) -> usize {
        self.core.outstanding
    }

    /// FIFO entries, markers included: with the parsers' fixed buffers, all
    /// the memory a connection's matcher holds; at most
    /// [`Config::max_slots`] (the fuzz target checks it).
    pub fn slots(&self) -> usize {
        self.core.fifo.len()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            unparsed_request_bytes: self.requests.unparsed_bytes(),
            unparsed_reply_bytes: self.replies.unparsed_bytes(),
            request_desyncs: self.requests.desyncs(),
            reply_desyncs: self.replies.desyncs(),
            ..self.core.stats
        }
    }
}

fn is_reply_type(b: u8) -> bool {
    b"+-:$*_,#(=!%~>|".contains(&b)
}

#[derive(Debug)]
enum Slot {
    Request(Pending),
    Owed(u64),
    Gap,
}

#[derive(Debug)]
struct Pending {
    command: Command,
    sent_ts_ns: u64,
    request_bytes: u64,
    depth: u32,
    special: Special,
    /// Subscribe family: confirmations still due; `None` for an unsubscribe
    /// from everything (one per current subscription, known when the first
    /// arrives).
    confirmations: Option<u64>,
    reply_first_ts_ns: Option<u64>,
    reply_bytes: u64,
}

impl Pending {
    fn replies_due(&self) -> u64 {
        match self.special {
            Special::Subscribe(_) => self.confirmations.unwrap_or(1),
            _ => 1,
        }
    }
}

/// Commands whose replies change how later frames are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    None,
    Subscribe(Family),
    Monitor,
    Hello(u8),
    Reset,
}

/// The pub/sub commands; each confirmation frame starts with the command's
/// name in lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Subscribe,
    Unsubscribe,
    PSubscribe,
    PUnsubscribe,
    SSubscribe,
    SUnsubscribe,
}

impl Family {
    const ALL: [(Self, &'static str); 6] = [
        (Self::Subscribe, "SUBSCRIBE"),
        (Self::Unsubscribe, "UNSUBSCRIBE"),
        (Self::PSubscribe, "PSUBSCRIBE"),
        (Self::PUnsubscribe, "PUNSUBSCRIBE"),
        (Self::SSubscribe, "SSUBSCRIBE"),
        (Self::SUnsubscribe, "SUNSUBSCRIBE"),
    ];

    fn of_command(command: Command) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, name)| command.is(name, None))
            .map(|&(family, _)| family)
    }

    fn of_word(word: &[u8]) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, name)| name.as_bytes().eq_ignore_ascii_case(word))
            .map(|&(family, _)| family)
    }

    fn unsubscribes(self) -> bool {
        matches!(
            self,
            Self::Unsubscribe | Self::PUnsubscribe | Self::SUnsubscribe
        )
    }
}

/// `CLIENT REPLY` state, as the server applies it to the following commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// Where the next reply goes.
enum Head {
    Empty,
    Gap,
    Owed,
    Request,
}

#[derive(Debug)]
struct Core {
    config: Config,
    fifo: VecDeque<Slot>,
    /// `Slot::Request`s in the FIFO.
    outstanding: usize,
    /// Sum of `Slot::Owed`.
    owed: u64,
    /// Latest chunk timestamp seen, for ages.
    now_ns: u64,
    reply_mode: ReplyMode,
    resp3: bool,
    monitor: bool,
    /// Subscriptions as the last confirmations counted them (RESP2 pub/sub
    /// mode lasts while any remain).
    channels: u64,
    patterns: u64,
    shard_channels: u64,
    stats: Stats,
    last_name: commands::LastName,
}

impl Core {
    fn new(config: Config) -> Self {
        Self {
            config,
            fifo: VecDeque::new(),
            outstanding: 0,
            owed: 0,
            now_ns: 0,
            reply_mode: ReplyMode::On,
            resp3: false,
            monitor: false,
            channels: 0,
            patterns: 0,
            shard_channels: 0,
            stats: Stats::default(),
            last_name: commands::LastName::default(),
        }
    }

    fn request(&mut self, frame: &Frame, out: &mut Vec<Event>) {
        let arg = |i: usize| match &frame.elems[i] {
            Elem::Str(capture) => capture.whole(),
            _ => None,
        };
        let command = arg(0)
            .and_then(|arg0| commands::lookup_again(&mut self.last_name, arg0, arg(1)))
            .unwrap_or(Command::UNKNOWN);
        let args = frame.count.saturating_sub(1);
        let special = if let Some(family) = Family::of_command(command) {
            Special::Subscribe(family)
        } else if command.is("MONITOR", None) {
            Special::Monitor
        } else if command.is("HELLO", None) {
            match arg(1) {
                Some(b"2") => Special::Hello(2),
                Some(b"3") => Special::Hello(3),
                _ => Special::None,
            }
        } else if command.is("RESET", None) {
            Special::Reset
        } else {
            Special::None
        };

        // What the server does with CLIENT REPLY (networking.c): OFF and
        // SKIP are not answered; SKIP silences the next command; ON and
        // RESET answer even when replies were off.
        let was = self.reply_mode;
        let silenced = match was {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::SkipNext => {
                self.reply_mode = ReplyMode::On;
                true
            }
        };
        let client_reply = command
            .is("CLIENT", Some("REPLY"))
            .then(|| arg(2))
            .flatten()
            .map(|mode| mode.to_ascii_uppercase());
        let answered = match client_reply.as_deref() {
            Some(b"ON") => {
                self.reply_mode = ReplyMode::On;
                true
            }
            Some(b"OFF") => {
                self.reply_mode = ReplyMode::Off;
                false
            }
            Some(b"SKIP") => {
                if was != ReplyMode::Off {
                    self.reply_mode = ReplyMode::SkipNext;
                }
                false
            }
            _ if special == Special::Reset => {
                self.reply_mode = ReplyMode::On;
                true
            }
            // A replica's offset report to its primary is never answered
            // (replication.c, replconfCommand); what comes back on that
            // connection is the replication stream, not replies.
            _ if command.is("REPLCONF", None)
                && arg(1).is_some_and(|sub| sub.eq_ignore_ascii_case(b"ACK")) =>
            {
                false
            }
            _ => !silenced,
        };
        if !answered {
            out.push(Event::NoReply(NoReply {
                command,
                sent_ts_ns: frame.first_ts_ns,
                request_bytes: frame.bytes,
            }));
            return;
        }

        if self.outstanding >= self.config.max_outstanding {
            self.evict_oldest(out);
        }
        let confirmations = match special {
            Special::Subscribe(family) if args == 0 && family.unsubscribes() => None,
            Special::Subscribe(_) => Some(args.max(1)),
            _ => Some(1),
        };
        let depth = (self.outstanding as u64 + self.owed + 1).min(u64::from(u32::MAX)) as u32;
        self.fifo.push_back(Slot::Request(Pending {
            command,
            sent_ts_ns: frame.first_ts_ns,
            request_bytes: frame.bytes,
            depth,
            special,
            confirmations,
            reply_first_ts_ns: None,
            reply_bytes: 0,
        }));
        self.outstanding += 1;
        self.keep_bounded(out);
    }

    fn request_desync(&mut self, partial: Option<&Frame>, out: &mut Vec<Event>) {
        // A request whose header was read will be answered; what follows
        // until resync is unknown.
        if let Some(frame) = partial {
            self.request(frame, out);
        }
        if !matches!(self.fifo.back(), Some(Slot::Gap)) {
            self.fifo.push_back(Slot::Gap);
        }
        self.keep_bounded(out);
    }

    /// Requests are bounded by eviction, but gaps and owed replies can
    /// alternate between them: past [`Config::max_slots`] everything
    /// waiting is given up, and the stream goes on after a gap.
    fn keep_bounded(&mut self, out: &mut Vec<Event>) {
        if self.fifo.len() > self.config.max_slots() {
            self.drop_requests(self.now_ns, UnansweredReason::Overflow, |_| true, out);
            self.fifo.clear();
            self.owed = 0;
            self.fifo.push_back(Slot::Gap);
        }
    }

    fn reply(&mut self, frame: &Frame, complete: bool, out: &mut Vec<Event>) {
        let ts = frame.first_ts_ns;
        if frame.ty == b'>' {
            // Only RESP3 has pushes: attached after HELLO 3. (Other RESP3
            // types prove nothing about how pub/sub frames will look.)
            self.resp3 = true;
        }
        let word = match (frame.ty, &frame.elems[0]) {
            (b'*' | b'>', Elem::Str(capture)) => capture.whole(),
            _ => None,
        };
        if frame.ty == b'>' {
            match word.and_then(Family::of_word) {
                Some(family) => self.confirmation(family, frame, out),
                None => self.stats.pushes += 1,
            }
            return;
        }
        if frame.ty == b'*' && !self.resp3 {
            // RESP2 pub/sub: pushes and confirmations are plain arrays, told
            // apart by their first element while subscribed.
            let subscribed = self.channels + self.patterns + self.shard_channels > 0;
            let message = word.is_some_and(|w| {
                [&b"message"[..], b"pmessage", b"smessage"]
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(w))
            });
            if subscribed && message {
                self.stats.pushes += 1;
                return;
            }
            if let Some(family) = word.and_then(Family::of_word)
                && (subscribed || self.head_subscribes(ts))
            {
                return self.confirmation(family, frame, out);
            }
        }
        if self.monitor
            && frame.ty == b'+'
            && frame.head.prefix().first().is_some_and(u8::is_ascii_digit)
        {
            self.stats.pushes += 1; // "+1700000000.123456 [0 127.0.0.1:5000] ..."
            return;
        }

        match self.head(ts) {
            Head::Empty => self.stats.unmatched_replies += 1,
            Head::Gap => self.stats.gap_replies += 1,
            Head::Owed => self.absorb_owed(),
            Head::Request => {
                let Some(Slot::Request(pending)) = self.fifo.pop_front() else {
                    unreachable!("head() said a request is first");
                };
                self.outstanding -= 1;
                let reply_kind = match frame.ty {
                    b'-' | b'!' => ReplyKind::Error(ErrorPrefix::of(frame.head.prefix())),
                    _ if frame.null => ReplyKind::Nil,
                    _ => ReplyKind::Ok,
                };
                if !matches!(reply_kind, ReplyKind::Error(_)) {
                    self.apply(pending.special);
                }
                out.push(Event::Matched(Matched {
                    command: pending.command,
                    sent_ts_ns: pending.sent_ts_ns,
                    reply_first_byte_ts_ns: pending.reply_first_ts_ns.unwrap_or(ts),
                    reply_last_byte_ts_ns: self.now_ns.max(ts),
                    reply_kind,
                    request_bytes: pending.request_bytes,
                    reply_bytes: pending.reply_bytes + frame.bytes,
                    depth: pending.depth,
                    reply_complete: complete,
                }));
            }
        }
    }

    /// A reply changed the connection's mode.
    fn apply(&mut self, special: Special) {
        match special {
            Special::Monitor => self.monitor = true,
            Special::Hello(version) => self.resp3 = version == 3,
            Special::Reset => {
                self.monitor = false;
                self.resp3 = false;
                self.channels = 0;
                self.patterns = 0;
                self.shard_channels = 0;
            }
            Special::None | Special::Subscribe(_) => {}
        }
    }

    /// A `subscribe`/`unsubscribe`/… frame: `[kind, channel, count]`.
    fn confirmation(&mut self, family: Family, frame: &Frame, out: &mut Vec<Event>) {
        let ts = frame.first_ts_ns;
        let current = match family {
            Family::Subscribe | Family::Unsubscribe => self.channels,
            Family::PSubscribe | Family::PUnsubscribe => self.patterns,
            Family::SSubscribe | Family::SUnsubscribe => self.shard_channels,
        };
        if let Elem::Int(count) = frame.elems[2] {
            // Redis counts channels + patterns together, shard channels apart.
            let count = u64::try_from(count).unwrap_or(0);
            match family {
                Family::Subscribe | Family::Unsubscribe => {
                    self.channels = count.saturating_sub(self.patterns);
                }
                Family::PSubscribe | Family::PUnsubscribe => {
                    self.patterns = count.saturating_sub(self.channels);
                }
                Family::SSubscribe | Family::SUnsubscribe => self.shard_channels = count,
            }
        }
        match self.head(ts) {
            Head::Owed => self.absorb_owed(),
            Head::Request => {
                let Some(Slot::Request(pending)) = self.fifo.front_mut() else {
                    unreachable!("head() said a request is first");
                };
                if pending.special != Special::Subscribe(family) {
                    self.stats.pushes += 1; // e.g. more unsubscribes than we knew of
                    return;
                }
                pending.reply_first_ts_ns.get_or_insert(ts);
                pending.reply_bytes += frame.bytes;
                let due = pending.confirmations.unwrap_or(current.max(1)) - 1;
                pending.confirmations = Some(due);
                if due == 0 {
                    self.pop_confirmed(out);
                }
            }
            Head::Empty | Head::Gap => self.stats.pushes += 1,
        }
    }

    /// The last confirmation of a pub/sub command arrived.
    fn pop_confirmed(&mut self, out: &mut Vec<Event>) {
        let Some(Slot::Request(pending)) = self.fifo.pop_front() else {
            return;
        };
        self.outstanding -= 1;
        out.push(Event::Matched(Matched {
            command: pending.command,
            sent_ts_ns: pending.sent_ts_ns,
            reply_first_byte_ts_ns: pending.reply_first_ts_ns.unwrap_or_default(),
            reply_last_byte_ts_ns: self.now_ns,
            reply_kind: ReplyKind::Ok,
            request_bytes: pending.request_bytes,
            reply_bytes: pending.reply_bytes,
            depth: pending.depth,
            reply_complete: true,
        }));
    }

    fn head_subscribes(&mut self, ts: u64) -> bool {
        matches!(self.head(ts), Head::Request)
            && matches!(
                self.fifo.front(),
                Some(Slot::Request(Pending {
                    special: Special::Subscribe(_),
                    ..
                }))
            )
    }

    /// Where a reply whose first byte came at `ts` goes; drops a gap it
    /// proves over. A reply that came before the first request was sent
    /// answers nothing we know of.
    fn head(&mut self, ts: u64) -> Head {
        loop {
            match self.fifo.front() {
                None => return Head::Empty,
                Some(Slot::Owed(_)) => return Head::Owed,
                Some(Slot::Request(pending)) => {
                    return if ts < pending.sent_ts_ns {
                        Head::Empty
                    } else {
                        Head::Request
                    };
                }
                Some(Slot::Gap) => {
                    let next_sent = self.fifo.iter().find_map(|slot| match slot {
                        Slot::Request(pending) => Some(pending.sent_ts_ns),
                        _ => None,
                    });
                    match next_sent {
                        Some(sent) if ts >= sent => {
                            self.fifo.pop_front();
                        }
                        _ => return Head::Gap,
                    }
                }
            }
        }
    }

    fn absorb_owed(&mut self) {
        self.stats.late_replies += 1;
        self.owed -= 1;
        if let Some(Slot::Owed(n)) = self.fifo.front_mut() {
            *n -= 1;
            if *n == 0 {
                self.fifo.pop_front();
            }
        }
    }

    /// The reply stream lost sync: a reply under way answers the oldest
    /// request; the replies of all others may be in what was lost.
    fn reply_desync(&mut self, partial: Option<&Frame>, out: &mut Vec<Event>) {
        if let Some(frame) = partial {
            self.reply(frame, false, out);
        }
        self.drop_requests(self.now_ns, UnansweredReason::ReplyLost, |_| true, out);
        self.fifo.clear();
        self.owed = 0;
        self.fifo.push_back(Slot::Gap);
    }

    /// A read at `ts` while the reply stream is lost: resync there if a
    /// request was sent before it. Requests sent before the last such one
    /// were answered in what was lost; the read is taken to start the reply
    /// to the last (exact for clients that wait for their replies).
    fn reply_resync(&mut self, ts: u64, out: &mut Vec<Event>) -> bool {
        let last_sent = self
            .fifo
            .iter()
            .filter_map(|slot| match slot {
                Slot::Request(pending) if pending.sent_ts_ns < ts => Some(pending.sent_ts_ns),
                _ => None,
            })
            .max();
        let Some(last_sent) = last_sent else {
            return false;
        };
        self.drop_requests(
            ts,
            UnansweredReason::ReplyLost,
            |pending| pending.sent_ts_ns < last_sent,
            out,
        );
        self.fifo.retain(|slot| matches!(slot, Slot::Request(_)));
        self.owed = 0;
        self.fifo.push_front(Slot::Gap);
        true
    }

    /// Reports and removes the requests `which` selects.
    fn drop_requests(
        &mut self,
        now_ns: u64,
        reason: UnansweredReason,
        which: impl Fn(&Pending) -> bool,
        out: &mut Vec<Event>,
    ) {
        let outstanding = &mut self.outstanding;
        self.fifo.retain(|slot| match slot {
            Slot::Request(pending) if which(pending) => {
                out.push(Event::Unanswered(Unanswered {
                    command: pending.command,
                    sent_ts_ns: pending.sent_ts_ns,
                    age_ns: now_ns.saturating_sub(pending.sent_ts_ns),
                    reason,
                }));
                *outstanding -= 1;
                false
            }
            _ => true,
        });
    }

    /// Too many outstanding: give up the oldest, keeping its place.
    fn evict_oldest(&mut self, out: &mut Vec<Event>) {
        let Some(i) = self
            .fifo
            .iter()
            .position(|slot| matches!(slot, Slot::Request(_)))
        else {
            return;
        };
        let Some(Slot::Request(pending)) = self.fifo.remove(i) else {
            return;
        };
        out.push(Event::Unanswered(Unanswered {
            command: pending.command,
            sent_ts_ns: pending.sent_ts_ns,
            age_ns: self.now_ns.saturating_sub(pending.sent_ts_ns),
            reason: UnansweredReason::Overflow,
        }));
        let owed = pending.replies_due();
        self.outstanding -= 1;
        self.owed += owed;
        // Merge with an owed neighbour (the oldest requests sit near the
        // front, so this stays cheap).
        match i.checked_sub(1).and_then(|j| self.fifo.get_mut(j)) {
            Some(Slot::Owed(n)) => *n += owed,
            _ => self.fifo.insert(i, Slot::Owed(owed)),
        }
    }

    fn merge_owed(&mut self) {
        let mut merged: VecDeque<Slot> = VecDeque::with_capacity(self.fifo.len());
        for slot in self.fifo.drain(..) {
            match (merged.back_mut(), slot) {
                (Some(Slot::Owed(a)), Slot::Owed(b)) => *a += b,
                (_, slot) => merged.push_back(slot),
            }
        }
        self.fifo = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::testing::{Conn, cmd, ok};

    fn err(prefix: &[u8]) -> ReplyKind {
        ReplyKind::Error(ErrorPrefix::of(prefix))
    }

    fn pair(command: &str, kind: ReplyKind) -> (String, ReplyKind) {
        (command.to_string(), kind)
    }

    #[test]
    fn redis_cli_round_trips_with_kinds_timestamps_and_sizes() {
        let mut conn = Conn::new();
        let set = cmd(&[b"SET", b"k", b"v"]);
        conn.send(&set).recv(b"+OK\r\n");
        conn.send(&cmd(&[b"GET", b"k"])).recv(b"$1\r\nv\r\n");
        conn.send(&cmd(&[b"GET", b"missing"])).recv(b"$-1\r\n");
        conn.send(&cmd(&[b"LPUSH", b"k", b"x"]))
            .recv(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        conn.send(&cmd(&[b"FOO"]))
            .recv(b"-ERR unknown command 'FOO', with args beginning with: \r\n");
        let matches = conn.matches();
        let kinds: Vec<_> = matches
            .iter()
            .map(|m| (m.command.to_string(), m.reply_kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                pair("SET", ReplyKind::Ok),
                pair("GET", ReplyKind::Ok),
                pair("GET", ReplyKind::Nil),
                pair("LPUSH", err(b"WRONGTYPE")),
                pair("UNKNOWN", err(b"ERR")),
            ]
        );
        let first = &matches[0];
        assert_eq!(
            (first.sent_ts_ns, first.reply_first_byte_ts_ns),
            (1_000, 2_000)
        );
        assert_eq!(
            (first.request_bytes, first.reply_bytes),
            (set.len() as u64, 5)
        );
        assert!(matches.iter().all(|m| m.depth == 1 && m.reply_complete));
        assert_eq!(conn.stats(), Stats::default());
    }

    #[test]
    fn pipeline_in_one_write_with_replies_split_and_merged_anyhow() {
        // redis-benchmark -P 3: three requests in one write.
        let mut conn = Conn::new();
        let mut batch = cmd(&[b"GET", b"a"]);
        batch.extend(cmd(&[b"GET", b"b"]));
        batch.extend(cmd(&[b"INCR", b"c"]));
        conn.send(&batch)
            .recv(b"$3\r\nfo")
            .recv(b"o\r\n$-")
            .recv(b"1\r\n:4")
            .recv(b"2\r\n");
        let matches = conn.matches();
        let got: Vec<_> = matches
            .iter()
            .map(|m| {
                (
                    m.command.name(),
                    m.reply_kind,
                    m.depth,
                    m.reply_first_byte_ts_ns,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("GET", ReplyKind::Ok, 1, 2_000),
                ("GET", ReplyKind::Nil, 2, 3_000),
                ("INCR", ReplyKind::Ok, 3, 4_000),
            ]
        );
        assert!(matches.iter().all(|m| m.sent_ts_ns == 1_000));
        assert_eq!(matches[0].reply_bytes, 9);
    }

    #[test]
    fn many_writes_before_one_read() {
        // Jedis/redis-py pipelines flushed across writes, answered in one read.
        let mut conn = Conn::new();
        let mut writes = Vec::new();
        for i in 0..50u32 {
            let key = format!("key:{i}");
            writes.push(cmd(&[b"HSET", key.as_bytes(), b"f", b"v"]));
        }
        // Requests split at arbitrary places across three writes.
        let stream = writes.concat();
        let (a, rest) = stream.split_at(17);
        let (b, c) = rest.split_at(700);
        conn.send(a).send(b).send(c);
        assert_eq!(conn.matcher.outstanding(), 50);
        conn.recv(&b":1\r\n".repeat(50));
        let matches = conn.matches();
        assert_eq!(matches.len(), 50);
        assert!(matches.iter().all(|m| m.command.name() == "HSET"));
        assert_eq!(matches[49].depth, 50);
        // A request's timestamp is that of the write holding its first byte.
        let mut start = 0;
        for (write, matched) in writes.iter().zip(&matches) {
            let expected = match start {
                0..17 => 1_000,
                17..717 => 2_000,
                _ => 3_000,
            };
            assert_eq!(matched.sent_ts_ns, expected, "request at byte {start}");
            start += write.len();
        }
    }

    #[test]
    fn error_prefixes() {
        let cases: &[(&[u8], &str)] = &[
            (b"-ERR syntax error\r\n", "ERR"),
            (b"-MOVED 3999 127.0.0.1:6381\r\n", "MOVED"),
            (b"-ASK 3999 127.0.0.1:6381\r\n", "ASK"),
            (b"-CLUSTERDOWN Hash slot not served\r\n", "CLUSTERDOWN"),
            (
                b"-LOADING Redis is loading the dataset in memory\r\n",
                "LOADING",
            ),
            (
                b"-READONLY You can't write against a read only replica.\r\n",
                "READONLY",
            ),
            (b"-MASTERDOWN Link with MASTER is down\r\n", "MASTERDOWN"),
            (b"-NOAUTH Authentication required.\r\n", "NOAUTH"),
            (b"-BUSY Redis is busy running a script.\r\n", "BUSY"),
            (
                b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
                "OOM",
            ),
            (
                b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
                "TRYAGAIN",
            ),
            (
                b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
                "NOSCRIPT",
            ),
            (b"-NOPERM User default has no permissions\r\n", "NOPERM"),
            (
                b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                "EXECABORT",
            ),
            (
                b"-WRONGPASS invalid username-password pair\r\n",
                "WRONGPASS",
            ),
            (b"-Error: lowercase from a module\r\n", "ERR"),
            (b"-ABCDEFGHIJKLMNOPQRSTUVWXYZ too long a word\r\n", "ERR"),
            (b"-\r\n", "ERR"),
            (b"!21\r\nSYNTAX invalid syntax\r\n", "SYNTAX"),
        ];
        let mut conn = Conn::new();
        for (reply, prefix) in cases {
            conn.send(&cmd(&[b"GET", b"k"])).recv(reply);
            let got = conn.matched();
            assert_eq!(got.len(), 1);
            let ReplyKind::Error(got) = got[0].1 else {
                panic!("{got:?}")
            };
            assert_eq!(got.as_str(), *prefix, "{}", String::from_utf8_lossy(reply));
        }
    }

    #[test]
    fn container_commands_are_one_name_and_unknown_names_are_fixed() {
        let cases: &[(&[&[u8]], &str)] = &[
            (&[b"CLIENT", b"SETNAME", b"app"], "CLIENT SETNAME"),
            (&[b"config", b"get", b"maxmemory"], "CONFIG GET"),
            (&[b"CLUSTER", b"INFO"], "CLUSTER INFO"),
            (&[b"XINFO", b"STREAM", b"s"], "XINFO STREAM"),
            (&[b"OBJECT", b"ENCODING", b"k"], "OBJECT ENCODING"),
            (&[b"SCRIPT", b"LOAD", b"return 1"], "SCRIPT LOAD"),
            (&[b"MEMORY", b"USAGE", b"k"], "MEMORY USAGE"),
            (&[b"ACL", b"WHOAMI"], "ACL WHOAMI"),
            (&[b"FUNCTION", b"LIST"], "FUNCTION LIST"),
            (&[b"COMMAND", b"DOCS", b"GET"], "COMMAND DOCS"),
            (&[b"COMMAND"], "COMMAND"),
            (&[b"PUBSUB", b"NUMSUB", b"a"], "PUBSUB NUMSUB"),
            (&[b"LATENCY", b"LATEST"], "LATENCY LATEST"),
            (&[b"MODULE", b"LIST"], "MODULE LIST"),
            (&[b"SLOWLOG", b"GET", b"10"], "SLOWLOG GET"),
            (&[b"DEBUG", b"SLEEP", b"0.3"], "DEBUG SLEEP"),
            (
                &[
                    b"evalsha",
                    b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db",
                    b"0",
                ],
                "EVALSHA",
            ),
            (&[b"GET", b"SETNAME"], "GET"),
            (&[b"CLIENT", b"NOSUCHSUB"], "CLIENT"),
            (&[b"NOSUCHCOMMAND", b"x"], "UNKNOWN"),
            (&[b"GET\x00\xff"], "UNKNOWN"),
        ];
        let mut conn = Conn::new();
        let long = vec![b'A'; 10_000];
        conn.send(&cmd(&[&long])).recv(b"-ERR unknown command\r\n");
        assert_eq!(conn.matched()[0].0, "UNKNOWN");
        for (args, name) in cases {
            conn.send(&cmd(args)).recv(b"+OK\r\n");
            assert_eq!(conn.matched(), ok(&[name]));
        }
    }

    #[test]
    fn resp2_pubsub_confirmations_pushes_and_ping() {
        // redis-cli / redis-py on RESP2.
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"SUBSCRIBE", b"a", b"b"]))
            .recv(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
            .recv(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n");
        let matches = conn.matches();
        assert_eq!(matches.len(), 1, "one request, two confirmation frames");
        assert_eq!(matches[0].command.name(), "SUBSCRIBE");
        assert_eq!(matches[0].reply_first_byte_ts_ns, 2_000);
        assert_eq!(matches[0].reply_bytes, 2 * 30);
        conn.recv(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n");
        conn.send(&cmd(&[b"PING"]));
        // A message published before the PING is answered is a push, not its reply.
        conn.recv(b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\nhi\r\n")
            .recv(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        assert_eq!(conn.matched(), ok(&["PING"]));
        // Unsubscribe from all: one confirmation per channel, counted down.
        conn.send(&cmd(&[b"UNSUBSCRIBE"]))
            .recv(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n");
        assert_eq!(conn.matched(), ok(&["UNSUBSCRIBE"]));
        // Out of pub/sub mode, an array that starts with "message" is a reply.
        conn.send(&cmd(&[b"LRANGE", b"l", b"0", b"-1"]))
            .recv(b"*2\r\n$7\r\nmessage\r\n$1\r\nx\r\n");
        assert_eq!(conn.matched(), ok(&["LRANGE"]));
        assert_eq!(conn.stats().pushes, 2);
        assert_eq!(conn.stats().unmatched_replies, 0);
    }

    #[test]
    fn pattern_and_shard_subscriptions() {
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"PSUBSCRIBE", b"news.*"]))
            .recv(b"*3\r\n$10\r\npsubscribe\r\n$6\r\nnews.*\r\n:1\r\n")
            .recv(b"*4\r\n$8\r\npmessage\r\n$6\r\nnews.*\r\n$6\r\nnews.a\r\n$1\r\nx\r\n")
            .send(&cmd(&[b"SSUBSCRIBE", b"s1", b"s2"]))
            .recv(b"*3\r\n$10\r\nssubscribe\r\n$2\r\ns1\r\n:1\r\n*3\r\n$10\r\nssubscribe\r\n$2\r\ns2\r\n:2\r\n")
            .recv(b"*3\r\n$8\r\nsmessage\r\n$2\r\ns1\r\n$1\r\ny\r\n")
            .send(&cmd(&[b"PUNSUBSCRIBE"]))
            .recv(b"*3\r\n$12\r\npunsubscribe\r\n$6\r\nnews.*\r\n:0\r\n");
        assert_eq!(
            conn.matched(),
            ok(&["PSUBSCRIBE", "SSUBSCRIBE", "PUNSUBSCRIBE"])
        );
        assert_eq!(conn.stats().pushes, 2);
    }

    #[test]
    fn resp3_after_hello_3_pushes_never_replies() {
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"HELLO", b"3"])).recv(
            b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.2.4\r\n\
              $5\r\nproto\r\n:3\r\n$2\r\nid\r\n:5\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n\
              $4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n",
        );
        assert_eq!(conn.matched(), ok(&["HELLO"]));
        // RESP3 confirmations are pushes, and still answer SUBSCRIBE.
        conn.send(&cmd(&[b"SUBSCRIBE", b"ch"]))
            .recv(b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n");
        assert_eq!(conn.matched(), ok(&["SUBSCRIBE"]));
        // Subscribed on RESP3, any command may run; its reply is not a push
        // even when it looks like one, and pushes in between are skipped.
        conn.send(&cmd(&[b"GET", b"k"]))
            .send(&cmd(&[b"LRANGE", b"l", b"0", b"-1"]))
            .recv(b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n_\r\n")
            .recv(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n")
            .recv(b"*2\r\n$7\r\nmessage\r\n$1\r\nx\r\n");
        assert_eq!(
            conn.matched(),
            vec![pair("GET", ReplyKind::Nil), pair("LRANGE", ReplyKind::Ok)]
        );
        assert_eq!(conn.stats().pushes, 2);
        // Attributes annotate a reply; they are not one.
        conn.send(&cmd(&[b"GET", b"k"]))
            .recv(b"|1\r\n+key-popularity\r\n%1\r\n$1\r\nk\r\n,0.19\r\n$1\r\nv\r\n");
        let matches = conn.matches();
        assert_eq!(matches.len(), 1);
        assert_eq!(matches[0].reply_bytes, 46);
    }

    #[test]
    fn monitor_output_is_pushes() {
        let mut conn = Conn::new();
        conn.send(b"MONITOR\r\n")
            .recv(b"+OK\r\n")
            .recv(b"+1700000000.123456 [0 127.0.0.1:50000] \"GET\" \"k\"\r\n")
            .recv(b"+1700000000.223456 [0 127.0.0.1:50000] \"SET\" \"k\" \"v\"\r\n")
            .send(b"QUIT\r\n")
            .recv(b"+1700000000.323456 [0 127.0.0.1:50001] \"PING\"\r\n+OK\r\n");
        assert_eq!(conn.matched(), ok(&["MONITOR", "QUIT"]));
        assert_eq!(conn.stats().pushes, 3);
    }

    #[test]
    fn client_reply_off_skip_on() {
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"CLIENT", b"REPLY", b"OFF"]))
            .send(&cmd(&[b"SET", b"a", b"1"]))
            .send(&cmd(&[b"CLIENT", b"REPLY", b"SKIP"])) // no effect while off
            .send(&cmd(&[b"CLIENT", b"REPLY", b"ON"]))
            .recv(b"+OK\r\n")
            .send(&cmd(&[b"client", b"reply", b"skip"]))
            .send(&cmd(&[b"SET", b"b", b"2"]))
            .send(&cmd(&[b"GET", b"b"]))
            .recv(b"$1\r\n2\r\n");
        let got: Vec<_> = conn
            .take()
            .into_iter()
            .map(|e| match e {
                Event::Matched(m) => format!("matched {}", m.command),
                Event::NoReply(n) => format!("noreply {}", n.command),
                Event::Unanswered(u) => format!("unanswered {}", u.command),
            })
            .collect();
        assert_eq!(
            got,
            [
                "noreply CLIENT REPLY",
                "noreply SET",
                "noreply CLIENT REPLY",
                "matched CLIENT REPLY",
                "noreply CLIENT REPLY",
                "noreply SET",
                "matched GET",
            ]
        );
        assert_eq!(conn.stats().unmatched_replies, 0);
    }

    #[test]
    fn a_replicas_offset_reports_get_no_reply() {
        // Seen from the replica's side of a replication link: its ACKs, and
        // the primary's stream, which answers none of them.
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"REPLCONF", b"ACK", b"1234"]))
            .recv(&cmd(&[b"SET", b"k", b"v"]))
            .send(&cmd(&[b"replconf", b"ack", b"1260"]));
        let got: Vec<_> = conn
            .take()
            .into_iter()
            .map(|e| match e {
                Event::NoReply(n) => format!("noreply {}", n.command),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(got, ["noreply REPLCONF", "noreply REPLCONF"]);
        assert_eq!(conn.stats().unmatched_replies, 1);
    }

    #[test]
    fn blocking_commands_just_take_long() {
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"BLPOP", b"queue", b"0"]));
        conn.ts_ns += 5_000_000_000;
        conn.recv(b"*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n");
        let matches = conn.matches();
        assert_eq!(
            matches[0].reply_first_byte_ts_ns - matches[0].sent_ts_ns,
            5_000_001_000
        );
    }

    #[test]
    fn a_reply_nobody_asked_for_is_counted() {
        let mut conn = Conn::new();
        conn.recv(b"+OK\r\n");
        assert!(conn.take().is_empty());
        assert_eq!(conn.stats().unmatched_replies, 1);
    }

    #[test]
    fn close_and_expire_report_unanswered_and_late_replies_shift_nothing() {
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"DEBUG", b"SLEEP", b"1"])); // t=1µs
        conn.send(&cmd(&[b"GET", b"k"])); // t=2µs
        conn.matcher
            .expire(101_500, Duration::from_micros(100), &mut conn.events);
        assert_eq!(
            conn.take(),
            vec![Event::Unanswered(Unanswered {
                command: commands::lookup(b"DEBUG", Some(b"SLEEP")).unwrap(),
                sent_ts_ns: 1_000,
                age_ns: 100_500,
                reason: UnansweredReason::Timeout,
            })]
        );
        assert_eq!(conn.matcher.outstanding(), 1);
        // The late reply goes to the expired request, not to GET.
        conn.recv(b"+OK\r\n").recv(b"$1\r\nv\r\n");
        assert_eq!(conn.matched(), ok(&["GET"]));
        assert_eq!(conn.stats().late_replies, 1);
        conn.send(&cmd(&[b"QUIT"]));
        conn.matcher.close(10_000, &mut conn.events);
        let Event::Unanswered(quit) = &conn.take()[0] else {
            panic!()
        };
        assert_eq!(
            (quit.reason, quit.age_ns),
            (UnansweredReason::Closed, 5_000)
        );
        assert_eq!(conn.matcher.outstanding(), 0);
    }

    #[test]
    fn overflow_gives_up_the_oldest_but_keeps_its_place() {
        let mut conn = Conn::with(Matcher::new(Config { max_outstanding: 2 }));
        conn.send(&cmd(&[b"INCR", b"a"]))
            .send(&cmd(&[b"INCR", b"b"]))
            .send(&cmd(&[b"GET", b"c"]));
        let events = conn.take();
        assert!(matches!(
            &events[..],
            [Event::Unanswered(Unanswered {
                reason: UnansweredReason::Overflow,
                ..
            })]
        ));
        assert_eq!(conn.matcher.outstanding(), 2);
        conn.recv(b":1\r\n:1\r\n$-1\r\n");
        assert_eq!(
            conn.matched(),
            vec![pair("INCR", ReplyKind::Ok), pair("GET", ReplyKind::Nil)]
        );
        assert_eq!(conn.stats().late_replies, 1);
    }

    #[test]
    fn a_request_lost_in_a_gap_takes_its_reply_with_it() {
        // SET with a 1 MB value and a pipelined GET in one write; the capture
        // kept 4 KiB, so GET's header is lost.
        let mut conn = Conn::new();
        let value = vec![b'x'; 1 << 20];
        let mut write = cmd(&[b"SET", b"big", &value]);
        write.extend(cmd(&[b"GET", b"big"]));
        conn.send_truncated(&write[..4096], write.len());
        // GET's reply, read with a 14-byte capture.
        conn.recv(b"+OK\r\n")
            .recv_truncated(b"$1048576\r\nxxxx", (1 << 20) + 12);
        conn.send(&cmd(&[b"DEL", b"big"])).recv(b":1\r\n");
        let matches = conn.matches();
        let got: Vec<_> = matches.iter().map(|m| m.command.name()).collect();
        assert_eq!(got, ["SET", "DEL"]);
        assert_eq!(matches[0].request_bytes, write.len() as u64 - 22);
        let stats = conn.stats();
        assert_eq!(stats.request_desyncs, 1);
        assert_eq!(stats.unparsed_request_bytes, 22);
        assert_eq!(stats.gap_replies, 1);
    }

    #[test]
    fn a_reply_cut_by_a_gap_still_times_its_request() {
        // HGETALL with big values: the capture lost the second value's header.
        let mut conn = Conn::new();
        conn.send(&cmd(&[b"HGETALL", b"h"]))
            .send(&cmd(&[b"GET", b"k"]));
        let head = b"*4\r\n$1\r\na\r\n$5000\r\nxxxx";
        conn.recv_truncated(head, 4 + 7 + 5009 + 7 + 5009);
        let events = conn.take();
        let [Event::Matched(hgetall), Event::Unanswered(get)] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(hgetall.command.name(), "HGETALL");
        assert!(!hgetall.reply_complete);
        assert_eq!(get.reason, UnansweredReason::ReplyLost);
        // The next read after the next request picks the stream up again.
        conn.send(&cmd(&[b"PING"])).recv(b"+PONG\r\n");
        assert_eq!(conn.matched(), ok(&["PING"]));
        assert_eq!(conn.stats().reply_desyncs, 1);
    }

    #[test]
    fn attached_mid_stream_with_a_pipeline_and_a_long_reply_in_flight() {
        let mut conn = Conn::with(Matcher::mid_stream(Config::default()));
        // Tail of a pipelined request, then the rest of a reply that spans reads.
        conn.send(b"b\r\n$3\r\nGET\r\n$1\r\nb\r\n");
        conn.recv(b"lue-of-a\r\n$5000\r\n")
            .recv(&[b'z'; 1000])
            .recv(b"+OK\r\n$-1\r\n");
        assert!(conn.take().is_empty());
        // From the next request on, every request matches its own reply.
        conn.send(&cmd(&[b"SET", b"k", b"v"])).recv(b"+OK\r\n");
        let mut two = cmd(&[b"GET", b"k"]);
        two.extend(cmd(&[b"TTL", b"k"]));
        conn.send(&two).recv(b"$1\r\nv\r\n:-1\r\n");
        assert_eq!(conn.matched(), ok(&["SET", "GET", "TTL"]));
    }

    #[test]
    fn a_reply_before_its_request_is_not_its_reply() {
        let mut conn = Conn::with(Matcher::mid_stream(Config::default()));
        conn.recv(b"+OK\r\n"); // answers something sent before we attached
        conn.send(&cmd(&[b"GET", b"k"])).recv(b"$-1\r\n");
        assert_eq!(conn.matched(), vec![pair("GET", ReplyKind::Nil)]);
    }

    #[test]
    fn transactions_answer_each_command() {
        let mut conn = Conn::new();
        let mut tx = cmd(&[b"MULTI"]);
        tx.extend(cmd(&[b"INCR", b"a"]));
        tx.extend(cmd(&[b"INCR", b"b"]));
        tx.extend(cmd(&[b"EXEC"]));
        conn.send(&tx)
            .recv(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:1\r\n");
        assert_eq!(conn.matched(), ok(&["MULTI", "INCR", "INCR", "EXEC"]));
    }

    #[test]
    fn reset_leaves_monitor_and_resp3() {
        let mut conn = Conn::new();
        conn.send(b"HELLO 3\r\n")
            .recv(b"%1\r\n$5\r\nproto\r\n:3\r\n")
            .send(b"RESET\r\n")
            .recv(b"+RESET\r\n")
            .send(&cmd(&[b"SUBSCRIBE", b"c"]))
            .recv(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")
            .recv(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n");
        assert_eq!(conn.matched(), ok(&["HELLO", "RESET", "SUBSCRIBE"]));
        assert_eq!(conn.stats().pushes, 1);
    }
}
