//! Packet-level faults on one path, made of iptables rules: in the router
//! namespace's FORWARD chains for pod ↔ host paths ([`crate::Lab::inject`]),
//! or in this host's INPUT chains for loopback paths ([`inject_loopback`]).
//! Every rule carries the comment `resptrace-test:pid=<pid>:<n>` and goes
//! away with its [`FaultGuard`] (or the sweep, after a killed run).

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    RULE_COMMENT,
    delay::{DelayLine, DelaySpec, DelayStats},
    netns::{Netns, next_serial, run},
    scaled, wait_until,
};

/// Which packets of a connection a fault hits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    /// Client → server (SYNs, requests, the client's ACKs).
    #[default]
    ToServer,
    /// Server → client (SYN-ACKs, replies).
    ToClient,
    Both,
}

/// The TCP traffic between a client and a server port. `None` addresses
/// match any (loopback paths match on `lo` and the port only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    pub client: Option<Ipv4Addr>,
    pub server: Option<Ipv4Addr>,
    pub port: u16,
    pub direction: Direction,
}

impl Path {
    /// Client → `server:port` packets (see [`Path::to_client`], [`Path::both_ways`]).
    pub fn between(client: Ipv4Addr, server: Ipv4Addr, port: u16) -> Self {
        Self {
            client: Some(client),
            server: Some(server),
            port,
            direction: Direction::ToServer,
        }
    }

    /// Loopback traffic to `port` on this host.
    pub fn loopback(port: u16) -> Self {
        Self {
            client: None,
            server: None,
            port,
            direction: Direction::ToServer,
        }
    }

    pub fn to_client(self) -> Self {
        Self {
            direction: Direction::ToClient,
            ..self
        }
    }

    pub fn both_ways(self) -> Self {
        Self {
            direction: Direction::Both,
            ..self
        }
    }

    /// iptables matches per direction, and the destination host of each
    /// (the TEE gateway for duplicates).
    fn matches(&self) -> Vec<(Vec<String>, Option<Ipv4Addr>)> {
        let one_way = |src: Option<Ipv4Addr>, dst: Option<Ipv4Addr>, port_flag: &str| {
            let mut spec = vec!["-p".to_string(), "tcp".to_string()];
            if let Some(src) = src {
                spec.extend(["-s".into(), src.to_string()]);
            }
            if let Some(dst) = dst {
                spec.extend(["-d".into(), dst.to_string()]);
            }
            spec.extend([port_flag.to_string(), self.port.to_string()]);
            (spec, dst)
        };
        let to_server = one_way(self.client, self.server, "--dport");
        let to_client = one_way(self.server, self.client, "--sport");
        match self.direction {
            Direction::ToServer => vec![to_server],
            Direction::ToClient => vec![to_client],
            Direction::Both => vec![to_server, to_client],
        }
    }
}

/// What happens to the packets of a [`Path`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Held in a userspace delay line (NFQUEUE): delay, jitter, reordering.
    Delay(DelaySpec),
    /// Each packet dropped with this probability (`statistic --mode random`).
    Loss { probability: f64 },
    /// Each packet sent twice with this probability (`TEE`: the copy goes
    /// straight to the destination host, right behind the original).
    Duplicate { probability: f64 },
    /// SYNs silently dropped (a security group or NACL that says nothing).
    DropSyn,
    /// Answered with a TCP RST (`REJECT --reject-with tcp-reset`): a SYN
    /// gets ECONNREFUSED, data on an open connection ECONNRESET.
    Reset,
    /// Answered with ICMP host unreachable: a connect gets EHOSTUNREACH.
    Unreachable,
}

impl Fault {
    /// A fixed one-way delay.
    pub fn delay(delay: Duration) -> Self {
        Self::Delay(DelaySpec {
            delay,
            ..DelaySpec::default()
        })
    }

    /// `delay ± uniform(jitter)` per packet, order kept.
    pub fn jitter(delay: Duration, jitter: Duration) -> Self {
        Self::Delay(DelaySpec {
            delay,
            jitter,
            ..DelaySpec::default()
        })
    }

    /// With `probability`, a packet is held `extra` and overtaken by later ones.
    pub fn reorder(probability: f64, extra: Duration) -> Self {
        Self::Delay(DelaySpec {
            reorder_probability: probability,
            reorder_extra: extra,
            ..DelaySpec::default()
        })
    }
}

/// One iptables rule, deleted on drop.
struct Rule<'a> {
    netns: Option<&'a Netns>,
    table: &'static str,
    chain: &'static str,
    spec: Vec<String>,
}

