//! Track: the kernel's per-connection segments → matched RESP exchanges.
//!
//! One [`resp::Matcher`] per traced socket (by cookie) gets the request and
//! reply streams in order, gaps included; what it reports becomes an
//! [`Exchange`]. Timing is the kernel's: a request's first byte leaving the
//! client (or arriving at the server), a reply's first byte arriving at the
//! client (or leaving the server), and the application's first read after
//! data arrived.

use rustc_hash::FxHashMap;
use std::{borrow::Cow, collections::VecDeque, net::SocketAddr, time::Duration};

use agent_common::{
    Closer, ConnectionRole,
    resp::{
        SEGMENT_FIN, SEGMENT_FROM_START, SEGMENT_LAST, SEGMENT_PLAINTEXT, SEGMENT_RST,
        SEGMENT_VIA_LISTENER,
    },
};

use crate::{
    decode::Segment,
    resp::{self, Chunk, Command, ErrorPrefix, Matcher, ReplyKind, UnansweredReason},
    tls::{self, TurnEvent, Turns},
};

/// Sockets tracked at once; the least recently active go first beyond it.
const MAX_FLOWS: usize = 65_536;
/// Completed exchanges waiting for the application's read, per socket.
const MAX_HELD: usize = 4_096;
/// Application reads remembered per server socket.
const READS_KEPT: usize = 64;
/// A held exchange is given up waiting for its read after this long.
const HOLD_LIMIT_NS: u64 = 1_000_000_000;
/// Out-of-order bytes kept per stream while a hole waits to be filled; a
/// hole is given up (skipped as a gap) beyond that, at once when the kernel
/// reports a record of the connection lost to a full ring buffer (that
/// hole never fills), or after `HOLE_LIMIT_NS` (TCP repairs a loss within
/// a few backed-off RTOs; a stream still waiting by then is stuck anyway).
const MAX_OUT_OF_ORDER_BYTES: usize = 4 << 20;
const MAX_OUT_OF_ORDER_SEGMENTS: usize = 1_024;
const HOLE_LIMIT_NS: u64 = 20_000_000_000;
/// A socket without traffic for this long is forgotten (the kernel's
/// destroy event may have been lost, or the kernel's LRU evicted it).
const IDLE_LIMIT_NS: u64 = 600_000_000_000;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    Nil,
    Error(ErrorPrefix),
    /// No reply before the connection closed or `--request-timeout`.
    Timeout,
    /// No reply by protocol (`CLIENT REPLY OFF|SKIP`).
    NoReply,
    /// Counted, not timed: its reply could not be told apart (the stream
    /// lost sync, or too many requests were in flight).
    Untimed,
}

/// One request and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub ts_ns: u64,
    pub role: ConnectionRole,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub command: Command,
    pub outcome: Outcome,
    /// Client: request's first byte sent → reply complete (its last byte
    /// arrived). Server: request's first byte arrived → reply's last byte
    /// written. Timeout: its age.
    pub latency_ns: u64,
    /// Request sent (arrived) → reply's first byte arrived (written).
    pub first_byte_ns: Option<u64>,
    /// Client: reply arrived → the application read. Server: request
    /// arrived → Redis read it.
    pub read_delay_ns: Option<u64>,
    pub request_bytes: u64,
    pub reply_bytes: u64,
    /// Requests in flight when it was sent, itself included.
    pub depth: u32,
    pub closer: Option<Closer>,
    /// On a TLS connection (`command` is then [`Command::TLS`], a turn).
    pub tls: bool,
}

struct Flow {
    matcher: Parsers,
    role: ConnectionRole,
    client: SocketAddr,
    server: SocketAddr,
    cgroup_id: u64,
    /// Records of the segment being put together (requests, replies).
    assembling: [Vec<u8>; 2],
    /// Each stream put back in TCP order.
    order: [Reorder; 2],
    /// The kernel's count of this connection's records it could not queue.
    drops: u32,
    /// Client role: exchanges waiting for the application's read.
    held: Vec<Exchange>,
    /// Server role: when Redis read.
    reads: VecDeque<u64>,
    last_ns: u64,
    closed: bool,
    /// No segment fed yet (a first request handed over by the listener
    /// goes first).
    new: bool,
}

/// Counters of what the tracker could not follow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrackerStats {
    /// Holes in a stream given up on (skipped as a gap).
    pub gaps: u64,
    pub unparsed_bytes: u64,
    pub desyncs: u64,
    pub unmatched_replies: u64,
    pub flows_evicted: u64,
    /// Connections found carrying TLS.
    pub tls_connections: u64,
}

