//! RESP capture from `cgroup_skb` programs on the cgroup2 root.
//!
//! For each TCP segment of a watched connection: copy its payload to
//! userspace with its sequence number, where each stream is put back in
//! order, parsed and matched (`agent/src/tracker.rs`). Egress is the
//! socket's own sending order: bytes sent before (retransmissions) are cut
//! off here. Ingress sees segments as they arrive, before TCP reorders them:
//! all of them go up, and userspace drops duplicates and waits for holes.
//! Why not parse in the kernel: docs/design.md (measured).
//!
//! Fail open: the programs always return 1 (let the packet through) and
//! never write to the packet.

use agent_common::{
    CONNECTION_SEEDED, EventHeader, EventKind, FlowTuple, StatId,
    resp::{
        CHUNK_BYTES, FLOW_FROM_START, FLOW_SENT_SEQ, FLOW_TLS, MAX_CHUNKS, MAX_RESP_FLOWS,
        ROLE_CLIENT, ROLE_SERVER, RespFlow, SEGMENT_FIN, SEGMENT_FROM_START, SEGMENT_LAST,
        SEGMENT_RST, SEGMENT_VIA_LISTENER, STREAM_REPLIES, STREAM_REQUESTS, SegmentEvent,
        SocketEvent,
    },
};
use aya_ebpf::{
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_ringbuf_output, bpf_sk_fullsock,
        bpf_skb_cgroup_id, bpf_skb_load_bytes,
    },
    macros::{cgroup_skb, map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{SkBuffContext, TracePointContext},
};

use crate::{
    connection::CONNECTIONS,
    maps::{BPF_F_NO_COMMON_LRU, count, events, is_watched_port, submit_flags},
    offset,
};

const BPF_NOEXIST: u64 = 1;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

#[map]
pub(crate) static RESP_FLOWS: LruHashMap<u64, RespFlow> =
    LruHashMap::with_max_entries(MAX_RESP_FLOWS, BPF_F_NO_COMMON_LRU);

/// A record being built: header, then payload.
#[repr(C)]
pub struct Record {
    pub(crate) event: SegmentEvent,
    pub(crate) data: [u8; CHUNK_BYTES],
}

/// One record buffer per nesting level: a softirq can interrupt a program
/// run in process context on the same CPU and run these programs itself.
pub(crate) const NESTING: u32 = 4;

#[map]
static RECORDS: PerCpuArray<Record> = PerCpuArray::with_max_entries(NESTING, 0);

/// Runs of these programs on this CPU right now.
#[map]
static DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

// ---- programs ------------------------------------------------------------

#[cgroup_skb]
pub fn resp_egress(ctx: SkBuffContext) -> i32 {
    nested(|| on_segment(&ctx, true));
    1
}

#[cgroup_skb]
pub fn resp_ingress(ctx: SkBuffContext) -> i32 {
    nested(|| on_segment(&ctx, false));
    1
}

/// The application read from a socket (`tcp/tcp_rcv_space_adjust` fires in
/// `tcp_recvmsg` after data was copied): tells userspace when a reply
/// (client) or request (server) waiting in the receive queue was taken.
#[tracepoint]
pub fn resp_app_read(ctx: TracePointContext) -> u32 {
    let _ = on_app_read(&ctx);
    0
}

/// The bare hook of this design: the same attachment and port filter, one
/// per-CPU counter update per watched segment; `cargo xtask bench` compares
/// the full tracer against it.
#[cgroup_skb]
pub fn bare_egress(ctx: SkBuffContext) -> i32 {
    bare(&ctx);
    1
}

#[cgroup_skb]
pub fn bare_ingress(ctx: SkBuffContext) -> i32 {
    bare(&ctx);
    1
}

#[map]
static BARE_SEGMENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bare(ctx: &SkBuffContext) {
    if watched_role(ctx).is_some()
        && let Some(counter) = BARE_SEGMENTS.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
}

// ---- segments ------------------------------------------------------------

#[inline(always)]
pub(crate) fn nested(run: impl FnOnce() -> Option<()>) {
    let Some(depth) = DEPTH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU counter; a nested run restores it before we continue.
    unsafe {
        if *depth >= NESTING {
            return;
        }
        *depth += 1;
        let _ = run();
        *depth -= 1;
    }
}

#[inline(always)]
pub(crate) fn record() -> Option<*mut Record> {
    RECORDS.get_ptr_mut(nesting_level()?)
}

/// The nesting level of the run under way (0 for the outermost), inside
/// [`nested`]: which per-CPU scratch slot is this run's.
#[inline(always)]
pub(crate) fn nesting_level() -> Option<u32> {
    let depth = DEPTH.get_ptr(0)?;
    // SAFETY: per-CPU counter.
    let level = unsafe { *depth };
    level.checked_sub(1)
}

