//! Real Redis clients driven from tests, each counting and timing its own
//! requests: client-side ground truth to hold the agent's output against.
//!
//! One [`Workload`] runs on redis-py (`tests/clients/redis_py_driver.py`),
//! ioredis (`tests/clients/ioredis_driver.js`), the `redis` crate (threads of
//! this process) or `redis-cli`, and gives a [`ClientResult`]; `redis-benchmark`
//! takes a [`Benchmark`]. [`server_command_counts`] is the server's own count
//! (`INFO commandstats`). Everything runs here or, through [`Place::Host`], in a
//! lab host's network namespace (and a pod's cgroup, except for the in-process
//! `redis` crate, whose threads stay in the test process's cgroup).
//! `cargo xtask setup` installs redis-py and ioredis under
//! `~/.cache/resptrace/clients` (docs/lab.md, "Client drivers").

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use redis::{ConnectionAddr, IntoConnectionInfo as _, RedisConnectionInfo, Value};
use serde::{Deserialize, Serialize};

use crate::{scaled, topology::Host};

/// What a client does: `connections` connections at once, each sending
/// `raw` (one command at a time), then `requests` commands cycled from
/// `commands`, `pipeline` per write. Serialized as the drivers' JSON input.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Workload {
    pub host: String,
    pub port: u16,
    #[serde(default = "one")]
    pub connections: usize,
    /// Generated requests per connection.
    #[serde(default)]
    pub requests: usize,
    /// Commands per batch (one write, then the batch's replies).
    #[serde(default = "one")]
    pub pipeline: usize,
    /// Cycled through; keys and values are generated (see [`command_args`]).
    #[serde(default = "default_commands")]
    pub commands: Vec<String>,
    #[serde(default = "default_value_size")]
    pub value_size: usize,
    /// Distinct keys per command type and connection.
    #[serde(default = "default_keys")]
    pub keys: usize,
    /// Sleep between sending a batch and reading its replies.
    #[serde(default)]
    pub read_delay_ms: u64,
    /// The client gives up waiting for a batch's replies after this long and
    /// closes the connection; the next batch opens a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Sent as-is by each connection before the generated requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw: Vec<Vec<String>>,
    /// Connect with TLS, trusting this CA certificate (PEM file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
}

fn one() -> usize {
    1
}
fn default_commands() -> Vec<String> {
    vec!["PING".into()]
}
fn default_value_size() -> usize {
    16
}
fn default_keys() -> usize {
    100
}

impl Workload {
    /// One connection to `ip:port`, no requests yet.
    pub fn new(ip: impl Into<IpAddr>, port: u16) -> Self {
        Self {
            host: ip.into().to_string(),
            port,
            connections: 1,
            requests: 0,
            pipeline: 1,
            commands: default_commands(),
            value_size: default_value_size(),
            keys: default_keys(),
            read_delay_ms: 0,
            timeout_ms: None,
            raw: Vec::new(),
            tls_ca: None,
        }
    }

    /// TLS, trusting `ca` (see [`crate::TlsRedisServer`]).
    pub fn tls(mut self, ca: &std::path::Path) -> Self {
        self.tls_ca = Some(ca.display().to_string());
        self
    }

    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    pub fn requests(mut self, per_connection: usize) -> Self {
        self.requests = per_connection;
        self
    }

    pub fn pipeline(mut self, n: usize) -> Self {
        self.pipeline = n.max(1);
        self
    }

    pub fn commands(mut self, names: &[&str]) -> Self {
        self.commands = names.iter().map(|n| n.to_ascii_uppercase()).collect();
        self
    }

    pub fn value_size(mut self, bytes: usize) -> Self {
        self.value_size = bytes;
        self
    }

    pub fn keys(mut self, n: usize) -> Self {
        self.keys = n.max(1);
        self
    }

    pub fn read_delay(mut self, delay: Duration) -> Self {
        self.read_delay_ms = delay.as_millis() as u64;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = Some(timeout.as_millis() as u64);
        self
    }

    /// Adds one raw command, e.g. `["DEBUG", "SLEEP", "0.3"]`.
    pub fn raw(mut self, command: &[&str]) -> Self {
        self.raw
            .push(command.iter().map(|a| a.to_string()).collect());
        self
    }