/// First requests received by a listener, waiting for their connection's
/// socket to show up (see `SEGMENT_VIA_LISTENER`).
const MAX_HANDED_OVER: usize = 4_096;
const HANDOVER_LIMIT_NS: u64 = 10_000_000_000;

#[derive(Default)]
pub struct Tracker {
    /// Boxed: a `Flow` is ~1 KiB and the map keeps spare capacity.
    flows: FxHashMap<u64, Box<Flow>>,
    /// By (client, server).
    handed_over: FxHashMap<(SocketAddr, SocketAddr), Vec<KeptSegment>>,
    /// Client sockets' cookies by (client, server), for TLS plaintext.
    clients: FxHashMap<(SocketAddr, SocketAddr), u64>,
    /// Scratch for the parsers' output, reused across segments.
    events: Fed,
    /// Counters of flows already gone.
    retired: TrackerStats,
}

impl Tracker {
    /// One record of a segment; finished exchanges go to `out`.
    pub fn segment(&mut self, segment: &Segment<'_>, out: &mut Vec<Exchange>) {
        if segment.flags & SEGMENT_PLAINTEXT != 0 {
            self.plaintext(segment, out);
            return;
        }
        if segment.flags & SEGMENT_VIA_LISTENER != 0 {
            // Whole single-record segments only: a first request.
            if segment.offset == 0
                && segment.flags & SEGMENT_LAST != 0
                && self.handed_over.len() < MAX_HANDED_OVER
            {
                self.handed_over
                    .entry((segment.client, segment.server))
                    .or_default()
                    .push(KeptSegment {
                        ts_ns: segment.ts_ns,
                        seq: segment.seq,
                        data: segment.data.to_vec(),
                        len: segment.len,
                    });
            }
            return;
        }
        if !self.flows.contains_key(&segment.cookie) {
            if self.flows.len() >= MAX_FLOWS {
                self.evict_oldest(out);
            }
            if segment.role == ConnectionRole::Client {
                self.clients
                    .insert((segment.client, segment.server), segment.cookie);
            }
        }
        let flow = self.flows.entry(segment.cookie).or_insert_with(|| {
            Box::new(Flow {
                matcher: Parsers::new(segment.flags & SEGMENT_FROM_START != 0),
                role: segment.role,
                client: segment.client,
                server: segment.server,
                cgroup_id: segment.cgroup_id,
                assembling: [Vec::new(), Vec::new()],
                order: [Reorder::default(), Reorder::default()],
                drops: 0,
                held: Vec::new(),
                reads: VecDeque::new(),
                last_ns: segment.ts_ns,
                closed: false,
                new: true,
            })
        });
        flow.last_ns = segment.ts_ns;
        let stream = usize::from(!segment.requests);
        let Some(data) = assemble(&mut flow.assembling[stream], segment) else {
            return;
        };
        let events = &mut self.events;
        events.resp.clear();
        events.turns.clear();
        if std::mem::take(&mut flow.new)
            && segment.role == ConnectionRole::Server
            && let Some(first) = self.handed_over.remove(&(segment.client, segment.server))
        {
            for piece in first {
                let matcher = &mut flow.matcher;
                flow.order[0].push(piece.seq, piece.ts_ns, &piece.data, piece.len, &mut |p| {
                    feed(matcher, 0, p, events)
                });
            }
        }
        if segment.len > 0 {
            let matcher = &mut flow.matcher;
            self.retired.gaps += flow.order[stream].push(
                segment.seq,
                segment.ts_ns,
                &data,
                segment.len,
                &mut |piece| feed(matcher, stream, piece, events),
            );
        }
        if segment.flags & (SEGMENT_FIN | SEGMENT_RST) != 0 {
            // Nothing more comes on this stream: skip what is still missing.
            let matcher = &mut flow.matcher;
            self.retired.gaps +=
                flow.order[stream].give_up(&mut |piece| feed(matcher, stream, piece, events));
        }
        if segment.drops != flow.drops {
            // A record of this connection was lost (either stream): its
            // hole never fills.
            flow.drops = segment.drops;
            for lost in 0..2 {
                let matcher = &mut flow.matcher;
                while flow.order[lost].give_up(&mut |piece| feed(matcher, lost, piece, events)) > 0
                {
                    self.retired.gaps += 1;
                }
            }
        }
        let mut closer = None;
        if segment.flags & (SEGMENT_FIN | SEGMENT_RST) != 0 && !flow.closed {
            // Whoever ends the connection ends the wait: a reply that
            // arrives after close() reaches nobody.
            let local = segment.requests == (segment.role == ConnectionRole::Client);
            closer = Some(match (local, segment.flags & SEGMENT_RST != 0) {
                (true, false) => Closer::Local,
                (false, false) => Closer::Peer,
                (true, true) => Closer::LocalAbort,
                (false, true) => Closer::PeerReset,
            });
            flow.closed = true;
            flow.matcher.close(segment.ts_ns, events);
        }
        for event in events.resp.drain(..) {
            flow.exchange(event, segment.ts_ns, closer, out);
        }
        for event in events.turns.drain(..) {
            flow.turn(event, closer, out);
        }
        if closer.is_some() {
            flow.release_held(None, out);
        }
    }

