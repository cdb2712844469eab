//! The RESP request/reply matcher (`agent::resp::Matcher`) fed the way the
//! tracker feeds it: one connection's request and reply chunks interleaved,
//! captured whole or truncated, with expiries and a close.
//!
//! Input: a header byte, then operations until the input ends.
//! - header: bit 0 a connection seen mid-stream; bits 1–3 `k`, at most
//!   `2^k` requests outstanding (`k = 0`: the agent's default, 4096); bit 4
//!   timestamps may step back (the tracker hands over a segment that waited
//!   for a hole with its own, older, timestamp).
//! - operation byte `o`: `o & 3` is 0 request bytes, 1 reply bytes, 2 expire,
//!   3 close; bits 3–7 the timestamp step in µs (signed when bit 4 of the
//!   header is set).
//!   - request/reply: a little-endian u16 length, that many bytes (fewer if
//!     the input ends), then, if bit 2 of `o` is set, a u16 of bytes the
//!     syscall moved beyond those captured (a gap in the stream).
//!   - expire: one byte, the timeout in µs.
//!
//! `cargo xtask fuzz --capture` writes real connections in this format.

#![no_main]

use std::time::Duration;

use agent::resp::{Chunk, Config, Event, Matcher};
use libfuzzer_sys::fuzz_target;

struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(first)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte().unwrap_or(0), self.byte().unwrap_or(0)])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }
}

/// Bytes fed per direction, uncaptured ones included.
#[derive(Default)]
struct Fed {
    requests: u64,
    replies: u64,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { bytes: data };
    let Some(header) = input.byte() else {
        return;
    };
    let k = (header >> 1) & 7;
    let config = Config {
        max_outstanding: if k == 0 {
            Config::default().max_outstanding
        } else {
            1 << k
        },
    };
    let jitter = header & 1 << 4 != 0;
    let mut matcher = if header & 1 != 0 {
        Matcher::mid_stream(config)
    } else {
        Matcher::new(config)
    };
    let mut events = Vec::new();
    let mut fed = Fed::default();
    // Start away from 0 so that steps back stay representable.
    let mut ts: u64 = 1 << 40;
    let mut latest = ts;
    while let Some(op) = input.byte() {
        let step = i64::from(op >> 3);
        let step = if jitter { step - 16 } else { step };
        ts = ts.saturating_add_signed(step * 1_000);
        latest = latest.max(ts);
        match op & 3 {
            kind @ (0 | 1) => {
                let len = usize::from(input.u16());
                let bytes = input.take(len);
                let gap = if op & 1 << 2 != 0 { input.u16() } else { 0 };
                let total = bytes.len() as u64 + u64::from(gap);
                let chunk = Chunk::truncated(ts, bytes, total);
                if kind == 0 {
                    fed.requests += total;
                    matcher.on_request(chunk, &mut events);
                } else {
                    fed.replies += total;
                    matcher.on_reply(chunk, &mut events);
                }
            }
            2 => {
                let timeout = Duration::from_micros(u64::from(input.byte().unwrap_or(0)));
                matcher.expire(ts, timeout, &mut events);
            }
            _ => matcher.close(ts, &mut events),
        }
        // Bounded state whatever the input: the parsers' buffers are fixed,
        // the FIFO holds at most `max_outstanding` requests and
        // `max_slots` entries, markers (gaps, replies owed) included.
        assert!(matcher.outstanding() <= config.max_outstanding);
        assert!(matcher.slots() <= config.max_slots());
    }
    matcher.close(ts, &mut events);
    assert_eq!(matcher.outstanding(), 0);
    assert_eq!(matcher.slots(), 0);
    check(&events, &fed, &matcher, latest, !jitter);
});

/// What must hold of the reports, whatever was fed. `latest` is the newest
/// timestamp given; `monotonic`: timestamps never stepped back.
fn check(events: &[Event], fed: &Fed, matcher: &Matcher, latest: u64, monotonic: bool) {
    let mut request_bytes = 0u64;
    let mut reply_bytes = 0u64;
    for event in events {
        match event {
            Event::Matched(m) => {
                assert!(m.depth >= 1, "{m:?}");
                assert!(m.request_bytes >= 1 && m.reply_bytes >= 1, "{m:?}");
                assert!(m.reply_first_byte_ts_ns <= m.reply_last_byte_ts_ns, "{m:?}");
                if monotonic {
                    // Causality: a reply never precedes its request.
                    assert!(m.sent_ts_ns <= m.reply_first_byte_ts_ns, "{m:?}");
                }
                assert!(m.reply_last_byte_ts_ns <= latest, "{m:?}");
                request_bytes += m.request_bytes;
                reply_bytes += m.reply_bytes;
            }
            Event::NoReply(n) => {
                assert!(n.request_bytes >= 1, "{n:?}");
                request_bytes += n.request_bytes;
            }
            Event::Unanswered(u) => assert!(u.sent_ts_ns <= latest, "{u:?}"),
        }
    }
    // Each request is reported once and each reply byte counted once: the
    // reports cannot add up to more than what was fed. Every request has at
    // least one byte.
    assert!(
        request_bytes <= fed.requests,
        "{request_bytes} > {}",
        fed.requests
    );
    assert!(
        reply_bytes <= fed.replies,
        "{reply_bytes} > {}",
        fed.replies
    );
    assert!(events.len() as u64 <= fed.requests);
    let stats = matcher.stats();
    assert!(stats.unparsed_request_bytes <= fed.requests);
    assert!(stats.unparsed_reply_bytes <= fed.replies);
}
