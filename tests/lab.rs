//! The test lab itself (`tests/src`): topology, pod cgroups, every fault,
//! and clean-up. Each fault is measured by an observer outside the lab's own
//! code: client-side timers and errors, the kernel's counters (`nstat`, per
//! network namespace, so parallel tests do not see each other), `ss`.

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use lab::{
    CgroupSpec, Fault, FullListener, Host, Lab, Path, PodCgroup, RedisServer,
    cgroup::{Driver, Hierarchy, Qos, cgroup2_mount},
    inject_loopback, scaled, time_scale,
};

const REDIS_PORT: u16 = 6379;

/// Tests that time round trips or push bulk traffic run one at a time: on 2
/// cores a bulk transfer next door would show up in a 2 ms ± 10% check.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn client_and_redis() -> anyhow::Result<Lab> {
    Lab::builder().pod("client", 'a').host("redis", 'b').build()
}

/// PING round trips on one connection, timed by the client.
fn ping(stream: &mut TcpStream) -> anyhow::Result<Duration> {
    let mut reply = [0u8; 7];
    let started = Instant::now();
    stream.write_all(b"PING\r\n")?;
    stream.read_exact(&mut reply)?;
    let rtt = started.elapsed();
    anyhow::ensure!(&reply == b"+PONG\r\n", "reply {reply:?}");
    Ok(rtt)
}

fn connect_from(host: &Host, addr: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let stream = host.within(|| TcpStream::connect(addr))??;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
    Ok(stream)
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Interleaved round trips on a delayed and an undelayed connection (same
/// load on both): returns (delayed, plain) samples.
fn paired_rtts(
    delayed: &mut TcpStream,
    plain: &mut TcpStream,
    rounds: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(ping(delayed)?);
        b.push(ping(plain)?);
    }
    Ok((a, b))
}

/// Sends `bytes` from `client` to a sink on `server:port`; returns what the
/// sink received (it must be all of it, in order: checked by a checksum).
fn bulk(client: &Host, server: &Host, port: u16, bytes: usize) -> anyhow::Result<usize> {
    let addr = SocketAddrV4::new(server.ip(), port);
    let listener = server.within(|| TcpListener::bind(addr))??;
    let sink = thread::spawn(move || -> io::Result<(usize, u64)> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(scaled(Duration::from_secs(20))))?;
        let (mut total, mut sum) = (0usize, 0u64);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok((total, sum));
            }
            for &byte in &buf[..n] {
                sum = sum.wrapping_mul(31).wrapping_add(byte as u64);
            }
            total += n;
        }
    });
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let expected = data
        .iter()
        .fold(0u64, |sum, &b| sum.wrapping_mul(31).wrapping_add(b as u64));
    let mut stream = client.within(|| TcpStream::connect(addr))??;
    // A path that swallows everything fails the test instead of hanging it.
    stream.set_write_timeout(Some(scaled(Duration::from_secs(20))))?;
    stream.write_all(&data)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let (received, sum) = sink.join().expect("sink thread")?;
    anyhow::ensure!(sum == expected, "data corrupted on the way");
    Ok(received)
}

#[test]
fn pods_reach_redis_through_the_router_from_their_cgroup() -> anyhow::Result<()> {
    let lab = Lab::builder()
        .pod("client", 'a')
        .host("redis", 'b')
        .pod("neighbour", 'b')
        .build()?;
    let (client, redis, neighbour) = (lab.host("client"), lab.host("redis"), lab.host("neighbour"));
    assert_eq!(client.ip(), Ipv4Addr::new(10, 1, 0, 2));
    assert_eq!(redis.ip(), Ipv4Addr::new(10, 2, 0, 2));
    assert_eq!(neighbour.ip(), Ipv4Addr::new(10, 2, 0, 3));
    let _server = redis.start_redis(REDIS_PORT)?;

    // Across zones and within one: both cross the router (its own counter).
    for pod in [client, neighbour] {
        let forwarded = lab.router().counters()?;
        let out = pod
            .command("redis-cli")
            .args(["-h", &redis.ip().to_string(), "ping"])
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "PONG",
            "{out:?}"
        );
        let hops = lab
            .router()
            .counters()?
            .since(&forwarded, "IpForwDatagrams");
        assert!(hops >= 6, "{}: {hops} packets forwarded", pod.name());
    }

    // A process in the pod: its netns and cgroup are the pod's.
    let mut sleeper = client.spawn(client.command("sleep").arg("60"))?;
    let pid = sleeper.pid();
    let pod = client.pod().expect("a pod");
    let own_cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    assert!(
        own_cgroup
            .lines()
            .any(|l| l == format!("0::{}", pod.path())),
        "{own_cgroup}"
    );
    assert!(
        pod.path()
            .starts_with("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod")
            && pod
                .path()
                .contains(&format!("/cri-containerd-{}.scope", pod.container_id())),
        "{}",
        pod.path()
    );
    let cgroup_dir = cgroup2_mount()?.join(pod.path().trim_start_matches('/'));
    assert_eq!(pod.cgroup_id()?, fs::metadata(&cgroup_dir)?.ino());
    assert_eq!(pod.pids(), vec![pid]);
    let netns_inode = fs::metadata(format!("/run/netns/{}", client.netns().name()))?.ino();
    assert_eq!(
        fs::metadata(format!("/proc/{pid}/ns/net"))?.ino(),
        netns_inode
    );
    assert_eq!(client.netns().pids(), vec![pid]);
    sleeper.ensure_running()?;
    Ok(())
}

