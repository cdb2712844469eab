//! Userspace half of `agent-ebpf/src/connection.rs`: seeding the kernel's
//! connection map with connections open before the agent started, and
//! reading it for the open-connection gauges.

use std::{net::SocketAddr, path::Path};

use agent_common::{
    AF_INET, AF_INET6, COMM_LEN, CONNECTION_RETRANSMITS_BASE_UNKNOWN, CONNECTION_SEEDED, Closer,
    ConnectionCounters, ConnectionRole, ConnectionState, FlowTuple, TaskInfo,
};

use crate::procfs;

/// The cgroup v2 id of the root cgroup.
const ROOT_CGROUP_ID: u64 = 1;

/// An already open connection to or from a watched port, keyed as the
/// tracepoints will see it.
pub fn seeds(
    ports: &[u16],
    cgroup2: Option<&Path>,
    now_ns: u64,
) -> Vec<(FlowTuple, ConnectionState)> {
    procfs::established_sockets()
        .into_iter()
        .filter_map(|(socket, owner)| {
            let role = if ports.contains(&socket.remote.port()) {
                ConnectionRole::Client
            } else if ports.contains(&socket.local.port()) {
                ConnectionRole::Server
            } else {
                return None;
            };
            let flow = FlowTuple {
                saddr: tracepoint_addr(socket.local),
                daddr: tracepoint_addr(socket.remote),
                sport: socket.local.port(),
                dport: socket.remote.port(),
            };
            let state = ConnectionState {
                task: owner
                    .map(|pid| task_info(pid, cgroup2))
                    .unwrap_or(TaskInfo {
                        cgroup_id: 0,
                        pid: 0,
                        tid: 0,
                        comm: [0; COMM_LEN],
                    }),
                established_ns: now_ns,
                counters: ConnectionCounters::default(),
                family: if socket.ipv6 { AF_INET6 } else { AF_INET },
                role: role as u8,
                closer: Closer::Unknown as u8,
                // Its retransmits before the agent are not counted.
                flags: CONNECTION_SEEDED | CONNECTION_RETRANSMITS_BASE_UNKNOWN,
                _pad: [0; 3],
            };
            Some((flow, state))
        })
        .collect()
}

/// IPv4 as the tracepoints store it: IPv4-mapped IPv6.
fn tracepoint_addr(addr: SocketAddr) -> [u8; 16] {
    match addr {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(v6) => v6.ip().octets(),
    }
}

fn task_info(pid: u32, cgroup2: Option<&Path>) -> TaskInfo {
    let mut comm = [0u8; COMM_LEN];
    if let Some(name) = procfs::process_comm(pid) {
        let len = name.len().min(COMM_LEN - 1);
        comm[..len].copy_from_slice(&name.as_bytes()[..len]);
    }
    TaskInfo {
        cgroup_id: match cgroup2 {
            Some(root) => procfs::process_cgroup_id(pid, root).unwrap_or(0),
            // What BPF reports for every process on a cgroup-v1-only node.
            None => ROOT_CGROUP_ID,
        },
        pid,
        tid: pid,
        comm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_are_mapped_like_the_tracepoints_store_them() {
        let key = tracepoint_addr("10.0.1.5:40312".parse().unwrap());
        assert_eq!(key[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(key[12..], [10, 0, 1, 5]);
    }
}
