//! The HTTP listener (`--http-addr`): `/healthz`, `/readyz`, and `/metrics`
//! scraped by a real Prometheus server (Debian package `prometheus`, run
//! here with its own config and storage) whose PromQL answers must match
//! what the clients sent.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lab::{
    Agent, RedisServer,
    clients::{Benchmark, redis_benchmark},
    event_timeout, free_port, scaled, wait_until,
};
use serde_json::Value;

/// Where Debian's `prometheus` package puts the server.
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A plain HTTP/1.0 GET (no chunked replies to decode): status and body.
fn http_get(addr: SocketAddr, path_and_query: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(event_timeout()))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {response:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server scraping one target every second, with a config
/// and storage of its own in a temporary directory; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let dir = std::env::temp_dir().join(format!(
            "resptrace-prometheus-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: resptrace\n    static_configs:\n\
                 \x20     - targets: ['{target}']\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let prometheus = Self { child, addr, dir };
        let ready = wait_until(scaled(Duration::from_secs(30)), || {
            matches!(http_get(addr, "/-/ready"), Ok((200, _)))
        });
        ensure!(ready, "prometheus not ready:\n{}", prometheus.log());
        Ok(prometheus)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The value of an instant query that yields one sample (`None`: no sample).
    fn query(&self, promql: &str) -> anyhow::Result<Option<f64>> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encoded(promql)),
        )?;
        ensure!(status == 200, "query {promql}: HTTP {status}: {body}");
        let answer: Value = serde_json::from_str(&body)?;
        let result = answer["data"]["result"]
            .as_array()
            .with_context(|| format!("query {promql}: {answer}"))?;
        match result.as_slice() {
            [] => Ok(None),
            [sample] => {
                let value = sample["value"][1]
                    .as_str()
                    .with_context(|| format!("query {promql}: {sample}"))?;
                Ok(Some(value.parse()?))
            }
            _ => bail!("query {promql}: more than one sample: {answer}"),
        }
    }

    /// Waits until `promql` answers `expected`; fails at once on a value
    /// above it (counters only grow), else with the last answer on timeout.
    fn wait_for_value(&self, promql: &str, expected: f64) -> anyhow::Result<()> {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        loop {
            let value = self.query(promql)?;
            match value {
                Some(v) if v == expected => return Ok(()),
                Some(v) if v > expected => bail!("{promql} = {v}, expected {expected}"),
                _ if Instant::now() >= deadline => {
                    bail!("{promql} = {value:?} after 30 s, expected {expected}")
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_request_counts_equal_to_what_the_client_sent() -> anyhow::Result<()> {
    if !Path::new(PROMETHEUS).exists() {
        eprintln!(
            "SKIPPED: {PROMETHEUS} is not installed (Debian package `prometheus`; \
             `cargo xtask setup` installs it)"
        );
        return Ok(());
    }
    let redis = RedisServer::start()?;
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let interval = Duration::from_secs(1);
    let agent = Agent::start(
        &[redis.port],
        &["--http-addr", &http.to_string(), "--interval", "1s"],
    )?;
    let started = Instant::now();

    // Listening since before the programs loaded; ready after the first window.
    let (first, _) = http_get(http, "/readyz")?;
    if started.elapsed() < interval / 2 {
        assert_eq!(first, 503, "/readyz before the first window");
    } else {
        eprintln!("/readyz first asked after the first window could end: 503 not checked");
    }
    let ready = wait_until(event_timeout(), || {
        matches!(http_get(http, "/readyz"), Ok((200, _)))
    });
    assert!(
        ready,
        "/readyz never 200; agent stderr:\n{}",
        agent.stderr()
    );
    assert_eq!(http_get(http, "/healthz")?.0, 200);
    assert_eq!(http_get(http, "/nothing-here")?.0, 404);

    let sent = redis_benchmark(
        &Benchmark::new(Ipv4Addr::LOCALHOST, redis.port, 3_000)
            .clients(4)
            .tests(&["set", "get"]),
    )?
    .counts;

    let prometheus = Prometheus::start(http)?;
    let up = wait_until(
        scaled(Duration::from_secs(30)),
        || matches!(prometheus.query(r#"up{job="resptrace"}"#), Ok(Some(v)) if v == 1.0),
    );
    assert!(
        up,
        "prometheus never scraped the agent:\n{}\nagent stderr:\n{}",
        prometheus.log(),
        agent.stderr()
    );
    let endpoint = format!("127.0.0.1:{}", redis.port);
    for (command, &count) in &sent {
        for role in ["client", "server"] {
            let series = format!(r#"role="{role}",endpoint="{endpoint}",command="{command}""#);
            prometheus.wait_for_value(
                &format!("sum(resptrace_requests_total{{{series}}})"),
                count as f64,
            )?;
            prometheus.wait_for_value(
                &format!(r#"sum(resptrace_requests_total{{{series},outcome="ok"}})"#),
                count as f64,
            )?;
            // Every request was answered: each one timed.
            prometheus.wait_for_value(
                &format!("sum(resptrace_request_duration_seconds_count{{{series}}})"),
                count as f64,
            )?;
        }
    }
    // redis-benchmark's connections, one per client, all established.
    let connects = prometheus
        .query(&format!(
            r#"sum(resptrace_connects_total{{endpoint="{endpoint}",outcome="established"}})"#
        ))?
        .context("no connects")?;
    assert!(connects >= 4.0, "{connects} established connects");
    let events = prometheus.query("resptrace_events_total")?;
    assert!(events.is_some_and(|n| n > 0.0), "events: {events:?}");
    agent.stop()?;
    Ok(())
}

#[test]
fn a_taken_http_address_fails_the_start_naming_the_flag() -> anyhow::Result<()> {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = taken.local_addr()?.to_string();
    let error = match Agent::start(&[free_port()], &["--http-addr", &addr]) {
        Ok(_) => bail!("the agent started on a taken --http-addr {addr}"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("--http-addr") && error.contains(&addr),
        "{error}"
    );
    Ok(())
}