#[test]
fn cgroupfs_and_cgroup_v1_node_layouts() -> anyhow::Result<()> {
    let guaranteed = PodCgroup::create(CgroupSpec {
        qos: Qos::Guaranteed,
        driver: Driver::Cgroupfs,
        hierarchy: Hierarchy::V2,
    })?;
    let mut pods = vec![guaranteed];
    match lab::cgroup::v1_mounts() {
        Ok(_) => pods.push(PodCgroup::create(CgroupSpec::v1_host())?),
        // A cgroup2-only host (e.g. the qemu guests) cannot play a v1 node.
        Err(e) => eprintln!("skipping the cgroup-v1 node layout: {e:#}"),
    }
    for pod in &pods {
        let mut command = Command::new("sleep");
        command.arg("60");
        pod.enter_on_spawn(&mut command);
        let child = lab::Process::spawn(&mut command)?;
        let lines = fs::read_to_string(format!("/proc/{}/cgroup", child.pid()))?;
        match pod.spec().hierarchy {
            Hierarchy::V2 => {
                assert_eq!(
                    pod.path(),
                    format!("/kubepods/pod{}/{}", pod.uid(), pod.container_id())
                );
                assert!(
                    lines.lines().any(|l| l == format!("0::{}", pod.path())),
                    "{lines}"
                );
            }
            Hierarchy::V1 => {
                // v1 node: the pod is visible in memory/pids…, the v2 cgroup is the root.
                let path = format!(
                    "/kubepods/burstable/pod{}/{}",
                    pod.uid(),
                    pod.container_id()
                );
                assert_eq!(pod.path(), path);
                assert!(lines.lines().any(|l| l == "0::/"), "{lines}");
                for controller in ["memory", "pids"] {
                    assert!(
                        lines
                            .lines()
                            .any(|l| l.ends_with(&format!(":{controller}:{path}"))),
                        "{controller}: {lines}"
                    );
                }
                assert_eq!(pod.cgroup_id()?, fs::metadata(cgroup2_mount()?)?.ino());
            }
        }
        assert_eq!(pod.pids().first(), Some(&child.pid()));
    }
    let dirs: Vec<_> = pods.iter().flat_map(|p| p.dirs()).collect();
    drop(pods);
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    Ok(())
}

