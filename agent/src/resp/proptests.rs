//! Property tests of parser and matcher together: splits do not matter,
//! garbage costs at most itself, arbitrary input is harmless.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::testing::cmd;
use super::{Chunk, Config, Event, Matched, Matcher, ReplyKind};

/// A request, its reply and the command name expected, in the shapes
/// clients and Redis write them.
type Exchange = (Vec<u8>, Vec<u8>, &'static str);

fn bulk(value: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", value.len()).into_bytes();
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    out
}

fn exchange(inline: bool) -> impl Strategy<Value = Exchange> {
    let value = || vec(any::<u8>(), 0..48);
    let multibulk = prop_oneof![
        value().prop_map(|v| (cmd(&[b"SET", b"k", &v]), b"+OK\r\n".to_vec(), "SET")),
        value().prop_map(|v| (cmd(&[b"GET", b"k"]), bulk(&v), "GET")),
        Just((cmd(&[b"GET", b"none"]), b"$-1\r\n".to_vec(), "GET")),
        Just((cmd(&[b"INCR", b"n"]), b":12\r\n".to_vec(), "INCR")),
        vec(value(), 0..4).prop_map(|values| {
            let mut reply = format!("*{}\r\n", values.len()).into_bytes();
            for v in &values {
                reply.extend(bulk(v));
            }
            (cmd(&[b"LRANGE", b"l", b"0", b"-1"]), reply, "LRANGE")
        }),
        Just((
            cmd(&[b"HGETALL", b"h"]),
            b"|1\r\n+ttl\r\n:3\r\n%1\r\n$1\r\nf\r\n,1.5\r\n".to_vec(),
            "HGETALL"
        )),
        Just((
            cmd(&[b"CLIENT", b"SETNAME", b"app"]),
            b"-NOPERM not allowed\r\n".to_vec(),
            "CLIENT SETNAME"
        )),
        Just((
            cmd(&[b"SUBSCRIBE", b"a", b"b"]),
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n\
              *3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n\
              *3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n"
                .to_vec(),
            "SUBSCRIBE"
        )),
    ];
    if inline {
        prop_oneof![
            4 => multibulk,
            1 => Just((b"PING\r\n".to_vec(), b"+PONG\r\n".to_vec(), "PING")),
        ]
        .boxed()
    } else {
        multibulk.boxed()
    }
}

/// `SUBSCRIBE a b` above is answered by its confirmations, a message, and an
/// `UNSUBSCRIBE`'s confirmations; model the latter as part of the exchange
/// by sending the UNSUBSCRIBE with it.
fn request_bytes(exchange: &Exchange) -> Vec<u8> {
    let mut request = exchange.0.clone();
    if exchange.2 == "SUBSCRIBE" {
        request.extend(cmd(&[b"UNSUBSCRIBE"]));
    }
    request
}

fn expected(exchanges: &[Exchange]) -> Vec<String> {
    exchanges
        .iter()
        .flat_map(|e| {
            let extra = (e.2 == "SUBSCRIBE").then_some("UNSUBSCRIBE");
            std::iter::once(e.2).chain(extra)
        })
        .map(str::to_string)
        .collect()
}

/// Splits `bytes` at the given points (taken modulo its length).
fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.extend([0, bytes.len()]);
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| bytes[w[0]..w[1]].to_vec())
        .collect()
}

#[derive(Debug, PartialEq)]
struct Summary {
    command: String,
    kind: ReplyKind,
    request_bytes: u64,
    reply_bytes: u64,
    depth: u32,
}

/// A pipeline batch: the requests' chunks, then the replies' chunks.
type Batch = (Vec<Vec<u8>>, Vec<Vec<u8>>);

/// Feeds batches to a fresh matcher, one timestamp per chunk.
fn feed(batches: &[Batch]) -> (Vec<Event>, Matcher) {
    let mut matcher = Matcher::new(Config::default());
    let mut events = Vec::new();
    let mut ts = 0;
    for (requests, replies) in batches {
        for chunk in requests {
            ts += 1;
            matcher.on_request(Chunk::new(ts, chunk), &mut events);
        }
        for chunk in replies {
            ts += 1;
            matcher.on_reply(Chunk::new(ts, chunk), &mut events);
        }
    }
    (events, matcher)
}

fn summary(m: &Matched) -> Summary {
    Summary {
        command: m.command.to_string(),
        kind: m.reply_kind,
        request_bytes: m.request_bytes,
        reply_bytes: m.reply_bytes,
        depth: m.depth,
    }
}

