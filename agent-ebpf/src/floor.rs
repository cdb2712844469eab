//! The counting floor: the least work in the kernel of any tracer that
//! counts every RESP request and reply exactly, and nothing else. Each byte
//! stream is walked once, where it leaves its sender (egress): the segment
//! is copied once and its value headers walked (`*n`, `$len` jumped over,
//! simple lines scanned), counting top-level values; no command names, no
//! times, no state kept across segments. Ingress only counts the segment,
//! as the bare hook does: with both ends on the node (as in the bench) the
//! receiving side holds the same bytes, and with one end on the node the one
//! walk would be at ingress instead. `cargo xtask bench` runs it next to the
//! bare hook (mode `floor`, `--counting-floor`) to measure what exactness
//! alone costs (docs/performance.md). Needs `bpf_loop` (Linux 5.17+); a
//! benchmark tool, not part of the tracer.

use agent_common::resp::{
    ROLE_CLIENT,
    floor::{BYTES, COUNTERS, REPLIES, REQUESTS, SEGMENTS_RECEIVED, SEGMENTS_SENT, UNWALKED},
};
use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    macros::{cgroup_skb, map},
    maps::PerCpuArray,
    programs::SkBuffContext,
};

use crate::resp::{
    ETH_P_IP, ETH_P_IPV6, NESTING, load, nested, nesting_level, protocol_and_len, watched_role,
};

const MASK: u32 = BYTES as u32 - 1;
/// Value headers walked per segment at most (a `-P 16` GET/SET batch has
/// about 60).
const MAX_HEADERS: u32 = 1024;
/// Bytes of a header line looked at (type byte to `\r`).
const MAX_HEADER_LINE: u32 = 32;

#[repr(C)]
pub struct Walk {
    /// Next header's offset in `data`.
    at: u32,
    /// Payload bytes in `data`.
    end: u32,
    /// Values still owed to the aggregate being walked (0: at top level).
    owed: u32,
    /// Top-level values begun.
    values: u32,
    /// The walk stopped before `end`.
    stuck: u32,
    _pad: u32,
    data: [u8; BYTES],
}

/// One walk per nesting level, as `RECORDS` in resp.rs.
#[map]
static FLOOR_WALKS: PerCpuArray<Walk> = PerCpuArray::with_max_entries(NESTING, 0);

#[map]
static FLOOR_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[cgroup_skb]
pub fn floor_egress(ctx: SkBuffContext) -> i32 {
    nested(|| walk_segment(&ctx));
    1
}

/// The bare hook's work: port filter and one per-CPU counter.
#[cgroup_skb]
pub fn floor_ingress(ctx: SkBuffContext) -> i32 {
    if watched_role(&ctx).is_some() {
        add(SEGMENTS_RECEIVED, 1);
    }
    1
}

#[inline(always)]
fn add(counter: u32, n: u64) {
    if let Some(slot) = FLOOR_COUNTS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot.
        unsafe { *slot += n };
    }
}

fn walk_segment(ctx: &SkBuffContext) -> Option<()> {
    // A client sends requests, a server replies.
    let requests = watched_role(ctx)? == ROLE_CLIENT;
    let skb = ctx.skb.skb;
    let (protocol, skb_len) = protocol_and_len(ctx);
    let mut byte = [0u8; 1];
    let ip_len = match protocol {
        ETH_P_IP => {
            if !load(ctx, 0, &mut byte) {
                return None;
            }
            u32::from(byte[0] & 0x0f) * 4
        }
        ETH_P_IPV6 => 40,
        _ => return None,
    };
    if !load(ctx, ip_len + 12, &mut byte) {
        return None;
    }
    let payload = ip_len + u32::from(byte[0] >> 4) * 4;
    if payload >= skb_len {
        return None; // no payload
    }
    let len = skb_len - payload;
    add(SEGMENTS_SENT, 1);
    if len > BYTES as u32 {
        add(UNWALKED, 1);
        return None;
    }
    // Already 1..=BYTES; masked after an opaque copy so that the verifier
    // sees the bound on the register passed to the helper.
    let len = ((core::hint::black_box(len) - 1) & MASK) + 1;
    let walk = FLOOR_WALKS.get_ptr_mut(nesting_level()?)?;
    // SAFETY: per-CPU value of this nesting level; `len` is 1..=BYTES.
    unsafe {
        if bpf_skb_load_bytes(skb.cast(), payload, (*walk).data.as_mut_ptr().cast(), len) != 0 {
            add(UNWALKED, 1);
            return None;
        }
        (*walk).at = 0;
        (*walk).end = len;
        (*walk).owed = 0;
        (*walk).values = 0;
        (*walk).stuck = 0;
        let mut step = Step { walk };
        bpf_loop(
            MAX_HEADERS,
            walk_header as *mut c_void,
            (&raw mut step).cast(),
            0,
        );
        add(
            if requests { REQUESTS } else { REPLIES },
            u64::from((*walk).values),
        );
        if (*walk).stuck != 0 || (*walk).at < (*walk).end {
            add(UNWALKED, 1);
        }
    }
    Some(())
}

/// What `bpf_loop` hands each step: the walk, in the caller's stack.
#[repr(C)]
struct Step {
    walk: *mut Walk,
}

/// One step of `bpf_loop`: the value header at `walk.at`. The walk's state
/// lives in the map value, not on the stack, so every step looks the same
/// to the verifier and the loop is verified once.
#[inline(never)]
extern "C" fn walk_header(_index: u64, step: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the caller's `Step`, whose walk is this run's
    // per-CPU value (checked non-null by the caller).
    let walk = unsafe { &mut *(*step.cast::<Step>()).walk };
    let (at, end) = (walk.at, walk.end);
    if at >= end {
        return 1;
    }
    let kind = walk.data[(at & MASK) as usize];
    if !matches!(kind, b'*' | b'$' | b'+' | b'-' | b':') {
        walk.stuck = 1;
        return 1;
    }
    // The header line: digits (and a sign) up to `\r`.
    let mut cursor = at + 1;
    let mut number: u32 = 0;
    let mut negative = false;
    let mut looked = 0;
    loop {
        if looked == MAX_HEADER_LINE || cursor >= end {
            walk.stuck = 1;
            return 1;
        }
        let c = walk.data[(cursor & MASK) as usize];
        if c == b'\r' {
            break;
        }
        if c == b'-' {
            negative = true;
        } else {
            number = number
                .wrapping_mul(10)
                .wrapping_add(u32::from(c.wrapping_sub(b'0')));
        }
        cursor += 1;
        looked += 1;
    }
    if walk.owed == 0 {
        walk.values += 1;
    } else {
        walk.owed -= 1;
    }
    let mut next = cursor + 2; // past "\r\n"
    if !negative {
        if kind == b'*' {
            walk.owed = walk.owed.wrapping_add(number);
        } else if kind == b'$' {
            next = next.saturating_add(number).saturating_add(2);
        }
    }
    walk.at = next;
    i64::from(next >= end)
}