#[test]
fn delay_line_adds_2ms_to_each_round_trip() -> anyhow::Result<()> {
    let _exclusive = exclusive();
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _delayed_server = redis.start_redis(REDIS_PORT)?;
    let _plain_server = redis.start_redis(REDIS_PORT + 1)?;
    let delay = Duration::from_millis(2);
    let fault = lab.inject(
        Path::between(client.ip(), redis.ip(), REDIS_PORT),
        Fault::delay(delay),
    )?;
    let mut delayed = connect_from(client, SocketAddrV4::new(redis.ip(), REDIS_PORT))?;
    let mut plain = connect_from(client, SocketAddrV4::new(redis.ip(), REDIS_PORT + 1))?;
    let (with, without) = paired_rtts(&mut delayed, &mut plain, 300)?;
    let added = percentile(&with, 0.5).saturating_sub(percentile(&without, 0.5));
    eprintln!(
        "delay 2 ms: median RTT {:.3} ms vs {:.3} ms without: +{:.3} ms; min +{:.3} ms; {} packets held",
        ms(percentile(&with, 0.5)),
        ms(percentile(&without, 0.5)),
        ms(added),
        ms(percentile(&with, 0.0).saturating_sub(percentile(&without, 0.0))),
        fault
            .delay_stats()
            .unwrap()
            .queued
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let tolerance = delay / 10 * time_scale();
    assert!(
        added.abs_diff(delay) <= tolerance,
        "added {added:?}, want {delay:?} ± {tolerance:?}"
    );
    // Nothing leaves early: the fastest delayed round trip is ≥ the delay.
    assert!(
        percentile(&with, 0.0) >= delay,
        "min {:?}",
        percentile(&with, 0.0)
    );
    Ok(())
}

#[test]
fn jitter_spreads_round_trips_and_keeps_order() -> anyhow::Result<()> {
    let _exclusive = exclusive();
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _server = redis.start_redis(REDIS_PORT)?;
    let (delay, jitter) = (Duration::from_millis(2), Duration::from_millis(1));
    let path = Path::between(client.ip(), redis.ip(), REDIS_PORT);
    let _fault = lab.inject(path, Fault::jitter(delay, jitter))?;
    let before = redis.counters()?;
    let mut stream = connect_from(client, SocketAddrV4::new(redis.ip(), REDIS_PORT))?;
    let rtts = (0..300)
        .map(|_| ping(&mut stream))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (p05, p50, p95) = (
        percentile(&rtts, 0.05),
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.95),
    );
    let spread = p95 - p05;
    eprintln!(
        "jitter 2 ± 1 ms: RTT p05 {:.3} p50 {:.3} p95 {:.3} ms, spread {:.3} ms",
        ms(p05),
        ms(p50),
        ms(p95),
        ms(spread)
    );
    // Uniform ±1 ms: p05..p95 spans 1.8 ms.
    let slack = Duration::from_micros(400) * time_scale();
    assert!(
        spread.abs_diff(Duration::from_micros(1800)) <= slack,
        "spread {spread:?}"
    );
    assert!(p05 >= delay - jitter, "p05 {p05:?}");
    assert!(p50.abs_diff(delay) <= slack, "p50 {p50:?}");
    let ofo = redis.counters()?.since(&before, "TcpExtTCPOFOQueue");
    assert_eq!(ofo, 0, "jitter must not reorder");
    Ok(())
}

#[test]
fn reordering_shows_as_out_of_order_segments() -> anyhow::Result<()> {
    let _exclusive = exclusive();
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let port = 7000;
    let path = Path::between(client.ip(), redis.ip(), port);
    let fault = lab.inject(path, Fault::reorder(0.05, Duration::from_millis(1)))?;
    let (server_before, client_before) = (redis.counters()?, client.counters()?);
    let bytes = 2 << 20;
    assert_eq!(bulk(client, redis, port, bytes)?, bytes);
    let ofo = redis.counters()?.since(&server_before, "TcpExtTCPOFOQueue");
    let reorder_seen = client
        .counters()?
        .since(&client_before, "TcpExtTCPSACKReorder");
    let held_back = fault
        .delay_stats()
        .unwrap()
        .reordered
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "reorder 5% by +1 ms, 2 MiB: {held_back} packets held back; receiver queued {ofo} out of order; sender saw reordering {reorder_seen} times"
    );
    assert!(held_back > 0);
    assert!(ofo > 0, "receiver saw no out-of-order segment");
    Ok(())
}

#[test]
fn loss_shows_as_retransmits() -> anyhow::Result<()> {
    let _exclusive = exclusive();
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let port = 7001;
    let fault = lab.inject(
        Path::between(client.ip(), redis.ip(), port),
        Fault::Loss { probability: 0.05 },
    )?;
    let before = client.counters()?;
    let bytes = 4 << 20;
    assert_eq!(bulk(client, redis, port, bytes)?, bytes);
    let after = client.counters()?;
    let (sent, retransmitted) = (
        after.since(&before, "TcpOutSegs"),
        after.since(&before, "TcpRetransSegs"),
    );
    let dropped = fault.packets()?;
    let rate = dropped as f64 / sent as f64;
    eprintln!(
        "loss 5%, 4 MiB: {dropped} of {sent} segments dropped ({:.2}%), {retransmitted} retransmitted",
        rate * 100.0
    );
    assert!(retransmitted > 0, "no retransmits");
    assert!(
        retransmitted >= dropped / 2,
        "{retransmitted} retransmits for {dropped} drops"
    );
    // ~3000 segments: 5% ± 2% is over 5 standard deviations.
    assert!((0.03..=0.07).contains(&rate), "loss rate {rate}");
    Ok(())
}