    /// The application read from a socket with unread data.
    pub fn app_read(&mut self, cookie: u64, ts_ns: u64, out: &mut Vec<Exchange>) {
        let Some(flow) = self.flows.get_mut(&cookie) else {
            return;
        };
        match flow.role {
            ConnectionRole::Client => flow.release_held(Some(ts_ns), out),
            ConnectionRole::Server => {
                if flow.reads.len() >= READS_KEPT {
                    flow.reads.pop_front();
                }
                flow.reads.push_back(ts_ns);
            }
        }
    }

    /// The socket is gone: whatever is still waiting ends now.
    pub fn socket_gone(&mut self, cookie: u64, ts_ns: u64, out: &mut Vec<Exchange>) {
        if let Some(mut flow) = self.flows.remove(&cookie) {
            flow.finish(ts_ns, out);
            self.retire(cookie, &flow);
        }
    }

    /// Periodic upkeep at kernel time `now_ns`: requests older than
    /// `timeout` time out, held exchanges stop waiting for a read, idle
    /// sockets are forgotten.
    pub fn tick(&mut self, now_ns: u64, timeout: Duration, out: &mut Vec<Exchange>) {
        self.handed_over.retain(|_, pieces| {
            pieces
                .last()
                .is_some_and(|piece| now_ns.saturating_sub(piece.ts_ns) < HANDOVER_LIMIT_NS)
        });
        let mut idle = Vec::new();
        for (&cookie, flow) in &mut self.flows {
            let mut events = Fed::default();
            for stream in 0..2 {
                if !flow.order[stream].hole_older_than(now_ns, HOLE_LIMIT_NS) {
                    continue;
                }
                let matcher = &mut flow.matcher;
                self.retired.gaps += flow.order[stream]
                    .give_up(&mut |piece| feed(matcher, stream, piece, &mut events));
            }
            flow.matcher.expire(now_ns, timeout, &mut events);
            flow.report(events, now_ns, out);
            if flow
                .held
                .first()
                .is_some_and(|held| now_ns.saturating_sub(held.ts_ns) > HOLD_LIMIT_NS)
            {
                flow.release_held(None, out);
            }
            if now_ns.saturating_sub(flow.last_ns) > IDLE_LIMIT_NS {
                idle.push(cookie);
            }
        }
        for cookie in idle {
            if let Some(mut flow) = self.flows.remove(&cookie) {
                flow.finish(now_ns, out);
                self.retire(cookie, &flow);
                self.retired.flows_evicted += 1;
            }
        }
    }

    /// Ends every flow (agent exit): held exchanges are reported.
    pub fn flush(&mut self, out: &mut Vec<Exchange>) {
        for flow in self.flows.values_mut() {
            flow.release_held(None, out);
        }
    }

    pub fn stats(&self) -> TrackerStats {
        let mut stats = self.retired;
        for flow in self.flows.values() {
            add_stats(&mut stats, &flow.matcher);
        }
        stats
    }

    fn retire(&mut self, cookie: u64, flow: &Flow) {
        add_stats(&mut self.retired, &flow.matcher);
        let key = (flow.client, flow.server);
        if self.clients.get(&key) == Some(&cookie) {
            self.clients.remove(&key);
        }
    }

