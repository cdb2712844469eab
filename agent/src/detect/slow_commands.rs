//! `slow_commands` and `timeouts`: requests to one endpoint slower than the
//! slow threshold (default 500 ms, the usual client command timeout), or
//! never answered (the connection closed on them, or they aged out). Fires
//! when `min_count` arrive within `window`, stays on while any keeps
//! coming, and names the commands and workloads concerned.
//!
//! Commands that wait by design (`BLPOP`, `XREAD … BLOCK`, `WAIT`,
//! `SUBSCRIBE`) are left out: slow is their normal.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde_json::json;

use super::{
    Alert, AlertState, Detector, NS_PER_S, Observation, Severity,
    counters::{BoundedMap, SecondRing, WorkloadCounts},
    duration_ns, evidence,
    lifecycle::{Lifecycle, Transition},
    round3, seconds, workload_names,
};
use crate::resp::Command;

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_MIN_COUNT: u64 = 5;
pub const DEFAULT_TIMEOUTS_MIN_COUNT: u64 = 5;

/// Endpoints tracked at most.
pub const MAX_ENDPOINTS: usize = 1024;
/// Commands named in an alert's evidence at most (most frequent first).
const MAX_COMMANDS_SHOWN: usize = 5;
/// Longest `window` honoured (the per-second ring is sized by it).
const MAX_WINDOW_S: u64 = 600;

#[derive(Clone, Debug)]
pub struct SlowCommandsConfig {
    /// A request at least this slow counts (`--slow-threshold`).
    pub threshold: Duration,
    /// Span over which slow requests and timeouts are counted
    /// (`DEFAULT_WINDOW`: 10 s).
    pub window: Duration,
    /// Slow requests to one endpoint within `window` that fire
    /// `slow_commands` (`DEFAULT_MIN_COUNT`: 5).
    pub min_count: u64,
    /// Unanswered requests to one endpoint within `window` that fire
    /// `timeouts` (`DEFAULT_TIMEOUTS_MIN_COUNT`: 5).
    pub timeouts_min_count: u64,
}

impl Default for SlowCommandsConfig {
    fn default() -> Self {
        Self {
            threshold: Duration::from_millis(500),
            window: DEFAULT_WINDOW,
            min_count: DEFAULT_MIN_COUNT,
            timeouts_min_count: DEFAULT_TIMEOUTS_MIN_COUNT,
        }
    }
}

/// The two alerts of this detector, indexing its per-endpoint arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Slow = 0,
    Timeout = 1,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Slow, Kind::Timeout];

    fn name(self) -> &'static str {
        match self {
            Kind::Slow => "slow_commands",
            Kind::Timeout => "timeouts",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    requests: u64,
    /// By `Kind`.
    notable: [u64; 2],
}

/// One incident so far: from its first slow (unanswered) request to its
/// last.
#[derive(Debug, Default)]
struct Incident {
    first_ns: u64,
    last_ns: u64,
    count: u64,
    /// Slowest request (oldest unanswered one).
    max_latency_ns: u64,
    by_command: BTreeMap<Command, u64>,
    workloads: WorkloadCounts,
}

impl Incident {
    fn add(&mut self, ts_ns: u64, latency_ns: u64, command: Command, workload: &super::Workload) {
        if self.count == 0 {
            self.first_ns = ts_ns;
        }
        self.first_ns = self.first_ns.min(ts_ns);
        self.last_ns = self.last_ns.max(ts_ns);
        self.count += 1;
        self.max_latency_ns = self.max_latency_ns.max(latency_ns);
        // Bounded by the command table.
        *self.by_command.entry(command).or_default() += 1;
        self.workloads.add(workload, 1, ts_ns);
    }

    /// The most frequent commands, most first.
    fn top_commands(&self) -> Vec<(Command, u64)> {
        let mut commands: Vec<(Command, u64)> =
            self.by_command.iter().map(|(c, n)| (*c, *n)).collect();
        commands.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        commands.truncate(MAX_COMMANDS_SHOWN);
        commands
    }
}

#[derive(Debug)]
struct EndpointState {
    seconds: SecondRing<Counts>,
    last_seen_ns: u64,
    /// Requests since the incident of each kind started (for its fraction).
    requests: [u64; 2],
    incidents: [Incident; 2],
    lifecycles: [Lifecycle; 2],
}

pub struct SlowCommands {
    config: SlowCommandsConfig,
    threshold_ns: u64,
    window_s: u64,
    resolve_after_ns: u64,
    endpoints: BoundedMap<SocketAddr, EndpointState>,
}