#[test]
fn duplicates_show_as_dsacks() -> anyhow::Result<()> {
    let _exclusive = exclusive();
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let port = 7002;
    let fault = lab.inject(
        Path::between(client.ip(), redis.ip(), port),
        Fault::Duplicate { probability: 0.1 },
    )?;
    let (server_before, client_before) = (redis.counters()?, client.counters()?);
    let bytes = 1 << 20;
    assert_eq!(bulk(client, redis, port, bytes)?, bytes);
    let duplicated = fault.packets()?;
    let dsack_sent = redis
        .counters()?
        .since(&server_before, "TcpExtTCPDSACKOldSent");
    let dsack_received = client
        .counters()?
        .since(&client_before, "TcpExtTCPDSACKRecv");
    eprintln!(
        "duplicate 10%, 1 MiB: {duplicated} packets copied; receiver sent {dsack_sent} D-SACKs, sender got {dsack_received}"
    );
    assert!(duplicated > 0);
    assert!(dsack_sent > 0, "receiver saw no duplicate");
    assert!(dsack_received > 0, "sender saw no D-SACK");
    Ok(())
}

#[test]
fn dropped_syns_time_out_with_one_syn_retransmit() -> anyhow::Result<()> {
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _server = redis.start_redis(REDIS_PORT)?;
    let fault = lab.inject(
        Path::between(client.ip(), redis.ip(), REDIS_PORT),
        Fault::DropSyn,
    )?;
    let before = client.counters()?;
    let addr = SocketAddrV4::new(redis.ip(), REDIS_PORT);
    // 1.5 s, not scaled: the kernel's RTO (1 s, then 3 s) runs on real time.
    let timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let result = client.within(|| TcpStream::connect_timeout(&addr.into(), timeout))?;
    let waited = started.elapsed();
    let retransmits = client.counters()?.since(&before, "TcpExtTCPSynRetrans");
    eprintln!(
        "SYN drop: connect gave up after {:.0} ms, {retransmits} SYN retransmit, {} SYNs dropped",
        ms(waited),
        fault.packets()?
    );
    let error = result.expect_err("connect through a SYN drop");
    assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
    assert!(waited >= timeout);
    assert_eq!(retransmits, 1);
    assert_eq!(fault.packets()?, 2, "the SYN and its retransmit");
    Ok(())
}

#[test]
fn reset_refuses_connects() -> anyhow::Result<()> {
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _server = redis.start_redis(REDIS_PORT)?;
    let path = Path::between(client.ip(), redis.ip(), REDIS_PORT);
    let _fault = lab.inject(path, Fault::Reset)?;
    let (client_before, server_before) = (client.counters()?, redis.counters()?);
    let addr = SocketAddrV4::new(redis.ip(), REDIS_PORT);
    let error = client
        .within(|| TcpStream::connect(addr))?
        .expect_err("connect through RST");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    let (client_after, server_after) = (client.counters()?, redis.counters()?);
    // The RST came from the path: the server never saw a SYN.
    assert_eq!(server_after.since(&server_before, "TcpPassiveOpens"), 0);
    assert_eq!(client_after.since(&client_before, "TcpAttemptFails"), 1);
    assert_eq!(client_after.since(&client_before, "TcpExtTCPSynRetrans"), 0);
    Ok(())
}

#[test]
fn unreachable_fails_connects_with_ehostunreach() -> anyhow::Result<()> {
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _server = redis.start_redis(REDIS_PORT)?;
    let path = Path::between(client.ip(), redis.ip(), REDIS_PORT);
    let _fault = lab.inject(path, Fault::Unreachable)?;
    let before = client.counters()?;
    let addr = SocketAddrV4::new(redis.ip(), REDIS_PORT);
    let error = client
        .within(|| TcpStream::connect(addr))?
        .expect_err("connect");
    assert_eq!(error.raw_os_error(), Some(libc::EHOSTUNREACH), "{error}");
    assert!(client.counters()?.since(&before, "IcmpInDestUnreachs") >= 1);
    Ok(())
}

