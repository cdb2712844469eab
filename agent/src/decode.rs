//! Decode: ring buffer records → typed events. Sizes and enum values are
//! checked; a record that does not fit is an error, never a guess.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use agent_common::{
    AF_INET, AF_INET6, COMM_LEN, CONNECTION_SEEDED, CloseEvent, Closer, ConnectEvent,
    ConnectOutcome, ConnectionCounters, ConnectionRole, EventHeader, EventKind, FlowTuple,
    SynAckRetransmitEvent, SynAnswer, TaskInfo,
    resp::{
        CHUNK_BYTES, ROLE_CLIENT, ROLE_SERVER, STREAM_REPLIES, STREAM_REQUESTS, SegmentEvent,
        SocketEvent,
    },
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connect(Connect),
    Close(Close),
    SynAckRetransmit(SynAckRetransmit),
    /// The application read from a traced socket that had unread data.
    AppRead {
        ts_ns: u64,
        cookie: u64,
    },
    /// A traced socket was destroyed.
    SocketGone {
        ts_ns: u64,
        cookie: u64,
    },
}

/// Payload bytes of one TCP segment of a watched connection (one record of
/// it: a segment is split into records of at most `CHUNK_BYTES`), borrowed
/// from the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    pub ts_ns: u64,
    pub cookie: u64,
    pub cgroup_id: u64,
    pub role: ConnectionRole,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Requests (sent by the client) or replies.
    pub requests: bool,
    pub flags: u8,
    /// Payload bytes of the whole segment.
    pub len: u32,
    /// Sequence number of the payload's first byte.
    pub seq: u32,
    /// Where `data` starts in the payload.
    pub offset: u32,
    /// Records of this connection lost to a full ring buffer so far.
    pub drops: u32,
    pub data: &'a [u8],
}

/// An established connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub ts_ns: u64,
    pub role: ConnectionRole,
    /// The connecting side and the Redis side, whichever end was traced.
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The traced socket's owner, when the kernel knows it (client role).
    pub task: Option<Task>,
    pub closer: Closer,
    pub counters: ConnectionCounters,
    /// Established → closed; `None` for a connection open before the agent.
    pub duration_ns: Option<u64>,
}

/// A server-side SYN-ACK retransmit on a watched port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynAckRetransmit {
    pub ts_ns: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// The process that owns a socket, as captured in its own context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// The process's cgroup path, filled in by `enrich` (not from the kernel).
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Kernel monotonic time of the outcome.
    pub ts_ns: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub outcome: ConnectOutcome,
    pub answer: SynAnswer,
    /// Errno the kernel reported, if any.
    pub error: Option<i32>,
    pub syn_retransmits: u32,
    pub task: Task,
    /// SYN_SENT → outcome.
    pub duration_ns: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event header")]
    NoHeader { len: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("{kind:?} record has {len} bytes, expected {expected}")]
    Size {
        kind: EventKind,
        len: usize,
        expected: usize,
    },
    #[error("field {field} has invalid value {value}")]
    Value { field: &'static str, value: u64 },
}

pub fn decode(record: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader =
        read_struct(record).ok_or(DecodeError::NoHeader { len: record.len() })?;
    let kind =
        EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind { kind: header.kind })?;
    match kind {
        EventKind::Connect => {
            let raw: ConnectEvent = read_exact(kind, record)?;
            decode_connect(&raw).map(Event::Connect)
        }
        EventKind::Close => {
            let raw: CloseEvent = read_exact(kind, record)?;
            decode_close(&raw).map(Event::Close)
        }
        EventKind::Segment => Err(DecodeError::UnknownKind {
            kind: EventKind::Segment as u32,
        }),
        EventKind::AppRead => {
            let raw: SocketEvent = read_exact(kind, record)?;
            Ok(Event::AppRead {
                ts_ns: raw.header.ts_ns,
                cookie: raw.cookie,
            })
        }
        EventKind::SocketGone => {
            let raw: SocketEvent = read_exact(kind, record)?;
            Ok(Event::SocketGone {
                ts_ns: raw.header.ts_ns,
                cookie: raw.cookie,
            })
        }
        EventKind::SynAckRetransmit => {
            let raw: SynAckRetransmitEvent = read_exact(kind, record)?;
            check_family(raw.family)?;
            let (server, client) = endpoints(&raw.flow);
            Ok(Event::SynAckRetransmit(SynAckRetransmit {
                ts_ns: raw.header.ts_ns,
                client,
                server,
            }))
        }
    }
}

