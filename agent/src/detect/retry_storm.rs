//! `retry_storm`: one workload failing to connect to one endpoint again and
//! again at a regular interval — the signature of a client retrying behind
//! its connect timeout (aborted connects that each lasted ~2 s: a 2 s
//! `connect_timeout`), or of an immediate retry loop against a refusing
//! server. Estimates the interval, the attempts each logical request makes
//! and how long its caller waits in all.
//!
//! Attempts form a chain while each failed attempt starts within
//! `retry_gap` of the previous one's end; a success or a longer gap ends
//! the request. Concurrent callers in one workload merge into one chain
//! (the network cannot tell them apart): attempts per request is then an
//! upper bound.

use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};

use agent_common::ConnectOutcome;
use serde_json::json;

use super::{
    Alert, AlertState, Detector, NS_PER_S, Observation, Severity,
    counters::BoundedMap,
    evidence,
    lifecycle::{Lifecycle, Transition},
    round3, seconds,
};
use crate::workload::Workload;

pub const DEFAULT_MIN_FAILURES: u32 = 3;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_RETRY_GAP: Duration = Duration::from_secs(3);
pub const DEFAULT_REGULARITY: f64 = 0.25;

/// (workload, endpoint) pairs tracked at most.
pub const MAX_PAIRS: usize = 4096;
/// Failed attempts remembered per pair (the newest).
const MAX_ATTEMPTS: usize = 64;
/// Finished chains remembered per pair (the newest).
const MAX_CHAINS: usize = 16;
/// Intervals closer than this to the median are regular whatever their
/// relative spread (immediate retries take a few ms each).
const REGULAR_SLACK_NS: u64 = 50_000_000;
/// Failed attempts that lasted this long at the median waited for something
/// (a timeout): their duration is the interval. Shorter ones (refused) are
/// paced by the gaps between them.
const WAITED_NS: u64 = 100_000_000;

#[derive(Clone, Debug)]
pub struct RetryStormConfig {
    /// Failed connect attempts from one workload to one endpoint within
    /// `window` that can make a retry storm (`DEFAULT_MIN_FAILURES`: 3).
    pub min_failures: u32,
    /// How far back failed attempts are considered (`DEFAULT_WINDOW`: 60 s).
    pub window: Duration,
    /// A failed attempt that starts within this of the previous one's end
    /// is a retry of the same request (`DEFAULT_RETRY_GAP`: 3 s).
    pub retry_gap: Duration,
    /// Attempts are regular when two thirds of their intervals are within
    /// this fraction of the median interval (`DEFAULT_REGULARITY`: 0.25).
    pub regularity: f64,
}