impl SlowCommands {
    pub fn new(config: SlowCommandsConfig, resolve_after_ns: u64) -> Self {
        Self {
            threshold_ns: duration_ns(config.threshold),
            window_s: config.window.as_secs().clamp(1, MAX_WINDOW_S),
            config,
            resolve_after_ns,
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
        }
    }

    fn min_count(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Slow => self.config.min_count,
            Kind::Timeout => self.config.timeouts_min_count,
        }
        .max(1)
    }
}

impl Detector for SlowCommands {
    fn kind(&self) -> &'static str {
        "slow_commands"
    }

    fn observe(&mut self, observation: &Observation) {
        let Observation::Request {
            ts_ns,
            workload,
            endpoint,
            command,
            latency_ns,
            timeout,
            ..
        } = observation
        else {
            return;
        };
        if command.may_block() {
            return;
        }
        let ring_seconds = self.window_s as usize + 1;
        let Some(state) = self.endpoints.get_or_insert(
            endpoint,
            || *endpoint,
            || EndpointState {
                seconds: SecondRing::new(ring_seconds),
                last_seen_ns: 0,
                requests: [0; 2],
                incidents: Default::default(),
                lifecycles: Default::default(),
            },
        ) else {
            return;
        };
        state.last_seen_ns = state.last_seen_ns.max(*ts_ns);
        let kind = if *timeout {
            Some(Kind::Timeout)
        } else {
            (*latency_ns >= self.threshold_ns).then_some(Kind::Slow)
        };
        if let Some(slot) = state.seconds.at(ts_ns / NS_PER_S) {
            slot.requests += 1;
            if let Some(kind) = kind {
                slot.notable[kind as usize] += 1;
            }
        }
        for requests in &mut state.requests {
            *requests += 1;
        }
        if let Some(kind) = kind {
            state.incidents[kind as usize].add(*ts_ns, *latency_ns, *command, workload);
        }
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let now_s = now_ns / NS_PER_S;
        let from_s = now_s.saturating_sub(self.window_s) + 1;
        let window_ns = self.window_s * NS_PER_S;
        let min_counts = Kind::ALL.map(|kind| self.min_count(kind));
        let (threshold_ns, resolve_after_ns) = (self.threshold_ns, self.resolve_after_ns);
        self.endpoints.retain(|&endpoint, state| {
            for kind in Kind::ALL {
                let k = kind as usize;
                let count: u64 = state
                    .seconds
                    .range(from_s, now_s + 1)
                    .map(|c| c.notable[k])
                    .sum();
                let lifecycle = &mut state.lifecycles[k];
                // Fires on min_count, stays on while any keeps coming.
                let needed = if lifecycle.is_firing() {
                    1
                } else {
                    min_counts[k]
                };
                let condition = (count >= needed).then_some(state.incidents[k].first_ns);
                let incident = &state.incidents[k];
                let requests = state.requests[k];
                if let Some(transition) = lifecycle.update(condition, now_ns, resolve_after_ns) {
                    let (started_ns, ended_ns) = match transition {
                        Transition::Fired { started_ns } => (started_ns, None),
                        // The incident ended with its last slow request.
                        Transition::Resolved { started_ns, .. } => {
                            (started_ns, Some(incident.last_ns.max(started_ns)))
                        }
                    };
                    alerts.push(alert(
                        kind,
                        endpoint,
                        incident,
                        requests,
                        threshold_ns,
                        started_ns,
                        ended_ns,
                    ));
                    if ended_ns.is_some() {
                        state.incidents[k] = Incident::default();
                    }
                }
                if !state.lifecycles[k].is_firing() && count == 0 {
                    // Scattered ones that never made an incident start over.
                    state.incidents[k] = Incident::default();
                }
                if state.incidents[k].count == 0 {
                    state.requests[k] = 0;
                }
            }
            state.lifecycles.iter().any(Lifecycle::is_firing)
                || state.last_seen_ns + window_ns >= now_ns
        });
    }

    fn untracked(&self) -> u64 {
        self.endpoints.untracked()
    }
}

