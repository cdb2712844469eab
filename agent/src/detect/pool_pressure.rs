//! `pool_pressure`: connection pools growing toward Redis' `maxclients`.
//! Two conditions, each its own alert:
//! - `rising`: a workload's open connections to an endpoint rose at every
//!   one of `rising_readings` consecutive gauge readings but a few, by at
//!   least `min_growth` in all — a pool that keeps opening connections
//!   (leak, slow Redis holding them busy, no upper bound);
//! - `maxclients_share`: the node's connections to one endpoint exceed
//!   `maxclients_share` of the server's `maxclients`: a few nodes like this
//!   one and new connections get `ERR max number of clients reached`.
//!
//! A pool that opens its connections at start-up and keeps them is one
//! step in one reading: never a rise over several.

use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use rustc_hash::FxHashMap;
use serde_json::json;

use super::{
    Alert, AlertState, Detector, Observation, Severity,
    counters::BoundedMap,
    evidence,
    lifecycle::{Lifecycle, Transition},
    round3, seconds, top_workloads, workload_names,
};
use crate::workload::Workload;

pub const DEFAULT_RISING_READINGS: usize = 6;
pub const DEFAULT_MIN_GROWTH: u64 = 20;
pub const DEFAULT_MAXCLIENTS: u64 = 10_000;
pub const DEFAULT_MAXCLIENTS_SHARE: f64 = 0.5;

/// (workload, endpoint) pairs tracked at most.
pub const MAX_PAIRS: usize = 4096;
/// Endpoints tracked at most.
pub const MAX_ENDPOINTS: usize = 1024;
/// Longest `rising_readings` honoured.
const MAX_READINGS: usize = 60;
/// A pair whose gauge has not been read for this long has gone (the
/// pipeline sends a last 0, but a reader may miss it).
const STALE_NS: u64 = 10 * 60 * 1_000_000_000;

#[derive(Clone, Debug)]
pub struct PoolPressureConfig {
    /// Consecutive open-connection readings (one per `--interval`) over
    /// which a pool must keep rising (`DEFAULT_RISING_READINGS`: 6, i.e. a
    /// minute at the default interval; 3 to 60).
    pub rising_readings: usize,
    /// … and by at least this many connections in all
    /// (`DEFAULT_MIN_GROWTH`: 20).
    pub min_growth: u64,
    /// The Redis servers' `maxclients` (`DEFAULT_MAXCLIENTS`: 10000, Redis'
    /// and ElastiCache's default).
    pub maxclients: u64,
    /// Share of `maxclients` this node's connections to one endpoint may
    /// hold before it is pressure (`DEFAULT_MAXCLIENTS_SHARE`: 0.5).
    pub maxclients_share: f64,
}

impl Default for PoolPressureConfig {
    fn default() -> Self {
        Self {
            rising_readings: DEFAULT_RISING_READINGS,
            min_growth: DEFAULT_MIN_GROWTH,
            maxclients: DEFAULT_MAXCLIENTS,
            maxclients_share: DEFAULT_MAXCLIENTS_SHARE,
        }
    }
}

#[derive(Debug)]
struct PairState {
    workload: Workload,
    /// The last readings, oldest first: (monotonic ns, open).
    readings: VecDeque<(u64, u64)>,
    lifecycle: Lifecycle,
    /// Open connections when the rise started.
    rise_from: u64,
    peak: u64,
}

impl PairState {
    fn open(&self) -> u64 {
        self.readings.back().map_or(0, |r| r.1)
    }

    /// `Some(start)` while the readings are a rise: never down, up at all
    /// steps but two (a reading may land before the pool's next connect),
    /// at least `min_growth` in all.
    fn rising(&self, readings: usize, min_growth: u64) -> Option<(u64, u64)> {
        if self.readings.len() < readings {
            return None;
        }
        let steps: Vec<(u64, u64)> = self
            .readings
            .iter()
            .zip(self.readings.iter().skip(1))
            .map(|(a, b)| (a.1, b.1))
            .collect();
        let never_down = steps.iter().all(|(a, b)| b >= a);
        let ups = steps.iter().filter(|(a, b)| b > a).count();
        let (first_ns, first) = self.readings[0];
        let growth = self.open().saturating_sub(first);
        (never_down && ups + 2 >= steps.len() && growth >= min_growth).then_some((first_ns, first))
    }
}

/// A node's open connections to one endpoint, and who holds them.
type Holders<'a> = (u64, Vec<(&'a Workload, u64)>);

#[derive(Debug, Default)]
struct EndpointState {
    lifecycle: Lifecycle,
    peak: u64,
}

pub struct PoolPressure {
    config: PoolPressureConfig,
    readings: usize,
    resolve_after_ns: u64,
    pairs: BoundedMap<(Arc<str>, SocketAddr), PairState>,
    endpoints: BoundedMap<SocketAddr, EndpointState>,
}

