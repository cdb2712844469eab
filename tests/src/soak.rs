//! Soak and overload: a node's worth of Redis traffic for minutes, with and
//! without the agent, and what the agent costs and keeps over time.
//!
//! Load, all against one real `redis-server` on loopback, from several
//! source addresses (127.0.0.0/8 is local: no setup) so that ephemeral ports
//! and TIME_WAIT never run short:
//! - held: [`Options::held`] connections opened at the start and kept open,
//!   each sent a `PING` in turn ([`HELD_CYCLE`] for all of them);
//! - churn: [`Options::new_per_sec`] new connections per second, one request
//!   each: `GET`/`SET`, a `WRONGTYPE` and an unknown command (error replies
//!   by design), and closes by RST (SO_LINGER 0) after the reply or before
//!   it was read;
//! - SYN drops: a prober connecting from [`DROPPED_SOURCE`], whose SYNs an
//!   iptables rule drops for part of every [`Options::syn_drop_period`];
//! - pipelined: requests in batches of [`PIPELINE`] on a few connections,
//!   up to [`Options::pipelined_per_sec`], one in [`PIPELINE_ERROR_EVERY`]
//!   a `WRONGTYPE`.
//!
//! Every client checks every reply against what it asked for: ground truth
//! for "the traced applications saw only the errors the test injected".
//! The phases are baseline (no agent), agent, baseline; the throughput
//! ratio is the agent phase's over the mean of the two baselines, so drift
//! of the machine cancels out. Sampled every [`Options::sample_every`]:
//! the agent's RSS and CPU time (`/proc`), its BPF map memory (`memlock`
//! of its map fds), its `stats` counters, Redis' CPU and clients.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, BufRead, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use socket2::{Domain, Socket, Type};

use crate::{
    FirewallRule, RedisServer, agent_binary, agent_start_timeout, free_port, kernel, wait_until,
};

/// Every held connection gets a `PING` once per cycle.
pub const HELD_CYCLE: Duration = Duration::from_secs(20);
/// Requests per pipelined batch.
pub const PIPELINE: usize = 16;
/// One pipelined request in this many is a `WRONGTYPE`.
pub const PIPELINE_ERROR_EVERY: u64 = 256;
/// The prober's source address: the path whose SYNs are dropped at times.
pub const DROPPED_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 15);
/// Source addresses of the held connections and of the churn.
const HELD_SOURCES: [u8; 4] = [2, 3, 4, 5];
const CHURN_SOURCES: [u8; 6] = [10, 11, 12, 13, 14, 16];
/// A string key: `LPUSH` on it is a `WRONGTYPE` error.
const STRING_KEY: &str = "soak:string";
/// The prober's connect timeout: below the first SYN retransmission (1 s),
/// so a dropped SYN is one failed attempt.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Unexpected errors kept verbatim (the rest are counted).
const ERRORS_KEPT: usize = 20;
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

#[derive(Clone, Debug)]
pub struct Options {
    /// How long the agent runs.
    pub agent_phase: Duration,
    /// How long each no-agent phase runs (one before, one after).
    pub baseline_phase: Duration,
    /// Samples before this much of the agent phase are its warm-up; RSS
    /// and map memory are compared from the first sample after it.
    pub warmup: Duration,
    pub held: usize,
    pub new_per_sec: u32,
    pub churn_threads: usize,
    pub pipelined_per_sec: u64,
    pub pipelined_connections: usize,
    pub sample_every: Duration,
    /// SYNs from [`DROPPED_SOURCE`] are dropped for `syn_drop_for` of every
    /// `syn_drop_period`.
    pub syn_drop_period: Duration,
    pub syn_drop_for: Duration,
}

impl Options {
    /// The figures for an agent phase of `agent_phase`.
    pub fn new(agent_phase: Duration, baseline_phase: Duration) -> Self {
        Self {
            agent_phase,
            baseline_phase,
            // Until every held connection has sent a request since the
            // agent started (its flow state exists), and a quarter of a long
            // run at most two minutes.
            warmup: (agent_phase / 4)
                .clamp(
                    HELD_CYCLE + Duration::from_secs(10),
                    Duration::from_secs(120),
                )
                .min(agent_phase / 2),
            held: 10_000,
            new_per_sec: 1_000,
            churn_threads: 2,
            pipelined_per_sec: 100_000,
            pipelined_connections: 2,
            sample_every: Duration::from_secs(5),
            syn_drop_period: Duration::from_secs(30),
            syn_drop_for: Duration::from_secs(10),
        }
    }
}

// ---- the clients ---------------------------------------------------------

/// What the clients did, counted by themselves.
#[derive(Default)]
pub struct ClientCounts {
    pub held_open: AtomicU64,
    pub held_pings: AtomicU64,
    pub churn_connects: AtomicU64,
    pub churn_ok: AtomicU64,
    /// `WRONGTYPE` and unknown-command replies to the requests meant to get them.
    pub churn_error_replies: AtomicU64,
    pub churn_resets: AtomicU64,
    pub probe_connects: AtomicU64,
    /// Connect timeouts of the prober while its SYNs were being dropped.
    pub probe_syn_dropped: AtomicU64,
    pub pipelined_ok: AtomicU64,
    pub pipelined_error_replies: AtomicU64,
    /// Anything else: a failed connect, a reset, a reply not the one asked for.
    pub unexpected: AtomicU64,
    unexpected_kept: Mutex<Vec<String>>,
}

impl ClientCounts {
    fn unexpected(&self, what: String) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.unexpected_kept.lock().unwrap();
        if kept.len() < ERRORS_KEPT {
            kept.push(what);
        }
    }

    pub fn unexpected_errors(&self) -> Vec<String> {
        self.unexpected_kept.lock().unwrap().clone()
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A reply, as far as the clients care.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok,
    Nil,
    Error(String),
}

