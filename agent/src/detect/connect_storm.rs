//! `connect_storm`: new connection attempts per second to a Redis endpoint,
//! node-wide and per workload, far above normal for several whole seconds —
//! pods reconnecting in a loop, a pool without keep-alive, a fleet
//! reconnecting at once after a failover.
//!
//! A storm is a rate held for `sustain` whole seconds, every one of them
//! above the threshold: a pool's start-up burst (50 connects in 100 ms)
//! fills one second, never three. The threshold is the absolute
//! `rate_per_s` or, once a key has `baseline_warmup` of history,
//! `baseline_factor` × its usual rate (EWMA, never below
//! `baseline_floor_per_s`) — for the endpoint's node-wide rate and for each
//! workload's own. Seconds inside the detection window and seconds of a storm
//! do not feed the baseline (a storm would hide itself), unless the storm has
//! lasted a whole `baseline_halflife`: then it is the new normal.

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use agent_common::ConnectOutcome;
use rustc_hash::FxHashMap;
use serde_json::json;

use super::{
    Alert, AlertState, Detector, NS_PER_S, Observation, Severity,
    counters::{BoundedMap, SecondRing},
    evidence,
    lifecycle::{Lifecycle, Transition},
    round3, top_workloads, workload_names,
};
use crate::workload::Workload;

pub const DEFAULT_RATE_PER_S: f64 = 100.0;
pub const DEFAULT_SUSTAIN: Duration = Duration::from_secs(3);
pub const DEFAULT_BASELINE_FACTOR: f64 = 10.0;
pub const DEFAULT_BASELINE_FLOOR_PER_S: f64 = 20.0;
pub const DEFAULT_BASELINE_HALFLIFE: Duration = Duration::from_secs(300);
pub const DEFAULT_BASELINE_WARMUP: Duration = Duration::from_secs(60);
pub const DEFAULT_FLEET_WORKLOADS: usize = 3;

/// Endpoints tracked at most.
pub const MAX_ENDPOINTS: usize = 1024;
/// (workload, endpoint) pairs tracked at most, over all endpoints.
pub const MAX_PAIRS: usize = 4096;
/// A key without a connect attempt for this long is forgotten, baseline
/// included (a workload that comes back starts a new warm-up).
const IDLE_EVICT_S: u64 = 600;
/// Longest `sustain` honoured (the per-second ring is sized by it).
const MAX_SUSTAIN_S: u64 = 60;

#[derive(Clone, Debug)]
pub struct ConnectStormConfig {
    /// Connect attempts per second to one endpoint, node-wide, that make a
    /// storm when held for `sustain` (`DEFAULT_RATE_PER_S`: 100).
    pub rate_per_s: f64,
    /// How long the rate must stay above its threshold, every whole second
    /// of it (`DEFAULT_SUSTAIN`: 3 s; at most 60 s).
    pub sustain: Duration,
    /// A rate this many times its usual (EWMA baseline) is a storm too,
    /// node-wide or for one workload (`DEFAULT_BASELINE_FACTOR`: 10).
    pub baseline_factor: f64,
    /// … provided it is at least this many attempts per second: a quiet
    /// workload reconnecting a few times is not a storm
    /// (`DEFAULT_BASELINE_FLOOR_PER_S`: 20).
    pub baseline_floor_per_s: f64,
    /// Half-life of the baseline (`DEFAULT_BASELINE_HALFLIFE`: 5 min).
    pub baseline_halflife: Duration,
    /// History a key needs before its baseline is trusted; until then only
    /// `rate_per_s` applies (`DEFAULT_BASELINE_WARMUP`: 60 s).
    pub baseline_warmup: Duration,
    /// Distinct workloads connecting during a storm that make it a fleet
    /// reconnecting at once, as after a failover (`DEFAULT_FLEET_WORKLOADS`: 3).
    pub fleet_workloads: usize,
}

