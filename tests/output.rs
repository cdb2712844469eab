//! The agent's stdout as its readers get it: nothing but schema-valid JSON
//! lines, a reader that stops reading costs lines (counted) but never
//! tracing, `--format pretty` for a terminal, settings from a config file.

use std::{
    io::{BufRead, BufReader, Read as _},
    net::{Ipv4Addr, TcpStream},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lab::{
    Agent, RedisServer, Workload, agent_binary,
    clients::{self, Benchmark},
    free_port, scaled,
    schema::check_line,
    signal,
};
use serde_json::Value;

/// The agent with its stdout in the test's hands: read only when the test
/// says so. Killed on drop.
struct RawAgent {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl RawAgent {
    fn start(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(agent_binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the agent")?;
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Ok(Self { child, stdout })
    }

    /// The next stdout line (without its newline); `None` at the end.
    fn line(&mut self) -> anyhow::Result<Option<String>> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        ensure!(line.ends_with('\n'), "a partial last line: {line:?}");
        line.pop();
        Ok(Some(line))
    }

    /// SIGINT, then every remaining line; fails unless it exits 0 in time.
    fn stop(mut self) -> anyhow::Result<Vec<String>> {
        signal(self.child.id(), libc::SIGINT);
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        let mut lines = Vec::new();
        while let Some(line) = self.line()? {
            lines.push(line);
            ensure!(Instant::now() < deadline, "agent did not exit after SIGINT");
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "agent exited with {status}");
        Ok(lines)
    }
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through the lab's `Agent`, every line is validated against the schema
/// as it is read: here a run with every kind of line the agent writes on
/// its own, and the `node` it was given.
#[test]
fn every_stdout_line_is_a_valid_event() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let refused = free_port();
    let args = [
        "--emit",
        "all",
        "--interval",
        "1s",
        "--node-name",
        "test-node-1",
    ];
    let mut agent = Agent::start(&[redis.port, refused], &args)?;
    clients::redis_crate(&Workload::new(Ipv4Addr::LOCALHOST, redis.port).requests(20))?;
    let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, refused));
    // Open across a gauge tick: a `connections` line.
    let _held = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
    agent.wait_for(scaled(Duration::from_secs(10)), |e| {
        e["type"] == "connections" && e["dst"]["port"] == redis.port && e["open"] == 1
    })?;
    agent.wait_for(scaled(Duration::from_secs(10)), |e| {
        e["type"] == "latency" && e["endpoint"]["port"] == redis.port
    })?;
    let events = agent.stop()?;
    assert!(events.iter().all(|e| e["node"] == "test-node-1"));
    for kind in ["connect", "close", "request", "connections", "stats"] {
        assert!(
            events.iter().any(|e| e["type"] == kind),
            "no {kind} line among {events:#?}"
        );
    }
    Ok(())
}