/// What a request must get back.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Ok,
    /// An error reply starting with this.
    Error(&'static str),
}

impl Expect {
    fn check(self, reply: &Reply) -> Result<bool, String> {
        match (self, reply) {
            (Expect::Ok, Reply::Ok | Reply::Nil) => Ok(false),
            (Expect::Error(prefix), Reply::Error(message)) if message.starts_with(prefix) => {
                Ok(true)
            }
            _ => Err(format!("expected {self:?}, got {reply:?}")),
        }
    }
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// Reads one reply (no aggregates: the clients send nothing that gets one).
fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end();
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(Reply::Ok),
        "-" => Ok(Reply::Error(rest.to_string())),
        "$" if rest == "-1" => Ok(Reply::Nil),
        "$" => {
            let len: usize = rest
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, line.to_string()))?;
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            Ok(Reply::Ok)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply line {line:?}"),
        )),
    }
}

/// A connection from `source` (port chosen at connect, per 4-tuple:
/// `IP_BIND_ADDRESS_NO_PORT`, so each source address has the whole
/// ephemeral range per destination).
fn connect_from(source: Ipv4Addr, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int option on our own socket.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&SocketAddrV4::new(source, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn source(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Waits until `due` unless the schedule is behind; never lets a backlog of
/// more than a second build up (a stall is then not made up in a burst).
fn pace(due: &mut Instant, step: Duration) {
    let now = Instant::now();
    if *due > now {
        thread::sleep(*due - now);
    } else if now - *due > Duration::from_secs(1) {
        *due = now;
    }
    *due += step;
}

/// The client threads; they stop when dropped.
pub struct Load {
    pub counts: Arc<ClientCounts>,
    stop: Arc<AtomicBool>,
    /// The prober's SYNs are being dropped (set before the rule goes in,
    /// cleared after it is out).
    pub dropping: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// Opens the held connections, then starts every client thread.
    pub fn start(redis: SocketAddr, options: &Options) -> anyhow::Result<Self> {
        let counts = Arc::new(ClientCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let dropping = Arc::new(AtomicBool::new(false));
        let mut setup = connect_from(source(2), redis, Duration::from_secs(5))?;
        setup.write_all(&command(&["SET", STRING_KEY, "v"]))?;
        ensure!(
            read_reply(&mut BufReader::new(&setup))? == Reply::Ok,
            "SET {STRING_KEY}"
        );

        let mut held = Vec::with_capacity(options.held);
        for i in 0..options.held {
            let from = source(HELD_SOURCES[i % HELD_SOURCES.len()]);
            let stream = connect_from(from, redis, Duration::from_secs(5))
                .with_context(|| format!("opening held connection {i} from {from}"))?;
            held.push(stream);
        }
        counts.held_open.store(held.len() as u64, Ordering::Relaxed);

        let mut threads = Vec::new();
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.to_string())
                .spawn(body)
                .with_context(|| format!("spawning client thread {name}"))
        };
        {
            let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
            threads.push(spawn(
                "held",
                Box::new(move || held_loop(held, &counts, &stop)),
            )?);
        }
        let per_thread = options.new_per_sec / options.churn_threads.max(1) as u32;
        for t in 0..options.churn_threads {
            let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
            threads.push(spawn(
                "churn",
                Box::new(move || churn_loop(redis, t, per_thread, &counts, &stop)),
            )?);
        }
        {
            let (counts, stop, dropping) = (
                Arc::clone(&counts),
                Arc::clone(&stop),
                Arc::clone(&dropping),
            );
            threads.push(spawn(
                "prober",
                Box::new(move || probe_loop(redis, &counts, &stop, &dropping)),
            )?);
        }
        let per_connection =
            options.pipelined_per_sec / options.pipelined_connections.max(1) as u64;
        for _ in 0..options.pipelined_connections {
            let stream = connect_from(source(20), redis, Duration::from_secs(5))?;
            let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
            threads.push(spawn(
                "pipelined",
                Box::new(move || pipelined_loop(stream, per_connection, &counts, &stop)),
            )?);
        }
        Ok(Self {
            counts,
            stop,
            dropping,
            threads,
        })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn held_loop(held: Vec<TcpStream>, counts: &ClientCounts, stop: &AtomicBool) {
    let ping = command(&["PING"]);
    let step = HELD_CYCLE / held.len().max(1) as u32;
    let mut due = Instant::now();
    let mut open: Vec<Option<BufReader<TcpStream>>> =
        held.into_iter().map(|s| Some(BufReader::new(s))).collect();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) && !open.is_empty() {
        pace(&mut due, step);
        let len = open.len();
        let slot = &mut open[i % len];
        i += 1;
        let Some(reader) = slot else { continue };
        let result = reader
            .get_mut()
            .write_all(&ping)
            .and_then(|()| read_reply(reader));
        match result {
            Ok(Reply::Ok) => {
                counts.held_pings.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                counts.unexpected(format!("held connection: PING got {other:?}"));
                counts.held_open.fetch_sub(1, Ordering::Relaxed);
                *slot = None;
            }
        }
    }
}

fn churn_loop(
    redis: SocketAddr,
    thread: usize,
    per_sec: u32,
    counts: &ClientCounts,
    stop: &AtomicBool,
) {
    let step = Duration::from_secs(1) / per_sec.max(1);
    let mut due = Instant::now();
    let mut i: u64 = thread as u64;
    let set = command(&["SET", "soak:churn", "v"]);
    let get = command(&["GET", STRING_KEY]);
    let wrongtype = command(&["LPUSH", STRING_KEY, "x"]);
    let unknown = command(&["SOAKNOSUCHCOMMAND"]);
    while !stop.load(Ordering::Relaxed) {
        pace(&mut due, step);
        i += 1;
        let from = source(CHURN_SOURCES[(i as usize) % CHURN_SOURCES.len()]);
        let (request, expect) = match i % 20 {
            0 => (&wrongtype, Expect::Error("WRONGTYPE")),
            1 => (&unknown, Expect::Error("ERR unknown command")),
            n if n % 2 == 0 => (&get, Expect::Ok),
            _ => (&set, Expect::Ok),
        };
        let stream = match connect_from(from, redis, Duration::from_secs(5)) {
            Ok(stream) => stream,
            Err(e) => {
                counts.unexpected(format!("churn connect from {from}: {e}"));
                continue;
            }
        };
        counts.churn_connects.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = (&stream).write_all(request) {
            counts.unexpected(format!("churn write: {e}"));
            continue;
        }
        // A reset before the reply was read: the server's reply meets a RST.
        if i % 10 == 7 {
            reset(stream, counts);
            continue;
        }
        match read_reply(&mut BufReader::new(&stream)).map_err(|e| e.to_string()) {
            Ok(reply) => match expect.check(&reply) {
                Ok(true) => counts.churn_error_replies.fetch_add(1, Ordering::Relaxed),
                Ok(false) => counts.churn_ok.fetch_add(1, Ordering::Relaxed),
                Err(why) => {
                    counts.unexpected(format!("churn: {why}"));
                    continue;
                }
            },
            Err(e) => {
                counts.unexpected(format!("churn read: {e}"));
                continue;
            }
        };
        if i % 10 == 3 {
            reset(stream, counts);
        }
    }
}

/// Closes with a RST (SO_LINGER 0) instead of a FIN.
fn reset(stream: TcpStream, counts: &ClientCounts) {
    match Socket::from(stream).set_linger(Some(Duration::ZERO)) {
        Ok(()) => {
            counts.churn_resets.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => counts.unexpected(format!("SO_LINGER: {e}")),
    }
}

fn probe_loop(redis: SocketAddr, counts: &ClientCounts, stop: &AtomicBool, dropping: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut due = Instant::now();
    let ping = command(&["PING"]);
    while !stop.load(Ordering::Relaxed) {
        pace(&mut due, step);
        let dropping_before = dropping.load(Ordering::SeqCst);
        match connect_from(DROPPED_SOURCE, redis, PROBE_TIMEOUT) {
            Ok(mut stream) => {
                counts.probe_connects.fetch_add(1, Ordering::Relaxed);
                let reply = stream
                    .write_all(&ping)
                    .and_then(|()| read_reply(&mut BufReader::new(&stream)));
                if !matches!(reply, Ok(Reply::Ok)) {
                    counts.unexpected(format!("prober: PING got {reply:?}"));
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut
                    && (dropping_before || dropping.load(Ordering::SeqCst)) =>
            {
                counts.probe_syn_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => counts.unexpected(format!("prober connect: {e}")),
        }
    }
}

fn pipelined_loop(stream: TcpStream, per_sec: u64, counts: &ClientCounts, stop: &AtomicBool) {
    let step = Duration::from_secs(1) * PIPELINE as u32 / per_sec.max(1) as u32;
    let mut due = Instant::now();
    let set = command(&["SET", "soak:pipelined", "v"]);
    let get = command(&["GET", "soak:pipelined"]);
    let wrongtype = command(&["LPUSH", STRING_KEY, "x"]);
    let mut reader = BufReader::new(&stream);
    let mut batch = Vec::new();
    let mut expected = Vec::with_capacity(PIPELINE);
    let mut sent: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        pace(&mut due, step);
        batch.clear();
        expected.clear();
        for _ in 0..PIPELINE {
            sent += 1;
            let (request, expect) = if sent.is_multiple_of(PIPELINE_ERROR_EVERY) {
                (&wrongtype, Expect::Error("WRONGTYPE"))
            } else if sent.is_multiple_of(2) {
                (&get, Expect::Ok)
            } else {
                (&set, Expect::Ok)
            };
            batch.extend_from_slice(request);
            expected.push(expect);
        }
        if let Err(e) = (&stream).write_all(&batch) {
            counts.unexpected(format!("pipelined write: {e}"));
            return;
        }
        for expect in &expected {
            match read_reply(&mut reader).map_err(|e| e.to_string()) {
                Ok(reply) => match expect.check(&reply) {
                    Ok(true) => counts
                        .pipelined_error_replies
                        .fetch_add(1, Ordering::Relaxed),
                    Ok(false) => counts.pipelined_ok.fetch_add(1, Ordering::Relaxed),
                    Err(why) => {
                        counts.unexpected(format!("pipelined: {why}"));
                        0
                    }
                },
                Err(e) => {
                    counts.unexpected(format!("pipelined read: {e}"));
                    return;
                }
            };
        }
    }
}

// ---- the agent, read cheaply ----------------------------------------------

/// What the agent wrote, kept small: thousands of lines a second for
/// minutes, so lines are counted by type and only `started`, `stats` and
/// `alert` lines are parsed (the lab's [`crate::Agent`] keeps and validates
/// every line, which is right for tests and too much here).
#[derive(Default)]
struct AgentOutput {
    started: Option<Value>,
    last_stats: Option<Value>,
    lines_by_type: BTreeMap<String, u64>,
    alerts_by_kind: BTreeMap<String, u64>,
    /// Requests counted in `latency` windows of `PING`, client side.
    client_pings: u64,
}

struct SoakAgent {
    child: Child,
    output: Arc<Mutex<AgentOutput>>,
    stderr: Arc<Mutex<String>>,
    reader: Option<thread::JoinHandle<()>>,
}

fn line_type(line: &str) -> &str {
    line.split_once("\"type\":\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("?", |(kind, _)| kind)
}

impl SoakAgent {
    fn start(port: u16, extra_args: &[&str]) -> anyhow::Result<Self> {
        let ports = format!("{port},{}", free_port());
        let mut child = Command::new(agent_binary())
            .args(["--ports", &ports, "--stats-interval", "5s"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let output = Arc::new(Mutex::new(AgentOutput::default()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&output);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let kind = line_type(&line).to_string();
                let parsed = matches!(kind.as_str(), "started" | "stats" | "alert" | "latency")
                    .then(|| serde_json::from_str::<Value>(&line).ok())
                    .flatten();
                let mut out = sink.lock().unwrap();
                *out.lines_by_type.entry(kind.clone()).or_default() += 1;
                match (kind.as_str(), parsed) {
                    ("started", Some(v)) => out.started = Some(v),
                    ("stats", Some(v)) => out.last_stats = Some(v),
                    ("latency", Some(v)) if v["op"] == "PING" && v["role"] == "client" => {
                        out.client_pings += v["count"].as_u64().unwrap_or(0);
                    }
                    ("alert", Some(v)) => {
                        let key = format!(
                            "{} {}",
                            v["kind"].as_str().unwrap_or("?"),
                            v["state"].as_str().unwrap_or("?")
                        );
                        *out.alerts_by_kind.entry(key).or_default() += 1;
                    }
                    _ => {}
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let errors = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                errors
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut agent = Self {
            child,
            output,
            stderr,
            reader: Some(reader),
        };
        let deadline = Instant::now() + agent_start_timeout();
        while agent.output.lock().unwrap().started.is_none() {
            agent.ensure_running()?;
            ensure!(
                Instant::now() < deadline,
                "the agent did not start within {:?}: {}",
                agent_start_timeout(),
                agent.stderr.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The open connections its `started` line says it found.
    fn seeded_connections(&self) -> u64 {
        self.output
            .lock()
            .unwrap()
            .started
            .as_ref()
            .map_or(0, |s| s["seeded_connections"].as_u64().unwrap_or(0))
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the agent exited ({status}) mid-run: {}",
                self.stderr.lock().unwrap()
            );
        }
        Ok(())
    }

    /// SIGKILL: no cleanup runs in the agent. Returns what it wrote before
    /// and how it ended.
    fn kill(mut self) -> anyhow::Result<(AgentOutput, std::process::ExitStatus)> {
        crate::signal(self.child.id(), libc::SIGKILL);
        let status = self.child.wait().context("waiting for the killed agent")?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok((std::mem::take(&mut self.output.lock().unwrap()), status))
    }

    /// SIGINT, then its last lines (the final `stats`).
    fn stop(mut self) -> anyhow::Result<AgentOutput> {
        crate::signal(self.child.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not exit within 30 s of SIGINT"
            );
            thread::sleep(Duration::from_millis(50));
        };
        ensure!(
            status.success(),
            "the agent exited with {status}: {}",
            self.stderr.lock().unwrap()
        );
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(std::mem::take(&mut self.output.lock().unwrap()))
    }
}

impl Drop for SoakAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- measuring -----------------------------------------------------------

/// CPU seconds (user + system, all threads) of `pid`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime the 14th and stime the 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
        bail!("no utime/stime in /proc/{pid}/stat: {stat}");
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((user + system) as f64 / per_second)
}

/// Resident memory of `pid`, KiB (`VmRSS`).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Memory of the BPF maps `pid` holds, bytes: the kernel's `memlock` of
/// each map (ring buffer included), once per map id.
fn map_memory(pid: u32) -> anyhow::Result<u64> {
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for info in crate::kernel::fdinfos(pid)? {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock;
        }
    }
    Ok(total)
}

/// Raises the fd limit to `needed` (the hard limit too, which needs
/// CAP_SYS_RESOURCE; without it, the soft limit up to the hard one), and
/// fails unless it then allows `needed`.
fn raise_fd_limit(needed: u64) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_cur.max(needed),
            rlim_max: limit.rlim_max.max(needed),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            limit = wanted;
            0
        } else {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit)
        }
    };
    ensure!(
        raised == 0,
        "raising RLIMIT_NOFILE to {}: {}",
        limit.rlim_max,
        io::Error::last_os_error()
    );
    ensure!(
        limit.rlim_cur >= needed,
        "the fd limit ({}) is below the {needed} the soak needs (`ulimit -Hn`; raising it needs CAP_SYS_RESOURCE)",
        limit.rlim_cur
    );
    Ok(())
}

/// One sample of the run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub phase: &'static str,
    pub syn_drops_on: bool,
    pub pipelined_requests: u64,
    pub churn_connects: u64,
    pub held_pings: u64,
    /// The prober's PINGs (one per connection that got through).
    pub probe_pings: u64,
    pub held_open: u64,
    pub unexpected_errors: u64,
    pub redis_cpu_s: f64,
    pub redis_clients: u64,
    pub agent: Option<AgentSample>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentSample {
    pub rss_kib: u64,
    pub cpu_s: f64,
    pub map_bytes: u64,
    /// The last `stats` line's counters.
    pub stats: Value,
}

/// A phase's rates, from the samples at its ends.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rates {
    pub seconds: f64,
    pub pipelined_per_s: f64,
    pub churn_connects_per_s: f64,
    pub held_pings_per_s: f64,
    pub redis_cpu_percent: f64,
}

fn rates(from: &Sample, to: &Sample) -> Rates {
    let seconds = (to.t_s - from.t_s).max(1e-9);
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    Rates {
        seconds,
        pipelined_per_s: per_s(from.pipelined_requests, to.pipelined_requests),
        churn_connects_per_s: per_s(from.churn_connects, to.churn_connects),
        held_pings_per_s: per_s(from.held_pings, to.held_pings),
        redis_cpu_percent: 100.0 * (to.redis_cpu_s - from.redis_cpu_s) / seconds,
    }
}

/// Everything a run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub options: String,
    pub started_utc: String,
    pub machine: String,
    pub load_average_start: String,
    pub load_average_end: String,
    pub samples: Vec<Sample>,
    pub baseline_before: Rates,
    /// The agent phase after its warm-up.
    pub agent: Rates,
    pub baseline_after: Rates,
    /// Pipelined throughput with the agent ÷ the mean of the baselines.
    pub throughput_ratio: f64,
    pub churn_ratio: f64,
    /// First agent sample after the warm-up, and the last one.
    pub steady_start: AgentSample,
    pub end: AgentSample,
    pub rss_peak_kib: u64,
    pub agent_cpu_percent: f64,
    pub agent_start_s: f64,
    pub agent_phase_s: f64,
    pub warmup_s: f64,
    pub seeded_connections: u64,
    /// The agent's `stats` at exit.
    pub final_stats: Value,
    pub lines_by_type: BTreeMap<String, u64>,
    pub alerts: BTreeMap<String, u64>,
    pub clients: Value,
    pub unexpected_errors: Vec<String>,
    /// The SIGKILL of a restarted agent under the same load.
    pub restart: Value,
}

// ---- the run -------------------------------------------------------------

struct Run<'a> {
    options: &'a Options,
    started: Instant,
    redis_pid: u32,
    control: redis::Connection,
    load: &'a Load,
    samples: Vec<Sample>,
    syn_drop: Option<FirewallRule>,
    redis_port: u16,
}

impl Run<'_> {
    fn sample(
        &mut self,
        phase: &'static str,
        agent: Option<&mut SoakAgent>,
    ) -> anyhow::Result<Sample> {
        let counts = &self.load.counts;
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query(&mut self.control)
            .context("INFO clients")?;
        let redis_clients = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let agent = match agent {
            Some(agent) => {
                agent.ensure_running()?;
                let pid = agent.pid();
                Some(AgentSample {
                    rss_kib: rss_kib(pid)?,
                    cpu_s: cpu_seconds(pid)?,
                    map_bytes: map_memory(pid)?,
                    stats: agent
                        .output
                        .lock()
                        .unwrap()
                        .last_stats
                        .clone()
                        .unwrap_or(Value::Null),
                })
            }
            None => None,
        };
        let get = ClientCounts::get;
        let sample = Sample {
            t_s: self.started.elapsed().as_secs_f64(),
            phase,
            syn_drops_on: self.syn_drop.is_some(),
            pipelined_requests: get(&counts.pipelined_ok) + get(&counts.pipelined_error_replies),
            churn_connects: get(&counts.churn_connects),
            held_pings: get(&counts.held_pings),
            probe_pings: get(&counts.probe_connects),
            held_open: get(&counts.held_open),
            unexpected_errors: get(&counts.unexpected),
            redis_cpu_s: cpu_seconds(self.redis_pid)?,
            redis_clients,
            agent,
        };
        self.samples.push(sample.clone());
        Ok(sample)
    }

    /// Runs `phase` for `length`: SYN drops on and off on their schedule,
    /// a sample every `sample_every` and at both ends. Returns the first
    /// and last samples.
    fn phase(
        &mut self,
        phase: &'static str,
        length: Duration,
        mut agent: Option<&mut SoakAgent>,
    ) -> anyhow::Result<(Sample, Sample)> {
        let first = self.sample(phase, agent.as_deref_mut())?;
        let begin = Instant::now();
        let mut next_sample = begin + self.options.sample_every;
        eprintln!("soak: {phase} for {length:?}");
        while begin.elapsed() < length {
            let tick = Duration::from_millis(250).min(length.saturating_sub(begin.elapsed()));
            thread::sleep(tick);
            let into_period =
                self.started.elapsed().as_secs_f64() % self.options.syn_drop_period.as_secs_f64();
            let drop_now = into_period < self.options.syn_drop_for.as_secs_f64();
            if drop_now && self.syn_drop.is_none() {
                self.load.dropping.store(true, Ordering::SeqCst);
                let port = self.redis_port.to_string();
                let from = DROPPED_SOURCE.to_string();
                self.syn_drop = Some(FirewallRule::insert(
                    false,
                    "INPUT",
                    &[
                        "-i", "lo", "-p", "tcp", "--syn", "-s", &from, "--dport", &port, "-j",
                        "DROP",
                    ],
                )?);
            } else if !drop_now && let Some(rule) = self.syn_drop.take() {
                drop(rule);
                self.load.dropping.store(false, Ordering::SeqCst);
            }
            if Instant::now() >= next_sample {
                next_sample += self.options.sample_every;
                let s = self.sample(phase, agent.as_deref_mut())?;
                if let Some(a) = &s.agent {
                    eprintln!(
                        "soak: t={:.0}s RSS {} KiB, maps {} KiB, CPU {:.1}s, pipelined {}, churn {}, unexpected {}",
                        s.t_s,
                        a.rss_kib,
                        a.map_bytes / 1024,
                        a.cpu_s,
                        s.pipelined_requests,
                        s.churn_connects,
                        s.unexpected_errors
                    );
                }
            }
        }
        let last = self.sample(phase, agent)?;
        Ok((first, last))
    }
}

fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, Linux {}", kernel.trim())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Baseline, agent, baseline, under the whole load; writes nothing.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    crate::sweep::sweep_once();
    // Each held connection is a socket here and one in redis-server, which
    // inherits the limit; the churn's and the rest's need a few hundred more.
    let needed = options.held as u64 + 2_000;
    raise_fd_limit(needed)?;
    let maxclients = needed.to_string();
    let redis = RedisServer::start_with(&["--maxclients", &maxclients])?;
    let endpoint = SocketAddr::from((Ipv4Addr::LOCALHOST, redis.port));
    let control = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port))?
        .get_connection()
        .context("control connection to redis")?;
    let started_utc = utc_now();
    let load_average_start = load_average();
    let opening = Instant::now();
    let load = Load::start(endpoint, options)?;
    eprintln!(
        "soak: {} held connections open after {:?}",
        options.held,
        opening.elapsed()
    );
    let mut run = Run {
        options,
        started: Instant::now(),
        redis_pid: redis.pid(),
        control,
        load: &load,
        samples: Vec::new(),
        syn_drop: None,
        redis_port: redis.port,
    };

    let (b1_first, b1_last) = run.phase("baseline before", options.baseline_phase, None)?;
    let starting = Instant::now();
    let mut agent = SoakAgent::start(redis.port, &[])?;
    let agent_start_s = starting.elapsed().as_secs_f64();
    let seeded_connections = agent.seeded_connections();
    let (_, warm) = run.phase("agent warm-up", options.warmup, Some(&mut agent))?;
    let (_, agent_last) = run.phase(
        "agent",
        options.agent_phase.saturating_sub(options.warmup),
        Some(&mut agent),
    )?;
    let output = agent.stop()?;
    let (b2_first, b2_last) = run.phase("baseline after", options.baseline_phase, None)?;
    // A failure here is reported (and fails `check`) without losing the rest.
    let restart = restart_and_kill(&mut run, redis.port)
        .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    drop(run.syn_drop.take());
    let samples = std::mem::take(&mut run.samples);
    drop(run);
    let counts = &load.counts;
    let get = ClientCounts::get;
    let clients = json!({
        "held_open_at_end": get(&counts.held_open),
        "held_pings": get(&counts.held_pings),
        "churn_connects": get(&counts.churn_connects),
        "churn_ok": get(&counts.churn_ok),
        "churn_error_replies": get(&counts.churn_error_replies),
        "churn_resets": get(&counts.churn_resets),
        "probe_connects": get(&counts.probe_connects),
        "probe_syn_dropped": get(&counts.probe_syn_dropped),
        "pipelined_ok": get(&counts.pipelined_ok),
        "pipelined_error_replies": get(&counts.pipelined_error_replies),
        "unexpected": get(&counts.unexpected),
    });
    let unexpected_errors = counts.unexpected_errors();
    drop(load);

    let baseline_before = rates(&b1_first, &b1_last);
    let agent_rates = rates(&warm, &agent_last);
    let baseline_after = rates(&b2_first, &b2_last);
    let mean = |f: fn(&Rates) -> f64| (f(&baseline_before) + f(&baseline_after)) / 2.0;
    let throughput_ratio = agent_rates.pipelined_per_s / mean(|r| r.pipelined_per_s).max(1e-9);
    let churn_ratio = agent_rates.churn_connects_per_s / mean(|r| r.churn_connects_per_s).max(1e-9);
    let (Some(steady_start), Some(end)) = (warm.agent.clone(), agent_last.agent.clone()) else {
        bail!("no agent samples");
    };
    let rss_peak_kib = samples
        .iter()
        .filter(|s| MEASURED_PHASES.contains(&s.phase))
        .filter_map(|s| s.agent.as_ref().map(|a| a.rss_kib))
        .max()
        .unwrap_or(0);
    let agent_cpu_percent =
        100.0 * (end.cpu_s - steady_start.cpu_s) / (agent_last.t_s - warm.t_s).max(1e-9);
    Ok(Report {
        options: format!("{options:?}"),
        started_utc,
        machine: machine(),
        load_average_start,
        load_average_end: load_average(),
        samples,
        baseline_before,
        agent: agent_rates,
        baseline_after,
        throughput_ratio,
        churn_ratio,
        steady_start,
        end,
        rss_peak_kib,
        agent_cpu_percent,
        agent_start_s,
        agent_phase_s: options.agent_phase.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        seeded_connections,
        final_stats: output.last_stats.unwrap_or(Value::Null),
        lines_by_type: output.lines_by_type,
        alerts: output.alerts_by_kind,
        clients,
        unexpected_errors,
        restart,
    })
}