    /// How many of each command the workload sends (first word, upper case).
    pub fn expected_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for _ in 0..self.connections {
            for raw in &self.raw {
                *counts.entry(raw[0].to_ascii_uppercase()).or_default() += 1;
            }
            for i in 0..self.requests {
                *counts
                    .entry(self.commands[i % self.commands.len()].to_ascii_uppercase())
                    .or_default() += 1;
            }
        }
        counts
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            !self.commands.is_empty(),
            "workload without commands: {self:?}"
        );
        ensure!(
            self.raw.iter().all(|c| !c.is_empty()),
            "empty raw command in {self:?}"
        );
        for name in &self.commands {
            command_args(name, 0, 0, 1, "")?;
        }
        Ok(())
    }

    /// The commands connection `conn` sends, in batches (raw ones alone).
    fn batches(&self, conn: usize) -> anyhow::Result<Vec<Vec<Vec<String>>>> {
        let value = "x".repeat(self.value_size);
        let mut batches: Vec<Vec<Vec<String>>> =
            self.raw.iter().map(|raw| vec![raw.clone()]).collect();
        let mut i = 0;
        while i < self.requests {
            let n = self.pipeline.max(1).min(self.requests - i);
            let batch = (i..i + n)
                .map(|j| {
                    let name = self.commands[j % self.commands.len()].to_ascii_uppercase();
                    command_args(&name, conn, j, self.keys, &value)
                })
                .collect::<anyhow::Result<_>>()?;
            batches.push(batch);
            i += n;
        }
        Ok(batches)
    }
}

/// Request `i` of connection `conn`: the same table as the Python and Node
/// drivers. String commands use `str:<conn>:<k>`, INCR/DECR `ctr:…`, hashes
/// `hash:…`, lists `list:…`, sets `set:…`, sorted sets `zset:…`
/// (k = i mod keys), so a workload never hits a key of the wrong type.
pub fn command_args(
    name: &str,
    conn: usize,
    i: usize,
    keys: usize,
    value: &str,
) -> anyhow::Result<Vec<String>> {
    let k = i % keys.max(1);
    let key = |prefix: &str| format!("{prefix}:{conn}:{k}");
    let args: Vec<String> = match name {
        "PING" => vec![],
        "GET" | "DEL" | "EXISTS" => vec![key("str")],
        "SET" => vec![key("str"), value.into()],
        "INCR" | "DECR" => vec![key("ctr")],
        "HSET" => vec![key("hash"), "field".into(), value.into()],
        "HGET" => vec![key("hash"), "field".into()],
        "HGETALL" => vec![key("hash")],
        "LPUSH" | "RPUSH" => vec![key("list"), value.into()],
        "LPOP" | "RPOP" => vec![key("list")],
        "LRANGE" => vec![key("list"), "0".into(), "9".into()],
        "SADD" => vec![key("set"), value.into()],
        "SMEMBERS" => vec![key("set")],
        "ZADD" => vec![key("zset"), "1".into(), value.into()],
        other => bail!("no generator for command {other:?} (tests/src/clients.rs, command_args)"),
    };
    Ok(std::iter::once(name.to_string()).chain(args).collect())
}

/// What a client saw. `counts`: commands written to the socket (replied,
/// failed or timed out alike); `errors`: error replies by code (`WRONGTYPE`,
/// `MOVED`, …; `CONNECTION` for replies lost to a closed connection);
/// `timeouts`: commands whose reply did not come within `timeout_ms`;
/// `latencies_us`: one value per replied command, the time from its batch's
/// write to the batch's last reply.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClientResult {
    pub counts: BTreeMap<String, u64>,
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    #[serde(default)]
    pub timeouts: u64,
    #[serde(default)]
    pub latencies_us: BTreeMap<String, Vec<u64>>,
    pub total_us: u64,
}

impl ClientResult {
    /// All commands sent.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Median latency of `command` in µs, if any replied.
    pub fn median_us(&self, command: &str) -> Option<u64> {
        let mut values = self.latencies_us.get(command)?.clone();
        values.sort_unstable();
        values.get(values.len() / 2).copied()
    }

