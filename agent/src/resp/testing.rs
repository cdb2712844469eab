//! Test helpers: requests written the way clients write them, and a
//! connection driven one chunk at a time.

use super::{Chunk, Config, Event, Matched, Matcher, ReplyKind, Stats};

/// A request as every RESP client writes it: an array of bulk strings.
pub(super) fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One socket's view of a connection; each chunk is 1 µs after the last.
pub(super) struct Conn {
    pub matcher: Matcher,
    pub ts_ns: u64,
    pub events: Vec<Event>,
}

impl Conn {
    pub fn new() -> Self {
        Self::with(Matcher::new(Config::default()))
    }

    pub fn with(matcher: Matcher) -> Self {
        Self {
            matcher,
            ts_ns: 0,
            events: Vec::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.ts_ns += 1_000;
        self.ts_ns
    }

    pub fn send(&mut self, bytes: &[u8]) -> &mut Self {
        let ts = self.tick();
        self.matcher
            .on_request(Chunk::new(ts, bytes), &mut self.events);
        self
    }

    /// A write of `len` bytes of which only `bytes` were captured.
    pub fn send_truncated(&mut self, bytes: &[u8], len: usize) -> &mut Self {
        let ts = self.tick();
        let chunk = Chunk::truncated(ts, bytes, len as u64);
        self.matcher.on_request(chunk, &mut self.events);
        self
    }

    pub fn recv(&mut self, bytes: &[u8]) -> &mut Self {
        let ts = self.tick();
        self.matcher
            .on_reply(Chunk::new(ts, bytes), &mut self.events);
        self
    }

    pub fn recv_truncated(&mut self, bytes: &[u8], len: usize) -> &mut Self {
        let ts = self.tick();
        let chunk = Chunk::truncated(ts, bytes, len as u64);
        self.matcher.on_reply(chunk, &mut self.events);
        self
    }

    pub fn take(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Drains the events, which must all be matches.
    pub fn matches(&mut self) -> Vec<Matched> {
        self.take()
            .into_iter()
            .map(|event| match event {
                Event::Matched(matched) => matched,
                other => panic!("expected only matches, got {other:?}"),
            })
            .collect()
    }

    /// Drains the events as `(command, kind)` of matches.
    pub fn matched(&mut self) -> Vec<(String, ReplyKind)> {
        self.matches()
            .into_iter()
            .map(|m| (m.command.to_string(), m.reply_kind))
            .collect()
    }

    pub fn stats(&self) -> Stats {
        self.matcher.stats()
    }
}

/// `(command, Ok)` pairs, for brevity.
pub(super) fn ok(commands: &[&str]) -> Vec<(String, ReplyKind)> {
    commands
        .iter()
        .map(|c| (c.to_string(), ReplyKind::Ok))
        .collect()
}
