//! Command line of `resptrace`. Every default is stated in its flag's help.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use agent_common::MAX_WATCHED_PORTS;
use clap::{Parser, builder::TypedValueParser as _};

#[derive(Debug, Parser)]
#[command(
    name = "resptrace",
    version,
    about = "eBPF agent that shows where Redis time goes: TCP handshakes to Redis ports, \
             timed and attributed to the process and cgroup that made them",
    long_about = None,
    after_help = "Writes one JSON object per line on stdout (schema: docs/events.md); \
                  its own logs go to stderr. Every flag can also be set with the \
                  environment variable shown, or as a key of the --config file \
                  (same name, without `--`); flags win over the environment, \
                  which wins over the file. Needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN \
                  (CAP_SYS_ADMIN before Linux 5.8), and a kernel ≥ 5.8 with BTF."
)]
pub struct Cli {
    /// Redis ports to watch, comma-separated (at most 16).
    #[arg(long, value_delimiter = ',', default_value = "6379", value_parser = parse_port)]
    pub ports: Vec<u16>,

    /// Size of the kernel-to-agent event ring buffers, in KiB (a power of
    /// two, at least 4), shared by the rings (one per CPU, up to 8). Events
    /// that do not fit are dropped and counted. The default holds a few
    /// hundred milliseconds of RESP capture on a busy node: the agent may be
    /// descheduled that long on a loaded 2-core node.
    #[arg(long, default_value_t = 8192, value_parser = parse_ring_buffer_kib)]
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

    /// `latency` series (role × cgroup × endpoint × command) kept per
    /// window; requests of further series are counted in one `OTHER` series
    /// per role and endpoint (`overflowed`), so memory stays bounded.
    #[arg(long, default_value_t = crate::aggregate::DEFAULT_MAX_SERIES, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub max_series: usize,

    /// Requests at least this slow get a `request` event, e.g. `500ms`.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub slow_threshold: Duration,

    /// A request unanswered for this long is reported as `timeout` (its
    /// reply, if it still comes, is absorbed).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// This node's availability zone (e.g. `us-east-1a`; on EKS the node's
    /// `topology.kubernetes.io/zone` label), to tell same-zone endpoints
    /// from cross-zone ones.
    #[arg(long)]
    pub zone: Option<String>,

    /// Subnets and their zones, comma-separated `CIDR=ZONE` (e.g.
    /// `10.0.0.0/19=us-east-1a,10.0.32.0/19=us-east-1b`; on EKS, the VPC's
    /// subnets, which also hold ElastiCache nodes). Endpoints in no listed
    /// subnet are `unknown_zone`.
    #[arg(long, value_delimiter = ',')]
    pub zone_cidr: Vec<crate::zones::ZoneCidr>,

    #[command(flatten)]
    pub kubernetes: KubernetesFlags,

    #[command(flatten)]
    pub detectors: DetectorFlags,

    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this
    /// address, e.g. `0.0.0.0:9464`. Off by default.
    #[arg(long, value_parser = parse_http_addr)]
    pub http_addr: Option<SocketAddr>,

    /// Do not probe OpenSSL (`SSL_write`/`SSL_read` uprobes) for the
    /// plaintext of TLS connections: they are then timed as turns (op
    /// `tls`), without command names.
    #[arg(long)]
    pub no_tls_uprobes: bool,

    /// Attach only the bare packet hook (port filter + one counter) and
    /// nothing else: the baseline of `cargo xtask bench`.
    #[arg(long, hide = true)]
    pub bare_hook: bool,

    /// Attach only the counting floor: the bare hook plus every RESP request
    /// and reply counted in the kernel (no names, no times), logged at exit;
    /// the least any exact tracer does, for `cargo xtask bench`. Linux 5.17+.
    #[arg(long, hide = true, conflicts_with = "bare_hook")]
    pub counting_floor: bool,

    /// Filter for the agent's own logs on stderr (tracing `EnvFilter` syntax).
    #[arg(long, default_value = "info")]
    pub log: String,

    /// How events are written on stdout: `json` (one object per line, for
    /// log pipelines) or `pretty` (one aligned line per event, for a human
    /// at a terminal; coloured when stdout is one).
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,

    /// The node's name in every event (`node`). Default: `$NODE_NAME` (set
    /// by the DaemonSet from the downward API), else the hostname.
    #[arg(long)]
    pub node_name: Option<String>,

