//! The DaemonSet's capabilities (`lab::deploy::AGENT_CAPABILITIES`, which
//! `tests/deploy.rs` checks against the rendered manifest), proven on this
//! kernel with the agent run as the DaemonSet runs it: uid 0 with every other
//! capability gone (`setpriv`, as containerd sets up a container: bounding,
//! permitted and effective sets equal to the added ones, none inheritable or
//! ambient, no_new_privs), in a pod cgroup of its own, in a cgroup namespace
//! and a mount namespace whose `/sys/fs/cgroup` is that namespace's own, and
//! the host's cgroup2 tree mounted elsewhere and named by `--cgroup-root`.
//!
//! - With the set, it attaches every program a full root run attaches, and
//!   names another pod's connects and requests by the host's cgroup paths.
//! - Without any one of them, the kernel refuses and the agent's one error
//!   line names the missing capability.
//!
//! On kernels before 5.11 (Amazon Linux 2: 5.10, cgroup v1) the same for
//! `deploy/overlays/amazon-linux-2`: its set, no cgroup namespace (cgroup v1
//! gives containers none) and no `--cgroup-root` (the agent mounts its own).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use lab::{
    Agent, CgroupSpec, Lab, PodCgroup, agent_binary, agent_start_timeout,
    deploy::{AGENT_CAPABILITIES, AMAZON_LINUX_2_CAPABILITIES},
    event_timeout, free_port, serial, wait_until,
};

/// Which of the manifests this kernel is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    /// `deploy/`: cgroup v2, Linux 5.11+ (Amazon Linux 2023, Bottlerocket).
    Base,
    /// `deploy/overlays/amazon-linux-2`: Linux 5.10, cgroup v1.
    AmazonLinux2,
}

impl Node {
    fn here() -> Self {
        if lab::kernel::release().unwrap() < (5, 11) {
            Node::AmazonLinux2
        } else {
            Node::Base
        }
    }

    fn capabilities(self) -> &'static [&'static str] {
        match self {
            Node::Base => AGENT_CAPABILITIES,
            Node::AmazonLinux2 => AMAZON_LINUX_2_CAPABILITIES,
        }
    }

    fn pod_spec(self) -> CgroupSpec {
        match self {
            Node::Base => CgroupSpec::default(),
            Node::AmazonLinux2 => CgroupSpec::v1_host(),
        }
    }
}
use serde_json::Value;

/// Capability numbers (linux/capability.h) of the names the manifest uses.
fn capability_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} has no number here"),
    }
}

