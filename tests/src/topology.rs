//! Hosts as network namespaces behind one router namespace: each host
//! (a pod or a Redis host) has a veth to the router, a /32 address in its
//! zone's subnet (zone `a` = 10.1.0.0/24, `b` = 10.2.0.0/24, …) and a default
//! route via the router, so every pod ↔ host packet crosses the router's
//! FORWARD chain, where faults apply — also within one zone.
//!
//! ```text
//!  pod "client" 10.1.0.2 ──veth── router (10.1.0.1, 10.2.0.1) ──veth── host "redis" 10.2.0.2
//! ```

use std::{
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    cgroup::{CgroupSpec, PodCgroup},
    faults::{self, Fault, FaultGuard, Path},
    netns::{Counters, Netns, Process},
    scaled, wait_until,
};

/// What to build: see [`Lab::builder`].
#[derive(Default)]
pub struct LabBuilder {
    hosts: Vec<(String, char, Option<CgroupSpec>)>,
}

impl LabBuilder {
    /// A pod: a host whose processes run in a kubelet-shaped cgroup
    /// (v2, systemd driver, burstable).
    pub fn pod(self, name: &str, zone: char) -> Self {
        self.pod_with(name, zone, CgroupSpec::default())
    }

    pub fn pod_with(mut self, name: &str, zone: char, cgroup: CgroupSpec) -> Self {
        self.hosts.push((name.into(), zone, Some(cgroup)));
        self
    }

    /// A plain host (e.g. a Redis server): no cgroup of its own.
    pub fn host(mut self, name: &str, zone: char) -> Self {
        self.hosts.push((name.into(), zone, None));
        self
    }

    pub fn build(self) -> anyhow::Result<Lab> {
        let router = Netns::create("router")?;
        for key in ["ip_forward", "conf/all/rp_filter", "conf/default/rp_filter"] {
            router.sysctl(
                &format!("net/ipv4/{key}"),
                if key == "ip_forward" { "1" } else { "0" },
            )?;
        }
        let mut lab = Lab {
            hosts: Vec::new(),
            router,
        };
        for (index, (name, zone, cgroup)) in self.hosts.into_iter().enumerate() {
            ensure!(
                zone.is_ascii_lowercase(),
                "zone {zone:?}: zones are a..z (10.1.0.0/24 ..)"
            );
            ensure!(
                !name.is_empty()
                    && name.len() <= 24
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "host name {name:?}: up to 24 of [a-zA-Z0-9-]"
            );
            ensure!(lab.find(&name).is_none(), "two hosts named {name}");
            let in_zone = lab.hosts.iter().filter(|h| h.zone == zone).count();
            ensure!(in_zone < 250, "zone {zone} is full");
            let subnet = zone as u8 - b'a' + 1;
            let ip = Ipv4Addr::new(10, subnet, 0, 2 + in_zone as u8);
            let gateway = Ipv4Addr::new(10, subnet, 0, 1);
            let netns = Netns::create(&name)?;
            let router_end = format!("h{index}");
            crate::netns::run(Command::new("ip").args([
                "link",
                "add",
                "eth0",
                "netns",
                netns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &router_end,
                "netns",
                lab.router.name(),
            ]))
            .context("creating a veth pair (the kernel needs CONFIG_VETH)")?;
            // gso_max_segs 1: one skb per wire packet, so loss and delay
            // apply per packet, not per 64 KiB GSO super-packet.
            netns.ip_batch(&[
                format!("addr add {ip}/32 dev eth0"),
                "link set eth0 gso_max_segs 1 up".into(),
                format!("route add {gateway}/32 dev eth0 scope link"),
                format!("route add default via {gateway} dev eth0 src {ip}"),
            ])?;
            lab.router.ip_batch(&[
                format!("addr add {gateway}/32 dev {router_end}"),
                format!("link set {router_end} gso_max_segs 1 up"),
                format!("route add {ip}/32 dev {router_end}"),
            ])?;
            let pod = cgroup.map(PodCgroup::create).transpose()?;
            lab.hosts.push(Host {
                name,
                zone,
                ip,
                netns,
                pod,
            });
        }
        Ok(lab)
    }
}

