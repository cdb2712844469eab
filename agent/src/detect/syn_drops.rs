//! `syn_drops`: connect attempts to an endpoint whose SYNs got no answer at
//! all — no SYN-ACK, no RST, no ICMP — and that ended in the kernel's SYN
//! timeout or the client's connect timeout. Something in the path drops them
//! silently: a security group, a network policy, conntrack, a full SYN
//! backlog. Fires on the first such attempt; names the endpoint and the
//! workloads affected.
//!
//! An attempt counts when it retransmitted its SYN (the `connect` event's
//! `path_drop_suspected`), or waited at least a second (the initial SYN
//! retransmission timeout) without an answer. Resolved once every affected
//! workload has connected again, or has had no unanswered attempt for
//! `quiet` (nobody tries any more: there is nothing left to say).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use agent_common::{ConnectOutcome, SynAnswer};
use rustc_hash::FxHashMap;
use serde_json::json;

use super::{
    Alert, AlertState, Detector, NS_PER_S, Observation, Severity,
    counters::BoundedMap,
    evidence,
    lifecycle::{Lifecycle, Transition},
    seconds, top_workloads, workload_names,
};
use crate::workload::Workload;

pub const DEFAULT_QUIET: Duration = Duration::from_secs(30);
pub const DEFAULT_CRITICAL_COUNT: u64 = 10;

/// Endpoints tracked at most (only those with unanswered attempts).
pub const MAX_ENDPOINTS: usize = 1024;
/// Affected workloads kept per endpoint (the rest are counted).
const MAX_WORKLOADS: usize = 64;
/// Waited this long without any answer: the first SYN's retransmission
/// timeout (`TCP_TIMEOUT_INIT`) has passed.
const UNANSWERED_NS: u64 = NS_PER_S;

#[derive(Clone, Debug)]
pub struct SynDropsConfig {
    /// An endpoint's alert stays on this long after its last unanswered
    /// attempt when nothing connects again (`DEFAULT_QUIET`: 30 s).
    pub quiet: Duration,
    /// Unanswered attempts (or 2+ workloads affected) that make the alert
    /// critical rather than a warning (`DEFAULT_CRITICAL_COUNT`: 10).
    pub critical_count: u64,
}

impl Default for SynDropsConfig {
    fn default() -> Self {
        Self {
            quiet: DEFAULT_QUIET,
            critical_count: DEFAULT_CRITICAL_COUNT,
        }
    }
}

#[derive(Debug)]
struct Affected {
    workload: Workload,
    unanswered: u64,
    last_unanswered_ns: u64,
    last_established_ns: u64,
}

#[derive(Debug, Default)]
struct EndpointState {
    workloads: FxHashMap<Arc<str>, Affected>,
    workloads_untracked: u64,
    unanswered: u64,
    timeouts: u64,
    aborted: u64,
    syn_retransmits: u64,
    first_unanswered_ns: u64,
    lifecycle: Lifecycle,
    severity: Option<Severity>,
}

impl EndpointState {
    /// A workload whose last unanswered attempt is recent and came after its
    /// last established connect.
    fn still_dropping(&self, now_ns: u64, quiet_ns: u64) -> bool {
        self.workloads.values().any(|a| {
            a.last_unanswered_ns > a.last_established_ns
                && now_ns <= a.last_unanswered_ns + quiet_ns
        })
    }
}

pub struct SynDrops {
    config: SynDropsConfig,
    quiet_ns: u64,
    resolve_after_ns: u64,
    endpoints: BoundedMap<SocketAddr, EndpointState>,
}

impl SynDrops {
    pub fn new(config: SynDropsConfig, resolve_after_ns: u64) -> Self {
        Self {
            quiet_ns: super::duration_ns(config.quiet),
            config,
            resolve_after_ns,
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
        }
    }
}

/// A failed attempt nothing answered, with the SYN given time to be answered.
pub fn unanswered(
    outcome: ConnectOutcome,
    answer: SynAnswer,
    syn_retransmits: u32,
    duration_ns: u64,
) -> bool {
    matches!(outcome, ConnectOutcome::Timeout | ConnectOutcome::Aborted)
        && answer == SynAnswer::None
        && (syn_retransmits > 0 || duration_ns >= UNANSWERED_NS)
}