/// The raw bytes of a run: JSON objects, one per line, each valid, and
/// nothing else (no log line, no partial line at exit).
#[test]
fn stdout_holds_nothing_but_json_lines() -> anyhow::Result<()> {
    let port = free_port();
    let mut agent = RawAgent::start(&["--ports", &port.to_string()])?;
    let started = agent.line()?.context("no started line")?;
    let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    let mut lines = vec![started];
    lines.extend(agent.stop()?);
    let events: Vec<Value> = lines
        .iter()
        .map(|line| check_line(line).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"));
    assert!(kinds.contains(&"connect"), "{kinds:?}");
    assert_eq!(
        kinds.last(),
        Some(&"stats"),
        "the last line is the final stats"
    );
    Ok(())
}

/// A reader that stops reading (a stalled log pipeline) makes the agent
/// drop lines, counted, while it keeps draining the kernel's ring buffer:
/// nothing is lost there, and SIGINT still ends it cleanly.
#[test]
fn a_stalled_stdout_reader_costs_lines_not_tracing() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let ports = redis.port.to_string();
    // Every request gets a line (~450 bytes, both ends): far more than the
    // pipe (64 KiB) and the agent's queue (8 MiB) hold.
    let mut agent = RawAgent::start(&["--ports", &ports, "--emit", "all"])?;
    let started = agent.line()?.context("no started line")?;
    check_line(&started).map_err(anyhow::Error::msg)?;

    // From here on, nobody reads the agent's stdout until it is stopped.
    // One client: a rate the agent drains even on 2 busy cores, so a full
    // ring buffer could only come from a stalled drain.
    let requests = 40_000;
    let benchmark = Benchmark::new(Ipv4Addr::LOCALHOST, redis.port, requests)
        .clients(1)
        .tests(&["get"]);
    let deadline = Instant::now() + scaled(Duration::from_secs(120));
    clients::redis_benchmark(&benchmark)?;
    ensure!(Instant::now() < deadline, "redis-benchmark took too long");

    let lines = agent.stop()?;
    let mut events = Vec::with_capacity(lines.len());
    for line in &lines {
        events.push(check_line(line).map_err(anyhow::Error::msg)?);
    }
    let stats = events.last().context("no line at all")?;
    assert_eq!(stats["type"], "stats", "the final stats come last");
    eprintln!(
        "read {} lines after the stall; final stats: {stats}",
        lines.len()
    );
    let dropped = stats["lines_dropped"].as_u64().unwrap();
    assert!(
        dropped > 0,
        "no line dropped: the test did not stall stdout"
    );
    assert_eq!(stats["ring_buffer_full"], 0, "the ring buffer overflowed");
    // Every request was decoded, though not every line written: the
    // agent kept tracing (≥ one RESP segment per request and end).
    let events_decoded = stats["events"].as_u64().unwrap();
    assert!(
        events_decoded >= 2 * requests,
        "{events_decoded} events decoded for {requests} requests"
    );
    Ok(())
}

/// `--format pretty` on a pipe: one line per event, time and type first,
/// fields as key=value, no colour codes (stdout is not a terminal).
#[test]
fn pretty_lines_are_aligned_text_without_colour_off_a_terminal() -> anyhow::Result<()> {
    let port = free_port();
    let mut agent = RawAgent::start(&["--ports", &port.to_string(), "--format", "pretty"])?;
    let started = agent.line()?.context("no started line")?;
    let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    let mut lines = vec![started];
    lines.extend(agent.stop()?);
    for line in &lines {
        assert!(!line.contains('\x1b'), "colour code in {line:?}");
        let (time, rest) = line.split_at(13);
        assert!(
            time.len() == 13 && time.as_bytes()[2] == b':' && time.as_bytes()[8] == b'.',
            "{line}"
        );
        // The type column is 17 wide: fields start at the same place.
        assert_eq!(rest.as_bytes().get(17), Some(&b' '), "{line}");
    }
    let connect = lines
        .iter()
        .find(|l| l[13..].starts_with("connect "))
        .context("no connect line")?;
    assert!(
        connect.contains("outcome=refused") && connect.contains(&format!("dst=127.0.0.1:{port}")),
        "{connect}"
    );
    Ok(())
}

/// Settings from a config file and the environment reach the running
/// agent; flags win over both.
#[test]
fn config_file_and_environment_set_the_agent() -> anyhow::Result<()> {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("resptrace-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("resptrace.toml");
    std::fs::write(
        &path,
        format!("ports = [{port}]\nnode-name = \"from-file\"\nformat = \"json\"\n"),
    )?;
    let run = |env: &[(&str, &str)], args: &[&str]| -> anyhow::Result<Value> {
        let mut child = Command::new(agent_binary())
            .env("RESPTRACE_CONFIG", &path)
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        signal(child.id(), libc::SIGINT);
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
        let status = child.wait()?;
        read?;
        ensure!(status.success(), "agent exited with {status}");
        check_line(line.trim_end()).map_err(anyhow::Error::msg)
    };
    let started = run(&[], &[])?;
    assert_eq!(started["ports"], serde_json::json!([port]));
    assert_eq!(started["node"], "from-file");
    let started = run(&[("NODE_NAME", "from-downward-api")], &[])?;
    assert_eq!(started["node"], "from-downward-api");
    let started = run(
        &[("NODE_NAME", "x"), ("RESPTRACE_NODE_NAME", "from-env")],
        &[],
    )?;
    assert_eq!(started["node"], "from-env");
    let started = run(
        &[("RESPTRACE_NODE_NAME", "from-env")],
        &["--node-name", "flag"],
    )?;
    assert_eq!(started["node"], "flag");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
