//! A real Redis Cluster for tests: nodes with `--cluster-enabled yes`, each
//! with its own `--cluster-config-file` in a fresh directory and its own
//! cluster bus port, slots assigned with `CLUSTER ADDSLOTSRANGE`, joined with
//! `CLUSTER MEET`. Dropping the [`Cluster`] stops the servers and removes the
//! directory.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let cluster = lab::Cluster::start(&["--enable-debug-command", "yes"])?; // 0-8191, 8192-16383
//! let key = lab::cluster::key_in_slots(8192..=16383, "k");
//! // `GET key` on node 0 answers `MOVED <slot> 127.0.0.1:<node 1's port>`.
//! # Ok(()) }
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::RangeInclusive,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, ensure};

use crate::{RedisServer, clients::Place, free_port, netns::Process, scaled, wait_until};

pub const SLOTS: u16 = 16384;

/// One node: its address and slots; the server stops when it drops.
pub struct Node {
    pub addr: SocketAddr,
    pub slots: RangeInclusive<u16>,
    pub cluster_port: u16,
    _server: Server,
}

/// Held only to stop the server on drop.
#[allow(dead_code)]
enum Server {
    Here(RedisServer),
    Lab(Process),
}

/// Nodes of one cluster, and the directory of their `nodes.conf` files.
pub struct Cluster<'a> {
    place: Place<'a>,
    // Nodes drop (stop) before the directory goes.
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl Cluster<'static> {
    /// Two nodes on 127.0.0.1 (free ports), slots 0-8191 and 8192-16383;
    /// returns when both say `cluster_state:ok`. `extra_args` go to every
    /// `redis-server`.
    pub fn start(extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(Place::Here, &[0..=8191, 8192..=16383], extra_args)
    }
}

impl<'a> Cluster<'a> {
    /// One node per slot range. `Place::Here`: on 127.0.0.1, free ports;
    /// `Place::Host(h)`: in lab host `h`, ports 7000, 7001, … (bus 17000, …).
    /// If the ranges cover every slot, returns once every node says
    /// `cluster_state:ok`; otherwise once every node knows all nodes and
    /// slots (the state stays `fail`: commands get `CLUSTERDOWN`).
    pub fn start_with(
        place: Place<'a>,
        slot_ranges: &[RangeInclusive<u16>],
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        ensure!(!slot_ranges.is_empty(), "a cluster needs a node");
        let dir = std::env::temp_dir().join(crate::netns::unique_name("cluster"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cluster = Self {
            place,
            nodes: Vec::new(),
            dir,
        };
        for (index, slots) in slot_ranges.iter().enumerate() {
            ensure!(
                slots.start() <= slots.end() && *slots.end() < SLOTS,
                "slot range {slots:?}"
            );
            // On 127.0.0.1 a port free when chosen can still be taken before
            // the node binds it (the node then exits): a node that does not
            // take its slots is started again on other ports.
            let attempts = match place {
                Place::Here => 3,
                Place::Host(_) => 1,
            };
            let mut attempt = 0;
            let node = loop {
                attempt += 1;
                match cluster.start_node(index, attempt, slots, extra_args) {
                    Err(e) if attempt < attempts => {
                        eprintln!("cluster node {index}, attempt {attempt}: {e:#}");
                    }
                    result => break result?,
                }
            };
            cluster.nodes.push(node);
        }
        let first = cluster.nodes[0].addr;
        for node in &cluster.nodes[1..] {
            let _: String = place.query(
                first,
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg(node.addr.ip().to_string())
                    .arg(node.addr.port())
                    .arg(node.cluster_port),
            )?;
        }
        cluster.wait_converged()?;
        Ok(cluster)
    }

    /// Starts node `index` with `slots` (its `attempt`-th try: a config
    /// file of its own) and gives it its slots.
    fn start_node(
        &self,
        index: usize,
        attempt: u32,
        slots: &RangeInclusive<u16>,
        extra_args: &[&str],
    ) -> anyhow::Result<Node> {
        let cluster_port = match self.place {
            Place::Here => free_port(),
            Place::Host(_) => 17000 + index as u16,
        };
        let config = self.dir.join(format!("nodes-{index}-{attempt}.conf"));
        let cluster_port_arg = cluster_port.to_string();
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            config.to_str().context("non-UTF-8 temp dir")?,
            "--cluster-port",
            &cluster_port_arg,
        ];
        args.extend_from_slice(extra_args);
        let (addr, server) = match self.place {
            Place::Here => {
                let server = RedisServer::start_with(&args)?;
                let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, server.port);
                (addr, Server::Here(server))
            }
            Place::Host(host) => {
                let port = 7000 + index as u16;
                let server = host.start_redis_with(port, &args)?;
                (SocketAddrV4::new(host.ip(), port), Server::Lab(server))
            }
        };
        let addr = SocketAddr::V4(addr);
        let _: String = self.place.query(
            addr,
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(slots.start())
                .arg(slots.end()),
        )?;
        Ok(Node {
            addr,
            slots: slots.clone(),
            cluster_port,
            _server: server,
        })
    }

    fn wait_converged(&self) -> anyhow::Result<()> {
        let assigned: usize = self.nodes.iter().map(|n| n.slots.clone().count()).sum();
        let full = assigned == SLOTS as usize;
        let mut last = String::new();
        let done = wait_until(scaled(Duration::from_secs(20)), || {
            self.nodes.iter().all(|node| {
                let Ok(info) = self.info(node) else {
                    return false;
                };
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                        .map(str::to_string)
                        .unwrap_or_default()
                };
                let ok = field("cluster_known_nodes") == self.nodes.len().to_string()
                    && field("cluster_slots_assigned") == assigned.to_string()
                    && (!full || field("cluster_state") == "ok");
                last = info;
                ok
            })
        });
        ensure!(
            done,
            "cluster of {} nodes did not converge (full coverage: {full}); last CLUSTER INFO:\n{last}",
            self.nodes.len()
        );
        Ok(())
    }

    /// `CLUSTER INFO` of `node`.
    pub fn info(&self, node: &Node) -> anyhow::Result<String> {
        self.place
            .query(node.addr, redis::cmd("CLUSTER").arg("INFO"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// The node serving `slot`.
    pub fn node_for_slot(&self, slot: u16) -> Option<&Node> {
        self.nodes.iter().find(|n| n.slots.contains(&slot))
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster slot of `key`: CRC16 (XMODEM) of the key, or of its first
/// non-empty `{hash tag}`, mod 16384.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// The first key `<prefix>:<n>` whose slot is in `slots`.
pub fn key_in_slots(slots: RangeInclusive<u16>, prefix: &str) -> String {
    (0u64..)
        .map(|n| format!("{prefix}:{n}"))
        .find(|key| slots.contains(&key_slot(key)))
        .expect("some key hashes into any slot range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("{}x"), key_slot("{}x"));
        assert!((8192..=16383).contains(&key_slot(&key_in_slots(8192..=16383, "k"))));
    }
}
