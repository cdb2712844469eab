//! Maps and load-time settings shared by all programs.

use agent_common::{
    Config, DEFAULT_RING_BUFFER_BYTES, EVENT_RINGS, MAX_WATCHED_PORTS, STAT_COUNT, StatId,
};
use aya_ebpf::{
    Global,
    helpers::generated::bpf_get_smp_processor_id,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};

/// LRU maps with a free list per CPU: no lock shared by all CPUs on every
/// update (the common LRU list costs several hundred ns per update under
/// connection churn). Eviction then picks from the updating CPU's share.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Written by userspace before load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
pub static CONFIG: Global<Config> = Global::new(
    // SAFETY: `Config` is plain integers; all-zero is valid (no ports watched).
    unsafe { core::mem::zeroed() },
);

/// Events to userspace: one ring per CPU (CPU number modulo
/// [`EVENT_RINGS`]), so programs running on different CPUs never contend for
/// a ring's lock and positions (that contention was half of the programs'
/// time with two busy CPUs). Userspace merges the rings into one causal
/// order (`agent/src/rings.rs`) and sets their sizes at load time.
#[map]
static EVENTS_0: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
#[map]
static EVENTS_1: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
#[map]
static EVENTS_2: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
#[map]
static EVENTS_3: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
#[map]
static EVENTS_4: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
#[map]
static EVENTS_5: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
#[map]
static EVENTS_6: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
#[map]
static EVENTS_7: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);
const _: () = assert!(EVENT_RINGS == 8);

/// This CPU's event ring. The same for a whole program run: programs run
/// with migration disabled.
#[inline(always)]
pub fn events() -> &'static RingBuf {
    // SAFETY: helper without arguments.
    match unsafe { bpf_get_smp_processor_id() } % EVENT_RINGS {
        0 => &EVENTS_0,
        1 => &EVENTS_1,
        2 => &EVENTS_2,
        3 => &EVENTS_3,
        4 => &EVENTS_4,
        5 => &EVENTS_5,
        6 => &EVENTS_6,
        _ => &EVENTS_7,
    }
}

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

/// `CONFIG`, field by field. The loader writes the real value after
/// compilation, so every read is volatile (the compiler would otherwise fold
/// the all-zero initializer), and reading single fields keeps the 512-byte
/// BPF stack free of a copy of the whole struct.
#[inline(always)]
pub fn config_ptr() -> *const Config {
    // `Global<T>` is `repr(transparent)` over `MaybeUninit<T>`.
    core::ptr::from_ref(&CONFIG).cast::<Config>()
}

/// A field of `CONFIG.offsets`, as `usize`-convertible `u16`.
#[macro_export]
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: volatile read of a field of a static.
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(
                (*$crate::maps::config_ptr()).offsets.$field
            ))
        }
    };
}

/// Flags for `RingBufEntry::submit`: wake the agent only when enough data
/// is waiting (see `Config::wakeup_bytes`).
#[inline(always)]
pub fn submit_flags() -> u64 {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    // SAFETY: volatile read of a field of a static.
    let threshold =
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*config_ptr()).wakeup_bytes)) };
    if events().query(BPF_RB_AVAIL_DATA) >= u64::from(threshold) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
pub fn config_flags() -> u32 {
    // SAFETY: volatile read of a field of a static.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*config_ptr()).flags)) }
}

#[inline(always)]
pub fn is_watched_port(port: u16) -> bool {
    let config = config_ptr();
    // SAFETY: volatile reads of fields of a static; index bounded below.
    let count = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*config).port_count)) };
    let ports = unsafe { core::ptr::addr_of!((*config).ports) }.cast::<u16>();
    let mut i = 0;
    while i < MAX_WATCHED_PORTS && i < count as usize {
        // SAFETY: i < MAX_WATCHED_PORTS, the array's length.
        if unsafe { core::ptr::read_volatile(ports.add(i)) } == port {
            return true;
        }
        i += 1;
    }
    false
}
