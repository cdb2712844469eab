//! `retransmits`: data segments retransmitted on established Redis
//! connections, per endpoint, above a rate — packet loss on the path (a
//! saturated ENI, a noisy cross-AZ link, an overloaded node). A healthy
//! network retransmits almost never. When requests to the endpoint are
//! seen, the rate must also be a real share of them: a few retransmits
//! under heavy traffic are noise.
//!
//! Retransmit counts come as deltas per (workload, endpoint) when the
//! pipeline reads the connection map or a connection closes, so the rate
//! is taken over a `window` that spans several of those readings.

use std::{net::SocketAddr, time::Duration};

use serde_json::json;

use super::{
    Alert, AlertState, Detector, NS_PER_S, Observation, Severity,
    counters::{BoundedMap, SecondRing, WorkloadCounts},
    evidence,
    lifecycle::{Lifecycle, Transition},
    round3, seconds, workload_names,
};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
pub const DEFAULT_RATE_PER_S: f64 = 1.0;
pub const DEFAULT_PER_1000_REQUESTS: f64 = 10.0;

/// Endpoints tracked at most.
pub const MAX_ENDPOINTS: usize = 1024;
/// Longest `window` honoured (the per-second ring is sized by it).
const MAX_WINDOW_S: u64 = 600;

#[derive(Clone, Debug)]
pub struct RetransmitsConfig {
    /// Span over which retransmits are counted (`DEFAULT_WINDOW`: 30 s; at
    /// least 2 `--interval`s, at most 10 min).
    pub window: Duration,
    /// Retransmits per second to one endpoint that fire the alert
    /// (`DEFAULT_RATE_PER_S`: 1).
    pub rate_per_s: f64,
    /// … and, when requests to the endpoint are seen, retransmits per 1,000
    /// requests (`DEFAULT_PER_1000_REQUESTS`: 10, i.e. 1 %).
    pub per_1000_requests: f64,
}

impl Default for RetransmitsConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            rate_per_s: DEFAULT_RATE_PER_S,
            per_1000_requests: DEFAULT_PER_1000_REQUESTS,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    retransmits: u64,
    requests: u64,
}

#[derive(Debug)]
struct EndpointState {
    seconds: SecondRing<Counts>,
    /// Retransmits per workload since the alert fired (in the window, when
    /// quiet).
    workloads: WorkloadCounts,
    last_seen_ns: u64,
    lifecycle: Lifecycle,
    incident: Counts,
    peak_rate_per_s: f64,
}

pub struct Retransmits {
    config: RetransmitsConfig,
    window_s: u64,
    resolve_after_ns: u64,
    endpoints: BoundedMap<SocketAddr, EndpointState>,
}

impl Retransmits {
    pub fn new(config: RetransmitsConfig, resolve_after_ns: u64) -> Self {
        Self {
            window_s: config.window.as_secs().clamp(1, MAX_WINDOW_S),
            config,
            resolve_after_ns,
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
        }
    }

    fn endpoint(&mut self, endpoint: SocketAddr) -> Option<&mut EndpointState> {
        let ring_seconds = self.window_s as usize + 1;
        self.endpoints.get_or_insert(
            &endpoint,
            || endpoint,
            || EndpointState {
                seconds: SecondRing::new(ring_seconds),
                workloads: WorkloadCounts::default(),
                last_seen_ns: 0,
                lifecycle: Lifecycle::default(),
                incident: Counts::default(),
                peak_rate_per_s: 0.0,
            },
        )
    }
}

