//! Detect: typed observations of the node's Redis traffic → `alert` events
//! with a lifecycle (`firing` once, `resolved` once).
//!
//! Each detector is a small type fed the same observations; `evaluate` is
//! called on a timer (every second) with the current monotonic time and
//! appends alerts whose state changed.

use std::{net::SocketAddr, sync::Arc};

use agent_common::{ConnectOutcome, SynAnswer};

use crate::workload::Workload;

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
        /// The error prefix (`MOVED`, `LOADING`, …) of an error reply.
        error: Option<Arc<str>>,
        timeout: bool,
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
    /// `error_replies`, `pool_pressure`.
    pub kind: &'static str,
    pub state: AlertState,
    pub severity: Severity,
    /// One line for a human, with the numbers that matter.
    pub message: String,
    /// The Redis endpoint concerned (`None`: node-wide).
    pub endpoint: Option<SocketAddr>,
    /// Workloads concerned (empty: node-wide), identified by `Workload::key`.
    pub workloads: Vec<Workload>,
    /// Monotonic ns when the condition started (firing) / ended (resolved).
    pub since_ns: u64,
    /// The numbers behind it, detector-specific (documented in docs/events.md).
    pub evidence: serde_json::Map<String, serde_json::Value>,
}

/// A detector: fed every observation, evaluated on a timer.
pub trait Detector {
    fn kind(&self) -> &'static str;
    fn observe(&mut self, observation: &Observation);
    /// Appends the alerts whose state changed by `now_ns`.
    fn evaluate(&mut self, now_ns: u64, alerts: &mut Vec<Alert>);
}
