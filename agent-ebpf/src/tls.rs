//! Plaintext of TLS connections, from the client's OpenSSL.
//!
//! User-space probes on `SSL_write`/`SSL_read` (and their `_ex` forms)
//! see each call's plaintext; the connection it belongs to is found without
//! reading any OpenSSL struct:
//! - a socket BIO does `write`/`read` on its fd inside the call: the
//!   `syscalls/sys_enter_{write,read}` programs note that fd on the calling
//!   thread's pending call, and `SSL_FDS` remembers it per `SSL *` for calls
//!   served from OpenSSL's own buffer;
//! - `connect()` to a watched port records `(process, fd) → socket`
//!   (`syscalls/sys_enter_connect`, then the SYN_SENT transition on the same
//!   thread, `connect.rs`), and `SOCKET_FLOWS` gives the socket's tuple.
//!
//! The plaintext goes to userspace as `SegmentEvent`s flagged
//! `SEGMENT_PLAINTEXT`, in call order, where the RESP matcher takes them
//! instead of the ciphertext. A call whose connection is not known (a
//! memory BIO as Node's, a socket connected before the agent) is counted
//! and left to the wire's turns.
//!
//! Fail open: probes only read the caller's memory.

use agent_common::{
    EventHeader, EventKind, FlowTuple, StatId,
    resp::{
        CHUNK_BYTES, MAX_CHUNKS, ROLE_CLIENT, SEGMENT_LAST, SEGMENT_PLAINTEXT, STREAM_REPLIES,
        STREAM_REQUESTS,
    },
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_ktime_get_ns, bpf_probe_read_user as probe_read_user},
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};

use crate::{
    connection::SOCKET_FLOWS,
    maps::{count, is_watched_port},
    offset,
    resp::{chunk_len, nested, record, send},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Calls in progress, by thread.
const MAX_CALLS: u32 = 16_384;
/// `SSL *` → fd, and `(process, fd)` → socket.
const MAX_SESSIONS: u32 = 65_536;

#[repr(C)]
#[derive(Clone, Copy)]
struct SslCall {
    ssl: u64,
    buf: u64,
    /// `SSL_*_ex`: where the library writes the byte count.
    count_ptr: u64,
    start_ns: u64,
    /// The fd a syscall inside the call used; -1 until one did.
    fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SessionKey {
    tgid: u32,
    _pad: u32,
    ssl: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}

#[map]
static SSL_WRITES: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(MAX_CALLS, 0);

#[map]
static SSL_READS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(MAX_CALLS, 0);

#[map]
static SSL_FDS: LruHashMap<SessionKey, u32> = LruHashMap::with_max_entries(MAX_SESSIONS, 0);

/// `(process, fd)` → socket address (`skaddr`), from `connect()`.
#[map]
pub static FD_SOCKETS: LruHashMap<FdKey, u64> = LruHashMap::with_max_entries(MAX_SESSIONS, 0);

/// Threads inside `connect()` to a watched port → the fd.
#[map]
pub static CONNECTING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_CALLS, 0);

// ---- connect() -------------------------------------------------------------

#[tracepoint]
pub fn tls_connect_enter(ctx: TracePointContext) -> u32 {
    let _ = on_connect_enter(&ctx);
    0
}

fn on_connect_enter(ctx: &TracePointContext) -> Option<()> {
    let (fd_at, addr_at) = (offset!(connect_fd), offset!(connect_uservaddr));
    // SAFETY: bounded by the tracepoint record.
    let fd: u64 = unsafe { ctx.read_at(fd_at as usize) }.ok()?;
    let addr: u64 = unsafe { ctx.read_at(addr_at as usize) }.ok()?;
    // sockaddr_in and sockaddr_in6 (UAPI): family, then the port in
    // network order.
    let head: [u8; 4] = unsafe { bpf_probe_read_user(addr as *const [u8; 4]) }.ok()?;
    let family = u16::from_ne_bytes([head[0], head[1]]);
    if !(family == AF_INET || family == AF_INET6)
        || !is_watched_port(u16::from_be_bytes([head[2], head[3]]))
    {
        return None;
    }
    CONNECTING
        .insert(&bpf_get_current_pid_tgid(), &(fd as u32), 0)
        .ok()
}

/// SYN_SENT on a thread inside `connect()`: its fd is this socket.
#[inline(always)]
pub fn connecting(skaddr: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: map value pointer, valid for this program run.
    let Some(fd) = CONNECTING.get_ptr(&pid_tgid).map(|p| unsafe { *p }) else {
        return;
    };
    let _ = CONNECTING.remove(&pid_tgid);
    let key = FdKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
    };
    let _ = FD_SOCKETS.insert(&key, &skaddr, 0);
}

// ---- the fd of a call ------------------------------------------------------

#[tracepoint]
pub fn tls_write_enter(ctx: TracePointContext) -> u32 {
    note_fd(&ctx, &SSL_WRITES);
    0
}

#[tracepoint]
pub fn tls_read_enter(ctx: TracePointContext) -> u32 {
    note_fd(&ctx, &SSL_READS);
    0
}

#[inline(always)]
fn note_fd(ctx: &TracePointContext, calls: &LruHashMap<u64, SslCall>) {
    let Some(call) = calls.get_ptr_mut(&bpf_get_current_pid_tgid()) else {
        return;
    };
    let fd_at = offset!(read_write_fd);
    // SAFETY: bounded by the tracepoint record.
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(fd_at as usize) }) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    unsafe {
        if (*call).fd < 0 {
            (*call).fd = fd as i32;
        }
    }
}

// ---- SSL_write / SSL_read ----------------------------------------------------

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, &SSL_WRITES, None);
    0
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, &SSL_WRITES, Some(3));
    0
}

