//! RESP: turn one connection's captured byte streams into matched requests.
//!
//! The kernel side captures, per TCP connection to a watched port, what each
//! side sent, in order, as [`Chunk`]s (one per syscall; possibly only a prefix
//! of its data). A [`Matcher`] takes the requests' chunks and the replies'
//! chunks of one connection, as seen from one socket, and reports every
//! request as an [`Event`]: matched to its reply, answered by nothing by
//! protocol, or unanswered (closed, timed out, reply lost in a gap).
//!
//! Values never leave this module: a request is reported by a [`Command`]
//! taken from a fixed table, a reply by its [`ReplyKind`]. See
//! `docs/design.md`, "RESP parsing and matching", for states, the resync rule
//! and bounds.

mod commands;
mod matcher;
mod parser;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod testing;

use std::fmt;

#[allow(unused_imports, reason = "used by tests")]
pub use matcher::Matcher;

/// What one syscall moved in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// When the bytes moved, on the clock all chunks of a connection share:
    /// for a read, when it returned data (not when it started blocking).
    pub ts_ns: u64,
    /// The bytes captured: the first `data.len()` of `len`.
    pub data: &'a [u8],
    /// Bytes the syscall moved in total; values below `data.len()` count as
    /// `data.len()`.
    pub len: u64,
}

impl<'a> Chunk<'a> {
    /// A chunk captured whole.
    #[cfg(test)]
    pub fn new(ts_ns: u64, data: &'a [u8]) -> Self {
        Self {
            ts_ns,
            data,
            len: data.len() as u64,
        }
    }

    /// A chunk of which only `data`, a prefix of `len` bytes, was captured.
    pub fn truncated(ts_ns: u64, data: &'a [u8], len: u64) -> Self {
        Self { ts_ns, data, len }
    }

    /// Bytes moved but not captured.
    fn gap(&self) -> u64 {
        self.len.saturating_sub(self.data.len() as u64)
    }
}

/// The command named by the first two arguments (tests build commands
/// with it).
#[cfg(test)]
pub fn command_of(name: &[u8], sub: &[u8], kept: usize) -> Option<Command> {
    commands::lookup_kept(name, sub, kept)
}

/// A command name from the table in `commands.rs`: `GET`, or a container
/// command with its subcommand, `CLIENT SETNAME`. Anything not in the table
/// is [`Command::UNKNOWN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Command {
    name: &'static str,
    sub: Option<&'static str>,
}

impl Command {
    pub const UNKNOWN: Self = Self {
        name: "UNKNOWN",
        sub: None,
    };

    /// Not a command: a turn of a TLS connection (op `tls`, `tls.rs`).
    pub const TLS: Self = Self {
        name: "tls",
        sub: None,
    };

    /// The command (for a container command, the container: `CLIENT`).
    #[cfg(test)]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The subcommand of a container command (`SETNAME`).
    #[cfg(test)]
    pub fn subcommand(&self) -> Option<&'static str> {
        self.sub
    }

    /// A cheap identity: names come from static tables, so equal commands
    /// have equal name pointers.
    pub fn id(&self) -> (usize, usize) {
        (
            self.name.as_ptr() as usize,
            self.sub.map_or(0, |sub| sub.as_ptr() as usize),
        )
    }

    /// Commands that wait for data by design (`BLPOP`, `XREAD … BLOCK`,
    /// `WAIT`): slow is normal for them, so the slow and timeout detectors
    /// leave them out.
    pub fn may_block(&self) -> bool {
        matches!(
            self.name,
            "BLPOP"
                | "BRPOP"
                | "BRPOPLPUSH"
                | "BLMOVE"
                | "BLMPOP"
                | "BZPOPMIN"
                | "BZPOPMAX"
                | "BZMPOP"
                | "XREAD"
                | "XREADGROUP"
                | "WAIT"
                | "WAITAOF"
                | "SUBSCRIBE"
                | "PSUBSCRIBE"
                | "SSUBSCRIBE"
                | "MONITOR"
        )
    }

    fn is(&self, name: &str, sub: Option<&str>) -> bool {
        self.name == name && self.sub == sub
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sub {
            Some(sub) => write!(f, "{} {sub}", self.name),
            None => f.write_str(self.name),
        }
    }
}

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyKind {
    /// Any non-error, non-null reply.
    Ok,
    /// RESP2 `$-1` / `*-1`, RESP3 `_`.
    Nil,
    /// `-` or RESP3 `!`, with the error's prefix.
    Error(ErrorPrefix),
}

