//! `cross_zone_latency`: the price of an availability-zone hop, two ways.
//!
//! - **Slower across zones**: over each `window`, the p99 of an endpoint's
//!   requests from clients in another zone against the p99 of its requests
//!   from clients in its own zone. Fires when the cross-zone p99 is at least
//!   `factor` × the same-zone p99 *and* at least `margin` above it (set
//!   `factor` to 1 for a margin-only rule, `margin` to 0 for a factor-only
//!   one), naming the cross-zone workloads.
//! - **Mostly across zones**: a hot workload (at least `hot_requests_per_s`)
//!   whose Redis requests go mostly (`cross_fraction`) to another zone: each
//!   pays the hop, and on EKS the traffic is billed both ways.
//!
//! Zones come from `--zone` and `--zone-cidr` (`Locality`); with none
//! configured every request is `unknown_zone` and this detector is silent.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hdrhistogram::Histogram;
use serde_json::json;

use super::{
    Alert, AlertState, Detector, Observation, Severity,
    counters::{BoundedMap, WorkloadCounts},
    duration_ns, evidence,
    lifecycle::{Lifecycle, Transition},
    round3, workload_names,
};
use crate::{workload::Workload, zones::Locality};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_FACTOR: f64 = 2.0;
pub const DEFAULT_MARGIN: Duration = Duration::from_millis(1);
pub const DEFAULT_MIN_REQUESTS: u64 = 50;
pub const DEFAULT_HOT_REQUESTS_PER_S: u64 = 100;
pub const DEFAULT_CROSS_FRACTION: f64 = 0.8;

/// Endpoints (and workloads) tracked at most: each endpoint holds two
/// histograms of ~13 KiB.
pub const MAX_ENDPOINTS: usize = 256;
pub const MAX_WORKLOADS: usize = 4096;
/// Latencies recorded up to this; longer ones are clamped to it.
const MAX_LATENCY_US: u64 = 3_600_000_000;

#[derive(Clone, Debug)]
pub struct CrossZoneConfig {
    /// Span of each comparison (`DEFAULT_WINDOW`: 10 s).
    pub window: Duration,
    /// Cross-zone p99 ≥ `factor` × same-zone p99 … (`DEFAULT_FACTOR`: 2).
    pub factor: f64,
    /// … and ≥ same-zone p99 + `margin` (`DEFAULT_MARGIN`: 1 ms).
    pub margin: Duration,
    /// Requests needed on each side in a window to compare
    /// (`DEFAULT_MIN_REQUESTS`: 50).
    pub min_requests: u64,
    /// A workload is hot from this rate (`DEFAULT_HOT_REQUESTS_PER_S`: 100).
    pub hot_requests_per_s: u64,
    /// … and mostly cross-zone from this share (`DEFAULT_CROSS_FRACTION`:
    /// 0.8).
    pub cross_fraction: f64,
}

impl Default for CrossZoneConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            factor: DEFAULT_FACTOR,
            margin: DEFAULT_MARGIN,
            min_requests: DEFAULT_MIN_REQUESTS,
            hot_requests_per_s: DEFAULT_HOT_REQUESTS_PER_S,
            cross_fraction: DEFAULT_CROSS_FRACTION,
        }
    }
}

/// One window's comparison of an endpoint.
#[derive(Clone, Copy, Debug, Default)]
struct Comparison {
    same_p99_us: u64,
    cross_p99_us: u64,
    same_requests: u64,
    cross_requests: u64,
}

struct EndpointState {
    /// This window's latencies: [same zone, cross zone].
    latencies: [Histogram<u32>; 2],
    cross_workloads: WorkloadCounts,
    /// The last complete window's result while it held.
    holding: Option<Comparison>,
    /// When the condition first held in this incident.
    since_ns: u64,
    last_seen_ns: u64,
    lifecycle: Lifecycle,
    /// The alert's workloads, kept from the window that fired.
    workloads: Vec<Workload>,
    workloads_affected: u64,
}

#[derive(Debug, Default)]
struct WorkloadState {
    workload: Option<Workload>,
    /// This window's requests: all, and to other zones.
    requests: u64,
    cross: u64,
    /// Cross-zone requests by endpoint (a few endpoints per workload).
    by_endpoint: Vec<(SocketAddr, u64)>,
    /// The last complete window's numbers while it held.
    holding: Option<WorkloadWindow>,
    since_ns: u64,
    last_seen_ns: u64,
    lifecycle: Lifecycle,
}

/// A window in which a workload talked mostly across zones.
#[derive(Clone, Debug, Default)]
struct WorkloadWindow {
    requests: u64,
    cross: u64,
    /// Cross-zone requests by endpoint, busiest first.
    by_endpoint: Vec<(SocketAddr, u64)>,
}

