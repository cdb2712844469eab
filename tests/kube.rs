//! Kubernetes names (`agent/src/kube.rs`): the real agent, pointed with
//! `--kubeconfig` at a fake API server (`lab::kubeapi`: no API server can
//! run here) that serves a lab pod's real UID. Its requests to a real
//! redis-server carry the pod's namespace, name and owner; the watches
//! apply changes, resume from the last resourceVersion, relist on 410 Gone,
//! and the agent traces on while the API is down.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use lab::{
    Agent, Lab, event_timeout, free_port,
    kubeapi::{FakeApi, PodSpec, node},
    scaled, serial,
};
use serde_json::{Value, json};

const NODE: &str = "ip-10-0-0-10.ec2.internal";
const ZONE: &str = "us-east-1a";

fn pod_json(uid: &str, name: &str, ip: Ipv4Addr, app: &str) -> Value {
    PodSpec {
        uid,
        namespace: "shop",
        name,
        node: NODE,
        ip,
        labels: json!({ "app": app, "pod-template-hash": "7d9f8b6c5d" }),
        owner: Some(("ReplicaSet", "api-7d9f8b6c5d")),
    }
    .json()
}

fn agent_args<'a>(api: &'a FakeApi, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--kubeconfig",
        api.kubeconfig().to_str().unwrap(),
        "--node-name",
        NODE,
        "--stats-interval",
        "200ms",
    ];
    args.extend_from_slice(extra);
    args
}

/// Waits for a new `stats` line (those read past before are dropped) whose
/// `kubernetes` object satisfies `check`.
fn kube_stats(agent: &mut Agent, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    agent.take_seen(|e| e["type"] == "stats");
    agent
        .wait_for(scaled(Duration::from_secs(20)), |e| {
            e["type"] == "stats" && check(&e["kubernetes"])
        })
        .map(|e| e["kubernetes"].clone())
}

fn pod_watches(api: &FakeApi) -> Vec<lab::kubeapi::Request> {
    api.requests()
        .into_iter()
        .filter(|r| r.resource == "pods" && r.watch)
        .collect()
}

fn pod_lists(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.resource == "pods" && !r.watch)
        .count()
}