    fn add(&mut self, other: ClientResult) {
        for (k, n) in other.counts {
            *self.counts.entry(k).or_default() += n;
        }
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.timeouts += other.timeouts;
        for (k, v) in other.latencies_us {
            self.latencies_us.entry(k).or_default().extend(v);
        }
    }
}

/// A `redis-benchmark` run: `-c clients -n requests -t tests [-P pipeline]
/// -d data_size [-r keyspace]`.
#[derive(Clone, Debug)]
pub struct Benchmark {
    pub host: String,
    pub port: u16,
    pub clients: usize,
    pub requests: u64,
    /// Lower-case test names with a single command each (see [`Benchmark::commands`]).
    pub tests: Vec<String>,
    pub pipeline: u64,
    pub data_size: usize,
    pub keyspace: Option<u64>,
    /// `--tls --cacert`.
    pub tls_ca: Option<String>,
}

impl Benchmark {
    /// `-c 50 -n requests -t get,set`.
    pub fn new(ip: impl Into<IpAddr>, port: u16, requests: u64) -> Self {
        Self {
            host: ip.into().to_string(),
            port,
            clients: 50,
            requests,
            tests: vec!["get".into(), "set".into()],
            pipeline: 1,
            data_size: 3,
            keyspace: None,
            tls_ca: None,
        }
    }

    /// TLS, trusting `ca`.
    pub fn tls(mut self, ca: &std::path::Path) -> Self {
        self.tls_ca = Some(ca.display().to_string());
        self
    }

    pub fn clients(mut self, n: usize) -> Self {
        self.clients = n;
        self
    }

    pub fn tests(mut self, tests: &[&str]) -> Self {
        self.tests = tests.iter().map(|t| t.to_ascii_lowercase()).collect();
        self
    }

    pub fn pipeline(mut self, n: u64) -> Self {
        self.pipeline = n.max(1);
        self
    }

    pub fn data_size(mut self, bytes: usize) -> Self {
        self.data_size = bytes;
        self
    }

    pub fn keyspace(mut self, n: u64) -> Self {
        self.keyspace = Some(n);
        self
    }

    /// The command each test sends: the tests with one command per request.
    fn command(test: &str) -> anyhow::Result<&'static str> {
        Ok(match test {
            "ping_mbulk" => "PING",
            "get" => "GET",
            "set" => "SET",
            "incr" => "INCR",
            "lpush" => "LPUSH",
            "rpush" => "RPUSH",
            "lpop" => "LPOP",
            "rpop" => "RPOP",
            "sadd" => "SADD",
            "hset" => "HSET",
            "spop" => "SPOP",
            "zadd" => "ZADD",
            "zpopmin" => "ZPOPMIN",
            other => bail!(
                "redis-benchmark test {other:?}: only tests with one command per request are counted"
            ),
        })
    }

    /// Commands sent per test: a client takes `pipeline` requests while fewer
    /// than `requests` were taken, so ⌈requests / pipeline⌉ × pipeline.
    pub fn commands(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let per_test = self.requests.div_ceil(self.pipeline) * self.pipeline;
        let mut counts = BTreeMap::new();
        for test in &self.tests {
            *counts.entry(Self::command(test)?.to_string()).or_default() += per_test;
        }
        Ok(counts)
    }
}

/// What `redis-benchmark` sent and measured.
#[derive(Clone, Debug, Default)]
pub struct BenchmarkResult {
    /// Commands sent, by command (from the request count, see [`Benchmark::commands`]).
    pub counts: BTreeMap<String, u64>,
    /// Requests per second as printed (`--csv`), by upper-case test name.
    pub throughput: BTreeMap<String, f64>,
    pub total_us: u64,
}

/// Where a client runs: in this host's namespaces, or in a lab host's
/// (processes also in its pod cgroup; see [`Host::command`]).
#[derive(Clone, Copy)]
pub enum Place<'a> {
    Here,
    Host(&'a Host),
}