/// Cross-zone endpoints remembered per workload.
const MAX_ENDPOINTS_PER_WORKLOAD: usize = 8;

pub struct CrossZoneLatency {
    config: CrossZoneConfig,
    window_ns: u64,
    margin_us: u64,
    resolve_after_ns: u64,
    /// Start of the current window (0: not started).
    window_start_ns: u64,
    endpoints: BoundedMap<SocketAddr, EndpointState>,
    workloads: BoundedMap<Arc<str>, WorkloadState>,
}

impl CrossZoneLatency {
    pub fn new(config: CrossZoneConfig, resolve_after_ns: u64) -> Self {
        Self {
            window_ns: duration_ns(config.window).max(1_000_000_000),
            margin_us: duration_ns(config.margin) / 1_000,
            config,
            resolve_after_ns,
            window_start_ns: 0,
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
            workloads: BoundedMap::new(MAX_WORKLOADS),
        }
    }

    fn histogram() -> Histogram<u32> {
        Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid histogram bounds")
    }

    /// The window ended: decide each key's condition for the next one.
    fn close_window(&mut self, now_ns: u64) {
        let config = &self.config;
        let (margin_us, window_ns) = (self.margin_us, self.window_ns);
        self.endpoints.retain(|_, state| {
            let [same, cross] = &state.latencies;
            let comparison = Comparison {
                same_p99_us: same.value_at_quantile(0.99),
                cross_p99_us: cross.value_at_quantile(0.99),
                same_requests: same.len(),
                cross_requests: cross.len(),
            };
            let enough = comparison.same_requests >= config.min_requests.max(1)
                && comparison.cross_requests >= config.min_requests.max(1);
            let slower = comparison.cross_p99_us as f64
                >= comparison.same_p99_us as f64 * config.factor
                && comparison.cross_p99_us >= comparison.same_p99_us + margin_us;
            let held = state.holding.is_some();
            state.holding = (enough && slower).then_some(comparison);
            if state.holding.is_some() {
                if !held {
                    state.since_ns = now_ns;
                }
                state.workloads = state.cross_workloads.top();
                state.workloads_affected = state.cross_workloads.affected();
            }
            state.latencies.iter_mut().for_each(Histogram::reset);
            state.cross_workloads = WorkloadCounts::default();
            state.lifecycle.is_firing() || state.last_seen_ns + 2 * window_ns >= now_ns
        });
        let window_s = (window_ns / 1_000_000_000).max(1);
        let hot = config.hot_requests_per_s.saturating_mul(window_s).max(1);
        self.workloads.retain(|_, state| {
            let mostly = state.requests >= hot
                && state.cross as f64 >= state.requests as f64 * config.cross_fraction;
            let held = state.holding.is_some();
            state.holding = mostly.then(|| {
                let mut by_endpoint = std::mem::take(&mut state.by_endpoint);
                by_endpoint.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
                WorkloadWindow {
                    requests: state.requests,
                    cross: state.cross,
                    by_endpoint,
                }
            });
            if state.holding.is_some() && !held {
                state.since_ns = now_ns;
            }
            state.requests = 0;
            state.cross = 0;
            state.by_endpoint.clear();
            state.lifecycle.is_firing() || state.last_seen_ns + 2 * window_ns >= now_ns
        });
    }
}