    /// Plaintext of a TLS library call on a client socket: RESP from then
    /// on, in place of the connection's turns.
    fn plaintext(&mut self, segment: &Segment<'_>, out: &mut Vec<Exchange>) {
        let Some(flow) = self
            .clients
            .get(&(segment.client, segment.server))
            .and_then(|cookie| self.flows.get_mut(cookie))
        else {
            return;
        };
        if flow.matcher.tls.is_none() {
            return;
        }
        let stream = usize::from(!segment.requests);
        let parsers = &mut flow.matcher;
        let Some(data) = assemble(&mut parsers.plain_assembling[stream], segment) else {
            return;
        };
        let plaintext = match &mut parsers.plaintext {
            Some(matcher) => matcher,
            // Replies to requests written before: not ours to match.
            None if !segment.requests => return,
            None => {
                if let Some(turns) = &mut parsers.tls {
                    turns.forget_open();
                }
                parsers
                    .plaintext
                    .insert(Box::new(Matcher::new(resp::Config::default())))
            }
        };
        let events = &mut self.events;
        events.resp.clear();
        let chunk = Chunk::truncated(segment.ts_ns, &data, u64::from(segment.len));
        if segment.requests {
            plaintext.on_request(chunk, &mut events.resp);
        } else {
            plaintext.on_reply(chunk, &mut events.resp);
        }
        flow.last_ns = segment.ts_ns;
        for event in events.resp.drain(..) {
            flow.exchange(event, segment.ts_ns, None, out);
        }
    }

    fn evict_oldest(&mut self, out: &mut Vec<Exchange>) {
        let Some((&cookie, _)) = self.flows.iter().min_by_key(|(_, flow)| flow.last_ns) else {
            return;
        };
        if let Some(mut flow) = self.flows.remove(&cookie) {
            let now = flow.last_ns;
            flow.finish(now, out);
            self.retire(cookie, &flow);
            self.retired.flows_evicted += 1;
        }
    }
}

fn add_stats(total: &mut TrackerStats, parsers: &Parsers) {
    total.tls_connections += u64::from(parsers.tls.is_some());
    let matchers = std::iter::once(&parsers.resp).chain(parsers.plaintext.as_deref());
    for stats in matchers.map(Matcher::stats) {
        total.unparsed_bytes += stats.unparsed_request_bytes + stats.unparsed_reply_bytes;
        total.desyncs += stats.request_desyncs + stats.reply_desyncs;
        total.unmatched_replies += stats.unmatched_replies;
    }
}

impl Flow {
    fn finish(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        if !self.closed {
            let mut events = Fed::default();
            self.matcher.close(ts_ns, &mut events);
            self.report(events, ts_ns, out);
        }
        self.release_held(None, out);
    }

    fn report(&mut self, mut events: Fed, now_ns: u64, out: &mut Vec<Exchange>) {
        for event in events.resp.drain(..) {
            self.exchange(event, now_ns, None, out);
        }
        for event in events.turns.drain(..) {
            self.turn(event, None, out);
        }
    }

    /// A TLS turn as an exchange of op `tls`. Not held for the
    /// application's read: a turn is reported after the client has read.
    fn turn(&mut self, event: TurnEvent, closer: Option<Closer>, out: &mut Vec<Exchange>) {
        if self.matcher.plaintext.is_some() {
            return; // its requests are matched in plaintext
        }
        let (turn, outcome, latency_ns, closer) = match event {
            TurnEvent::Answered(turn) => {
                let latency = turn.last_answer_ns.saturating_sub(turn.sent_ns);
                (turn, Outcome::Ok, latency, None)
            }
            TurnEvent::Unanswered {
                turn,
                age_ns,
                closed,
            } => (turn, Outcome::Timeout, age_ns, closer.filter(|_| closed)),
        };
        out.push(Exchange {
            ts_ns: turn.sent_ns.saturating_add(latency_ns),
            role: self.role,
            client: self.client,
            server: self.server,
            cgroup_id: self.cgroup_id,
            cgroup: None,
            command: Command::TLS,
            outcome,
            latency_ns,
            first_byte_ns: turn
                .first_answer_ns
                .map(|first| first.saturating_sub(turn.sent_ns)),
            read_delay_ns: None,
            request_bytes: turn.request_bytes,
            reply_bytes: turn.answer_bytes,
            depth: 1,
            closer,
            tls: true,
        });
    }