impl Place<'_> {
    fn command(&self, program: &str) -> Command {
        match self {
            Place::Here => Command::new(program),
            Place::Host(host) => host.command(program),
        }
    }

    /// Runs `f` on a thread in this place's network namespace (threads it
    /// spawns inherit the namespace).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        match self {
            Place::Here => Ok(thread::scope(|scope| {
                scope
                    .spawn(f)
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })),
            Place::Host(host) => host.within(f),
        }
    }

    /// The redis-py driver (venv of `cargo xtask setup`).
    pub fn redis_py(&self, workload: &Workload) -> anyhow::Result<ClientResult> {
        workload.check()?;
        let python = clients_dir().join("venv/bin/python");
        ensure!(
            python.exists(),
            "{} missing: run `cargo xtask setup`",
            python.display()
        );
        let mut command = self.command(python.to_str().context("non-UTF-8 cache path")?);
        command.arg(driver("redis_py_driver.py"));
        run_driver(command, workload)
    }

    /// The ioredis driver (node_modules of `cargo xtask setup`).
    pub fn ioredis(&self, workload: &Workload) -> anyhow::Result<ClientResult> {
        workload.check()?;
        let modules = clients_dir().join("node/node_modules");
        ensure!(
            modules.join("ioredis").is_dir(),
            "{} missing: run `cargo xtask setup`",
            modules.join("ioredis").display()
        );
        let mut command = self.command("node");
        command
            .arg(driver("ioredis_driver.js"))
            .env("NODE_PATH", &modules);
        run_driver(command, workload)
    }

    /// The `redis` crate's sync API, one thread per connection, in this
    /// process (in a lab host's network namespace, this process's cgroup).
    /// A batch is a `redis::pipe()` (or a `redis::cmd` alone), written with
    /// `send_packed_command` and read with `recv_response`: the same bytes
    /// and socket calls as `Pipeline::query`, with room for `read_delay_ms`.
    pub fn redis_crate(&self, workload: &Workload) -> anyhow::Result<ClientResult> {
        workload.check()?;
        ensure!(
            workload.tls_ca.is_none(),
            "the lab's redis crate client has no TLS"
        );
        let batches: Vec<_> = (0..workload.connections)
            .map(|conn| workload.batches(conn))
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        let results = self.within(|| {
            thread::scope(|scope| {
                let workers: Vec<_> = batches
                    .iter()
                    .enumerate()
                    .map(|(conn, batches)| {
                        scope.spawn(move || {
                            redis_crate_connection(workload, batches)
                                .with_context(|| format!("redis crate, connection {conn}"))
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
        })??;
        let mut total = ClientResult {
            total_us: started.elapsed().as_micros() as u64,
            ..Default::default()
        };
        for result in results {
            total.add(result);
        }
        Ok(total)
    }

    /// `redis-cli`, one process (one connection) per workload connection,
    /// its commands on stdin, one at a time. Counts come from what was fed,
    /// errors from its `(error) CODE …` lines; no per-request latencies
    /// (`total_us` only). No pipelining, read delay or timeout.
    pub fn redis_cli(&self, workload: &Workload) -> anyhow::Result<ClientResult> {
        workload.check()?;
        ensure!(
            workload.pipeline == 1 && workload.read_delay_ms == 0 && workload.timeout_ms.is_none(),
            "redis-cli: no pipeline, read_delay_ms or timeout_ms"
        );
        let started = Instant::now();
        let mut children = Vec::new();
        let mut result = ClientResult::default();
        for conn in 0..workload.connections {
            let mut script = String::new();
            for batch in workload.batches(conn)? {
                for command in batch {
                    *result
                        .counts
                        .entry(command[0].to_ascii_uppercase())
                        .or_default() += 1;
                    let quoted: Vec<String> = command.iter().map(|a| quote(a)).collect();
                    script.push_str(&quoted.join(" "));
                    script.push('\n');
                }
            }
            let mut command = self.command("redis-cli");
            command.args([
                "-h",
                &workload.host,
                "-p",
                &workload.port.to_string(),
                "--no-raw",
            ]);
            if let Some(ca) = &workload.tls_ca {
                command.args(["--tls", "--cacert", ca]);
            }
            children.push(spawn_with_input(command, script.into_bytes())?);
        }
        for child in children {
            let output = finish(child, "redis-cli")?;
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                if let Some(error) = line.strip_prefix("(error) ") {
                    let code = error.split_whitespace().next().unwrap_or("ERR");
                    *result.errors.entry(code.to_string()).or_default() += 1;
                }
            }
        }
        result.total_us = started.elapsed().as_micros() as u64;
        Ok(result)
    }

    /// Runs `redis-benchmark --csv` and returns what it sent and its
    /// throughput.
    pub fn redis_benchmark(&self, benchmark: &Benchmark) -> anyhow::Result<BenchmarkResult> {
        let counts = benchmark.commands()?;
        let mut command = self.command("redis-benchmark");
        command
            .args(["-h", &benchmark.host, "-p", &benchmark.port.to_string()])
            .args(["-c", &benchmark.clients.to_string()])
            .args(["-n", &benchmark.requests.to_string()])
            .args(["-P", &benchmark.pipeline.to_string()])
            .args(["-d", &benchmark.data_size.to_string()])
            .args(["-t", &benchmark.tests.join(",")])
            .arg("--csv");
        if let Some(keyspace) = benchmark.keyspace {
            command.args(["-r", &keyspace.to_string()]);
        }
        if let Some(ca) = &benchmark.tls_ca {
            command.args(["--tls", "--cacert", ca]);
        }
        let started = Instant::now();
        let output = finish(spawn_with_input(command, Vec::new())?, "redis-benchmark")?;
        let total_us = started.elapsed().as_micros() as u64;
        let text = String::from_utf8_lossy(&output.stdout);
        let throughput = parse_benchmark_csv(&text);
        for command in counts.keys() {
            ensure!(
                throughput.contains_key(command),
                "redis-benchmark printed no {command} line:\n{text}"
            );
        }
        Ok(BenchmarkResult {
            counts,
            throughput,
            total_us,
        })
    }

    /// Calls of every command the server received (`calls + rejected_calls`
    /// of `INFO commandstats`), keyed as Redis names them, upper case:
    /// `GET`, `CONFIG|RESETSTAT`. A command that failed (`WRONGTYPE`) is in
    /// `calls`; one refused before running (`MOVED`, arity) in `rejected_calls`.
    /// This query itself adds one `INFO`.
    pub fn server_command_counts(&self, addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
        let info: String = self.query(addr, redis::cmd("INFO").arg("commandstats"))?;
        Ok(parse_commandstats(&info)
            .into_iter()
            .map(|(name, stat)| (name, stat.calls + stat.rejected_calls))
            .collect())
    }

    /// `CONFIG RESETSTAT`: zeroes `INFO commandstats`.
    pub fn reset_stats(&self, addr: SocketAddr) -> anyhow::Result<()> {
        let _: String = self.query(addr, redis::cmd("CONFIG").arg("RESETSTAT"))?;
        Ok(())
    }

    /// One command on a new connection (no `CLIENT SETINFO`); a server error
    /// reply is an `Err`.
    pub fn query<T: redis::FromRedisValue + Send>(
        &self,
        addr: SocketAddr,
        command: &redis::Cmd,
    ) -> anyhow::Result<T> {
        self.within(|| -> anyhow::Result<T> {
            let mut connection = connect(&addr.ip().to_string(), addr.port())?;
            command
                .query(&mut connection)
                .with_context(|| format!("{command:?} on {addr}"))
        })?
    }
}

/// [`Place::redis_py`] here.
pub fn redis_py(workload: &Workload) -> anyhow::Result<ClientResult> {
    Place::Here.redis_py(workload)
}

/// [`Place::ioredis`] here.
pub fn ioredis(workload: &Workload) -> anyhow::Result<ClientResult> {
    Place::Here.ioredis(workload)
}

/// [`Place::redis_crate`] here.
pub fn redis_crate(workload: &Workload) -> anyhow::Result<ClientResult> {
    Place::Here.redis_crate(workload)
}

/// [`Place::redis_cli`] here.
pub fn redis_cli(workload: &Workload) -> anyhow::Result<ClientResult> {
    Place::Here.redis_cli(workload)
}

/// [`Place::redis_benchmark`] here.
pub fn redis_benchmark(benchmark: &Benchmark) -> anyhow::Result<BenchmarkResult> {
    Place::Here.redis_benchmark(benchmark)
}

/// [`Place::server_command_counts`] here.
pub fn server_command_counts(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    Place::Here.server_command_counts(addr)
}

/// [`Place::reset_stats`] here.
pub fn reset_stats(addr: SocketAddr) -> anyhow::Result<()> {
    Place::Here.reset_stats(addr)
}

/// How `after` grew from `before`, for the entries that grew.
pub fn count_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(name, &n)| {
            let grown = n.saturating_sub(before.get(name).copied().unwrap_or(0));
            (grown > 0).then(|| (name.clone(), grown))
        })
        .collect()
}

/// One `cmdstat_…` line of `INFO commandstats`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommandStat {
    pub calls: u64,
    pub rejected_calls: u64,
    pub failed_calls: u64,
}

/// `cmdstat_get:calls=3,usec=…,rejected_calls=0,failed_calls=0` lines, by
/// upper-case command name.
pub fn parse_commandstats(info: &str) -> BTreeMap<String, CommandStat> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let mut stat = CommandStat::default();
            for field in fields.split(',') {
                let Some((key, value)) = field.split_once('=') else {
                    continue;
                };
                let value = value.parse().unwrap_or(0);
                match key {
                    "calls" => stat.calls = value,
                    "rejected_calls" => stat.rejected_calls = value,
                    "failed_calls" => stat.failed_calls = value,
                    _ => {}
                }
            }
            Some((name.to_ascii_uppercase(), stat))
        })
        .collect()
}

