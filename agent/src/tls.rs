//! TLS connections seen from the wire: turns, not commands.
//!
//! A watched connection whose first bytes are a TLS record (the client's
//! ClientHello) carries ciphertext, which is never given to the RESP parser.
//! Its record headers (RFC 8446 §5.1: type, version, length — in clear in
//! every TLS version) still tell the handshake from application data, and so
//! a *turn* — the client sends application data, the server answers — is
//! timed like a request: from its first byte to the last byte of the answer
//! before the client's next turn. That is a pipelined batch's time, a
//! command's time when the client waits for each reply.
//!
//! What is not application data, whatever it looks like:
//! - TLS 1.3 sends its encrypted handshake as application-data records. The
//!   server's (before the client's first one) tell the version; the
//!   client's first is then its Finished, not a request.
//! - TLS 1.3 hides alerts the same way: a record of 19 bytes is a 2-byte
//!   alert (close_notify) with the inner type byte and a 16-byte AEAD tag;
//!   no RESP message is that short.
//! - Server records while no turn is open (a TLS 1.3 session ticket, a
//!   RESP3 push) answer nothing.
//!
//! A hole in a stream, or a segment captured only in part, hides record
//! headers: the framing then waits for a piece that starts with a plausible
//! header, and meanwhile counts every byte as application data.

use crate::resp::Chunk;

const CHANGE_CIPHER_SPEC: u8 = 20;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const CLIENT_HELLO: u8 = 1;
const HEADER_BYTES: usize = 5;
/// TLSCiphertext.length is at most 2^14 + 256 (1.3) or + 2048 (1.2).
const MAX_RECORD: u16 = (1 << 14) + 2048;
/// A TLS 1.3 alert: 2 bytes, its inner content type and a 16-byte tag.
const TLS13_ALERT_RECORD: u16 = 19;
/// An answered turn is reported once its answer has been quiet this long
/// (or at once, when the client's next turn starts).
const SETTLE_NS: u64 = 100_000_000;

/// Whether a stream's first bytes are a TLS record header; from the start
/// of a connection, a ClientHello (requests) or a handshake record
/// (replies).
pub fn starts_tls(data: &[u8], from_start: bool, requests: bool) -> bool {
    if !is_header(data) {
        return false;
    }
    if !from_start {
        return true;
    }
    data[0] == HANDSHAKE && (!requests || data.get(HEADER_BYTES) == Some(&CLIENT_HELLO))
}

/// Content type 20–23, version 3.x, a length TLS allows.
fn is_header(data: &[u8]) -> bool {
    data.len() >= HEADER_BYTES
        && (CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&data[0])
        && data[1] == 3
        && data[2] <= 4
        && u16::from_be_bytes([data[3], data[4]]) <= MAX_RECORD
}

/// One direction's record framing.
#[derive(Debug, Default)]
struct Records {
    /// Header bytes collected so far (a header split across pieces).
    header: [u8; HEADER_BYTES],
    header_len: usize,
    /// Body bytes of the current record still to come.
    body_left: u64,
    /// The current record is application data.
    in_app_record: bool,
    /// Record boundaries lost (a hole, a part not captured).
    lost: bool,
}

/// What a piece of one direction held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Walked {
    /// Bytes of application-data records (or of unknown records).
    app_bytes: u64,
}

impl Records {
    /// Walks `chunk` (`data` captured of `len`). `classify(type, length)`
    /// says whether a record is application data.
    fn walk(&mut self, chunk: &Chunk<'_>, mut classify: impl FnMut(u8, u16) -> bool) -> Walked {
        let mut walked = Walked::default();
        if self.lost && is_header(chunk.data) {
            *self = Self::default();
        }
        if self.lost {
            walked.app_bytes = chunk.len;
            return walked;
        }
        let mut at = 0u64;
        while at < chunk.len {
            if self.body_left > 0 {
                let take = self.body_left.min(chunk.len - at);
                self.body_left -= take;
                at += take;
                if self.in_app_record {
                    walked.app_bytes += take;
                }
                continue;
            }
            let Some(&byte) = chunk.data.get(at as usize) else {
                // The next header was not captured (or is in a hole).
                self.lost = true;
                walked.app_bytes += chunk.len - at;
                return walked;
            };
            self.header[self.header_len] = byte;
            self.header_len += 1;
            at += 1;
            if self.header_len < HEADER_BYTES {
                continue;
            }
            self.header_len = 0;
            if !is_header(&self.header) {
                self.lost = true;
                walked.app_bytes += chunk.len - at;
                return walked;
            }
            let length = u16::from_be_bytes([self.header[3], self.header[4]]);
            self.body_left = u64::from(length);
            self.in_app_record = classify(self.header[0], length);
            if self.in_app_record {
                walked.app_bytes += HEADER_BYTES as u64;
            }
        }
        walked
    }
}

