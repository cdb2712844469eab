//! Detect: typed observations of the node's Redis traffic → `alert` events
//! with a lifecycle (`firing` once, `resolved` once).
//!
//! Each detector is a small type fed the same observations; `evaluate` is
//! called on a timer (every second) with the current monotonic time and
//! appends alerts whose state changed.
//!
//! All state is per key (endpoint, or workload and endpoint), in maps
//! bounded by a documented cap, and idle keys are evicted: memory stays flat
//! however long the agent runs.

pub mod connect_storm;
mod counters;
pub mod cross_zone;
pub mod error_replies;
mod lifecycle;
pub mod pool_pressure;
pub mod retransmits;
pub mod retry_storm;
pub mod slow_commands;
pub mod syn_drops;
#[cfg(test)]
pub(crate) mod testing;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use agent_common::{ConnectOutcome, SynAnswer};

use crate::{resp::Command, workload::Workload, zones::Locality};

pub use connect_storm::{ConnectStorm, ConnectStormConfig};
pub use cross_zone::{CrossZoneConfig, CrossZoneLatency};
pub use error_replies::{ErrorReplies, ErrorRepliesConfig};
pub use pool_pressure::{PoolPressure, PoolPressureConfig};
pub use retransmits::{Retransmits, RetransmitsConfig};
pub use retry_storm::{RetryStorm, RetryStormConfig};
pub use slow_commands::{SlowCommands, SlowCommandsConfig};
pub use syn_drops::{SynDrops, SynDropsConfig};

/// What the detectors see, built by the pipeline from decoded events,
/// exchanges and the open-connection gauges. Times are kernel monotonic ns.
#[derive(Clone, Debug)]
pub enum Observation {
    /// One TCP connect attempt to a Redis endpoint, with its outcome.
    Connect {
        ts_ns: u64,
        workload: Workload,
        endpoint: SocketAddr,
        outcome: ConnectOutcome,
        answer: SynAnswer,
        syn_retransmits: u32,
        /// SYN sent → outcome.
        duration_ns: u64,
    },
    /// Data segments retransmitted on established connections of a
    /// (workload, endpoint) since the previous observation of it.
    Retransmits {
        ts_ns: u64,
        workload: Workload,
        endpoint: SocketAddr,
        count: u64,
    },
    /// One answered or timed-out client request (client role only).
    Request {
        ts_ns: u64,
        workload: Workload,
        endpoint: SocketAddr,
        command: Command,
        /// Request sent → reply complete; for a timeout, its age.
        latency_ns: u64,
        /// The error prefix (`MOVED`, `LOADING`, …) of an error reply.
        error: Option<Arc<str>>,
        timeout: bool,
        /// Where the endpoint is relative to the client.
        locality: Locality,
    },
    /// Open connections of a (workload, endpoint) now; sent every interval
    /// for every pair with connections (and once with 0 when they are gone).
    OpenConnections {
        ts_ns: u64,
        workload: Workload,
        endpoint: SocketAddr,
        open: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Resolved,
}

/// An alert's state change, written as one `alert` event.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    /// `connect_storm`, `retry_storm`, `syn_drops`, `retransmits`,
    /// `error_replies`, `slow_commands`, `timeouts`, `cross_zone_latency`,
    /// `pool_pressure`.
    pub kind: &'static str,
    /// Same for the `firing` and the `resolved` event of one alert:
    /// `<kind>/<endpoint>[/<workload key>][/<variant>]`.
    pub id: String,
    pub state: AlertState,
    pub severity: Severity,
    /// One line for a human, with the numbers that matter.
    pub message: String,
    /// The Redis endpoint concerned (`None`: node-wide).
    pub endpoint: Option<SocketAddr>,
    /// Workloads concerned, most affected first, at most
    /// `MAX_ALERT_WORKLOADS` (empty: node-wide).
    pub workloads: Vec<Workload>,
    /// Monotonic ns when the condition started.
    pub started_ns: u64,
    /// Resolved alerts: monotonic ns when the condition ended.
    pub ended_ns: Option<u64>,
    /// The numbers behind it, detector-specific (documented in docs/events.md).
    pub evidence: serde_json::Map<String, serde_json::Value>,
}

/// Workloads named in one alert at most (the evidence counts them all).
pub const MAX_ALERT_WORKLOADS: usize = 10;

/// A detector: fed every observation, evaluated on a timer.
pub trait Detector {
    fn kind(&self) -> &'static str;
    fn observe(&mut self, observation: &Observation);
    /// Appends the alerts whose state changed by `now_ns`.
    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>);
    /// Observations of keys (endpoints, workload–endpoint pairs) the
    /// detector could not track because its maps were full, since start.
    fn untracked(&self) -> u64;
}

/// How long an alert's condition must stay clear before it is resolved
/// (no flapping between `firing` and `resolved`).
pub const DEFAULT_RESOLVE_AFTER: Duration = Duration::from_secs(10);

/// Every detector threshold. The CLI exposes each field as
/// `--<detector>-<field>` (e.g. `--connect-storm-rate-per-s`), its help
/// naming the `DEFAULT_*` constant next to the field.
#[derive(Clone, Debug)]
pub struct DetectorConfig {
    /// `--resolve-after`: see `DEFAULT_RESOLVE_AFTER`.
    pub resolve_after: Duration,
    pub connect_storm: ConnectStormConfig,
    pub retry_storm: RetryStormConfig,
    pub syn_drops: SynDropsConfig,
    pub retransmits: RetransmitsConfig,
    pub error_replies: ErrorRepliesConfig,
    pub slow_commands: SlowCommandsConfig,
    pub cross_zone: CrossZoneConfig,
    pub pool_pressure: PoolPressureConfig,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            resolve_after: DEFAULT_RESOLVE_AFTER,
            connect_storm: ConnectStormConfig::default(),
            retry_storm: RetryStormConfig::default(),
            syn_drops: SynDropsConfig::default(),
            retransmits: RetransmitsConfig::default(),
            error_replies: ErrorRepliesConfig::default(),
            slow_commands: SlowCommandsConfig::default(),
            cross_zone: CrossZoneConfig::default(),
            pool_pressure: PoolPressureConfig::default(),
        }
    }
}