impl Default for RetryStormConfig {
    fn default() -> Self {
        Self {
            min_failures: DEFAULT_MIN_FAILURES,
            window: DEFAULT_WINDOW,
            retry_gap: DEFAULT_RETRY_GAP,
            regularity: DEFAULT_REGULARITY,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    start_ns: u64,
    end_ns: u64,
    outcome: ConnectOutcome,
}

#[derive(Clone, Copy, Debug, Default)]
struct Chain {
    failures: u32,
    last_end_ns: u64,
}

#[derive(Clone, Copy, Debug)]
struct FinishedChain {
    ended_ns: u64,
    failures: u32,
    succeeded: bool,
}

#[derive(Debug)]
struct PairState {
    workload: Workload,
    failures: VecDeque<Attempt>,
    chain: Chain,
    finished: VecDeque<FinishedChain>,
    lifecycle: Lifecycle,
    /// Failed attempts since the alert fired, for its `resolved` event.
    incident_failures: u64,
    severity: Severity,
}

impl PairState {
    fn finish_chain(&mut self, ended_ns: u64, succeeded: bool) {
        if self.chain.failures == 0 {
            return;
        }
        if self.finished.len() == MAX_CHAINS {
            self.finished.pop_front();
        }
        self.finished.push_back(FinishedChain {
            ended_ns,
            failures: self.chain.failures,
            succeeded,
        });
        self.chain = Chain::default();
    }

    fn last_failure_ns(&self) -> Option<u64> {
        self.failures.iter().map(|a| a.end_ns).max()
    }
}

/// What the failed attempts in the window say.
#[derive(Debug)]
struct Pattern {
    failures: u32,
    interval_ns: u64,
    /// Where the interval came from: each attempt's `duration`, or the
    /// `gap` between attempt starts.
    interval_from: &'static str,
    regular: bool,
    longest_chain: u32,
    /// Attempts per logical request (failed ones, plus the success when
    /// the request got through), the median of finished chains; the current
    /// chain's failures when none finished.
    attempts_per_request: f64,
    failed_per_request: f64,
    /// Logical requests that ended (connected, or gave up) in the window:
    /// with none, the per-request figures are lower bounds.
    requests_finished: usize,
    any_succeeded: bool,
    outcomes: serde_json::Map<String, serde_json::Value>,
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

fn pattern(state: &PairState, retry_gap_ns: u64, regularity: f64) -> Option<Pattern> {
    if state.failures.is_empty() {
        return None;
    }
    let mut durations: Vec<u64> = state
        .failures
        .iter()
        .map(|a| a.end_ns.saturating_sub(a.start_ns))
        .collect();
    let median_duration = median(&mut durations);
    let (mut intervals, interval_from) = if median_duration >= WAITED_NS {
        (durations, "duration")
    } else {
        let mut starts: Vec<u64> = state.failures.iter().map(|a| a.start_ns).collect();
        starts.sort_unstable();
        let gaps = starts
            .windows(2)
            .map(|w| w[1] - w[0])
            .filter(|&gap| gap <= retry_gap_ns)
            .collect();
        (gaps, "gap")
    };
    let interval_ns = median(&mut intervals);
    let slack = ((interval_ns as f64 * regularity) as u64).max(REGULAR_SLACK_NS);
    let regular_count = intervals
        .iter()
        .filter(|&&i| i.abs_diff(interval_ns) <= slack)
        .count();
    let regular = !intervals.is_empty() && regular_count * 3 >= intervals.len() * 2;
    let longest_chain = state
        .finished
        .iter()
        .map(|c| c.failures)
        .chain([state.chain.failures])
        .max()
        .unwrap_or(0);
    let (attempts_per_request, failed_per_request) = if state.finished.is_empty() {
        let failed = f64::from(state.chain.failures);
        (failed, failed)
    } else {
        let mut attempts: Vec<u64> = state
            .finished
            .iter()
            .map(|c| u64::from(c.failures + u32::from(c.succeeded)))
            .collect();
        let mut failed: Vec<u64> = state
            .finished
            .iter()
            .map(|c| u64::from(c.failures))
            .collect();
        (median(&mut attempts) as f64, median(&mut failed) as f64)
    };
    let mut outcomes = serde_json::Map::new();
    for attempt in &state.failures {
        let name = attempt.outcome.name();
        let count = outcomes.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
        outcomes.insert(name.to_string(), json!(count + 1));
    }
    Some(Pattern {
        failures: state.failures.len() as u32,
        interval_ns,
        interval_from,
        regular,
        longest_chain,
        attempts_per_request,
        failed_per_request,
        requests_finished: state.finished.len(),
        any_succeeded: state.finished.iter().any(|c| c.succeeded),
        outcomes,
    })
}

pub struct RetryStorm {
    config: RetryStormConfig,
    window_ns: u64,
    retry_gap_ns: u64,
    resolve_after_ns: u64,
    pairs: BoundedMap<(Arc<str>, SocketAddr), PairState>,
}

impl RetryStorm {
    pub fn new(config: RetryStormConfig, resolve_after_ns: u64) -> Self {
        Self {
            window_ns: super::duration_ns(config.window),
            retry_gap_ns: super::duration_ns(config.retry_gap),
            config,
            resolve_after_ns,
            pairs: BoundedMap::new(MAX_PAIRS),
        }
    }
}

impl Detector for RetryStorm {
    fn kind(&self) -> &'static str {
        "retry_storm"
    }

    fn observe(&mut self, observation: &Observation) {
        let Observation::Connect {
            ts_ns,
            workload,
            endpoint,
            outcome,
            duration_ns,
            ..
        } = observation
        else {
            return;
        };
        let key = (workload.key.clone(), *endpoint);
        if *outcome == ConnectOutcome::Established {
            // Successes matter only to workloads that have been failing.
            if let Some(state) = self.pairs.get_mut(&key) {
                state.finish_chain(*ts_ns, true);
            }
            return;
        }
        let Some(state) = self.pairs.get_or_insert(
            &key,
            || key.clone(),
            || PairState {
                workload: workload.clone(),
                failures: VecDeque::new(),
                chain: Chain::default(),
                finished: VecDeque::new(),
                lifecycle: Lifecycle::default(),
                incident_failures: 0,
                severity: Severity::Warning,
            },
        ) else {
            return;
        };
        let start_ns = ts_ns.saturating_sub(*duration_ns);
        if state.chain.failures > 0 && start_ns > state.chain.last_end_ns + self.retry_gap_ns {
            let ended_ns = state.chain.last_end_ns;
            state.finish_chain(ended_ns, false);
        }
        state.chain.failures += 1;
        state.chain.last_end_ns = state.chain.last_end_ns.max(*ts_ns);
        if state.failures.len() == MAX_ATTEMPTS {
            state.failures.pop_front();
        }
        state.failures.push_back(Attempt {
            start_ns,
            end_ns: *ts_ns,
            outcome: *outcome,
        });
        if state.lifecycle.is_firing() {
            state.incident_failures += 1;
        }
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let horizon_ns = now_ns.saturating_sub(self.window_ns);
        let (config, retry_gap_ns, resolve_after_ns) =
            (&self.config, self.retry_gap_ns, self.resolve_after_ns);
        self.pairs.retain(|(_, endpoint), state| {
            while state
                .failures
                .front()
                .is_some_and(|a| a.end_ns < horizon_ns)
            {
                state.failures.pop_front();
            }
            while state
                .finished
                .front()
                .is_some_and(|c| c.ended_ns < horizon_ns)
            {
                state.finished.pop_front();
            }
            // A chain with no retry within the gap ended: its caller gave up.
            if state.chain.failures > 0 && now_ns > state.chain.last_end_ns + retry_gap_ns {
                let ended_ns = state.chain.last_end_ns;
                state.finish_chain(ended_ns, false);
            }
            let pattern = pattern(state, retry_gap_ns, config.regularity);
            let condition = pattern.as_ref().and_then(|p| {
                let storm = p.failures >= config.min_failures && p.longest_chain >= 2 && p.regular;
                // Still retrying: another failure would have come by now.
                let last = state.last_failure_ns()?;
                let recent = now_ns <= last + 2 * p.interval_ns + retry_gap_ns;
                (storm && recent).then(|| state.failures.front().map_or(last, |a| a.start_ns))
            });
            match state.lifecycle.update(condition, now_ns, resolve_after_ns) {
                Some(Transition::Fired { started_ns }) => {
                    if let Some(p) = &pattern {
                        state.severity = if p.any_succeeded {
                            Severity::Warning
                        } else {
                            Severity::Critical
                        };
                        state.incident_failures = u64::from(p.failures);
                        alerts.push(fired(*endpoint, state, p, started_ns));
                    }
                }
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                }) => alerts.push(resolved(
                    *endpoint,
                    state,
                    pattern.as_ref(),
                    started_ns,
                    ended_ns,
                )),
                None => {}
            }
            state.lifecycle.is_firing() || !state.failures.is_empty() || state.chain.failures > 0
        });
    }

