//! Established connections to or from watched ports: data retransmits,
//! resets, who closed first, lifetime.
//!
//! Retransmits and resets fire in softirq or timer context, where the current
//! task is arbitrary: attribution comes from the state captured at connect
//! time (client role) or stays unknown in the kernel (server role: passive
//! opens complete in softirq). Keyed by the 4-tuple as seen from the socket,
//! which every tracepoint used here carries on every kernel, so userspace can
//! seed the map with connections that were open before the agent started.
//! `tcp/tcp_send_reset` carries only `skaddr` in the same shape on all
//! kernels, hence the small `skaddr → tuple` side map.

use agent_common::{
    CONNECTION_RETRANSMITS_BASE_UNKNOWN, CloseEvent, Closer, ConnectionCounters, ConnectionRole,
    ConnectionState, EventHeader, EventKind, FlowTuple, MAX_CONNECTIONS, MAX_CONNECTS_IN_FLIGHT,
    StatId, SynAckRetransmitEvent, TaskInfo,
};
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_ktime_get_ns},
    macros::map,
    maps::LruHashMap,
};

use crate::{
    maps::{BPF_F_NO_COMMON_LRU, count, events, submit_flags},
    offset,
};

pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_FIN_WAIT1: i32 = 4;
pub const TCP_CLOSE_WAIT: i32 = 8;

#[map]
pub static CONNECTIONS: LruHashMap<FlowTuple, ConnectionState> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, BPF_F_NO_COMMON_LRU);

/// SYN-ACK retransmits of handshakes not yet complete, by the server's
/// tuple: the kernel starts the accepted socket's `tcpi_total_retrans` at
/// its request's SYN-ACK retransmits, and so does [`open`]. LRU: under a SYN
/// flood the oldest half-open handshakes are forgotten, not the new ones.
#[map]
static SYNACK_RETRANSMITS: LruHashMap<FlowTuple, u32> =
    LruHashMap::with_max_entries(MAX_CONNECTS_IN_FLIGHT, 0);

#[map]
static SOCKET_FLOWS: LruHashMap<u64, FlowTuple> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, BPF_F_NO_COMMON_LRU);

/// A handshake completed: start tracking the connection.
#[inline(never)]
pub fn open(skaddr: u64, flow: &FlowTuple, family: u16, role: ConnectionRole, task: &TaskInfo) {
    let mut counters = ConnectionCounters::default();
    if role == ConnectionRole::Server {
        // SAFETY: map value pointer, valid for this program run.
        if let Some(synacks) = SYNACK_RETRANSMITS.get_ptr(flow).map(|p| unsafe { *p }) {
            counters.retransmits = synacks;
            let _ = SYNACK_RETRANSMITS.remove(flow);
        }
    }
    if let Some(total) = total_retransmits(skaddr) {
        match role {
            // The SYNs resent are the connect event's, not this connection's.
            ConnectionRole::Client => counters.retransmits_base = total,
            // The kernel starts an accepted socket at its SYN-ACKs resent.
            ConnectionRole::Server => counters.retransmits = total,
        }
    }
    // At most five arguments in a BPF call: the time is taken here.
    let state = ConnectionState {
        task: *task,
        established_ns: unsafe { bpf_ktime_get_ns() },
        counters,
        family,
        role: role as u8,
        closer: Closer::Unknown as u8,
        flags: 0,
        _pad: [0; 3],
    };
    if CONNECTIONS.insert(flow, &state, 0).is_err() {
        count(StatId::ConnectionMapFull);
        return;
    }
    let _ = SOCKET_FLOWS.insert(&skaddr, flow, 0);
}

/// The first state change out of ESTABLISHED tells who closed first.
#[inline(never)]
pub fn leave_established(flow: &FlowTuple, new_state: i32) {
    let Some(state) = CONNECTIONS.get_ptr_mut(flow) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    if state.closer != Closer::Unknown as u8 {
        return;
    }
    state.closer = match new_state {
        TCP_FIN_WAIT1 => Closer::Local,
        TCP_CLOSE_WAIT => Closer::Peer,
        _ if state.counters.resets_received > 0 => Closer::PeerReset,
        _ => Closer::LocalAbort,
    } as u8;
}

