//! Types shared by the kernel programs (`agent-ebpf`) and the userspace agent.
//!
//! Everything that crosses the kernel/user boundary is defined here once, as
//! `#[repr(C)]` structs without implicit padding (explicit `_pad` fields and a
//! compile-time size check each), so both sides agree byte for byte.
#![cfg_attr(not(test), no_std)]

pub mod resp;

/// Most ports the kernel programs can watch (`--ports`).
pub const MAX_WATCHED_PORTS: usize = 16;
/// Length of a task's `comm` in the kernel, NUL included.
pub const COMM_LEN: usize = 16;

/// Sockets in the middle of a handshake tracked at once; LRU beyond that.
pub const MAX_CONNECTS_IN_FLIGHT: u32 = 16_384;
/// Established connections to or from watched ports tracked at once (a node
/// near Redis' 10,000-client limit fits); LRU beyond that.
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Default size of the event ring buffer, in bytes (a power of two, page aligned).
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 1 << 24;

/// Event rings (maps `EVENTS_0`…): CPU `n` writes to ring `n % EVENT_RINGS`.
pub const EVENT_RINGS: u32 = 8;

/// Kind of an event in the ring buffer; the first field of every event.
/// Values are stable: the decoder in userspace matches on them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Connect = 1,
    Close = 2,
    SynAckRetransmit = 3,
    /// A `resp::SegmentEvent` and its payload bytes.
    Segment = 4,
    /// A `resp::SocketEvent`: the application read.
    AppRead = 5,
    /// A `resp::SocketEvent`: the socket was destroyed.
    SocketGone = 6,
}

impl EventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Connect),
            2 => Some(Self::Close),
            3 => Some(Self::SynAckRetransmit),
            4 => Some(Self::Segment),
            5 => Some(Self::AppRead),
            6 => Some(Self::SocketGone),
            _ => None,
        }
    }
}

/// Fixed header at the start of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event was emitted.
    pub ts_ns: u64,
}

/// Address family values as the tracepoints report them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// The family of an address as the tracepoints store it: IPv4 sockets'
/// addresses are IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
pub fn family_of(addr: &[u8; 16]) -> u16 {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return AF_INET6;
        }
        i += 1;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        AF_INET
    } else {
        AF_INET6
    }
}

/// A TCP 4-tuple as the `sock`/`tcp` tracepoints report it: IPv4 addresses as
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what the tracepoints' `*_v6` fields hold
/// for AF_INET sockets), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// The owning process, captured in process context (the connecting task).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TaskInfo {
    /// Cgroup v2 id of the task (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// Process id (tgid) and thread id.
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
}

/// How a connect attempt ended.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// SYN_SENT → ESTABLISHED.
    Established = 1,
    /// A RST answered the SYN (ECONNREFUSED).
    Refused = 2,
    /// An ICMP error answered the SYN (EHOSTUNREACH, ENETUNREACH, …).
    Unreachable = 3,
    /// The kernel gave up after its SYN retries (ETIMEDOUT).
    Timeout = 4,
    /// The application closed the socket while still in SYN_SENT: the
    /// signature of a client-side connect timeout.
    Aborted = 5,
    /// Any other error the kernel reported on the socket.
    Failed = 6,
}

impl ConnectOutcome {
    /// The name the agent writes (`connect` events, `latency` windows,
    /// alerts, metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Aborted => "aborted",
            Self::Failed => "failed",
        }
    }

    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Established,
            2 => Self::Refused,
            3 => Self::Unreachable,
            4 => Self::Timeout,
            5 => Self::Aborted,
            6 => Self::Failed,
            _ => return None,
        })
    }
}

/// What the peer (or the path) answered to the SYN.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynAnswer {
    /// Nothing came back: a drop in the path (security group, network policy,
    /// conntrack) when SYNs were retransmitted.
    None = 0,
    SynAck = 1,
    Rst = 2,
    Icmp = 3,
}

impl SynAnswer {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::None,
            1 => Self::SynAck,
            2 => Self::Rst,
            3 => Self::Icmp,
            _ => return None,
        })
    }
}