/// A pod's `redis-cli` requests and connects carry the namespace, pod name,
/// owner (the ReplicaSet's Deployment) and chosen labels the API serves for
/// its UID; the Redis endpoint is named as the Redis pod at its address
/// (`--redis-pod-selector`), the node's zone comes from its label (a Redis
/// in a `--zone-cidr` of that zone is `same_zone`); a
/// MODIFIED pod changes the names of the next requests, a DELETED one
/// removes them.
#[test]
fn requests_of_a_pod_carry_its_names_from_the_api() -> anyhow::Result<()> {
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder().pod("app", 'a').host("redis", 'b').build()?;
    let (app, redis) = (lab.host("app"), lab.host("redis"));
    let uid = app.pod().context("app is a pod")?.uid().to_string();
    let _redis = redis.start_redis(port)?;

    let api = FakeApi::start()?;
    api.apply("nodes", node(NODE, ZONE));
    api.apply(
        "pods",
        pod_json(&uid, "api-7d9f8b6c5d-x2x9q", app.ip(), "api"),
    );
    // Another node's pod, not selected: must not be named.
    api.apply(
        "pods",
        PodSpec {
            uid: "9c0ffee0-0000-4000-8000-00000000abcd",
            namespace: "other",
            name: "elsewhere",
            node: "ip-10-0-9-9.ec2.internal",
            ip: Ipv4Addr::new(10, 0, 9, 9),
            labels: json!({ "app": "web" }),
            owner: Some(("DaemonSet", "web")),
        }
        .json(),
    );
    api.apply(
        "pods",
        PodSpec {
            uid: "7e57ab1e-0000-4000-8000-000000000001",
            namespace: "cache",
            name: "redis-0",
            node: "ip-10-0-33-3.ec2.internal",
            ip: redis.ip(),
            labels: json!({ "app": "redis" }),
            owner: Some(("StatefulSet", "redis")),
        }
        .json(),
    );

    let redis_zone = format!("{}/32={ZONE}", redis.ip());
    let mut agent = Agent::start(
        &[port],
        &agent_args(
            &api,
            &[
                "--emit",
                "all",
                "--interval",
                "1s",
                "--pod-labels",
                "app,team",
                "--redis-pod-selector",
                "app=redis",
                // No --zone: the node's zone is its label's.
                "--zone-cidr",
                &redis_zone,
            ],
        ),
    )?;
    let stats = kube_stats(&mut agent, |k| k["state"] == "connected")?;
    assert_eq!(stats["pods"], 1, "this node's pods only: {stats}");
    assert_eq!(stats["redis_pods"], 1, "{stats}");
    assert_eq!(stats["node_zone"], ZONE, "{stats}");
    let node_watch = api
        .requests()
        .into_iter()
        .find(|r| r.resource == "pods" && r.query.contains_key("fieldSelector"))
        .context("a pod request with a field selector")?;
    assert_eq!(
        node_watch.query["fieldSelector"],
        format!("spec.nodeName={NODE}")
    );

    let ping = |agent: &mut Agent| -> anyhow::Result<Value> {
        let status = app
            .command("redis-cli")
            .args([
                "-h",
                &redis.ip().to_string(),
                "-p",
                &port.to_string(),
                "ping",
            ])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "redis-cli failed");
        agent.wait_for(event_timeout(), |e| {
            e["type"] == "request" && e["role"] == "client" && e["pod_uid"] == uid.as_str()
        })
    };
    let request = ping(&mut agent)?;
    assert_eq!(request["namespace"], "shop", "{request}");
    assert_eq!(request["pod"], "api-7d9f8b6c5d-x2x9q", "{request}");
    assert_eq!(request["workload"], "deployment/api", "{request}");
    assert_eq!(request["labels"], json!({ "app": "api" }), "{request}");
    assert_eq!(request["dst"]["namespace"], "cache", "{request}");
    assert_eq!(request["dst"]["pod"], "redis-0", "{request}");
    assert_eq!(request["dst"]["workload"], "statefulset/redis", "{request}");
    assert_eq!(request["dst"]["locality"], "same_zone", "{request}");

    let connect = agent.wait_for(event_timeout(), |e| {
        e["type"] == "connect" && e["src"]["pod_uid"] == uid.as_str()
    })?;
    assert_eq!(connect["src"]["pod"], "api-7d9f8b6c5d-x2x9q", "{connect}");
    assert_eq!(connect["src"]["workload"], "deployment/api", "{connect}");
    assert_eq!(connect["dst"]["pod"], "redis-0", "{connect}");
    let latency = agent.wait_for(scaled(Duration::from_secs(5)), |e| {
        e["type"] == "latency" && e["role"] == "client" && e["pod_uid"] == uid.as_str()
    })?;
    assert_eq!(latency["namespace"], "shop", "{latency}");
    assert_eq!(latency["workload"], "deployment/api", "{latency}");
    assert_eq!(latency["endpoint"]["pod"], "redis-0", "{latency}");

    // MODIFIED, then a marker pod ADDED after it: once `stats` counts the
    // marker, the change before it on the same watch has been applied.
    api.apply(
        "pods",
        pod_json(&uid, "api-7d9f8b6c5d-x2x9q", app.ip(), "api-v2"),
    );
    let marker = "0a1b2c3d-0000-4000-8000-0000000000ff";
    api.apply(
        "pods",
        pod_json(marker, "api-marker", Ipv4Addr::new(10, 0, 1, 99), "api"),
    );
    kube_stats(&mut agent, |k| k["pods"] == 2)?;
    let relabelled = ping(&mut agent)?;
    assert_eq!(relabelled["labels"]["app"], "api-v2", "{relabelled}");

    // DELETED: the pod's requests carry its UID only.
    api.delete("pods", &uid);
    kube_stats(&mut agent, |k| k["pods"] == 1)?;
    let unnamed = ping(&mut agent)?;
    assert!(unnamed.get("namespace").is_none(), "{unnamed}");
    assert_eq!(unnamed["pod_uid"], uid.as_str());
    assert_eq!(pod_lists(&api), 2, "one list per pod watch, no relist");
    agent.stop()?;
    Ok(())
}

