//! The test lab: guards for the real agent, a real `redis-server`, firewall
//! rules, and the kernel's own counters as ground truth. Every guard undoes
//! what it did on drop, also when the test panics.

use std::{
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub mod cgroup;
pub mod clients;
pub mod cluster;
pub mod delay;
pub mod deploy;
pub mod faults;
pub mod kernel;
pub mod kubeapi;
pub mod netns;
pub mod schema;
pub mod soak;
pub mod sweep;
pub mod topology;

pub use cgroup::{CgroupSpec, PodCgroup};
pub use clients::{ClientResult, Place, Workload};
pub use cluster::Cluster;
pub use delay::DelaySpec;
pub use faults::{Direction, Fault, FaultGuard, FullListener, Path, inject_loopback};
pub use netns::{Counters, Netns, Process};
pub use sweep::sweep;
pub use topology::{Host, Lab};

/// How much slower than the host this machine runs: `$RESPTRACE_TIME_SCALE`
/// (default 1; the qemu TCG guests of `cargo xtask vm-test` set ~10). Every
/// timeout and timing tolerance of the lab is multiplied by it.
pub fn time_scale() -> u32 {
    std::env::var("RESPTRACE_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&scale| scale >= 1)
        .unwrap_or(1)
}

/// `duration` × [`time_scale`].
pub fn scaled(duration: Duration) -> Duration {
    duration * time_scale()
}

/// How long a test waits for the agent to attach its programs.
pub fn agent_start_timeout() -> Duration {
    scaled(Duration::from_secs(30))
}

/// How long a test waits for an event that should come.
pub fn event_timeout() -> Duration {
    scaled(Duration::from_secs(10))
}

/// Tests that read node-wide kernel counters (`nstat`) run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The agent binary under test: `$RESPTRACE_BIN`, else `target/release/resptrace`.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("RESPTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/resptrace")
        })
}

/// A TCP port nothing uses right now, on 127.0.0.1 and ::1, each call in a
/// process a different one. Chosen below the kernel's ephemeral range: a
/// port from that range, free when asked, can become the local port of any
/// parallel test's outgoing connection before it is bound (CI lost a
/// cluster node to its bus port that way).
pub fn free_port() -> u16 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    static EPHEMERAL_LOW: OnceLock<u64> = OnceLock::new();
    let ephemeral_low = *EPHEMERAL_LOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(32768)
    });
    let span = 10_000.min(ephemeral_low.saturating_sub(1024)).max(1);
    let base = ephemeral_low - span;
    // Start where another test binary (another pid) is unlikely to be.
    let start = u64::from(std::process::id()) * 7919;
    for _ in 0..span {
        let port = (base + (start + CALLS.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let v4_free = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
        let v6_taken = matches!(
            TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, port)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse
        );
        if v4_free && !v6_taken {
            return port;
        }
    }
    panic!("no free TCP port in {base}..{ephemeral_low}");
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// How the stdout reader reports a last line without its newline: only a
/// SIGKILL may leave one.
const CUT_LINE: &str = "the agent's stdout ended inside a line: ";

/// A running `resptrace`, its stdout parsed line by line and every line
/// validated against `docs/events.schema.json`: a line that is not JSON or
/// does not match fails the test (at the next wait, or when the agent is
/// dropped).
pub struct Agent {
    child: Child,
    /// Stdout lines: events, or why a line is not a valid one.
    events: Receiver<Result<Value, String>>,
    /// Invalid stdout lines, with why.
    invalid_lines: Arc<Mutex<Vec<String>>>,
    stdout_reader: Option<thread::JoinHandle<()>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
    /// A watched port with no listener: a connect to it is a marker event.
    barrier_port: u16,
    /// Events read past while waiting for others, in order.
    seen: Vec<Value>,
    /// The agent's `started` event.
    started: Value,
    /// The alert kinds this test provokes; any other alert is a false alarm.
    alerts_expected: Vec<&'static str>,
    /// Every `alert` read, whoever took it.
    alerts: Vec<Value>,
}

/// An event's `src`/`dst` object is `endpoint`.
pub fn is_endpoint(value: &Value, endpoint: std::net::SocketAddr) -> bool {
    value["ip"] == endpoint.ip().to_string() && value["port"] == endpoint.port()
}

/// The `request` lines of `role` to `endpoint`.
pub fn request_lines<'a>(
    events: &'a [Value],
    endpoint: std::net::SocketAddr,
    role: &str,
) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == "request" && e["role"] == role && is_endpoint(&e["dst"], endpoint))
        .collect()
}