/// Feeds batches and returns what matched; anything else fails the test.
fn run(batches: &[Batch]) -> Result<(Vec<Summary>, Matcher), TestCaseError> {
    let (events, matcher) = feed(batches);
    let mut summaries = Vec::new();
    for event in events {
        let Event::Matched(m) = event else {
            return Err(TestCaseError::fail(format!("not a match: {event:?}")));
        };
        summaries.push(summary(&m));
    }
    Ok((summaries, matcher))
}

/// Feeds batches and returns what matched, ignoring other reports.
fn run_lenient(batches: &[Batch]) -> (Vec<Summary>, Matcher) {
    let (events, matcher) = feed(batches);
    let summaries = events
        .iter()
        .filter_map(|event| match event {
            Event::Matched(m) => Some(summary(m)),
            _ => None,
        })
        .collect();
    (summaries, matcher)
}

/// Tokens that steer arbitrary input into the parser's deeper states.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        3 => any::<u8>().prop_map(|b| vec![b]),
        1 => prop::sample::select(vec![
            &b"*"[..], b"$", b"+", b"-", b":", b"%", b"~", b">", b"|", b"_", b"!", b"=",
            b"\r\n", b"\r", b"\n", b"1", b"2", b"3", b"-1", b"0", b"99999999999",
            b"GET", b"PING ", b"subscribe", b"message", b"*3\r\n$9\r\nsubscribe\r\n",
            b"*1\r\n$4\r\nPING\r\n", b"$5\r\nhello\r\n",
        ])
        .prop_map(<[u8]>::to_vec),
    ];
    vec(token, 0..24).prop_map(|tokens| tokens.concat())
}

