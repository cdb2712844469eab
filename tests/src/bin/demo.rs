//! `cargo xtask demo`: the seed incidents, one after another, in a small
//! world built with the lab, with the real agent watching. Narration on
//! stderr; the agent's alerts on stdout as they arrive, pods named through
//! a stand-in Kubernetes API. Each act waits (with a deadline) for the
//! alerts a person would act on and prints what the clients measured
//! themselves next to them; the exit code is 1 if any did not come.
//!
//! ```text
//!  zone a (10.1.0.0/24)                         zone b (10.2.0.0/24)
//!  checkout-1..3 (pods)  redis-a (primary)  ─── redis-b (replica)  reports (pod)
//!                                 └──── +2 ms each way (delay line) ───────┘
//! ```

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    process::{ChildStdout, Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, channel},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use lab::{
    Agent, Fault, Host, Lab, Path, Place, Process, Workload,
    clients::clients_dir,
    kubeapi::{self, FakeApi, PodSpec},
    scaled, wait_until,
};
use serde_json::Value;

const PORT: u16 = 6379;
/// Both servers run with it, and the agent is told (`--pool-pressure-maxclients`).
const MAXCLIENTS: u64 = 200;
const NODE: &str = "ip-10-1-0-10.ec2.internal";
const ZONES: &str = "10.1.0.0/24=zone-a,10.2.0.0/24=zone-b";
/// Per new pod in act 1.
const POOL_SIZE: u32 = 60;
const CONNECTS_PER_S: u32 = 100;
const SCALE_UP_S: u32 = 8;
/// Act 2's client: redis-py's connect timeout and attempts per request.
const CONNECT_TIMEOUT_S: u32 = 2;
const ATTEMPTS: u32 = 6;
/// Act 3's writer: how long it caches the primary endpoint's address.
const DNS_TTL_S: u32 = 4;
const WRITES_PER_S: u32 = 50;
/// Act 4: added to each direction of the reports ↔ redis-a path.
const CROSS_ZONE_DELAY: Duration = Duration::from_millis(2);
/// `--resolve-after`: short, so that act 3's recovery shows within the demo.
const RESOLVE_AFTER: &str = "5s";