#[inline(always)]
fn ports(ctx: &SkBuffContext) -> (u16, u16) {
    let skb = ctx.skb.skb;
    // SAFETY: context field reads, rewritten by the verifier.
    unsafe {
        (
            (*skb).local_port as u16,
            // Network byte order in the upper 16 bits (the kernel loads the
            // be16 and shifts it on little-endian machines).
            u16::from_be(((*skb).remote_port >> 16) as u16),
        )
    }
}

#[inline(always)]
pub(crate) fn load<const N: usize>(ctx: &SkBuffContext, offset: u32, buf: &mut [u8; N]) -> bool {
    // SAFETY: `buf` has N bytes.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset,
            buf.as_mut_ptr().cast(),
            N as u32,
        ) == 0
    }
}

/// The traced socket's end of a watched connection: `ROLE_CLIENT` when its
/// peer's port is watched, `ROLE_SERVER` when its own is.
#[inline(always)]
pub(crate) fn watched_role(ctx: &SkBuffContext) -> Option<u8> {
    let (local_port, remote_port) = ports(ctx);
    if is_watched_port(remote_port) {
        Some(ROLE_CLIENT)
    } else if is_watched_port(local_port) {
        Some(ROLE_SERVER)
    } else {
        None
    }
}

/// The packet's protocol (`ETH_P_*`) and length from the network header on.
#[inline(always)]
pub(crate) fn protocol_and_len(ctx: &SkBuffContext) -> (u16, u32) {
    let skb = ctx.skb.skb;
    // SAFETY: context field reads.
    unsafe { (u16::from_be((*skb).protocol as u16), (*skb).len) }
}