/// A turn: the client's application data and the server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// The turn's first byte sent (arrived, server role).
    pub sent_ns: u64,
    pub request_bytes: u64,
    /// The answer's first and (so far) last bytes.
    pub first_answer_ns: Option<u64>,
    pub last_answer_ns: u64,
    pub answer_bytes: u64,
}

/// What [`Turns`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEvent {
    Answered(Turn),
    /// No answer before the connection closed (`closed`) or the timeout.
    Unanswered {
        turn: Turn,
        age_ns: u64,
        closed: bool,
    },
}

/// The turns of one TLS connection.
#[derive(Debug, Default)]
pub struct Turns {
    /// Requests (client → server), replies.
    records: [Records; 2],
    /// The client has sent an application-data record.
    client_sent_app_data: bool,
    /// TLS 1.3: the server sent application data before the client did.
    tls13: bool,
    /// TLS 1.3: the client's Finished has gone by.
    client_finished: bool,
    open: Option<Turn>,
}

impl Turns {
    /// From the connection's first byte.
    pub fn new() -> Self {
        Self::default()
    }

    /// From somewhere after the handshake (a connection older than the
    /// agent).
    pub fn mid_stream() -> Self {
        Self {
            client_sent_app_data: true,
            client_finished: true,
            tls13: true,
            ..Self::default()
        }
    }

    /// Client → server bytes.
    pub fn on_request(&mut self, chunk: Chunk<'_>, out: &mut Vec<TurnEvent>) {
        let (tls13, mut client_finished) = (self.tls13, self.client_finished);
        let walked = self.records[0].walk(&chunk, |kind, length| {
            if kind != APPLICATION_DATA {
                return false;
            }
            if tls13 && !client_finished {
                client_finished = true;
                return false;
            }
            !(tls13 && length == TLS13_ALERT_RECORD)
        });
        self.client_finished = client_finished;
        if walked.app_bytes == 0 {
            return;
        }
        self.client_sent_app_data = true;
        match &mut self.open {
            Some(turn) if turn.first_answer_ns.is_none() => turn.request_bytes += walked.app_bytes,
            _ => {
                if let Some(done) = self.open.take() {
                    out.push(TurnEvent::Answered(done));
                }
                self.open = Some(Turn {
                    sent_ns: chunk.ts_ns,
                    request_bytes: walked.app_bytes,
                    first_answer_ns: None,
                    last_answer_ns: 0,
                    answer_bytes: 0,
                });
            }
        }
    }

    /// Server → client bytes.
    pub fn on_reply(&mut self, chunk: Chunk<'_>) {
        let sent_app_data = self.client_sent_app_data;
        let mut tls13 = self.tls13;
        let walked = self.records[1].walk(&chunk, |kind, length| {
            if kind != APPLICATION_DATA {
                return false;
            }
            if !sent_app_data {
                tls13 = true;
                return false;
            }
            !(tls13 && length == TLS13_ALERT_RECORD)
        });
        self.tls13 = tls13;
        if walked.app_bytes == 0 {
            return;
        }
        if let Some(turn) = &mut self.open {
            turn.first_answer_ns.get_or_insert(chunk.ts_ns);
            turn.last_answer_ns = chunk.ts_ns;
            turn.answer_bytes += walked.app_bytes;
        }
    }

    /// Reports an answered turn quiet for a while; times out an unanswered
    /// one older than `timeout_ns`.
    pub fn tick(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<TurnEvent>) {
        let Some(turn) = self.open else {
            return;
        };
        match turn.first_answer_ns {
            Some(_) if now_ns.saturating_sub(turn.last_answer_ns) >= SETTLE_NS => {
                out.push(TurnEvent::Answered(turn));
                self.open = None;
            }
            None if now_ns.saturating_sub(turn.sent_ns) > timeout_ns => {
                out.push(TurnEvent::Unanswered {
                    turn,
                    age_ns: now_ns.saturating_sub(turn.sent_ns),
                    closed: false,
                });
                self.open = None;
            }
            _ => {}
        }
    }

