//! Connect attempts to watched ports: handshake time, outcome, SYN retransmits.
//!
//! Built on stable tracepoints only (no kprobes/fentry), with field offsets
//! from userspace:
//! - `sock/inet_sock_set_state` (4.16+): CLOSE→SYN_SENT runs in the connecting
//!   task (`tcp_v4_connect`/`tcp_v6_connect`), so pid, comm and cgroup are
//!   captured there; SYN_SENT→ESTABLISHED/CLOSE end the attempt (softirq or
//!   timer context: the current task is arbitrary there).
//! - `tcp/tcp_retransmit_skb` (4.15+): SYN retransmits while in SYN_SENT.
//! - `tcp/tcp_receive_reset` (4.15+): a RST answered the SYN, before CLOSE.
//! - `sock/inet_sk_error_report` (5.14+): the errno behind a failure. An ICMP
//!   error reports it before CLOSE; a timeout reports it after CLOSE on 6.10+
//!   (`tcp_done_with_error`) and before it on older kernels; a socket the
//!   application closed gets no report at all.
//! - `tcp/tcp_destroy_sock` (4.15+): the socket is freed; an attempt closed
//!   without a report by then was aborted by the application.
//!
//! The same programs feed `connection.rs` (established connections) and
//! carry `tcp/tcp_send_reset` and `tcp/tcp_retransmit_synack` for it.
//!
//! Without `inet_sk_error_report` (5.10), an attempt that ends without a RST
//! is `aborted` when the CLOSE runs in the owning process and `timeout`
//! otherwise (the kernel's retransmit timer), and ICMP errors show as timeouts.