fn on_segment(ctx: &SkBuffContext, egress: bool) -> Option<()> {
    let role = watched_role(ctx)?;
    let skb = ctx.skb.skb;
    let (protocol, skb_len) = protocol_and_len(ctx);
    let mut tcp = [0u8; 20];
    // Addresses as the tracepoints store them: IPv4 as IPv4-mapped IPv6.
    let mut source = [0u8; 16];
    let mut destination = [0u8; 16];
    let ip_len = match protocol {
        ETH_P_IP => {
            if !load(ctx, 0, &mut tcp) || tcp[9] != IPPROTO_TCP {
                return None;
            }
            source[10] = 0xff;
            source[11] = 0xff;
            destination[10] = 0xff;
            destination[11] = 0xff;
            source[12..16].copy_from_slice(&tcp[12..16]);
            destination[12..16].copy_from_slice(&tcp[16..20]);
            u32::from(tcp[0] & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            let mut header = [0u8; 40];
            if !load(ctx, 0, &mut header) || header[6] != IPPROTO_TCP {
                return None;
            }
            source.copy_from_slice(&header[8..24]);
            destination.copy_from_slice(&header[24..40]);
            40
        }
        _ => return None,
    };
    let (local, remote) = if egress {
        (source, destination)
    } else {
        (destination, source)
    };
    if !load(ctx, ip_len, &mut tcp) {
        return None;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let payload = ip_len + u32::from(tcp[12] >> 4) * 4;
    let tcp_flags = tcp[13];
    let ends = tcp_flags & (TCP_FIN | TCP_RST) != 0;
    if payload >= skb_len && !ends {
        return None; // a bare ACK
    }
    let len = skb_len.saturating_sub(payload);
    if !egress && len > 0 && owned_by_listener(ctx) {
        // See SEGMENT_VIA_LISTENER.
        let (client, server) = (remote, local);
        let mut flow = RespFlow {
            // SAFETY: helper on the program's own skb.
            cgroup_id: unsafe { bpf_skb_cgroup_id(skb.cast()) },
            // The listener has no peer: the ports come from the packet.
            tuple: FlowTuple {
                saddr: client,
                daddr: server,
                sport: u16::from_be_bytes([tcp[0], tcp[1]]),
                dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            },
            role: ROLE_SERVER,
            flags: 0,
            _pad: 0,
            sent_seq: 0,
            drops: 0,
        };
        copy_out(
            ctx,
            0,
            &mut flow,
            STREAM_REQUESTS,
            SEGMENT_VIA_LISTENER,
            payload,
            len,
            seq,
        );
        return None;
    }
    // SAFETY: helper on the program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    let flow = match RESP_FLOWS.get_ptr_mut(&cookie) {
        Some(flow) => flow,
        None if len > 0 => new_flow(ctx, cookie, role, &local, &remote)?,
        None => return None,
    };
    // SAFETY: map value pointer, valid for this program run; one socket's
    // segments in one direction are serialised by the socket.
    let flow = unsafe { &mut *flow };
    if egress && flow.role == ROLE_CLIENT && flow.flags & FLOW_SENT_SEQ == 0 && len > 0 {
        // The client's first bytes: a TLS record begins with its content
        // type (20–23), a RESP request never does.
        let mut first = [0u8; 1];
        if load(ctx, payload, &mut first) && (20..=23).contains(&first[0]) {
            flow.flags |= FLOW_TLS;
        }
    }
    let requests = egress == (role == ROLE_CLIENT);
    let mut start = payload;
    let mut fresh = len;
    let mut first_seq = seq;
    if egress {
        if flow.flags & FLOW_SENT_SEQ != 0 {
            let ahead = seq.wrapping_sub(flow.sent_seq) as i32;
            if ahead < 0 {
                // Sent before: a retransmission, whole or overlapping.
                let seen = ahead.unsigned_abs();
                if seen >= fresh && !ends {
                    return None;
                }
                let cut = if seen < fresh { seen } else { fresh };
                start += cut;
                fresh -= cut;
                first_seq = seq.wrapping_add(cut);
            }
        }
        let end = first_seq.wrapping_add(fresh);
        if flow.flags & FLOW_SENT_SEQ == 0 || (end.wrapping_sub(flow.sent_seq) as i32) > 0 {
            flow.sent_seq = end;
        }
        flow.flags |= FLOW_SENT_SEQ;
    }
    let mut flags = 0u8;
    if tcp_flags & TCP_FIN != 0 {
        flags |= SEGMENT_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        flags |= SEGMENT_RST;
    }
    if flow.flags & FLOW_FROM_START != 0 {
        flags |= SEGMENT_FROM_START;
    }
    let stream = if requests {
        STREAM_REQUESTS
    } else {
        STREAM_REPLIES
    };
    // A record the full ring buffer refused is a hole userspace waits for,
    // then skips: counted here, resynchronised there.
    copy_out(ctx, cookie, flow, stream, flags, start, fresh, first_seq);
    Some(())
}

/// Copies `len` payload bytes at `start` to userspace, a record per
/// `CHUNK_BYTES`, at most `MAX_CHUNKS` records (the rest is reported by
/// length only).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn copy_out(
    ctx: &SkBuffContext,
    cookie: u64,
    flow: &mut RespFlow,
    stream: u8,
    flags: u8,
    start: u32,
    len: u32,
    seq: u32,
) {
    let Some(record) = record() else {
        return;
    };
    // SAFETY: this nesting level's per-CPU record buffer.
    let record = unsafe { &mut *record };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut chunk = 0;
    while chunk < MAX_CHUNKS {
        let offset = chunk * CHUNK_BYTES as u32;
        let left = len.saturating_sub(offset);
        let take = if left < CHUNK_BYTES as u32 {
            left
        } else {
            CHUNK_BYTES as u32
        };
        let last = left <= CHUNK_BYTES as u32 || chunk + 1 == MAX_CHUNKS;
        if last && left > CHUNK_BYTES as u32 {
            count(StatId::RespTruncated);
        }
        let event = &mut record.event;
        event.header = EventHeader {
            kind: EventKind::Segment as u32,
            _pad: 0,
            ts_ns: now,
        };
        event.cookie = cookie;
        event.cgroup_id = flow.cgroup_id;
        event.tuple = flow.tuple;
        event.role = flow.role;
        event.stream = stream;
        event.flags = if last { flags | SEGMENT_LAST } else { flags };
        event._pad = 0;
        event.len = len;
        event.offset = offset;
        event.seq = seq;
        event.drops = flow.drops;
        event._pad1 = 0;
        let copied = if take > 0 {
            let bytes = chunk_len(take);
            // SAFETY: `data` has CHUNK_BYTES bytes, `bytes` ≤ CHUNK_BYTES.
            let ok = unsafe {
                bpf_skb_load_bytes(
                    ctx.skb.skb.cast(),
                    start + offset,
                    record.data.as_mut_ptr().cast(),
                    bytes,
                ) == 0
            };
            if ok { bytes } else { 0 }
        } else {
            0
        };
        event.captured = copied;
        if !send(record) {
            flow.drops = flow.drops.wrapping_add(1);
            return;
        }
        if last {
            break;
        }
        chunk += 1;
    }
}

/// `take` (1..=CHUNK_BYTES) bounded for the verifier too: the compiler knows
/// it is in range and would drop a plain check, so the bound is applied to
/// a value it cannot see through.
#[inline(always)]
pub(crate) fn chunk_len(take: u32) -> u32 {
    // SAFETY: volatile read of a local.
    let bytes = unsafe { core::ptr::read_volatile(&take) };
    (bytes.wrapping_sub(1) & (CHUNK_BYTES as u32 - 1)) + 1
}