/// One connect attempt to a watched port, emitted when its outcome is known.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    pub header: EventHeader,
    pub flow: FlowTuple,
    pub family: u16,
    /// A [`ConnectOutcome`] value.
    pub outcome: u8,
    /// A [`SynAnswer`] value.
    pub answer: u8,
    /// Errno the kernel reported on the socket (positive), 0 if none.
    pub error: i32,
    /// SYNs retransmitted before the outcome.
    pub syn_retransmits: u32,
    pub task: TaskInfo,
    /// When the SYN_SENT transition happened (`bpf_ktime_get_ns`).
    pub start_ns: u64,
    /// SYN_SENT → outcome, in nanoseconds.
    pub duration_ns: u64,
}

/// Which end of a connection the traced socket is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionRole {
    /// It connected to a watched port.
    Client = 1,
    /// It was accepted on a watched port.
    Server = 2,
}

impl ConnectionRole {
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Client),
            2 => Some(Self::Server),
            _ => None,
        }
    }
}

/// Who ended an established connection, from its first state change.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closer {
    Unknown = 0,
    /// ESTABLISHED → FIN_WAIT1: this socket sent the first FIN.
    Local = 1,
    /// ESTABLISHED → CLOSE_WAIT: the peer sent the first FIN.
    Peer = 2,
    /// ESTABLISHED → CLOSE after a RST arrived.
    PeerReset = 3,
    /// ESTABLISHED → CLOSE without a RST arriving: this side aborted — an
    /// application close() with unread data or SO_LINGER 0 (a RST follows),
    /// or the kernel giving up on retransmissions.
    LocalAbort = 4,
}

impl Closer {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Unknown,
            1 => Self::Local,
            2 => Self::Peer,
            3 => Self::PeerReset,
            4 => Self::LocalAbort,
            _ => return None,
        })
    }
}

/// Counters of one established connection, as the tracepoints fire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCounters {
    /// Segments this socket retransmitted: its `tcp_sock.total_retrans`
    /// (what `tcpi_total_retrans` reports) less [`Self::retransmits_base`],
    /// refreshed at every `tcp/tcp_retransmit_skb` and at close.
    pub retransmits: u32,
    /// `tcp/tcp_receive_reset` on this socket.
    pub resets_received: u32,
    /// `tcp/tcp_send_reset` on this socket.
    pub resets_sent: u32,
    /// The socket's `total_retrans` that is not this connection's to report:
    /// the SYNs a client resent (its connect event has them); for a seeded
    /// connection, those before the agent saw its first retransmit.
    pub retransmits_base: u32,
}

/// `ConnectionState::flags`: the entry was seeded by userspace at start from
/// a socket already open (its establishment time is unknown).
pub const CONNECTION_SEEDED: u8 = 1 << 0;
/// `ConnectionState::flags`: `counters.retransmits_base` is not known yet
/// (a seeded entry): the first retransmit sets it.
pub const CONNECTION_RETRANSMITS_BASE_UNKNOWN: u8 = 1 << 1;

/// An established connection to or from a watched port, keyed by its
/// [`FlowTuple`] as seen from this socket (so both ends on one node differ).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectionState {
    /// The owning process (client role: captured at connect; server role:
    /// unknown in the kernel, all zero, because accept runs in softirq).
    pub task: TaskInfo,
    /// When the handshake completed (`bpf_ktime_get_ns`); for seeded entries,
    /// when the agent started.
    pub established_ns: u64,
    pub counters: ConnectionCounters,
    pub family: u16,
    /// A [`ConnectionRole`] value.
    pub role: u8,
    /// A [`Closer`] value, set at the first state change out of ESTABLISHED.
    pub closer: u8,
    /// `CONNECTION_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// An established connection ended (transition to CLOSE).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloseEvent {
    pub header: EventHeader,
    /// As seen from the traced socket: local address first.
    pub flow: FlowTuple,
    pub _pad: [u8; 4],
    pub state: ConnectionState,
}

/// The server side retransmitted a SYN-ACK (`tcp/tcp_retransmit_synack`):
/// the client's ACK did not arrive, or the accept queue was full.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SynAckRetransmitEvent {
    pub header: EventHeader,
    /// Local (server) address first.
    pub flow: FlowTuple,
    pub family: u16,
    pub _pad: u16,
}