    fn exchange(
        &mut self,
        event: resp::Event,
        now_ns: u64,
        closer: Option<Closer>,
        out: &mut Vec<Exchange>,
    ) {
        let base = |command, outcome, latency_ns, request_bytes| Exchange {
            ts_ns: now_ns,
            role: self.role,
            client: self.client,
            server: self.server,
            cgroup_id: self.cgroup_id,
            cgroup: None,
            command,
            outcome,
            latency_ns,
            first_byte_ns: None,
            read_delay_ns: None,
            request_bytes,
            reply_bytes: 0,
            depth: 1,
            closer: None,
            tls: self.matcher.tls.is_some(),
        };
        match event {
            resp::Event::Matched(m) => {
                let outcome = match m.reply_kind {
                    ReplyKind::Ok => Outcome::Ok,
                    ReplyKind::Nil => Outcome::Nil,
                    ReplyKind::Error(prefix) => Outcome::Error(prefix),
                };
                let latency = m.reply_last_byte_ts_ns.saturating_sub(m.sent_ts_ns);
                let mut exchange = base(m.command, outcome, latency, m.request_bytes);
                exchange.ts_ns = m.reply_last_byte_ts_ns;
                exchange.first_byte_ns =
                    Some(m.reply_first_byte_ts_ns.saturating_sub(m.sent_ts_ns));
                exchange.reply_bytes = m.reply_bytes;
                exchange.depth = m.depth;
                match self.role {
                    // Plaintext replies are timed at the application's read.
                    ConnectionRole::Client if self.matcher.plaintext.is_some() => {
                        out.push(exchange);
                    }
                    ConnectionRole::Client => {
                        if self.held.len() >= MAX_HELD {
                            self.release_held(None, out);
                        }
                        self.held.push(exchange);
                    }
                    ConnectionRole::Server => {
                        // Service starts at Redis' first read after the
                        // request arrived.
                        // Reads are in time order (one socket's reads are
                        // serialised by its lock): the first at or after.
                        let first = self.reads.partition_point(|&read| read < m.sent_ts_ns);
                        exchange.read_delay_ns = self
                            .reads
                            .get(first)
                            .map(|read| read - m.sent_ts_ns)
                            .filter(|&delay| delay <= latency);
                        out.push(exchange);
                    }
                }
            }
            resp::Event::NoReply(n) => {
                out.push(base(n.command, Outcome::NoReply, 0, n.request_bytes));
            }
            resp::Event::Unanswered(u) => {
                let outcome = match u.reason {
                    UnansweredReason::Closed | UnansweredReason::Timeout => Outcome::Timeout,
                    UnansweredReason::ReplyLost | UnansweredReason::Overflow => Outcome::Untimed,
                };
                let mut exchange = base(u.command, outcome, u.age_ns, 0);
                if u.reason == UnansweredReason::Closed {
                    exchange.closer = closer;
                }
                out.push(exchange);
            }
        }
    }

    /// Reports the held exchanges; `read_ns` is when the application read
    /// them (`None`: not seen).
    fn release_held(&mut self, read_ns: Option<u64>, out: &mut Vec<Exchange>) {
        for mut exchange in self.held.drain(..) {
            exchange.read_delay_ns = read_ns
                .filter(|&read| read >= exchange.ts_ns)
                .map(|read| read - exchange.ts_ns);
            out.push(exchange);
        }
    }
}

/// A segment's bytes once its last record is in: borrowed when it came in
/// one record, else put together in `buffer` (taken from it). `None` while
/// records of it are still due.
fn assemble<'a>(buffer: &mut Vec<u8>, segment: &Segment<'a>) -> Option<Cow<'a, [u8]>> {
    let last = segment.flags & SEGMENT_LAST != 0;
    if segment.offset == 0 && last {
        return Some(Cow::Borrowed(segment.data));
    }
    if segment.offset == 0 {
        buffer.clear();
    }
    buffer.extend_from_slice(segment.data);
    last.then(|| Cow::Owned(std::mem::take(buffer)))
}

/// The parsers of one socket: RESP, or TLS turns when its first bytes are
/// a TLS record (see `tls.rs`).
struct Parsers {
    resp: Matcher,
    tls: Option<Box<Turns>>,
    /// A TLS connection's plaintext, from the client's TLS library.
    plaintext: Option<Box<Matcher>>,
    plain_assembling: [Vec<u8>; 2],
    /// The first bytes were seen (and said RESP, unless `tls`).
    decided: bool,
    from_start: bool,
}

/// What the parsers of one socket reported.
#[derive(Default)]
struct Fed {
    resp: Vec<resp::Event>,
    turns: Vec<TurnEvent>,
}

impl Parsers {
    fn new(from_start: bool) -> Self {
        Self {
            resp: if from_start {
                Matcher::new(resp::Config::default())
            } else {
                Matcher::mid_stream(resp::Config::default())
            },
            tls: None,
            plaintext: None,
            plain_assembling: [Vec::new(), Vec::new()],
            decided: false,
            from_start,
        }
    }

