//! Synthetic observation streams for the detectors' unit tests.

use std::{net::SocketAddr, sync::Arc};

use agent_common::{ConnectOutcome, SynAnswer};

use super::{Alert, AlertState, Detector, NS_PER_S, Observation};
use crate::{resp::Command, workload::Workload, zones::Locality};

pub const S: u64 = NS_PER_S;
pub const MS: u64 = 1_000_000;
/// Where the synthetic streams start: monotonic time is seconds since boot.
pub const T0: u64 = 1_000 * S;

/// A kubelet pod, `n` in its UID.
pub fn pod(n: u8) -> Workload {
    let path = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef01234567{n:02x}.slice/cri-containerd-4f2a9b1c8d7e6f5a4b3c2d1e0f9a8b7c.scope"
    );
    Workload::new(Some(&path), Some("java"))
}

pub fn pod_uid(n: u8) -> String {
    format!("0a1b2c3d-4e5f-6789-abcd-ef01234567{n:02x}")
}

pub fn redis(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 2, 0, last], 6379))
}

pub fn connect(
    ts_ns: u64,
    workload: &Workload,
    endpoint: SocketAddr,
    outcome: ConnectOutcome,
    duration_ns: u64,
) -> Observation {
    let (answer, syn_retransmits) = match outcome {
        ConnectOutcome::Established => (SynAnswer::SynAck, 0),
        ConnectOutcome::Refused => (SynAnswer::Rst, 0),
        ConnectOutcome::Unreachable => (SynAnswer::Icmp, 0),
        // Unanswered: one SYN retransmit per second waited, as the kernel's
        // backoff would for the first ones.
        _ => (SynAnswer::None, (duration_ns / S) as u32),
    };
    Observation::Connect {
        ts_ns,
        workload: workload.clone(),
        endpoint,
        outcome,
        answer,
        syn_retransmits,
        duration_ns,
    }
}

pub fn established(ts_ns: u64, workload: &Workload, endpoint: SocketAddr) -> Observation {
    connect(
        ts_ns,
        workload,
        endpoint,
        ConnectOutcome::Established,
        200_000,
    )
}

pub fn request(
    ts_ns: u64,
    workload: &Workload,
    endpoint: SocketAddr,
    error: Option<&str>,
) -> Observation {
    Observation::Request {
        ts_ns,
        workload: workload.clone(),
        endpoint,
        command: command("GET"),
        latency_ns: 200_000,
        error: error.map(Arc::from),
        timeout: false,
        locality: Locality::UnknownZone,
    }
}

/// A request that took `latency_ns` (timed out, with `timeout`).
pub fn timed_request(
    ts_ns: u64,
    workload: &Workload,
    endpoint: SocketAddr,
    command_name: &str,
    latency_ns: u64,
    timeout: bool,
    locality: Locality,
) -> Observation {
    Observation::Request {
        ts_ns,
        workload: workload.clone(),
        endpoint,
        command: command(command_name),
        latency_ns,
        error: None,
        timeout,
        locality,
    }
}

/// A command from the table: `GET`, `BLPOP`.
pub fn command(name: &str) -> Command {
    crate::resp::command_of(name.as_bytes(), b"", name.len()).expect("a known command")
}

pub fn open_connections(
    ts_ns: u64,
    workload: &Workload,
    endpoint: SocketAddr,
    open: u64,
) -> Observation {
    Observation::OpenConnections {
        ts_ns,
        workload: workload.clone(),
        endpoint,
        open,
    }
}

pub fn retransmits(
    ts_ns: u64,
    workload: &Workload,
    endpoint: SocketAddr,
    count: u64,
) -> Observation {
    Observation::Retransmits {
        ts_ns,
        workload: workload.clone(),
        endpoint,
        count,
    }
}

/// `count` events spread evenly over the second starting at `start_ns`.
pub fn spread(start_ns: u64, count: u64) -> impl Iterator<Item = u64> {
    (0..count).map(move |i| start_ns + i * S / count.max(1))
}

fn ts(observation: &Observation) -> u64 {
    match observation {
        Observation::Connect { ts_ns, .. }
        | Observation::Retransmits { ts_ns, .. }
        | Observation::Request { ts_ns, .. }
        | Observation::OpenConnections { ts_ns, .. } => *ts_ns,
    }
}

/// Feeds `observations` in time order and evaluates every second, 10 ms
/// past it, as the pipeline does, up to `until_ns`. Returns each alert with
/// the time it was written.
pub fn run(
    detector: &mut dyn Detector,
    mut observations: Vec<Observation>,
    until_ns: u64,
) -> Vec<(u64, Alert)> {
    observations.sort_by_key(ts);
    let mut pending = observations.into_iter().peekable();
    let mut written = Vec::new();
    let mut alerts = Vec::new();
    let mut now_ns = T0 + 10 * MS;
    while now_ns <= until_ns {
        while let Some(observation) = pending.next_if(|o| ts(o) <= now_ns) {
            detector.observe(&observation);
        }
        detector.evaluate(now_ns, &mut alerts);
        written.extend(alerts.drain(..).map(|alert| (now_ns, alert)));
        now_ns += S;
    }
    written
}

/// The states of `alerts`, in order.
pub fn states(alerts: &[(u64, Alert)]) -> Vec<AlertState> {
    alerts.iter().map(|(_, a)| a.state).collect()
}

/// `firing` then `resolved` of one alert id, and nothing else.
pub fn assert_fired_and_resolved_once(alerts: &[(u64, Alert)]) {
    assert_eq!(
        states(alerts),
        vec![AlertState::Firing, AlertState::Resolved],
        "{alerts:#?}"
    );
    assert_eq!(alerts[0].1.id, alerts[1].1.id);
    assert_eq!(alerts[0].1.started_ns, alerts[1].1.started_ns);
    assert!(alerts[1].1.ended_ns.is_some());
}

pub fn number(alert: &Alert, field: &str) -> f64 {
    alert
        .evidence
        .get(field)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("evidence {field} missing in {alert:#?}"))
}