/// OpenSSL 3.3+'s `ssl_write_internal(ssl, buf, num, flags, &written)`
/// (`agent/src/probes/openssl.rs`); returns through `ssl_write_ex_return`.
#[uprobe]
pub fn ssl_write_ex2(ctx: ProbeContext) -> u32 {
    enter(&ctx, &SSL_WRITES, Some(4));
    0
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, &SSL_READS, None);
    0
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, &SSL_READS, Some(3));
    0
}

#[uretprobe]
pub fn ssl_write_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx, &SSL_WRITES, false, STREAM_REQUESTS);
    0
}

#[uretprobe]
pub fn ssl_write_ex_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx, &SSL_WRITES, true, STREAM_REQUESTS);
    0
}

#[uretprobe]
pub fn ssl_read_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx, &SSL_READS, false, STREAM_REPLIES);
    0
}

#[uretprobe]
pub fn ssl_read_ex_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx, &SSL_READS, true, STREAM_REPLIES);
    0
}

/// `SSL_write(ssl, buf, num)`, `SSL_write_ex(ssl, buf, num, &written)`, and
/// the same for reads; `count_arg`: which argument is the `size_t *` of
/// an `_ex` form.
#[inline(always)]
fn enter(ctx: &ProbeContext, calls: &LruHashMap<u64, SslCall>, count_arg: Option<usize>) {
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    let count_ptr = match count_arg {
        Some(n) => ctx.arg::<u64>(n).unwrap_or(0),
        None => 0,
    };
    let call = SslCall {
        ssl,
        buf,
        count_ptr,
        // SAFETY: helper without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        fd: -1,
        _pad: 0,
    };
    let _ = calls.insert(&bpf_get_current_pid_tgid(), &call, 0);
}

#[inline(always)]
fn leave(ctx: &RetProbeContext, calls: &LruHashMap<u64, SslCall>, ex: bool, stream: u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: map value pointer, valid for this program run.
    let Some(call) = calls.get_ptr(&pid_tgid).map(|p| unsafe { *p }) else {
        return;
    };
    let _ = calls.remove(&pid_tgid);
    let ret: i64 = ctx.ret();
    let len = if ex {
        // `int`: the upper half of the register is not the callee's.
        if ret as i32 != 1 || call.count_ptr == 0 {
            return;
        }
        // SAFETY: the caller's `size_t *`, read as user memory.
        match unsafe { bpf_probe_read_user(call.count_ptr as *const u64) } {
            Ok(n) => n,
            Err(_) => return,
        }
    } else {
        // `int`: ≤ 0 is an error or a retry (WANT_READ/WANT_WRITE).
        let ret = ret as i32;
        if ret <= 0 {
            return;
        }
        ret as u64
    };
    let tgid = (pid_tgid >> 32) as u32;
    let session = SessionKey {
        tgid,
        _pad: 0,
        ssl: call.ssl,
    };
    let fd = if call.fd >= 0 {
        let _ = SSL_FDS.insert(&session, &(call.fd as u32), 0);
        call.fd as u32
    } else {
        // SAFETY: map value pointer, valid for this program run.
        match SSL_FDS.get_ptr(&session).map(|p| unsafe { *p }) {
            Some(fd) => fd,
            None => {
                count(StatId::TlsUnresolved);
                return;
            }
        }
    };
    // SAFETY: map value pointers, valid for this program run.
    let Some(skaddr) = FD_SOCKETS
        .get_ptr(&FdKey { tgid, fd })
        .map(|p| unsafe { *p })
    else {
        count(StatId::TlsUnresolved);
        return;
    };
    let Some(flow) = SOCKET_FLOWS.get_ptr(&skaddr).map(|p| unsafe { *p }) else {
        count(StatId::TlsUnresolved);
        return;
    };
    // Writes are timed from the call (the request leaving), reads from
    // their return (the reply in the application's hands).
    let ts_ns = if stream == STREAM_REQUESTS {
        call.start_ns
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    };
    let len = if len > u64::from(u32::MAX) {
        u32::MAX
    } else {
        len as u32
    };
    nested(|| {
        copy_out(&flow, call.buf, len, stream, ts_ns);
        Some(())
    });
}

/// The call's bytes as `SegmentEvent` records (at most `MAX_CHUNKS`; the
/// rest is reported by length).
#[inline(always)]
fn copy_out(flow: &FlowTuple, buf: u64, len: u32, stream: u8, ts_ns: u64) {
    let Some(record) = record() else {
        return;
    };
    // SAFETY: this nesting level's per-CPU record buffer.
    let record = unsafe { &mut *record };
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
            ts_ns,
        };
        event.cookie = 0;
        event.cgroup_id = 0;
        // The client's socket: its own address first.
        event.tuple = *flow;
        event.role = ROLE_CLIENT;
        event.stream = stream;
        event.flags = SEGMENT_PLAINTEXT | if last { SEGMENT_LAST } else { 0 };
        event._pad = 0;
        event.len = len;
        event.offset = offset;
        event.seq = 0;
        event.drops = 0;
        event._pad1 = 0;
        let copied = if take > 0 {
            let bytes = chunk_len(take);
            // SAFETY: `data` has CHUNK_BYTES bytes, `bytes` ≤ CHUNK_BYTES;
            // the source is the caller's buffer, read as user memory.
            let ok = unsafe {
                probe_read_user(
                    record.data.as_mut_ptr().cast(),
                    bytes,
                    (buf + u64::from(offset)) as *const _,
                ) == 0
            };
            if ok { bytes } else { 0 }
        } else {
            0
        };
        record.event.captured = copied;
        if !send(record) {
            return;
        }
        if last {
            break;
        }
        chunk += 1;
    }
}