    /// The host's cgroup2 mount: the packet programs attach to its root and
    /// cgroup ids are named from its tree. Default: the first cgroup2 mount
    /// of this process. In a container with its own cgroup namespace
    /// (Kubernetes on cgroup-v2 nodes) that mount is the container's own
    /// cgroup, so the DaemonSet mounts the host's `/sys/fs/cgroup` read-only
    /// and names it here.
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// TOML file with settings, keyed like the long flags (`interval = "10s"`,
    /// `ports = [6379, 6380]`). Flags and environment variables override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Names from the Kubernetes API (docs/events.md, "Kubernetes names").
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Kubernetes")]
pub struct KubernetesFlags {
    /// Name pods, their owners and Redis endpoints from the Kubernetes API:
    /// `auto` (the default) is on in a pod (`KUBERNETES_SERVICE_HOST` set,
    /// with the service account's credentials) or with --kubeconfig.
    /// Without the API, events carry pod UIDs only.
    #[arg(long, value_enum, default_value = "auto")]
    pub kubernetes: Kubernetes,

    /// Kubeconfig to reach the API with, to run outside a pod (its current
    /// context). Default: in-cluster, else `$KUBECONFIG` or `~/.kube/config`.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Pod labels copied into events (`labels`), comma-separated, e.g.
    /// `app,team`. Not metric labels. Default: none.
    #[arg(long, value_delimiter = ',', value_parser = parse_label_key)]
    pub pod_labels: Vec<String>,

    /// Also watch the pods matching this label selector on every node (e.g.
    /// `app=redis`), so a Redis pod elsewhere is named by its IP. Off by default.
    #[arg(long, value_name = "SELECTOR")]
    pub redis_pod_selector: Option<String>,