impl<'a> Rule<'a> {
    fn insert(
        netns: Option<&'a Netns>,
        table: &'static str,
        chain: &'static str,
        spec: Vec<String>,
    ) -> anyhow::Result<Self> {
        iptables(netns, table, "-I", chain, &spec)?;
        Ok(Self {
            netns,
            table,
            chain,
            spec,
        })
    }
}

impl Drop for Rule<'_> {
    fn drop(&mut self) {
        if let Err(e) = iptables(self.netns, self.table, "-D", self.chain, &self.spec) {
            eprintln!("lab: {e:#}");
        }
    }
}

fn iptables(
    netns: Option<&Netns>,
    table: &str,
    op: &str,
    chain: &str,
    spec: &[String],
) -> anyhow::Result<String> {
    let mut command = match netns {
        Some(netns) => netns.command("iptables"),
        None => Command::new("iptables"),
    };
    command.args(["-w", "-t", table, op, chain]).args(spec);
    run(&mut command).context(
        "iptables (the kernel needs netfilter with the matches and targets the lab uses: \
         comment, statistic, NFQUEUE, REJECT, TEE)",
    )
}

/// An active fault: its rules (and delay line). Dropping it restores the path.
pub struct FaultGuard<'a> {
    netns: Option<&'a Netns>,
    comment: String,
    rules: Vec<Rule<'a>>,
    delay_line: Option<DelayLine>,
}

impl FaultGuard<'_> {
    /// Packets the fault's rules matched so far (iptables counters): for
    /// loss, the packets dropped; for a delay line, the packets it held.
    pub fn packets(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        let tables: std::collections::BTreeSet<(&str, &str)> =
            self.rules.iter().map(|r| (r.table, r.chain)).collect();
        for (table, chain) in tables {
            let listing = iptables(
                self.netns,
                table,
                "-L",
                chain,
                &["-v".into(), "-x".into(), "-n".into()],
            )?;
            let tag = format!("/* {} */", self.comment);
            for line in listing.lines().filter(|l| l.contains(&tag)) {
                let packets = line.split_whitespace().next().unwrap_or_default();
                total += packets
                    .parse::<u64>()
                    .with_context(|| format!("iptables counter in {line:?}"))?;
            }
        }
        Ok(total)
    }

    /// The delay line's own counters, for [`Fault::Delay`].
    pub fn delay_stats(&self) -> Option<&DelayStats> {
        self.delay_line.as_ref().map(DelayLine::stats)
    }

    /// The rule comment, e.g. `resptrace-test:pid=4242:7`.
    pub fn comment(&self) -> &str {
        &self.comment
    }
}

impl Drop for FaultGuard<'_> {
    fn drop(&mut self) {
        // Rules first: a packet queued to a delay line that is gone is dropped.
        self.rules.clear();
        drop(self.delay_line.take());
    }
}

/// Applies `fault` on this host's loopback (`lo`), INPUT side: a packet
/// dropped there looks to the sender like one lost on the wire.
pub fn inject_loopback(path: Path, fault: Fault) -> anyhow::Result<FaultGuard<'static>> {
    crate::sweep::sweep_once();
    ensure!(
        path.client.is_none() && path.server.is_none(),
        "loopback paths match by port only (use Path::loopback)"
    );
    apply(None, path, fault)
}