/// A broken watch resumes from the last resourceVersion the agent saw — a
/// BOOKMARK's — without a relist; a 410 Gone on resuming (an ERROR event,
/// or the HTTP status) forces a relist, which drops a pod deleted while the
/// history was compacted.
#[test]
fn watches_resume_from_the_last_resource_version_and_relist_on_410() -> anyhow::Result<()> {
    let _serial = serial();
    let api = FakeApi::start()?;
    api.apply("nodes", node(NODE, ZONE));
    let ip = Ipv4Addr::new(10, 0, 1, 5);
    let uids = [
        "0a1b2c3d-0000-4000-8000-000000000001",
        "0a1b2c3d-0000-4000-8000-000000000002",
        "0a1b2c3d-0000-4000-8000-000000000003",
    ];
    api.apply("pods", pod_json(uids[0], "api-1", ip, "api"));
    let mut agent = Agent::start(&[free_port()], &agent_args(&api, &[]))?;
    kube_stats(&mut agent, |k| k["state"] == "connected" && k["pods"] == 1)?;
    assert_eq!(pod_lists(&api), 1);

    api.apply("pods", pod_json(uids[1], "api-2", ip, "api"));
    kube_stats(&mut agent, |k| k["pods"] == 2)?;

    // A bookmark moves the resourceVersion past every object's; the resumed
    // watch asks for exactly it.
    let bookmark = api.bookmark();
    let watches_before = pod_watches(&api).len();
    // Written to the pod watch before the stream ends, so read before its end.
    assert!(
        lab::wait_until(scaled(Duration::from_secs(5)), || api.delivered("pods")
            >= bookmark),
        "the bookmark was not sent"
    );
    api.break_watches();
    assert!(
        lab::wait_until(scaled(Duration::from_secs(10)), || pod_watches(&api).len()
            > watches_before),
        "the pod watch was not resumed"
    );
    let resumed = pod_watches(&api).pop().unwrap();
    assert_eq!(
        resumed.query.get("resourceVersion").map(String::as_str),
        Some(bookmark.to_string().as_str()),
        "resumed from the bookmark: {resumed:?}"
    );
    assert_eq!(
        resumed.query["fieldSelector"],
        format!("spec.nodeName={NODE}")
    );
    assert_eq!(pod_lists(&api), 1, "resumed without a relist");
    api.apply("pods", pod_json(uids[2], "api-3", ip, "api"));
    kube_stats(&mut agent, |k| k["pods"] == 3)?;

    // History compacted past the agent's resourceVersion, and a pod deleted
    // with it: only a relist can tell.
    api.delete_silently("pods", uids[1]);
    api.compact();
    api.break_watches();
    let stats = kube_stats(&mut agent, |k| k["pods"] == 2 && k["state"] == "connected")?;
    assert_eq!(pod_lists(&api), 2, "a 410 forces one relist: {stats}");

    // The same told as the watch request's HTTP status.
    api.gone_as_http(true);
    api.delete_silently("pods", uids[2]);
    api.compact();
    api.break_watches();
    let stats = kube_stats(&mut agent, |k| k["pods"] == 1 && k["state"] == "connected")?;
    assert_eq!(pod_lists(&api), 3, "an HTTP 410 forces one relist: {stats}");
    let stderr = agent.stderr();
    assert!(
        !stderr.contains("unavailable"),
        "a 410 is the protocol, not an outage:\n{stderr}"
    );
    agent.stop()?;
    Ok(())
}