proptest! {
    // Failing seeds are kept next to this file (proptests.regressions) and
    // replayed first.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    /// Any split of a valid stream into chunks gives the same matches as
    /// the unsplit stream, and one byte at a time too.
    #[test]
    fn any_split_matches_like_the_whole_stream(
        exchanges in vec(exchange(true), 1..16),
        batch in 1usize..6,
        request_cuts in vec(any::<usize>(), 0..12),
        reply_cuts in vec(any::<usize>(), 0..12),
    ) {
        let batches: Vec<(Vec<u8>, Vec<u8>)> = exchanges
            .chunks(batch)
            .map(|b| (b.iter().flat_map(request_bytes).collect(), b.iter().flat_map(|e| e.1.clone()).collect()))
            .collect();
        let whole: Vec<_> = batches.iter().map(|(q, r)| (vec![q.clone()], vec![r.clone()])).collect();
        let cut: Vec<_> = batches
            .iter()
            .map(|(q, r)| (split(q, &request_cuts), split(r, &reply_cuts)))
            .collect();
        let bytes: Vec<_> = batches
            .iter()
            .map(|(q, r)| (q.chunks(1).map(<[u8]>::to_vec).collect(), r.chunks(1).map(<[u8]>::to_vec).collect()))
            .collect();
        let (reference, matcher) = run(&whole)?;
        let names: Vec<_> = reference.iter().map(|s| s.command.clone()).collect();
        prop_assert_eq!(names, expected(&exchanges));
        prop_assert_eq!(matcher.outstanding(), 0);
        prop_assert_eq!(matcher.stats().unmatched_replies + matcher.stats().unparsed_reply_bytes, 0);
        prop_assert_eq!(&run(&cut)?.0, &reference);
        prop_assert_eq!(&run(&bytes)?.0, &reference);
    }

    /// Garbage inserted at a request boundary (here: bytes no client sends
    /// first) is skipped up to the next request, which matches its own reply,
    /// as does every later one.
    #[test]
    fn garbage_at_a_request_boundary_costs_only_itself(
        exchanges in vec(exchange(false), 2..12),
        at in any::<prop::sample::Index>(),
        first in any::<u8>().prop_filter("no request or length starts so", |b| {
            !b.is_ascii_alphanumeric() && !b" \t\r\n*".contains(b)
        }),
        rest in vec(any::<u8>(), 0..80),
        request_cuts in vec(any::<usize>(), 0..6),
    ) {
        let at = at.index(exchanges.len());
        let mut garbage = vec![first];
        garbage.extend(rest);
        let mut requests = Vec::new();
        for (i, exchange) in exchanges.iter().enumerate() {
            if i == at {
                requests.extend(&garbage);
            }
            requests.extend(request_bytes(exchange));
        }
        let replies: Vec<u8> = exchanges.iter().flat_map(|e| e.1.clone()).collect();
        let (matched, matcher) = run(&[(split(&requests, &request_cuts), vec![replies])])?;
        let names: Vec<_> = matched.iter().map(|s| s.command.clone()).collect();
        prop_assert_eq!(names, expected(&exchanges));
        let stats = matcher.stats();
        prop_assert_eq!(stats.unparsed_request_bytes, garbage.len() as u64);
        prop_assert_eq!(stats.request_desyncs, 1);
        prop_assert_eq!(stats.gap_replies + stats.unmatched_replies, 0);
    }

    /// Garbage inserted anywhere in the requests of a client that waits for
    /// each reply (at a boundary, inside a header line, inside a value)
    /// costs at most the request it lands in: every other request matches
    /// its own reply exactly as without the garbage. Garbage here is bytes
    /// that hold no request start (no `*`, and not a command word at the
    /// start of a write) and do not start with a digit: a digit next to a
    /// length's digits makes a longer length, one the client really wrote
    /// as far as anyone reading the stream can tell, and then the request
    /// swallows the start of the next one. (The agent reads lengths as the
    /// kernel captured them from the client's own writes.) Not tested:
    /// garbage in a pub/sub request, whose several replies (one
    /// confirmation per channel) can no longer be counted once its name or
    /// arguments are lost.
    #[test]
    fn garbage_inside_a_request_costs_at_most_that_request(
        exchanges in vec(exchange(false), 2..10),
        at in any::<prop::sample::Index>(),
        offset in any::<prop::sample::Index>(),
        first in any::<u8>().prop_filter("no request or length starts so", |b| {
            !b.is_ascii_alphanumeric() && !b" \t\r\n*".contains(b)
        }),
        rest in vec(any::<u8>().prop_filter("no request start", |&b| b != b'*'), 0..40),
    ) {
        let at = at.index(exchanges.len());
        prop_assume!(exchanges[at].2 != "SUBSCRIBE");
        let mut garbage = vec![first];
        garbage.extend(rest);
        let clean: Vec<Batch> = exchanges
            .iter()
            .map(|e| (vec![request_bytes(e)], vec![e.1.clone()]))
            .collect();
        let mut dirty = clean.clone();
        let hit = &mut dirty[at].0[0];
        let offset = offset.index(hit.len());
        hit.splice(offset..offset, garbage.iter().copied());
        let hit_len = hit.len() as u64;
        let (reference, _) = run(&clean)?;
        let (matched, matcher) = run_lenient(&dirty);
        // The requests of the exchange hit, in the reference order.
        let names = expected(&exchanges);
        let before = expected(&exchanges[..at]).len();
        let hit_requests = expected(&exchanges[at..=at]).len();
        let after = &reference[before + hit_requests..];
        prop_assert_eq!(&matched[..before], &reference[..before]);
        prop_assert!(matched.len() >= names.len() - hit_requests, "{matched:?}");
        prop_assert!(matched.len() <= names.len(), "{matched:?}");
        prop_assert_eq!(&matched[matched.len() - after.len()..], after);
        // At most the rest of the request hit is skipped.
        prop_assert!(matcher.stats().unparsed_request_bytes <= hit_len);
    }

    /// Arbitrary bytes, gaps, expiries and closes, on fresh and mid-stream
    /// connections: no panic, and state stays within its bounds.
    #[test]
    fn arbitrary_input_is_harmless_and_bounded(
        mid_stream in any::<bool>(),
        ops in vec((0u8..8, noise(), 0u64..64), 1..48),
    ) {
        let config = Config { max_outstanding: 8 };
        let mut matcher = if mid_stream { Matcher::mid_stream(config) } else { Matcher::new(config) };
        let mut events = Vec::new();
        let mut ts = 0;
        for (op, data, gap) in ops {
            ts += 1 + gap;
            let len = data.len() as u64 + if op % 2 == 0 { gap } else { 0 };
            let chunk = Chunk::truncated(ts, &data, len);
            match op {
                0..=2 => matcher.on_request(chunk, &mut events),
                3..=5 => matcher.on_reply(chunk, &mut events),
                6 => matcher.expire(ts, std::time::Duration::from_nanos(gap), &mut events),
                _ => matcher.close(ts, &mut events),
            }
            prop_assert!(matcher.outstanding() <= config.max_outstanding);
            prop_assert!(matcher.slots() <= config.max_slots());
        }
        matcher.close(ts, &mut events);
        prop_assert_eq!(matcher.outstanding(), 0);
        // Whatever the input, a reply never precedes its request and no
        // request is reported from the future.
        for event in &events {
            match event {
                Event::Matched(m) => {
                    prop_assert!(m.sent_ts_ns <= m.reply_first_byte_ts_ns);
                    prop_assert!(m.reply_first_byte_ts_ns <= ts);
                }
                Event::Unanswered(u) => prop_assert!(u.sent_ts_ns <= ts),
                Event::NoReply(n) => prop_assert!(n.sent_ts_ns <= ts),
            }
        }
    }
}