/// Every detector, fed the same observations.
pub struct Detectors {
    detectors: Vec<Box<dyn Detector + Send>>,
}

impl Detectors {
    pub fn new(config: &DetectorConfig) -> Self {
        let resolve_after_ns = duration_ns(config.resolve_after);
        Self {
            detectors: vec![
                Box::new(ConnectStorm::new(
                    config.connect_storm.clone(),
                    resolve_after_ns,
                )),
                Box::new(RetryStorm::new(
                    config.retry_storm.clone(),
                    resolve_after_ns,
                )),
                Box::new(SynDrops::new(config.syn_drops.clone(), resolve_after_ns)),
                Box::new(Retransmits::new(
                    config.retransmits.clone(),
                    resolve_after_ns,
                )),
                Box::new(ErrorReplies::new(
                    config.error_replies.clone(),
                    resolve_after_ns,
                )),
                Box::new(SlowCommands::new(
                    config.slow_commands.clone(),
                    resolve_after_ns,
                )),
                Box::new(CrossZoneLatency::new(
                    config.cross_zone.clone(),
                    resolve_after_ns,
                )),
                Box::new(PoolPressure::new(
                    config.pool_pressure.clone(),
                    resolve_after_ns,
                )),
            ],
        }
    }

    pub fn observe(&mut self, observation: &Observation) {
        for detector in &mut self.detectors {
            detector.observe(observation);
        }
    }

    /// Call every second with the current monotonic time; appends the
    /// alerts to write.
    pub fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        for detector in &mut self.detectors {
            detector.evaluate(now_ns, alerts);
        }
    }

    /// Observations no detector could track because its maps were full
    /// (for `stats`: `detector_untracked`).
    pub fn untracked(&self) -> u64 {
        self.detectors.iter().map(|d| d.untracked()).sum()
    }
}

const NS_PER_S: u64 = 1_000_000_000;

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds → seconds, rounded to the millisecond for readable evidence.
fn seconds(ns: u64) -> f64 {
    round3(ns as f64 / NS_PER_S as f64)
}

/// Evidence numbers: three decimals are plenty, and shorter to read.
fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// `json!({...})` → the evidence map.
fn evidence(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// The workloads to name in an alert: the `MAX_ALERT_WORKLOADS` with the
/// largest weight (failures, attempts…), then by key for a stable order.
fn top_workloads<'a>(weighted: impl Iterator<Item = (&'a Workload, u64)>) -> Vec<Workload> {
    let mut all: Vec<(&Workload, u64)> = weighted.collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.key.cmp(&b.0.key)));
    all.into_iter()
        .take(MAX_ALERT_WORKLOADS)
        .map(|(w, _)| w.clone())
        .collect()
}

/// How a message names a workload: its key (`pod:<uid>`, `cgroup:<path>`,
/// `comm:<name>`).
fn workload_names(workloads: &[Workload]) -> String {
    let mut names: Vec<&str> = workloads.iter().map(|w| &*w.key).collect();
    if names.len() > 3 {
        let more = names.len() - 3;
        names.truncate(3);
        return format!("{} and {more} more", names.join(", "));
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    struct Set(Detectors);

    impl Detector for Set {
        fn kind(&self) -> &'static str {
            "all"
        }
        fn observe(&mut self, observation: &Observation) {
            self.0.observe(observation);
        }
        fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
            self.0.evaluate(now_ns, alerts);
        }
        fn untracked(&self) -> u64 {
            self.0.untracked()
        }
    }

    #[test]
    fn a_benchmark_and_a_test_suite_raise_no_alert() {
        let mut stream = Vec::new();
        // redis-benchmark -c 50 for a minute: 50 connects in 100 ms, then
        // requests on the kept connections (2,000/s here, for test speed).
        let benchmark = pod(1);
        stream.extend((0..50).map(|i| established(T0 + S + i * 2 * MS, &benchmark, redis(9))));
        stream.extend(
            (1..61)
                .flat_map(|s| spread(T0 + s * S, 2_000))
                .map(|ts| request(ts, &benchmark, redis(9), None)),
        );
        for i in 1..=6 {
            let ts = T0 + i * 10 * S;
            stream.push(open_connections(ts, &benchmark, redis(9), 50));
            stream.push(retransmits(ts, &benchmark, redis(9), 0));
        }
        stream.push(open_connections(T0 + 70 * S, &benchmark, redis(9), 0));
        // A test suite: a few connections at a time, a refused connect and
        // an unanswered one now and then, the odd error reply.
        let suite = pod(2);
        for s in 0..70 {
            let ts = T0 + s * S + 300 * MS;
            for i in 0..3 {
                stream.push(established(ts + i * MS, &suite, redis(8)));
            }
            stream.push(request(
                ts + 5 * MS,
                &suite,
                redis(8),
                (s % 7 == 0).then_some("WRONGTYPE"),
            ));
            if s % 15 == 0 {
                stream.push(connect(
                    ts,
                    &suite,
                    redis(7),
                    ConnectOutcome::Refused,
                    100_000,
                ));
            }
        }
        stream.push(request(T0 + 30 * S, &suite, redis(8), Some("MOVED")));
        let alerts = run(
            &mut Set(Detectors::new(&DetectorConfig::default())),
            stream,
            T0 + 100 * S,
        );
        assert_eq!(alerts, vec![]);
    }
}
