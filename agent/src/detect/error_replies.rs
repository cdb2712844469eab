//! `error_replies`: a burst of the replies Redis gives while a failover or
//! a resharding is under way — `MOVED`, `ASK` (slots moving), `LOADING` (a
//! replica or restarted primary loading its dataset), `READONLY` (writes to a
//! demoted primary), `CLUSTERDOWN`, `MASTERDOWN`, `TRYAGAIN`. Fires when
//! `min_count` arrive within `window`, stays on while any keeps arriving,
//! and its `resolved` event says when the burst started, when the last one
//! came and the time to recover.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde_json::json;

use super::{
    Alert, AlertState, Detector, NS_PER_S, Observation, Severity,
    counters::{BoundedMap, SecondRing, WorkloadCounts},
    evidence,
    lifecycle::{Lifecycle, Transition},
    round3, seconds, workload_names,
};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_MIN_COUNT: u64 = 5;

/// The error words that mean the topology is changing, by how bad they are:
/// slots moving (clients follow them) → writes refused → no service.
pub const FAILOVER_ERRORS: [(&str, Severity); 7] = [
    ("MOVED", Severity::Info),
    ("ASK", Severity::Info),
    ("TRYAGAIN", Severity::Warning),
    ("READONLY", Severity::Warning),
    ("LOADING", Severity::Critical),
    ("CLUSTERDOWN", Severity::Critical),
    ("MASTERDOWN", Severity::Critical),
];

/// Endpoints tracked at most.
pub const MAX_ENDPOINTS: usize = 1024;
/// Longest `window` honoured (the per-second ring is sized by it).
const MAX_WINDOW_S: u64 = 600;

#[derive(Clone, Debug)]
pub struct ErrorRepliesConfig {
    /// Span over which failover replies are counted (`DEFAULT_WINDOW`: 10 s).
    pub window: Duration,
    /// Failover replies from one endpoint within `window` that fire the
    /// alert (`DEFAULT_MIN_COUNT`: 5); it stays on while any keeps coming.
    pub min_count: u64,
}

impl Default for ErrorRepliesConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            min_count: DEFAULT_MIN_COUNT,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    errors: u64,
    requests: u64,
}

/// The burst so far: from its first failover reply to its last.
#[derive(Debug, Default)]
struct Burst {
    first_ns: u64,
    last_ns: u64,
    by_error: BTreeMap<&'static str, u64>,
    requests: u64,
    workloads: WorkloadCounts,
}

impl Burst {
    fn severity(&self) -> Severity {
        FAILOVER_ERRORS
            .iter()
            .filter(|(word, _)| self.by_error.contains_key(word))
            .map(|(_, severity)| *severity)
            .max()
            .unwrap_or(Severity::Info)
    }

    fn errors(&self) -> u64 {
        self.by_error.values().sum()
    }