/// The alerts packet loss on a path rightly raises: retransmits, dropped
/// SYNs and the connect retries they cause, requests slowed by an RTO.
pub const LOSS_ALERTS: &[&str] = &[
    "retransmits",
    "syn_drops",
    "retry_storm",
    "slow_commands",
    "timeouts",
];

impl Agent {
    /// Starts the agent watching `ports` (plus a barrier port) and waits until
    /// it has attached its programs.
    pub fn start(ports: &[u16], extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_command(Command::new(agent_binary()), ports, extra_args)
    }

    /// [`Agent::start`] with `command`: the agent binary, or a wrapper that
    /// ends by exec-ing it with the arguments appended (`setpriv …`, as in
    /// `tests/caps.rs`: the agent keeps the pid).
    pub fn start_command(
        command: Command,
        ports: &[u16],
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_tapped(command, ports, extra_args, |_| {})
    }

    /// [`Agent::start_command`], with `tap` called on every valid event as
    /// soon as it is read, before any `wait_for` sees it: for a watcher
    /// that shows alerts while the caller is busy provoking them (the demo).
    pub fn start_tapped(
        mut command: Command,
        ports: &[u16],
        extra_args: &[&str],
        mut tap: impl FnMut(&Value) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let barrier_port = free_port();
        let port_list: Vec<String> = ports
            .iter()
            .chain(std::iter::once(&barrier_port))
            .map(u16::to_string)
            .collect();
        let program = command.get_program().to_owned();
        let mut child = command
            .arg("--ports")
            .arg(port_list.join(","))
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.to_string_lossy()))?;

        let (sender, events) = channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let invalid_lines = Arc::new(Mutex::new(Vec::new()));
        let invalid = Arc::clone(&invalid_lines);
        // Reads to the end even when nobody waits any more: the agent must
        // never block on its stdout, and every line gets checked.
        let stdout_reader = thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            while let Ok(1..) = stdout.read_line(&mut line) {
                let checked = match line.strip_suffix('\n') {
                    Some(whole) => schema::check_line(whole),
                    None => Err(format!("{CUT_LINE}{line}")),
                };
                match &checked {
                    Ok(event) => tap(event),
                    Err(why) => invalid.lock().unwrap().push(why.clone()),
                }
                let _ = sender.send(checked);
                line.clear();
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let mut agent = Self {
            child,
            events,
            invalid_lines,
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
            stderr,
            barrier_port,
            seen: Vec::new(),
            started: Value::Null,
            alerts_expected: Vec::new(),
            alerts: Vec::new(),
        };
        agent.started = agent
            .wait_for(agent_start_timeout(), |e| e["type"] == "started")
            .context("agent did not start")?;
        Ok(agent)
    }

    /// Whether the agent attached `category/name` (kernels differ: e.g.
    /// `sock/inet_sk_error_report` exists from 5.14).
    pub fn attached(&self, tracepoint: &str) -> bool {
        self.started["tracepoints"]
            .as_array()
            .is_some_and(|list| list.iter().any(|t| t == tracepoint))
    }

    /// The agent's `started` event.
    pub fn started(&self) -> &Value {
        &self.started
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the agent has exited (it should not, until stopped).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Returns the first event matching `predicate`, among those read past
    /// earlier or, waiting, among new ones; others are kept in `seen`.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        if let Some(index) = self.seen.iter().position(&predicate) {
            return Ok(self.seen.remove(index));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = self.events.recv_timeout(left);
            if let Ok(Ok(event)) = &received
                && event["type"] == "alert"
            {
                self.alerts.push(event.clone());
            }
            match received {
                Ok(Ok(event)) if predicate(&event) => return Ok(event),
                Ok(Ok(event)) => self.seen.push(event),
                Ok(Err(invalid)) => bail!("agent wrote an invalid line: {invalid}"),
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no matching event within {timeout:?}; seen: {:#?}\nagent stderr:\n{}",
                    self.seen,
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    // Its stdout is closed: it has exited, and its stderr
                    // is read to the end once the pump is joined.
                    let status = self.child.wait();
                    if let Some(reader) = self.stderr_reader.take() {
                        let _ = reader.join();
                    }
                    bail!("agent exited ({status:?}); stderr:\n{}", self.stderr())
                }
            }
        }
    }

    /// Makes a marker connect and waits for its event: every event of a
    /// connect that completed before this call has then been read.
    pub fn barrier(&mut self) -> anyhow::Result<()> {
        let port = self.barrier_port;
        let attempt = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
        anyhow::ensure!(attempt.is_err(), "something listens on barrier port {port}");
        self.wait_for(event_timeout(), |e| {
            e["type"] == "connect" && e["dst"]["port"] == port
        })?;
        Ok(())
    }

    /// Events read so far (not returned by `wait_for`) that match `predicate`.
    pub fn take_seen(&mut self, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        let (matching, rest) = std::mem::take(&mut self.seen)
            .into_iter()
            .partition(predicate);
        self.seen = rest;
        matching
    }

    /// Connect events to `port` read so far.
    pub fn connects_to(&mut self, port: u16) -> Vec<Value> {
        self.take_seen(|e| e["type"] == "connect" && e["dst"]["port"] == port)
    }

    /// Program runs of this agent the kernel skipped so far, by the kernel's
    /// own count (`recursion_misses` in `bpftool prog show`, Linux 5.12+; 0
    /// before): a tracepoint firing in an interrupt while another tracing
    /// program runs on that CPU does not run its program, so an event the
    /// kernel counted can be missing from the agent's — rarely, and only
    /// under load.
    pub fn missed_runs(&self) -> anyhow::Result<u64> {
        let listing = Command::new("bpftool")
            .args(["--json", "prog", "show"])
            .output()
            .context("running bpftool prog show")?;
        anyhow::ensure!(listing.status.success(), "bpftool prog show failed");
        let programs: Vec<Value> = serde_json::from_slice(&listing.stdout)?;
        let ours = self.program_ids()?;
        Ok(programs
            .iter()
            .filter(|program| program["id"].as_u64().is_some_and(|id| ours.contains(&id)))
            .filter_map(|program| program["recursion_misses"].as_u64())
            .sum())
    }

    /// Ids of the BPF programs the agent holds open (`prog_id` in the
    /// fdinfo of its descriptors; bpftool's own pid lookup is not built in
    /// everywhere).
    fn program_ids(&self) -> anyhow::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for text in kernel::fdinfos(self.pid())? {
            ids.extend(
                text.lines()
                    .filter_map(|line| line.strip_prefix("prog_id:"))
                    .filter_map(|id| id.trim().parse::<u64>().ok()),
            );
        }
        Ok(ids)
    }

    /// Checks a count of the agent's against the kernel's own: equal, or
    /// short by no more than the runs the kernel skipped ([`Agent::missed_runs`]).
    pub fn assert_count(&self, what: &str, agent: u64, kernel: u64) -> anyhow::Result<()> {
        if agent == kernel {
            return Ok(());
        }
        let missed = self.missed_runs()?;
        anyhow::ensure!(
            agent < kernel && kernel - agent <= missed,
            "{what}: the agent counted {agent}, the kernel {kernel} ({missed} program runs skipped by the kernel)"
        );
        eprintln!("{what}: agent {agent}, kernel {kernel}: {missed} runs skipped by the kernel");
        Ok(())
    }

    /// Waits for the client and server `close` events of each connection and
    /// checks their `retransmits` against the kernel's counts (see
    /// [`Agent::assert_count`]); returns the total of those counts.
    pub fn assert_close_retransmits(
        &mut self,
        expected: &[kernel::ConnectionRetransmits],
    ) -> anyhow::Result<u64> {
        let mut total = 0;
        for kernel in expected {
            let closed = |role: &'static str| {
                move |e: &Value| {
                    e["type"] == "close"
                        && e["role"] == role
                        && e["src"]["port"] == kernel.client_port
                }
            };
            let client = self.wait_for(event_timeout(), closed("client"))?;
            let server = self.wait_for(event_timeout(), closed("server"))?;
            eprintln!(
                "connection :{}: client {} retransmits (agent {}), server {} (agent {})",
                kernel.client_port,
                kernel.client,
                client["retransmits"],
                kernel.server,
                server["retransmits"]
            );
            let count = |event: &Value| event["retransmits"].as_u64().unwrap_or(u64::MAX);
            self.assert_count(
                &format!("client side: {client}"),
                count(&client),
                kernel.client.into(),
            )?;
            self.assert_count(
                &format!("server side: {server}"),
                count(&server),
                kernel.server.into(),
            )?;
            total += u64::from(kernel.client) + u64::from(kernel.server);
        }
        Ok(total)
    }

    /// SIGINT, then every remaining line until the agent exits; fails unless
    /// it exits 0.
    /// This test provokes alerts of these `kinds`: `stop` does not treat
    /// them as false alarms. An alert of any other kind still is one.
    pub fn expect_alerts(&mut self, kinds: &[&'static str]) {
        self.alerts_expected.extend_from_slice(kinds);
    }

    /// Stops the agent (SIGINT) and returns the events not yet taken. Fails
    /// on an `alert` of a kind not given to [`Agent::expect_alerts`]: the suite's
    /// ordinary traffic must never raise one.
    pub fn stop(self) -> anyhow::Result<Vec<Value>> {
        self.stop_with(libc::SIGINT)
    }

    /// Stops the agent as [`Agent::stop`] does and returns its stderr, read
    /// to the end (what it logged as it exited).
    pub fn stop_and_read_stderr(self) -> anyhow::Result<String> {
        let stderr = Arc::clone(&self.stderr);
        self.stop()?;
        Ok(stderr.lock().unwrap().clone())
    }

    /// As [`Agent::stop`], with SIGTERM: how the kubelet stops a pod.
    pub fn terminate(self) -> anyhow::Result<Vec<Value>> {
        self.stop_with(libc::SIGTERM)
    }

    /// SIGKILL, as the OOM killer or a node's eviction does: no cleanup runs
    /// in the agent. Returns the lines it wrote before, and how it ended.
    pub fn kill(mut self) -> anyhow::Result<(Vec<Value>, std::process::ExitStatus)> {
        signal(self.child.id(), libc::SIGKILL);
        let status = self.child.wait().context("waiting for the killed agent")?;
        let mut rest = std::mem::take(&mut self.seen);
        // Its stdout ends with the process: read what is left. The kill may
        // have cut the agent's last write inside a line.
        while let Ok(line) = self.events.recv() {
            match line {
                Ok(event) => rest.push(event),
                Err(cut) if cut.starts_with(CUT_LINE) => {
                    self.invalid_lines.lock().unwrap().retain(|l| *l != cut);
                }
                Err(invalid) => bail!("agent wrote an invalid line: {invalid}"),
            }
        }
        Ok((rest, status))
    }

    fn stop_with(mut self, signal_number: libc::c_int) -> anyhow::Result<Vec<Value>> {
        signal(self.child.id(), signal_number);
        let deadline = Instant::now() + scaled(Duration::from_secs(10));
        let mut rest = std::mem::take(&mut self.seen);
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Ok(event)) => rest.push(event),
                Ok(Err(invalid)) => bail!("agent wrote an invalid line: {invalid}"),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    bail!("agent did not exit within 10 s of signal {signal_number}")
                }
            }
        }
        let status = self.child.wait()?;
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        anyhow::ensure!(
            status.success(),
            "agent exited with {status}: {}",
            self.stderr()
        );
        let alerts: Vec<&Value> = self
            .alerts
            .iter()
            .chain(rest.iter().filter(|e| e["type"] == "alert"))
            .filter(|alert| {
                !self
                    .alerts_expected
                    .iter()
                    .any(|kind| alert["kind"] == *kind)
            })
            .collect();
        anyhow::ensure!(alerts.is_empty(), "false alarms: {alerts:#?}");
        Ok(rest)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGINT);
            if !wait_until(scaled(Duration::from_secs(5)), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            }) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // The agent has exited: its stdout is at its end.
        if let Some(reader) = self.stdout_reader.take() {
            let _ = reader.join();
        }
        let invalid = self.invalid_lines.lock().unwrap();
        if !invalid.is_empty() && !thread::panicking() {
            panic!(
                "agent wrote {} invalid line(s); the first: {}",
                invalid.len(),
                invalid[0]
            );
        }
    }
}

pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: plain syscall on a child we own.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// A real `redis-server` on a free port, on 127.0.0.1 and ::1, no persistence.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// With more `redis-server` arguments, e.g. `["--enable-debug-command", "yes"]`.
    pub fn start_with(extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(free_port(), extra_args)
    }

    /// On a given port: e.g. a restart on the port of a stopped server.
    pub fn start_on(port: u16, extra_args: &[&str]) -> anyhow::Result<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1 ::1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (run `cargo xtask setup`)")?;
        let mut server = Self { child, port };
        let mut exited = None;
        let ready = wait_until(scaled(Duration::from_secs(10)), || {
            exited = server.child.try_wait().ok().flatten();
            exited.is_some() || TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        });
        if let Some(status) = exited {
            bail!("redis-server on port {port} exited at start ({status}): a port taken?");
        }
        anyhow::ensure!(ready, "redis-server did not listen on port {port}");
        Ok(server)
    }
}

impl RedisServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server (SIGKILL: a crash, no goodbye to clients) and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A self-signed certificate for a Redis server at `ip` (its own CA), made
/// by `openssl req` in a directory of its own, removed on drop.
pub struct TlsCert {
    dir: PathBuf,
}

impl TlsCert {
    pub fn new(ip: std::net::IpAddr) -> anyhow::Result<Self> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "resptrace-tls-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let cert = Self { dir };
        let output = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=resptrace-test", "-addext"])
            .arg(format!("subjectAltName=IP:{ip},IP:127.0.0.1"))
            .arg("-keyout")
            .arg(cert.dir.join("key.pem"))
            .arg("-out")
            .arg(cert.ca())
            .output()
            .context("running openssl (run `cargo xtask setup`)")?;
        anyhow::ensure!(
            output.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(cert)
    }

