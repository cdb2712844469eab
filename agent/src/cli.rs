//! Command line of `resptrace`. Every default is stated in its flag's help.

use std::{net::SocketAddr, time::Duration};

use agent_common::MAX_WATCHED_PORTS;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "resptrace",
    version,
    about = "eBPF agent that shows where Redis time goes: TCP handshakes to Redis ports, \
             timed and attributed to the process and cgroup that made them",
    long_about = None,
    after_help = "Writes one JSON object per line on stdout (schema: docs/events.md); \
                  its own logs go to stderr. Needs root, or CAP_BPF + CAP_PERFMON \
                  (CAP_SYS_ADMIN before Linux 5.8), and a kernel ≥ 5.8 with BTF."
)]
pub struct Cli {
    /// Redis ports to watch, comma-separated (at most 16).
    #[arg(long, value_delimiter = ',', default_value = "6379", value_parser = parse_port)]
    pub ports: Vec<u16>,

    /// Size of the kernel-to-agent event ring buffer, in KiB (a power of two,
    /// at least 4). Events that do not fit are dropped and counted.
    #[arg(long, default_value_t = 1024, value_parser = parse_ring_buffer_kib)]
    pub ring_buffer_kib: u32,

    /// How often to write the open-connection gauges (`connections` events)
    /// and the per-command `latency` windows, e.g. `10s`, `1m`.
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    pub interval: Duration,

    /// How often to write a `stats` event (agent counters, drops), e.g. `30s`,
    /// `5m`; `0s` writes it only at exit.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stats_interval: Duration,

    /// Which requests get a `request` event: `slow` (slower than
    /// `--slow-threshold`, and timeouts) or `all`. Every request is counted
    /// in the `latency` windows either way.
    #[arg(long, value_enum, default_value = "slow")]
    pub emit: Emit,

    /// Requests at least this slow get a `request` event, e.g. `500ms`.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub slow_threshold: Duration,

    /// A request unanswered for this long is reported as `timeout` (its
    /// reply, if it still comes, is absorbed).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this
    /// address, e.g. `0.0.0.0:9464`. Off by default.
    #[arg(long, env = "RESPTRACE_HTTP_ADDR", value_parser = parse_http_addr)]
    pub http_addr: Option<SocketAddr>,

    /// Attach only the bare packet hook (port filter + one counter) and
    /// nothing else: the baseline of `cargo xtask bench`.
    #[arg(long, hide = true)]
    pub bare_hook: bool,

    /// Filter for the agent's own logs on stderr (tracing `EnvFilter` syntax).
    #[arg(long, env = "RESPTRACE_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    Slow,
    #[value(alias = "requests")]
    All,
}

impl Cli {
    /// Checks across flags that clap cannot express; returns the watched ports
    /// without duplicates, in the order given.
    pub fn watched_ports(&self) -> Result<Vec<u16>, String> {
        let mut ports = Vec::with_capacity(self.ports.len());
        for &port in &self.ports {
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        if ports.len() > MAX_WATCHED_PORTS {
            return Err(format!(
                "--ports: at most {MAX_WATCHED_PORTS} ports can be watched, got {}",
                ports.len()
            ));
        }
        Ok(ports)
    }
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        Ok(port) => Err(format!("{port} is not a TCP port (1-65535)")),
        Err(_) => Err(format!("`{value}` is not a port number (1-65535)")),
    }
}

fn parse_interval(value: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(value).map_err(|e| format!("`{value}`: {e}"))?;
    if interval < Duration::from_millis(100) {
        return Err(format!("`{value}`: the interval must be at least 100ms"));
    }
    Ok(interval)
}

fn parse_http_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("`{value}` is not an IP address and port, e.g. 0.0.0.0:9464"))
}

fn parse_ring_buffer_kib(value: &str) -> Result<u32, String> {
    let kib: u32 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a size in KiB"))?;
    if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
        return Err(format!(
            "{kib} KiB: must be a power of two between 4 and 1048576"
        ));
    }
    Ok(kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("resptrace").chain(args.iter().copied()))
    }

    #[test]
    fn default_port_is_6379() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.watched_ports().unwrap(), vec![6379]);
    }

    #[test]
    fn ports_are_a_comma_separated_list_without_duplicates() {
        let cli = parse(&["--ports", "6379,6380,6379"]).unwrap();
        assert_eq!(cli.watched_ports().unwrap(), vec![6379, 6380]);
    }

    #[test]
    fn bad_ports_are_rejected() {
        for bad in ["abc", "70000", "0", "6379,x", ""] {
            assert!(parse(&["--ports", bad]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn too_many_ports_are_rejected() {
        let list: Vec<String> = (7000..7017).map(|p| p.to_string()).collect();
        let cli = parse(&["--ports", &list.join(",")]).unwrap();
        assert!(cli.watched_ports().is_err());
    }

    #[test]
    fn http_listener_is_off_by_default_and_takes_an_address_and_port() {
        assert_eq!(parse(&[]).unwrap().http_addr, None);
        let cli = parse(&["--http-addr", "0.0.0.0:9464"]).unwrap();
        assert_eq!(cli.http_addr, Some("0.0.0.0:9464".parse().unwrap()));
        for bad in ["9464", "localhost:9464", "0.0.0.0"] {
            assert!(parse(&["--http-addr", bad]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ring_buffer_size_must_be_a_power_of_two() {
        assert!(parse(&["--ring-buffer-kib", "1000"]).is_err());
        assert!(parse(&["--ring-buffer-kib", "2"]).is_err());
        assert_eq!(
            parse(&["--ring-buffer-kib", "256"])
                .unwrap()
                .ring_buffer_kib,
            256
        );
    }
}