/// Ids of the per-CPU counters in the `STATS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatId {
    /// An event was lost because the ring buffer was full.
    RingBufferFull = 0,
    /// A socket could not be tracked because its map was full.
    ConnectMapFull = 1,
    /// A tracepoint field could not be read.
    ReadFailed = 2,
    /// An established connection could not be tracked: its map was full.
    ConnectionMapFull = 3,
    /// A RESP connection could not be traced: its map was full.
    RespFlowMapFull = 4,
    /// Segments whose payload was longer than what is copied per segment.
    RespTruncated = 5,
    /// A TLS library call whose connection could not be found (a memory
    /// BIO, a socket connected before the agent): left to the wire's turns.
    TlsUnresolved = 6,
}

/// Number of [`StatId`] slots.
pub const STAT_COUNT: u32 = 7;

/// Offsets of the tracepoint fields the programs read, taken at startup from
/// `/sys/kernel/tracing/events/<category>/<name>/format`, because they move
/// between kernels (e.g. `tcp_retransmit_skb` gained `family` in 5.16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TracepointOffsets {
    /// `sock/inet_sock_set_state` (4.16+).
    pub set_state_skaddr: u16,
    pub set_state_oldstate: u16,
    pub set_state_newstate: u16,
    pub set_state_sport: u16,
    pub set_state_dport: u16,
    pub set_state_family: u16,
    pub set_state_protocol: u16,
    pub set_state_saddr_v6: u16,
    pub set_state_daddr_v6: u16,
    /// `tcp/tcp_retransmit_skb` (4.15+).
    pub retransmit_skaddr: u16,
    pub retransmit_state: u16,
    pub retransmit_sport: u16,
    pub retransmit_dport: u16,
    pub retransmit_saddr_v6: u16,
    pub retransmit_daddr_v6: u16,
    /// `tcp/tcp_receive_reset` (4.15+).
    pub receive_reset_skaddr: u16,
    pub receive_reset_sport: u16,
    pub receive_reset_dport: u16,
    pub receive_reset_saddr_v6: u16,
    pub receive_reset_daddr_v6: u16,
    /// `tcp/tcp_destroy_sock` (4.15+).
    pub destroy_skaddr: u16,
    pub destroy_sport: u16,
    pub destroy_dport: u16,
    pub destroy_saddr_v6: u16,
    pub destroy_daddr_v6: u16,
    /// 0 where the field does not exist.
    pub destroy_cookie: u16,
    /// `tcp/tcp_rcv_space_adjust` `sock_cookie`; 0: no app-read timing.
    pub rcv_space_cookie: u16,
    /// `tcp/tcp_send_reset` (4.15+): only `skaddr` has the same shape on
    /// every kernel (addresses became sockaddrs in 6.x).
    pub send_reset_skaddr: u16,
    /// `tcp/tcp_retransmit_synack` (4.15+; no `family` field before 5.x:
    /// the family is told from the address).
    pub synack_sport: u16,
    pub synack_dport: u16,
    pub synack_saddr_v6: u16,
    pub synack_daddr_v6: u16,
    /// `sock/inet_sk_error_report` (5.14+): no `skaddr`, matched by tuple.
    pub error_report_error: u16,
    pub error_report_sport: u16,
    pub error_report_dport: u16,
    pub error_report_protocol: u16,
    pub error_report_saddr_v6: u16,
    pub error_report_daddr_v6: u16,
    /// `tcp/tcp_retransmit_skb` `skbaddr`.
    pub retransmit_skbaddr: u16,
    /// `tcp/tcp_retransmit_skb` `err` (6.13+, which also traces failed
    /// attempts); 0: the field is absent and only sent ones are traced.
    pub retransmit_err: u16,
    /// Not a tracepoint field: where `TCP_SKB_CB(skb)->tcp_gso_segs` sits in
    /// an `sk_buff`, from the kernel's BTF; 0: unknown, one per skb.
    pub skb_tcp_gso_segs: u16,
    /// Not a tracepoint field: `tcp_sock.total_retrans` in a socket, from the
    /// kernel's BTF; 0: unknown, retransmits are counted per tracepoint run.
    pub tcp_sock_total_retrans: u16,
    pub _pad: [u16; 2],
}