use agent_common::{
    COMM_LEN, CONFIG_HAS_ERROR_REPORT, ConnectEvent, ConnectOutcome, ConnectionRole, EventHeader,
    EventKind, FlowTuple, MAX_CONNECTS_IN_FLIGHT, StatId, SynAnswer, TaskInfo, errno,
    failed_connect_outcome, family_of,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{self as helper, bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::TracePointContext,
};

use crate::{
    connection::{self, TCP_ESTABLISHED},
    maps::{BPF_F_NO_COMMON_LRU, config_flags, count, events, is_watched_port, submit_flags},
    offset,
};

const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const IPPROTO_TCP: u16 = 6;

/// Errors reported before CLOSE count for that CLOSE only when this recent.
const ERROR_REPORT_MAX_AGE_NS: u64 = 10_000_000;
/// Errors remembered per tuple until their CLOSE (ICMP errors; pre-6.10 timeouts).
const MAX_RECENT_ERRORS: u32 = 1_024;

/// A socket between SYN_SENT and the end of its handshake.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConnectState {
    task: TaskInfo,
    start_ns: u64,
    /// When SYN_SENT→CLOSE happened; 0 while still in SYN_SENT.
    closed_ns: u64,
    /// Complete once CLOSE is seen (the source port is assigned after SYN_SENT).
    flow: FlowTuple,
    family: u16,
    syn_retransmits: u32,
    /// A `SynAnswer` hint seen before CLOSE (RST).
    answer: u8,
    _pad: [u8; 7],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SocketError {
    error: i32,
    _pad: u32,
    ts_ns: u64,
}

/// Where `on_syn_sent` builds a new entry.
#[map]
static CONNECT_SCRATCH: PerCpuArray<ConnectState> = PerCpuArray::with_max_entries(1, 0);

/// Key: `struct sock *` (the tracepoints' `skaddr`).
#[map]
static CONNECTS: LruHashMap<u64, ConnectState> =
    LruHashMap::with_max_entries(MAX_CONNECTS_IN_FLIGHT, BPF_F_NO_COMMON_LRU);

/// Attempts closed in SYN_SENT whose error report may still follow.
#[map]
static CLOSED_CONNECTS: LruHashMap<FlowTuple, u64> =
    LruHashMap::with_max_entries(MAX_CONNECTS_IN_FLIGHT, BPF_F_NO_COMMON_LRU);

/// Error reports that came before their CLOSE.
#[map]
static RECENT_ERRORS: LruHashMap<FlowTuple, SocketError> =
    LruHashMap::with_max_entries(MAX_RECENT_ERRORS, BPF_F_NO_COMMON_LRU);

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i64> {
    // SAFETY: bounded by the tracepoint record; a bad offset fails the probe read.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|_| {
        count(StatId::ReadFailed);
        -1
    })
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = read(ctx, offset!(set_state_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let sport: u16 = read(ctx, offset!(set_state_sport))?;
    let dport: u16 = read(ctx, offset!(set_state_dport))?;
    // Client side: it connects to a watched port; server side: it was accepted on one.
    let client_side = is_watched_port(dport);
    if !client_side && !is_watched_port(sport) {
        return Ok(());
    }
    let old_state: i32 = read(ctx, offset!(set_state_oldstate))?;
    let new_state: i32 = read(ctx, offset!(set_state_newstate))?;
    // Half of a connection's transitions (LISTEN → SYN_RECV, FIN_WAIT1 →
    // FIN_WAIT2, CLOSE_WAIT → LAST_ACK, …) tell nothing: leave before any
    // further read.
    let relevant = new_state == TCP_SYN_SENT
        || old_state == TCP_SYN_SENT
        || (old_state == TCP_SYN_RECV && new_state == TCP_ESTABLISHED)
        || old_state == TCP_ESTABLISHED
        || new_state == TCP_CLOSE;
    if !relevant {
        return Ok(());
    }
    let skaddr: u64 = read(ctx, offset!(set_state_skaddr))?;
    let now = unsafe { bpf_ktime_get_ns() };

    if client_side && new_state == TCP_SYN_SENT {
        return on_syn_sent(ctx, skaddr, now);
    }
    let flow = FlowTuple {
        saddr: read(ctx, offset!(set_state_saddr_v6))?,
        daddr: read(ctx, offset!(set_state_daddr_v6))?,
        sport,
        dport,
    };
    if client_side && old_state == TCP_SYN_SENT {
        return on_handshake_end(skaddr, flow, new_state, now);
    }
    if old_state == TCP_SYN_RECV && new_state == TCP_ESTABLISHED && !client_side {
        let family: u16 = read(ctx, offset!(set_state_family))?;
        // Passive opens complete in softirq: the owner is not the current task.
        let task = TaskInfo {
            cgroup_id: 0,
            pid: 0,
            tid: 0,
            comm: [0; 16],
        };
        connection::open(skaddr, &flow, family, ConnectionRole::Server, &task);
        return Ok(());
    }
    if old_state == TCP_ESTABLISHED {
        connection::leave_established(&flow, new_state);
    }
    if new_state == TCP_CLOSE {
        connection::close(skaddr, &flow, now);
    }
    Ok(())
}

/// SYN_SENT → ESTABLISHED or CLOSE.
#[inline(never)]
fn on_handshake_end(skaddr: u64, flow: FlowTuple, new_state: i32, now: u64) -> Result<(), i64> {
    let Some(state) = CONNECTS.get_ptr_mut(&skaddr) else {
        return Ok(());
    };
    // SAFETY: map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    state.flow = flow;
    match new_state {
        TCP_ESTABLISHED => {
            emit(
                state,
                now,
                ConnectOutcome::Established,
                SynAnswer::SynAck,
                0,
            );
            connection::open(
                skaddr,
                &flow,
                state.family,
                ConnectionRole::Client,
                &state.task,
            );
            let _ = CONNECTS.remove(&skaddr);
        }
        TCP_CLOSE => on_syn_sent_close(skaddr, state, now),
        _ => {}
    }
    Ok(())
}

#[inline(never)]
fn on_syn_sent(ctx: &TracePointContext, skaddr: u64, now: u64) -> Result<(), i64> {
    // Built in a per-CPU scratch slot, not on the stack: the caller's frame
    // plus this one must fit the verifier's 512-byte limit for a call chain
    // (6.1 and 5.10 reject what 6.18 lets through).
    let Some(state) = CONNECT_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU map value, exclusively ours for this program run.
    let state = unsafe { &mut *state };
    let pid_tgid = bpf_get_current_pid_tgid();
    state.task.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    state.task.pid = (pid_tgid >> 32) as u32;
    state.task.tid = pid_tgid as u32;
    // SAFETY: writes at most COMM_LEN bytes into the map value's array.
    if unsafe { helper::bpf_get_current_comm(state.task.comm.as_mut_ptr().cast(), COMM_LEN as u32) }
        != 0
    {
        state.task.comm = [0; COMM_LEN];
    }
    state.start_ns = now;
    state.closed_ns = 0;
    state.flow.saddr = read(ctx, offset!(set_state_saddr_v6))?;
    state.flow.daddr = read(ctx, offset!(set_state_daddr_v6))?;
    state.flow.sport = read(ctx, offset!(set_state_sport))?;
    state.flow.dport = read(ctx, offset!(set_state_dport))?;
    state.family = read(ctx, offset!(set_state_family))?;
    state.syn_retransmits = 0;
    state.answer = SynAnswer::None as u8;
    state._pad = [0; 7];
    if CONNECTS.insert(&skaddr, state, 0).is_err() {
        count(StatId::ConnectMapFull);
    }
    Ok(())
}

/// SYN_SENT → CLOSE: the attempt failed; find out why, now or when the
/// error report or the socket's destruction follows.
#[inline(never)]
fn on_syn_sent_close(skaddr: u64, state: &mut ConnectState, now: u64) {
    if state.answer == SynAnswer::Rst as u8 {
        // tcp_reset() in SYN_SENT always fails the connect with ECONNREFUSED.
        emit(
            state,
            now,
            ConnectOutcome::Refused,
            SynAnswer::Rst,
            errno::ECONNREFUSED,
        );
        let _ = CONNECTS.remove(&skaddr);
        return;
    }
    // SAFETY: map value pointer, valid for this program run.
    if let Some(reported) = RECENT_ERRORS.get_ptr(&state.flow).map(|p| unsafe { *p }) {
        let _ = RECENT_ERRORS.remove(&state.flow);
        if now.saturating_sub(reported.ts_ns) < ERROR_REPORT_MAX_AGE_NS {
            let (outcome, answer) = failed_connect_outcome(reported.error);
            emit(state, now, outcome, answer, reported.error);
            let _ = CONNECTS.remove(&skaddr);
            return;
        }
    }
    if config_flags() & CONFIG_HAS_ERROR_REPORT != 0 {
        // Decided by inet_sk_error_report (timeout) or tcp_destroy_sock (aborted).
        state.closed_ns = now;
        if CLOSED_CONNECTS.insert(&state.flow, &skaddr, 0).is_err() {
            count(StatId::ConnectMapFull);
        }
        return;
    }
    let closing_pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let outcome = if closing_pid == state.task.pid {
        ConnectOutcome::Aborted
    } else {
        ConnectOutcome::Timeout
    };
    emit(state, now, outcome, SynAnswer::None, 0);
    let _ = CONNECTS.remove(&skaddr);
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_retransmit_skb(&ctx);
    0
}

fn try_tcp_retransmit_skb(ctx: &TracePointContext) -> Result<(), i64> {
    let state: i32 = read(ctx, offset!(retransmit_state))?;
    if state == TCP_SYN_SENT {
        let skaddr: u64 = read(ctx, offset!(retransmit_skaddr))?;
        if let Some(connect) = CONNECTS.get_ptr_mut(&skaddr) {
            // SAFETY: map value pointer, valid for this program run.
            unsafe { (*connect).syn_retransmits += 1 };
        }
        return Ok(());
    }
    if let Some(flow) = read_watched_flow(
        ctx,
        [
            offset!(retransmit_saddr_v6),
            offset!(retransmit_daddr_v6),
            offset!(retransmit_sport),
            offset!(retransmit_dport),
        ],
    )? {
        let err_offset = offset!(retransmit_err);
        if err_offset != 0 && gave_up_before_sending(read::<i32>(ctx, err_offset)?) {
            return Ok(());
        }
        let skaddr: u64 = read(ctx, offset!(retransmit_skaddr))?;
        connection::retransmitted(&flow, skaddr, retransmitted_segments(ctx));
    }
    Ok(())
}

/// 6.13+ trace failed attempts too. The kernel counts a retransmit in
/// `tcpi_total_retrans` once it hands the skb to the IP layer, whatever that
/// returns; these errors come from the checks before it (host queue busy,
/// no memory, no route, window closed), which count nothing.
fn gave_up_before_sending(err: i32) -> bool {
    use errno::{EAGAIN, EBUSY, EHOSTUNREACH, EINVAL, ENOMEM};
    matches!(-err, EBUSY | EINVAL | ENOMEM | EHOSTUNREACH | EAGAIN)
}

/// Segments in the retransmitted skb, as the kernel counts them in
/// `tcpi_total_retrans` (`tcp_skb_pcount`): a TSO skb resent after loss can
/// hold several. 1 where the layout is unknown or the read fails.
fn retransmitted_segments(ctx: &TracePointContext) -> u32 {
    let segs_offset = offset!(skb_tcp_gso_segs);
    if segs_offset == 0 {
        return 1;
    }
    let Ok(skb) = read::<u64>(ctx, offset!(retransmit_skbaddr)) else {
        return 1;
    };
    // SAFETY: a probe read; a bad address fails the read, nothing else.
    match unsafe { bpf_probe_read_kernel((skb + u64::from(segs_offset)) as *const u16) } {
        Ok(segs) if segs > 0 => u32::from(segs),
        _ => 1,
    }
}

/// The 4-tuple at `[saddr_v6, daddr_v6, sport, dport]` offsets, if either
/// port is watched.
fn read_watched_flow(
    ctx: &TracePointContext,
    [saddr, daddr, sport, dport]: [u16; 4],
) -> Result<Option<FlowTuple>, i64> {
    let sport: u16 = read(ctx, sport)?;
    let dport: u16 = read(ctx, dport)?;
    if !is_watched_port(dport) && !is_watched_port(sport) {
        return Ok(None);
    }
    Ok(Some(FlowTuple {
        saddr: read(ctx, saddr)?,
        daddr: read(ctx, daddr)?,
        sport,
        dport,
    }))
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_receive_reset(&ctx);
    0
}

fn try_tcp_receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let skaddr: u64 = read(ctx, offset!(receive_reset_skaddr))?;
    if let Some(connect) = CONNECTS.get_ptr_mut(&skaddr) {
        // SAFETY: map value pointer, valid for this program run.
        unsafe { (*connect).answer = SynAnswer::Rst as u8 };
        return Ok(());
    }
    if let Some(flow) = read_watched_flow(
        ctx,
        [
            offset!(receive_reset_saddr_v6),
            offset!(receive_reset_daddr_v6),
            offset!(receive_reset_sport),
            offset!(receive_reset_dport),
        ],
    )? {
        connection::reset_received(&flow);
    }
    Ok(())
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_send_reset(&ctx);
    0
}

