//! Kernel/user types of the RESP tracer.
//!
//! The kernel side keeps no RESP state: it copies the payload of every
//! segment of a watched connection to userspace with its TCP sequence
//! number (egress retransmissions already cut off), and userspace puts each
//! stream back in order, parses and matches it (`agent/src/tracker.rs`,
//! `agent/src/resp`). Why not parse in the kernel: docs/design.md.

use crate::{EventHeader, FlowTuple};

/// Bytes of payload per ring-buffer record.
pub const CHUNK_BYTES: usize = 4096;
/// Records per segment at most; payload beyond is reported, not copied
/// (the userspace parser skips it by length: it lies inside values).
pub const MAX_CHUNKS: u32 = 4;
/// Connections traced at once (LRU beyond that).
pub const MAX_RESP_FLOWS: u32 = 16_384;

/// Which end of the connection the traced socket is.
pub const ROLE_CLIENT: u8 = 1;
pub const ROLE_SERVER: u8 = 2;

/// Which stream a segment belongs to.
pub const STREAM_REQUESTS: u8 = 1;
pub const STREAM_REPLIES: u8 = 2;

/// `SegmentEvent::flags`.
/// The sender ended the stream (FIN) or reset the connection (RST).
pub const SEGMENT_FIN: u8 = 1 << 1;
pub const SEGMENT_RST: u8 = 1 << 2;
/// The last record of this segment.
pub const SEGMENT_LAST: u8 = 1 << 3;
/// The connection was seen from its handshake: its streams start here.
pub const SEGMENT_FROM_START: u8 = 1 << 4;
/// Received by a listening socket: the segment that completed a handshake
/// whose last ACK was lost carries the connection's first request, and the
/// kernel hands it to the listener before the new socket exists. `cookie`
/// is 0 and `tuple` the packet's; userspace gives it to that connection.
pub const SEGMENT_VIA_LISTENER: u8 = 1 << 5;
/// Plaintext of a TLS library call (`agent-ebpf/src/tls.rs`) on the client
/// socket `tuple`: `cookie` and `seq` are 0; records come in call order.
pub const SEGMENT_PLAINTEXT: u8 = 1 << 6;

/// Per-connection state, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RespFlow {
    pub cgroup_id: u64,
    /// Client end first, server end second.
    pub tuple: FlowTuple,
    pub role: u8,
    /// `FLOW_*` bits.
    pub flags: u8,
    pub _pad: u16,
    /// Next sequence number the socket sends: egress bytes below it were
    /// handed over already (a retransmission is cut off).
    pub sent_seq: u32,
    /// Records of this connection the full ring buffer refused: userspace
    /// stops waiting for the holes they left when this changes.
    pub drops: u32,
}

pub const FLOW_SENT_SEQ: u8 = 1;
pub const FLOW_FROM_START: u8 = 1 << 2;
/// The client's first bytes were a TLS record: its reads are where the
/// TLS probes learn which `SSL *` is this connection.
pub const FLOW_TLS: u8 = 1 << 3;

/// One record of a segment's payload; `captured` bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SegmentEvent {
    pub header: EventHeader,
    pub cookie: u64,
    pub cgroup_id: u64,
    pub tuple: FlowTuple,
    pub role: u8,
    pub stream: u8,
    pub flags: u8,
    pub _pad: u8,
    /// Payload bytes of the segment (egress: not sent before).
    pub len: u32,
    /// Sequence number of the payload's first byte.
    pub seq: u32,
    /// Where this record's bytes start in that payload.
    pub offset: u32,
    pub captured: u32,
    /// `RespFlow::drops` when the record was written.
    pub drops: u32,
    pub _pad1: u32,
}

/// The application read from a traced socket that had unread data
/// (`tcp/tcp_rcv_space_adjust`), or the socket went away.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SocketEvent {
    pub header: EventHeader,
    pub cookie: u64,
}

/// The counting floor (`agent-ebpf/src/floor.rs`, `--counting-floor`): its
/// per-CPU counters, by index.
pub mod floor {
    /// Top-level RESP values walked in requests as they were sent.
    pub const REQUESTS: u32 = 0;
    /// Top-level RESP values walked in replies as they were sent.
    pub const REPLIES: u32 = 1;
    /// Segments with payload sent (walked).
    pub const SEGMENTS_SENT: u32 = 2;
    /// Segments of watched connections received (counted, not walked).
    pub const SEGMENTS_RECEIVED: u32 = 3;
    /// Segments sent but not walked to their end: larger than the walk's
    /// buffer, cut inside a value header, not RESP, or unreadable.
    pub const UNWALKED: u32 = 4;
    pub const COUNTERS: u32 = 5;
    /// Payload bytes a segment may have to be walked.
    pub const BYTES: usize = 4096;
}