impl Detector for SynDrops {
    fn kind(&self) -> &'static str {
        "syn_drops"
    }

    fn observe(&mut self, observation: &Observation) {
        let Observation::Connect {
            ts_ns,
            workload,
            endpoint,
            outcome,
            answer,
            syn_retransmits,
            duration_ns,
        } = observation
        else {
            return;
        };
        if *outcome == ConnectOutcome::Established {
            if let Some(state) = self.endpoints.get_mut(endpoint)
                && let Some(affected) = state.workloads.get_mut(&workload.key)
            {
                affected.last_established_ns = affected.last_established_ns.max(*ts_ns);
            }
            return;
        }
        if !unanswered(*outcome, *answer, *syn_retransmits, *duration_ns) {
            return;
        }
        let Some(state) =
            self.endpoints
                .get_or_insert(endpoint, || *endpoint, EndpointState::default)
        else {
            return;
        };
        if state.unanswered == 0 {
            state.first_unanswered_ns = ts_ns.saturating_sub(*duration_ns);
        }
        state.unanswered += 1;
        state.syn_retransmits += u64::from(*syn_retransmits);
        match outcome {
            ConnectOutcome::Timeout => state.timeouts += 1,
            _ => state.aborted += 1,
        }
        if let Some(affected) = state.workloads.get_mut(&workload.key) {
            affected.unanswered += 1;
            affected.last_unanswered_ns = affected.last_unanswered_ns.max(*ts_ns);
        } else if state.workloads.len() < MAX_WORKLOADS {
            state.workloads.insert(
                workload.key.clone(),
                Affected {
                    workload: workload.clone(),
                    unanswered: 1,
                    last_unanswered_ns: *ts_ns,
                    last_established_ns: 0,
                },
            );
        } else {
            state.workloads_untracked += 1;
        }
    }

    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>) {
        let (config, quiet_ns, resolve_after_ns) =
            (&self.config, self.quiet_ns, self.resolve_after_ns);
        self.endpoints.retain(|&endpoint, state| {
            let condition = state
                .still_dropping(now_ns, quiet_ns)
                .then_some(state.first_unanswered_ns);
            match state.lifecycle.update(condition, now_ns, resolve_after_ns) {
                Some(Transition::Fired { started_ns }) => {
                    let severity = if state.unanswered >= config.critical_count
                        || state.workloads.len() >= 2
                    {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    };
                    state.severity = Some(severity);
                    alerts.push(alert(endpoint, state, AlertState::Firing, started_ns, None));
                }
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                }) => {
                    alerts.push(alert(
                        endpoint,
                        state,
                        AlertState::Resolved,
                        started_ns,
                        Some(ended_ns),
                    ));
                    // The next incident counts from zero.
                    return false;
                }
                None => {}
            }
            state.lifecycle.is_firing() || condition.is_some()
        });
    }

    fn untracked(&self) -> u64 {
        self.endpoints.untracked()
    }
}