/// A router namespace and the hosts behind it. Dropping it kills every
/// process in its namespaces and cgroups and removes them all.
pub struct Lab {
    // Hosts drop before the router.
    hosts: Vec<Host>,
    router: Netns,
}

impl Lab {
    /// ```no_run
    /// # fn main() -> anyhow::Result<()> {
    /// let lab = lab::Lab::builder().pod("client", 'a').host("redis", 'b').build()?;
    /// let (client, redis) = (lab.host("client"), lab.host("redis"));
    /// let _server = redis.start_redis(6379)?;
    /// let _slow = lab.inject(
    ///     lab::Path::between(client.ip(), redis.ip(), 6379),
    ///     lab::Fault::delay(std::time::Duration::from_millis(2)),
    /// )?;
    /// let out = client.command("redis-cli").args(["-h", &redis.ip().to_string(), "ping"]).output()?;
    /// assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PONG");
    /// # Ok(()) }
    /// ```
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    /// The host named `name`; panics if the lab has none (a test bug).
    pub fn host(&self, name: &str) -> &Host {
        self.find(name)
            .unwrap_or_else(|| panic!("the lab has no host {name:?}"))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn find(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// Applies `fault` to `path` in the router's FORWARD chain, until the
    /// guard drops.
    pub fn inject(&self, path: Path, fault: Fault) -> anyhow::Result<FaultGuard<'_>> {
        faults::apply(Some(&self.router), path, fault)
    }
}

/// A pod or host: a network namespace with one address, and for a pod a
/// kubelet-shaped cgroup its processes run in.
pub struct Host {
    name: String,
    zone: char,
    ip: Ipv4Addr,
    netns: Netns,
    pod: Option<PodCgroup>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn zone(&self) -> char {
        self.zone
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The pod's cgroup (`None` for a plain host).
    pub fn pod(&self) -> Option<&PodCgroup> {
        self.pod.as_ref()
    }

    /// A command that runs in this host's namespace and, for a pod, in its
    /// cgroup from the first instruction on.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = self.netns.command(program);
        if let Some(pod) = &self.pod {
            pod.enter_on_spawn(&mut command);
        }
        command
    }

    /// Spawns `command` (from [`Host::command`]) as a guarded process.
    pub fn spawn(&self, command: &mut Command) -> anyhow::Result<Process> {
        Process::spawn(command)
    }

    /// Runs `f` on a thread in this host's namespace (its sockets are this
    /// host's; the thread stays in the test process's cgroup).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        self.netns.within(f)
    }

    /// This host's TCP/IP counters (`nstat -a` in its namespace).
    pub fn counters(&self) -> anyhow::Result<Counters> {
        self.netns.counters()
    }

    /// A real `redis-server` on `port` of this host, no persistence; returns
    /// once it accepts connections.
    pub fn start_redis(&self, port: u16) -> anyhow::Result<Process> {
        self.start_redis_with(port, &[])
    }

    /// [`Host::start_redis`] with more `redis-server` arguments, e.g.
    /// `["--enable-debug-command", "yes"]`.
    pub fn start_redis_with(&self, port: u16, extra_args: &[&str]) -> anyhow::Result<Process> {
        let mut server = self.spawn(
            self.command("redis-server")
                .args(["--port", &port.to_string(), "--bind", "0.0.0.0"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(extra_args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let addr = SocketAddrV4::new(self.ip, port);
        let mut exited = None;
        let ready = wait_until(scaled(Duration::from_secs(10)), || {
            if let Err(e) = server.ensure_running() {
                exited = Some(e);
                return true;
            }
            self.within(|| TcpStream::connect(addr).is_ok())
                .unwrap_or(false)
        });
        if let Some(e) = exited {
            bail!("redis-server on {addr} in {}: {e:#}", self.netns.name());
        }
        ensure!(
            ready,
            "redis-server did not listen on {addr} in {}",
            self.netns.name()
        );
        Ok(server)
    }
}