    fn feed(&mut self, stream: usize, chunk: Chunk<'_>, fed: &mut Fed) {
        if !self.decided && !chunk.data.is_empty() {
            self.decided = true;
            if tls::starts_tls(chunk.data, self.from_start, stream == 0) {
                self.tls = Some(Box::new(if self.from_start {
                    Turns::new()
                } else {
                    Turns::mid_stream()
                }));
            }
        }
        match (&mut self.tls, stream) {
            (Some(turns), 0) => turns.on_request(chunk, &mut fed.turns),
            (Some(turns), _) => turns.on_reply(chunk),
            (None, 0) => self.resp.on_request(chunk, &mut fed.resp),
            (None, _) => self.resp.on_reply(chunk, &mut fed.resp),
        }
    }

    fn close(&mut self, ts_ns: u64, fed: &mut Fed) {
        if let Some(plaintext) = &mut self.plaintext {
            plaintext.close(ts_ns, &mut fed.resp);
        }
        match &mut self.tls {
            Some(turns) => turns.close(ts_ns, &mut fed.turns),
            None => self.resp.close(ts_ns, &mut fed.resp),
        }
    }

    fn expire(&mut self, now_ns: u64, timeout: Duration, fed: &mut Fed) {
        if let Some(plaintext) = &mut self.plaintext {
            plaintext.expire(now_ns, timeout, &mut fed.resp);
        }
        match &mut self.tls {
            Some(turns) => turns.tick(now_ns, timeout.as_nanos() as u64, &mut fed.turns),
            None => self.resp.expire(now_ns, timeout, &mut fed.resp),
        }
    }
}

/// Gives a piece of stream 0 (requests) or 1 (replies) to the parsers.
fn feed(parsers: &mut Parsers, stream: usize, piece: Piece<'_>, fed: &mut Fed) {
    let chunk = match piece {
        Piece::Data { ts_ns, data, len } => Chunk::truncated(ts_ns, data, u64::from(len)),
        Piece::Gap { ts_ns, len } => Chunk::truncated(ts_ns, &[], u64::from(len)),
    };
    parsers.feed(stream, chunk, fed);
}

/// A piece of a stream in order: bytes (a captured prefix of `len`), or a
/// hole given up on.
enum Piece<'a> {
    Data {
        ts_ns: u64,
        data: &'a [u8],
        len: u32,
    },
    Gap {
        ts_ns: u64,
        len: u32,
    },
}

/// One direction of a connection put back in TCP sequence order: ingress
/// segments arrive as the network delivers them (duplicated, reordered
/// around a loss), and a record the ring buffer refused leaves a hole.
#[derive(Default)]
struct Reorder {
    /// Sequence number of the next byte to deliver; `None` before the first.
    next: Option<u32>,
    /// Segments ahead of `next`, by their distance from it.
    ahead: std::collections::BTreeMap<u32, KeptSegment>,
    ahead_bytes: usize,
}

/// A copy of a segment kept for later: ahead of a hole, or handed over
/// by a listener.
struct KeptSegment {
    ts_ns: u64,
    seq: u32,
    data: Vec<u8>,
    len: u32,
}