/// With the API down at start the agent traces (a pod's requests carry its
/// UID), says so once on stderr and in `stats`, retries, and names the pod
/// once the API answers; the same after a later outage (503 answers).
#[test]
fn the_agent_traces_while_the_api_is_down_and_names_pods_once_it_is_up() -> anyhow::Result<()> {
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder().pod("app", 'a').host("redis", 'b').build()?;
    let (app, redis) = (lab.host("app"), lab.host("redis"));
    let uid = app.pod().context("app is a pod")?.uid().to_string();
    let _redis = redis.start_redis(port)?;
    let api = FakeApi::reserve()?;
    api.apply("nodes", node(NODE, ZONE));
    api.apply("pods", pod_json(&uid, "api-1", app.ip(), "api"));
    let mut agent = Agent::start(&[port], &agent_args(&api, &["--emit", "all"]))?;
    let down = kube_stats(&mut agent, |k| k["state"] == "unavailable")?;
    assert_eq!(down["pods"], 0);
    assert!(
        down["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );
    let ping = |agent: &mut Agent| -> anyhow::Result<Value> {
        let status = app
            .command("redis-cli")
            .args([
                "-h",
                &redis.ip().to_string(),
                "-p",
                &port.to_string(),
                "ping",
            ])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "redis-cli failed");
        agent.wait_for(event_timeout(), |e| {
            e["type"] == "request" && e["role"] == "client" && e["pod_uid"] == uid.as_str()
        })
    };
    // Tracing goes on meanwhile, with the pod's UID.
    let unnamed = ping(&mut agent)?;
    assert!(unnamed.get("namespace").is_none(), "{unnamed}");

    api.listen()?;
    let up = kube_stats(&mut agent, |k| k["state"] == "connected" && k["pods"] == 1)?;
    assert_eq!(up["node_zone"], ZONE);
    let named = ping(&mut agent)?;
    assert_eq!(named["namespace"], "shop", "{named}");
    assert_eq!(named["pod"], "api-1", "{named}");

    // Down again (the API answers 503), then back: still one warning per outage.
    api.fail_with(Some(503));
    api.break_watches();
    let down_again = kube_stats(&mut agent, |k| k["state"] == "unavailable")?;
    assert!(
        down_again["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{down_again}"
    );
    api.fail_with(None);
    api.apply(
        "pods",
        pod_json(
            "0a1b2c3d-0000-4000-8000-00000000000b",
            "api-2",
            Ipv4Addr::new(10, 0, 1, 6),
            "api",
        ),
    );
    kube_stats(&mut agent, |k| k["state"] == "connected" && k["pods"] == 2)?;
    let stderr = agent.stderr();
    assert_eq!(
        stderr.matches("kubernetes API unavailable").count(),
        2,
        "one warning per outage:\n{stderr}"
    );
    agent.stop()?;
    Ok(())
}

/// A plain HTTP/1.0 GET of `/metrics`.
fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(event_timeout()))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// With `--watch-services`, a Redis endpoint that is a Service's ClusterIP
/// is named as the Service (the lab has no kube-proxy: the Service's
/// address is the Redis host's own); `/metrics` names the pod and the
/// Service in its info series, joined on `workload` and `endpoint`.
#[test]
fn a_service_endpoint_is_named_and_metrics_carry_names_as_info() -> anyhow::Result<()> {
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder().pod("app", 'a').host("redis", 'b').build()?;
    let (app, redis) = (lab.host("app"), lab.host("redis"));
    let uid = app.pod().context("app is a pod")?.uid().to_string();
    let _redis = redis.start_redis(port)?;

    let api = FakeApi::start()?;
    api.apply("nodes", node(NODE, ZONE));
    api.apply(
        "pods",
        pod_json(&uid, "api-7d9f8b6c5d-x2x9q", app.ip(), "api"),
    );
    api.apply(
        "services",
        json!({
            "metadata": { "name": "redis", "namespace": "cache", "uid": "5e7a1ce0-0000-4000-8000-000000000001" },
            "spec": { "type": "ClusterIP", "clusterIP": redis.ip().to_string(),
                      "clusterIPs": [redis.ip().to_string()],
                      "ports": [{ "port": port, "targetPort": port, "protocol": "TCP" }] },
        }),
    );
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http_arg = http.to_string();
    let mut agent = Agent::start(
        &[port],
        &agent_args(
            &api,
            &[
                "--watch-services",
                "--interval",
                "1s",
                "--http-addr",
                &http_arg,
            ],
        ),
    )?;
    let stats = kube_stats(&mut agent, |k| k["state"] == "connected")?;
    assert_eq!(stats["services"], 1, "{stats}");

    let status = app
        .command("redis-cli")
        .args([
            "-h",
            &redis.ip().to_string(),
            "-p",
            &port.to_string(),
            "ping",
        ])
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "redis-cli failed");
    let connect = agent.wait_for(event_timeout(), |e| {
        e["type"] == "connect" && e["src"]["pod_uid"] == uid.as_str()
    })?;
    assert_eq!(connect["dst"]["service"], "redis", "{connect}");
    assert_eq!(connect["dst"]["namespace"], "cache", "{connect}");
    assert!(connect["dst"].get("pod").is_none(), "{connect}");
    assert_eq!(connect["src"]["namespace"], "shop", "{connect}");

    // The info series are written with the next window's metrics.
    let endpoint = format!("{}:{port}", redis.ip());
    let workload_info = format!(
        r#"resptrace_workload_info{{workload="pod:{uid}",namespace="shop",pod="api-7d9f8b6c5d-x2x9q",owner="deployment/api"}} 1"#
    );
    let endpoint_info = format!(
        r#"resptrace_endpoint_info{{endpoint="{endpoint}",namespace="cache",pod="",owner="",service="redis"}} 1"#
    );
    let mut metrics = String::new();
    let named = lab::wait_until(scaled(Duration::from_secs(10)), || {
        metrics = scrape(http).unwrap_or_default();
        metrics.contains(&workload_info) && metrics.contains(&endpoint_info)
    });
    assert!(named, "no info series in:\n{metrics}");
    agent.stop()?;
    Ok(())
}

/// A kubeconfig that cannot be read is a mistake to fix, not an outage to
/// wait out: the agent stops with one line naming it.
#[test]
fn an_unreadable_kubeconfig_stops_the_agent_naming_it() -> anyhow::Result<()> {
    let _serial = serial();
    let output = std::process::Command::new(lab::agent_binary())
        .args([
            "--ports",
            &free_port().to_string(),
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "resptrace: error: --kubernetes: reading kubeconfig /nonexistent/kubeconfig"
        ),
        "{stderr}"
    );
    Ok(())
}