#[test]
fn full_accept_queue_drops_syns() -> anyhow::Result<()> {
    let lab = client_and_redis()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let listener = FullListener::start(redis.netns(), SocketAddrV4::new(redis.ip(), REDIS_PORT))?;
    let (client_before, server_before) = (client.counters()?, redis.counters()?);
    let timeout = Duration::from_millis(1500);
    let result = client.within(|| TcpStream::connect_timeout(&listener.addr.into(), timeout))?;
    let (client_after, server_after) = (client.counters()?, redis.counters()?);
    let overflows = server_after.since(&server_before, "TcpExtListenOverflows");
    let drops = server_after.since(&server_before, "TcpExtListenDrops");
    let retransmits = client_after.since(&client_before, "TcpExtTCPSynRetrans");
    eprintln!(
        "backlog overflow: ListenOverflows +{overflows}, ListenDrops +{drops}, client SYN retransmits +{retransmits}"
    );
    let error = result.expect_err("connect to a full accept queue");
    assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
    assert_eq!(overflows, 2, "the SYN and its retransmit");
    assert_eq!(drops, 2);
    assert_eq!(retransmits, 1);
    assert_eq!(listener.accept_queue(redis.netns())?, 2);
    Ok(())
}

#[test]
fn loopback_delay_and_reset() -> anyhow::Result<()> {
    let _exclusive = exclusive();
    let delayed_server = RedisServer::start()?;
    let plain_server = RedisServer::start()?;
    let delay = Duration::from_millis(2);
    let fault = inject_loopback(Path::loopback(delayed_server.port), Fault::delay(delay))?;
    let connect = |port| -> anyhow::Result<TcpStream> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
        Ok(stream)
    };
    let (mut delayed, mut plain) = (connect(delayed_server.port)?, connect(plain_server.port)?);
    let (with, without) = paired_rtts(&mut delayed, &mut plain, 200)?;
    let added = percentile(&with, 0.5).saturating_sub(percentile(&without, 0.5));
    eprintln!("loopback delay 2 ms: median RTT +{:.3} ms", ms(added));
    assert!(
        added.abs_diff(delay) <= delay / 10 * time_scale(),
        "added {added:?}"
    );
    drop(fault);
    assert!(ping(&mut delayed)? < delay, "delay gone with its guard");

    let _reset = inject_loopback(Path::loopback(plain_server.port), Fault::Reset)?;
    let error = TcpStream::connect((Ipv4Addr::LOCALHOST, plain_server.port)).expect_err("RST");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    Ok(())
}

/// What a child test process built: `RESOURCE <kind> <value>` lines.
#[derive(Debug, Default)]
struct Resources {
    netns: Vec<String>,
    dirs: Vec<String>,
    pids: Vec<u32>,
    rules: Vec<String>,
}

impl Resources {
    fn parse(line: &str, into: &mut Self) {
        let mut words = line.split_whitespace().skip(1);
        let (Some(kind), Some(value)) = (words.next(), words.next()) else {
            return;
        };
        match kind {
            "netns" => into.netns.push(value.into()),
            "dir" => into.dirs.push(value.into()),
            "pid" => into.pids.push(value.parse().unwrap()),
            "rule" => into.rules.push(value.into()),
            _ => panic!("unknown resource {line}"),
        }
    }

    fn host_rules() -> String {
        ["filter", "mangle"]
            .iter()
            .map(|t| lab::netns::run(Command::new("iptables").args(["-w", "-t", t, "-S"])).unwrap())
            .collect()
    }

    /// Which of them still exist.
    fn remaining(&self) -> Vec<String> {
        let netns = lab::netns::run(Command::new("ip").args(["netns", "list"])).unwrap();
        let rules = Self::host_rules();
        let mut left = Vec::new();
        left.extend(
            self.netns
                .iter()
                .filter(|n| netns.contains(n.as_str()))
                .map(|n| format!("netns {n}")),
        );
        left.extend(
            self.dirs
                .iter()
                .filter(|d| fs::metadata(d).is_ok())
                .map(|d| format!("dir {d}")),
        );
        left.extend(
            self.pids
                .iter()
                .filter(|p| !lab::sweep::is_dead(**p))
                .map(|p| format!("pid {p}")),
        );
        left.extend(
            self.rules
                .iter()
                .filter(|r| rules.contains(r.as_str()))
                .map(|r| format!("rule {r}")),
        );
        left
    }

    fn count(&self) -> usize {
        self.netns.len() + self.dirs.len() + self.pids.len() + self.rules.len()
    }
}