fn try_tcp_send_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let skaddr: u64 = read(ctx, offset!(send_reset_skaddr))?;
    if skaddr != 0 {
        connection::reset_sent(skaddr);
    }
    Ok(())
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_retransmit_synack(&ctx);
    0
}

fn try_tcp_retransmit_synack(ctx: &TracePointContext) -> Result<(), i64> {
    let sport: u16 = read(ctx, offset!(synack_sport))?;
    if !is_watched_port(sport) {
        return Ok(());
    }
    let flow = FlowTuple {
        saddr: read(ctx, offset!(synack_saddr_v6))?,
        daddr: read(ctx, offset!(synack_daddr_v6))?,
        sport,
        dport: read(ctx, offset!(synack_dport))?,
    };
    connection::synack_retransmitted(&flow, family_of(&flow.saddr), unsafe { bpf_ktime_get_ns() });
    Ok(())
}

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sk_error_report(&ctx);
    0
}

fn try_inet_sk_error_report(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = read(ctx, offset!(error_report_protocol))?;
    let dport: u16 = read(ctx, offset!(error_report_dport))?;
    if protocol != IPPROTO_TCP || !is_watched_port(dport) {
        return Ok(());
    }
    let flow = FlowTuple {
        saddr: read(ctx, offset!(error_report_saddr_v6))?,
        daddr: read(ctx, offset!(error_report_daddr_v6))?,
        sport: read(ctx, offset!(error_report_sport))?,
        dport,
    };
    let error: i32 = read(ctx, offset!(error_report_error))?;
    if error == 0 {
        // Soft ICMP errors are reported with sk_err still 0: nothing to learn.
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };

    // SAFETY: map value pointer, valid for this program run.
    let Some(skaddr) = CLOSED_CONNECTS.get_ptr(&flow).map(|p| unsafe { *p }) else {
        // Before CLOSE (ICMP error, or a timeout before 6.10), or not a connect of ours.
        let reported = SocketError {
            error,
            _pad: 0,
            ts_ns: now,
        };
        let _ = RECENT_ERRORS.insert(&flow, &reported, 0);
        return Ok(());
    };
    let _ = CLOSED_CONNECTS.remove(&flow);
    if let Some(state) = CONNECTS.get_ptr(&skaddr) {
        // SAFETY: map value pointer, valid for this program run.
        let state = unsafe { &*state };
        let (outcome, answer) = failed_connect_outcome(error);
        emit(state, state.closed_ns, outcome, answer, error);
        let _ = CONNECTS.remove(&skaddr);
    }
    Ok(())
}