    /// The connection ends: the open turn is reported.
    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<TurnEvent>) {
        if let Some(turn) = self.open.take() {
            out.push(match turn.first_answer_ns {
                Some(_) => TurnEvent::Answered(turn),
                None => TurnEvent::Unanswered {
                    turn,
                    age_ns: ts_ns.saturating_sub(turn.sent_ns),
                    closed: true,
                },
            });
        }
    }

    /// Forgets the open turn (its request is being followed in plaintext).
    pub fn forget_open(&mut self) {
        self.open = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, length: usize) -> Vec<u8> {
        let mut bytes = vec![kind, 3, 3];
        bytes.extend_from_slice(&(length as u16).to_be_bytes());
        bytes.resize(HEADER_BYTES + length, 0xa5);
        bytes
    }

    fn hello() -> Vec<u8> {
        let mut bytes = record(HANDSHAKE, 200);
        bytes[HEADER_BYTES] = CLIENT_HELLO;
        bytes
    }

    fn chunk(ts_ns: u64, data: &[u8]) -> Chunk<'_> {
        Chunk::truncated(ts_ns, data, data.len() as u64)
    }

    /// A TLS 1.3 handshake as OpenSSL does it: ClientHello; ServerHello,
    /// ChangeCipherSpec and the encrypted flight; the client's CCS and
    /// Finished.
    fn tls13_handshake(turns: &mut Turns, out: &mut Vec<TurnEvent>) {
        turns.on_request(chunk(1, &hello()), out);
        let flight = [
            record(HANDSHAKE, 90),
            record(CHANGE_CIPHER_SPEC, 1),
            record(APPLICATION_DATA, 900),
            record(APPLICATION_DATA, 70),
        ]
        .concat();
        turns.on_reply(chunk(2, &flight));
        let finished = [record(CHANGE_CIPHER_SPEC, 1), record(APPLICATION_DATA, 53)].concat();
        turns.on_request(chunk(3, &finished), out);
    }

    #[test]
    fn only_a_client_hello_starts_a_tls_connection() {
        assert!(starts_tls(&hello(), true, true));
        assert!(!starts_tls(&record(APPLICATION_DATA, 40), true, true));
        assert!(starts_tls(&record(APPLICATION_DATA, 40), false, true));
        assert!(!starts_tls(b"*1\r\n$4\r\nPING\r\n", false, true));
        assert!(!starts_tls(b"PING\r\n", true, true));
        assert!(!starts_tls(b"+PONG\r\n", false, false));
        assert!(!starts_tls(&[HANDSHAKE, 3], true, true));
    }

    #[test]
    fn tls13_turns_leave_out_the_finished_the_tickets_and_close_notify() {
        let (mut turns, mut out) = (Turns::new(), Vec::new());
        tls13_handshake(&mut turns, &mut out);
        // Two session tickets, then two requests each answered.
        turns.on_reply(chunk(
            4,
            &[record(APPLICATION_DATA, 250), record(APPLICATION_DATA, 250)].concat(),
        ));
        turns.on_request(chunk(10, &record(APPLICATION_DATA, 31)), &mut out);
        turns.on_reply(chunk(15, &record(APPLICATION_DATA, 24)));
        turns.on_request(chunk(20, &record(APPLICATION_DATA, 31)), &mut out);
        turns.on_reply(chunk(27, &record(APPLICATION_DATA, 24)));
        turns.on_request(
            chunk(30, &record(APPLICATION_DATA, TLS13_ALERT_RECORD as usize)),
            &mut out,
        );
        turns.close(31, &mut out);
        let answered: Vec<(u64, u64)> = out
            .iter()
            .map(|e| match e {
                TurnEvent::Answered(t) => (t.sent_ns, t.last_answer_ns),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(answered, [(10, 15), (20, 27)]);
    }

    #[test]
    fn tls12_turns_start_at_the_first_application_data() {
        let (mut turns, mut out) = (Turns::new(), Vec::new());
        turns.on_request(chunk(1, &hello()), &mut out);
        turns.on_reply(chunk(
            2,
            &[record(HANDSHAKE, 90), record(HANDSHAKE, 800)].concat(),
        ));
        let finish = [
            record(HANDSHAKE, 70),
            record(CHANGE_CIPHER_SPEC, 1),
            record(HANDSHAKE, 40),
        ];
        turns.on_request(chunk(3, &finish.concat()), &mut out);
        turns.on_reply(chunk(
            4,
            &[record(CHANGE_CIPHER_SPEC, 1), record(HANDSHAKE, 40)].concat(),
        ));
        assert!(out.is_empty() && turns.open.is_none());
        turns.on_request(chunk(10, &record(APPLICATION_DATA, 40)), &mut out);
        turns.on_reply(chunk(12, &record(APPLICATION_DATA, 30)));
        turns.close(13, &mut out);
        assert!(matches!(
            out[..],
            [TurnEvent::Answered(Turn {
                sent_ns: 10,
                last_answer_ns: 12,
                ..
            })]
        ));
    }

    #[test]
    fn a_pipelined_batch_is_one_turn_timed_to_its_last_answer() {
        let (mut turns, mut out) = (Turns::mid_stream(), Vec::new());
        turns.on_request(chunk(10, &record(APPLICATION_DATA, 400)), &mut out);
        turns.on_request(chunk(11, &record(APPLICATION_DATA, 400)), &mut out);
        turns.on_reply(chunk(20, &record(APPLICATION_DATA, 100)));
        turns.on_reply(chunk(25, &record(APPLICATION_DATA, 100)));
        turns.tick(26, u64::MAX, &mut out);
        assert!(out.is_empty(), "answers still coming: {out:?}");
        turns.tick(25 + SETTLE_NS, u64::MAX, &mut out);
        let TurnEvent::Answered(turn) = out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (turn.sent_ns, turn.first_answer_ns, turn.last_answer_ns),
            (10, Some(20), 25)
        );
        assert_eq!((turn.request_bytes, turn.answer_bytes), (810, 210));
    }

    #[test]
    fn records_split_anywhere_frame_the_same() {
        let stream = [
            record(APPLICATION_DATA, 31),
            record(APPLICATION_DATA, TLS13_ALERT_RECORD as usize),
            record(HANDSHAKE, 3),
            record(APPLICATION_DATA, 7000),
        ]
        .concat();
        let classify =
            |kind: u8, length: u16| kind == APPLICATION_DATA && length != TLS13_ALERT_RECORD;
        let whole = Records::default().walk(&chunk(0, &stream), classify);
        assert_eq!(whole.app_bytes, 36 + 7005);
        for cut in 1..stream.len() {
            let mut records = Records::default();
            let first = records.walk(&chunk(0, &stream[..cut]), classify);
            let second = records.walk(&chunk(0, &stream[cut..]), classify);
            assert_eq!(
                first.app_bytes + second.app_bytes,
                whole.app_bytes,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_hole_inside_a_record_keeps_the_framing_and_one_over_a_header_resyncs() {
        let mut records = Records::default();
        let classify = |kind: u8, _| kind == APPLICATION_DATA;
        let big = record(APPLICATION_DATA, 5000);
        records.walk(&chunk(0, &big[..1000]), classify);
        // A gap of 3000 bytes inside the body, then the rest.
        records.walk(&Chunk::truncated(0, &[], 3000), classify);
        records.walk(&chunk(0, &big[4000..]), classify);
        assert!(!records.lost);
        // A gap over the next header: lost until a piece starts a record.
        records.walk(&Chunk::truncated(0, &[], 100), classify);
        assert!(records.lost);
        let walked = records.walk(&chunk(0, &[0x42; 40]), classify);
        assert_eq!(walked.app_bytes, 40);
        let walked = records.walk(&chunk(0, &record(HANDSHAKE, 10)), classify);
        assert!(!records.lost && walked == Walked { app_bytes: 0 });
    }

    #[test]
    fn unanswered_turns_time_out_or_end_with_the_connection() {
        let (mut turns, mut out) = (Turns::mid_stream(), Vec::new());
        turns.on_request(chunk(10, &record(APPLICATION_DATA, 40)), &mut out);
        turns.tick(1_000, 5_000, &mut out);
        assert!(out.is_empty());
        turns.tick(6_000, 5_000, &mut out);
        assert!(matches!(
            out[..],
            [TurnEvent::Unanswered {
                age_ns: 5_990,
                closed: false,
                ..
            }]
        ));
        turns.on_request(chunk(7_000, &record(APPLICATION_DATA, 40)), &mut out);
        turns.close(7_500, &mut out);
        assert!(matches!(
            out[1],
            TurnEvent::Unanswered {
                age_ns: 500,
                closed: true,
                ..
            }
        ));
    }
}