/// The phases of the agent whose RSS, CPU and throughput are reported.
const MEASURED_PHASES: &[&str] = &["agent warm-up", "agent"];

/// SIGKILL at full scale: a new agent joins the open connections, traces
/// them for a cycle of the held connections' requests, and is killed
/// mid-load; the load goes on for a while after (the clients' error count
/// covers it). Returns what happened, for the report and [`check`].
fn restart_and_kill(run: &mut Run<'_>, port: u16) -> anyhow::Result<Value> {
    // Windows of 1 s: by the kill, all but the last second is written.
    let mut agent = SoakAgent::start(port, &["--interval", "1s"])?;
    let seeded = agent.seeded_connections();
    let (programs, maps, links) = kernel::bpf_objects_held_by(agent.pid())?;
    let (first, last) = run.phase(
        "restarted agent",
        HELD_CYCLE + Duration::from_secs(5),
        Some(&mut agent),
    )?;
    let (output, status) = agent.kill()?;
    let killed = Instant::now();
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "the restarted agent ended with {status}, not by SIGKILL"
    );
    // Freed once the last reference goes (after an RCU grace period).
    let left = || -> [Vec<u64>; 3] {
        [("prog", &programs), ("map", &maps), ("link", &links)].map(|(kind, ours)| {
            kernel::bpftool_ids(kind)
                .map(|ids| ids.intersection(ours).copied().collect())
                .unwrap_or_else(|_| vec![u64::MAX])
        })
    };
    let freed = wait_until(Duration::from_secs(10), || left().iter().all(Vec::is_empty));
    let freed_after_ms = killed.elapsed().as_millis() as u64;
    let (_, after) = run.phase("after SIGKILL", Duration::from_secs(10), None)?;
    Ok(json!({
        "seeded_connections": seeded,
        "programs": programs.len(),
        "maps": maps.len(),
        "links": links.len(),
        "left_after_kill": left(),
        "freed": freed,
        "freed_after_ms": freed_after_ms,
        "held_pings_while_traced": last.held_pings - first.held_pings,
        "probe_pings_while_traced": last.probe_pings - first.probe_pings,
        "client_pings_in_latency_windows": output.client_pings,
        "unexpected_errors_after_kill": after.unexpected_errors - last.unexpected_errors,
        "held_open_after_kill": after.held_open,
    }))
}