fn parse_benchmark_csv(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(|f| f.trim().trim_matches('"'));
            let test = fields.next()?;
            let rps: f64 = fields.next()?.parse().ok()?;
            Some((test.to_ascii_uppercase(), rps))
        })
        .collect()
}

/// `~/.cache/resptrace/clients` (`$XDG_CACHE_HOME` first), as xtask's setup.
pub fn clients_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("resptrace/clients")
}

/// Debian 13's OpenSSL 3.5 and its loader, unpacked by `cargo xtask
/// setup` (step 7): run a client on it with
/// `<dir>/ld-linux-x86-64.so.2 --library-path <dir>:/lib/x86_64-linux-gnu`.
pub fn openssl_3_5_libs() -> anyhow::Result<PathBuf> {
    let libs = clients_dir().join("openssl-3.5/usr/lib/x86_64-linux-gnu");
    anyhow::ensure!(
        libs.join("libssl.so.3").exists() && libs.join("ld-linux-x86-64.so.2").exists(),
        "no OpenSSL 3.5 in {} (run `cargo xtask setup`)",
        libs.display()
    );
    Ok(libs)
}

fn driver(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(file)
}

/// How long a client process may run before it is killed.
fn client_deadline() -> Duration {
    scaled(Duration::from_secs(120))
}

