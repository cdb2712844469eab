//! The kernel's per-CPU event rings, read as one stream in causal order.
//!
//! Programs write to their CPU's ring (`EVENTS_<cpu % EVENT_RINGS>`), so the
//! pipeline gets several streams. It needs one in causal order: a request's
//! egress record before its reply's ingress record, which another CPU may
//! write. One shared ring gave that order by construction (records in the
//! order they were reserved); the merge rebuilds it from the `ts_ns` every
//! record's [`EventHeader`] carries:
//! - a record's merge key is the latest time of it and every record before it
//!   in its ring. That is never after the record was reserved (each of those
//!   times was taken before its own reservation, which came first), keeps
//!   each ring's order, and is before the time of anything the record's event
//!   caused (a program takes its time after its cause happened). A record
//!   that carries an earlier time than when it was written — a program
//!   interrupted before reserving, a TLS call stamped with its start — thus
//!   sorts where it was written, as in one shared ring; sorting by its own
//!   time would pull the records before it in its ring ahead of their causes
//!   in other rings;
//! - a read hands on only records keyed before the time it started, less
//!   [`SETTLE_NS`]. A record still on its way (time taken, not yet
//!   committed) when its ring was looked at can then be overtaken only by
//!   records of events it did not cause: whatever it caused happens after its
//!   program returned, so it is stamped after the read began and waits for
//!   the next read. (One shared ring orders such unrelated records by
//!   reservation, just as loosely.) [`SETTLE_NS`] only covers the clocks of
//!   two CPUs disagreeing slightly.
//!
//! Records are handed on where they lie in the rings' shared memory, never
//! copied: a ring's next record is looked at (and left) to learn its key,
//! and taken only when it is the earliest.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use agent_common::EventHeader;
use aya::maps::{MapData, RingBuf};

/// Margin for the clocks of two CPUs (see the module's text): records keyed
/// later than this before a read began wait for the next one.
pub const SETTLE_NS: u64 = 1_000_000;

/// Offset of `EventHeader::ts_ns` in every record.
const TS_OFFSET: usize = std::mem::offset_of!(EventHeader, ts_ns);

/// A stream of records that can show its next one without taking it.
trait Source {
    /// The time in the next record's header, the record left in place.
    fn peek_ts(&mut self) -> Option<u64>;
    /// Hands the next record to `deliver` and takes it out.
    fn take(&mut self, deliver: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()>;
}

impl Source for RingBuf<MapData> {
    fn peek_ts(&mut self) -> Option<u64> {
        let record = self.next()?;
        let ts = record_ts(&record);
        // Not dropped: a dropped item is consumed, a forgotten one stays
        // the ring's next (the item holds no resource).
        std::mem::forget(record);
        Some(ts)
    }

    fn take(&mut self, deliver: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        match self.next() {
            Some(record) => deliver(&record),
            None => Ok(()),
        }
    }
}

pub struct EventRings {
    rings: Vec<RingBuf<MapData>>,
    merge: Merge,
    /// Readable when any ring is.
    epoll: OwnedFd,
}

impl EventRings {
    pub fn new(rings: Vec<RingBuf<MapData>>) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        for (index, ring) in rings.iter().enumerate() {
            let mut interest = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: index as u64,
            };
            let fd = ring.as_fd().as_raw_fd();
            // SAFETY: valid fds and event struct.
            let rc = unsafe {
                libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut interest)
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let merge = Merge::new(rings.len());
        Ok(Self {
            rings,
            merge,
            epoll,
        })
    }

    /// Hands `deliver` the records keyed before `settled_before`, in key
    /// order; true when later ones were left waiting.
    pub fn drain(
        &mut self,
        settled_before: u64,
        mut deliver: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        if let [ring] = self.rings.as_mut_slice() {
            // One ring: its order is the order, nothing to merge.
            while let Some(record) = ring.next() {
                deliver(&record)?;
            }
            return Ok(false);
        }
        self.merge
            .deliver(&mut self.rings, settled_before, &mut deliver)
    }
}

/// Several rings' records put in one order (see the module's text).
struct Merge {
    /// Per ring: the key of its last record taken (keys never decrease in
    /// a ring), and its next record's key once looked at.
    last_key: Vec<u64>,
    head_key: Vec<Option<u64>>,
}

impl Merge {
    fn new(rings: usize) -> Self {
        Self {
            last_key: vec![0; rings],
            head_key: vec![None; rings],
        }
    }