#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_destroy_sock(&ctx);
    0
}

fn try_tcp_destroy_sock(ctx: &TracePointContext) -> Result<(), i64> {
    let skaddr: u64 = read(ctx, offset!(destroy_skaddr))?;
    let cookie_field = offset!(destroy_cookie);
    if cookie_field != 0 {
        crate::resp::closed(read(ctx, cookie_field)?);
    }
    let Some(state) = CONNECTS.get_ptr(&skaddr) else {
        if let Some(flow) = read_watched_flow(
            ctx,
            [
                offset!(destroy_saddr_v6),
                offset!(destroy_daddr_v6),
                offset!(destroy_sport),
                offset!(destroy_dport),
            ],
        )? {
            connection::destroy(skaddr, &flow);
        }
        return Ok(());
    };
    // SAFETY: map value pointer, valid for this program run.
    let state = unsafe { &*state };
    if state.closed_ns != 0 {
        // Closed in SYN_SENT and no error reported: the application gave up.
        emit(
            state,
            state.closed_ns,
            ConnectOutcome::Aborted,
            SynAnswer::None,
            0,
        );
        let _ = CLOSED_CONNECTS.remove(&state.flow);
    }
    let _ = CONNECTS.remove(&skaddr);
    Ok(())
}

#[inline(never)]
fn emit(state: &ConnectState, end_ns: u64, outcome: ConnectOutcome, answer: SynAnswer, error: i32) {
    let Some(mut entry) = events().reserve::<ConnectEvent>(0) else {
        count(StatId::RingBufferFull);
        return;
    };
    // Field by field into the ring buffer: a whole event built on the stack
    // first would not fit the 512-byte BPF stack next to the callers' frames.
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved, exclusively owned ring buffer slot.
    unsafe {
        (*event).header = EventHeader {
            kind: EventKind::Connect as u32,
            _pad: 0,
            ts_ns: end_ns,
        };
        (*event).flow = state.flow;
        (*event).family = state.family;
        (*event).outcome = outcome as u8;
        (*event).answer = answer as u8;
        (*event).error = error;
        (*event).syn_retransmits = state.syn_retransmits;
        (*event).task = state.task;
        (*event).start_ns = state.start_ns;
        (*event).duration_ns = end_ns.saturating_sub(state.start_ns);
    }
    entry.submit(submit_flags());
}
