//! RESP tracing (`request` and `latency` events), held against what real
//! clients and real servers say: the clients' own counts and timings
//! (`lab::clients`) and the server's `INFO commandstats` — never against the
//! agent itself.
//!
//! Each test gives its Redis servers their own ports (`free_port`) and reads
//! only the agent's events for those endpoints: labs share addresses, and the
//! agent traces every namespace of the node.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lab::{
    Agent, Cluster, Fault, LOSS_ALERTS, Lab, Path, Place, RedisServer, Workload,
    clients::{Benchmark, ClientResult, count_delta},
    cluster::key_in_slots,
    event_timeout, free_port, is_endpoint, request_lines, scaled, serial,
};
use serde_json::Value;

const DEBUG: &[&str] = &["--enable-debug-command", "yes"];

/// Commands the lab's own queries and the clients' setup send (`INFO`,
/// `CONFIG RESETSTAT`, redis-benchmark's `CONFIG GET`, …): not part of
/// any workload, left out of every comparison.
fn is_admin(op: &str) -> bool {
    matches!(
        op.split([' ', '|']).next().unwrap_or(""),
        "INFO" | "CONFIG" | "CLIENT" | "COMMAND" | "HELLO"
    )
}

/// A command name as the agent writes it: `CONFIG|RESETSTAT` (commandstats)
/// is `CONFIG RESETSTAT`.
fn agent_name(commandstats_name: &str) -> String {
    commandstats_name.replace('|', " ").to_ascii_uppercase()
}

fn without_admin(counts: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .filter(|(name, _)| !is_admin(name))
        .map(|(name, &n)| (agent_name(name), n))
        .collect()
}

/// How `addr`'s command counts (`INFO commandstats`, asked from `place`)
/// grew while `run` ran, workload commands only.
fn server_delta<T>(
    place: Place<'_>,
    addr: SocketAddr,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, BTreeMap<String, u64>)> {
    let before = place.server_command_counts(addr)?;
    let result = run()?;
    let after = place.server_command_counts(addr)?;
    Ok((result, without_admin(&count_delta(&before, &after))))
}

/// What the agent's `latency` lines say about one command, summed over windows.
#[derive(Clone, Debug, Default, PartialEq)]
struct OpTally {
    count: u64,
    ok: u64,
    nil: u64,
    timeouts: u64,
    no_reply: u64,
    untimed: u64,
    errors: BTreeMap<String, u64>,
}

/// By command (`op`).
type Tally = BTreeMap<String, OpTally>;

