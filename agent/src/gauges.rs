//! Open-connection gauges per (role, cgroup, Redis endpoint), from the
//! kernel's connection map: pool growth and churn, visible per workload.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use agent_common::{ConnectionRole, ConnectionState, FlowTuple};

use crate::decode::normalize_ip;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GaugeKey {
    /// `client`: connections a workload holds to a Redis endpoint;
    /// `server`: connections a local Redis holds (cgroup unknown, 0).
    pub role: &'static str,
    pub cgroup_id: u64,
    pub server: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gauge {
    pub key: GaugeKey,
    /// A process name seen in the group (client role).
    pub comm: Option<String>,
    /// The group's cgroup path (filled in by `enrich`).
    pub cgroup: Option<String>,
    pub open: u64,
}

/// Gauges for `entries`, plus a zero for every group of `previous` that
/// has no open connection any more (so a dashboard sees it drop to 0).
pub fn open_connection_gauges(
    entries: &[(FlowTuple, ConnectionState)],
    previous: &BTreeSet<GaugeKey>,
) -> Vec<Gauge> {
    let mut groups: BTreeMap<GaugeKey, Gauge> = BTreeMap::new();
    for (flow, state) in entries {
        let local = SocketAddr::new(normalize_ip(flow.saddr), flow.sport);
        let remote = SocketAddr::new(normalize_ip(flow.daddr), flow.dport);
        let key = match ConnectionRole::from_u8(state.role) {
            Some(ConnectionRole::Client) => GaugeKey {
                role: "client",
                cgroup_id: state.task.cgroup_id,
                server: remote,
            },
            Some(ConnectionRole::Server) => GaugeKey {
                role: "server",
                cgroup_id: 0,
                server: local,
            },
            None => continue,
        };
        let comm = (key.role == "client" && state.task.pid != 0).then(|| {
            let end = state
                .task
                .comm
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(state.task.comm.len());
            String::from_utf8_lossy(&state.task.comm[..end]).into_owned()
        });
        let gauge = groups.entry(key.clone()).or_insert(Gauge {
            key,
            comm: None,
            cgroup: None,
            open: 0,
        });
        gauge.open += 1;
        if gauge.comm.is_none() {
            gauge.comm = comm;
        }
    }
    for key in previous {
        groups.entry(key.clone()).or_insert(Gauge {
            key: key.clone(),
            comm: None,
            cgroup: None,
            open: 0,
        });
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{AF_INET, Closer, ConnectionCounters, TaskInfo};

    fn entry(sport: u16, cgroup_id: u64, role: ConnectionRole) -> (FlowTuple, ConnectionState) {
        let mapped = |last: u8| {
            let mut a = [0u8; 16];
            a[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, last]);
            a
        };
        let (saddr, daddr, sport, dport) = match role {
            ConnectionRole::Client => (mapped(5), mapped(9), sport, 6379),
            ConnectionRole::Server => (mapped(9), mapped(5), 6379, sport),
        };
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"java");
        let state = ConnectionState {
            task: TaskInfo {
                cgroup_id,
                pid: 7,
                tid: 7,
                comm,
            },
            established_ns: 0,
            counters: ConnectionCounters::default(),
            family: AF_INET,
            role: role as u8,
            closer: Closer::Unknown as u8,
            flags: 0,
            _pad: [0; 3],
        };
        (
            FlowTuple {
                saddr,
                daddr,
                sport,
                dport,
            },
            state,
        )
    }

    #[test]
    fn groups_by_role_cgroup_and_endpoint_and_reports_vanished_groups_as_zero() {
        let entries = vec![
            entry(40000, 11, ConnectionRole::Client),
            entry(40001, 11, ConnectionRole::Client),
            entry(40002, 12, ConnectionRole::Client),
            entry(40000, 0, ConnectionRole::Server),
        ];
        let gone = GaugeKey {
            role: "client",
            cgroup_id: 99,
            server: "10.0.0.9:6379".parse().unwrap(),
        };
        let gauges = open_connection_gauges(&entries, &BTreeSet::from([gone.clone()]));
        let open = |role: &str, cgroup_id: u64| {
            gauges
                .iter()
                .find(|g| g.key.role == role && g.key.cgroup_id == cgroup_id)
                .map(|g| g.open)
        };
        assert_eq!(open("client", 11), Some(2));
        assert_eq!(open("client", 12), Some(1));
        assert_eq!(open("server", 0), Some(1));
        assert_eq!(open("client", 99), Some(0));
        assert_eq!(gauges.len(), 4);
        let client = gauges.iter().find(|g| g.key.cgroup_id == 11).unwrap();
        assert_eq!(
            client.key.server,
            "10.0.0.9:6379".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(client.comm.as_deref(), Some("java"));
    }
}
