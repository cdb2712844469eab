//! The agent's analytics with real traffic through the lab: a connect storm
//! from a pod, SYN drops under a client's connect-timeout retries, a Redis
//! restart under load, workload and zone attribution, and no false alarm
//! under a steady benchmark. Ground truth: the server's own counters
//! (`INFO stats`), the clients' own outcomes and timings.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lab::{
    Agent, Fault, Lab, Path, Place, RedisServer,
    clients::clients_dir,
    event_timeout, free_port,
    kubeapi::{self, FakeApi, PodSpec},
    scaled, serial, wait_until,
};
use serde_json::Value;

/// `total_connections_received` from the server's `INFO stats`.
fn connections_received(place: &Place, addr: SocketAddr) -> anyhow::Result<u64> {
    let info: String = place.query(addr, redis::cmd("INFO").arg("stats"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .context("no total_connections_received in INFO stats")?
        .trim()
        .parse()
        .context("total_connections_received")
}

fn alerts<'a>(events: &'a [Value], kind: &str, state: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == "alert" && e["kind"] == kind && e["state"] == state)
        .collect()
}

fn names_pod(alert: &Value, uid: &str) -> bool {
    alert["workloads"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["pod_uid"] == uid))
}

/// A pod reconnecting for every request (`redis-benchmark -k 0`) at well
/// over 200 connects/s for several seconds: one `connect_storm` alert naming
/// the pod's UID, resolved once after the storm; `connect` latency windows
/// count exactly the connections the server accepted; the cross-zone path is
/// labelled as such.
#[test]
fn a_connect_storm_from_a_pod_fires_once_and_names_the_pod() -> anyhow::Result<()> {
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder().pod("app", 'a').host("redis", 'b').build()?;
    let (app, redis) = (lab.host("app"), lab.host("redis"));
    let _redis = redis.start_redis(port)?;
    let addr = SocketAddr::new(redis.ip().into(), port);
    let server = Place::Host(redis);
    let mut agent = Agent::start(
        &[port],
        &[
            "--interval",
            "1s",
            "--zone",
            "zone-a",
            "--zone-cidr",
            "10.1.0.0/24=zone-a,10.2.0.0/24=zone-b",
        ],
    )?;
    agent.expect_alerts(&["connect_storm", "cross_zone_latency"]);
    let received_before = connections_received(&server, addr)?;

    let storm_for = Duration::from_secs(6);
    let started = Instant::now();
    let mut storm = app.spawn(
        app.command("redis-benchmark")
            .args(["-h", &redis.ip().to_string(), "-p", &port.to_string()])
            .args(["-k", "0", "-c", "2", "-n", "100000000", "-t", "ping"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let firing = agent.wait_for(storm_for + event_timeout(), |e| {
        e["type"] == "alert" && e["kind"] == "connect_storm" && e["state"] == "firing"
    });
    if let Some(left) = storm_for.checked_sub(started.elapsed()) {
        std::thread::sleep(left); // the storm's length, not a synchronisation
    }
    drop(storm.child_mut().kill());
    drop(storm);
    let firing = firing?;
    let uid = app.pod().context("app is a pod")?.uid().to_string();
    assert!(
        names_pod(&firing, &uid),
        "storm alert names pod {uid}: {firing}"
    );
    assert_eq!(firing["endpoint"]["port"], port, "{firing}");
    assert!(firing["severity"].is_string(), "{firing}");
    agent.wait_for(scaled(Duration::from_secs(90)), |e| {
        e["type"] == "alert" && e["kind"] == "connect_storm" && e["state"] == "resolved"
    })?;

    let received = connections_received(&server, addr)? - received_before;
    // The INFO query itself is one more connection, from the test process.
    let received = received.saturating_sub(1);
    let events = agent.stop()?;
    let storms: Vec<_> = alerts(&events, "connect_storm", "firing");
    assert!(storms.is_empty(), "fired again after resolving: {storms:?}");
    assert!(
        alerts(&events, "connect_storm", "resolved").is_empty(),
        "resolved twice"
    );

    // The pod's connect windows (the test's own INFO queries come from the
    // root cgroup).
    let windows: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["type"] == "latency"
                && e["op"] == "connect"
                && e["endpoint"]["port"] == port
                && e["pod_uid"] == uid.as_str()
        })
        .collect();
    let attempts: u64 = windows.iter().map(|w| w["count"].as_u64().unwrap()).sum();
    let established: u64 = windows.iter().map(|w| w["ok"].as_u64().unwrap()).sum();
    assert!(
        received as f64 / storm_for.as_secs_f64() >= 200.0,
        "the storm reached only {received} connections in {storm_for:?}"
    );
    // Connections the benchmark had in flight when it was killed may be
    // accepted but not yet counted, or the reverse: at most its 2 clients.
    assert!(
        established.abs_diff(received) <= 2 && attempts >= established,
        "connect windows: {established} established of {attempts}, server accepted {received}"
    );
    assert!(
        windows
            .iter()
            .all(|w| w["endpoint"]["locality"] == "cross_zone"
                && w["endpoint"]["zone"] == "zone-b"
                && w["container_id"] == app.pod().unwrap().container_id()),
        "{windows:?}"
    );
    Ok(())
}

/// The seed incident: SYNs to Redis silently dropped, and a redis-py client
/// configured like many production services (2 s connect timeout, 3
/// attempts). The client fails after ~6 s; the agent raises `syn_drops` for
/// the endpoint and `retry_storm` for the pod, with the attempts it saw.
#[test]
fn dropped_syns_and_connect_timeout_retries_raise_syn_drops_and_retry_storm() -> anyhow::Result<()>
{
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder().pod("app", 'a').host("redis", 'b').build()?;
    let (app, redis) = (lab.host("app"), lab.host("redis"));
    let _redis = redis.start_redis(port)?;
    let mut agent = Agent::start(&[port], &["--interval", "1s"])?;
    agent.expect_alerts(&["syn_drops", "retry_storm"]);
    let _drop = lab.inject(Path::between(app.ip(), redis.ip(), port), Fault::DropSyn)?;

    let python = clients_dir().join("venv/bin/python");
    let script = format!(
        r#"
import time, redis
from redis.backoff import NoBackoff
from redis.retry import Retry
client = redis.Redis(host="{ip}", port={port}, socket_connect_timeout=2,
                     retry=Retry(NoBackoff(), 2),
                     retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
started = time.monotonic()
try:
    client.ping()
    print("ok")
except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
    print("failed", round(time.monotonic() - started, 3))
"#,
        ip = redis.ip()
    );
    let output = app
        .spawn(
            app.command(&python)
                .args(["-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?
        .wait_with_output()?;
    let said = String::from_utf8_lossy(&output.stdout);
    let waited: f64 = said
        .strip_prefix("failed ")
        .with_context(|| {
            format!(
                "the client should fail: {said} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?
        .trim()
        .parse()?;
    assert!(
        (5.5..8.0).contains(&waited),
        "3 attempts × 2 s, waited {waited} s"
    );

    let uid = app.pod().context("app is a pod")?.uid().to_string();
    let syn_drops = agent.wait_for(event_timeout(), |e| {
        e["type"] == "alert" && e["kind"] == "syn_drops" && e["state"] == "firing"
    })?;
    assert_eq!(syn_drops["endpoint"]["port"], port, "{syn_drops}");
    assert!(names_pod(&syn_drops, &uid), "{syn_drops}");
    let retry = agent.wait_for(event_timeout(), |e| {
        e["type"] == "alert" && e["kind"] == "retry_storm" && e["state"] == "firing"
    })?;
    assert!(names_pod(&retry, &uid), "{retry}");
    assert_eq!(retry["endpoint"]["port"], port, "{retry}");

    let events = agent.stop()?;
    // The client's own account: 3 attempts, each given up at its 2 s timeout.
    let attempts: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "connect" && e["dst"]["port"] == port)
        .collect();
    assert_eq!(attempts.len(), 3, "{attempts:#?}");
    for attempt in &attempts {
        assert_eq!(attempt["outcome"], "aborted", "{attempt}");
        assert_eq!(attempt["answer"], "none", "{attempt}");
        let after = attempt["failed_after_us"].as_u64().unwrap();
        assert!((1_900_000..2_500_000).contains(&after), "{attempt}");
    }
    Ok(())
}

/// The p-th percentile (0..=100) of `values`, nearest rank.
fn percentile(values: &[u64], p: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Two pods use a Redis in zone a: `near` from zone a, `far` from zone b.
/// Names and the node's zone come from a (fake: none can run here)
/// Kubernetes API, the pods' subnets' zones from `--zone-cidr`, as on EKS.
/// Their lines carry namespace, pod and owner, and `same_zone` for the near
/// pod's endpoint by the node's label. On equal paths the endpoint raises
/// no `cross_zone_latency`; with 4 ms added to the far pod's path one alert
/// names the far pod by name (not the near one), and the p99s it reports lie
/// within what each client timed itself.
#[test]
fn a_slower_cross_zone_path_raises_cross_zone_latency_for_the_far_pod() -> anyhow::Result<()> {
    const NODE: &str = "ip-10-1-0-10.ec2.internal";
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder()
        .pod("near", 'a')
        .pod("far", 'b')
        .host("redis", 'a')
        .build()?;
    let (near, far, redis) = (lab.host("near"), lab.host("far"), lab.host("redis"));
    let _redis = redis.start_redis(port)?;
    let far_uid = far.pod().context("far is a pod")?.uid().to_string();
    let near_uid = near.pod().context("near is a pod")?.uid().to_string();

    let api = FakeApi::start()?;
    api.apply("nodes", kubeapi::node(NODE, "zone-a"));
    for (uid, host, app) in [(&near_uid, near, "checkout"), (&far_uid, far, "billing")] {
        let replica_set = format!("{app}-5f7c9d8b4");
        api.apply(
            "pods",
            PodSpec {
                uid,
                namespace: "shop",
                name: &format!("{replica_set}-q8x2z"),
                node: NODE,
                ip: host.ip(),
                labels: serde_json::json!({ "app": app, "pod-template-hash": "5f7c9d8b4" }),
                owner: Some(("ReplicaSet", &replica_set)),
            }
            .json(),
        );
    }
    let mut agent = Agent::start(
        &[port],
        &[
            "--kubeconfig",
            api.kubeconfig().to_str().context("kubeconfig path")?,
            "--node-name",
            NODE,
            "--stats-interval",
            "200ms",
            "--interval",
            "1s",
            // No --zone: the node's zone is its label's.
            "--zone-cidr",
            "10.1.0.0/24=zone-a,10.2.0.0/24=zone-b",
            "--cross-zone-window",
            "2s",
        ],
    )?;
    // The far pod talks only across zones: `mostly_cross_zone` may fire too.
    agent.expect_alerts(&["cross_zone_latency"]);
    agent.wait_for(event_timeout(), |e| {
        e["type"] == "stats"
            && e["kubernetes"]["state"] == "connected"
            && e["kubernetes"]["pods"] == 2
            && e["kubernetes"]["node_zone"] == "zone-a"
    })?;
    let is_latency_alert = |e: &Value| {
        e["type"] == "alert"
            && e["kind"] == "cross_zone_latency"
            && e["state"] == "firing"
            && e["endpoint"]["port"] == port
            && !e["id"]
                .as_str()
                .unwrap_or("")
                .ends_with("/mostly_cross_zone")
    };
    // Both pods at once, unpipelined GETs: `far_requests` from the far pod
    // while the near pod keeps going.
    let both = |far_requests: usize| -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let near_side = scope.spawn(|| -> anyhow::Result<Vec<u64>> {
                let mut latencies = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let workload = lab::clients::Workload::new(redis.ip(), port)
                        .requests(300)
                        .commands(&["GET"]);
                    let result = Place::Host(near).redis_py(&workload)?;
                    latencies.extend(&result.latencies_us["GET"]);
                }
                Ok(latencies)
            });
            let workload = lab::clients::Workload::new(redis.ip(), port)
                .requests(far_requests)
                .commands(&["GET"]);
            let far_result = Place::Host(far).redis_py(&workload);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let near_latencies = near_side.join().expect("near client thread")?;
            Ok((near_latencies, far_result?.latencies_us["GET"].clone()))
        })
    };

    // Equal paths for at least two windows: no latency alert.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        both(2_000)?;
    }
    agent.barrier()?;
    let early = agent.take_seen(is_latency_alert);
    assert_eq!(
        early,
        Vec::<Value>::new(),
        "cross_zone_latency on equal paths"
    );

    let delay = Duration::from_millis(4);
    let delayed_at = std::time::SystemTime::now();
    let _slow = lab.inject(
        Path::between(far.ip(), redis.ip(), port),
        Fault::delay(delay),
    )?;
    // ~1,500 × 4 ms: three windows or more.
    let (near_us, far_us) = both(1_500)?;
    let alert = agent.wait_for(event_timeout(), is_latency_alert)?;
    assert!(names_pod(&alert, &far_uid), "names the far pod: {alert}");
    assert!(!names_pod(&alert, &near_uid), "not the near pod: {alert}");
    let named = &alert["workloads"][0];
    assert_eq!(named["namespace"], "shop", "{alert}");
    assert_eq!(named["pod"], "billing-5f7c9d8b4-q8x2z", "{alert}");
    assert_eq!(named["workload"], "deployment/billing", "{alert}");
    assert_eq!(alert["endpoint"]["zone"], "zone-a", "{alert}");
    let started = humantime::parse_rfc3339(alert["started"].as_str().unwrap())?;
    assert!(started >= delayed_at, "started before the delay: {alert}");

    // The window p99s against each client's own timings (its client side
    // adds its own overhead, so the agent's figure is at most its max).
    let cross_p99_us = alert["evidence"]["cross_zone_p99_ms"].as_f64().unwrap() * 1e3;
    let same_p99_us = alert["evidence"]["same_zone_p99_ms"].as_f64().unwrap() * 1e3;
    let (far_median, far_max) = (percentile(&far_us, 50.0), percentile(&far_us, 100.0));
    eprintln!(
        "far client: p50 {far_median} p99 {} max {far_max} µs; near client: p50 {} p99 {} µs; \
         agent: cross p99 {cross_p99_us} same p99 {same_p99_us} µs",
        percentile(&far_us, 99.0),
        percentile(&near_us, 50.0),
        percentile(&near_us, 99.0)
    );
    assert!(
        cross_p99_us >= delay.as_secs_f64() * 1e6 && cross_p99_us <= far_max as f64 * 1.02,
        "cross-zone p99 {cross_p99_us} µs: ≥ the {delay:?} delay, ≤ the far client's max {far_max} µs"
    );
    assert!(
        same_p99_us <= percentile(&near_us, 100.0) as f64 * 1.02
            && same_p99_us < delay.as_secs_f64() * 1e6,
        "same-zone p99 {same_p99_us} µs against the near client's timings"
    );
    // Every window of each pod carries its names; the near pod's endpoint
    // is in the node's zone (from its label), the far pod's is not.
    let events = agent.stop()?;
    for (uid, pod) in [
        (&near_uid, "checkout-5f7c9d8b4-q8x2z"),
        (&far_uid, "billing-5f7c9d8b4-q8x2z"),
    ] {
        let windows: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "latency" && e["op"] == "GET" && e["pod_uid"] == uid.as_str())
            .collect();
        assert!(!windows.is_empty(), "no GET window of {pod}");
        for window in windows {
            assert_eq!(window["namespace"], "shop", "{window}");
            assert_eq!(window["pod"], pod, "{window}");
            assert_eq!(window["endpoint"]["zone"], "zone-a", "{window}");
        }
    }
    Ok(())
}

/// Redis restarted under load: the clients' reconnects are refused while it
/// is down (as many refused connects as the client saw refusals), then
/// connect again; `connect` windows show both.
#[test]
fn a_redis_restart_under_load_shows_refused_connects_and_recovery() -> anyhow::Result<()> {
    let _serial = serial();
    let port = free_port();
    let mut server = RedisServer::start_on(port, &[])?;
    let mut agent = Agent::start(&[port], &["--interval", "1s"])?;
    // Refused reconnects may rightly raise alerts.
    agent.expect_alerts(&["retry_storm"]);

    let python = clients_dir().join("venv/bin/python");
    // One connection per attempt, 20 ms apart, for 6 s: how production
    // health checks and naive clients behave; the client counts outcomes.
    let script = format!(
        r#"
import time, redis
ok = refused = 0
deadline = time.monotonic() + 6
while time.monotonic() < deadline:
    try:
        redis.Redis(host="127.0.0.1", port={port}, socket_connect_timeout=1).ping()
        ok += 1
    except redis.exceptions.ConnectionError as e:
        # Refused while down; a request in flight at the kill is reset.
        if "refused" in str(e).lower(): refused += 1
    time.sleep(0.02)
print(ok, refused)
"#
    );
    let mut client = std::process::Command::new(&python)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()?;
    // Down for about a second, in the middle of the load.
    std::thread::sleep(Duration::from_secs(2));
    server.stop();
    std::thread::sleep(Duration::from_secs(1));
    let _restarted = RedisServer::start_on(port, &[])?;
    let output = client.wait()?;
    assert!(output.success());
    let mut said = String::new();
    std::io::Read::read_to_string(client.stdout.as_mut().unwrap(), &mut said)?;
    let counts: Vec<u64> = said
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let (ok, refused) = (counts[0], counts[1]);
    assert!(
        refused > 0 && ok > 0,
        "client saw {ok} ok, {refused} refused"
    );

    agent.barrier()?;
    let events = agent.stop()?;
    // The client's connects (not the test's own readiness probes).
    let connects: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["type"] == "connect" && e["dst"]["port"] == port && e["src"]["pid"] == client.id()
        })
        .collect();
    let refused_seen = connects
        .iter()
        .filter(|e| e["outcome"] == "refused")
        .count() as u64;
    assert_eq!(refused_seen, refused, "refused connects");
    let last_refused = connects
        .iter()
        .rposition(|e| e["outcome"] == "refused")
        .unwrap();
    assert!(
        connects[last_refused..]
            .iter()
            .any(|e| e["outcome"] == "established"),
        "connects recover after the restart"
    );
    let all_refused = events
        .iter()
        .filter(|e| e["type"] == "connect" && e["dst"]["port"] == port && e["outcome"] == "refused")
        .count() as u64;
    let windows_refused: u64 = events
        .iter()
        .filter(|e| e["type"] == "latency" && e["op"] == "connect" && e["endpoint"]["port"] == port)
        .map(|w| w["errors"]["refused"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        windows_refused, all_refused,
        "connect windows count every refusal"
    );
    Ok(())
}

/// `redis-benchmark -c 50` for a minute: a steady pool, no alert.
#[test]
fn a_steady_benchmark_for_a_minute_raises_no_alert() -> anyhow::Result<()> {
    let _serial = serial();
    let server = RedisServer::start()?;
    let port = server.port;
    let agent = Agent::start(&[port], &["--interval", "5s"])?;
    let mut benchmark = lab::Process::spawn(
        std::process::Command::new("redis-benchmark")
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "50",
                "-n",
                "1000000000",
                "-t",
                "get,set",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let minute = scaled(Duration::from_secs(60));
    let started = Instant::now();
    assert!(
        !wait_until(minute, || { benchmark.ensure_running().is_err() }),
        "redis-benchmark stopped early"
    );
    assert!(started.elapsed() >= minute);
    drop(benchmark);
    let events = agent.stop()?;
    let raised: Vec<&Value> = events.iter().filter(|e| e["type"] == "alert").collect();
    assert!(raised.is_empty(), "false alarms: {raised:#?}");
    let requests: u64 = events
        .iter()
        .filter(|e| e["type"] == "latency" && e["role"] == "client")
        .map(|w| w["count"].as_u64().unwrap())
        .sum();
    assert!(requests > 100_000, "the benchmark ran: {requests} requests");
    Ok(())
}