impl Detector for CrossZoneLatency {
    fn kind(&self) -> &'static str {
        "cross_zone_latency"
    }

    fn observe(&mut self, observation: &Observation) {
        let Observation::Request {
            ts_ns,
            workload,
            endpoint,
            latency_ns,
            timeout,
            locality,
            command,
            ..
        } = observation
        else {
            return;
        };
        let side = match locality {
            Locality::SameZone => 0,
            Locality::CrossZone => 1,
            Locality::UnknownZone => return,
        };
        if let Some(state) = self.workloads.get_or_insert(
            &workload.key,
            || workload.key.clone(),
            WorkloadState::default,
        ) {
            state.workload.get_or_insert_with(|| workload.clone());
            state.last_seen_ns = state.last_seen_ns.max(*ts_ns);
            state.requests += 1;
            if side == 1 {
                state.cross += 1;
                let known = state.by_endpoint.iter().position(|(e, _)| e == endpoint);
                match known {
                    Some(i) => state.by_endpoint[i].1 += 1,
                    None if state.by_endpoint.len() < MAX_ENDPOINTS_PER_WORKLOAD => {
                        state.by_endpoint.push((*endpoint, 1));
                    }
                    None => {}
                }
            }
        }
        // Timeouts and blocking commands say nothing about the hop.
        if *timeout || command.may_block() {
            return;
        }
        let Some(state) = self.endpoints.get_or_insert(
            endpoint,
            || *endpoint,
            || EndpointState {
                latencies: [Self::histogram(), Self::histogram()],
                cross_workloads: WorkloadCounts::default(),
                holding: None,
                since_ns: 0,
                last_seen_ns: 0,
                lifecycle: Lifecycle::default(),
                workloads: Vec::new(),
                workloads_affected: 0,
            },
        ) else {
            return;
        };
        state.last_seen_ns = state.last_seen_ns.max(*ts_ns);
        let latency_us = (latency_ns / 1_000).clamp(1, MAX_LATENCY_US);
        state.latencies[side].saturating_record(latency_us);
        if side == 1 {
            state.cross_workloads.add(workload, 1, *ts_ns);
        }
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        if self.window_start_ns == 0 {
            self.window_start_ns = now_ns;
        }
        if now_ns.saturating_sub(self.window_start_ns) >= self.window_ns {
            self.close_window(now_ns);
            self.window_start_ns = now_ns;
        }
        let (config, resolve_after_ns) = (&self.config, self.resolve_after_ns);
        for (endpoint, state) in self.endpoints.iter_mut() {
            let condition = state.holding.map(|_| state.since_ns);
            match state.lifecycle.update(condition, now_ns, resolve_after_ns) {
                Some(Transition::Fired { started_ns }) => {
                    let comparison = state.holding.unwrap_or_default();
                    alerts.push(slower_alert(
                        *endpoint, state, comparison, config, started_ns, None,
                    ));
                }
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                }) => {
                    alerts.push(slower_alert(
                        *endpoint,
                        state,
                        Comparison::default(),
                        config,
                        started_ns,
                        Some(ended_ns),
                    ));
                }
                None => {}
            }
        }
        for (_, state) in self.workloads.iter_mut() {
            let condition = state.holding.as_ref().map(|_| state.since_ns);
            match state.lifecycle.update(condition, now_ns, resolve_after_ns) {
                Some(Transition::Fired { started_ns }) => {
                    alerts.push(mostly_alert(state, config, started_ns, None));
                }
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                }) => {
                    alerts.push(mostly_alert(state, config, started_ns, Some(ended_ns)));
                }
                None => {}
            }
        }
    }

    fn untracked(&self) -> u64 {
        self.endpoints.untracked() + self.workloads.untracked()
    }
}

fn ms(us: u64) -> f64 {
    round3(us as f64 / 1_000.0)
}

fn slower_alert(
    endpoint: SocketAddr,
    state: &EndpointState,
    comparison: Comparison,
    config: &CrossZoneConfig,
    started_ns: u64,
    ended_ns: Option<u64>,
) -> Alert {
    let workloads = state.workloads.clone();
    let (alert_state, message, evidence) = match ended_ns {
        None => (
            AlertState::Firing,
            format!(
                "cross-zone requests to {endpoint} are slower: p99 {} ms vs {} ms from its own \
                 zone, from {}",
                ms(comparison.cross_p99_us),
                ms(comparison.same_p99_us),
                workload_names(&workloads)
            ),
            evidence(json!({
                "cross_zone_p99_ms": ms(comparison.cross_p99_us),
                "same_zone_p99_ms": ms(comparison.same_p99_us),
                "cross_zone_requests": comparison.cross_requests,
                "same_zone_requests": comparison.same_requests,
                "factor": config.factor,
                "margin_ms": round3(config.margin.as_secs_f64() * 1_000.0),
                "window_s": config.window.as_secs(),
                "workloads_affected": state.workloads_affected,
            })),
        ),
        Some(_) => (
            AlertState::Resolved,
            format!("cross-zone requests to {endpoint} are as fast as same-zone ones again"),
            evidence(json!({ "workloads_affected": state.workloads_affected })),
        ),
    };
    Alert {
        kind: "cross_zone_latency",
        id: format!("cross_zone_latency/{endpoint}"),
        state: alert_state,
        severity: Severity::Warning,
        message,
        endpoint: Some(endpoint),
        workloads,
        started_ns,
        ended_ns,
        evidence,
    }
}