fn main() -> ExitCode {
    let started = Instant::now();
    let result = run();
    let took = started.elapsed().as_secs();
    match result {
        Ok(missed) if missed.is_empty() => {
            eprintln!("\nAll four incidents detected, in {took} s.");
            ExitCode::SUCCESS
        }
        Ok(missed) => {
            eprintln!("\nNOT DETECTED ({took} s):");
            for miss in missed {
                eprintln!("  - {miss}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\ndemo: error after {took} s: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn narrate(text: &str) {
    eprintln!("{text}");
}

/// `narrate` with a leading blank line and a rule: the start of an act.
fn act(title: &str, text: &str) {
    eprintln!("\n━━ {title} ━━\n{text}");
}

/// The world: lab hosts, servers, the fake API, the agent.
struct World<'lab> {
    lab: &'lab Lab,
    agent: Agent,
    api: FakeApi,
    /// What each act expected and did not see.
    missed: Vec<String>,
    /// Guards kept for the whole demo.
    _servers: Vec<Process>,
    _delay: lab::FaultGuard<'lab>,
}

fn run() -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        // SAFETY: no arguments, cannot fail.
        unsafe { libc::geteuid() } == 0,
        "the demo creates network namespaces and loads eBPF programs: run it as root \
         (`cargo xtask demo` checks this)"
    );
    narrate(
        "Building the world: node ip-10-1-0-10 (zone-a) runs pods checkout-1..3 in zone a and \
         reports in zone b (network namespaces behind a router, kubelet-shaped cgroups);\n\
         redis-a (primary, zone a) and redis-b (its replica, zone b), maxclients 200; \
         the reports ↔ redis-a path crosses zones: a delay line adds 2 ms each way.",
    );
    let lab = Lab::builder()
        .pod("checkout-1", 'a')
        .pod("checkout-2", 'a')
        .pod("checkout-3", 'a')
        .pod("redis-a", 'a')
        .pod("redis-b", 'b')
        .pod("reports", 'b')
        .build()
        .context("building the lab")?;
    let (redis_a, redis_b) = (lab.host("redis-a"), lab.host("redis-b"));
    let maxclients = MAXCLIENTS.to_string();
    let primary = redis_a.start_redis_with(PORT, &["--maxclients", &maxclients])?;
    let replica = redis_b.start_redis_with(
        PORT,
        &[
            "--maxclients",
            &maxclients,
            "--replicaof",
            &redis_a.ip().to_string(),
            &PORT.to_string(),
        ],
    )?;
    let replicating = wait_until(scaled(Duration::from_secs(15)), || {
        info_field(redis_b, "replication", "master_link_status").is_ok_and(|s| s == "up")
    });
    anyhow::ensure!(replicating, "redis-b did not start replicating redis-a");
    let delay = lab.inject(
        Path::between(lab.host("reports").ip(), redis_a.ip(), PORT).both_ways(),
        Fault::delay(CROSS_ZONE_DELAY),
    )?;

    let api = FakeApi::start()?;
    api.apply("nodes", kubeapi::node(NODE, "zone-a"));
    register(&api, lab.host("checkout-1"), "shop", "checkout")?;
    register(&api, lab.host("reports"), "shop", "reports")?;
    register(&api, redis_a, "data", "redis")?;
    register(&api, redis_b, "data", "redis")?;
    let kubeconfig = api.kubeconfig().to_str().context("kubeconfig path")?;
    let mut agent = Agent::start_tapped(
        Command::new(lab::agent_binary()),
        &[PORT],
        &[
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            NODE,
            "--zone-cidr",
            ZONES,
            "--interval",
            "1s",
            "--stats-interval",
            "1s",
            "--cross-zone-window",
            "2s",
            "--resolve-after",
            RESOLVE_AFTER,
            "--pool-pressure-maxclients",
            &maxclients,
        ],
        |event| {
            if event["type"] == "alert" {
                println!("{}", render_alert(event));
            }
        },
    )
    .context("starting the agent")?;
    agent.wait_for(scaled(Duration::from_secs(15)), |e| {
        e["type"] == "stats" && e["kubernetes"]["state"] == "connected"
    })?;
    narrate(&format!(
        "resptrace {} is watching port {PORT} (--interval 1s, --resolve-after {RESOLVE_AFTER}, \
         --pool-pressure-maxclients {MAXCLIENTS}, --zone-cidr {ZONES}; names from a stand-in \
         Kubernetes API). Its alerts follow on stdout.",
        agent.started()["version"].as_str().unwrap_or("?")
    ));

    let mut world = World {
        lab: &lab,
        agent,
        api,
        missed: Vec::new(),
        _servers: vec![primary, replica],
        _delay: delay,
    };
    type Act = fn(&mut World) -> anyhow::Result<()>;
    let acts: [(&str, Act); 4] = [
        ("act 1 (scale-up)", scale_up),
        ("act 2 (dropped SYNs)", dropped_syns),
        ("act 3 (failover)", failover),
        ("act 4 (cross-zone reads)", cross_zone),
    ];
    for (name, play) in acts {
        // An act is detected by alerts raised while it plays: what earlier
        // acts raised cannot count for it.
        drop(world.agent.take_seen(|_| true));
        if let Err(e) = play(&mut world) {
            // The agent gone ends the demo; anything else ends the act only.
            if world.agent.exited() {
                return Err(e.context(format!("{name}: the agent exited")));
            }
            narrate(&format!("!! {name} failed: {e:#}"));
            world.missed.push(format!("{name} failed: {e:#}"));
        }
    }
    let World {
        mut agent, missed, ..
    } = world;
    agent.expect_alerts(ALERT_KINDS);
    agent.stop().context("stopping the agent")?;
    Ok(missed)
}

/// Every kind the agent raises: the demo shows them all, whichever fire.
const ALERT_KINDS: &[&str] = &[
    "connect_storm",
    "retry_storm",
    "syn_drops",
    "retransmits",
    "error_replies",
    "slow_commands",
    "timeouts",
    "cross_zone_latency",
    "pool_pressure",
];

/// Tells the fake API about a lab pod: `redis` pods as StatefulSet
/// `redis`'s (redis-a → redis-0), others as Deployment `app`'s
/// (checkout-2 → checkout-5f7c9d8b4-x2, reports → reports-5f7c9d8b4-x1).
fn register(api: &FakeApi, host: &Host, namespace: &str, app: &str) -> anyhow::Result<()> {
    let pod = host.pod().context("a lab pod")?;
    // The host's number, if any: checkout-2 → 2, redis-a → a, reports → 1.
    let suffix = match host.name().rsplit_once('-') {
        Some((_, suffix)) => suffix,
        None => "1",
    };
    let (name, owner, hash) = if app == "redis" {
        let ordinal = if suffix == "a" { 0 } else { 1 };
        (
            format!("redis-{ordinal}"),
            ("StatefulSet", app.to_string()),
            None,
        )
    } else {
        let replica_set = format!("{app}-5f7c9d8b4");
        (
            format!("{replica_set}-x{suffix}"),
            ("ReplicaSet", replica_set),
            Some("5f7c9d8b4"),
        )
    };
    let mut labels = serde_json::json!({ "app": app });
    if let Some(hash) = hash {
        labels["pod-template-hash"] = hash.into();
    }
    api.apply(
        "pods",
        PodSpec {
            uid: pod.uid(),
            namespace,
            name: &name,
            node: NODE,
            ip: host.ip(),
            labels,
            owner: Some((owner.0, &owner.1)),
        }
        .json(),
    );
    Ok(())
}

impl World<'_> {
    /// Waits up to `within` for an alert matching `matches`; a miss is
    /// narrated and remembered, not an error.
    fn expect(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Option<Value>> {
        // Keep only alerts from what was read so far: the rest is not needed.
        drop(self.agent.take_seen(|e| e["type"] != "alert"));
        match self
            .agent
            .wait_for(scaled(within), |e| e["type"] == "alert" && matches(e))
        {
            Ok(alert) => Ok(Some(alert)),
            // The harness's timeout is a miss; anything else (the agent
            // gone, a line off the schema) ends the demo.
            Err(e) if format!("{e}").starts_with("no matching event") => {
                narrate(&format!(
                    "!! expected {what} within {within:?}: NOT DETECTED"
                ));
                self.missed.push(what.to_string());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

fn firing(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["kind"] == kind && e["state"] == "firing"
}

/// Act 1: two new pods each open a pool and serve requests without
/// connection reuse.
fn scale_up(world: &mut World) -> anyhow::Result<()> {
    act(
        "Act 1: checkout scales out from 1 to 3 pods",
        &format!(
            "Each new pod (redis-py) opens a pool of {POOL_SIZE} connections to redis-a and keeps it, \
             and serves its requests on a fresh connection each (no reuse): {CONNECTS_PER_S} connects/s \
             per pod for {SCALE_UP_S} s.\n\
             An SRE should see: connect_storm on redis-a naming the new pods, and pool_pressure: \
             this node holds more than half of redis-a's maxclients ({MAXCLIENTS})."
        ),
    );
    let lab = world.lab;
    let redis_a = lab.host("redis-a");
    let mut pods = Vec::new();
    for name in ["checkout-2", "checkout-3"] {
        let host = lab.host(name);
        register(&world.api, host, "shop", "checkout")?;
        let mut process = host.spawn(
            python(host)?
                .args(["scale-up", &redis_a.ip().to_string(), &PORT.to_string()])
                .args([POOL_SIZE, CONNECTS_PER_S, SCALE_UP_S].map(|n| n.to_string()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        let lines = JsonLines::of(&mut process)?;
        pods.push((name, process, lines));
    }
    for (name, _, lines) in &pods {
        lines.next(scaled(Duration::from_secs(20)), name)?;
    }
    world.expect(
        "connect_storm (act 1)",
        Duration::from_secs(u64::from(SCALE_UP_S) + 10),
        firing("connect_storm"),
    )?;
    world.expect("pool_pressure (act 1)", Duration::from_secs(15), |e| {
        firing("pool_pressure")(e) && e["evidence"]["reason"] == "maxclients_share"
    })?;
    let (mut connects, mut seconds) = (0, 0.0_f64);
    for (name, _, lines) in &pods {
        let done = lines.next(scaled(Duration::from_secs(30)), name)?;
        connects += done["connects"].as_u64().context("connects")?;
        seconds = seconds.max(done["seconds"].as_f64().context("seconds")?);
    }
    // Asked only now: the demo's own connect would join the storm's
    // workloads (and make it look like a fleet reconnecting).
    let connected = info_field(redis_a, "clients", "connected_clients")?;
    narrate(&format!(
        "Measured by the pods: {} pooled connections held, and {connects} more connects in \
         {seconds:.1} s ({:.0}/s); redis-a counts connected_clients {connected} of maxclients \
         {MAXCLIENTS}.",
        2 * POOL_SIZE,
        connects as f64 / seconds
    ));
    for (_, mut process, _) in pods {
        // EOF on stdin: the pod's app closes its pool and exits.
        drop(process.child_mut().stdin.take());
        process.child_mut().wait()?;
    }
    Ok(())
}

/// Act 2: SYNs dropped while a client retries behind its connect timeout.
fn dropped_syns(world: &mut World) -> anyhow::Result<()> {
    act(
        "Act 2: a security-group rule drops SYNs from checkout-1 to redis-a",
        &format!(
            "checkout-1's redis-py client: socket_connect_timeout={CONNECT_TIMEOUT_S}, {ATTEMPTS} \
             attempts per request, no backoff.\n\
             An SRE should see: syn_drops on redis-a, and retry_storm for checkout-1 with how long \
             its callers wait."
        ),
    );
    let lab = world.lab;
    let (app, redis_a) = (lab.host("checkout-1"), lab.host("redis-a"));
    let rule = lab.inject(Path::between(app.ip(), redis_a.ip(), PORT), Fault::DropSyn)?;
    let mut client = app.spawn(
        python(app)?
            .args(["connect", &redis_a.ip().to_string(), &PORT.to_string()])
            .args([CONNECT_TIMEOUT_S, ATTEMPTS].map(|n| n.to_string()))
            .stdout(Stdio::piped()),
    )?;
    let said = JsonLines::of(&mut client)?.next(scaled(Duration::from_secs(60)), "client")?;
    drop(rule);
    narrate(&format!(
        "Measured: the caller got {} ({}) after waiting {} s.",
        said["error"].as_str().unwrap_or("?"),
        said["message"].as_str().unwrap_or(""),
        said["waited_s"]
    ));
    world.expect(
        "syn_drops (act 2)",
        Duration::from_secs(10),
        firing("syn_drops"),
    )?;
    let retry = world.expect(
        "retry_storm (act 2)",
        Duration::from_secs(10),
        firing("retry_storm"),
    )?;
    if retry.is_some() {
        narrate(
            "It fired mid-request, by the third failed attempt. Once the request is over, its \
             resolution tells what it cost:",
        );
    }
    let over = world.expect(
        "retry_storm resolved (act 2)",
        Duration::from_secs(20),
        |e| e["kind"] == "retry_storm" && e["state"] == "resolved",
    )?;
    if let Some(over) = over {
        narrate(&format!(
            "The agent, from the wire: {} attempts per request, callers waited ~{} s; the \
             client: {} attempts, {} s.",
            over["evidence"]["attempts_per_request"],
            over["evidence"]["caller_wait_s"],
            ATTEMPTS,
            said["waited_s"]
        ));
    }
    Ok(())
}

/// Act 3: a planned failover while a client writes through a cached
/// endpoint address.
fn failover(world: &mut World) -> anyhow::Result<()> {
    act(
        "Act 3: failover: redis-a hands the primary role to redis-b (FAILOVER)",
        &format!(
            "checkout-1 writes {WRITES_PER_S} SETs/s to the primary endpoint and caches its DNS \
             record for {DNS_TTL_S} s; the failover starts just after a refresh, so it keeps \
             writing to redis-a, now a replica, for up to {DNS_TTL_S} s.\n\
             An SRE should see: error_replies (READONLY) on redis-a, then its resolution with the \
             time to recover."
        ),
    );
    let lab = world.lab;
    let (app, redis_a, redis_b) = (
        lab.host("checkout-1"),
        lab.host("redis-a"),
        lab.host("redis-b"),
    );
    let endpoint = EndpointRecord::new(redis_a.ip())?;
    let mut writer = app.spawn(
        python(app)?
            .args(["writer", endpoint.path_str()?, &PORT.to_string()])
            .args([DNS_TTL_S, WRITES_PER_S, 60].map(|n| n.to_string()))
            .stdout(Stdio::piped()),
    )?;
    let lines = JsonLines::of(&mut writer)?;
    // The first resolution, then the second: writes are flowing, and the
    // stale record will live a whole TTL.
    for _ in 0..2 {
        loop {
            let line = lines.next(scaled(Duration::from_secs(20)), "writer")?;
            if line.get("resolved").is_some() {
                break;
            }
        }
    }
    let failover_at = SystemTime::now();
    let redis_b_addr = SocketAddr::new(redis_b.ip().into(), PORT);
    let _: String = Place::Host(redis_a).query(
        SocketAddr::new(redis_a.ip().into(), PORT),
        redis::cmd("FAILOVER")
            .arg("TO")
            .arg(redis_b.ip().to_string())
            .arg(PORT)
            .arg("TIMEOUT")
            .arg(5000),
    )?;
    let promoted = wait_until(scaled(Duration::from_secs(10)), || {
        info_field(redis_b, "replication", "role").is_ok_and(|s| s == "master")
    });
    anyhow::ensure!(promoted, "redis-b did not become the primary");
    // The endpoint's DNS record moves once the new primary is up.
    endpoint.point_to(redis_b.ip())?;
    narrate(&format!(
        "redis-b ({redis_b_addr}) is the primary {:.1} s after FAILOVER; the endpoint record \
         now names it.",
        since(failover_at)
    ));
    let said = loop {
        let line = lines.next(scaled(Duration::from_secs(60)), "writer")?;
        if line.get("writes").is_some() {
            break line;
        }
    };
    let at = |field: &str| said[field].as_f64().map(|t| t - epoch_s(failover_at));
    match (at("first_error"), at("last_error"), at("recovered")) {
        (Some(first), Some(last), Some(recovered)) => narrate(&format!(
            "Measured by the writer: errors {} from +{first:.1} s to +{last:.1} s after \
             FAILOVER; first good write +{recovered:.1} s: time to recover {:.1} s.",
            said["errors"],
            recovered - first
        )),
        _ => narrate(&format!("Measured by the writer: {said}")),
    }
    world.expect(
        "error_replies (act 3)",
        Duration::from_secs(5),
        firing("error_replies"),
    )?;
    let resolved = world.expect(
        "error_replies resolved (act 3)",
        Duration::from_secs(20),
        |e| e["kind"] == "error_replies" && e["state"] == "resolved",
    )?;
    if let Some(resolved) = resolved {
        narrate(&format!(
            "The agent's time to recover, first failover reply to last: {} s.",
            resolved["evidence"]["time_to_recover_s"]
        ));
    }
    Ok(())
}

/// Act 4: a pod in zone b reading from a Redis in zone a.
fn cross_zone(world: &mut World) -> anyhow::Result<()> {
    act(
        "Act 4: reports (zone b) reads from redis-a (zone a)",
        &format!(
            "Both pods send GETs to redis-a, unpipelined: checkout-1 from zone a, reports across \
             zones (+{CROSS_ZONE_DELAY:?} each way), though redis-b is in its own zone.\n\
             An SRE should see: cross_zone_latency on redis-a naming reports."
        ),
    );
    let lab = world.lab;
    let (near, far, redis_a) = (
        lab.host("checkout-1"),
        lab.host("reports"),
        lab.host("redis-a"),
    );
    let done = AtomicBool::new(false);
    let reads = |host: &Host| -> anyhow::Result<Vec<u64>> {
        let mut latencies = Vec::new();
        while !done.load(Ordering::Relaxed) {
            let workload = Workload::new(redis_a.ip(), PORT)
                .requests(300)
                .commands(&["GET"]);
            let result = Place::Host(host).redis_py(&workload)?;
            latencies.extend(result.latencies_us.get("GET").into_iter().flatten());
        }
        Ok(latencies)
    };
    let (alert, near_us, far_us) = thread::scope(|scope| {
        let near_side = scope.spawn(|| reads(near));
        let far_side = scope.spawn(|| reads(far));
        let alert = world.expect("cross_zone_latency (act 4)", Duration::from_secs(30), |e| {
            firing("cross_zone_latency")(e)
                && !e["id"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("/mostly_cross_zone")
        });
        done.store(true, Ordering::Relaxed);
        let near_us = near_side.join().expect("near client thread");
        let far_us = far_side.join().expect("far client thread");
        (alert, near_us, far_us)
    });
    let (alert, near_us, far_us) = (alert?, near_us?, far_us?);
    narrate(&format!(
        "Measured by the clients (redis-py, per GET, whole act): checkout-1 p50 {} p99 {} max {}; \
         reports p50 {} p99 {} max {}.",
        ms(percentile(&near_us, 50.0)),
        ms(percentile(&near_us, 99.0)),
        ms(percentile(&near_us, 100.0)),
        ms(percentile(&far_us, 50.0)),
        ms(percentile(&far_us, 99.0)),
        ms(percentile(&far_us, 100.0)),
    ));
    if let Some(alert) = alert {
        narrate(&format!(
            "The agent's p99s on the wire, in the window that fired: {} ms across zones, {} ms \
             within zone a.",
            alert["evidence"]["cross_zone_p99_ms"], alert["evidence"]["same_zone_p99_ms"]
        ));
    }
    Ok(())
}

/// One alert for a person: when, what, where, the agent's own message with
/// pods named, and who is affected.
fn render_alert(alert: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let ts = text(&alert["ts"]);
    let time = ts.get(11..19).unwrap_or(&ts);
    let state = if alert["state"] == "firing" {
        "FIRING"
    } else {
        "resolved"
    };
    let endpoint = &alert["endpoint"];
    let mut where_ = format!("{}:{}", text(&endpoint["ip"]), endpoint["port"]);
    if let Some(pod) = endpoint["pod"].as_str() {
        where_ = format!("{pod} {where_}");
    }
    if let Some(zone) = endpoint["zone"].as_str() {
        where_.push_str(&format!(" ({zone})"));
    }
    let mut message = text(&alert["message"]);
    let mut names = Vec::new();
    for workload in alert["workloads"].as_array().into_iter().flatten() {
        let name = match (workload["namespace"].as_str(), workload["pod"].as_str()) {
            (Some(namespace), Some(pod)) => format!("{namespace}/{pod}"),
            _ => text(&workload["key"]),
        };
        // The agent's messages name workloads by key (`pod:<uid>`).
        message = message.replace(&text(&workload["key"]), &name);
        match workload["workload"].as_str() {
            Some(owner) => names.push(format!("{name} ({owner})")),
            None => names.push(name),
        }
    }
    let mut out = format!(
        "{time} ALERT {state:<8} {:<18} {:<8} {where_}\n         {message}",
        text(&alert["kind"]),
        text(&alert["severity"]),
    );
    if alert["state"] == "firing" && !names.is_empty() {
        out.push_str(&format!("\n         workloads: {}", names.join(", ")));
    }
    out
}

/// The demo's clients (`tests/clients/demo_app.py`) in `host`.
fn python(host: &Host) -> anyhow::Result<Command> {
    let python = clients_dir().join("venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} missing: run `cargo xtask setup`",
        python.display()
    );
    let mut command = host.command(python);
    command.arg(FsPath::new(env!("CARGO_MANIFEST_DIR")).join("clients/demo_app.py"));
    Ok(command)
}

/// A client's stdout, one JSON object per line, read on a thread.
struct JsonLines(Receiver<anyhow::Result<Value>>);

impl JsonLines {
    fn of(process: &mut Process) -> anyhow::Result<Self> {
        let stdout: ChildStdout = process
            .child_mut()
            .stdout
            .take()
            .context("the client's stdout is not piped")?;
        let (sender, receiver) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let parsed = line.context("reading a client's stdout").and_then(|line| {
                    serde_json::from_str(&line).with_context(|| format!("client said {line:?}"))
                });
                if sender.send(parsed).is_err() {
                    break;
                }
            }
        });
        Ok(Self(receiver))
    }

    /// The next line within `timeout`.
    fn next(&self, timeout: Duration, who: &str) -> anyhow::Result<Value> {
        match self.0.recv_timeout(timeout) {
            Ok(line) => line,
            Err(e) => bail!("{who}: no line within {timeout:?} ({e})"),
        }
    }
}

/// A file holding the primary endpoint's address: act 3's DNS record.
struct EndpointRecord(PathBuf);

impl EndpointRecord {
    fn new(ip: Ipv4Addr) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("resptrace-demo-{}", std::process::id()));
        let record = Self(path);
        record.point_to(ip)?;
        Ok(record)
    }

    fn point_to(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        // Renamed into place: the client never reads half a record.
        let partial = self.0.with_extension("new");
        std::fs::write(&partial, ip.to_string())
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &self.0)
            .with_context(|| format!("renaming to {}", self.0.display()))
    }

    fn path_str(&self) -> anyhow::Result<&str> {
        self.0.to_str().context("non-UTF-8 temporary directory")
    }
}

impl Drop for EndpointRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `field` of `INFO section` from the Redis on `host`.
fn info_field(host: &Host, section: &str, field: &str) -> anyhow::Result<String> {
    let info: String = Place::Host(host).query(
        SocketAddr::new(host.ip().into(), PORT),
        redis::cmd("INFO").arg(section),
    )?;
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_string())
        .with_context(|| format!("no {field} in INFO {section} of {}", host.name()))
}

fn epoch_s(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn since(at: SystemTime) -> f64 {
    at.elapsed().unwrap_or_default().as_secs_f64()
}

/// The p-th percentile (0..=100) of `values`, nearest rank; 0 for none.
fn percentile(values: &[u64], p: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or(0)
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}
