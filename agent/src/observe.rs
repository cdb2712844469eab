//! Observe: pipeline events → the detectors' typed observations. Keeps the
//! one piece of state that needs: each open connection's retransmit count
//! when last seen, so detectors get deltas.

use std::net::SocketAddr;

use agent_common::{ConnectionRole, ConnectionState, FlowTuple};
use rustc_hash::FxHashMap;

use crate::{
    decode::{Close, Connect, normalize_ip},
    detect::Observation,
    enrich::Enricher,
    gauges::Gauge,
    tracker::{Exchange, Outcome},
    workload::Workload,
    zones::Zones,
};

/// (client, server) of a connection.
type ConnectionKey = (SocketAddr, SocketAddr);

/// Open connections whose retransmit baseline is kept at most; beyond, new
/// connections are reported from their close only.
const MAX_TRACKED_CONNECTIONS: usize = 65_536;

#[derive(Default)]
pub struct Observer {
    retransmits_seen: FxHashMap<ConnectionKey, u32>,
}

impl Observer {
    pub fn connect(connect: &Connect, workload: Workload) -> Observation {
        Observation::Connect {
            ts_ns: connect.ts_ns,
            workload,
            endpoint: connect.dst,
            outcome: connect.outcome,
            answer: connect.answer,
            syn_retransmits: connect.syn_retransmits,
            duration_ns: connect.duration_ns,
        }
    }

    /// A client-side request and how it ended.
    pub fn request(exchange: &Exchange, workload: Workload, zones: &Zones) -> Observation {
        Observation::Request {
            ts_ns: exchange.ts_ns,
            workload,
            endpoint: exchange.server,
            command: exchange.command,
            latency_ns: exchange.latency_ns,
            error: match exchange.outcome {
                Outcome::Error(prefix) => Some(prefix.to_string().into()),
                _ => None,
            },
            timeout: exchange.outcome == Outcome::Timeout,
            locality: zones.locality_between(exchange.client.ip(), exchange.server.ip()),
        }
    }

    /// The retransmits a closed connection made since it was last seen.
    pub fn close(&mut self, close: &Close, workload: Workload) -> Option<Observation> {
        let seen = self
            .retransmits_seen
            .remove(&(close.client, close.server))
            .unwrap_or(0);
        let count = close.counters.retransmits.saturating_sub(seen);
        (count > 0).then(|| Observation::Retransmits {
            ts_ns: close.ts_ns,
            workload,
            endpoint: close.server,
            count: u64::from(count),
        })
    }

    /// From a read of the kernel's connection map: retransmit deltas per
    /// (workload, endpoint), and the open-connection gauges of client
    /// workloads.
    pub fn connections(
        &mut self,
        now_ns: u64,
        entries: &[(FlowTuple, ConnectionState)],
        gauges: &[Gauge],
        enricher: &mut Enricher,
        observations: &mut Vec<Observation>,
    ) {
        let mut deltas: FxHashMap<(u64, SocketAddr), u64> = FxHashMap::default();
        for (flow, state) in entries {
            let local = SocketAddr::new(normalize_ip(flow.saddr), flow.sport);
            let remote = SocketAddr::new(normalize_ip(flow.daddr), flow.dport);
            let (key, cgroup_id) = match ConnectionRole::from_u8(state.role) {
                Some(ConnectionRole::Client) => ((local, remote), state.task.cgroup_id),
                Some(ConnectionRole::Server) => ((remote, local), 0),
                None => continue,
            };
            let now = state.counters.retransmits;
            let known = self.retransmits_seen.len() < MAX_TRACKED_CONNECTIONS
                || self.retransmits_seen.contains_key(&key);
            if !known {
                continue;
            }
            let before = self.retransmits_seen.insert(key, now).unwrap_or(0);
            if now > before {
                *deltas.entry((cgroup_id, key.1)).or_default() += u64::from(now - before);
            }
        }
        for ((cgroup_id, endpoint), count) in deltas {
            observations.push(Observation::Retransmits {
                ts_ns: now_ns,
                workload: enricher.workload_of_cgroup(cgroup_id),
                endpoint,
                count,
            });
        }
        for gauge in gauges.iter().filter(|g| g.key.role == "client") {
            observations.push(Observation::OpenConnections {
                ts_ns: now_ns,
                workload: Workload::new(gauge.cgroup.as_deref(), gauge.comm.as_deref()),
                endpoint: gauge.key.server,
                open: gauge.open,
            });
        }
    }
}