fn alert(
    endpoint: SocketAddr,
    state: &EndpointState,
    alert_state: AlertState,
    started_ns: u64,
    ended_ns: Option<u64>,
) -> Alert {
    let workloads = top_workloads(
        state
            .workloads
            .values()
            .map(|a| (&a.workload, a.unanswered)),
    );
    let affected = state.workloads.len() as u64 + state.workloads_untracked;
    let message = match ended_ns {
        None => format!(
            "SYNs to {endpoint} dropped without answer (security group, network policy, \
             conntrack or SYN backlog): {} connect attempts unanswered ({} SYN retransmits) \
             from {}",
            state.unanswered,
            state.syn_retransmits,
            workload_names(&workloads)
        ),
        Some(ended_ns) => format!(
            "SYNs to {endpoint} answered again (or no longer tried) after {} s: {} connect \
             attempts went unanswered",
            seconds(ended_ns.saturating_sub(started_ns)),
            state.unanswered
        ),
    };
    Alert {
        kind: "syn_drops",
        id: format!("syn_drops/{endpoint}"),
        state: alert_state,
        severity: state.severity.unwrap_or(Severity::Warning),
        message,
        endpoint: Some(endpoint),
        workloads,
        started_ns,
        ended_ns,
        evidence: evidence(json!({
            "unanswered_connects": state.unanswered,
            "timeouts": state.timeouts,
            "aborted": state.aborted,
            "syn_retransmits": state.syn_retransmits,
            "workloads_affected": affected,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testing::*;

    fn detector() -> SynDrops {
        SynDrops::new(SynDropsConfig::default(), 10 * S)
    }

    fn dropped(ts_ns: u64, workload: &Workload) -> Observation {
        connect(
            ts_ns,
            workload,
            redis(9),
            ConnectOutcome::Aborted,
            2_000 * MS,
        )
    }

    #[test]
    fn the_first_unanswered_attempt_fires_and_a_connect_resolves_it() {
        let stream = vec![
            dropped(T0 + 5 * S, &pod(1)),
            dropped(T0 + 7 * S, &pod(1)),
            dropped(T0 + 9 * S, &pod(1)),
            // The rule is lifted.
            established(T0 + 12 * S, &pod(1), redis(9)),
        ];
        let alerts = run(&mut detector(), stream, T0 + 60 * S);
        assert_fired_and_resolved_once(&alerts);
        let (fired_at, firing) = &alerts[0];
        assert_eq!(*fired_at / S, T0 / S + 5, "fires on the first drop");
        assert_eq!(firing.severity, Severity::Warning);
        assert_eq!(firing.endpoint, Some(redis(9)));
        assert_eq!(firing.workloads[0].pod_uid.as_deref(), Some(&*pod_uid(1)));
        assert_eq!(firing.started_ns, T0 + 3 * S, "when the first SYN left");
        let resolved = &alerts[1].1;
        assert_eq!(number(resolved, "unanswered_connects"), 3.0);
        assert_eq!(number(resolved, "syn_retransmits"), 6.0);
        assert_eq!(resolved.ended_ns.unwrap() / S, T0 / S + 12);
    }

    #[test]
    fn an_endpoint_nobody_tries_any_more_resolves_after_quiet() {
        let stream = (0..5)
            .map(|i| dropped(T0 + (5 + 2 * i) * S, &pod(1)))
            .collect();
        let alerts = run(&mut detector(), stream, T0 + 90 * S);
        assert_fired_and_resolved_once(&alerts);
        // Last drop at 13 s, quiet 30 s; resolved after the hold-down.
        assert_eq!(alerts[1].1.ended_ns.unwrap() / S, T0 / S + 43);
    }

    #[test]
    fn other_workloads_connecting_do_not_resolve_a_pod_s_drops() {
        let mut stream: Vec<Observation> = (0..20)
            .map(|i| dropped(T0 + (5 + 2 * i) * S, &pod(1)))
            .collect();
        stream.extend((0..50).map(|i| established(T0 + i * S, &pod(2), redis(9))));
        let alerts = run(&mut detector(), stream, T0 + 50 * S);
        assert_eq!(states(&alerts), vec![AlertState::Firing]);
    }

    #[test]
    fn two_workloads_dropped_make_it_critical() {
        let stream = vec![
            dropped(T0 + 5 * S, &pod(1)),
            dropped(T0 + 5 * S + MS, &pod(2)),
        ];
        let alerts = run(&mut detector(), stream, T0 + 8 * S);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].1.severity, Severity::Critical);
        assert_eq!(number(&alerts[0].1, "workloads_affected"), 2.0);
    }

    #[test]
    fn answered_or_short_failures_are_not_drops() {
        let stream = vec![
            connect(T0 + S, &pod(1), redis(9), ConnectOutcome::Refused, 100_000),
            connect(
                T0 + 2 * S,
                &pod(1),
                redis(9),
                ConnectOutcome::Unreachable,
                3_000 * MS,
            ),
            // A 200 ms client timeout before any SYN retransmit.
            connect(
                T0 + 3 * S,
                &pod(1),
                redis(9),
                ConnectOutcome::Aborted,
                200 * MS,
            ),
            established(T0 + 4 * S, &pod(1), redis(9)),
        ];
        assert_eq!(run(&mut detector(), stream, T0 + 30 * S), vec![]);
    }
}