/// The `latency` lines of `role` at `endpoint`, summed per command
/// (connect windows, `op: connect`, left out).
fn latency_tally(events: &[Value], endpoint: SocketAddr, role: &str) -> Tally {
    let mut tally = Tally::new();
    for line in events {
        if line["type"] != "latency"
            || line["role"] != role
            || line["op"] == "connect"
            || !is_endpoint(&line["endpoint"], endpoint)
        {
            continue;
        }
        let op = line["op"].as_str().unwrap_or("<no op>").to_string();
        let entry = tally.entry(op).or_default();
        let n = |field: &str| line[field].as_u64().unwrap_or(0);
        entry.count += n("count");
        entry.ok += n("ok");
        entry.nil += n("nil");
        entry.timeouts += n("timeouts");
        entry.no_reply += n("no_reply");
        entry.untimed += n("untimed");
        if let Some(errors) = line["errors"].as_object() {
            for (code, count) in errors {
                *entry.errors.entry(code.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
        }
    }
    tally
}

/// Requests per command, workload commands only.
fn tally_counts(tally: &Tally) -> BTreeMap<String, u64> {
    tally
        .iter()
        .filter(|(op, _)| !is_admin(op))
        .map(|(op, t)| (op.clone(), t.count))
        .collect()
}

/// Error replies per code, over all commands.
fn tally_errors(tally: &Tally) -> BTreeMap<String, u64> {
    let mut errors = BTreeMap::new();
    for t in tally.values() {
        for (code, &n) in &t.errors {
            *errors.entry(code.clone()).or_default() += n;
        }
    }
    errors
}

/// Every count of `expected` reached in `actual` (more is allowed here:
/// equality is asserted after the agent stopped).
fn covers(actual: &BTreeMap<String, u64>, expected: &BTreeMap<String, u64>) -> bool {
    expected
        .iter()
        .all(|(name, &n)| actual.get(name).copied().unwrap_or(0) >= n)
}

/// The `request` lines of `role` whose server end is `endpoint`.
fn number(event: &Value, field: &str) -> f64 {
    event[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field} in {event}"))
}

/// Nearest-rank percentile of ascending `sorted`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of nothing");
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// `actual` within `fraction` of `expected` (widened by the time scale).
fn within(actual: f64, expected: f64, fraction: f64) -> bool {
    (actual - expected).abs() <= expected * fraction * f64::from(lab::time_scale())
}

/// Event types and how many of each: what a failure message shows.
fn summary(events: &[Value]) -> BTreeMap<String, usize> {
    let mut types = BTreeMap::new();
    for e in events {
        *types
            .entry(e["type"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    types
}

fn last_stats(events: &[Value]) -> Option<&Value> {
    events.iter().rev().find(|e| e["type"] == "stats")
}

/// The agent and every line it wrote, read one at a time (nothing is left
/// in `Agent`'s own buffer, so a timeout message stays short).
struct Trace {
    agent: Agent,
    events: Vec<Value>,
}

impl Trace {
    fn start(ports: &[u16], args: &[&str]) -> anyhow::Result<Self> {
        Ok(Self {
            agent: Agent::start(ports, args)?,
            events: Vec::new(),
        })
    }

    /// Reads lines for up to `for_at_most` (at most `max` of them).
    fn read(&mut self, for_at_most: Duration, max: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + for_at_most;
        for _ in 0..max {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.agent.wait_for(left, |_| true) {
                Ok(event) => self.events.push(event),
                Err(e) if e.to_string().starts_with("no matching event") => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads until `done` holds for the lines so far, or fails after `timeout`.
    fn await_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.events) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the agent's lines did not show {what} within {timeout:?}; lines so far by type: {:?}; last stats: {}; agent stderr:\n{}",
                    summary(&self.events),
                    last_stats(&self.events).unwrap_or(&Value::Null),
                    self.agent.stderr()
                );
            }
            self.read((deadline - now).min(Duration::from_millis(250)), 20_000)?;
        }
    }

    /// Index of the first line from `from` on matching `predicate`, waiting
    /// up to `timeout` for it.
    fn await_line(
        &mut self,
        from: usize,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<usize> {
        self.await_until(timeout, what, |events| {
            events.iter().skip(from).any(&predicate)
        })?;
        Ok(from
            + self.events[from..]
                .iter()
                .position(predicate)
                .expect("just seen"))
    }

    /// SIGINT (the agent writes its final partial window), then every line.
    fn stop(self) -> anyhow::Result<Vec<Value>> {
        let Self { agent, mut events } = self;
        events.extend(agent.stop()?);
        eprintln!(
            "agent lines by type: {:?}; final stats: {}",
            summary(&events),
            last_stats(&events).unwrap_or(&Value::Null)
        );
        Ok(events)
    }
}

/// What one client sent to one server, from the client and the server.
struct Expected {
    name: String,
    endpoint: SocketAddr,
    counts: BTreeMap<String, u64>,
    /// Error replies by code (none for redis-benchmark, which sends none).
    errors: BTreeMap<String, u64>,
}

impl Expected {
    /// Checks the client's counts against the server's: the ground truth
    /// must agree with itself before the agent is held against it.
    fn new(
        name: &str,
        endpoint: SocketAddr,
        client_counts: &BTreeMap<String, u64>,
        client_errors: &BTreeMap<String, u64>,
        server: &BTreeMap<String, u64>,
    ) -> anyhow::Result<Self> {
        let counts: BTreeMap<String, u64> = client_counts
            .iter()
            .map(|(name, &n)| (agent_name(name), n))
            .collect();
        ensure!(
            &counts == server,
            "{name}: the client's counts {counts:?} differ from the server's commandstats {server:?}: the ground truth is broken"
        );
        eprintln!("{name}: sent {counts:?}, errors {client_errors:?}");
        Ok(Self {
            name: name.into(),
            endpoint,
            counts,
            errors: client_errors.clone(),
        })
    }

    fn from_client(
        name: &str,
        endpoint: SocketAddr,
        result: &ClientResult,
        server: &BTreeMap<String, u64>,
    ) -> anyhow::Result<Self> {
        Self::new(name, endpoint, &result.counts, &result.errors, server)
    }
}

/// Waits until both roles' `latency` lines cover every expectation, stops
/// the agent, and checks that the sums are exactly the expected ones.
fn assert_counted_exactly(mut trace: Trace, expected: &[Expected]) -> anyhow::Result<Vec<Value>> {
    const ROLES: [&str; 2] = ["client", "server"];
    let covered = trace.await_until(
        event_timeout(),
        "latency counts covering every client's requests in both roles",
        |events| {
            expected.iter().all(|x| {
                ROLES.iter().all(|role| {
                    covers(
                        &tally_counts(&latency_tally(events, x.endpoint, role)),
                        &x.counts,
                    )
                })
            })
        },
    );
    let events = trace.stop()?;
    let mut failures = Vec::new();
    for x in expected {
        for role in ROLES {
            let tally = latency_tally(&events, x.endpoint, role);
            let (counts, errors) = (tally_counts(&tally), tally_errors(&tally));
            eprintln!(
                "{} ({}), role {role}: agent counted {counts:?}, errors {errors:?}",
                x.name, x.endpoint
            );
            if counts != x.counts {
                failures.push(format!(
                    "{} role {role}: agent counts {counts:?} != client {:?}",
                    x.name, x.counts
                ));
            }
            if errors != x.errors {
                failures.push(format!(
                    "{} role {role}: agent errors {errors:?} != client {:?}",
                    x.name, x.errors
                ));
            }
        }
    }
    if let Err(e) = covered {
        failures.push(format!("{e:#}"));
    }
    if !failures.is_empty()
        && let Some(stats) = events.iter().rev().find(|e| e["type"] == "stats")
    {
        failures.push(format!("agent stats at exit: {stats}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(events)
}

/// A mixed workload whose raw prefix makes one WRONGTYPE per connection.
fn mixed(addr: SocketAddr, connections: usize, requests: usize, pipeline: usize) -> Workload {
    Workload::new(addr.ip(), addr.port())
        .connections(connections)
        .requests(requests)
        .pipeline(pipeline)
        .commands(&["GET", "SET", "INCR", "HGETALL", "LPUSH"])
        .raw(&["SET", "wrong", "x"])
        .raw(&["LPUSH", "wrong", "y"])
}

/// Each real client in a pod against its own Redis in another lab host (so
/// both ends are on this node): after the agent stopped, the `count`s of
/// its `latency` lines, summed per command, equal what the client sent —
/// also what the server counted — in role `client` and in role `server`;
/// and so do the error replies by code.
#[test]
fn latency_counts_equal_each_clients_requests_in_both_roles() -> anyhow::Result<()> {
    let _serial = serial();
    let lab = Lab::builder()
        .pod("client", 'a')
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let (pod, server) = (Place::Host(client), Place::Host(redis));
    const CLIENTS: [&str; 7] = [
        "redis-cli",
        "redis-benchmark -c 50 -n 20000",
        "redis-benchmark -c 50 -n 20000 -P 16",
        "redis crate",
        "redis crate, pipeline 16",
        "redis-py",
        "ioredis, pipeline 8",
    ];
    let ports: Vec<u16> = CLIENTS.iter().map(|_| free_port()).collect();
    let _servers = ports
        .iter()
        .map(|&port| redis.start_redis(port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let trace = Trace::start(&ports, &["--interval", "1s"])?;

    let started = Instant::now();
    let mut expected = Vec::new();
    for (name, &port) in CLIENTS.iter().zip(&ports) {
        let addr = SocketAddr::from((redis.ip(), port));
        let x = match *name {
            "redis-cli" => {
                let w = mixed(addr, 2, 100, 1);
                let (r, s) = server_delta(server, addr, || pod.redis_cli(&w))?;
                Expected::from_client(name, addr, &r, &s)?
            }
            "redis-benchmark -c 50 -n 20000" | "redis-benchmark -c 50 -n 20000 -P 16" => {
                let pipeline = if name.ends_with("-P 16") { 16 } else { 1 };
                let b = Benchmark::new(redis.ip(), port, 20_000).pipeline(pipeline);
                let (r, s) = server_delta(server, addr, || pod.redis_benchmark(&b))?;
                Expected::new(name, addr, &r.counts, &BTreeMap::new(), &s)?
            }
            "redis crate" => {
                let w = mixed(addr, 4, 250, 1);
                let (r, s) = server_delta(server, addr, || pod.redis_crate(&w))?;
                Expected::from_client(name, addr, &r, &s)?
            }
            "redis crate, pipeline 16" => {
                let w = mixed(addr, 4, 400, 16);
                let (r, s) = server_delta(server, addr, || pod.redis_crate(&w))?;
                Expected::from_client(name, addr, &r, &s)?
            }
            "redis-py" => {
                let w = mixed(addr, 3, 200, 1);
                let (r, s) = server_delta(server, addr, || pod.redis_py(&w))?;
                Expected::from_client(name, addr, &r, &s)?
            }
            "ioredis, pipeline 8" => {
                let w = mixed(addr, 3, 200, 8);
                let (r, s) = server_delta(server, addr, || pod.ioredis(&w))?;
                Expected::from_client(name, addr, &r, &s)?
            }
            other => unreachable!("{other}"),
        };
        expected.push(x);
    }
    eprintln!("clients done in {:?}", started.elapsed());
    assert_counted_exactly(trace, &expected)?;
    Ok(())
}

/// The same exact counts with 5% loss and 5% reordering (+1 ms) both ways
/// on the path: redis-benchmark -P 16 and, at once, the redis crate with
/// 2 KB values (requests and replies of several segments, 4 per write).
#[test]
fn latency_counts_stay_exact_under_loss_and_reordering() -> anyhow::Result<()> {
    let _serial = serial();
    let lab = Lab::builder()
        .pod("client", 'a')
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let (pod, server) = (Place::Host(client), Place::Host(redis));
    let (bench_port, crate_port) = (free_port(), free_port());
    let _servers = [bench_port, crate_port]
        .iter()
        .map(|&port| redis.start_redis(port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut trace = Trace::start(&[bench_port, crate_port], &["--interval", "1s"])?;
    // 5% loss: the alerts loss causes are right here.
    trace.agent.expect_alerts(LOSS_ALERTS);
    let bench_addr = SocketAddr::from((redis.ip(), bench_port));
    let crate_addr = SocketAddr::from((redis.ip(), crate_port));
    let bench = Benchmark::new(redis.ip(), bench_port, 20_000).pipeline(16);
    let workload = Workload::new(redis.ip(), crate_port)
        .connections(4)
        .requests(200)
        .pipeline(4)
        .value_size(2000)
        .commands(&["LPUSH", "LRANGE", "HSET", "HGETALL", "INCR"])
        .raw(&["SET", "wrong", "x"])
        .raw(&["LPUSH", "wrong", "y"]);

    let started = Instant::now();
    let (bench_before, crate_before) = (
        server.server_command_counts(bench_addr)?,
        server.server_command_counts(crate_addr)?,
    );
    let (drops, bench_result, crate_result) = {
        let mut faults = Vec::new();
        for port in [bench_port, crate_port] {
            let path = Path::between(client.ip(), redis.ip(), port).both_ways();
            faults.push(lab.inject(path, Fault::Loss { probability: 0.05 })?);
            faults.push(lab.inject(path, Fault::reorder(0.05, Duration::from_millis(1)))?);
        }
        let (bench_result, crate_result) = std::thread::scope(|scope| {
            let bench = scope.spawn(|| pod.redis_benchmark(&bench));
            let crate_result = pod.redis_crate(&workload);
            (bench.join().expect("redis-benchmark thread"), crate_result)
        });
        let drops: Vec<u64> = faults
            .iter()
            .map(|f| f.packets())
            .collect::<anyhow::Result<_>>()?;
        (drops, bench_result?, crate_result?)
    };
    eprintln!(
        "clients done in {:?} under faults (packets dropped/held per rule: {drops:?})",
        started.elapsed()
    );
    assert!(
        drops[0] > 0 && drops[2] > 0,
        "the loss rules dropped packets of both clients: {drops:?}"
    );
    let bench_server = without_admin(&count_delta(
        &bench_before,
        &server.server_command_counts(bench_addr)?,
    ));
    let crate_server = without_admin(&count_delta(
        &crate_before,
        &server.server_command_counts(crate_addr)?,
    ));
    let expected = [
        Expected::new(
            "redis-benchmark -P 16, 5% loss + reordering",
            bench_addr,
            &bench_result.counts,
            &BTreeMap::new(),
            &bench_server,
        )?,
        Expected::from_client(
            "redis crate, pipeline 4, 5% loss + reordering",
            crate_addr,
            &crate_result,
            &crate_server,
        )?,
    ];
    assert_counted_exactly(trace, &expected)?;
    Ok(())
}

/// Per-request latencies of one redis crate connection across a 2 ms delay
/// line (client → server): SET with a 64 KiB value (a request of ~45
/// segments), GET of it (a reply split across several reads), PING, and 100
/// INCRs pipelined in one write. With `--emit all`, the agent's `request`
/// lines of role client have the client's own median and p99 per command
/// (± 10%), one line per request; the pipelined batch's slowest line (its
/// last reply) is the client's batch time ± 10%.
#[test]
fn request_latencies_across_a_delay_line_match_the_clients_timings() -> anyhow::Result<()> {
    const ROUNDS: usize = 150;
    const BATCH: usize = 100;
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder()
        .host("client", 'a')
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _server = redis.start_redis(port)?;
    let endpoint = SocketAddr::from((redis.ip(), port));
    // One window for the whole run: its percentiles are held against the
    // client's over the same requests.
    let mut trace = Trace::start(&[port], &["--emit", "all", "--interval", "10m"])?;
    let delay = Duration::from_millis(2);
    let _delay = lab.inject(
        Path::between(client.ip(), redis.ip(), port),
        Fault::delay(delay),
    )?;

    let redis_ip = redis.ip();
    let (timings, batch_time) = client.within(
        || -> anyhow::Result<(BTreeMap<&'static str, Vec<f64>>, Duration)> {
            let info = redis::IntoConnectionInfo::into_connection_info(
                redis::ConnectionAddr::Tcp(redis_ip.to_string(), port),
            )?
            .set_redis_settings(redis::RedisConnectionInfo::default().set_skip_set_lib_name());
            let mut con = redis::Client::open(info)?
                .get_connection_with_timeout(scaled(Duration::from_secs(10)))?;
            let big = vec![b'x'; 64 * 1024];
            let mut timings: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
            let mut timed = |name: &'static str, started: Instant| {
                timings
                    .entry(name)
                    .or_default()
                    .push(started.elapsed().as_secs_f64() * 1e6);
            };
            for i in 0..ROUNDS {
                let key = format!("big:{i}");
                let started = Instant::now();
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&big[..])
                    .query::<()>(&mut con)?;
                timed("SET", started);
                let started = Instant::now();
                let value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut con)?;
                timed("GET", started);
                ensure!(value.len() == big.len(), "GET {key}: {} bytes", value.len());
                let started = Instant::now();
                redis::cmd("PING").query::<String>(&mut con)?;
                timed("PING", started);
            }
            let mut pipe = redis::pipe();
            for _ in 0..BATCH {
                pipe.cmd("INCR").arg("batch");
            }
            let started = Instant::now();
            let replies: Vec<i64> = pipe.query(&mut con)?;
            let batch_time = started.elapsed();
            ensure!(
                replies.last() == Some(&(BATCH as i64)),
                "INCR replies {replies:?}"
            );
            Ok((timings, batch_time))
        },
    )??;

    for (command, us) in &timings {
        let us = sorted(us.clone());
        eprintln!(
            "client {command}: median {:.0} µs, p99 {:.0} µs",
            percentile(&us, 0.5),
            percentile(&us, 0.99)
        );
    }
    eprintln!("client batch of {BATCH} INCRs: {batch_time:?}");
    let total = 3 * ROUNDS + BATCH;
    let mine = |e: &Value| {
        e["type"] == "request"
            && e["role"] == "client"
            && is_endpoint(&e["dst"], endpoint)
            && e["src"]["ip"] == client.ip().to_string()
    };
    let waited = trace.await_until(event_timeout(), "a request line per request", |events| {
        events.iter().filter(|e| mine(e)).count() >= total
    });
    let events = trace.stop()?;
    waited?;
    let lines: Vec<&Value> = events.iter().filter(|e| mine(e)).collect();
    let mut failures = Vec::new();
    for (command, client_us) in &timings {
        // The client's clock runs until its read returned: the agent's
        // latency at the socket plus the client's own delay in reading
        // (`app_read_delay_us`; on 2 busy cores a client is sometimes
        // scheduled late, which is exactly what that field tells apart).
        let agent_us = sorted(
            lines
                .iter()
                .filter(|e| e["command"] == *command)
                .map(|e| number(e, "latency_us") + e["app_read_delay_us"].as_f64().unwrap_or(0.0))
                .collect(),
        );
        let client_us = sorted(client_us.clone());
        if let Some(line) = lines.iter().find(|e| e["command"] == *command) {
            eprintln!("a {command} line: {line}");
        }
        if agent_us.len() != client_us.len() {
            failures.push(format!(
                "{command}: {} request lines for {} requests",
                agent_us.len(),
                client_us.len()
            ));
            continue;
        }
        for (label, p) in [("median", 0.5), ("p99", 0.99)] {
            let (agent, client) = (percentile(&agent_us, p), percentile(&client_us, p));
            eprintln!("{command} {label}: agent {agent:.0} µs, client {client:.0} µs");
            if !within(agent, client, 0.10) {
                failures.push(format!(
                    "{command} {label}: agent {agent:.0} µs vs client {client:.0} µs (± 10%)"
                ));
            }
        }
    }
    let batch: Vec<&&Value> = lines.iter().filter(|e| e["command"] == "INCR").collect();
    let slowest = batch
        .iter()
        .map(|e| number(e, "latency_us") + e["app_read_delay_us"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    let batch_us = batch_time.as_secs_f64() * 1e6;
    eprintln!(
        "pipelined batch of {BATCH}: {} lines, last reply {slowest:.0} µs, client batch {batch_us:.0} µs",
        batch.len()
    );
    if batch.len() != BATCH {
        failures.push(format!(
            "INCR batch: {} request lines for {BATCH}",
            batch.len()
        ));
    }
    if !within(slowest, batch_us, 0.10) {
        failures.push(format!(
            "pipelined batch: last reply {slowest:.0} µs vs client batch {batch_us:.0} µs (± 10%)"
        ));
    }
    let others: Vec<&&Value> = lines.iter().filter(|e| e["outcome"] != "ok").collect();
    if !others.is_empty() {
        failures.push(format!("requests not ok: {others:#?}"));
    }
    // The `latency` window (HDR histogram, one window for the run): its
    // median is the client's ± 10%; its median and p99 are those of the
    // request lines it aggregates (± 2%: the histogram keeps 2 significant
    // digits). The window times arrival at the socket, without the client's
    // own scheduling delays, which its p99 includes.
    for (command, client_us) in &timings {
        let window = events.iter().find(|e| {
            e["type"] == "latency"
                && e["role"] == "client"
                && e["op"] == *command
                && is_endpoint(&e["endpoint"], endpoint)
        });
        let Some(window) = window else {
            failures.push(format!("{command}: no latency window"));
            continue;
        };
        let client_median = percentile(&sorted(client_us.clone()), 0.5);
        let line_us = sorted(
            lines
                .iter()
                .filter(|e| e["command"] == *command)
                .map(|e| number(e, "latency_us"))
                .collect(),
        );
        let p50 = number(window, "p50_us");
        eprintln!("{command} window: p50 {p50:.0} µs, client median {client_median:.0} µs");
        if !within(p50, client_median, 0.10) {
            failures.push(format!(
                "{command} window p50_us {p50:.0} µs vs client median {client_median:.0} µs (± 10%)"
            ));
        }
        for (field, p) in [("p50_us", 0.5), ("p99_us", 0.99)] {
            let (window_us, lines_us) = (number(window, field), percentile(&line_us, p));
            if !within(window_us, lines_us, 0.02) {
                failures.push(format!(
                    "{command} window {field} {window_us:.0} µs vs its request lines {lines_us:.0} µs (± 2%)"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Against a Redis with `DEBUG` enabled, with `--emit all`:
/// - `DEBUG SLEEP 0.3` is a `DEBUG SLEEP` request (container command
///   naming) of ≈ 300 ms (± 10%), in both roles, as the client timed it;
/// - a client that sleeps 200 ms between sending and reading: its requests'
///   `app_read_delay_us` ≈ 200 ms (± 15%), `reply_arrival_us` < 50 ms;
/// - a client that gives up `DEBUG SLEEP 0.3` after 100 ms and closes: a
///   `timeout` request of role client, `closed_by` `local`.
#[test]
fn slow_requests_read_delays_and_timeouts() -> anyhow::Result<()> {
    let _serial = serial();
    let port = free_port();
    let lab = Lab::builder()
        .pod("client", 'a')
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let pod = Place::Host(client);
    let _server = redis.start_redis_with(port, DEBUG)?;
    let endpoint = SocketAddr::from((redis.ip(), port));
    let mut trace = Trace::start(&[port], &["--emit", "all", "--interval", "1s"])?;
    let request_of = |role: &'static str, command: &'static str| {
        move |e: &Value| {
            e["type"] == "request"
                && e["role"] == role
                && e["command"] == command
                && is_endpoint(&e["dst"], endpoint)
        }
    };
    let mut failures = Vec::new();

    // DEBUG SLEEP 0.3, answered.
    let sleep = Workload::new(redis.ip(), port).raw(&["DEBUG", "SLEEP", "0.3"]);
    let result = pod.redis_py(&sleep)?;
    ensure!(
        result.timeouts == 0 && result.errors.is_empty(),
        "{result:?}"
    );
    let client_us = result.latencies_us["DEBUG"][0] as f64;
    eprintln!("DEBUG SLEEP 0.3: client {client_us} µs");
    for role in ["client", "server"] {
        let at = trace.await_line(
            0,
            event_timeout(),
            &format!("a DEBUG SLEEP request of role {role}"),
            request_of(role, "DEBUG SLEEP"),
        )?;
        let line = &trace.events[at];
        let latency = number(line, "latency_us");
        eprintln!("DEBUG SLEEP, role {role}: agent {latency} µs: {line}");
        if line["outcome"] != "ok" {
            failures.push(format!("DEBUG SLEEP role {role} not ok: {line}"));
        }
        if !within(latency, 300_000.0, 0.10) || !within(latency, client_us, 0.10) {
            failures.push(format!(
                "DEBUG SLEEP role {role}: {latency} µs, not 300 ms and the client's {client_us} µs ± 10%: {line}"
            ));
        }
    }

    // Replies that wait 200 ms in the socket before the client reads them.
    let read_delay = Duration::from_millis(200);
    let delayed = Workload::new(redis.ip(), port)
        .requests(3)
        .commands(&["SET"])
        .read_delay(read_delay);
    let result = pod.redis_py(&delayed)?;
    ensure!(
        result.counts["SET"] == 3 && result.errors.is_empty(),
        "{result:?}"
    );
    let is_set = request_of("client", "SET");
    trace.await_until(event_timeout(), "3 SET requests of role client", |events| {
        events.iter().filter(|e| is_set(e)).count() >= 3
    })?;
    for line in trace.events.iter().filter(|e| is_set(e)) {
        let (read, arrival) = (
            line["app_read_delay_us"].as_f64(),
            line["reply_arrival_us"].as_f64(),
        );
        eprintln!("SET read 200 ms late: app_read_delay_us {read:?}, reply_arrival_us {arrival:?}");
        let expected = read_delay.as_secs_f64() * 1e6;
        if line["outcome"] != "ok" {
            failures.push(format!("SET not ok: {line}"));
        }
        if !read.is_some_and(|read| within(read, expected, 0.15)) {
            failures.push(format!("app_read_delay_us not 200 ms ± 15%: {line}"));
        }
        if !arrival
            .is_some_and(|arrival| arrival < scaled(Duration::from_millis(50)).as_secs_f64() * 1e6)
        {
            failures.push(format!("reply_arrival_us not < 50 ms: {line}"));
        }
    }

    // The client gives DEBUG SLEEP 0.3 up after 100 ms and closes.
    let from = trace.events.len();
    let give_up = Duration::from_millis(100);
    let impatient = Workload::new(redis.ip(), port)
        .raw(&["DEBUG", "SLEEP", "0.3"])
        .timeout(give_up);
    let result = pod.redis_py(&impatient)?;
    ensure!(
        result.timeouts == 1,
        "the client timed out once: {result:?}"
    );
    let at = trace.await_line(
        from,
        event_timeout(),
        "the given-up DEBUG SLEEP request of role client",
        request_of("client", "DEBUG SLEEP"),
    )?;
    let line = trace.events[at].clone();
    eprintln!("DEBUG SLEEP given up after 100 ms: {line}");
    if line["outcome"] != "timeout" {
        failures.push(format!("given-up request not a timeout: {line}"));
    }
    if line["closed_by"] != "local" {
        failures.push(format!("timeout not closed_by local: {line}"));
    }
    let waited = number(&line, "latency_us");
    let (low, high) = (
        give_up.as_secs_f64() * 1e6 * 0.9,
        scaled(Duration::from_millis(300)).as_secs_f64() * 1e6,
    );
    if !(low..high).contains(&waited) {
        failures.push(format!(
            "timeout latency_us {waited}: the client waited 100 ms and closed before the 300 ms reply: {line}"
        ));
    }
    trace.stop()?;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Error replies by (command, code).
type ErrorsByCommand = BTreeMap<(String, String), u64>;

/// Error replies by type from real servers, in `latency` windows (`errors`
/// by code, per command) and `request` lines (outcome `error`, `error`
/// code), in both roles, equal to what the clients got:
/// - an unknown command (`ERR`), a wrong type (`WRONGTYPE`), from one Redis;
/// - a real `MOVED` from a node of a two-node Redis Cluster;
/// - a real `CLUSTERDOWN` from a cluster node with missing slots.
#[test]
fn error_replies_are_counted_by_type() -> anyhow::Result<()> {
    let _serial = serial();
    let plain = RedisServer::start()?;
    let cluster = Cluster::start(&[])?;
    let down = Cluster::start_with(Place::Here, &[0..=8191], &[])?;
    let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let plain_addr = local(plain.port);
    let (moved_node, down_node) = (cluster.node(0), down.node(0));
    let ports = [
        plain.port,
        moved_node.addr.port(),
        cluster.node(1).addr.port(),
        down_node.addr.port(),
    ];
    let mut trace = Trace::start(&ports, &["--emit", "all", "--interval", "1s"])?;

    // (client, endpoint, the client's errors by (command, code)).
    let mut cases: Vec<(&str, SocketAddr, ErrorsByCommand)> = Vec::new();
    let w = Workload::new(Ipv4Addr::LOCALHOST, plain.port)
        .raw(&["FOOBAR", "x"])
        .raw(&["SET", "wrong", "x"])
        .raw(&["LPUSH", "wrong", "y"])
        .requests(5)
        .commands(&["PING"]);
    let (result, server) = server_delta(Place::Here, plain_addr, || Place::Here.redis_py(&w))?;
    ensure!(
        result.errors == BTreeMap::from([("ERR".into(), 1), ("WRONGTYPE".into(), 1)]),
        "redis-py: {result:?}"
    );
    // An unknown command is no call in commandstats.
    ensure!(
        server == BTreeMap::from([("LPUSH".into(), 1), ("PING".into(), 5), ("SET".into(), 1)]),
        "server: {server:?}"
    );
    cases.push((
        "redis-py: unknown command, wrong type",
        plain_addr,
        BTreeMap::from([
            (("UNKNOWN".into(), "ERR".into()), 1),
            (("LPUSH".into(), "WRONGTYPE".into()), 1),
        ]),
    ));

    let key = key_in_slots(cluster.node(1).slots.clone(), "k");
    let w = Workload::new(moved_node.addr.ip(), moved_node.addr.port()).raw(&["GET", &key]);
    let (result, server) =
        server_delta(Place::Here, moved_node.addr, || Place::Here.redis_crate(&w))?;
    ensure!(
        result.errors == BTreeMap::from([("MOVED".into(), 1)]) && server == result.counts,
        "redis crate to the wrong node: {result:?}, server {server:?}"
    );
    cases.push((
        "redis crate: MOVED",
        moved_node.addr,
        BTreeMap::from([(("GET".into(), "MOVED".into()), 1)]),
    ));

    let key = key_in_slots(0..=8191, "k");
    let w = Workload::new(down_node.addr.ip(), down_node.addr.port()).raw(&["GET", &key]);
    let result = Place::Here.redis_crate(&w)?;
    ensure!(
        result.errors == BTreeMap::from([("CLUSTERDOWN".into(), 1)]),
        "redis crate to a cluster with missing slots: {result:?}"
    );
    cases.push((
        "redis crate: CLUSTERDOWN",
        down_node.addr,
        BTreeMap::from([(("GET".into(), "CLUSTERDOWN".into()), 1)]),
    ));

    let by_command = |tally: &Tally| -> ErrorsByCommand {
        let mut errors = BTreeMap::new();
        for (op, t) in tally {
            for (code, &n) in &t.errors {
                *errors.entry((op.clone(), code.clone())).or_default() += n;
            }
        }
        errors
    };
    let from_requests = |events: &[Value], endpoint, role| -> ErrorsByCommand {
        let mut errors = BTreeMap::new();
        for e in request_lines(events, endpoint, role) {
            if e["outcome"] == "error" {
                let key = (
                    e["command"].as_str().unwrap_or("?").to_string(),
                    e["error"]
                        .as_str()
                        .unwrap_or("<no error field>")
                        .to_string(),
                );
                *errors.entry(key).or_default() += e["count"].as_u64().unwrap_or(1);
            }
        }
        errors
    };
    let covered = trace.await_until(
        event_timeout(),
        "every error in the latency windows of both roles",
        |events| {
            cases.iter().all(|(_, endpoint, expected)| {
                ["client", "server"].iter().all(|role| {
                    let actual = by_command(&latency_tally(events, *endpoint, role));
                    expected
                        .iter()
                        .all(|(key, &n)| actual.get(key).copied().unwrap_or(0) >= n)
                })
            })
        },
    );
    let events = trace.stop()?;
    let mut failures = Vec::new();
    for (name, endpoint, expected) in &cases {
        for role in ["client", "server"] {
            let windows = by_command(&latency_tally(&events, *endpoint, role));
            let lines = from_requests(&events, *endpoint, role);
            eprintln!("{name}, role {role}: latency errors {windows:?}, request lines {lines:?}");
            if &windows != expected {
                failures.push(format!(
                    "{name} role {role}: latency errors {windows:?} != client {expected:?}"
                ));
            }
            if &lines != expected {
                failures.push(format!(
                    "{name} role {role}: request-line errors {lines:?} != client {expected:?}"
                ));
            }
        }
    }
    if let Err(e) = covered {
        failures.push(format!("{e:#}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Writes `request`, reads exactly `reply`.
fn round_trip(stream: &mut TcpStream, request: &[u8], reply: &[u8]) -> anyhow::Result<()> {
    stream.write_all(request)?;
    let mut got = vec![0u8; reply.len()];
    stream.read_exact(&mut got)?;
    ensure!(
        got == reply,
        "reply {:?}, expected {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(reply)
    );
    Ok(())
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend(format!("${}\r\n{arg}\r\n", arg.len()).into_bytes());
    }
    out
}

/// A connection opened before the agent started, with a request in flight
/// at its start (`BLPOP` blocked until a push after the agent is up: the
/// agent sees a reply whose request it never saw). After that boundary, N
/// more requests on the same connection are N `request` lines of role
/// client, each `ok`, and N in the `latency` windows; no error outcome on
/// the connection, and `resp_unparsed` does not grow after the boundary.
#[test]
fn a_connection_older_than_the_agent_is_counted_from_the_first_boundary() -> anyhow::Result<()> {
    const PAIRS: usize = 20;
    let _serial = serial();
    let server = RedisServer::start()?;
    let endpoint = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));
    let mut stream = TcpStream::connect(endpoint)?;
    stream.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
    let local_port = stream.local_addr()?.port();
    round_trip(&mut stream, &resp(&["SET", "before", "agent"]), b"+OK\r\n")?;
    // In flight: blocked in the server until the push below.
    stream.write_all(&resp(&["BLPOP", "inflight", "0"]))?;

    let mut trace = Trace::start(
        &[server.port],
        &[
            "--emit",
            "all",
            "--interval",
            "1s",
            "--stats-interval",
            "1s",
        ],
    )?;
    stream.set_nonblocking(true)?;
    let mut probe = [0u8; 1];
    let early = stream.peek(&mut probe);
    stream.set_nonblocking(false)?;
    ensure!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the BLPOP reply came before the agent started ({early:?}): nothing was in flight"
    );
    let mut pusher = TcpStream::connect(endpoint)?;
    round_trip(&mut pusher, &resp(&["LPUSH", "inflight", "go"]), b":1\r\n")?;
    let mut reply = vec![0u8; b"*2\r\n$8\r\ninflight\r\n$2\r\ngo\r\n".len()];
    stream.read_exact(&mut reply)?;
    ensure!(
        reply == b"*2\r\n$8\r\ninflight\r\n$2\r\ngo\r\n",
        "BLPOP reply {reply:?}"
    );

    let on_connection = move |e: &Value| {
        e["type"] == "request"
            && e["role"] == "client"
            && is_endpoint(&e["dst"], endpoint)
            && e["src"]["port"] == local_port
    };
    let is_named = |e: &Value| ["PING", "SET", "GET"].iter().any(|c| e["command"] == *c);
    // The first request after the boundary; once the agent wrote it, the
    // next stats line is the baseline.
    round_trip(&mut stream, &resp(&["PING"]), b"+PONG\r\n")?;
    let ping = trace.await_line(0, event_timeout(), "the PING after the boundary", |e| {
        on_connection(e) && e["command"] == "PING"
    })?;
    let baseline = trace.await_line(ping, scaled(Duration::from_secs(5)), "a stats line", |e| {
        e["type"] == "stats"
    })?;
    let baseline_stats = trace.events[baseline].clone();
    let unparsed_before = baseline_stats["resp_unparsed_bytes"].as_u64();
    for i in 0..PAIRS {
        let (key, value) = (format!("k{i}"), format!("v{i:02}"));
        round_trip(&mut stream, &resp(&["SET", &key, &value]), b"+OK\r\n")?;
        round_trip(
            &mut stream,
            &resp(&["GET", &key]),
            format!("${}\r\n{value}\r\n", value.len()).as_bytes(),
        )?;
    }
    let n = 1 + 2 * PAIRS;
    let expected = BTreeMap::from([
        ("GET".to_string(), PAIRS as u64),
        ("PING".to_string(), 1),
        ("SET".to_string(), PAIRS as u64),
    ]);
    let waited = trace.await_until(event_timeout(), "N requests, lines and windows", |events| {
        events
            .iter()
            .filter(|e| on_connection(e) && is_named(e))
            .count()
            >= n
            && covers(
                &tally_counts(&latency_tally(events, endpoint, "client")),
                &expected,
            )
    });
    drop((stream, pusher));
    let events = trace.stop()?;
    waited?;

    let mut failures = Vec::new();
    let lines: Vec<&Value> = events.iter().filter(|e| on_connection(e)).collect();
    let (named, other): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|e| is_named(e));
    eprintln!(
        "connection :{local_port}: {} request lines for its {n} requests; other lines: {other:?}",
        named.len()
    );
    if named.len() != n {
        failures.push(format!("{} request lines for {n} requests", named.len()));
    }
    let not_ok: Vec<&&Value> = named.iter().filter(|e| e["outcome"] != "ok").collect();
    if !not_ok.is_empty() {
        failures.push(format!("requests after the boundary not ok: {not_ok:#?}"));
    }
    let commands: Vec<&str> = named.iter().filter_map(|e| e["command"].as_str()).collect();
    let sent: Vec<&str> = std::iter::once("PING")
        .chain((0..PAIRS).flat_map(|_| ["SET", "GET"]))
        .collect();
    if commands != sent {
        failures.push(format!("commands in order {commands:?}, sent {sent:?}"));
    }
    if let Some(bad) = other.iter().find(|e| {
        ["error", "timeout", "no_reply"]
            .iter()
            .any(|o| e["outcome"] == *o)
    }) {
        failures.push(format!("a mismatched line on the connection: {bad}"));
    }
    let tally = latency_tally(&events, endpoint, "client");
    let counts: BTreeMap<String, u64> = tally_counts(&tally)
        .into_iter()
        .filter(|(op, _)| expected.contains_key(op))
        .collect();
    eprintln!("latency windows, role client: {tally:?}");
    if counts != expected {
        failures.push(format!("latency counts {counts:?} != sent {expected:?}"));
    }
    for (op, t) in &tally {
        if !t.errors.is_empty() || t.timeouts > 0 || t.no_reply > 0 {
            failures.push(format!("latency window of {op} with mismatches: {t:?}"));
        }
        if expected.contains_key(op) && t.ok != t.count {
            failures.push(format!("{op}: {} of {} ok", t.ok, t.count));
        }
    }
    let final_stats = last_stats(&events).cloned().unwrap_or(Value::Null);
    let unparsed_after = final_stats["resp_unparsed_bytes"].as_u64();
    eprintln!(
        "resp_unparsed: {unparsed_before:?} after the boundary, {unparsed_after:?} at exit; stats after the boundary {baseline_stats}, at exit {final_stats}"
    );
    match (unparsed_before, unparsed_after) {
        (Some(before), Some(after)) if before == after => {}
        (Some(before), Some(after)) => failures.push(format!(
            "resp_unparsed grew after the first boundary: {before} → {after}"
        )),
        _ => failures.push(format!(
            "no resp_unparsed counter in the stats lines (after the boundary: {baseline_stats}; at exit: {final_stats})"
        )),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Reads from `stream` until what was read ends with `suffix`.
fn read_until_suffix(stream: &mut TcpStream, suffix: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(suffix) {
        let n = stream.read(&mut buf)?;
        ensure!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    Ok(got)
}

fn connect(endpoint: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(endpoint)?;
    stream.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
    Ok(stream)
}

/// What came back without being a reply is not taken for one: a RESP2
/// subscriber's messages and its subscribed-mode `PING`, a RESP3 (`HELLO 3`)
/// subscriber's `>` push frames, `MONITOR`'s lines, and the requests
/// `CLIENT REPLY OFF|SKIP` silence (`no_reply`). Every request of every
/// connection is one `request` line per role with the outcome the server's
/// bytes say, no reply is left unmatched and nothing times out.
#[test]
fn pushes_and_silenced_requests_are_not_taken_for_replies() -> anyhow::Result<()> {
    let _serial = serial();
    let server = RedisServer::start()?;
    let endpoint = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));
    let trace = Trace::start(
        &[server.port],
        &[
            "--emit",
            "all",
            "--interval",
            "1s",
            "--stats-interval",
            "0s",
        ],
    )?;

    let mut sub = connect(endpoint)?;
    round_trip(
        &mut sub,
        &resp(&["SUBSCRIBE", "ch1", "ch2"]),
        b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$3\r\nch2\r\n:2\r\n",
    )?;
    let mut sub3 = connect(endpoint)?;
    sub3.write_all(&resp(&["HELLO", "3"]))?;
    read_until_suffix(&mut sub3, b"modules\r\n*0\r\n")?;
    round_trip(
        &mut sub3,
        &resp(&["SUBSCRIBE", "ch1"]),
        b">3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n",
    )?;
    let mut publisher = connect(endpoint)?;
    for i in 0..5 {
        let message = format!("m{i}");
        round_trip(
            &mut publisher,
            &resp(&["PUBLISH", "ch1", &message]),
            b":2\r\n",
        )?;
        let body = format!("$7\r\nmessage\r\n$3\r\nch1\r\n$2\r\n{message}\r\n");
        let mut got = vec![0u8; 4 + body.len()];
        sub.read_exact(&mut got)?;
        ensure!(
            got == format!("*3\r\n{body}").into_bytes(),
            "RESP2 message {got:?}"
        );
        sub3.read_exact(&mut got)?;
        ensure!(
            got == format!(">3\r\n{body}").into_bytes(),
            "RESP3 push {got:?}"
        );
    }
    round_trip(
        &mut sub,
        &resp(&["PING"]),
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
    )?;

    let mut quiet = connect(endpoint)?;
    quiet.write_all(&resp(&["CLIENT", "REPLY", "OFF"]))?;
    quiet.write_all(&resp(&["SET", "q", "1"]))?;
    quiet.write_all(&resp(&["SET", "q", "2"]))?;
    round_trip(&mut quiet, &resp(&["CLIENT", "REPLY", "ON"]), b"+OK\r\n")?;
    quiet.write_all(&resp(&["CLIENT", "REPLY", "SKIP"]))?;
    quiet.write_all(&resp(&["SET", "q", "3"]))?;
    round_trip(&mut quiet, &resp(&["GET", "q"]), b"$1\r\n3\r\n")?;

    let mut monitor = connect(endpoint)?;
    round_trip(&mut monitor, &resp(&["MONITOR"]), b"+OK\r\n")?;
    for n in 1..=2 {
        round_trip(
            &mut publisher,
            &resp(&["INCR", "n"]),
            format!(":{n}\r\n").as_bytes(),
        )?;
        let line = read_until_suffix(&mut monitor, b"\"n\"\r\n")?;
        ensure!(line.starts_with(b"+"), "MONITOR line {line:?}");
    }

    let events = trace.stop()?;
    let expected: [(&TcpStream, &[(&str, &str)]); 5] = [
        (&sub, &[("PING", "ok"), ("SUBSCRIBE", "ok")]),
        (&sub3, &[("HELLO", "ok"), ("SUBSCRIBE", "ok")]),
        (
            &publisher,
            &[
                ("INCR", "ok"),
                ("INCR", "ok"),
                ("PUBLISH", "ok"),
                ("PUBLISH", "ok"),
                ("PUBLISH", "ok"),
                ("PUBLISH", "ok"),
                ("PUBLISH", "ok"),
            ],
        ),
        (
            &quiet,
            &[
                ("CLIENT REPLY", "no_reply"),
                ("CLIENT REPLY", "no_reply"),
                ("CLIENT REPLY", "ok"),
                ("GET", "ok"),
                ("SET", "no_reply"),
                ("SET", "no_reply"),
                ("SET", "no_reply"),
            ],
        ),
        (&monitor, &[("MONITOR", "ok")]),
    ];
    let mut failures = Vec::new();
    for (stream, want) in expected {
        let port = stream.local_addr()?.port();
        for role in ["client", "server"] {
            let mut got: Vec<(String, String)> = request_lines(&events, endpoint, role)
                .into_iter()
                .filter(|e| e["src"]["port"] == port)
                .map(|e| {
                    (
                        e["command"].as_str().unwrap_or("?").to_string(),
                        e["outcome"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect();
            got.sort();
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(c, o)| (c.to_string(), o.to_string()))
                .collect();
            if got != want {
                failures.push(format!("port {port}, role {role}: {got:?} != {want:?}"));
            }
        }
    }
    let stats = last_stats(&events).cloned().unwrap_or(Value::Null);
    if stats["resp_unmatched_replies"] != 0 {
        failures.push(format!("replies left unmatched: {stats}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// A connection already open when the agent starts, with a pipelined
/// request and the last part of a 512 KiB reply still in flight (the
/// client's small receive buffer holds the server back until it reads): the
/// agent joins in the middle of a bulk string, must not take its bytes for
/// replies, and matches every request sent after it started, exactly.
#[test]
fn a_connection_joined_inside_a_multi_segment_reply_is_matched_from_the_next_boundary()
-> anyhow::Result<()> {
    const AFTER: usize = 30;
    let _serial = serial();
    let server = RedisServer::start()?;
    let endpoint = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));
    let value = "x".repeat(512 * 1024);
    round_trip(
        &mut connect(endpoint)?,
        &resp(&["SET", "big", &value]),
        b"+OK\r\n",
    )?;

    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_recv_buffer_size(4096)?;
    socket.connect(&endpoint.into())?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
    let port = stream.local_addr()?.port();
    // Pipelined: the big reply, then PING's, both unread when the agent starts.
    stream.write_all(&[resp(&["GET", "big"]), resp(&["PING"])].concat())?;
    let mut first = vec![0u8; 64];
    stream.read_exact(&mut first)?; // the reply has begun

    let trace = Trace::start(&[server.port], &["--emit", "all", "--interval", "1s"])?;
    let mut rest = vec![0u8; format!("${}\r\n", value.len()).len() + value.len() + 2 - 64];
    stream.read_exact(&mut rest)?;
    let mut pong = [0u8; 7];
    stream.read_exact(&mut pong)?;
    ensure!(&pong == b"+PONG\r\n", "PING reply {pong:?}");
    for i in 0..AFTER {
        match i % 3 {
            0 => round_trip(&mut stream, &resp(&["SET", "k", "v"]), b"+OK\r\n")?,
            1 => round_trip(&mut stream, &resp(&["GET", "k"]), b"$1\r\nv\r\n")?,
            _ => round_trip(&mut stream, &resp(&["PING"]), b"+PONG\r\n")?,
        }
    }
    let events = trace.stop()?;
    let lines: Vec<(String, String)> = request_lines(&events, endpoint, "client")
        .into_iter()
        .filter(|e| e["src"]["port"] == port)
        .map(|e| {
            (
                e["command"].as_str().unwrap_or("?").to_string(),
                e["outcome"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    let answered_after: Vec<&(String, String)> = lines
        .iter()
        .filter(|(command, outcome)| {
            outcome == "ok" && ["SET", "GET", "PING"].contains(&command.as_str())
        })
        .collect();
    let wrong: Vec<&(String, String)> = lines
        .iter()
        .filter(|(_, outcome)| outcome != "ok")
        .collect();
    // The agent did join inside the bulk string: it skipped most of it.
    let skipped = last_stats(&events)
        .and_then(|stats| stats["resp_unparsed_bytes"].as_u64())
        .unwrap_or(0);
    ensure!(
        skipped >= 256 * 1024,
        "the agent skipped only {skipped} bytes out of sync: the reply was not in flight"
    );
    // The PING sent before the agent started may be matched or not; every
    // request sent after must be, once, and nothing may be mismatched.
    ensure!(
        (AFTER..=AFTER + 1).contains(&answered_after.len()) && wrong.is_empty(),
        "{} matched requests of {AFTER} sent after the start, other outcomes {wrong:?}; lines {lines:?}",
        answered_after.len()
    );
    Ok(())
}

/// The bench's counting floor (`--counting-floor`, `agent-ebpf/src/floor.rs`)
/// is a floor only if it does the whole walk: it must count every request
/// and every reply the server saw, exactly, in `-P 16` batches.
#[test]
fn the_counting_floor_walks_every_request_and_reply() -> anyhow::Result<()> {
    let _serial = serial();
    if lab::kernel::release()? < (5, 17) {
        eprintln!("skipped: the counting floor needs bpf_loop (Linux 5.17+)");
        return Ok(());
    }
    let redis = RedisServer::start()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, redis.port));
    let before = lab::clients::server_command_counts(addr)?;
    let agent = Agent::start(&[redis.port], &["--counting-floor"])?;
    let benchmark = Benchmark::new(Ipv4Addr::LOCALHOST, redis.port, 20_000)
        .clients(20)
        .pipeline(16);
    lab::clients::redis_benchmark(&benchmark)?;
    let stderr = agent.stop_and_read_stderr()?;
    let served: u64 = count_delta(&before, &lab::clients::server_command_counts(addr)?)
        .iter()
        // The two queries' own commands (INFO, the redis crate's CLIENT
        // SETINFO) ran before the agent started or after it stopped.
        .filter(|(name, _)| {
            !matches!(
                name.split('|')
                    .next()
                    .map(str::to_ascii_uppercase)
                    .as_deref(),
                Some("INFO" | "CLIENT" | "HELLO")
            )
        })
        .map(|(_, calls)| calls)
        .sum();
    let line = stderr
        .lines()
        .find_map(|line| line.split_once("counting floor: "))
        .map(|(_, counts)| counts)
        .with_context(|| format!("no counts in the agent's stderr:\n{stderr}"))?;
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|word| word.parse().ok())
        .collect();
    let [requests, replies, _sent, unwalked, _received] = numbers[..] else {
        bail!("unexpected counts line: {line}");
    };
    ensure!(served >= 40_000, "the server saw only {served} requests");
    ensure!(
        (requests, replies, unwalked) == (served, served, 0),
        "the floor walked {requests} requests and {replies} replies ({unwalked} segments not \
         to their end); the server answered {served}"
    );
    Ok(())
}