    /// The certificate clients trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// `redis-server` arguments for TLS on `tls_port` with this certificate
    /// (clients need none of their own).
    pub fn server_args(&self, tls_port: u16) -> Vec<String> {
        let (cert, key) = (self.ca(), self.dir.join("key.pem"));
        [
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            cert.display().to_string(),
            "--tls-key-file".into(),
            key.display().to_string(),
            "--tls-ca-cert-file".into(),
            cert.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
        .into()
    }
}

impl Drop for TlsCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An iptables/ip6tables rule in the filter table, removed on drop.
pub struct FirewallRule {
    binary: &'static str,
    chain: String,
    spec: Vec<String>,
}

/// Tag on every rule the lab adds, to find leftovers of a killed run.
pub const RULE_COMMENT: &str = "resptrace-test";

impl FirewallRule {
    /// Inserts `spec` at the top of `chain` (IPv4 or IPv6 table).
    pub fn insert(ipv6: bool, chain: &str, spec: &[&str]) -> anyhow::Result<Self> {
        let binary = if ipv6 { "ip6tables" } else { "iptables" };
        let mut full: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        full.extend(["-m", "comment", "--comment", RULE_COMMENT].map(String::from));
        let status = Command::new(binary)
            .args(["-w", "-I", chain])
            .args(&full)
            .status()
            .with_context(|| format!("running {binary}"))?;
        anyhow::ensure!(status.success(), "{binary} -I {chain} {full:?} failed");
        Ok(Self {
            binary,
            chain: chain.into(),
            spec: full,
        })
    }

