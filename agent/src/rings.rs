//! The kernel's per-CPU event rings, read as one stream in time order.
//!
//! Programs write to their CPU's ring (`EVENTS_<cpu % EVENT_RINGS>`), so the
//! pipeline gets several streams. It needs one in causal order: a request's
//! egress record before its reply's ingress record, which another CPU may
//! write. Every record starts with an [`EventHeader`] whose `ts_ns` the
//! program took before writing it, so the rings are merged by time. Two
//! details make that exact:
//! - within a ring, records are in reservation order, and a program
//!   interrupted between taking its time and reserving lands after the
//!   interrupt's records: a record's merge key is the earliest time of it and
//!   every later record of its ring, which keeps each ring's order and still
//!   puts a record before anything another ring wrote after it;
//! - a record may be on its way (time taken, not yet committed) while the
//!   rings are read: only records older than [`SETTLE_NS`] before the read
//!   are handed on, the rest wait for the next read.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use agent_common::EventHeader;
use aya::maps::{MapData, RingBuf};

/// How long a record can be on its way, from the time its program took to
/// its commit: a program run plus the interrupts it may sit through. Records
/// younger than this at a read wait for the next one.
pub const SETTLE_NS: u64 = 10_000_000;

/// Bytes read from a ring before what was read is handed on.
const BATCH_BYTES: usize = 256 * 1024;

/// Offset of `EventHeader::ts_ns` in every record.
const TS_OFFSET: usize = std::mem::offset_of!(EventHeader, ts_ns);

/// Records read from one ring, not yet handed on.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// (merge key, start, end) in ring order; keys never decrease.
    records: Vec<(u64, usize, usize)>,
    /// Records before this one were handed on.
    next: usize,
}

impl Pending {
    fn head_key(&self) -> Option<u64> {
        self.records.get(self.next).map(|&(key, _, _)| key)
    }

    /// Forgets what was handed on: all of it at once when nothing waits,
    /// else only once it is most of the buffer, so that records waiting to
    /// settle are not moved at every read.
    fn compact(&mut self) {
        if self.next == self.records.len() {
            self.records.clear();
            self.bytes.clear();
            self.next = 0;
            return;
        }
        let from = self.records[self.next].1;
        if from < self.bytes.len() / 2 {
            return;
        }
        self.bytes.drain(..from);
        self.records.drain(..self.next);
        for record in &mut self.records {
            record.1 -= from;
            record.2 -= from;
        }
        self.next = 0;
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

    /// Reads every ring, then hands `deliver` the records older than
    /// `settled_before` (all of them with `u64::MAX`), in time order.
    pub fn drain(
        &mut self,
        settled_before: u64,
        mut deliver: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if let [ring] = self.rings.as_mut_slice() {
            // One ring: its order is the order, nothing to merge.
            while let Some(record) = ring.next() {
                deliver(&record)?;
            }
            return Ok(());
        }
        // In batches that stay in the CPU's cache between copy and use.
        loop {
            let mut bound = settled_before;
            let mut more = false;
            for (index, ring) in self.rings.iter_mut().enumerate() {
                let first_new = self.merge.held(index);
                let mut taken = 0;
                let mut last_ts = 0;
                while taken < BATCH_BYTES
                    && let Some(record) = ring.next()
                {
                    taken += record.len();
                    last_ts = record_ts(&record);
                    self.merge.push(index, &record);
                }
                self.merge.seal(index, first_new);
                if taken >= BATCH_BYTES {
                    // The rest of this ring is no older than its last record
                    // read, but for records on their way meanwhile.
                    more = true;
                    bound = bound.min(last_ts.saturating_sub(SETTLE_NS));
                }
            }
            self.merge.deliver(bound, &mut deliver)?;
            if !more {
                return Ok(());
            }
        }
    }
}

/// Records of several rings put in one order (see the module's text).
struct Merge {
    pending: Vec<Pending>,
}

impl Merge {
    fn new(rings: usize) -> Self {
        Self {
            pending: (0..rings).map(|_| Pending::default()).collect(),
        }
    }

    /// Takes the next record of ring `index`; [`Merge::seal`] after the
    /// last of a read.
    fn push(&mut self, index: usize, record: &[u8]) {
        let pending = &mut self.pending[index];
        let start = pending.bytes.len();
        pending.bytes.extend_from_slice(record);
        pending
            .records
            .push((record_ts(record), start, pending.bytes.len()));
    }