impl Detector for Retransmits {
    fn kind(&self) -> &'static str {
        "retransmits"
    }

    fn observe(&mut self, observation: &Observation) {
        match observation {
            Observation::Request {
                ts_ns, endpoint, ..
            } => {
                // Counted before any retransmit, or the first ones would
                // be measured against a fraction of the window's requests.
                let Some(state) = self.endpoint(*endpoint) else {
                    return;
                };
                state.last_seen_ns = state.last_seen_ns.max(*ts_ns);
                if let Some(slot) = state.seconds.at(ts_ns / NS_PER_S) {
                    slot.requests += 1;
                }
                if state.lifecycle.is_firing() {
                    state.incident.requests += 1;
                }
            }
            Observation::Retransmits {
                ts_ns,
                workload,
                endpoint,
                count,
            } if *count > 0 => {
                let Some(state) = self.endpoint(*endpoint) else {
                    return;
                };
                state.last_seen_ns = state.last_seen_ns.max(*ts_ns);
                if let Some(slot) = state.seconds.at(ts_ns / NS_PER_S) {
                    slot.retransmits += count;
                }
                if state.lifecycle.is_firing() {
                    state.incident.retransmits += count;
                }
                state.workloads.add(workload, *count, *ts_ns);
            }
            _ => {}
        }
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let now_s = now_ns / NS_PER_S;
        let window_s = self.window_s;
        let from_s = now_s.saturating_sub(window_s) + 1;
        let window_ns = window_s * NS_PER_S;
        let (config, resolve_after_ns) = (&self.config, self.resolve_after_ns);
        self.endpoints.retain(|&endpoint, state| {
            let window =
                state
                    .seconds
                    .range(from_s, now_s + 1)
                    .fold(Counts::default(), |sum, c| Counts {
                        retransmits: sum.retransmits + c.retransmits,
                        requests: sum.requests + c.requests,
                    });
            let rate_per_s = window.retransmits as f64 / window_s as f64;
            let per_1000 = (window.requests > 0)
                .then(|| window.retransmits as f64 * 1000.0 / window.requests as f64);
            let high = rate_per_s >= config.rate_per_s
                && per_1000.is_none_or(|p| p >= config.per_1000_requests);
            let condition =
                high.then(|| state.lifecycle.firing_since().unwrap_or(from_s * NS_PER_S));
            if state.lifecycle.is_firing() || high {
                state.peak_rate_per_s = state.peak_rate_per_s.max(rate_per_s);
            }
            if !state.lifecycle.is_firing() {
                // Quiet: contributors count what the window holds.
                state
                    .workloads
                    .forget_before(now_ns.saturating_sub(window_ns));
            }
            match state.lifecycle.update(condition, now_ns, resolve_after_ns) {
                Some(Transition::Fired { started_ns }) => {
                    state.incident = window;
                    let workloads = state.workloads.top();
                    let per_1000_text =
                        per_1000.map_or(String::new(), |p| format!(" ({p:.1} per 1000 requests)"));
                    alerts.push(Alert {
                        kind: "retransmits",
                        id: format!("retransmits/{endpoint}"),
                        state: AlertState::Firing,
                        severity: Severity::Warning,
                        message: format!(
                            "packet loss on connections to {endpoint}: {rate_per_s:.1} data \
                             retransmits/s over {window_s} s{per_1000_text}, from {}",
                            workload_names(&workloads)
                        ),
                        endpoint: Some(endpoint),
                        workloads,
                        started_ns,
                        ended_ns: None,
                        evidence: evidence(json!({
                            "retransmits": window.retransmits,
                            "rate_per_s": round3(rate_per_s),
                            "requests": window.requests,
                            "per_1000_requests": per_1000.map(round3),
                            "window_s": window_s,
                            "workloads_affected": state.workloads.affected(),
                        })),
                    });
                }
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                }) => {
                    let workloads = state.workloads.top();
                    alerts.push(Alert {
                        kind: "retransmits",
                        id: format!("retransmits/{endpoint}"),
                        state: AlertState::Resolved,
                        severity: Severity::Warning,
                        message: format!(
                            "retransmits on connections to {endpoint} back to normal after {} s \
                             ({} retransmits, peak {:.1}/s)",
                            seconds(ended_ns.saturating_sub(started_ns)),
                            state.incident.retransmits,
                            state.peak_rate_per_s
                        ),
                        endpoint: Some(endpoint),
                        workloads,
                        started_ns,
                        ended_ns: Some(ended_ns),
                        evidence: evidence(json!({
                            "retransmits": state.incident.retransmits,
                            "requests": state.incident.requests,
                            "peak_rate_per_s": round3(state.peak_rate_per_s),
                        })),
                    });
                    state.incident = Counts::default();
                    state.peak_rate_per_s = 0.0;
                }
                None => {}
            }
            state.lifecycle.is_firing() || state.last_seen_ns + window_ns >= now_ns
        });
    }

    fn untracked(&self) -> u64 {
        self.endpoints.untracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect::testing::*, workload::Workload};

    fn detector() -> Retransmits {
        Retransmits::new(RetransmitsConfig::default(), 10 * S)
    }

    /// `per_second` requests from `workload` during `seconds`.
    fn requests(
        workload: &Workload,
        seconds: std::ops::Range<u64>,
        per_second: u64,
    ) -> Vec<Observation> {
        seconds
            .flat_map(|s| spread(T0 + s * S, per_second))
            .map(|ts| request(ts, workload, redis(9), None))
            .collect()
    }

    #[test]
    fn lossy_connections_fire_and_resolve_once() {
        let mut stream = requests(&pod(1), 0..120, 100);
        // Read from the connection map every 10 s: 50 retransmits each time
        // from 20 s to 60 s.
        stream.extend((2..=6).map(|i| retransmits(T0 + i * 10 * S, &pod(1), redis(9), 50)));
        let alerts = run(&mut detector(), stream, T0 + 120 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.workloads[0].pod_uid.as_deref(), Some(&*pod_uid(1)));
        // The first reading alone: 50, against the 2,002 requests since
        // the traffic started 20 s before.
        assert_eq!(number(firing, "retransmits"), 50.0);
        assert_eq!(number(firing, "requests"), 2_002.0);
        assert_eq!(number(firing, "per_1000_requests"), 24.975);
        assert_eq!(number(&alerts[1].1, "retransmits"), 250.0);
    }

    #[test]
    fn a_few_retransmits_under_heavy_traffic_are_noise() {
        let mut stream = requests(&pod(1), 0..60, 5_000);
        stream.extend((1..=5).map(|i| retransmits(T0 + i * 10 * S, &pod(1), redis(9), 40)));
        assert_eq!(run(&mut detector(), stream, T0 + 60 * S), vec![]);
    }

    #[test]
    fn a_healthy_network_never_fires() {
        let mut stream = requests(&pod(1), 0..60, 1_000);
        // One retransmit a minute.
        stream.push(retransmits(T0 + 30 * S, &pod(1), redis(9), 1));
        assert_eq!(run(&mut detector(), stream, T0 + 60 * S), vec![]);
    }
}
