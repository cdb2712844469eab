//! Maps and load-time settings shared by all programs.

use agent_common::{Config, DEFAULT_RING_BUFFER_BYTES, MAX_WATCHED_PORTS, STAT_COUNT, StatId};
use aya_ebpf::{
    Global,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};

/// Written by userspace before load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
pub static CONFIG: Global<Config> = Global::new(
    // SAFETY: `Config` is plain integers; all-zero is valid (no ports watched).
    unsafe { core::mem::zeroed() },
);

/// Events to userspace. Its size is set by userspace at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

/// Per-CPU counters indexed by [`StatId`]: every drop is counted here.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[inline(always)]
pub fn count(stat: StatId) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn is_watched_port(config: &Config, port: u16) -> bool {
    let count = config.port_count as usize;
    let mut i = 0;
    while i < MAX_WATCHED_PORTS && i < count {
        if config.ports.get(i).copied() == Some(port) {
            return true;
        }
        i += 1;
    }
    false
}