    /// Keys of ring `index` after a read that began with record `first_new`:
    /// the earliest time of a record and all after it. An older record's key
    /// already covers the records up to the new ones: stop at the first that
    /// the new ones do not lower.
    fn seal(&mut self, index: usize, first_new: usize) {
        let pending = &mut self.pending[index];
        let mut earliest = u64::MAX;
        let waiting = pending.records.iter_mut().enumerate().skip(pending.next);
        for (position, record) in waiting.rev() {
            if position < first_new && record.0 <= earliest {
                break;
            }
            earliest = earliest.min(record.0);
            record.0 = earliest;
        }
    }

    /// Records of ring `index` held (for [`Merge::seal`]).
    fn held(&self, index: usize) -> usize {
        self.pending[index].records.len()
    }

    /// Hands on, by key, every record whose key is before `settled_before`.
    fn deliver(
        &mut self,
        settled_before: u64,
        mut deliver: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        loop {
            let mut best: Option<(usize, u64)> = None;
            for (index, pending) in self.pending.iter().enumerate() {
                if let Some(key) = pending.head_key()
                    && key < settled_before
                    && best.is_none_or(|(_, best_key)| key < best_key)
                {
                    best = Some((index, key));
                }
            }
            let Some((index, _)) = best else { break };
            let pending = &mut self.pending[index];
            let (_, start, end) = pending.records[pending.next];
            pending.next += 1;
            if let Err(err) = deliver(&pending.bytes[start..end]) {
                self.pending.iter_mut().for_each(Pending::compact);
                return Err(err);
            }
        }
        self.pending.iter_mut().for_each(Pending::compact);
        Ok(())
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
    use super::*;

    /// A record: a header with `ts` and one byte naming it.
    fn record(ts: u64, name: u8) -> Vec<u8> {
        let mut bytes = vec![0u8; TS_OFFSET];
        bytes.extend_from_slice(&ts.to_ne_bytes());
        bytes.push(name);
        bytes
    }

    fn read(merge: &mut Merge, index: usize, records: &[Vec<u8>]) {
        let first_new = merge.held(index);
        records.iter().for_each(|r| merge.push(index, r));
        merge.seal(index, first_new);
    }

    fn delivered(merge: &mut Merge, settled_before: u64) -> Vec<u8> {
        let mut names = Vec::new();
        merge
            .deliver(settled_before, |r| {
                names.push(*r.last().unwrap());
                Ok(())
            })
            .unwrap();
        names
    }

    #[test]
    fn rings_are_merged_by_time() {
        let mut merge = Merge::new(2);
        read(&mut merge, 0, &[record(10, b'a'), record(30, b'c')]);
        read(&mut merge, 1, &[record(20, b'b'), record(40, b'd')]);
        assert_eq!(delivered(&mut merge, u64::MAX), b"abcd");
    }

    /// A program interrupted between taking its time (100) and writing: the
    /// interrupt's record (250) is first in the ring. A record of another
    /// ring at 200 still goes after both: the late one caused it.
    #[test]
    fn a_record_written_late_in_its_ring_keeps_its_ring_order_and_goes_first() {
        let mut merge = Merge::new(2);
        read(&mut merge, 0, &[record(250, b'x'), record(100, b'r')]);
        read(&mut merge, 1, &[record(200, b'p')]);
        assert_eq!(delivered(&mut merge, u64::MAX), b"xrp");
    }

    /// Records younger than the settle point wait; one read later can
    /// still go before them.
    #[test]
    fn unsettled_records_wait_for_the_next_read() {
        let mut merge = Merge::new(2);
        read(&mut merge, 0, &[record(10, b'a'), record(50, b'c')]);
        assert_eq!(delivered(&mut merge, 40), b"a");
        read(&mut merge, 1, &[record(45, b'b')]);
        assert_eq!(delivered(&mut merge, 60), b"bc");
        assert_eq!(delivered(&mut merge, u64::MAX), b"");
    }

    /// A new record with an earlier time lowers the keys of the ones read
    /// before it in its ring, which then wait with it.
    #[test]
    fn a_late_record_holds_back_the_earlier_ones_of_its_ring() {
        let mut merge = Merge::new(2);
        read(&mut merge, 0, &[record(50, b'x')]);
        read(&mut merge, 1, &[record(45, b'p')]);
        read(&mut merge, 0, &[record(40, b'r')]);
        assert_eq!(delivered(&mut merge, u64::MAX), b"xrp");
    }
}
