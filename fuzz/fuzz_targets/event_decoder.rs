//! The decoder of ring-buffer records (`agent::decode`) and what the agent
//! does with them next (`agent::run::Pipeline::record`): payload records go
//! to the RESP tracker (TCP reordering, reassembly of split segments, one
//! matcher per socket), application reads and socket ends too.
//!
//! Input: records, each a little-endian u16 length and that many bytes
//! (fewer if the input ends). `cargo xtask fuzz --capture` writes real
//! connections as the kernel programs would record them.

#![no_main]

use std::mem::size_of;
use std::time::Duration;

use agent::decode::{self, Event};
use agent::tracker::Tracker;
use agent_common::resp::{SegmentEvent, SocketEvent};
use agent_common::{CloseEvent, ConnectEvent, SynAckRetransmitEvent, resp::CHUNK_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tracker = Tracker::default();
    let mut exchanges = Vec::new();
    let mut rest = data;
    let mut latest = 0u64;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let (record, tail) = rest[2..].split_at(len.min(rest.len() - 2));
        rest = tail;
        match decode::segment(record) {
            Some(Ok(segment)) => {
                // Only what fits is accepted, and the payload is the bytes
                // after the fixed part, never beyond the record.
                let head = size_of::<SegmentEvent>();
                assert!(segment.data.len() <= CHUNK_BYTES);
                assert_eq!(segment.data, &record[head..head + segment.data.len()]);
                latest = latest.max(segment.ts_ns);
                tracker.segment(&segment, &mut exchanges);
                continue;
            }
            Some(Err(_)) => continue,
            None => {}
        }
        let Ok(event) = decode::decode(record) else {
            continue;
        };
        let expected = match &event {
            Event::Connect(_) => size_of::<ConnectEvent>(),
            Event::Close(_) => size_of::<CloseEvent>(),
            Event::SynAckRetransmit(_) => size_of::<SynAckRetransmitEvent>(),
            Event::AppRead { .. } | Event::SocketGone { .. } => size_of::<SocketEvent>(),
        };
        assert_eq!(record.len(), expected, "{event:?}");
        match event {
            Event::AppRead { ts_ns, cookie } => {
                latest = latest.max(ts_ns);
                tracker.app_read(cookie, ts_ns, &mut exchanges)
            }
            Event::SocketGone { ts_ns, cookie } => {
                latest = latest.max(ts_ns);
                tracker.socket_gone(cookie, ts_ns, &mut exchanges)
            }
            _ => {}
        }
    }
    // The agent's periodic upkeep, late enough that every hole is given up.
    tracker.tick(
        latest.saturating_add(30_000_000_000),
        Duration::from_secs(1),
        &mut exchanges,
    );
    tracker.flush(&mut exchanges);
    let _ = tracker.stats();
});
