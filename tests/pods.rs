//! Connect events through the lab: pods in their own network namespaces and
//! kubelet-shaped cgroups, a Redis host in another zone, a router between
//! them where faults apply. What `tests/connect.rs` checks on loopback,
//! here with a real network path and real pod cgroups.

use std::{
    io::Write,
    net::{SocketAddrV4, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use lab::{Agent, CgroupSpec, Fault, Lab, Path, event_timeout, free_port, scaled, serial};
use serde_json::Value;

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// 1,000 connects across a 2 ms delay line (client → Redis): exactly 1,000
/// `established` events, whose median handshake is the client's own median
/// `connect()` time ± 10%.
#[test]
fn handshakes_across_a_2ms_delay_line_match_the_client() -> anyhow::Result<()> {
    const CONNECTS: usize = 1_000;
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder()
        .pod("client", 'a')
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _redis = redis.start_redis(port)?;
    let mut agent = Agent::start(&[port], &[])?;
    let _delay = lab.inject(
        Path::between(client.ip(), redis.ip(), port),
        Fault::delay(Duration::from_millis(2)),
    )?;

    let addr = SocketAddrV4::new(redis.ip(), port);
    let mut client_times = client.within(|| -> anyhow::Result<Vec<Duration>> {
        (0..CONNECTS)
            .map(|_| {
                let started = Instant::now();
                let stream = TcpStream::connect(addr)?;
                let took = started.elapsed();
                drop(stream);
                Ok(took)
            })
            .collect()
    })??;
    agent.barrier()?;

    let events = agent.take_seen(|e| e["type"] == "connect" && e["dst"]["port"] == port);
    assert_eq!(events.len(), CONNECTS, "exactly one event per connect");
    assert!(
        events
            .iter()
            .all(|e| e["outcome"] == "established" && e["dst"]["ip"] == redis.ip().to_string())
    );
    assert!(
        events
            .iter()
            .all(|e| e["src"]["ip"] == client.ip().to_string())
    );
    let mut agent_times: Vec<Duration> = events
        .iter()
        .map(|e| Duration::from_micros(e["handshake_us"].as_u64().unwrap()))
        .collect();
    let (agent_median, client_median) = (median(&mut agent_times), median(&mut client_times));
    eprintln!("median handshake: agent {agent_median:?}, client connect() {client_median:?}");
    assert!(
        agent_median >= Duration::from_millis(2),
        "the 2 ms delay is inside the handshake"
    );
    let tolerance = client_median / 10;
    assert!(
        agent_median.abs_diff(client_median) <= tolerance,
        "agent {agent_median:?} vs client {client_median:?} ± {tolerance:?}"
    );
    agent.stop()?;
    Ok(())
}

/// A pod's process connecting (a long-lived `redis-cli`, as a pooled client
/// would be): its connect and close events name the pod's cgroup — the v2 id
/// and path on a cgroup v2 node, the v1 path on a cgroup-v1-only node
/// (Amazon Linux 2), where BPF sees every process in the v2 root.
#[test]
fn events_name_the_pods_cgroup_on_v2_and_v1_nodes() -> anyhow::Result<()> {
    let port = free_port();
    let lab = Lab::builder()
        .pod("v2pod", 'a')
        .pod_with("v1pod", 'a', CgroupSpec::v1_host())
        .host("redis", 'b')
        .build()?;
    let redis = lab.host("redis");
    let _redis = redis.start_redis(port)?;
    let mut agent = Agent::start(&[port], &[])?;

    for name in ["v2pod", "v1pod"] {
        let pod = lab.host(name);
        let cgroup = pod.pod().expect("a pod");
        let mut cli = pod.spawn(
            pod.command("redis-cli")
                .args(["-h", &redis.ip().to_string(), "-p", &port.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        // The connect happens when redis-cli starts; it stays connected.
        let is_pods_connect = |e: &Value| {
            e["type"] == "connect"
                && e["dst"]["port"] == port
                && e["src"]["ip"] == pod.ip().to_string()
        };
        let connect = agent.wait_for(event_timeout(), is_pods_connect)?;
        assert_eq!(connect["outcome"], "established", "{connect}");
        assert_eq!(connect["src"]["pid"], cli.pid(), "{connect}");
        assert_eq!(
            connect["src"]["cgroup_id"],
            cgroup.cgroup_id()?,
            "{name}: {connect}"
        );
        assert_eq!(connect["src"]["cgroup"], cgroup.path(), "{name}: {connect}");

        let stdin = cli.child_mut().stdin.take();
        if let Some(mut stdin) = stdin {
            stdin.write_all(b"PING\n")?;
        }
        let output = cli.wait_with_output()?;
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "PONG");
        let close = agent.wait_for(scaled(Duration::from_secs(10)), |e| {
            e["type"] == "close"
                && e["role"] == "client"
                && e["src"]["port"] == connect["src"]["port"]
        })?;
        assert_eq!(
            close["src"]["cgroup_id"],
            cgroup.cgroup_id()?,
            "{name}: {close}"
        );
        assert_eq!(close["closed_by"], "local", "{close}");
    }
    agent.stop()?;
    Ok(())
}