    /// Takes records from `sources` in key order while the earliest is keyed
    /// before `settled_before`; true when records were left.
    fn deliver<S: Source>(
        &mut self,
        sources: &mut [S],
        settled_before: u64,
        deliver: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        loop {
            let mut best: Option<(usize, u64)> = None;
            for (index, source) in sources.iter_mut().enumerate() {
                let head = &mut self.head_key[index];
                if head.is_none() {
                    *head = source.peek_ts().map(|ts| ts.max(self.last_key[index]));
                }
                if let Some(key) = *head
                    && key < settled_before
                    && best.is_none_or(|(_, best_key)| key < best_key)
                {
                    best = Some((index, key));
                }
            }
            let Some((index, key)) = best else {
                return Ok(self.head_key.iter().any(Option::is_some));
            };
            self.last_key[index] = key;
            self.head_key[index] = None;
            sources[index].take(deliver)?;
        }
    }
}

impl AsRawFd for EventRings {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// The header's time; records too short to have one (none should be) sort
/// first, and decoding reports them.
fn record_ts(record: &[u8]) -> u64 {
    record
        .get(TS_OFFSET..TS_OFFSET + 8)
        .map_or(0, |bytes| u64::from_ne_bytes(bytes.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A ring in memory.
    #[derive(Default)]
    struct Queue(VecDeque<Vec<u8>>);

    impl Source for Queue {
        fn peek_ts(&mut self) -> Option<u64> {
            self.0.front().map(|record| record_ts(record))
        }

        fn take(&mut self, deliver: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
            match self.0.pop_front() {
                Some(record) => deliver(&record),
                None => Ok(()),
            }
        }
    }

    struct Rings {
        queues: Vec<Queue>,
        merge: Merge,
    }

    impl Rings {
        fn new(rings: usize) -> Self {
            Self {
                queues: (0..rings).map(|_| Queue::default()).collect(),
                merge: Merge::new(rings),
            }
        }

        /// Ring `index` gets records of these times, named by one byte each.
        fn write(&mut self, index: usize, records: &[(u64, u8)]) {
            for &(ts, name) in records {
                let mut bytes = vec![0u8; TS_OFFSET];
                bytes.extend_from_slice(&ts.to_ne_bytes());
                bytes.push(name);
                self.queues[index].0.push_back(bytes);
            }
        }

        fn delivered(&mut self, settled_before: u64) -> Vec<u8> {
            let mut names = Vec::new();
            let waiting = self
                .merge
                .deliver(&mut self.queues, settled_before, &mut |r| {
                    names.push(*r.last().unwrap());
                    Ok(())
                })
                .unwrap();
            assert_eq!(waiting, self.queues.iter().any(|q| !q.0.is_empty()));
            names
        }
    }

    #[test]
    fn rings_are_merged_by_time() {
        let mut rings = Rings::new(2);
        rings.write(0, &[(10, b'a'), (30, b'c')]);
        rings.write(1, &[(20, b'b'), (40, b'd')]);
        assert_eq!(rings.delivered(u64::MAX), b"abcd");
    }

    /// A program interrupted between taking its time (100) and writing: the
    /// interrupt's record (250) is first in the ring, and both sort at 250,
    /// where they were written. A record another ring wrote at 200 goes
    /// before them: nothing written later on another CPU can have caused it.
    #[test]
    fn a_record_written_late_in_its_ring_sorts_where_it_was_written() {
        let mut rings = Rings::new(2);
        rings.write(0, &[(250, b'x'), (100, b'r')]);
        rings.write(1, &[(200, b'p')]);
        assert_eq!(rings.delivered(u64::MAX), b"pxr");
    }

    /// The failure sorting by a record's own time had: a TLS write's
    /// plaintext, stamped with the call's start (100) but written at its end,
    /// after a reply (105) another program wrote on that CPU meanwhile; the
    /// reply's request arrived at 102 on the other CPU. The request must
    /// still go first.
    #[test]
    fn a_late_stamped_record_does_not_pull_its_ring_ahead_of_causes_elsewhere() {
        let mut rings = Rings::new(2);
        rings.write(0, &[(105, b'y'), (100, b't')]);
        rings.write(1, &[(102, b'q')]);
        assert_eq!(rings.delivered(u64::MAX), b"qyt");
    }

    /// Records keyed after the settle point stay in their ring; a record
    /// written later elsewhere can still go before them.
    #[test]
    fn unsettled_records_wait_for_the_next_read() {
        let mut rings = Rings::new(2);
        rings.write(0, &[(10, b'a'), (50, b'c')]);
        assert_eq!(rings.delivered(40), b"a");
        rings.write(1, &[(45, b'b')]);
        assert_eq!(rings.delivered(60), b"bc");
        assert_eq!(rings.delivered(u64::MAX), b"");
    }

    /// A ring's keys keep rising across reads, also after its earlier
    /// records were handed on.
    #[test]
    fn keys_keep_rising_across_reads() {
        let mut rings = Rings::new(2);
        rings.write(0, &[(50, b'x')]);
        assert_eq!(rings.delivered(60), b"x");
        rings.write(0, &[(40, b'r')]);
        rings.write(1, &[(45, b'p')]);
        assert_eq!(rings.delivered(u64::MAX), b"pr");
    }
}