fn mostly_alert(
    state: &WorkloadState,
    config: &CrossZoneConfig,
    started_ns: u64,
    ended_ns: Option<u64>,
) -> Alert {
    let workload = state.workload.clone().unwrap_or_else(Workload::unknown);
    let WorkloadWindow {
        requests,
        cross,
        by_endpoint,
    } = state.holding.clone().unwrap_or_default();
    let top_endpoint = by_endpoint.first().map(|(e, _)| *e);
    let (alert_state, message, evidence) = match ended_ns {
        None => {
            let share = if requests > 0 {
                cross as f64 / requests as f64
            } else {
                0.0
            };
            let endpoints: serde_json::Map<String, serde_json::Value> = by_endpoint
                .iter()
                .map(|(e, n)| (e.to_string(), json!(n)))
                .collect();
            (
                AlertState::Firing,
                format!(
                    "{} sends {:.0}% of its {} Redis requests/s to another zone",
                    workload.key,
                    share * 100.0,
                    requests / config.window.as_secs().max(1)
                ),
                evidence(json!({
                    "requests": requests,
                    "cross_zone_requests": cross,
                    "cross_zone_fraction": round3(share),
                    "window_s": config.window.as_secs(),
                    "endpoints": endpoints,
                })),
            )
        }
        Some(_) => (
            AlertState::Resolved,
            format!(
                "{} no longer sends most of its Redis requests to another zone",
                workload.key
            ),
            serde_json::Map::new(),
        ),
    };
    Alert {
        kind: "cross_zone_latency",
        id: format!("cross_zone_latency/{}/mostly_cross_zone", workload.key),
        state: alert_state,
        severity: Severity::Info,
        message,
        endpoint: top_endpoint,
        workloads: vec![workload],
        started_ns,
        ended_ns,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testing::*;

    fn detector() -> CrossZoneLatency {
        CrossZoneLatency::new(CrossZoneConfig::default(), 10 * S)
    }

    /// `per_s` GETs per second from `workload` over `seconds`, each taking
    /// `latency_us` (the seconds in `slow` take `slow_us`).
    fn traffic(
        workload: &Workload,
        locality: Locality,
        per_s: u64,
        seconds: std::ops::Range<u64>,
        latency_us: u64,
        slow: std::ops::Range<u64>,
        slow_us: u64,
    ) -> Vec<Observation> {
        let workload = workload.clone();
        seconds
            .flat_map(move |s| spread(T0 + s * S, per_s).map(move |ts| (s, ts)))
            .map(|(s, ts)| {
                let us = if slow.contains(&s) {
                    slow_us
                } else {
                    latency_us
                };
                timed_request(ts, &workload, redis(9), "GET", us * 1_000, false, locality)
            })
            .collect()
    }

    #[test]
    fn a_slower_far_pod_fires_names_it_and_resolves() {
        let near = pod(1);
        let far = pod(2);
        let mut stream = traffic(&near, Locality::SameZone, 50, 0..90, 300, 0..0, 0);
        // The far pod's path gets +3 ms from 20 s to 40 s.
        stream.extend(traffic(
            &far,
            Locality::CrossZone,
            20,
            0..90,
            900,
            20..40,
            3_900,
        ));
        let alerts = run(&mut detector(), stream, T0 + 90 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.kind, "cross_zone_latency");
        assert_eq!(firing.workloads, vec![far]);
        assert_eq!(firing.endpoint, Some(redis(9)));
        let cross_p99 = number(firing, "cross_zone_p99_ms");
        assert!((3.8..=4.0).contains(&cross_p99), "{cross_p99}");
        assert!(number(firing, "same_zone_p99_ms") < 0.31);
        // Caught within two windows of the delay, resolved within two
        // windows and the hold-down of its end.
        assert!(alerts[0].0 <= T0 + 40 * S, "{}", alerts[0].0);
        assert!(alerts[1].0 <= T0 + 70 * S, "{}", alerts[1].0);
    }

    #[test]
    fn a_small_or_sparse_difference_is_normal() {
        let mut stream = traffic(&pod(1), Locality::SameZone, 50, 0..60, 300, 0..0, 0);
        // Twice as slow but only 0.4 ms more: below the margin.
        stream.extend(traffic(
            &pod(2),
            Locality::CrossZone,
            20,
            0..60,
            700,
            0..0,
            0,
        ));
        // Far pods with no zone configured are never compared.
        stream.extend(traffic(
            &pod(4),
            Locality::UnknownZone,
            200,
            0..60,
            9_000,
            0..0,
            0,
        ));
        assert_eq!(run(&mut detector(), stream, T0 + 60 * S), vec![]);

        // Much slower, but 2 requests a second: too few to compare.
        let mut sparse = traffic(&pod(1), Locality::SameZone, 50, 0..60, 300, 0..0, 0);
        sparse.extend(traffic(
            &pod(3),
            Locality::CrossZone,
            2,
            0..60,
            9_000,
            0..0,
            0,
        ));
        assert_eq!(run(&mut detector(), sparse, T0 + 60 * S), vec![]);
    }

    #[test]
    fn a_hot_workload_talking_mostly_across_zones_is_named() {
        let stream = traffic(&pod(5), Locality::CrossZone, 150, 0..40, 900, 0..0, 0);
        let alerts = run(&mut detector(), stream, T0 + 70 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.severity, Severity::Info);
        assert_eq!(firing.workloads, vec![pod(5)]);
        assert_eq!(number(firing, "cross_zone_fraction"), 1.0);
        assert!(firing.message.contains("100%"), "{}", firing.message);
    }
}