/// Transition to CLOSE: report the connection and forget it.
#[inline(never)]
pub fn close(skaddr: u64, flow: &FlowTuple, now: u64) {
    let Some(state) = CONNECTIONS.get_ptr_mut(flow) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    refresh_retransmits(unsafe { &mut *state }, skaddr, 0);
    if let Some(mut entry) = events().reserve::<CloseEvent>(0) {
        let event = entry.as_mut_ptr();
        // SAFETY: `event` is a reserved ring buffer slot; `state` a map value
        // valid for this program run.
        unsafe {
            (*event).header = EventHeader {
                kind: EventKind::Close as u32,
                _pad: 0,
                ts_ns: now,
            };
            (*event).flow = *flow;
            (*event)._pad = [0; 4];
            (*event).state = *state;
        }
        entry.submit(submit_flags());
    } else {
        count(StatId::RingBufferFull);
    }
    let _ = CONNECTIONS.remove(flow);
    let _ = SOCKET_FLOWS.remove(&skaddr);
}

/// The socket is freed: drop whatever is left (a CLOSE we did not see).
pub fn destroy(skaddr: u64, flow: &FlowTuple) {
    if CONNECTIONS.get_ptr(flow).is_some() {
        let _ = CONNECTIONS.remove(flow);
    }
    let _ = SOCKET_FLOWS.remove(&skaddr);
}

/// The socket sent a retransmit of `segments` (where the kernel's count
/// cannot be read, the tracepoint's own count).
pub fn retransmitted(flow: &FlowTuple, skaddr: u64, segments: u32) {
    if let Some(state) = CONNECTIONS.get_ptr_mut(flow) {
        // SAFETY: map value pointer, valid for this program run.
        let state = unsafe { &mut *state };
        if !refresh_retransmits(state, skaddr, segments) {
            state.counters.retransmits += segments;
        }
    }
}

/// Takes the retransmits from the kernel's own count, `total_retrans`, which
/// a missed or failed tracepoint run cannot skew; `segments` were just sent
/// (0 at close), which is how a seeded entry learns its base. False where
/// the count cannot be read.
fn refresh_retransmits(state: &mut ConnectionState, skaddr: u64, segments: u32) -> bool {
    let Some(total) = total_retransmits(skaddr) else {
        return false;
    };
    let counters = &mut state.counters;
    if state.flags & CONNECTION_RETRANSMITS_BASE_UNKNOWN != 0 {
        if segments == 0 {
            // Closed before any retransmit we saw: nothing to report.
            return true;
        }
        counters.retransmits_base = total.saturating_sub(counters.retransmits + segments);
        state.flags &= !CONNECTION_RETRANSMITS_BASE_UNKNOWN;
    }
    let count = total.saturating_sub(counters.retransmits_base);
    if count > counters.retransmits {
        counters.retransmits = count;
    }
    true
}

/// `tcp_sock.total_retrans` of the socket at `skaddr`, where the kernel's
/// BTF told its offset.
fn total_retransmits(skaddr: u64) -> Option<u32> {
    let offset = offset!(tcp_sock_total_retrans);
    if offset == 0 {
        return None;
    }
    // SAFETY: a probe read; a bad address fails the read, nothing else.
    unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const u32) }.ok()
}

pub fn reset_received(flow: &FlowTuple) {
    if let Some(state) = CONNECTIONS.get_ptr_mut(flow) {
        // SAFETY: map value pointer, valid for this program run.
        unsafe { (*state).counters.resets_received += 1 };
    }
}

pub fn reset_sent(skaddr: u64) {
    // SAFETY: map value pointer, valid for this program run.
    let Some(flow) = SOCKET_FLOWS.get_ptr(&skaddr).map(|p| unsafe { *p }) else {
        return;
    };
    if let Some(state) = CONNECTIONS.get_ptr_mut(&flow) {
        // SAFETY: map value pointer, valid for this program run.
        unsafe { (*state).counters.resets_sent += 1 };
    }
}

pub fn synack_retransmitted(flow: &FlowTuple, family: u16, now: u64) {
    match SYNACK_RETRANSMITS.get_ptr_mut(flow) {
        // SAFETY: map value pointer, valid for this program run.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = SYNACK_RETRANSMITS.insert(flow, &1, 0);
        }
    }
    let Some(mut entry) = events().reserve::<SynAckRetransmitEvent>(0) else {
        count(StatId::RingBufferFull);
        return;
    };
    entry.write(SynAckRetransmitEvent {
        header: EventHeader {
            kind: EventKind::SynAckRetransmit as u32,
            _pad: 0,
            ts_ns: now,
        },
        flow: *flow,
        family,
        _pad: 0,
    });
    entry.submit(submit_flags());
}