fn alert(
    kind: Kind,
    endpoint: SocketAddr,
    incident: &Incident,
    requests: u64,
    threshold_ns: u64,
    started_ns: u64,
    ended_ns: Option<u64>,
) -> Alert {
    let workloads = incident.workloads.top();
    let commands = incident.top_commands();
    let fraction = if requests > 0 {
        incident.count as f64 / requests as f64
    } else {
        0.0
    };
    let by_command: serde_json::Map<String, serde_json::Value> = commands
        .iter()
        .map(|(command, n)| (command.to_string(), json!(n)))
        .collect();
    let named = commands
        .iter()
        .map(|(command, n)| format!("{n} {command}"))
        .collect::<Vec<_>>()
        .join(", ");
    let max_ms = round3(incident.max_latency_ns as f64 / 1e6);
    let mut evidence = evidence(json!({
        "count": incident.count,
        "requests": requests,
        "fraction": round3(fraction),
        "max_ms": max_ms,
        "commands": by_command,
        "workloads_affected": incident.workloads.affected(),
    }));
    let (what, severity) = match kind {
        Kind::Slow => {
            let threshold_ms = round3(threshold_ns as f64 / 1e6);
            evidence.insert("threshold_ms".into(), json!(threshold_ms));
            (
                format!("requests slower than {threshold_ms} ms"),
                Severity::Warning,
            )
        }
        Kind::Timeout => ("unanswered requests".to_string(), Severity::Critical),
    };
    let (state, message) = match ended_ns {
        None => (
            AlertState::Firing,
            format!(
                "{what} to {endpoint}: {} ({:.1}% of requests; {named}; slowest {max_ms} ms) \
                 from {}",
                incident.count,
                fraction * 100.0,
                workload_names(&workloads)
            ),
        ),
        Some(ended_ns) => {
            let lasted_s = seconds(ended_ns.saturating_sub(started_ns));
            evidence.insert("duration_s".into(), json!(lasted_s));
            (
                AlertState::Resolved,
                format!(
                    "{endpoint}: no more {what} ({} over {lasted_s} s)",
                    incident.count
                ),
            )
        }
    };
    Alert {
        kind: kind.name(),
        id: format!("{}/{endpoint}", kind.name()),
        state,
        severity,
        message,
        endpoint: Some(endpoint),
        workloads,
        started_ns,
        ended_ns,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect::testing::*, zones::Locality};

    fn detector() -> SlowCommands {
        SlowCommands::new(SlowCommandsConfig::default(), 10 * S)
    }

    /// 100 `command` requests per second from `workload`; those in `slow`
    /// seconds take `latency_ms`, or time out with `timeout`.
    fn traffic(
        workload: &crate::workload::Workload,
        command: &'static str,
        seconds: std::ops::Range<u64>,
        slow: std::ops::Range<u64>,
        latency_ms: u64,
        timeout: bool,
    ) -> Vec<Observation> {
        seconds
            .flat_map(|s| spread(T0 + s * S, 100).map(move |ts| (s, ts)))
            .map(|(s, ts)| {
                let (latency_ns, timeout) = if slow.contains(&s) {
                    (latency_ms * MS, timeout)
                } else {
                    (300_000, false)
                };
                timed_request(
                    ts,
                    workload,
                    redis(9),
                    command,
                    latency_ns,
                    timeout,
                    Locality::UnknownZone,
                )
            })
            .collect()
    }

    #[test]
    fn a_slow_spell_fires_once_names_the_command_and_resolves() {
        let stream = traffic(&pod(1), "HGETALL", 0..60, 20..25, 800, false);
        let alerts = run(&mut detector(), stream, T0 + 60 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.kind, "slow_commands");
        assert_eq!(firing.severity, Severity::Warning);
        assert_eq!(firing.started_ns, T0 + 20 * S);
        assert_eq!(firing.workloads, vec![pod(1)]);
        assert!(firing.message.contains("HGETALL"), "{}", firing.message);
        let resolved = &alerts[1].1;
        assert_eq!(number(resolved, "count"), 500.0);
        assert_eq!(number(resolved, "max_ms"), 800.0);
        assert_eq!(resolved.evidence["commands"]["HGETALL"], 500);
        assert_eq!(number(resolved, "threshold_ms"), 500.0);
    }

    #[test]
    fn timeouts_are_their_own_critical_alert() {
        let stream = traffic(&pod(2), "GET", 0..60, 30..32, 2_000, true);
        let alerts = run(&mut detector(), stream, T0 + 60 * S);
        assert_fired_and_resolved_once(&alerts);
        assert_eq!(alerts[0].1.kind, "timeouts");
        assert_eq!(alerts[0].1.severity, Severity::Critical);
        assert_eq!(number(&alerts[1].1, "count"), 200.0);
    }

    #[test]
    fn fast_traffic_a_few_slow_requests_and_blocking_commands_are_normal() {
        let mut stream = traffic(&pod(1), "GET", 0..60, 0..0, 0, false);
        // Four slow requests in one window: below `min_count`.
        stream.extend((0..4).map(|i| {
            timed_request(
                T0 + 30 * S + i * MS,
                &pod(1),
                redis(9),
                "GET",
                900 * MS,
                false,
                Locality::UnknownZone,
            )
        }));
        // A queue worker blocking in BLPOP, its requests cut at close.
        stream.extend(traffic(&pod(3), "BLPOP", 0..60, 0..60, 5_000, true));
        assert_eq!(run(&mut detector(), stream, T0 + 60 * S), vec![]);
    }
}