    fn summary(&self) -> String {
        self.by_error
            .iter()
            .map(|(word, n)| format!("{n} {word}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug)]
struct EndpointState {
    seconds: SecondRing<Counts>,
    last_seen_ns: u64,
    burst: Burst,
    lifecycle: Lifecycle,
}

pub struct ErrorReplies {
    config: ErrorRepliesConfig,
    window_s: u64,
    resolve_after_ns: u64,
    endpoints: BoundedMap<SocketAddr, EndpointState>,
}

impl ErrorReplies {
    pub fn new(config: ErrorRepliesConfig, resolve_after_ns: u64) -> Self {
        Self {
            window_s: config.window.as_secs().clamp(1, MAX_WINDOW_S),
            config,
            resolve_after_ns,
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
        }
    }
}

/// The failover error word of a reply's error prefix, if it is one.
fn failover_error(error: &str) -> Option<&'static str> {
    FAILOVER_ERRORS
        .iter()
        .map(|(word, _)| *word)
        .find(|word| word.eq_ignore_ascii_case(error))
}

impl Detector for ErrorReplies {
    fn kind(&self) -> &'static str {
        "error_replies"
    }

    fn observe(&mut self, observation: &Observation) {
        let Observation::Request {
            ts_ns,
            workload,
            endpoint,
            error,
            ..
        } = observation
        else {
            return;
        };
        let ring_seconds = self.window_s as usize + 1;
        let Some(state) = self.endpoints.get_or_insert(
            endpoint,
            || *endpoint,
            || EndpointState {
                seconds: SecondRing::new(ring_seconds),
                last_seen_ns: 0,
                burst: Burst::default(),
                lifecycle: Lifecycle::default(),
            },
        ) else {
            return;
        };
        state.last_seen_ns = state.last_seen_ns.max(*ts_ns);
        let failover = error.as_deref().and_then(failover_error);
        if let Some(slot) = state.seconds.at(ts_ns / NS_PER_S) {
            slot.requests += 1;
            slot.errors += u64::from(failover.is_some());
        }
        let burst = &mut state.burst;
        burst.requests += 1;
        let Some(word) = failover else {
            return;
        };
        if burst.by_error.is_empty() {
            burst.first_ns = *ts_ns;
        }
        burst.first_ns = burst.first_ns.min(*ts_ns);
        burst.last_ns = burst.last_ns.max(*ts_ns);
        *burst.by_error.entry(word).or_default() += 1;
        burst.workloads.add(workload, 1, *ts_ns);
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let now_s = now_ns / NS_PER_S;
        let window_s = self.window_s;
        let from_s = now_s.saturating_sub(window_s) + 1;
        let window_ns = window_s * NS_PER_S;
        let (config, resolve_after_ns) = (&self.config, self.resolve_after_ns);
        self.endpoints.retain(|&endpoint, state| {
            let errors: u64 = state
                .seconds
                .range(from_s, now_s + 1)
                .map(|c| c.errors)
                .sum();
            // Fires on a burst, stays on while any failover reply comes.
            let needed = if state.lifecycle.is_firing() {
                1
            } else {
                config.min_count.max(1)
            };
            let condition = (errors >= needed).then_some(state.burst.first_ns);
            let transition = state.lifecycle.update(condition, now_ns, resolve_after_ns);
            match transition {
                Some(Transition::Fired { started_ns }) => {
                    alerts.push(alert(endpoint, &state.burst, started_ns, None));
                }
                Some(Transition::Resolved { started_ns, .. }) => {
                    // The burst ended with its last failover reply.
                    let ended_ns = state.burst.last_ns.max(started_ns);
                    alerts.push(alert(endpoint, &state.burst, started_ns, Some(ended_ns)));
                    state.burst = Burst::default();
                }
                None => {}
            }
            if !state.lifecycle.is_firing() && errors == 0 {
                // Scattered replies that never made a burst start over.
                state.burst = Burst::default();
            }
            state.lifecycle.is_firing() || state.last_seen_ns + window_ns >= now_ns
        });
    }

    fn untracked(&self) -> u64 {
        self.endpoints.untracked()
    }
}

fn alert(endpoint: SocketAddr, burst: &Burst, started_ns: u64, ended_ns: Option<u64>) -> Alert {
    let workloads = burst.workloads.top();
    let errors = burst.errors();
    let error_fraction = if burst.requests > 0 {
        errors as f64 / burst.requests as f64
    } else {
        0.0
    };
    let by_error: serde_json::Map<String, serde_json::Value> = burst
        .by_error
        .iter()
        .map(|(word, n)| (word.to_string(), json!(n)))
        .collect();
    let mut evidence = evidence(json!({
        "errors": by_error,
        "requests": burst.requests,
        "error_fraction": round3(error_fraction),
        "workloads_affected": burst.workloads.affected(),
    }));
    let (state, message) = match ended_ns {
        None => (
            AlertState::Firing,
            format!(
                "failover or resharding at {endpoint}: {} in {} s ({:.0}% of requests), \
                 seen by {}",
                burst.summary(),
                seconds(burst.last_ns.saturating_sub(burst.first_ns)),
                error_fraction * 100.0,
                workload_names(&workloads)
            ),
        ),
        Some(ended_ns) => {
            let recover_s = seconds(ended_ns.saturating_sub(started_ns));
            evidence.insert("time_to_recover_s".into(), json!(recover_s));
            (
                AlertState::Resolved,
                format!(
                    "{endpoint} recovered: failover replies for {recover_s} s ({})",
                    burst.summary()
                ),
            )
        }
    };
    Alert {
        kind: "error_replies",
        id: format!("error_replies/{endpoint}"),
        state,
        severity: burst.severity(),
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
    use crate::{detect::testing::*, workload::Workload};

    fn detector() -> ErrorReplies {
        ErrorReplies::new(ErrorRepliesConfig::default(), 10 * S)
    }

    /// 100 requests per second from `workload`; those in `failing` seconds
    /// get `error`.
    fn traffic(
        workload: &Workload,
        seconds: std::ops::Range<u64>,
        failing: std::ops::Range<u64>,
        error: &str,
    ) -> Vec<Observation> {
        seconds
            .flat_map(|s| spread(T0 + s * S, 100).map(move |ts| (s, ts)))
            .map(|(s, ts)| {
                let error = failing.contains(&s).then_some(error);
                request(ts, workload, redis(9), error)
            })
            .collect()
    }

    #[test]
    fn a_failover_fires_and_its_resolution_reports_the_time_to_recover() {
        // The primary goes: LOADING from 20 s to 35 s, then served again.
        let stream = traffic(&pod(1), 0..90, 20..35, "LOADING");
        let alerts = run(&mut detector(), stream, T0 + 90 * S);
        assert_fired_and_resolved_once(&alerts);
        let (fired_at, firing) = &alerts[0];
        assert_eq!(*fired_at / S, T0 / S + 21);
        assert_eq!(firing.severity, Severity::Critical);
        assert_eq!(firing.started_ns, T0 + 20 * S);
        let resolved = &alerts[1].1;
        // The last LOADING came at 34.99 s.
        assert_eq!(resolved.ended_ns, Some(T0 + 34 * S + 990 * MS));
        assert_eq!(number(resolved, "time_to_recover_s"), 14.99);
        assert_eq!(resolved.evidence["errors"]["LOADING"], 1_500);
        assert!(
            resolved.message.contains("recovered"),
            "{}",
            resolved.message
        );
    }

    #[test]
    fn a_few_moved_replies_after_a_reshard_are_normal() {
        let mut stream = traffic(&pod(1), 0..60, 0..0, "MOVED");
        for i in 0..4 {
            stream.push(request(
                T0 + 30 * S + i * MS,
                &pod(2),
                redis(9),
                Some("MOVED"),
            ));
        }
        // And errors that are not failovers.
        stream.extend((0..50).map(|i| request(T0 + i * S, &pod(2), redis(9), Some("WRONGTYPE"))));
        assert_eq!(run(&mut detector(), stream, T0 + 60 * S), vec![]);
    }

    #[test]
    fn moved_bursts_are_info() {
        let stream = traffic(&pod(1), 0..40, 10..12, "MOVED");
        let alerts = run(&mut detector(), stream, T0 + 40 * S);
        assert_fired_and_resolved_once(&alerts);
        assert_eq!(alerts[0].1.severity, Severity::Info);
    }
}