/// `Config::flags`: the kernel has `sock/inet_sk_error_report` (5.14+).
pub const CONFIG_HAS_ERROR_REPORT: u32 = 1 << 0;

/// Settings fixed at load time, written into the `CONFIG` global by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Watched Redis ports; the first `port_count` are valid.
    pub ports: [u16; MAX_WATCHED_PORTS],
    pub port_count: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    pub offsets: TracepointOffsets,
    /// Wake the agent only once this much data waits in the ring buffer;
    /// below it, the agent drains on its own timer. A wakeup per event would
    /// cost every traced connection a cross-CPU interrupt.
    pub wakeup_bytes: u32,
}

const _: () = assert!(core::mem::size_of::<EventHeader>() == 16);
const _: () = assert!(core::mem::size_of::<FlowTuple>() == 36);
const _: () = assert!(core::mem::size_of::<TaskInfo>() == 32);
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == 112);
const _: () = assert!(core::mem::size_of::<TracepointOffsets>() == 88);
const _: () = assert!(core::mem::size_of::<Config>() == 132);
const _: () = assert!(core::mem::size_of::<resp::RespFlow>() == 56);
const _: () = assert!(core::mem::size_of::<resp::SegmentEvent>() == 96);
const _: () = assert!(core::mem::size_of::<resp::SocketEvent>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, made of integers and integer
    // arrays, with no implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TracepointOffsets {}
    unsafe impl aya::Pod for super::FlowTuple {}
    unsafe impl aya::Pod for super::ConnectionState {}
    unsafe impl aya::Pod for super::resp::RespFlow {}
}

/// Errno values the kernel reports on failed connects and retransmits
/// (asm-generic/errno-base.h, asm-generic/errno.h).
pub mod errno {
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const EBUSY: i32 = 16;
    pub const EINVAL: i32 = 22;
    pub const ENETDOWN: i32 = 100;
    pub const ENETUNREACH: i32 = 101;
    pub const ECONNREFUSED: i32 = 111;
    pub const ETIMEDOUT: i32 = 110;
    pub const EHOSTDOWN: i32 = 112;
    pub const EHOSTUNREACH: i32 = 113;
}

/// Outcome and SYN answer of a connect that failed with `error`
/// (`sk->sk_err`, as `sock/inet_sk_error_report` reports it).
pub fn failed_connect_outcome(error: i32) -> (ConnectOutcome, SynAnswer) {
    match error {
        errno::ECONNREFUSED => (ConnectOutcome::Refused, SynAnswer::Rst),
        errno::ETIMEDOUT => (ConnectOutcome::Timeout, SynAnswer::None),
        errno::EHOSTUNREACH | errno::ENETUNREACH | errno::EHOSTDOWN | errno::ENETDOWN => {
            (ConnectOutcome::Unreachable, SynAnswer::Icmp)
        }
        _ => (ConnectOutcome::Failed, SynAnswer::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_from_tracepoint_addresses() {
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(family_of(&mapped), AF_INET);
        let mut loopback6 = [0u8; 16];
        loopback6[15] = 1;
        assert_eq!(family_of(&loopback6), AF_INET6);
        let mut doc = [0u8; 16];
        doc[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        doc[10..12].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(family_of(&doc), AF_INET6);
    }

    #[test]
    fn errno_to_outcome() {
        assert_eq!(
            failed_connect_outcome(errno::ECONNREFUSED).0,
            ConnectOutcome::Refused
        );
        assert_eq!(
            failed_connect_outcome(errno::ETIMEDOUT).0,
            ConnectOutcome::Timeout
        );
        assert_eq!(
            failed_connect_outcome(errno::EHOSTUNREACH),
            (ConnectOutcome::Unreachable, SynAnswer::Icmp)
        );
        assert_eq!(failed_connect_outcome(1).0, ConnectOutcome::Failed);
    }
}