    /// Silently drops SYNs to `port` arriving on this host.
    pub fn drop_syns_to(port: u16) -> anyhow::Result<Self> {
        Self::on_syns_to(port, &["DROP"])
    }

    /// Sends SYNs to `port` arriving on this host to `target` (e.g.
    /// `["REJECT", "--reject-with", "tcp-reset"]`).
    pub fn on_syns_to(port: u16, target: &[&str]) -> anyhow::Result<Self> {
        let port = port.to_string();
        let mut spec = vec!["-p", "tcp", "--syn", "--dport", &port, "-j"];
        spec.extend_from_slice(target);
        Self::insert(false, "INPUT", &spec)
    }
}

impl Drop for FirewallRule {
    fn drop(&mut self) {
        let _ = Command::new(self.binary)
            .args(["-w", "-D", &self.chain])
            .args(&self.spec)
            .status();
    }
}

/// A kernel SNMP/netstat counter, as `nstat` reads it (absolute value).
pub fn nstat(counter: &str) -> anyhow::Result<u64> {
    let output = Command::new("nstat")
        .args(["-a", "-s", "-z", counter])
        .output()
        .context("running nstat")?;
    let text = String::from_utf8_lossy(&output.stdout);
    netns::Counters::parse(&text)
        .0
        .get(counter)
        .copied()
        .with_context(|| format!("nstat has no counter {counter}: {text}"))
}