fn run_driver(command: Command, workload: &Workload) -> anyhow::Result<ClientResult> {
    let input = serde_json::to_vec(workload)?;
    let what = format!("{command:?}");
    let output = finish(spawn_with_input(command, input)?, &what)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("{what} printed no result: {stdout}"))
}

fn spawn_with_input(mut command: Command, input: Vec<u8>) -> anyhow::Result<Child> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?} (run `cargo xtask setup`)"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    Ok(child)
}

/// Waits for `child` within [`client_deadline`] (killed past it); fails
/// unless it exits 0.
fn finish(mut child: Child, what: &str) -> anyhow::Result<Output> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + client_deadline();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} still ran after {:?}: killed", client_deadline());
        }
        thread::sleep(Duration::from_millis(5));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    ensure!(
        status.success(),
        "{what} failed ({status}): {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output)
}

/// A double-quoted redis-cli argument.
fn quote(arg: &str) -> String {
    format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\""))
}

fn connect(host: &str, port: u16) -> anyhow::Result<redis::Connection> {
    let info = ConnectionAddr::Tcp(host.to_string(), port)
        .into_connection_info()?
        .set_redis_settings(RedisConnectionInfo::default().set_skip_set_lib_name());
    let client = redis::Client::open(info)?;
    client
        .get_connection_with_timeout(scaled(Duration::from_secs(10)))
        .with_context(|| format!("connecting to {host}:{port}"))
}