/// Where the rules of a fault go: the router's FORWARD, or the host's INPUT.
pub(crate) fn apply(
    netns: Option<&Netns>,
    path: Path,
    fault: Fault,
) -> anyhow::Result<FaultGuard<'_>> {
    let chain = if netns.is_some() { "FORWARD" } else { "INPUT" };
    let comment = format!(
        "{RULE_COMMENT}:pid={}:{}",
        std::process::id(),
        next_serial()
    );
    let mut guard = FaultGuard {
        netns,
        comment: comment.clone(),
        rules: Vec::new(),
        delay_line: None,
    };
    let tagged = |mut spec: Vec<String>, target: &[&str]| {
        if netns.is_none() {
            spec.splice(0..0, ["-i".to_string(), "lo".to_string()]);
        }
        spec.extend(["-m", "comment", "--comment", &comment].map(String::from));
        spec.extend(target.iter().map(|s| s.to_string()));
        spec
    };
    let random = |probability: f64| -> anyhow::Result<Vec<String>> {
        ensure!(
            (0.0..=1.0).contains(&probability),
            "probability {probability} not in 0..=1"
        );
        Ok(["-m", "statistic", "--mode", "random", "--probability"]
            .into_iter()
            .map(String::from)
            .chain([format!("{probability}")])
            .collect())
    };
    match fault {
        Fault::Delay(spec) => {
            // Router namespaces are the lab's own: their queue numbers start at 0.
            // On the host, other test processes' delay lines may hold numbers.
            let first_queue = match netns {
                Some(_) => 0,
                None => 10_000 + (std::process::id() % 50_000) as u16,
            };
            let line = DelayLine::start(netns, first_queue, spec)?;
            let queue = line.queue_num().to_string();
            guard.delay_line = Some(line);
            // mangle runs before filter: a delayed packet still meets loss rules.
            for (matches, _) in path.matches() {
                let spec = tagged(matches, &["-j", "NFQUEUE", "--queue-num", &queue]);
                guard
                    .rules
                    .push(Rule::insert(netns, "mangle", chain, spec)?);
            }
        }
        Fault::Loss { probability } => {
            for (mut matches, _) in path.matches() {
                matches.extend(random(probability)?);
                let spec = tagged(matches, &["-j", "DROP"]);
                guard
                    .rules
                    .push(Rule::insert(netns, "filter", chain, spec)?);
            }
        }
        Fault::Duplicate { probability } => {
            for (mut matches, destination) in path.matches() {
                let gateway = destination.unwrap_or(Ipv4Addr::LOCALHOST).to_string();
                matches.extend(random(probability)?);
                let spec = tagged(matches, &["-j", "TEE", "--gateway", &gateway]);
                guard
                    .rules
                    .push(Rule::insert(netns, "mangle", chain, spec)?);
            }
        }
        Fault::DropSyn | Fault::Reset | Fault::Unreachable => {
            if path.direction != Direction::ToServer {
                bail!("{fault:?} applies to packets towards the server only");
            }
            let (mut matches, _) = path.matches().remove(0);
            let target: &[&str] = match fault {
                Fault::DropSyn => {
                    matches.push("--syn".into());
                    &["-j", "DROP"]
                }
                Fault::Reset => &["-j", "REJECT", "--reject-with", "tcp-reset"],
                _ => &["-j", "REJECT", "--reject-with", "icmp-host-unreachable"],
            };
            let spec = tagged(matches, target);
            guard
                .rules
                .push(Rule::insert(netns, "filter", chain, spec)?);
        }
    }
    Ok(guard)
}

/// A listener with backlog 1 that never accepts, its accept queue already
/// full (2 connections: the kernel queues backlog + 1): every further SYN is
/// dropped (`ListenOverflows`/`ListenDrops` on the server, SYN retransmits on
/// the client), as on an overloaded Redis.
pub struct FullListener {
    pub addr: SocketAddrV4,
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

impl FullListener {
    const BACKLOG: i32 = 1;

    /// Listens on `addr` inside `netns` and fills the accept queue from there.
    pub fn start(netns: &Netns, addr: SocketAddrV4) -> anyhow::Result<Self> {
        let (listener, fillers) = netns.within(|| -> anyhow::Result<_> {
            use socket2::{Domain, Socket, Type};
            let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            listener.set_reuse_address(true)?;
            listener
                .bind(&addr.into())
                .with_context(|| format!("binding {addr}"))?;
            listener.listen(Self::BACKLOG)?;
            let fillers = (0..=Self::BACKLOG)
                .map(|_| TcpStream::connect_timeout(&addr.into(), scaled(Duration::from_secs(5))))
                .collect::<Result<Vec<_>, _>>()
                .context("filling the accept queue")?;
            Ok((listener, fillers))
        })??;
        let this = Self {
            addr,
            _listener: listener,
            _fillers: fillers,
        };
        let full = wait_until(scaled(Duration::from_secs(5)), || {
            this.accept_queue(netns).ok() == Some(Self::BACKLOG as u32 + 1)
        });
        ensure!(
            full,
            "accept queue of {addr} did not fill: {:?}",
            this.accept_queue(netns)
        );
        Ok(this)
    }

    /// Connections waiting in the accept queue, as `ss -ltn` reports (Recv-Q).
    pub fn accept_queue(&self, netns: &Netns) -> anyhow::Result<u32> {
        let out = run(netns
            .command("ss")
            .args(["-Hltn", &format!("sport = :{}", self.addr.port())]))?;
        let line = out.lines().next().context("ss lists no listener")?;
        line.split_whitespace()
            .nth(1)
            .and_then(|q| q.parse().ok())
            .with_context(|| format!("Recv-Q in {line:?}"))
    }
}