/// Counters of the agent's `stats` that mean a capacity was exceeded and
/// something was not traced; a soak at the documented load must keep them
/// at 0. The others (`ring_buffer_full`, `resp_gaps`, …) count overload
/// and injected faults: reported, not expected to be 0.
pub const CAPACITY_DROPS: &[&str] = &[
    "decode_errors",
    "connect_map_full",
    "connection_map_full",
    "read_failed",
    "resp_flow_map_full",
    "lines_dropped",
];

/// The checks of a soak: clients saw only the errors injected, the agent
/// kept its memory flat and dropped nothing for lack of capacity.
pub fn check(report: &Report, options: &Options) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    let clients = &report.clients;
    if clients["unexpected"] != 0 {
        failures.push(format!(
            "clients saw {} errors not injected: {:?}",
            clients["unexpected"], report.unexpected_errors
        ));
    }
    if clients["held_open_at_end"] != options.held as u64 {
        failures.push(format!("held connections lost: {clients}"));
    }
    for injected in [
        "churn_error_replies",
        "churn_resets",
        "probe_syn_dropped",
        "pipelined_error_replies",
    ] {
        if clients[injected].as_u64().unwrap_or(0) == 0 {
            failures.push(format!("no {injected}: the load did not inject it"));
        }
    }
    // Flat: bounded state (series, flows) may still fill after the warm-up.
    let margin = (report.steady_start.rss_kib / 5).max(8 * 1024);
    if report.end.rss_kib > report.steady_start.rss_kib + margin {
        failures.push(format!(
            "RSS grew from {} KiB to {} KiB (margin {margin} KiB)",
            report.steady_start.rss_kib, report.end.rss_kib
        ));
    }
    if report.end.map_bytes != report.steady_start.map_bytes {
        failures.push(format!(
            "BPF map memory changed: {} → {} bytes",
            report.steady_start.map_bytes, report.end.map_bytes
        ));
    }
    if report.steady_start.map_bytes == 0 {
        failures.push("the agent's BPF map memory read as 0: its map fds were not found".into());
    }
    let restart = &report.restart;
    if let Some(error) = restart.get("error") {
        failures.push(format!("restart and SIGKILL: {error}"));
    }
    if restart["seeded_connections"].as_u64().unwrap_or(0) < 2 * options.held as u64 {
        failures.push(format!(
            "the restarted agent found too few open connections (both ends of {} held): {restart}",
            options.held
        ));
    }
    // The held connections' PINGs, the prober's taken out (its connections
    // are new, so traced from their start): were the connections open
    // before the agent not traced, this would be a small fraction.
    let held_pings = restart["held_pings_while_traced"].as_u64().unwrap_or(0);
    let probe_pings = restart["probe_pings_while_traced"].as_u64().unwrap_or(0);
    let traced = restart["client_pings_in_latency_windows"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(probe_pings);
    if held_pings == 0 || traced * 10 < held_pings * 8 {
        failures.push(format!(
            "the restarted agent timed {traced} of the held connections' PINGs; they sent {held_pings}"
        ));
    }
    // Its objects were found before the kill (else "freed" says nothing).
    for kind in ["programs", "maps", "links"] {
        if restart[kind].as_u64().unwrap_or(0) == 0 {
            failures.push(format!(
                "no BPF {kind} of the restarted agent found before the kill: {restart}"
            ));
        }
    }
    if restart["freed"] != true {
        failures.push(format!("left in the kernel after SIGKILL: {restart}"));
    }
    for counter in CAPACITY_DROPS {
        let value = report.final_stats[*counter].as_u64();
        if value != Some(0) {
            failures.push(format!("stats.{counter} = {value:?} at exit"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Writes `report` as `<stem>.json` and `<stem>.md` into `dir`.
pub fn write(report: &Report, dir: &Path, stem: &str, command: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, markdown(report, command))
        .with_context(|| format!("writing {}", md_path.display()))?;
    eprintln!(
        "soak: report in {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

/// A `stats` counter, or `–` before the first `stats` line.
fn counter(stats: &Value, name: &str) -> String {
    stats[name].as_u64().map_or("–".into(), |v| v.to_string())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn commit() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        head
    } else {
        format!("{head} + uncommitted changes")
    }
}

/// The report as a docs/performance.md section body.
pub fn markdown(r: &Report, command: &str) -> String {
    use std::fmt::Write as _;
    let mut m = String::new();
    let minutes = |s: f64| format!("{:.1} min", s / 60.0);
    let _ = writeln!(
        m,
        "`{command}`: {}; {}; resptrace at {}; load average {} at the start, {} at the end \
         (the machine was shared with other work).\n",
        r.started_utc,
        r.machine,
        commit(),
        r.load_average_start,
        r.load_average_end
    );
    let _ = writeln!(
        m,
        "Phases: no agent {}, agent {} (the first {} of it warm-up), no agent {}. \
         The agent started in {:.1} s and found {} connections already open.\n",
        minutes(r.baseline_before.seconds),
        minutes(r.agent_phase_s),
        minutes(r.warmup_s),
        minutes(r.baseline_after.seconds),
        r.agent_start_s,
        r.seeded_connections
    );
    let _ = writeln!(
        m,
        "| | no agent, before | agent (after warm-up) | no agent, after | with ÷ without |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|");
    let row = |m: &mut String, name: &str, f: fn(&Rates) -> f64, ratio: Option<f64>| {
        let _ = writeln!(
            m,
            "| {name} | {:.0} | {:.0} | {:.0} | {} |",
            f(&r.baseline_before),
            f(&r.agent),
            f(&r.baseline_after),
            ratio.map_or("–".to_string(), |x| format!("{x:.3}"))
        );
    };
    row(
        &mut m,
        "pipelined requests/s",
        |x| x.pipelined_per_s,
        Some(r.throughput_ratio),
    );
    row(
        &mut m,
        "new connections/s",
        |x| x.churn_connects_per_s,
        Some(r.churn_ratio),
    );
    row(
        &mut m,
        "PINGs/s on held connections",
        |x| x.held_pings_per_s,
        None,
    );
    row(&mut m, "redis-server CPU %", |x| x.redis_cpu_percent, None);
    let _ = writeln!(m);
    let _ = writeln!(m, "| agent | after warm-up | end | peak |");
    let _ = writeln!(m, "|---|---|---|---|");
    let _ = writeln!(
        m,
        "| RSS | {} | {} | {} |",
        mib(r.steady_start.rss_kib),
        mib(r.end.rss_kib),
        mib(r.rss_peak_kib)
    );
    let _ = writeln!(
        m,
        "| BPF map memory | {} | {} | – |",
        mib(r.steady_start.map_bytes / 1024),
        mib(r.end.map_bytes / 1024)
    );
    let _ = writeln!(
        m,
        "| CPU | {:.1}% of one core on average after warm-up | | |\n",
        r.agent_cpu_percent
    );
    let _ = writeln!(
        m,
        "The agent's counters at exit (`stats`; every drop it counts):\n"
    );
    let _ = writeln!(m, "| counter | value |");
    let _ = writeln!(m, "|---|---|");
    if let Some(stats) = r.final_stats.as_object() {
        for (name, value) in stats {
            if value.is_number() {
                let _ = writeln!(m, "| `{name}` | {value} |");
            }
        }
    }
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Clients (their own counts): {}; unexpected errors: {}.\n",
        r.clients
            .as_object()
            .map(|o| o
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        if r.unexpected_errors.is_empty() {
            "none".to_string()
        } else {
            format!("{:?}", r.unexpected_errors)
        }
    );
    let restart = &r.restart;
    let _ = writeln!(
        m,
        "SIGKILL under the same load, after the last no-agent phase: a new agent found {} open \
         connections, timed {} client-side PINGs in its 1 s windows while the held connections \
         sent {} and the prober {}, and was killed; its {} programs, {} maps and {} links were gone from the \
         kernel's lists {} ms later (left: {}); the clients saw {} errors through the kill and \
         held {} connections after it.\n",
        restart["seeded_connections"],
        restart["client_pings_in_latency_windows"],
        restart["held_pings_while_traced"],
        restart["probe_pings_while_traced"],
        restart["programs"],
        restart["maps"],
        restart["links"],
        restart["freed_after_ms"],
        restart["left_after_kill"],
        restart["unexpected_errors_after_kill"],
        restart["held_open_after_kill"],
    );
    let _ = writeln!(
        m,
        "Agent lines by type: {:?}; alerts: {:?}.\n",
        r.lines_by_type, r.alerts
    );
    // Over time: about ten rows of the agent's samples.
    let agent_samples: Vec<&Sample> = r
        .samples
        .iter()
        .filter(|s| s.agent.is_some() && MEASURED_PHASES.contains(&s.phase))
        .collect();
    let every = (agent_samples.len() / 10).max(1);
    let _ = writeln!(
        m,
        "| t | RSS | BPF map memory | agent CPU since previous row | `ring_buffer_full` | `resp_gaps` | pipelined requests/s since previous row |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    let mut previous: Option<&Sample> = None;
    for (i, s) in agent_samples.iter().enumerate() {
        // A phase's first sample is its predecessor's last one, taken again.
        let repeated = previous.is_some_and(|p| s.t_s - p.t_s < 1.0);
        if repeated || (i % every != 0 && i + 1 != agent_samples.len()) {
            continue;
        }
        let a = s.agent.as_ref().expect("agent sample");
        let (cpu, rate) = match previous {
            Some(p) => {
                let dt = (s.t_s - p.t_s).max(1e-9);
                let pa = p.agent.as_ref().expect("agent sample");
                (
                    format!("{:.1}%", 100.0 * (a.cpu_s - pa.cpu_s) / dt),
                    format!(
                        "{:.0}",
                        (s.pipelined_requests - p.pipelined_requests) as f64 / dt
                    ),
                )
            }
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            m,
            "| {:.0} s | {} | {} | {cpu} | {} | {} | {rate} |",
            s.t_s,
            mib(a.rss_kib),
            mib(a.map_bytes / 1024),
            counter(&a.stats, "ring_buffer_full"),
            counter(&a.stats, "resp_gaps"),
        );
        previous = Some(s);
    }
    m
}
