//! `cargo xtask bench`: what resptrace costs the traced applications,
//! measured as throughput ratios against no-agent runs in the same session.
//!
//! Each round runs redis-benchmark without the agent, with it, and without it
//! again; the ratio is the agent run over the mean of the two around it, so
//! drift of the machine between rounds cancels out. Medians and ranges over
//! the rounds are reported, with the kernel's own run time of the agent's
//! programs (`kernel.bpf_stats_enabled`, read from the program fds'
//! `fdinfo`), the agent's CPU time and its memory.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// One redis-benchmark workload.
struct Workload {
    name: &'static str,
    args: &'static [&'static str],
    /// Requests per run (for per-request figures).
    requests: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "pooled, unpipelined (-c 50 -n 200000 -t get,set)",
        args: &["-c", "50", "-n", "200000", "-t", "get,set"],
        requests: 400_000,
    },
    Workload {
        name: "pooled, pipelined (-c 50 -P 16 -n 2000000 -t get,set)",
        args: &["-c", "50", "-P", "16", "-n", "2000000", "-t", "get,set"],
        requests: 4_000_000,
    },
    Workload {
        name: "connect churn: a new connection per request (-c 50 -k 0 -n 50000 -t get)",
        args: &["-c", "50", "-k", "0", "-n", "50000", "-t", "get"],
        requests: 50_000,
    },
];

#[derive(Default)]
struct Samples {
    ratios: Vec<f64>,
    baseline_rps: Vec<f64>,
    bpf_ns_per_request: Vec<f64>,
    agent_cpu_ms_per_100k: Vec<f64>,
    agent_rss_kib: Vec<u64>,
}

pub fn run(agent: &Path, rounds: usize, only: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    let port = free_port()?;
    let _redis = RedisServer::start(port)?;
    let stats_before = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled")?;
    let result = (|| {
        let mut report = String::new();
        for workload in WORKLOADS
            .iter()
            .filter(|w| only.is_none_or(|o| w.name.contains(o)))
        {
            eprintln!("==> bench: {}", workload.name);
            let samples = measure(agent, port, workload, rounds)?;
            report.push_str(&format_row(workload, &samples));
        }
        println!(
            "\n| workload | throughput with agent ÷ without (median, range) | no-agent req/s (median) | BPF ns per request | agent CPU ms per 100k requests | agent RSS |\n|---|---|---|---|---|---|\n{report}"
        );
        Ok(())
    })();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    result
}

fn measure(agent: &Path, port: u16, workload: &Workload, rounds: usize) -> anyhow::Result<Samples> {
    let mut samples = Samples::default();
    let mut before = redis_benchmark(port, workload)?;
    for round in 1..=rounds {
        let running = Agent::start(agent, port)?;
        let cpu_before = running.cpu_time()?;
        let bpf_before = running.bpf_run_time_ns()?;
        let with = redis_benchmark(port, workload)?;
        let bpf_ns = running.bpf_run_time_ns()? - bpf_before;
        let cpu = running.cpu_time()? - cpu_before;
        let rss = running.rss_kib()?;
        running.stop()?;
        let after = redis_benchmark(port, workload)?;
        let ratio = with / ((before + after) / 2.0);
        eprintln!(
            "    round {round}/{rounds}: {with:.0} req/s with the agent, {before:.0} and {after:.0} without: {ratio:.3}"
        );
        samples.ratios.push(ratio);
        samples.baseline_rps.push((before + after) / 2.0);
        samples
            .bpf_ns_per_request
            .push(bpf_ns as f64 / workload.requests as f64);
        samples
            .agent_cpu_ms_per_100k
            .push(cpu.as_secs_f64() * 1000.0 * 100_000.0 / workload.requests as f64);
        samples.agent_rss_kib.push(rss);
        before = after;
    }
    Ok(samples)
}

fn format_row(workload: &Workload, s: &Samples) -> String {
    let (lo, hi) = range(&s.ratios);
    format!(
        "| {} | {:.3} ({lo:.3}–{hi:.3}) | {:.0} | {:.0} | {:.1} | {} KiB |\n",
        workload.name,
        median(&s.ratios),
        median(&s.baseline_rps),
        median(&s.bpf_ns_per_request),
        median(&s.agent_cpu_ms_per_100k),
        s.agent_rss_kib.iter().max().copied().unwrap_or(0),
    )
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// Requests per second over the workload's tests (mean of GET and SET).
fn redis_benchmark(port: u16, workload: &Workload) -> anyhow::Result<f64> {
    // Server and client each on their own CPU: left to the scheduler, their
    // placement on 2 cores swings throughput by ±20% between runs.
    let output = Command::new("taskset")
        .args([
            "-c",
            "1",
            "redis-benchmark",
            "-p",
            &port.to_string(),
            "--csv",
        ])
        .args(workload.args)
        .stderr(Stdio::null())
        .output()
        .context("running redis-benchmark")?;
    anyhow::ensure!(output.status.success(), "redis-benchmark failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let rates: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|line| line.split(',').nth(1)?.trim_matches('"').parse().ok())
        .collect();
    anyhow::ensure!(!rates.is_empty(), "no results from redis-benchmark: {text}");
    Ok(rates.iter().sum::<f64>() / rates.len() as f64)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct RedisServer(Child);

impl RedisServer {
    fn start(port: u16) -> anyhow::Result<Self> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let server = Self(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Agent(Child);

impl Agent {
    /// Starts the agent and waits for its `started` line; its output is
    /// discarded from then on (a thread drains it).
    fn start(binary: &Path, port: u16) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(["--ports", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("\"type\":\"started\"") => break,
                Some(Ok(_)) => continue,
                _ => bail!("the agent exited before it started"),
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// utime + stime of the agent.
    fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let after_comm = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_millis(ticks * 1000 / hz))
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")
    }

    /// Sum of `run_time_ns` over the agent's BPF programs.
    fn bpf_run_time_ns(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for fd in fs::read_dir(format!("/proc/{}/fdinfo", self.pid()))? {
            let Ok(info) = fs::read_to_string(fd?.path()) else {
                continue;
            };
            if !info.contains("prog_type:") {
                continue;
            }
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("run_time_ns:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(total)
    }

    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGINT) };
        let status = self.0.wait()?;
        anyhow::ensure!(status.success(), "agent exited with {status}");
        Ok(())
    }
}