    /// Also watch Services, so a ClusterIP endpoint is named (`service`);
    /// the backend behind it is not guessed. Off by default.
    #[arg(long)]
    pub watch_services: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kubernetes {
    Auto,
    On,
    Off,
}

impl KubernetesFlags {
    /// Whether to watch the API; `in_cluster`: `KUBERNETES_SERVICE_HOST` is set.
    pub fn enabled(&self, in_cluster: bool) -> bool {
        match self.kubernetes {
            Kubernetes::On => true,
            Kubernetes::Off => false,
            Kubernetes::Auto => in_cluster || self.kubeconfig.is_some(),
        }
    }
}

/// A label key as Kubernetes allows it: `[prefix/]name`, name at most 63
/// characters of alphanumerics, `-`, `_`, `.`.
fn parse_label_key(value: &str) -> Result<String, String> {
    let value = value.trim();
    let name = value.rsplit_once('/').map_or(value, |(_, name)| name);
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!(
            "`{value}` is not a label key (e.g. app, app.kubernetes.io/name)"
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Pretty,
}

/// The detectors' thresholds (`alert` events, docs/events.md).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Detectors")]
pub struct DetectorFlags {
    /// An alert resolves once its condition has been clear this long.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::DEFAULT_RESOLVE_AFTER))]
    pub resolve_after: humantime::Duration,

    /// connect_storm: connects per second (node-wide or one workload, to one endpoint) that make a storm when held for --connect-storm-sustain.
    #[arg(long, default_value_t = crate::detect::connect_storm::DEFAULT_RATE_PER_S)]
    pub connect_storm_rate_per_s: f64,

    /// connect_storm: how long a rate must hold, every second of it.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::connect_storm::DEFAULT_SUSTAIN))]
    pub connect_storm_sustain: humantime::Duration,

    /// connect_storm: a rate this many times the usual one (EWMA) is also a storm.
    #[arg(long, default_value_t = crate::detect::connect_storm::DEFAULT_BASELINE_FACTOR)]
    pub connect_storm_baseline_factor: f64,

    /// connect_storm: the baseline rule never fires below this rate.
    #[arg(long, default_value_t = crate::detect::connect_storm::DEFAULT_BASELINE_FLOOR_PER_S)]
    pub connect_storm_baseline_floor_per_s: f64,

    /// connect_storm: half-life of the baseline.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::connect_storm::DEFAULT_BASELINE_HALFLIFE))]
    pub connect_storm_baseline_halflife: humantime::Duration,

    /// connect_storm: history needed before the baseline rule applies.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::connect_storm::DEFAULT_BASELINE_WARMUP))]
    pub connect_storm_baseline_warmup: humantime::Duration,

    /// connect_storm: this many workloads connecting at once is a fleet reconnect (as after a failover).
    #[arg(long, default_value_t = crate::detect::connect_storm::DEFAULT_FLEET_WORKLOADS)]
    pub connect_storm_fleet_workloads: usize,

    /// retry_storm: failed attempts of one workload to one endpoint within --retry-storm-window that can make a retry storm.
    #[arg(long, default_value_t = crate::detect::retry_storm::DEFAULT_MIN_FAILURES)]
    pub retry_storm_min_failures: u32,

    /// retry_storm: how far back failed attempts count.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::retry_storm::DEFAULT_WINDOW))]
    pub retry_storm_window: humantime::Duration,

    /// retry_storm: an attempt this soon after a failed one is a retry of the same request.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::retry_storm::DEFAULT_RETRY_GAP))]
    pub retry_storm_retry_gap: humantime::Duration,

    /// retry_storm: how regular the attempts must be (spread of their intervals relative to the median).
    #[arg(long, default_value_t = crate::detect::retry_storm::DEFAULT_REGULARITY)]
    pub retry_storm_regularity: f64,

    /// syn_drops: the alert resolves this long after the last unanswered attempt, when nothing connects again.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::syn_drops::DEFAULT_QUIET))]
    pub syn_drops_quiet: humantime::Duration,

    /// syn_drops: unanswered attempts that make the alert critical.
    #[arg(long, default_value_t = crate::detect::syn_drops::DEFAULT_CRITICAL_COUNT)]
    pub syn_drops_critical_count: u64,

    /// retransmits: span over which data retransmits are counted.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::retransmits::DEFAULT_WINDOW))]
    pub retransmits_window: humantime::Duration,

    /// retransmits: retransmits per second to an endpoint that fire the alert...
    #[arg(long, default_value_t = crate::detect::retransmits::DEFAULT_RATE_PER_S)]
    pub retransmits_rate_per_s: f64,

    /// retransmits: ...when also at least this many per 1,000 requests (if requests are seen).
    #[arg(long, default_value_t = crate::detect::retransmits::DEFAULT_PER_1000_REQUESTS)]
    pub retransmits_per_1000_requests: f64,

    /// error_replies: span over which failover replies (MOVED, ASK, LOADING, READONLY, CLUSTERDOWN, MASTERDOWN, TRYAGAIN) are counted.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::error_replies::DEFAULT_WINDOW))]
    pub error_replies_window: humantime::Duration,

    /// error_replies: failover replies in the window that fire the alert.
    #[arg(long, default_value_t = crate::detect::error_replies::DEFAULT_MIN_COUNT)]
    pub error_replies_min_count: u64,

    /// slow_commands: span over which requests slower than --slow-threshold, and (timeouts) unanswered requests, are counted.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::slow_commands::DEFAULT_WINDOW))]
    pub slow_commands_window: humantime::Duration,

    /// slow_commands: slow requests to one endpoint in the window that fire the alert (blocking commands such as BLPOP never count).
    #[arg(long, default_value_t = crate::detect::slow_commands::DEFAULT_MIN_COUNT)]
    pub slow_commands_min_count: u64,

    /// timeouts: unanswered requests to one endpoint in --slow-commands-window that fire the alert.
    #[arg(long, default_value_t = crate::detect::slow_commands::DEFAULT_TIMEOUTS_MIN_COUNT)]
    pub timeouts_min_count: u64,

    /// cross_zone_latency: span of each comparison of cross-zone with same-zone requests.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::cross_zone::DEFAULT_WINDOW))]
    pub cross_zone_window: humantime::Duration,

    /// cross_zone_latency: fires when an endpoint's cross-zone p99 is this many times its same-zone p99...
    #[arg(long, default_value_t = crate::detect::cross_zone::DEFAULT_FACTOR)]
    pub cross_zone_factor: f64,

    /// cross_zone_latency: ...and at least this much above it.
    #[arg(long, default_value_t = humantime::Duration::from(crate::detect::cross_zone::DEFAULT_MARGIN))]
    pub cross_zone_margin: humantime::Duration,

    /// cross_zone_latency: requests needed from each side in a window to compare.
    #[arg(long, default_value_t = crate::detect::cross_zone::DEFAULT_MIN_REQUESTS)]
    pub cross_zone_min_requests: u64,

    /// cross_zone_latency: a workload from this many requests per second...
    #[arg(long, default_value_t = crate::detect::cross_zone::DEFAULT_HOT_REQUESTS_PER_S)]
    pub cross_zone_hot_requests_per_s: u64,

    /// cross_zone_latency: ...sending at least this share of them to other zones is named.
    #[arg(long, default_value_t = crate::detect::cross_zone::DEFAULT_CROSS_FRACTION)]
    pub cross_zone_fraction: f64,

    /// pool_pressure: consecutive --interval readings over which a workload's open connections to an endpoint must keep rising.
    #[arg(long, default_value_t = crate::detect::pool_pressure::DEFAULT_RISING_READINGS)]
    pub pool_pressure_rising_readings: usize,

    /// pool_pressure: ...by at least this many connections.
    #[arg(long, default_value_t = crate::detect::pool_pressure::DEFAULT_MIN_GROWTH)]
    pub pool_pressure_min_growth: u64,

    /// pool_pressure: the Redis servers' maxclients.
    #[arg(long, default_value_t = crate::detect::pool_pressure::DEFAULT_MAXCLIENTS)]
    pub pool_pressure_maxclients: u64,

    /// pool_pressure: share of maxclients the node may hold to one endpoint before it is pressure.
    #[arg(long, default_value_t = crate::detect::pool_pressure::DEFAULT_MAXCLIENTS_SHARE)]
    pub pool_pressure_maxclients_share: f64,
}

impl DetectorFlags {
    /// The detectors' configuration; `slow_threshold` is `--slow-threshold`.
    pub fn config(&self, slow_threshold: Duration) -> crate::detect::DetectorConfig {
        use crate::detect::*;
        DetectorConfig {
            resolve_after: self.resolve_after.into(),
            connect_storm: ConnectStormConfig {
                rate_per_s: self.connect_storm_rate_per_s,
                sustain: self.connect_storm_sustain.into(),
                baseline_factor: self.connect_storm_baseline_factor,
                baseline_floor_per_s: self.connect_storm_baseline_floor_per_s,
                baseline_halflife: self.connect_storm_baseline_halflife.into(),
                baseline_warmup: self.connect_storm_baseline_warmup.into(),
                fleet_workloads: self.connect_storm_fleet_workloads,
            },
            retry_storm: RetryStormConfig {
                min_failures: self.retry_storm_min_failures,
                window: self.retry_storm_window.into(),
                retry_gap: self.retry_storm_retry_gap.into(),
                regularity: self.retry_storm_regularity,
            },
            syn_drops: SynDropsConfig {
                quiet: self.syn_drops_quiet.into(),
                critical_count: self.syn_drops_critical_count,
            },
            retransmits: RetransmitsConfig {
                window: self.retransmits_window.into(),
                rate_per_s: self.retransmits_rate_per_s,
                per_1000_requests: self.retransmits_per_1000_requests,
            },
            error_replies: ErrorRepliesConfig {
                window: self.error_replies_window.into(),
                min_count: self.error_replies_min_count,
            },
            slow_commands: SlowCommandsConfig {
                threshold: slow_threshold,
                window: self.slow_commands_window.into(),
                min_count: self.slow_commands_min_count,
                timeouts_min_count: self.timeouts_min_count,
            },
            cross_zone: CrossZoneConfig {
                window: self.cross_zone_window.into(),
                factor: self.cross_zone_factor,
                margin: self.cross_zone_margin.into(),
                min_requests: self.cross_zone_min_requests,
                hot_requests_per_s: self.cross_zone_hot_requests_per_s,
                cross_fraction: self.cross_zone_fraction,
            },
            pool_pressure: PoolPressureConfig {
                rising_readings: self.pool_pressure_rising_readings,
                min_growth: self.pool_pressure_min_growth,
                maxclients: self.pool_pressure_maxclients,
                maxclients_share: self.pool_pressure_maxclients_share,
            },
        }
    }
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
    fn kubernetes_is_on_in_a_pod_or_with_a_kubeconfig_unless_off() {
        let flags = |args: &[&str]| parse(args).unwrap().kubernetes;
        assert!(!flags(&[]).enabled(false));
        assert!(flags(&[]).enabled(true));
        assert!(flags(&["--kubeconfig", "/k"]).enabled(false));
        assert!(!flags(&["--kubernetes", "off", "--kubeconfig", "/k"]).enabled(true));
        assert!(flags(&["--kubernetes", "on"]).enabled(false));
        assert_eq!(
            flags(&["--pod-labels", "app,app.kubernetes.io/name"]).pod_labels,
            ["app", "app.kubernetes.io/name"]
        );
        assert!(parse(&["--pod-labels", "a b"]).is_err());
        assert!(parse(&["--kubernetes", "maybe"]).is_err());
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