impl Default for ConnectStormConfig {
    fn default() -> Self {
        Self {
            rate_per_s: DEFAULT_RATE_PER_S,
            sustain: DEFAULT_SUSTAIN,
            baseline_factor: DEFAULT_BASELINE_FACTOR,
            baseline_floor_per_s: DEFAULT_BASELINE_FLOOR_PER_S,
            baseline_halflife: DEFAULT_BASELINE_HALFLIFE,
            baseline_warmup: DEFAULT_BASELINE_WARMUP,
            fleet_workloads: DEFAULT_FLEET_WORKLOADS,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Attempts {
    attempts: u32,
    failures: u32,
}

/// Attempts per second of one key, and its usual rate.
#[derive(Debug)]
struct Rate {
    seconds: SecondRing<Attempts>,
    first_s: u64,
    last_seen_s: u64,
    /// Bias-corrected EWMA (`sum / weight`): a fair mean from the first
    /// seconds on, not a value creeping up from zero.
    sum: f64,
    weight: f64,
    /// Seconds before this one are in the baseline.
    folded_until_s: u64,
    /// The key's own rate is above its threshold since this second.
    storming_since_s: Option<u64>,
}

impl Rate {
    fn new(second: u64, ring_seconds: usize) -> Self {
        Self {
            seconds: SecondRing::new(ring_seconds),
            first_s: second,
            last_seen_s: second,
            sum: 0.0,
            weight: 0.0,
            folded_until_s: second,
            storming_since_s: None,
        }
    }

    fn record(&mut self, second: u64, failed: bool) {
        self.last_seen_s = self.last_seen_s.max(second);
        if let Some(slot) = self.seconds.at(second) {
            slot.attempts += 1;
            slot.failures += u32::from(failed);
        }
    }

    fn baseline(&self) -> f64 {
        if self.weight > 0.0 {
            self.sum / self.weight
        } else {
            0.0
        }
    }

    /// The threshold above which this key storms at `now_s`; `absolute`:
    /// the rate that is a storm whatever the baseline (node-wide only).
    fn threshold(&self, config: &Tuning, now_s: u64, absolute: Option<f64>) -> Option<f64> {
        let warm = now_s.saturating_sub(self.first_s) >= config.warmup_s;
        let relative = warm.then(|| (config.factor * self.baseline()).max(config.floor_per_s));
        let threshold = match (absolute, relative) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        };
        // A storm takes at least one attempt a second, whatever the flags say.
        threshold.map(|t| t.max(1.0))
    }

    /// Every second of `from..to` at or above `threshold`.
    fn held(&self, from: u64, to: u64, threshold: f64) -> bool {
        self.seconds
            .range(from, to)
            .all(|s| f64::from(s.attempts) >= threshold)
    }

    fn totals(&self, from: u64, to: u64) -> Attempts {
        self.seconds
            .range(from, to)
            .fold(Attempts::default(), |sum, s| Attempts {
                attempts: sum.attempts + s.attempts,
                failures: sum.failures + s.failures,
            })
    }

    /// Folds the seconds before `until_s` into the baseline — not while the
    /// key storms, unless it has for a whole half-life.
    fn fold(&mut self, until_s: u64, config: &Tuning) {
        if until_s <= self.folded_until_s {
            return;
        }
        let learning = self
            .storming_since_s
            .is_none_or(|since| until_s.saturating_sub(since) >= config.halflife_s);
        if learning {
            let keep = 1.0 - config.alpha;
            for second in self.folded_until_s..until_s {
                let attempts = f64::from(self.seconds.get(second).attempts);
                self.sum = self.sum * keep + config.alpha * attempts;
                self.weight = self.weight * keep + config.alpha;
            }
        }
        self.folded_until_s = until_s;
    }
}

/// The configuration in the units evaluation works in.
#[derive(Debug)]
struct Tuning {
    absolute_per_s: f64,
    sustain_s: u64,
    factor: f64,
    floor_per_s: f64,
    halflife_s: u64,
    warmup_s: u64,
    /// EWMA weight of one second.
    alpha: f64,
    fleet_workloads: usize,
}

#[derive(Debug)]
struct EndpointState {
    total: Rate,
    workloads: FxHashMap<Arc<str>, (Workload, Rate)>,
    lifecycle: Lifecycle,
    incident: Incident,
}

/// What a firing storm has added up to, for its `resolved` event.
#[derive(Debug, Default)]
struct Incident {
    attempts: u64,
    failures: u64,
    peak_per_s: u32,
    /// Last second whose count went into `peak_per_s`.
    peak_until_s: u64,
    workloads: Vec<Workload>,
    workload_keys: HashSet<Arc<str>>,
    severity: Option<Severity>,
}

pub struct ConnectStorm {
    tuning: Tuning,
    resolve_after_ns: u64,
    endpoints: BoundedMap<SocketAddr, EndpointState>,
    pairs: usize,
    untracked_pairs: u64,
}

impl ConnectStorm {
    pub fn new(config: ConnectStormConfig, resolve_after_ns: u64) -> Self {
        let halflife_s = config.baseline_halflife.as_secs().max(1);
        Self {
            tuning: Tuning {
                absolute_per_s: config.rate_per_s,
                sustain_s: config.sustain.as_secs().clamp(1, MAX_SUSTAIN_S),
                factor: config.baseline_factor,
                floor_per_s: config.baseline_floor_per_s,
                halflife_s,
                warmup_s: config.baseline_warmup.as_secs(),
                alpha: 1.0 - 0.5f64.powf(1.0 / halflife_s as f64),
                fleet_workloads: config.fleet_workloads.max(2),
            },
            resolve_after_ns,
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
            pairs: 0,
            untracked_pairs: 0,
        }
    }

    /// Seconds the rings hold: the window, the second being filled, and
    /// the one waiting to be folded.
    fn ring_seconds(&self) -> usize {
        self.tuning.sustain_s as usize + 3
    }

    fn evaluate_endpoint(
        tuning: &Tuning,
        resolve_after_ns: u64,
        endpoint: SocketAddr,
        state: &mut EndpointState,
        now_ns: u64,
        alerts: &mut Vec<Alert>,
    ) {
        let now_s = now_ns / NS_PER_S;
        // The last `sustain` whole seconds; the current one is still filling.
        let from_s = now_s.saturating_sub(tuning.sustain_s);
        let node_threshold = state
            .total
            .threshold(tuning, now_s, Some(tuning.absolute_per_s))
            .unwrap_or(tuning.absolute_per_s);
        let node_storm = state.total.held(from_s, now_s, node_threshold);
        mark_storming(&mut state.total, node_storm, from_s);
        let mut workload_storm = None;
        for (workload, rate) in state.workloads.values_mut() {
            let storm = rate
                .threshold(tuning, now_s, None)
                .filter(|&threshold| rate.held(from_s, now_s, threshold));
            mark_storming(rate, storm.is_some(), from_s);
            if let Some(threshold) = storm {
                workload_storm.get_or_insert((workload.clone(), threshold));
            }
        }
        let condition = (node_storm || workload_storm.is_some()).then_some(from_s * NS_PER_S);
        let transition = state.lifecycle.update(condition, now_ns, resolve_after_ns);
        if state.lifecycle.is_firing() {
            let last = state.total.seconds.get(now_s.saturating_sub(1)).attempts;
            if now_s > state.incident.peak_until_s {
                state.incident.peak_per_s = state.incident.peak_per_s.max(last);
                state.incident.peak_until_s = now_s;
            }
        }
        match transition {
            Some(Transition::Fired { started_ns }) => {
                let trigger = if node_storm { None } else { workload_storm };
                alerts.push(fired(
                    tuning,
                    endpoint,
                    state,
                    (from_s, now_s),
                    node_threshold,
                    trigger,
                    started_ns,
                ));
            }
            Some(Transition::Resolved {
                started_ns,
                ended_ns,
            }) => {
                let incident = std::mem::take(&mut state.incident);
                alerts.push(resolved(endpoint, incident, started_ns, ended_ns));
            }
            None => {}
        }
        // The window's seconds join the baseline once they leave it.
        state.total.fold(from_s, tuning);
        for (_, rate) in state.workloads.values_mut() {
            rate.fold(from_s, tuning);
        }
    }
}

fn mark_storming(rate: &mut Rate, storming: bool, from_s: u64) {
    if !storming {
        rate.storming_since_s = None;
    } else if rate.storming_since_s.is_none() {
        rate.storming_since_s = Some(from_s);
    }
}

fn fired(
    tuning: &Tuning,
    endpoint: SocketAddr,
    state: &mut EndpointState,
    (from_s, now_s): (u64, u64),
    node_threshold: f64,
    workload_trigger: Option<(Workload, f64)>,
    started_ns: u64,
) -> Alert {
    let window_s = (now_s - from_s).max(1) as f64;
    // Everything seen since the window started, the current second included:
    // later attempts are added as they are observed.
    let totals = state.total.totals(from_s, now_s + 1);
    let connecting: Vec<(&Workload, u64)> = state
        .workloads
        .values()
        .map(|(w, rate)| (w, u64::from(rate.totals(from_s, now_s).attempts)))
        .filter(|(_, attempts)| *attempts > 0)
        .collect();
    let workloads = top_workloads(connecting.iter().copied());
    let rates: serde_json::Map<String, serde_json::Value> = workloads
        .iter()
        .map(|w| {
            let attempts = connecting
                .iter()
                .find(|(c, _)| c.key == w.key)
                .map_or(0, |(_, a)| *a);
            (w.key.to_string(), json!(round3(attempts as f64 / window_s)))
        })
        .collect();
    let window = state.total.totals(from_s, now_s);
    let rate_per_s = f64::from(window.attempts) / window_s;
    let failure_fraction = if window.attempts > 0 {
        f64::from(window.failures) / f64::from(window.attempts)
    } else {
        0.0
    };
    let fleet = connecting.len() >= tuning.fleet_workloads;
    let severity = if failure_fraction >= 0.5 {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let (trigger, threshold, baseline) = match &workload_trigger {
        None if node_threshold < tuning.absolute_per_s => {
            ("baseline", node_threshold, state.total.baseline())
        }
        None => ("rate", node_threshold, state.total.baseline()),
        Some((workload, threshold)) => {
            let baseline = state
                .workloads
                .get(&workload.key)
                .map_or(0.0, |(_, rate)| rate.baseline());
            ("workload_baseline", *threshold, baseline)
        }
    };
    let mut message = format!(
        "connect storm to {endpoint}: {:.0} new connections/s for {window_s:.0} s \
         (threshold {threshold:.0}/s, usual {baseline:.1}/s), {:.0}% failing, from {}",
        rate_per_s,
        failure_fraction * 100.0,
        workload_names(&workloads),
    );
    if fleet {
        message.push_str(&format!(
            "; {} workloads reconnecting at once (a failover or restart?)",
            connecting.len()
        ));
    }
    state.incident = Incident {
        attempts: u64::from(totals.attempts),
        failures: u64::from(totals.failures),
        peak_per_s: state
            .total
            .seconds
            .range(from_s, now_s)
            .map(|s| s.attempts)
            .max()
            .unwrap_or(0),
        peak_until_s: now_s,
        workload_keys: workloads.iter().map(|w| w.key.clone()).collect(),
        workloads: workloads.clone(),
        severity: Some(severity),
    };
    Alert {
        kind: "connect_storm",
        id: format!("connect_storm/{endpoint}"),
        state: AlertState::Firing,
        severity,
        message,
        endpoint: Some(endpoint),
        workloads,
        started_ns,
        ended_ns: None,
        evidence: evidence(json!({
            "trigger": trigger,
            "rate_per_s": round3(rate_per_s),
            "threshold_per_s": round3(threshold),
            "baseline_per_s": round3(baseline),
            "window_s": window_s,
            "attempts": window.attempts,
            "failures": window.failures,
            "failure_fraction": round3(failure_fraction),
            "workloads_connecting": connecting.len(),
            "fleet_reconnect": fleet,
            "workload_rates_per_s": rates,
        })),
    }
}

fn resolved(endpoint: SocketAddr, incident: Incident, started_ns: u64, ended_ns: u64) -> Alert {
    let duration_s = ended_ns.saturating_sub(started_ns) as f64 / NS_PER_S as f64;
    let failure_fraction = if incident.attempts > 0 {
        incident.failures as f64 / incident.attempts as f64
    } else {
        0.0
    };
    Alert {
        kind: "connect_storm",
        id: format!("connect_storm/{endpoint}"),
        state: AlertState::Resolved,
        severity: incident.severity.unwrap_or(Severity::Warning),
        message: format!(
            "connect storm to {endpoint} over after {duration_s:.0} s: {} connects \
             (peak {}/s), {:.0}% failed",
            incident.attempts,
            incident.peak_per_s,
            failure_fraction * 100.0
        ),
        endpoint: Some(endpoint),
        workloads: incident.workloads,
        started_ns,
        ended_ns: Some(ended_ns),
        evidence: evidence(json!({
            "attempts": incident.attempts,
            "failures": incident.failures,
            "failure_fraction": round3(failure_fraction),
            "peak_rate_per_s": incident.peak_per_s,
            "workloads_connecting": incident.workload_keys.len(),
        })),
    }
}

impl Detector for ConnectStorm {
    fn kind(&self) -> &'static str {
        "connect_storm"
    }

    fn observe(&mut self, observation: &Observation) {
        let Observation::Connect {
            ts_ns,
            workload,
            endpoint,
            outcome,
            ..
        } = observation
        else {
            return;
        };
        let second = ts_ns / NS_PER_S;
        let failed = *outcome != ConnectOutcome::Established;
        let ring_seconds = self.ring_seconds();
        let Some(state) = self.endpoints.get_or_insert(
            endpoint,
            || *endpoint,
            || EndpointState {
                total: Rate::new(second, ring_seconds),
                workloads: FxHashMap::default(),
                lifecycle: Lifecycle::default(),
                incident: Incident::default(),
            },
        ) else {
            return;
        };
        state.total.record(second, failed);
        if state.lifecycle.is_firing() {
            state.incident.attempts += 1;
            state.incident.failures += u64::from(failed);
            if state.incident.workloads.len() < super::MAX_ALERT_WORKLOADS
                && !state.incident.workload_keys.contains(&workload.key)
            {
                state.incident.workloads.push(workload.clone());
            }
            if state.incident.workload_keys.len() < MAX_PAIRS {
                state.incident.workload_keys.insert(workload.key.clone());
            }
        }
        if let Some((_, rate)) = state.workloads.get_mut(&workload.key) {
            rate.record(second, failed);
        } else if self.pairs < MAX_PAIRS {
            let mut rate = Rate::new(second, ring_seconds);
            rate.record(second, failed);
            state
                .workloads
                .insert(workload.key.clone(), (workload.clone(), rate));
            self.pairs += 1;
        } else {
            self.untracked_pairs += 1;
        }
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let now_s = now_ns / NS_PER_S;
        let mut removed_pairs = 0;
        self.endpoints.retain(|&endpoint, state| {
            Self::evaluate_endpoint(
                &self.tuning,
                self.resolve_after_ns,
                endpoint,
                state,
                now_ns,
                alerts,
            );
            let before = state.workloads.len();
            state.workloads.retain(|_, (_, rate)| {
                rate.storming_since_s.is_some() || now_s < rate.last_seen_s + IDLE_EVICT_S
            });
            removed_pairs += before - state.workloads.len();
            state.lifecycle.is_firing()
                || !state.workloads.is_empty()
                || now_s < state.total.last_seen_s + IDLE_EVICT_S
        });
        self.pairs -= removed_pairs;
    }

    fn untracked(&self) -> u64 {
        self.endpoints.untracked() + self.untracked_pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testing::*;

    fn detector() -> ConnectStorm {
        ConnectStorm::new(ConnectStormConfig::default(), 10 * S)
    }

    /// `per_second` established connects from `workload` in each second of
    /// `seconds` (offsets from `T0`).
    fn connects(
        workload: &Workload,
        seconds: std::ops::Range<u64>,
        per_second: u64,
        outcome: ConnectOutcome,
    ) -> Vec<Observation> {
        seconds
            .flat_map(|s| spread(T0 + s * S, per_second))
            .map(|ts| connect(ts, workload, redis(9), outcome, 200_000))
            .collect()
    }

    #[test]
    fn a_pod_at_200_connects_per_second_fires_once_naming_it_and_resolves_once() {
        let stream = connects(&pod(1), 5..10, 200, ConnectOutcome::Established);
        let alerts = run(&mut detector(), stream, T0 + 60 * S);
        assert_fired_and_resolved_once(&alerts);
        let (fired_at, firing) = &alerts[0];
        // Three whole seconds above 100/s: written at the third one's end.
        assert_eq!(*fired_at / S, (T0 + 8 * S) / S);
        assert_eq!(firing.severity, Severity::Warning);
        assert_eq!(firing.workloads.len(), 1);
        assert_eq!(firing.workloads[0].pod_uid.as_deref(), Some(&*pod_uid(1)));
        assert_eq!(number(firing, "rate_per_s"), 200.0);
        assert_eq!(number(firing, "failure_fraction"), 0.0);
        assert_eq!(firing.evidence["trigger"], "rate");
        assert!(firing.message.contains("pod:"), "{}", firing.message);
        let resolved = &alerts[1].1;
        assert_eq!(number(resolved, "attempts"), 1000.0);
        assert_eq!(number(resolved, "peak_rate_per_s"), 200.0);
        // Clear from the storm's last second on, resolved 10 s later.
        assert_eq!(resolved.ended_ns.unwrap() / S, (T0 + 11 * S) / S);
    }

    #[test]
    fn a_pool_start_up_burst_is_not_a_storm() {
        let mut stream = Vec::new();
        // redis-benchmark -c 50: 50 connects within 100 ms; a 500-connection
        // pool in one second; then the pools are kept.
        for ts in (0..50).map(|i| T0 + 2 * S + i * 2 * MS) {
            stream.push(established(ts, &pod(1), redis(9)));
        }
        stream.extend(connects(&pod(2), 20..21, 500, ConnectOutcome::Established));
        assert_eq!(run(&mut detector(), stream, T0 + 120 * S), vec![]);
    }

    #[test]
    fn steady_churn_at_its_usual_rate_never_fires() {
        // A pool that recycles connections all day: 60/s ± 20 %.
        let stream: Vec<Observation> = (0..600)
            .flat_map(|s| {
                let rate = 48 + (s * 7919) % 25;
                connects(&pod(1), s..s + 1, rate, ConnectOutcome::Established)
            })
            .collect();
        assert_eq!(run(&mut detector(), stream, T0 + 620 * S), vec![]);
    }

    #[test]
    fn a_workload_far_above_its_baseline_fires_below_the_absolute_rate() {
        // Another pod's steady 30/s keeps the node-wide rate unremarkable.
        let mut stream = connects(&pod(2), 0..160, 30, ConnectOutcome::Established);
        stream.extend(connects(&pod(1), 0..120, 2, ConnectOutcome::Established));
        stream.extend(connects(&pod(1), 120..126, 40, ConnectOutcome::Refused));
        let alerts = run(&mut detector(), stream, T0 + 160 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.workloads[0].pod_uid.as_deref(), Some(&*pod_uid(1)));
        assert_eq!(firing.evidence["trigger"], "workload_baseline");
        assert_eq!(number(firing, "baseline_per_s"), 2.0);
        assert_eq!(number(firing, "threshold_per_s"), 20.0);
        // 240 refused among 420 attempts in the window.
        assert_eq!(number(firing, "failure_fraction"), 0.571);
        assert_eq!(firing.severity, Severity::Critical);
    }

    #[test]
    fn a_new_workload_is_judged_by_the_absolute_rate_only() {
        // 60/s is 30 times nothing, but the pod has no history yet.
        let stream = connects(&pod(1), 0..20, 60, ConnectOutcome::Established);
        assert_eq!(run(&mut detector(), stream, T0 + 40 * S), vec![]);
    }

    #[test]
    fn many_workloads_reconnecting_at_once_are_named_a_fleet_reconnect() {
        let stream: Vec<Observation> = (1..=5)
            .flat_map(|n| connects(&pod(n), 10..14, 30, ConnectOutcome::Established))
            .collect();
        let alerts = run(&mut detector(), stream, T0 + 40 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.evidence["fleet_reconnect"], true);
        assert_eq!(number(firing, "workloads_connecting"), 5.0);
        assert_eq!(firing.workloads.len(), 5);
        assert!(
            firing.message.contains("5 workloads reconnecting at once"),
            "{}",
            firing.message
        );
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let mut storm = detector();
        let stream = (0..100u8)
            .map(|n| established(T0 + S, &pod(n), redis(n)))
            .collect();
        run(&mut storm, stream, T0 + 2 * S);
        assert_eq!((storm.endpoints.len(), storm.pairs), (100, 100));
        let mut alerts = Vec::new();
        storm.evaluate(T0 + (IDLE_EVICT_S + 2) * S, &mut alerts);
        assert_eq!((storm.endpoints.len(), storm.pairs), (0, 0));
    }
}