impl PoolPressure {
    pub fn new(config: PoolPressureConfig, resolve_after_ns: u64) -> Self {
        Self {
            readings: config.rising_readings.clamp(3, MAX_READINGS),
            config,
            resolve_after_ns,
            pairs: BoundedMap::new(MAX_PAIRS),
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
        }
    }

    fn limit(&self) -> u64 {
        (self.config.maxclients as f64 * self.config.maxclients_share).ceil() as u64
    }

    fn evaluate_rising(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let (readings, min_growth, resolve_after_ns) =
            (self.readings, self.config.min_growth, self.resolve_after_ns);
        self.pairs.retain(|(_, endpoint), pair| {
            let rise = pair.rising(readings, min_growth);
            if let Some((_, from)) = rise
                && !pair.lifecycle.is_firing()
            {
                pair.rise_from = from;
            }
            pair.peak = pair.peak.max(pair.open());
            let condition = rise.map(|(start_ns, _)| start_ns);
            match pair.lifecycle.update(condition, now_ns, resolve_after_ns) {
                Some(Transition::Fired { started_ns }) => {
                    let span_s = seconds(now_ns.saturating_sub(started_ns));
                    alerts.push(Alert {
                        kind: "pool_pressure",
                        id: format!("pool_pressure/{endpoint}/{}/rising", pair.workload.key),
                        state: AlertState::Firing,
                        severity: Severity::Warning,
                        message: format!(
                            "{}'s connections to {endpoint} keep rising: {} → {} over {span_s} s \
                             ({} readings)",
                            pair.workload.key,
                            pair.rise_from,
                            pair.open(),
                            pair.readings.len()
                        ),
                        endpoint: Some(*endpoint),
                        workloads: vec![pair.workload.clone()],
                        started_ns,
                        ended_ns: None,
                        evidence: evidence(json!({
                            "reason": "rising",
                            "open": pair.open(),
                            "open_before": pair.rise_from,
                            "readings": pair.readings.iter().map(|r| r.1).collect::<Vec<_>>(),
                            "span_s": span_s,
                        })),
                    });
                }
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                }) => {
                    alerts.push(Alert {
                        kind: "pool_pressure",
                        id: format!("pool_pressure/{endpoint}/{}/rising", pair.workload.key),
                        state: AlertState::Resolved,
                        severity: Severity::Warning,
                        message: format!(
                            "{}'s connections to {endpoint} stopped rising at {} (peak {}, \
                             from {})",
                            pair.workload.key,
                            pair.open(),
                            pair.peak,
                            pair.rise_from
                        ),
                        endpoint: Some(*endpoint),
                        workloads: vec![pair.workload.clone()],
                        started_ns,
                        ended_ns: Some(ended_ns),
                        evidence: evidence(json!({
                            "reason": "rising",
                            "open": pair.open(),
                            "open_before": pair.rise_from,
                            "peak_open": pair.peak,
                        })),
                    });
                    pair.peak = 0;
                }
                None => {}
            }
            let last_ns = pair.readings.back().map_or(0, |r| r.0);
            pair.lifecycle.is_firing() || (pair.open() > 0 && last_ns + STALE_NS > now_ns)
        });
    }

    fn evaluate_share(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let mut totals: FxHashMap<SocketAddr, Holders> = FxHashMap::default();
        for ((_, endpoint), pair) in self.pairs.iter() {
            let total = totals.entry(*endpoint).or_default();
            total.0 += pair.open();
            total.1.push((&pair.workload, pair.open()));
        }
        let limit = self.limit();
        let (maxclients, resolve_after_ns) = (self.config.maxclients, self.resolve_after_ns);
        for (endpoint, (open, _)) in &totals {
            if *open >= limit {
                self.endpoints
                    .get_or_insert(endpoint, || *endpoint, EndpointState::default);
            }
        }
        self.endpoints.retain(|endpoint, state| {
            let (open, holders) = totals
                .get(endpoint)
                .map_or((0, &[][..]), |(open, holders)| (*open, &holders[..]));
            state.peak = state.peak.max(open);
            let condition = (open >= limit).then_some(now_ns);
            let transition = state.lifecycle.update(condition, now_ns, resolve_after_ns);
            let workloads = top_workloads(holders.iter().copied());
            let share = round3(open as f64 / maxclients.max(1) as f64);
            match transition {
                Some(Transition::Fired { started_ns }) => alerts.push(Alert {
                    kind: "pool_pressure",
                    id: format!("pool_pressure/{endpoint}/maxclients_share"),
                    state: AlertState::Firing,
                    severity: if open >= maxclients {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                    message: format!(
                        "this node holds {open} connections to {endpoint}, {:.0}% of its \
                         maxclients {maxclients}; most from {}",
                        share * 100.0,
                        workload_names(&workloads)
                    ),
                    endpoint: Some(*endpoint),
                    workloads,
                    started_ns,
                    ended_ns: None,
                    evidence: evidence(json!({
                        "reason": "maxclients_share",
                        "open": open,
                        "maxclients": maxclients,
                        "share": share,
                        "limit": limit,
                        "workloads_holding": holders.len(),
                    })),
                }),
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                }) => alerts.push(Alert {
                    kind: "pool_pressure",
                    id: format!("pool_pressure/{endpoint}/maxclients_share"),
                    state: AlertState::Resolved,
                    severity: Severity::Warning,
                    message: format!(
                        "this node's connections to {endpoint} back under {limit}: {open} \
                         (peak {})",
                        state.peak
                    ),
                    endpoint: Some(*endpoint),
                    workloads,
                    started_ns,
                    ended_ns: Some(ended_ns),
                    evidence: evidence(json!({
                        "reason": "maxclients_share",
                        "open": open,
                        "peak_open": state.peak,
                        "maxclients": maxclients,
                        "limit": limit,
                    })),
                }),
                None => {}
            }
            state.lifecycle.is_firing()
        });
    }
}