/// A RESP payload record, or `None` for any other kind of record.
pub fn segment(record: &[u8]) -> Option<Result<Segment<'_>, DecodeError>> {
    let header: EventHeader = read_struct(record)?;
    (header.kind == EventKind::Segment as u32).then(|| decode_segment(record))
}

fn decode_segment(record: &[u8]) -> Result<Segment<'_>, DecodeError> {
    let head = size_of::<SegmentEvent>();
    let raw: SegmentEvent = read_struct(record).ok_or(DecodeError::Size {
        kind: EventKind::Segment,
        len: record.len(),
        expected: head,
    })?;
    let captured = raw.captured as usize;
    if captured > CHUNK_BYTES || record.len() < head + captured {
        return Err(DecodeError::Size {
            kind: EventKind::Segment,
            len: record.len(),
            expected: head + captured,
        });
    }
    let role = match raw.role {
        ROLE_CLIENT => ConnectionRole::Client,
        ROLE_SERVER => ConnectionRole::Server,
        other => {
            return Err(DecodeError::Value {
                field: "role",
                value: u64::from(other),
            });
        }
    };
    let requests = match raw.stream {
        STREAM_REQUESTS => true,
        STREAM_REPLIES => false,
        other => {
            return Err(DecodeError::Value {
                field: "stream",
                value: u64::from(other),
            });
        }
    };
    let (client, server) = endpoints(&raw.tuple);
    Ok(Segment {
        ts_ns: raw.header.ts_ns,
        cookie: raw.cookie,
        cgroup_id: raw.cgroup_id,
        role,
        client,
        server,
        requests,
        flags: raw.flags,
        len: raw.len,
        offset: raw.offset,
        seq: raw.seq,
        drops: raw.drops,
        data: &record[head..head + captured],
    })
}

/// (local, remote) socket addresses of a tuple as seen from its socket.
fn endpoints(flow: &FlowTuple) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(normalize_ip(flow.saddr), flow.sport),
        SocketAddr::new(normalize_ip(flow.daddr), flow.dport),
    )
}

fn check_family(family: u16) -> Result<(), DecodeError> {
    if family == AF_INET || family == AF_INET6 {
        Ok(())
    } else {
        Err(DecodeError::Value {
            field: "family",
            value: family.into(),
        })
    }
}

fn task(raw: &TaskInfo) -> Task {
    Task {
        pid: raw.pid,
        tid: raw.tid,
        comm: comm_to_string(&raw.comm),
        cgroup_id: raw.cgroup_id,
        cgroup: None,
    }
}

fn decode_close(raw: &CloseEvent) -> Result<Close, DecodeError> {
    let state = &raw.state;
    check_family(state.family)?;
    let role = ConnectionRole::from_u8(state.role).ok_or(DecodeError::Value {
        field: "role",
        value: state.role.into(),
    })?;
    let closer = Closer::from_u8(state.closer).ok_or(DecodeError::Value {
        field: "closer",
        value: state.closer.into(),
    })?;
    let (local, remote) = endpoints(&raw.flow);
    let (client, server) = match role {
        ConnectionRole::Client => (local, remote),
        ConnectionRole::Server => (remote, local),
    };
    let seeded = state.flags & CONNECTION_SEEDED != 0;
    Ok(Close {
        ts_ns: raw.header.ts_ns,
        role,
        client,
        server,
        task: (state.task.pid != 0).then(|| task(&state.task)),
        closer,
        counters: state.counters,
        duration_ns: (!seeded).then(|| raw.header.ts_ns.saturating_sub(state.established_ns)),
    })
}