/// Runs [`child_builds_a_lab`] in a child process with `mode`; returns it
/// and its resources once it printed them all.
fn start_child(
    mode: &str,
) -> anyhow::Result<(
    std::process::Child,
    Resources,
    BufReader<std::process::ChildStdout>,
)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "child_builds_a_lab",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RTL_LAB_CHILD", mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut resources = Resources::default();
    let mut line = String::new();
    while stdout.read_line(&mut line)? > 0 {
        if line.starts_with("RESOURCE") {
            Resources::parse(&line, &mut resources);
        }
        if line.starts_with("READY") {
            return Ok((child, resources, stdout));
        }
        line.clear();
    }
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr)?;
    anyhow::bail!("child ended before READY: {:?}\n{stderr}", child.wait()?)
}

#[test]
fn a_panicking_test_leaves_nothing_behind() -> anyhow::Result<()> {
    let (mut child, resources, _stdout) = start_child("panic")?;
    drop(child.stdin.take()); // the child panics once stdin closes
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr)?;
    let status = child.wait()?;
    assert!(
        !status.success() && stderr.contains("deliberate panic"),
        "{status}: {stderr}"
    );
    assert!(resources.count() >= 12, "{resources:?}");
    assert_eq!(resources.remaining(), Vec::<String>::new(), "left behind");
    Ok(())
}

#[test]
fn sweep_removes_leftovers_of_a_killed_run() -> anyhow::Result<()> {
    let (mut child, resources, _stdout) = start_child("hang")?;
    child.kill()?; // SIGKILL: no destructor runs
    child.wait()?;
    let leaked = resources.remaining();
    // The processes die with their parent only if something kills them.
    assert!(leaked.iter().any(|r| r.starts_with("netns")), "{leaked:?}");
    assert!(leaked.iter().any(|r| r.starts_with("dir")), "{leaked:?}");
    assert!(leaked.iter().any(|r| r.starts_with("rule")), "{leaked:?}");
    let swept = lab::sweep()?;
    eprintln!(
        "sweep after SIGKILL: {} leaked, swept {swept:?}",
        leaked.len()
    );
    assert_eq!(resources.remaining(), Vec::<String>::new(), "after sweep");
    for name in &resources.netns {
        assert!(swept.netns.contains(name), "{name} not in {swept:?}");
    }
    Ok(())
}

/// Not a test: the child of the two tests above. Builds one of everything,
/// prints it, says READY, then panics (`panic`) or waits to be killed
/// (`hang`) when stdin closes.
#[test]
#[ignore = "child process of a_panicking_test_leaves_nothing_behind and sweep_removes_leftovers_of_a_killed_run"]
fn child_builds_a_lab() -> anyhow::Result<()> {
    let Ok(mode) = std::env::var("RTL_LAB_CHILD") else {
        return Ok(());
    };
    let legacy = match lab::cgroup::v1_mounts() {
        Ok(_) => CgroupSpec::v1_host(),
        Err(_) => CgroupSpec::default(),
    };
    let lab = Lab::builder()
        .pod("client", 'a')
        .host("redis", 'b')
        .pod_with("legacy", 'a', legacy)
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let server = redis.start_redis(REDIS_PORT)?;
    let sleepers = [client, lab.host("legacy")]
        .iter()
        .map(|pod| pod.spawn(pod.command("sleep").arg("600")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let path = Path::between(client.ip(), redis.ip(), REDIS_PORT);
    let _delay = lab.inject(path, Fault::delay(Duration::from_millis(1)))?;
    let port = lab::free_port();
    let host_rule = inject_loopback(Path::loopback(port), Fault::Loss { probability: 0.5 })?;
    let host_delay = inject_loopback(Path::loopback(port), Fault::delay(Duration::from_millis(1)))?;
    for name in [lab.router().name()]
        .into_iter()
        .chain(lab.hosts().iter().map(|h| h.netns().name()))
    {
        println!("RESOURCE netns {name}");
    }
    for pod in lab.hosts().iter().filter_map(Host::pod) {
        for dir in pod.dirs() {
            println!("RESOURCE dir {}", dir.display());
            println!("RESOURCE dir {}", dir.parent().unwrap().display());
        }
    }
    println!("RESOURCE pid {}", server.pid());
    for sleeper in &sleepers {
        println!("RESOURCE pid {}", sleeper.pid());
    }
    for rule in [&host_rule, &host_delay] {
        println!("RESOURCE rule {}", rule.comment());
    }
    println!("READY");
    io::stdout().flush()?;
    let mut rest = String::new();
    io::stdin().read_to_string(&mut rest)?;
    match mode.as_str() {
        "panic" => panic!("deliberate panic with the lab up"),
        _ => {
            thread::sleep(Duration::from_secs(600));
            Ok(())
        }
    }
}