/// An error reply's first word when it is all caps (`WRONGTYPE`, `MOVED`,
/// `NOAUTH`), else `ERR`. At most [`ErrorPrefix::MAX_LEN`] bytes of
/// `A-Z 0-9 _ -`, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorPrefix {
    buf: [u8; Self::MAX_LEN],
    len: u8,
}

impl ErrorPrefix {
    pub const MAX_LEN: usize = 16;
    pub const ERR: Self = Self::new(b"ERR");

    const fn new(word: &[u8]) -> Self {
        let mut buf = [0; Self::MAX_LEN];
        let mut i = 0;
        while i < word.len() {
            buf[i] = word[i];
            i += 1;
        }
        Self {
            buf,
            len: word.len() as u8,
        }
    }

    /// The prefix of an error message (its first bytes suffice).
    pub(crate) fn of(message: &[u8]) -> Self {
        let word = message.split(|&b| b == b' ').next().unwrap_or_default();
        let all_caps = word.first().is_some_and(u8::is_ascii_uppercase)
            && word
                .iter()
                .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        // A word that fills the capture may be cut; it is too long anyway.
        if all_caps && word.len() <= Self::MAX_LEN {
            Self::new(word)
        } else {
            Self::ERR
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("ERR")
    }
}

impl fmt::Debug for ErrorPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorPrefix({})", self.as_str())
    }
}

impl fmt::Display for ErrorPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a [`Matcher`] reports: each request exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Matched(Matched),
    NoReply(NoReply),
    Unanswered(Unanswered),
}

/// A request and its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub command: Command,
    /// Timestamp of the chunk holding the request's first byte.
    pub sent_ts_ns: u64,
    /// Timestamp of the chunk holding the reply's first byte (for a
    /// subscribe, the first confirmation's).
    pub reply_first_byte_ts_ns: u64,
    /// Timestamp of the chunk that completed the reply (its last byte).
    pub reply_last_byte_ts_ns: u64,
    pub reply_kind: ReplyKind,
    /// Bytes of the request and of its reply, uncaptured bytes included.
    pub request_bytes: u64,
    pub reply_bytes: u64,
    /// Requests in flight when this one was sent, itself included (1: not
    /// pipelined).
    pub depth: u32,
    /// False when the reply was cut short by a gap: the parser lost sync
    /// inside it, so `reply_bytes` is a lower bound and `reply_kind` comes
    /// from its first bytes.
    pub reply_complete: bool,
}

/// A request that by protocol gets no reply (`CLIENT REPLY OFF`, the command
/// after `CLIENT REPLY SKIP`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoReply {
    pub command: Command,
    pub sent_ts_ns: u64,
    pub request_bytes: u64,
}

/// A request reported without a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub command: Command,
    pub sent_ts_ns: u64,
    /// From `sent_ts_ns` to when it was given up on.
    pub age_ns: u64,
    pub reason: UnansweredReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnansweredReason {
    /// Still outstanding when the connection closed.
    Closed,
    /// Older than the age given to [`Matcher::expire`]. Its reply, if it
    /// comes, is absorbed (`Stats::late_replies`), not given to the next
    /// request.
    Timeout,
    /// The reply stream lost sync while this request was outstanding: its
    /// reply cannot be told apart.
    ReplyLost,
    /// More than [`Config::max_outstanding`] requests were outstanding; the
    /// oldest was given up (its reply is still absorbed in order).
    Overflow,
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Requests kept waiting for a reply; default 4096 (a `-P 16` benchmark
    /// client keeps 16; mass-insertion pipelines more). Each costs ~100 bytes.
    pub max_outstanding: usize,
}

impl Config {
    /// A connection's matcher never holds more FIFO entries than this: the
    /// requests, and at worst a gap and an owed-replies marker next to each
    /// (past it, everything waiting is reported as overflow).
    pub const fn max_slots(&self) -> usize {
        2 * self.max_outstanding + 2
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_outstanding: 4096,
        }
    }
}

/// Counters of what could not be matched; monotonic per connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes skipped while a stream was out of sync.
    pub unparsed_request_bytes: u64,
    pub unparsed_reply_bytes: u64,
    /// Times a stream lost sync.
    pub request_desyncs: u64,
    pub reply_desyncs: u64,
    /// Replies with no request outstanding (or that came before it was sent).
    pub unmatched_replies: u64,
    /// Replies dropped because the request they answer was in an unparsed
    /// stretch of the request stream: about the requests skipped.
    pub gap_replies: u64,
    /// Replies to requests already reported as `Timeout` or `Overflow`.
    pub late_replies: u64,
    /// Server pushes: pub/sub messages, `MONITOR` lines, RESP3 `>` frames.
    pub pushes: u64,
}