/// What the container runtime does before the agent starts, as a command
/// that ends by exec-ing the arguments appended to it (the agent and its
/// flags): enter `pod`'s cgroup, unshare the cgroup and mount namespaces,
/// bind the host's cgroup2 tree (`/sys/fs/cgroup`, or `…/unified` on a
/// hybrid host) at `host_cgroup` (the DaemonSet's hostPath mount), mount
/// the namespace's own cgroup2 over /sys/fs/cgroup (what a container sees
/// there; on a tmpfs first: the kernel refuses a cgroup2 mount right on top
/// of the host's, EBUSY), keep only `capabilities`.
fn as_in_a_container(
    node: Node,
    pod: &PodCgroup,
    host_cgroup: &Path,
    capabilities: &[&str],
) -> Command {
    let bounding: String = std::iter::once("-all".to_owned())
        .chain(
            capabilities
                .iter()
                .map(|c| format!("+{}", c.to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let setpriv = format!(
        "exec setpriv --inh-caps=-all --ambient-caps=-all --bounding-set={bounding} --no-new-privs \"$@\""
    );
    let mut command = Command::new("unshare");
    match node {
        Node::Base => {
            let script = format!(
                "set -e
mount --bind \"$CGROUP2\" \"$HOST_CGROUP\"
mount -t tmpfs tmpfs /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
{setpriv}"
            );
            command
                .args(["--cgroup", "--mount", "--propagation", "private"])
                .args(["sh", "-c"])
                .arg(script)
                .arg("sh")
                .arg(agent_binary())
                .arg(format!("--cgroup-root={}", host_cgroup.display()))
                .env("HOST_CGROUP", host_cgroup)
                .env(
                    "CGROUP2",
                    lab::cgroup::cgroup2_mount().expect("a cgroup2 mount"),
                );
        }
        Node::AmazonLinux2 => {
            command
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(setpriv)
                .arg("sh")
                .arg(agent_binary());
        }
    }
    command.env("NODE_NAME", "ip-10-0-1-5.ec2.internal");
    pod.enter_on_spawn(&mut command);
    command
}

/// A directory for the host cgroup2 bind mount (in the agent's private
/// mount namespace only), removed on drop.
struct MountPoint(PathBuf);

impl MountPoint {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "resptrace-caps-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The agent's resident memory and its BPF maps' (the `memlock` of its map
/// fds: what Linux 5.11+ charges to its memory cgroup), in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let rss_kib: f64 = status_field(pid, "VmRSS:")
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    let mut maps_bytes = 0u64;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if info.lines().any(|l| l.starts_with("map_type:")) {
            maps_bytes += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (rss_kib / 1024.0, maps_bytes as f64 / (1024.0 * 1024.0))
}

/// `kernel.perf_event_paranoid`, set for a test and restored on drop.
struct PerfParanoid {
    was: String,
}

const PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

impl PerfParanoid {
    fn level() -> i32 {
        std::fs::read_to_string(PARANOID)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn set(level: i32) -> Self {
        let was = std::fs::read_to_string(PARANOID).unwrap();
        std::fs::write(PARANOID, level.to_string()).unwrap();
        Self { was }
    }
}

impl Drop for PerfParanoid {
    fn drop(&mut self) {
        let _ = std::fs::write(PARANOID, self.was.trim());
    }
}

/// Runs `command` with the agent's flags until it exits on its own, or
/// kills it once it has outlived the start timeout: whether it exited, and
/// its output.
fn run_to_exit(mut command: Command, port: u16) -> (bool, std::process::Output) {
    let mut child = command
        .args(["--ports", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(agent_start_timeout(), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    (exited, child.wait_with_output().unwrap())
}

/// On kernels whose `perf_event_paranoid` is above 2 and means it (Debian's
/// and Ubuntu's level 3: only CAP_SYS_ADMIN may open perf events), the set
/// cannot attach tracepoints: the agent must say so and why; then the level
/// is set to 2 (the node setting docs/deploy-eks.md asks for) for the rest.
fn lower_perf_paranoid(node: Node, port: u16) -> Option<PerfParanoid> {
    let level = PerfParanoid::level();
    if level <= 2 || node.capabilities().contains(&"SYS_ADMIN") {
        return None;
    }
    let pod = PodCgroup::create(node.pod_spec()).unwrap();
    let host_cgroup = MountPoint::new();
    let (exited, output) = run_to_exit(
        as_in_a_container(node, &pod, &host_cgroup.0, node.capabilities()),
        port,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("perf_event_paranoid {level}: {}", stderr.trim_end());
    if exited && stderr.contains(&format!("kernel.perf_event_paranoid is {level}: ")) {
        // This kernel restricts level 3: the node setting lifts it.
        return Some(PerfParanoid::set(2));
    }
    // A mainline kernel treats levels above 2 as 2: the set must then work.
    assert!(!exited, "exited at perf_event_paranoid {level}: {stderr}");
    None
}

fn sorted_tracepoints(started: &Value) -> Vec<String> {
    let mut list: Vec<String> = started["tracepoints"]
        .as_array()
        .expect("tracepoints in started")
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    list.sort();
    list
}

#[test]
fn the_daemonsets_capabilities_attach_everything_in_a_container() -> anyhow::Result<()> {
    let node = Node::here();
    if node == Node::Base && lab::cgroup::cgroup2_mount().is_err() {
        eprintln!("skipped: Linux 5.11+ without a cgroup2 mount matches no manifest");
        return Ok(());
    }
    let capabilities = node.capabilities();
    eprintln!("{node:?}: {capabilities:?}");
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder()
        .pod_with("client", 'a', node.pod_spec())
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _redis = redis.start_redis(port)?;

    let _paranoid = lower_perf_paranoid(node, port);

    // What a full root run attaches here.
    let full = Agent::start(&[port], &[])?;
    let as_root = sorted_tracepoints(full.started());
    full.stop()?;

    let agent_pod = PodCgroup::create(node.pod_spec())?;
    let host_cgroup = MountPoint::new();
    let mut agent = Agent::start_command(
        as_in_a_container(node, &agent_pod, &host_cgroup.0, capabilities),
        &[port],
        &["--emit", "all"],
    )?;

    // Ground truth from the kernel: the agent runs with exactly the set.
    let pid = agent.pid();
    let expected: u64 = capabilities
        .iter()
        .map(|c| 1u64 << capability_number(c))
        .sum();
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let value = u64::from_str_radix(&status_field(pid, set), 16)?;
        assert_eq!(value, expected, "{set} {value:x}, expected {expected:x}");
    }
    for set in ["CapInh:", "CapAmb:"] {
        assert_eq!(
            u64::from_str_radix(&status_field(pid, set), 16)?,
            0,
            "{set}"
        );
    }
    assert!(status_field(pid, "Uid:").starts_with("0\t"), "uid 0");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    // In its pod's cgroup (Base: the root of its cgroup namespace, seen
    // from here; Amazon Linux 2: the pod's v1 cgroups).
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    assert!(own.contains(agent_pod.path()), "{own}");

    let attached = sorted_tracepoints(agent.started());
    assert_eq!(attached, as_root, "the same programs as root");
    assert!(
        attached.iter().any(|t| t.starts_with("cgroup_skb/")),
        "{attached:?}"
    );
    eprintln!("attached with {capabilities:?}: {attached:?}");

    // Another pod's connect and request (a process in the pod's cgroup),
    // named by the host's cgroup tree although its /proc/<pid>/cgroup reads
    // `/../…` from the agent's namespace.
    let pod = client.pod().expect("a pod");
    let cli = client.spawn(
        client
            .command("redis-cli")
            .args([
                "-h",
                &redis.ip().to_string(),
                "-p",
                &port.to_string(),
                // Twice, 1 s apart: on cgroup-v1 nodes the agent reads the
                // client's cgroup from /proc/<pid>/cgroup, which needs it
                // still running when its connect event is read (a process
                // gone by then keeps its pid and comm only: docs/kernels.md).
                "-r",
                "2",
                "-i",
                "1",
                "PING",
            ])
            .stdout(Stdio::piped()),
    )?;
    let cli_pid = cli.pid();
    let output = cli.wait_with_output()?;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "PONG\nPONG");
    let client_ip = client.ip().to_string();
    let connect = agent.wait_for(event_timeout(), |e| {
        e["type"] == "connect" && e["dst"]["port"] == port && e["src"]["ip"] == client_ip
    })?;
    assert_eq!(connect["outcome"], "established", "{connect}");
    assert_eq!(connect["src"]["pid"], cli_pid, "{connect}");
    assert_eq!(connect["src"]["cgroup"], pod.path(), "{connect}");
    assert_eq!(connect["src"]["pod_uid"], pod.uid(), "{connect}");
    assert_eq!(connect["node"], "ip-10-0-1-5.ec2.internal", "{connect}");
    let request = agent.wait_for(event_timeout(), |e| {
        e["type"] == "request"
            && e["role"] == "client"
            && e["src"]["ip"] == client_ip
            && e["command"] == "PING"
    })?;
    assert_eq!(request["outcome"], "ok", "{request}");
    if node == Node::Base {
        // On cgroup v1 every socket is in the v2 root: the pod comes from
        // the process (connect, close), not from the socket.
        assert_eq!(request["cgroup"], pod.path(), "{request}");
    }

    // The figures behind the DaemonSet's memory request and limit.
    let (rss, maps) = memory_mib(pid);
    eprintln!("agent as in the DaemonSet: RSS {rss:.1} MiB, BPF maps {maps:.1} MiB");
    assert!(
        maps > 8.0,
        "the 8 MiB ring buffer is among the maps: {maps:.1} MiB"
    );
    agent.stop()?;
    Ok(())
}

/// Each capability of the set is needed: without it the kernel refuses
/// (the error carries its EPERM) and the one error line names what is missing.
#[test]
fn without_any_one_capability_the_agent_names_it() -> anyhow::Result<()> {
    let node = Node::here();
    if node == Node::Base && lab::cgroup::cgroup2_mount().is_err() {
        eprintln!("skipped: Linux 5.11+ without a cgroup2 mount matches no manifest");
        return Ok(());
    }
    let _serial = serial();
    let port = free_port();
    let _paranoid = lower_perf_paranoid(node, port);
    for missing in node.capabilities() {
        let rest: Vec<&str> = node
            .capabilities()
            .iter()
            .copied()
            .filter(|c| c != missing)
            .collect();
        let agent_pod = PodCgroup::create(node.pod_spec())?;
        let host_cgroup = MountPoint::new();
        // It must exit on its own; one that attached would run until killed.
        let (exited, output) = run_to_exit(
            as_in_a_container(node, &agent_pod, &host_cgroup.0, &rest),
            port,
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("without CAP_{missing}: {}", stderr.trim_end());
        assert!(exited, "started without CAP_{missing}: {stderr}");
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(output.stdout.is_empty(), "no started line");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("resptrace: error: "))
            .unwrap_or_else(|| panic!("an error line: {stderr}"));
        assert!(
            line.contains(&format!("CAP_{missing}")),
            "names CAP_{missing}: {line}"
        );
        // The kernel's refusal, or (without CAP_SYS_ADMIN on Amazon Linux 2,
        // which leaves no BPF capability at all) the check before asking it.
        assert!(
            line.contains("Operation not permitted (os error 1)")
                || (node == Node::AmazonLinux2 && line.contains("missing privileges")),
            "the kernel's refusal: {line}"
        );
    }
    Ok(())
}
