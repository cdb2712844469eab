//! Plaintext of TLS connections, from the client's OpenSSL.
//!
//! User-space probes on `SSL_write`/`SSL_read` (and their `_ex` forms)
//! see each call's plaintext; the connection it belongs to is found without
//! reading any OpenSSL struct and without a syscall tracepoint (one would put
//! every syscall of every process on the node on the kernel's slow path):
//! - a TLS connection's reads (`tcp/tcp_rcv_space_adjust`, in the reading
//!   thread, `resp.rs`) name the `SSL *` call under way on that thread:
//!   the handshake's (`SSL_do_handshake`, also under `SSL_connect`), which
//!   reads the server's answer before any request is written, or a
//!   `SSL_read`/`SSL_write` doing the handshake or reading itself;
//! - `SSL_SOCKETS` remembers the connection per `SSL *` for calls that do
//!   not read (writes, reads served from OpenSSL's own buffer), and the
//!   connection's `RESP_FLOWS` entry gives its tuple.
//!
//! The plaintext goes to userspace as `SegmentEvent`s flagged
//! `SEGMENT_PLAINTEXT`, in call order, where the RESP matcher takes them
//! instead of the ciphertext. A call whose connection is not known (a
//! memory BIO as Node's; a connection the agent did not see start and that
//! has not read since) is counted and left to the wire's turns.
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
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    maps::count,
    resp::{RESP_FLOWS, chunk_len, nested, record, send},
};

/// Calls in progress, by thread.
const MAX_CALLS: u32 = 16_384;
/// `SSL *` → connection.
const MAX_SESSIONS: u32 = 65_536;

#[repr(C)]
#[derive(Clone, Copy)]
struct SslCall {
    ssl: u64,
    buf: u64,
    /// `SSL_*_ex`: where the library writes the byte count.
    count_ptr: u64,
    start_ns: u64,
    /// The socket cookie of a connection the call read from; 0 until one.
    cookie: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SessionKey {
    tgid: u32,
    _pad: u32,
    ssl: u64,
}

#[map]
static SSL_WRITES: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(MAX_CALLS, 0);

#[map]
static SSL_READS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(MAX_CALLS, 0);

/// `(process, SSL *)` → the socket cookie of its connection.
#[map]
static SSL_SOCKETS: LruHashMap<SessionKey, u64> = LruHashMap::with_max_entries(MAX_SESSIONS, 0);

/// Threads inside `SSL_do_handshake` → the `SSL *`.
#[map]
static HANDSHAKES: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_CALLS, 0);

/// When an `SSL_*` call last began on the node. Until one began in the
/// last [`CALL_WINDOW_NS`], `resp_app_read` leaves TLS aside without reading
/// the connection's `RESP_FLOWS` entry (another cache line: ~30 ns a
/// read). A handshake reads its answer well within the window; a call
/// that reads later finds its connection in `SSL_SOCKETS` from it.
#[map]
static SSL_LAST_CALL_NS: Array<u64> = Array::with_max_entries(1, 0);

const CALL_WINDOW_NS: u64 = 10_000_000_000;

#[inline(always)]
fn mark_call(now_ns: u64) {
    if let Some(last) = SSL_LAST_CALL_NS.get_ptr_mut(0) {
        // SAFETY: map value shared by all CPUs; a racing store is as good.
        unsafe { core::ptr::write_volatile(last, now_ns) };
    }
}

/// Whether an `SSL_*` call began on the node in the last [`CALL_WINDOW_NS`].
#[inline(always)]
pub fn calls_recent(now_ns: u64) -> bool {
    SSL_LAST_CALL_NS
        .get_ptr(0)
        // SAFETY: map value; another CPU may change it at any time.
        .is_some_and(|last| {
            let last = unsafe { core::ptr::read_volatile(last) };
            // A call stamped after `now_ns` (another CPU) counts as recent.
            last != 0 && now_ns < last.saturating_add(CALL_WINDOW_NS)
        })
}

// ---- the connection of a call ----------------------------------------------

/// A TLS connection's socket (`cookie`) was read by the current thread
/// (`resp.rs`; the read returned data): the `SSL *` call under way on this
/// thread is that connection's. Out of line: only TLS connections' reads
/// make the call.
#[inline(never)]
pub fn note_read(cookie: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = match SSL_READS.get_ptr_mut(&pid_tgid) {
        Some(call) => Some(call),
        None => SSL_WRITES.get_ptr_mut(&pid_tgid),
    };
    if let Some(call) = call {
        // SAFETY: map value pointer, valid for this program run.
        unsafe {
            if (*call).cookie == 0 {
                (*call).cookie = cookie;
            }
        }
        return;
    }
    // SAFETY: map value pointer, valid for this program run.
    if let Some(ssl) = HANDSHAKES.get_ptr(&pid_tgid).map(|p| unsafe { *p }) {
        let session = SessionKey {
            tgid: (pid_tgid >> 32) as u32,
            _pad: 0,
            ssl,
        };
        let _ = SSL_SOCKETS.insert(&session, &cookie, 0);
    }
}

/// `SSL_do_handshake(ssl)`: its reads bind `ssl` to its connection before
/// the first request is written.
#[uprobe]
pub fn ssl_handshake(ctx: ProbeContext) -> u32 {
    if let Some(ssl) = ctx.arg::<u64>(0) {
        // SAFETY: helper without arguments.
        mark_call(unsafe { bpf_ktime_get_ns() });
        let _ = HANDSHAKES.insert(&bpf_get_current_pid_tgid(), &ssl, 0);
    }
    0
}

#[uretprobe]
pub fn ssl_handshake_return(_ctx: RetProbeContext) -> u32 {
    let _ = HANDSHAKES.remove(&bpf_get_current_pid_tgid());
    0
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
        cookie: 0,
    };
    mark_call(call.start_ns);
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
    let cookie = match SSL_SOCKETS.get_ptr_mut(&session) {
        // SAFETY: map value pointer, valid for this program run.
        Some(known) => unsafe {
            if call.cookie != 0 && *known != call.cookie {
                *known = call.cookie;
            }
            *known
        },
        None if call.cookie != 0 => {
            let _ = SSL_SOCKETS.insert(&session, &call.cookie, 0);
            call.cookie
        }
        None => {
            count(StatId::TlsUnresolved);
            return;
        }
    };
    // SAFETY: map value pointer, valid for this program run.
    let Some(flow) = RESP_FLOWS.get_ptr(&cookie).map(|p| unsafe { *p }) else {
        count(StatId::TlsUnresolved);
        return;
    };
    if flow.role != ROLE_CLIENT {
        return;
    }
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
        copy_out(&flow.tuple, call.buf, len, stream, ts_ns);
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