impl Reorder {
    /// Takes a segment; delivers whatever is now in order. Returns the holes
    /// given up on (out-of-order bytes over the limit).
    fn push(
        &mut self,
        seq: u32,
        ts_ns: u64,
        data: &[u8],
        len: u32,
        deliver: &mut dyn FnMut(Piece<'_>),
    ) -> u64 {
        let next = *self.next.get_or_insert(seq);
        let ahead = seq.wrapping_sub(next) as i32;
        if ahead > 0 {
            let distance = ahead as u32;
            if !self.ahead.contains_key(&distance) {
                self.ahead_bytes += data.len();
                self.ahead.insert(
                    distance,
                    KeptSegment {
                        ts_ns,
                        seq,
                        data: data.to_vec(),
                        len,
                    },
                );
            }
            if self.ahead_bytes > MAX_OUT_OF_ORDER_BYTES
                || self.ahead.len() > MAX_OUT_OF_ORDER_SEGMENTS
            {
                return self.give_up(deliver);
            }
            return 0;
        }
        self.deliver_from(seq, ts_ns, data, len, deliver);
        self.drain(deliver);
        0
    }

    /// Delivers the part of a segment at or after `next`.
    fn deliver_from(
        &mut self,
        seq: u32,
        ts_ns: u64,
        data: &[u8],
        len: u32,
        deliver: &mut dyn FnMut(Piece<'_>),
    ) {
        let next = self.next.unwrap_or(seq);
        let seen = next.wrapping_sub(seq);
        if (seen as i32) < 0 || seen >= len {
            return; // entirely before `next`: a duplicate
        }
        let data = data.get(seen as usize..).unwrap_or_default();
        deliver(Piece::Data {
            ts_ns,
            data,
            len: len - seen,
        });
        self.next = Some(seq.wrapping_add(len));
    }

    /// Delivers the segments that `next` has reached.
    fn drain(&mut self, deliver: &mut dyn FnMut(Piece<'_>)) {
        while let Some(entry) = self.ahead.first_entry() {
            let next = self.next.unwrap_or(entry.get().seq);
            if (entry.get().seq.wrapping_sub(next) as i32) > 0 {
                break;
            }
            let segment = entry.remove();
            self.ahead_bytes -= segment.data.len();
            self.deliver_from(
                segment.seq,
                segment.ts_ns,
                &segment.data,
                segment.len,
                deliver,
            );
        }
        // Distances were measured from an older `next`: rebase them.
        if let Some(next) = self.next
            && !self.ahead.is_empty()
        {
            let pending = std::mem::take(&mut self.ahead);
            self.ahead = pending
                .into_values()
                .map(|segment| (segment.seq.wrapping_sub(next), segment))
                .collect();
        }
    }

    /// Skips the first hole: reports it as a gap and delivers what follows.
    /// Returns 1 if there was a hole.
    fn give_up(&mut self, deliver: &mut dyn FnMut(Piece<'_>)) -> u64 {
        let Some(first) = self.ahead.values().next() else {
            return 0;
        };
        let (seq, ts_ns) = (first.seq, first.ts_ns);
        tracing::debug!(
            next = ?self.next,
            first_ahead = seq,
            waiting = self.ahead.len(),
            "giving up a hole in a stream"
        );
        if let Some(next) = self.next {
            deliver(Piece::Gap {
                ts_ns,
                len: seq.wrapping_sub(next),
            });
        }
        self.next = Some(seq);
        self.drain(deliver);
        1
    }

    fn hole_older_than(&self, now_ns: u64, limit_ns: u64) -> bool {
        self.ahead
            .values()
            .map(|segment| segment.ts_ns)
            .min()
            .is_some_and(|oldest| now_ns.saturating_sub(oldest) > limit_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One whole-segment record of a client socket.
    fn client_segment(ts_ns: u64, seq: u32, requests: bool, flags: u8, data: &[u8]) -> Segment<'_> {
        Segment {
            ts_ns,
            cookie: 7,
            cgroup_id: 1,
            role: ConnectionRole::Client,
            client: "10.0.0.2:40000".parse().unwrap(),
            server: "10.0.0.1:6379".parse().unwrap(),
            requests,
            flags: flags | SEGMENT_LAST,
            len: data.len() as u32,
            seq,
            offset: 0,
            drops: 0,
            data,
        }
    }

    fn tls_record(kind: u8, body: usize) -> Vec<u8> {
        let mut bytes = vec![kind, 3, 3];
        bytes.extend_from_slice(&(body as u16).to_be_bytes());
        bytes.resize(5 + body, 0x5a);
        bytes
    }

    #[test]
    fn a_tls_connection_is_turns_until_its_plaintext_names_the_commands() {
        let mut tracker = Tracker::default();
        let mut out = Vec::new();
        let mut hello = tls_record(22, 100);
        hello[5] = 1;
        tracker.segment(
            &client_segment(1, 0, true, SEGMENT_FROM_START, &hello),
            &mut out,
        );
        tracker.segment(
            &client_segment(2, 0, false, 0, &tls_record(22, 600)),
            &mut out,
        );
        // A TLS 1.2 request and its answer, on the wire only: one turn.
        let (request, answer) = (tls_record(23, 40), tls_record(23, 30));
        tracker.segment(&client_segment(10, 105, true, 0, &request), &mut out);
        tracker.segment(&client_segment(15, 605, false, 0, &answer), &mut out);
        // The plaintext of the next request arrives (its ciphertext first).
        tracker.segment(&client_segment(20, 150, true, 0, &request), &mut out);
        tracker.segment(
            &client_segment(
                20,
                0,
                true,
                SEGMENT_PLAINTEXT,
                b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            ),
            &mut out,
        );
        tracker.segment(&client_segment(26, 640, false, 0, &answer), &mut out);
        tracker.segment(
            &client_segment(27, 0, false, SEGMENT_PLAINTEXT, b"$-1\r\n"),
            &mut out,
        );
        tracker.socket_gone(7, 30, &mut out);
        let seen: Vec<(String, Outcome, u64, bool)> = out
            .iter()
            .map(|e| (e.command.to_string(), e.outcome, e.latency_ns, e.tls))
            .collect();
        assert_eq!(
            seen,
            [
                ("tls".to_string(), Outcome::Ok, 5, true),
                ("GET".to_string(), Outcome::Nil, 7, true),
            ]
        );
        let stats = tracker.stats();
        assert_eq!((stats.tls_connections, stats.unparsed_bytes), (1, 0));
    }

    fn collect(order: &mut Reorder, seq: u32, bytes: &[u8], out: &mut Vec<String>) {
        order.push(
            seq,
            0,
            bytes,
            bytes.len() as u32,
            &mut |piece| match piece {
                Piece::Data { data, .. } => out.push(String::from_utf8_lossy(data).into()),
                Piece::Gap { len, .. } => out.push(format!("<gap {len}>")),
            },
        );
    }

    #[test]
    fn reordered_and_duplicated_segments_come_out_in_order_once() {
        let mut order = Reorder::default();
        let mut out = Vec::new();
        collect(&mut order, 100, b"aaaa", &mut out);
        collect(&mut order, 108, b"cccc", &mut out); // ahead of a loss
        collect(&mut order, 112, b"dddd", &mut out);
        collect(&mut order, 100, b"aaaa", &mut out); // duplicate
        collect(&mut order, 104, b"bbbb", &mut out); // the retransmission
        collect(&mut order, 110, b"ccdd", &mut out); // overlapping duplicate
        collect(&mut order, 116, b"eeee", &mut out);
        assert_eq!(out.concat(), "aaaabbbbccccddddeeee");
    }

    #[test]
    fn a_hole_given_up_on_is_a_gap_of_its_size() {
        let mut order = Reorder::default();
        let mut out = Vec::new();
        collect(&mut order, u32::MAX - 1, b"ab", &mut out); // across the wrap
        collect(&mut order, 5, b"zz", &mut out);
        let gaps = order.give_up(&mut |piece| match piece {
            Piece::Data { data, .. } => out.push(String::from_utf8_lossy(data).into()),
            Piece::Gap { len, .. } => out.push(format!("<gap {len}>")),
        });
        assert_eq!(gaps, 1);
        assert_eq!(out, vec!["ab", "<gap 5>", "zz"]);
    }
}

#[cfg(test)]
mod reorder_properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any mix of reordering, duplication and overlapping
        /// retransmission of a stream's segments comes out as the stream.
        #[test]
        fn delivers_the_stream_once_in_order(
            start in any::<u32>(),
            cuts in proptest::collection::vec(1usize..40, 1..30),
            shuffle in proptest::collection::vec((any::<usize>(), any::<usize>()), 0..40),
            dups in proptest::collection::vec((any::<usize>(), 0usize..10, 0usize..50), 0..10),
        ) {
            let total: usize = cuts.iter().sum();
            let stream: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            let mut segments = Vec::new();
            let mut at = 0;
            for cut in &cuts {
                segments.push((at, *cut));
                at += cut;
            }
            // Retransmissions that re-cut the stream (overlaps).
            for (i, back, extra) in &dups {
                let (s, l) = segments[i % segments.len()];
                let from = s.saturating_sub(*back);
                let to = (s + l + extra).min(total);
                segments.push((from, to - from));
            }
            for (a, b) in &shuffle {
                let n = segments.len();
                segments.swap(a % n, b % n);
            }
            // The first segment must be the stream's start (as for a
            // connection seen from its first byte).
            let first = segments.iter().position(|&(s, _)| s == 0).unwrap();
            segments.swap(0, first);
            let mut order = Reorder::default();
            let mut out = Vec::new();
            for (s, l) in segments {
                let seq = start.wrapping_add(s as u32);
                order.push(seq, 0, &stream[s..s + l], l as u32, &mut |piece| match piece {
                    Piece::Data { data, len, .. } => {
                        assert_eq!(data.len(), len as usize);
                        out.extend_from_slice(data);
                    }
                    Piece::Gap { .. } => panic!("no hole may be given up"),
                });
            }
            prop_assert_eq!(out, stream);
        }
    }
}
