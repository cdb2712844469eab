//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) → wall-clock time.

use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, in nanoseconds, taken at startup.
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    /// The offset between the clocks now.
    pub fn new() -> Self {
        let monotonic = read_clock(libc::CLOCK_MONOTONIC);
        let realtime = read_clock(libc::CLOCK_REALTIME);
        Self {
            realtime_minus_monotonic_ns: realtime - monotonic,
        }
    }

    pub fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        let since_epoch = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(since_epoch.max(0) as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    read_clock(libc::CLOCK_MONOTONIC) as u64
}

fn read_clock(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_now_maps_to_wall_clock_now() {
        let clock = Clock::new();
        let mapped = clock.wall_time(monotonic_ns());
        let now = SystemTime::now();
        let skew = now.duration_since(mapped).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(50), "skew {skew:?}");
    }
}