    fn untracked(&self) -> u64 {
        self.pairs.untracked()
    }
}

/// `failed_per_request × interval`: how long a caller waits for its
/// connection or its error.
fn caller_wait_s(p: &Pattern) -> f64 {
    round3(p.failed_per_request * p.interval_ns as f64 / NS_PER_S as f64)
}

fn fired(endpoint: SocketAddr, state: &PairState, p: &Pattern, started_ns: u64) -> Alert {
    let interval_s = seconds(p.interval_ns);
    let caller_wait_s = caller_wait_s(p);
    let outcomes: Vec<&str> = p.outcomes.keys().map(String::as_str).collect();
    // Fired by the third failure of a first request, the figures are what
    // it has cost so far: its callers may well wait longer.
    let per_request = if p.requests_finished == 0 {
        format!(
            "no request finished yet: ≥{} attempts per request, callers wait ≥{caller_wait_s} s",
            p.attempts_per_request
        )
    } else {
        format!(
            "~{} attempts per request, callers wait ~{caller_wait_s} s",
            p.attempts_per_request
        )
    };
    Alert {
        kind: "retry_storm",
        id: format!("retry_storm/{endpoint}/{}", state.workload.key),
        state: AlertState::Firing,
        severity: state.severity,
        message: format!(
            "{} retries connects to {endpoint}: {} failed attempts ({}) every {interval_s} s, \
             {per_request}",
            state.workload.key,
            p.failures,
            outcomes.join(", "),
        ),
        endpoint: Some(endpoint),
        workloads: vec![state.workload.clone()],
        started_ns,
        ended_ns: None,
        evidence: evidence(json!({
            "failed_attempts": p.failures,
            "outcomes": p.outcomes,
            "interval_s": interval_s,
            "interval_from": p.interval_from,
            "attempts_per_request": p.attempts_per_request,
            "failed_attempts_per_request": p.failed_per_request,
            "longest_chain": p.longest_chain,
            "caller_wait_s": caller_wait_s,
            "requests_finished": p.requests_finished,
            "requests_succeeded": p.any_succeeded,
        })),
    }
}