fn decode_connect(raw: &ConnectEvent) -> Result<Connect, DecodeError> {
    let outcome = ConnectOutcome::from_u8(raw.outcome).ok_or(DecodeError::Value {
        field: "outcome",
        value: raw.outcome.into(),
    })?;
    let answer = SynAnswer::from_u8(raw.answer).ok_or(DecodeError::Value {
        field: "answer",
        value: raw.answer.into(),
    })?;
    check_family(raw.family)?;
    Ok(Connect {
        ts_ns: raw.header.ts_ns,
        src: SocketAddr::new(normalize_ip(raw.flow.saddr), raw.flow.sport),
        dst: SocketAddr::new(normalize_ip(raw.flow.daddr), raw.flow.dport),
        outcome,
        answer,
        error: (raw.error != 0).then_some(raw.error),
        syn_retransmits: raw.syn_retransmits,
        task: task(&raw.task),
        duration_ns: raw.duration_ns,
    })
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`: how the tracepoints store IPv4, and
/// what dual-stack Java and Node sockets use) becomes plain IPv4.
pub fn normalize_ip(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn comm_to_string(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn read_exact<T: Copy>(kind: EventKind, record: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if record.len() != expected {
        return Err(DecodeError::Size {
            kind,
            len: record.len(),
            expected,
        });
    }
    read_struct(record).ok_or(DecodeError::Size {
        kind,
        len: record.len(),
        expected,
    })
}

/// Copies a `#[repr(C)]` plain-integer struct out of the start of `bytes`.
fn read_struct<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; `T` is one of agent-common's plain-integer
    // `#[repr(C)]` types, valid for any bit pattern; unaligned read.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{FlowTuple, TaskInfo};

    fn raw_connect() -> ConnectEvent {
        let mut comm = [0u8; COMM_LEN];
        comm[..9].copy_from_slice(b"redis-cli");
        let mut saddr = [0u8; 16];
        saddr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 1, 5]);
        let mut daddr = [0u8; 16];
        daddr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 2, 9]);
        ConnectEvent {
            header: EventHeader {
                kind: EventKind::Connect as u32,
                _pad: 0,
                ts_ns: 5_000,
            },
            flow: FlowTuple {
                saddr,
                daddr,
                sport: 40312,
                dport: 6379,
            },
            family: AF_INET,
            outcome: ConnectOutcome::Established as u8,
            answer: SynAnswer::SynAck as u8,
            error: 0,
            syn_retransmits: 0,
            task: TaskInfo {
                cgroup_id: 4242,
                pid: 812,
                tid: 813,
                comm,
            },
            start_ns: 4_000,
            duration_ns: 1_000,
        }
    }

    fn bytes_of(event: &ConnectEvent) -> Vec<u8> {
        // SAFETY: plain-integer repr(C) struct without padding.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const ConnectEvent).cast::<u8>(),
                size_of::<ConnectEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_an_ipv4_connect() {
        let Ok(Event::Connect(c)) = decode(&bytes_of(&raw_connect())) else {
            panic!("not a connect")
        };
        assert_eq!(c.src, "10.0.1.5:40312".parse().unwrap());
        assert_eq!(c.dst, "10.0.2.9:6379".parse().unwrap());
        assert_eq!(c.task.comm, "redis-cli");
        assert_eq!((c.task.pid, c.task.tid, c.task.cgroup_id), (812, 813, 4242));
        assert_eq!(c.outcome, ConnectOutcome::Established);
        assert_eq!(c.error, None);
        assert_eq!(c.duration_ns, 1_000);
    }

    #[test]
    fn keeps_real_ipv6_and_unmaps_mapped_ipv4() {
        assert_eq!(
            normalize_ip(Ipv6Addr::LOCALHOST.octets()),
            "::1".parse::<IpAddr>().unwrap()
        );
        let mapped: Ipv6Addr = "::ffff:192.168.1.1".parse().unwrap();
        assert_eq!(
            normalize_ip(mapped.octets()),
            "192.168.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn rejects_short_unknown_and_invalid_records() {
        let bytes = bytes_of(&raw_connect());
        assert_eq!(decode(&bytes[..8]), Err(DecodeError::NoHeader { len: 8 }));
        assert!(matches!(
            decode(&bytes[..40]),
            Err(DecodeError::Size { .. })
        ));
        let mut unknown = raw_connect();
        unknown.header.kind = 99;
        assert_eq!(
            decode(&bytes_of(&unknown)),
            Err(DecodeError::UnknownKind { kind: 99 })
        );
        let mut bad = raw_connect();
        bad.outcome = 42;
        assert!(matches!(
            decode(&bytes_of(&bad)),
            Err(DecodeError::Value {
                field: "outcome",
                ..
            })
        ));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }
}

/// Properties of the decoder: whatever the ring buffer holds, decoding
/// returns a value or an error (never a panic, never a read past the
/// record), and a record written the way the kernel programs write it
/// decodes to what was written.
#[cfg(test)]
mod properties {
    use super::*;
    use agent_common::resp::{SEGMENT_LAST, SegmentEvent};
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: agent-common's plain-integer `#[repr(C)]` records have no
        // padding bytes (it asserts their sizes).
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    /// An address as the tracepoints store it: IPv4-mapped or IPv6.
    fn address() -> impl Strategy<Value = ([u8; 16], IpAddr)> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|v4| {
                let ip = std::net::Ipv4Addr::from(v4);
                (ip.to_ipv6_mapped().octets(), IpAddr::V4(ip))
            }),
            any::<[u8; 16]>()
                .prop_filter("not IPv4-mapped", |b| Ipv6Addr::from(*b)
                    .to_ipv4_mapped()
                    .is_none())
                .prop_map(|b| (b, IpAddr::V6(Ipv6Addr::from(b)))),
        ]
    }

    /// Records of every kind with a valid header, their sizes near the
    /// right one: the checks after the header get exercised.
    fn near_record() -> impl Strategy<Value = Vec<u8>> {
        (1u32..=7, any::<u64>(), vec(any::<u8>(), 0..200), 0usize..4).prop_map(
            |(kind, ts, body, trim)| {
                let size = match EventKind::from_u32(kind) {
                    Some(EventKind::Connect) => size_of::<ConnectEvent>(),
                    Some(EventKind::Close) => size_of::<CloseEvent>(),
                    Some(EventKind::SynAckRetransmit) => size_of::<SynAckRetransmitEvent>(),
                    Some(EventKind::Segment) => size_of::<SegmentEvent>() + body.len(),
                    _ => size_of::<SocketEvent>(),
                };
                let header = EventHeader {
                    kind,
                    _pad: 0,
                    ts_ns: ts,
                };
                let mut record = bytes_of(&header);
                record.extend(body.iter().cycle().take(size.saturating_sub(record.len())));
                record.resize(size, 0);
                record.truncate(size.saturating_sub(trim));
                record
            },
        )
    }

    proptest! {
        #[test]
        fn arbitrary_records_decode_or_fail_cleanly(
            record in prop_oneof![vec(any::<u8>(), 0..400), near_record()],
        ) {
            if let Some(Ok(segment)) = segment(&record) {
                let head = size_of::<SegmentEvent>();
                prop_assert!(segment.data.len() <= CHUNK_BYTES);
                prop_assert_eq!(segment.data, &record[head..head + segment.data.len()]);
            }
            if let Ok(event) = decode(&record) {
                let size = match event {
                    Event::Connect(_) => size_of::<ConnectEvent>(),
                    Event::Close(_) => size_of::<CloseEvent>(),
                    Event::SynAckRetransmit(_) => size_of::<SynAckRetransmitEvent>(),
                    Event::AppRead { .. } | Event::SocketGone { .. } => size_of::<SocketEvent>(),
                };
                prop_assert_eq!(record.len(), size);
            }
        }

        #[test]
        fn a_connect_round_trips(
            ts_ns in any::<u64>(),
            (saddr, src) in address(),
            (daddr, dst) in address(),
            (sport, dport) in any::<(u16, u16)>(),
            outcome in 1u8..=6,
            answer in 0u8..=3,
            error in any::<i32>(),
            syn_retransmits in any::<u32>(),
            (cgroup_id, pid, tid) in any::<(u64, u32, u32)>(),
            comm in "[a-z0-9_-]{0,16}",
            duration_ns in any::<u64>(),
        ) {
            let mut raw_comm = [0u8; COMM_LEN];
            raw_comm[..comm.len()].copy_from_slice(comm.as_bytes());
            let raw = ConnectEvent {
                header: EventHeader { kind: EventKind::Connect as u32, _pad: 0, ts_ns },
                flow: FlowTuple { saddr, daddr, sport, dport },
                family: if src.is_ipv4() { AF_INET } else { AF_INET6 },
                outcome,
                answer,
                error,
                syn_retransmits,
                task: TaskInfo { cgroup_id, pid, tid, comm: raw_comm },
                start_ns: ts_ns.wrapping_sub(duration_ns),
                duration_ns,
            };
            let decoded = decode(&bytes_of(&raw));
            prop_assert_eq!(decoded, Ok(Event::Connect(Connect {
                ts_ns,
                src: SocketAddr::new(src, sport),
                dst: SocketAddr::new(dst, dport),
                outcome: ConnectOutcome::from_u8(outcome).unwrap(),
                answer: SynAnswer::from_u8(answer).unwrap(),
                error: (error != 0).then_some(error),
                syn_retransmits,
                task: Task { pid, tid, comm, cgroup_id, cgroup: None },
                duration_ns,
            })));
        }

        #[test]
        fn a_segment_round_trips(
            (ts_ns, cookie, cgroup_id) in any::<(u64, u64, u64)>(),
            (saddr, client) in address(),
            (daddr, server) in address(),
            (sport, dport) in any::<(u16, u16)>(),
            server_role in any::<bool>(),
            requests in any::<bool>(),
            flags in any::<u8>(),
            (len, seq, offset, drops) in any::<(u32, u32, u32, u32)>(),
            data in vec(any::<u8>(), 0..=CHUNK_BYTES),
        ) {
            let raw = SegmentEvent {
                header: EventHeader { kind: EventKind::Segment as u32, _pad: 0, ts_ns },
                cookie,
                cgroup_id,
                tuple: FlowTuple { saddr, daddr, sport, dport },
                role: if server_role { ROLE_SERVER } else { ROLE_CLIENT },
                stream: if requests { STREAM_REQUESTS } else { STREAM_REPLIES },
                flags: flags | SEGMENT_LAST,
                _pad: 0,
                len,
                seq,
                offset,
                captured: data.len() as u32,
                drops,
                _pad1: 0,
            };
            let mut record = bytes_of(&raw);
            record.extend_from_slice(&data);
            let decoded = segment(&record);
            prop_assert_eq!(decoded, Some(Ok(Segment {
                ts_ns,
                cookie,
                cgroup_id,
                role: if server_role { ConnectionRole::Server } else { ConnectionRole::Client },
                client: SocketAddr::new(client, sport),
                server: SocketAddr::new(server, dport),
                requests,
                flags: flags | SEGMENT_LAST,
                len,
                seq,
                offset,
                drops,
                data: &data,
            })));
            // A record cut short anywhere is refused, never read beyond.
            prop_assert!(matches!(segment(&record[..record.len() - 1]), None | Some(Err(_))));
        }
    }
}