fn redis_crate_connection(
    workload: &Workload,
    batches: &[Vec<Vec<String>>],
) -> anyhow::Result<ClientResult> {
    let mut result = ClientResult::default();
    let mut connection = None;
    for batch in batches {
        let con = match &mut connection {
            Some(con) => con,
            None => {
                let con = connect(&workload.host, workload.port)?;
                con.set_read_timeout(workload.timeout_ms.map(Duration::from_millis))?;
                connection.insert(con)
            }
        };
        let packed = if let [command] = batch.as_slice() {
            to_cmd(command).get_packed_command()
        } else {
            let mut pipe = redis::pipe();
            for command in batch {
                pipe.add_command(to_cmd(command));
            }
            pipe.get_packed_pipeline()
        };
        let names: Vec<String> = batch.iter().map(|c| c[0].to_ascii_uppercase()).collect();
        let start = Instant::now();
        con.send_packed_command(&packed)?;
        for name in &names {
            *result.counts.entry(name.clone()).or_default() += 1;
        }
        if workload.read_delay_ms > 0 {
            thread::sleep(Duration::from_millis(workload.read_delay_ms));
        }
        let mut replied = 0;
        let mut lost = None;
        for _ in &names {
            match con.recv_response() {
                Ok(Value::ServerError(error)) => {
                    *result.errors.entry(error.code().to_string()).or_default() += 1;
                }
                Ok(_) => {}
                Err(error) if error.code().is_some() => {
                    *result
                        .errors
                        .entry(error.code().unwrap_or("ERR").to_string())
                        .or_default() += 1;
                }
                Err(error) => {
                    lost = Some(error);
                    break;
                }
            }
            replied += 1;
        }
        let elapsed_us = start.elapsed().as_micros() as u64;
        match lost {
            None => {
                for name in names {
                    result
                        .latencies_us
                        .entry(name)
                        .or_default()
                        .push(elapsed_us);
                }
            }
            Some(error) => {
                // Give up the batch and the connection; the next batch
                // opens a new one.
                let missing = (names.len() - replied) as u64;
                if error.is_timeout() {
                    result.timeouts += missing;
                } else {
                    *result.errors.entry("CONNECTION".into()).or_default() += missing;
                }
                connection = None;
            }
        }
    }
    Ok(result)
}

fn to_cmd(command: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd(&command[0]);
    for arg in &command[1..] {
        cmd.arg(arg);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_json_round_trip_and_defaults() {
        let w = Workload::new([127, 0, 0, 1], 6379)
            .requests(10)
            .commands(&["get", "set"])
            .raw(&["DEBUG", "SLEEP", "0"]);
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<Workload>(&json).unwrap(), w);
        let minimal: Workload =
            serde_json::from_str(r#"{"host":"10.2.0.2","port":6379,"requests":3}"#).unwrap();
        assert_eq!(
            (minimal.connections, minimal.pipeline, minimal.value_size),
            (1, 1, 16)
        );
        assert_eq!(
            w.expected_counts(),
            BTreeMap::from([("DEBUG".into(), 1), ("GET".into(), 5), ("SET".into(), 5)])
        );
    }

    #[test]
    fn batches_follow_pipeline_and_raw() {
        let w = Workload::new([127, 0, 0, 1], 1)
            .requests(5)
            .pipeline(2)
            .commands(&["INCR"])
            .raw(&["PING"]);
        let sizes: Vec<usize> = w.batches(3).unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 2, 2, 1]);
        assert_eq!(w.batches(3).unwrap()[1][0], ["INCR", "ctr:3:0"]);
        assert!(
            Workload::new([127, 0, 0, 1], 1)
                .commands(&["FLUSHALL"])
                .check()
                .is_err()
        );
    }

    #[test]
    fn parses_commandstats_and_benchmark_csv() {
        let info = "# Commandstats\r\ncmdstat_get:calls=4,usec=3,usec_per_call=0.75,rejected_calls=1,failed_calls=0\r\ncmdstat_config|resetstat:calls=1,usec=38,usec_per_call=38.00,rejected_calls=0,failed_calls=0\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(stats["GET"].calls, 4);
        assert_eq!(stats["GET"].rejected_calls, 1);
        assert_eq!(stats["CONFIG|RESETSTAT"].calls, 1);
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"56000.00\",\"0.993\"\n\"GET\",\"inf\",\"0.1\"\n";
        let rps = parse_benchmark_csv(csv);
        assert_eq!(rps["SET"], 56000.0);
        assert!(rps["GET"].is_infinite());
        let b = Benchmark::new([127, 0, 0, 1], 1, 100).pipeline(16);
        assert_eq!(b.commands().unwrap()["GET"], 112);
    }
}