/// `pattern`: the window's, now that every request in it has finished
/// (when its attempts are still within the window).
fn resolved(
    endpoint: SocketAddr,
    state: &PairState,
    pattern: Option<&Pattern>,
    started_ns: u64,
    ended_ns: u64,
) -> Alert {
    let duration_s = seconds(ended_ns.saturating_sub(started_ns));
    let mut message = format!(
        "{} stopped retrying connects to {endpoint} after {duration_s} s ({} failed attempts",
        state.workload.key, state.incident_failures
    );
    let mut facts = json!({ "failed_attempts": state.incident_failures });
    if let Some(p) = pattern.filter(|p| p.requests_finished > 0) {
        message.push_str(&format!(
            "; requests took ~{} attempts, callers waited ~{} s",
            p.attempts_per_request,
            caller_wait_s(p)
        ));
        facts["attempts_per_request"] = json!(p.attempts_per_request);
        facts["caller_wait_s"] = json!(caller_wait_s(p));
    }
    message.push(')');
    Alert {
        kind: "retry_storm",
        id: format!("retry_storm/{endpoint}/{}", state.workload.key),
        state: AlertState::Resolved,
        severity: state.severity,
        message,
        endpoint: Some(endpoint),
        workloads: vec![state.workload.clone()],
        started_ns,
        ended_ns: Some(ended_ns),
        evidence: evidence(facts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testing::*;

    fn detector() -> RetryStorm {
        RetryStorm::new(RetryStormConfig::default(), 10 * S)
    }

    /// A client with a 2 s connect timeout and 3 attempts per request,
    /// against dropped SYNs: requests start at `starts` (offsets from T0).
    fn timed_out_requests(starts: &[u64]) -> Vec<Observation> {
        starts
            .iter()
            .flat_map(|&start| {
                (1..=3).map(move |attempt| {
                    let ended = T0 + start * S + attempt * 2_001 * MS;
                    connect(
                        ended,
                        &pod(1),
                        redis(9),
                        ConnectOutcome::Aborted,
                        2_000 * MS,
                    )
                })
            })
            .collect()
    }

    #[test]
    fn aborted_connects_every_2_s_fire_by_the_third_attempt_and_resolve_once() {
        let stream = timed_out_requests(&[10, 17, 24]);
        let third_attempt_ns = T0 + 10 * S + 3 * 2_001 * MS;
        let alerts = run(&mut detector(), stream, T0 + 90 * S);
        assert_fired_and_resolved_once(&alerts);
        let (fired_at, firing) = &alerts[0];
        assert!(*fired_at <= third_attempt_ns + S, "fired late: {firing:#?}");
        assert_eq!(firing.workloads[0].pod_uid.as_deref(), Some(&*pod_uid(1)));
        assert_eq!(firing.severity, Severity::Critical);
        assert_eq!(number(firing, "interval_s"), 2.0);
        assert_eq!(firing.evidence["interval_from"], "duration");
        assert_eq!(number(firing, "attempts_per_request"), 3.0);
        assert_eq!(number(firing, "caller_wait_s"), 6.0);
        assert_eq!(firing.evidence["outcomes"]["aborted"], 3);
        assert_eq!(number(&alerts[1].1, "failed_attempts"), 9.0);
    }

    #[test]
    fn a_first_request_still_retrying_gives_lower_bounds_and_its_resolution_the_wait() {
        // One request, 6 attempts of 2 s (redis-py, 2 s connect timeout,
        // 5 retries): the alert fires by the third, mid-request.
        let stream = (1..=6)
            .map(|attempt| {
                connect(
                    T0 + 10 * S + attempt * 2_001 * MS,
                    &pod(1),
                    redis(9),
                    ConnectOutcome::Aborted,
                    2_000 * MS,
                )
            })
            .collect();
        let alerts = run(&mut detector(), stream, T0 + 60 * S);
        assert_fired_and_resolved_once(&alerts);
        let (firing, resolved) = (&alerts[0].1, &alerts[1].1);
        assert_eq!(firing.evidence["requests_finished"], 0);
        assert!(
            firing
                .message
                .contains("no request finished yet: ≥3 attempts"),
            "{}",
            firing.message
        );
        assert_eq!(number(resolved, "failed_attempts"), 6.0);
        assert_eq!(number(resolved, "attempts_per_request"), 6.0);
        assert_eq!(number(resolved, "caller_wait_s"), 12.0);
        assert!(
            resolved.message.contains("callers waited ~12 s"),
            "{}",
            resolved.message
        );
    }

    #[test]
    fn finished_requests_give_attempts_per_request() {
        // Two failed attempts, then the third connects: three attempts per
        // request, 4 s of waiting.
        let mut stream = Vec::new();
        for start in [10, 20, 30] {
            for attempt in 1..=2 {
                let ended = T0 + start * S + attempt * 2_001 * MS;
                stream.push(connect(
                    ended,
                    &pod(1),
                    redis(9),
                    ConnectOutcome::Aborted,
                    2_000 * MS,
                ));
            }
            stream.push(established(T0 + start * S + 4_100 * MS, &pod(1), redis(9)));
        }
        let alerts = run(&mut detector(), stream, T0 + 100 * S);
        assert_fired_and_resolved_once(&alerts);
        let firing = &alerts[0].1;
        assert_eq!(firing.severity, Severity::Warning, "requests get through");
        assert_eq!(number(firing, "attempts_per_request"), 3.0);
        assert_eq!(number(firing, "failed_attempts_per_request"), 2.0);
        assert_eq!(number(firing, "caller_wait_s"), 4.0);
    }

    #[test]
    fn immediate_retries_against_a_refusing_server_are_paced_by_their_gaps() {
        let stream = (0..10)
            .map(|i| {
                connect(
                    T0 + 5 * S + i * 500 * MS,
                    &pod(1),
                    redis(9),
                    ConnectOutcome::Refused,
                    100_000,
                )
            })
            .collect();
        let alerts = run(&mut detector(), stream, T0 + 60 * S);
        assert_fired_and_resolved_once(&alerts);
        assert_eq!(alerts[0].1.evidence["interval_from"], "gap");
        assert_eq!(number(&alerts[0].1, "interval_s"), 0.5);
    }

    #[test]
    fn isolated_failures_are_not_retries() {
        // A failed connect now and then, each on its own.
        let mut stream: Vec<Observation> = (0..6)
            .map(|i| {
                connect(
                    T0 + i * 20 * S,
                    &pod(1),
                    redis(9),
                    ConnectOutcome::Aborted,
                    2_000 * MS,
                )
            })
            .collect();
        // Two attempts and a success: a retry, but one.
        stream.push(connect(
            T0 + 130 * S,
            &pod(2),
            redis(9),
            ConnectOutcome::Refused,
            100_000,
        ));
        stream.push(connect(
            T0 + 131 * S,
            &pod(2),
            redis(9),
            ConnectOutcome::Refused,
            100_000,
        ));
        stream.push(established(T0 + 132 * S, &pod(2), redis(9)));
        // Healthy pools.
        stream.extend((0..200).map(|i| established(T0 + i * S, &pod(3), redis(9))));
        assert_eq!(run(&mut detector(), stream, T0 + 200 * S), vec![]);
    }

    #[test]
    fn irregular_failures_are_not_a_retry_pattern() {
        let durations_ms = [150, 1_900, 700, 4_000, 300];
        let mut ended = T0 + 5 * S;
        let stream = durations_ms
            .iter()
            .map(|&ms| {
                ended += ms * MS + 10 * MS;
                connect(ended, &pod(1), redis(9), ConnectOutcome::Aborted, ms * MS)
            })
            .collect();
        assert_eq!(run(&mut detector(), stream, T0 + 60 * S), vec![]);
    }
}