/// Sends `record`'s header and its `captured` bytes; false when the ring
/// buffer is full (counted).
#[inline(always)]
pub(crate) fn send(record: &mut Record) -> bool {
    let size = (core::mem::size_of::<SegmentEvent>() as u32 + record.event.captured) as u64;
    // SAFETY: `record` is `size` bytes of readable map memory.
    let ret = unsafe {
        bpf_ringbuf_output(
            core::ptr::from_ref(events()).cast_mut().cast(),
            core::ptr::from_mut(record).cast(),
            size & 0x3fff,
            submit_flags(),
        )
    };
    if ret != 0 {
        count(StatId::RingBufferFull);
    }
    ret == 0
}

/// The skb belongs to a listening socket (TCP_LISTEN): a connection's
/// first data that completed its handshake.
#[inline(always)]
fn owned_by_listener(ctx: &SkBuffContext) -> bool {
    const TCP_LISTEN: u32 = 10;
    // SAFETY: context field read; the helper accepts any socket pointer the
    // verifier lets through (it checks for NULL).
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return false;
        }
        let full = bpf_sk_fullsock(sk);
        !full.is_null() && (*full).state == TCP_LISTEN
    }
}

fn new_flow(
    ctx: &SkBuffContext,
    cookie: u64,
    role: u8,
    local: &[u8; 16],
    remote: &[u8; 16],
) -> Option<*mut RespFlow> {
    let skb = ctx.skb.skb;
    let (local, remote) = (*local, *remote);
    let (local_port, remote_port) = ports(ctx);
    // The connection tracker saw this socket's handshake (not seeded from
    // /proc at startup): its streams start at the first byte we see.
    let as_seen = FlowTuple {
        saddr: local,
        daddr: remote,
        sport: local_port,
        dport: remote_port,
    };
    let from_start = match CONNECTIONS.get_ptr(&as_seen) {
        // SAFETY: map value pointer.
        Some(state) => (unsafe { (*state).flags } & CONNECTION_SEEDED) == 0,
        None => false,
    };
    let flow = RespFlow {
        // SAFETY: helper on the program's own skb.
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb.cast()) },
        tuple: if role == ROLE_CLIENT {
            as_seen
        } else {
            FlowTuple {
                saddr: remote,
                daddr: local,
                sport: remote_port,
                dport: local_port,
            }
        },
        role,
        flags: if from_start { FLOW_FROM_START } else { 0 },
        _pad: 0,
        sent_seq: 0,
        drops: 0,
    };
    if RESP_FLOWS.insert(&cookie, &flow, BPF_NOEXIST).is_err()
        && RESP_FLOWS.get_ptr(&cookie).is_none()
    {
        count(StatId::RespFlowMapFull);
        return None;
    }
    RESP_FLOWS.get_ptr_mut(&cookie)
}

fn on_app_read(ctx: &TracePointContext) -> Option<()> {
    let field = offset!(rcv_space_cookie);
    if field == 0 {
        return None;
    }
    // SAFETY: tracepoint field at an offset read from its format file.
    let cookie: u64 = unsafe { ctx.read_at(field as usize) }.ok()?;
    // Every read of a traced socket: which data a read took is not known
    // here, so "the first read after new data" cannot be told apart from a
    // read of older data racing with an arrival on another CPU (that lost
    // the later read and blamed the next round trip on the application).
    let flow = RESP_FLOWS.get_ptr(&cookie)?;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: map value pointer, valid for this program run.
    if crate::tls::calls_recent(now) && unsafe { (*flow).flags } & FLOW_TLS != 0 {
        crate::tls::note_read(cookie);
    }
    socket_event_at(EventKind::AppRead, cookie, now);
    Some(())
}

#[inline(always)]
fn socket_event(kind: EventKind, cookie: u64) {
    // SAFETY: helper without arguments.
    socket_event_at(kind, cookie, unsafe { bpf_ktime_get_ns() });
}

#[inline(always)]
fn socket_event_at(kind: EventKind, cookie: u64, ts_ns: u64) {
    let event = SocketEvent {
        header: EventHeader {
            kind: kind as u32,
            _pad: 0,
            ts_ns,
        },
        cookie,
    };
    if events()
        .output::<SocketEvent>(&event, submit_flags())
        .is_err()
    {
        count(StatId::RingBufferFull);
    }
}

/// The socket is gone (`tcp/tcp_destroy_sock`): forget it, and let
/// userspace close its streams.
pub fn closed(cookie: u64) {
    if RESP_FLOWS.get_ptr(&cookie).is_some() {
        let _ = RESP_FLOWS.remove(&cookie);
        socket_event(EventKind::SocketGone, cookie);
    }
}