impl Detector for PoolPressure {
    fn kind(&self) -> &'static str {
        "pool_pressure"
    }

    fn observe(&mut self, observation: &Observation) {
        let Observation::OpenConnections {
            ts_ns,
            workload,
            endpoint,
            open,
        } = observation
        else {
            return;
        };
        let key = (workload.key.clone(), *endpoint);
        if *open == 0 && self.pairs.get_mut(&key).is_none() {
            return;
        }
        let Some(pair) = self.pairs.get_or_insert(
            &key,
            || key.clone(),
            || PairState {
                workload: workload.clone(),
                readings: VecDeque::new(),
                lifecycle: Lifecycle::default(),
                rise_from: 0,
                peak: 0,
            },
        ) else {
            return;
        };
        if pair.readings.len() == self.readings {
            pair.readings.pop_front();
        }
        pair.readings.push_back((*ts_ns, *open));
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        self.evaluate_share(now_ns, alerts);
        self.evaluate_rising(now_ns, alerts);
    }

    fn untracked(&self) -> u64 {
        self.pairs.untracked() + self.endpoints.untracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testing::*;

    fn detector() -> PoolPressure {
        PoolPressure::new(PoolPressureConfig::default(), 10 * S)
    }

    /// One reading every 10 s from T0, the values given.
    fn readings(workload: &Workload, values: &[u64]) -> Vec<Observation> {
        values
            .iter()
            .enumerate()
            .map(|(i, &open)| open_connections(T0 + i as u64 * 10 * S, workload, redis(9), open))
            .collect()
    }

    #[test]
    fn a_pool_that_keeps_growing_fires_and_resolves_once_it_stops() {
        let mut values: Vec<u64> = (1..=8).map(|i| i * 10).collect();
        values.extend([80; 12]);
        let alerts = run(&mut detector(), readings(&pod(1), &values), T0 + 200 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.evidence["reason"], "rising");
        assert_eq!(number(firing, "open_before"), 10.0);
        assert_eq!(number(firing, "open"), 60.0);
        assert_eq!(firing.workloads[0].pod_uid.as_deref(), Some(&*pod_uid(1)));
        assert_eq!(number(&alerts[1].1, "peak_open"), 80.0);
    }

    #[test]
    fn a_pool_opened_at_start_up_and_kept_is_not_pressure() {
        let mut values = vec![50; 30];
        // Fluctuating around its size.
        values.extend([48, 52, 50, 49, 53, 51, 50, 52, 54, 50]);
        assert_eq!(
            run(&mut detector(), readings(&pod(1), &values), T0 + 400 * S),
            vec![]
        );
    }

    #[test]
    fn slow_small_growth_is_not_pressure() {
        let values: Vec<u64> = (0..20).map(|i| 10 + i / 2).collect();
        assert_eq!(
            run(&mut detector(), readings(&pod(1), &values), T0 + 200 * S),
            vec![]
        );
    }

    #[test]
    fn a_node_holding_half_of_maxclients_fires_once() {
        let mut stream = Vec::new();
        for n in 1..=3 {
            let mut values = vec![2_000; 6];
            values.extend([300; 6]);
            stream.extend(readings(&pod(n), &values));
        }
        let alerts = run(&mut detector(), stream, T0 + 130 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.evidence["reason"], "maxclients_share");
        assert_eq!(number(firing, "open"), 6_000.0);
        assert_eq!(number(firing, "share"), 0.6);
        assert_eq!(firing.workloads.len(), 3);
        assert_eq!(firing.severity, Severity::Warning);
    }

    #[test]
    fn gone_pairs_are_forgotten() {
        let mut pressure = detector();
        let mut stream = readings(&pod(1), &[5, 5]);
        stream.push(open_connections(T0 + 20 * S, &pod(1), redis(9), 0));
        run(&mut pressure, stream, T0 + 30 * S);
        assert_eq!(pressure.pairs.len(), 0);
    }
}
