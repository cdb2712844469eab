//! Prometheus metrics: requests, connects, open connections, alerts and the
//! agent's own counters in a `prometheus-client` registry, scraped on
//! `/metrics` (`crate::http`). Names and labels: `docs/metrics.md`.
//!
//! Label values are workloads, endpoints, command names, outcomes and error
//! prefixes — never keys or values. Series are bounded ([`MAX_SERIES`] per
//! kind, the rest folded into one `other` series) and a series idle for
//! [`SERIES_IDLE_LIMIT`] is removed, so pod churn over days neither grows
//! memory nor fills the cap with pods long gone.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, HashSet},
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use rustc_hash::FxHashMap;

use crate::{
    decode::Connect,
    gauges::Gauge as OpenConnections,
    resp::ErrorPrefix,
    sinks::json::{Stats, outcome_label, role_name},
    tracker::{Exchange, Outcome},
};

/// Request series (role, workload, endpoint, command) and connect series
/// (workload, endpoint) kept at most, each; beyond, new ones are counted in
/// one `other` series. Lower than the JSON windows' cap: every series is a
/// histogram of `LATENCY_BUCKETS_S.len() + 1` lines in every scrape.
pub const MAX_SERIES: usize = 2_000;
/// Distinct error prefixes per request series; further ones are `OTHER`
/// (a script can invent error words).
const MAX_ERROR_KINDS: usize = 8;
/// A series without a request or connect for this long is removed.
pub const SERIES_IDLE_LIMIT: Duration = Duration::from_secs(3_600);
/// Label value of the series that takes what is beyond [`MAX_SERIES`].
const OTHER: &str = "other";

/// Bucket upper bounds in seconds, 50 µs … 10 s: a healthy Redis answers in
/// well under a millisecond; client command timeouts sit at 0.5–2 s; a
/// connect that needed one or two SYN retransmits takes 1 s or 3 s.
const LATENCY_BUCKETS_S: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_S)
}

/// A counter of the agent: name, help, and its `stats` event field.
type AgentCounter = (&'static str, &'static str, fn(&Stats) -> u64);

/// The agent's counters, from the `stats` event's fields.
const AGENT_COUNTERS: &[AgentCounter] = &[
    ("events", "Event records read from the kernel", |s| s.events),
    (
        "decode_errors",
        "Event records that could not be decoded",
        |s| s.decode_errors,
    ),
    (
        "ring_buffer_full",
        "Kernel events dropped: the ring buffer was full",
        |s| s.ring_buffer_full,
    ),
    (
        "connect_map_full",
        "Connect attempts not timed: the kernel's connect map was full",
        |s| s.connect_map_full,
    ),
    (
        "connection_map_full",
        "Connections not tracked: the kernel's connection map was full",
        |s| s.connection_map_full,
    ),
    (
        "read_failed",
        "Kernel reads of socket fields that failed",
        |s| s.read_failed,
    ),
    (
        "resp_gaps",
        "Holes in a RESP stream given up on (the stream resynchronised)",
        |s| s.resp_gaps,
    ),
    (
        "resp_flow_map_full",
        "RESP flows not traced: the kernel's flow map was full",
        |s| s.resp_flow_map_full,
    ),
    (
        "resp_truncated",
        "RESP segments longer than what is copied per segment",
        |s| s.resp_truncated,
    ),
    (
        "missed_runs",
        "kernel program runs skipped because another tracing program was running on the CPU",
        |s| s.missed_runs,
    ),
    (
        "resp_unparsed_bytes",
        "RESP bytes that could not be followed",
        |s| s.resp_unparsed_bytes,
    ),
    (
        "resp_desyncs",
        "RESP streams that lost sync and were resynchronised",
        |s| s.resp_desyncs,
    ),
    (
        "resp_unmatched_replies",
        "RESP replies with no request they could answer",
        |s| s.resp_unmatched_replies,
    ),
    (
        "tls_connections",
        "connections found carrying TLS, timed as turns",
        |s| s.tls_connections,
    ),
    (
        "tls_unresolved",
        "TLS library calls whose connection was not found",
        |s| s.tls_unresolved,
    ),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    role: &'static str,
    workload: Arc<str>,
    endpoint: Arc<str>,
    command: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestOutcomeLabels {
    role: &'static str,
    workload: Arc<str>,
    endpoint: Arc<str>,
    command: Arc<str>,
    outcome: &'static str,
    /// The error prefix (`MOVED`, `WRONGTYPE`) of `outcome="error"`, else empty.
    error: Option<Arc<str>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectLabels {
    workload: Arc<str>,
    endpoint: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectOutcomeLabels {
    workload: Arc<str>,
    endpoint: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    role: &'static str,
    workload: Arc<str>,
    endpoint: Arc<str>,
}

/// `resptrace_workload_info`: a `pod:<uid>` workload's names, joined to
/// the other metrics on `workload` (names are not labels of every series:
/// they would not multiply series, but a name that arrives late would
/// split one).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadInfoLabels {
    workload: Arc<str>,
    namespace: Arc<str>,
    pod: Arc<str>,
    owner: Option<Arc<str>>,
}

/// `resptrace_endpoint_info`: what a Redis endpoint's address is.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointInfoLabels {
    endpoint: Arc<str>,
    namespace: Arc<str>,
    pod: Option<Arc<str>>,
    owner: Option<Arc<str>>,
    service: Option<Arc<str>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    kind: Arc<str>,
    /// Empty for a node-wide alert.
    endpoint: Arc<str>,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// (role, cgroup id, Redis endpoint, command identity): what an exchange
/// is looked up by, without building its labels.
type RequestKey = (u8, u64, SocketAddr, (usize, usize));

/// One request series' metrics, shared by every key with the same labels
/// (two containers of one pod are one workload).
struct RequestSeries {
    labels: RequestLabels,
    duration: Histogram,
    /// By outcome (see `outcome_index`); errors are in `errors`.
    outcomes: RefCell<[Option<Counter>; 5]>,
    /// By prefix; `None`: the prefixes beyond `MAX_ERROR_KINDS`.
    errors: RefCell<Vec<(Option<ErrorPrefix>, Counter)>>,
    activity: Activity,
}

struct ConnectSeries {
    labels: ConnectLabels,
    handshake: Histogram,
    outcomes: RefCell<Vec<(&'static str, Counter)>>,
    activity: Activity,
}

/// Whether a series was used since the last window, and when it last was.
struct Activity {
    used: Cell<bool>,
    last_used: Cell<Instant>,
    removed: Cell<bool>,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            used: Cell::new(true),
            last_used: Cell::new(now),
            removed: Cell::new(false),
        }
    }

    /// At a window's end: whether the series has been idle too long.
    fn idle(&self, now: Instant) -> bool {
        if self.used.replace(false) {
            self.last_used.set(now);
        }
        now.duration_since(self.last_used.get()) >= SERIES_IDLE_LIMIT
    }
}

/// The registry and the agent's handles into it. Owned by the main loop;
/// the HTTP server gets the registry alone ([`Metrics::registry`]).
pub struct Metrics {
    registry: Arc<Registry>,
    request_duration: HistogramFamily<RequestLabels>,
    requests: Family<RequestOutcomeLabels, Counter>,
    connect_duration: HistogramFamily<ConnectLabels>,
    connects: Family<ConnectOutcomeLabels, Counter>,
    open_connections: Family<ConnectionLabels, Gauge>,
    alerts: Family<AlertLabels, Gauge>,
    workload_info: Family<WorkloadInfoLabels, Gauge>,
    endpoint_info: Family<EndpointInfoLabels, Gauge>,
    info_labels: (HashSet<WorkloadInfoLabels>, HashSet<EndpointInfoLabels>),
    agent: Vec<Counter>,
    overflowed: Counter,
    request_keys: FxHashMap<RequestKey, Rc<RequestSeries>>,
    request_series: HashMap<RequestLabels, Rc<RequestSeries>>,
    connect_series: HashMap<(Arc<str>, SocketAddr), Rc<ConnectSeries>>,
    open_connection_labels: Vec<ConnectionLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("resptrace");
        let request_duration = HistogramFamily::<RequestLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "request_duration",
            "Answered Redis requests by latency: client, request sent → reply \
             complete; server, request arrived → reply written",
            Unit::Seconds,
            request_duration.clone(),
        );
        let requests = Family::<RequestOutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Redis requests by outcome (ok, nil, error with its prefix, timeout, \
             no_reply, untimed)",
            requests.clone(),
        );
        let connect_duration = HistogramFamily::<ConnectLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "connect_handshake",
            "Established TCP connects to Redis by handshake time (SYN sent → established)",
            Unit::Seconds,
            connect_duration.clone(),
        );
        let connects = Family::<ConnectOutcomeLabels, Counter>::default();
        registry.register(
            "connects",
            "TCP connect attempts to Redis by outcome (established, refused, \
             unreachable, timeout, aborted, failed)",
            connects.clone(),
        );
        let open_connections = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Open TCP connections to (client) or of (server) a Redis endpoint, \
             as of the last interval",
            open_connections.clone(),
        );
        let alerts = Family::<AlertLabels, Gauge>::default();
        registry.register(
            "alert_firing",
            "1 while an alert of this kind fires for the endpoint, 0 once resolved",
            alerts.clone(),
        );
        let workload_info = Family::<WorkloadInfoLabels, Gauge>::default();
        registry.register(
            "workload_info",
            "1 for each pod workload in the other metrics that the Kubernetes API \
             names: its namespace, pod and owner (join on `workload`)",
            workload_info.clone(),
        );
        let endpoint_info = Family::<EndpointInfoLabels, Gauge>::default();
        registry.register(
            "endpoint_info",
            "1 for each Redis endpoint in the other metrics that the Kubernetes \
             API names: the pod (and owner) or Service at its address (join on `endpoint`)",
            endpoint_info.clone(),
        );
        let agent = AGENT_COUNTERS
            .iter()
            .map(|(name, help, _)| {
                let counter = Counter::default();
                registry.register(*name, *help, counter.clone());
                counter
            })
            .collect();
        let overflowed = Counter::default();
        registry.register(
            "series_overflowed",
            "Requests and connects counted in an `other` series because the \
             series cap was reached",
            overflowed.clone(),
        );
        Self {
            registry: Arc::new(registry),
            request_duration,
            requests,
            connect_duration,
            connects,
            open_connections,
            alerts,
            workload_info,
            endpoint_info,
            info_labels: Default::default(),
            agent,
            overflowed,
            request_keys: FxHashMap::default(),
            request_series: HashMap::new(),
            connect_series: HashMap::new(),
            open_connection_labels: Vec::new(),
        }
    }

    /// The registry to encode on `/metrics`.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// Counts an exchange. `workload` names the exchange's cgroup; it is
    /// called only for a series not seen yet.
    pub fn record_exchange(&mut self, exchange: &Exchange, workload: impl FnOnce() -> Arc<str>) {
        let key: RequestKey = (
            exchange.role as u8,
            exchange.cgroup_id,
            exchange.server,
            exchange.command.id(),
        );
        let series = match self.request_keys.get(&key) {
            Some(series) => Rc::clone(series),
            None => self.new_request_series(key, exchange, workload),
        };
        series.activity.used.set(true);
        let index = match exchange.outcome {
            Outcome::Error(prefix) => {
                series.error_counter(prefix, &self.requests).inc();
                None
            }
            outcome => outcome_index(outcome),
        };
        if let Some(index) = index {
            let mut outcomes = series.outcomes.borrow_mut();
            outcomes[index]
                .get_or_insert_with(|| {
                    self.requests.get_or_create_owned(
                        &series.outcome_labels(outcome_label(exchange.outcome), None),
                    )
                })
                .inc();
        }
        if matches!(
            exchange.outcome,
            Outcome::Ok | Outcome::Nil | Outcome::Error(_)
        ) {
            series
                .duration
                .observe(exchange.latency_ns as f64 / 1_000_000_000.0);
        }
    }

    fn new_request_series(
        &mut self,
        key: RequestKey,
        exchange: &Exchange,
        workload: impl FnOnce() -> Arc<str>,
    ) -> Rc<RequestSeries> {
        let role = role_name(exchange.role);
        let labels = if self.request_keys.len() < MAX_SERIES {
            RequestLabels {
                role,
                workload: workload(),
                endpoint: exchange.server.to_string().into(),
                command: exchange.command.to_string().into(),
            }
        } else {
            self.overflowed.inc();
            RequestLabels {
                role,
                workload: OTHER.into(),
                endpoint: OTHER.into(),
                command: OTHER.into(),
            }
        };
        let series = self
            .request_series
            .entry(labels.clone())
            .or_insert_with(|| {
                Rc::new(RequestSeries {
                    duration: self.request_duration.get_or_create_owned(&labels),
                    labels,
                    outcomes: RefCell::default(),
                    errors: RefCell::default(),
                    activity: Activity::new(Instant::now()),
                })
            });
        let series = Rc::clone(series);
        // Overflowed keys are not remembered: the cap bounds the key map too.
        if self.request_keys.len() < MAX_SERIES {
            self.request_keys.insert(key, Rc::clone(&series));
        }
        series
    }

    /// Counts a connect attempt of `workload`.
    pub fn record_connect(&mut self, connect: &Connect, workload: Arc<str>) {
        let mut key = (workload, connect.dst);
        if !self.connect_series.contains_key(&key) && self.connect_series.len() >= MAX_SERIES {
            self.overflowed.inc();
            key = (OTHER.into(), SocketAddr::from(([0, 0, 0, 0], 0)));
        }
        let series = self
            .connect_series
            .entry(key)
            .or_insert_with_key(|(workload, endpoint)| {
                let labels = ConnectLabels {
                    workload: Arc::clone(workload),
                    endpoint: if workload.as_ref() == OTHER {
                        OTHER.into()
                    } else {
                        endpoint.to_string().into()
                    },
                };
                Rc::new(ConnectSeries {
                    handshake: self.connect_duration.get_or_create_owned(&labels),
                    labels,
                    outcomes: RefCell::default(),
                    activity: Activity::new(Instant::now()),
                })
            });
        series.activity.used.set(true);
        let outcome = connect.outcome.name();
        let mut outcomes = series.outcomes.borrow_mut();
        match outcomes.iter().find(|(name, _)| *name == outcome) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let counter = self.connects.get_or_create_owned(&ConnectOutcomeLabels {
                    workload: Arc::clone(&series.labels.workload),
                    endpoint: Arc::clone(&series.labels.endpoint),
                    outcome,
                });
                counter.inc();
                outcomes.push((outcome, counter));
            }
        };
        if connect.outcome == agent_common::ConnectOutcome::Established {
            series
                .handshake
                .observe(connect.duration_ns as f64 / 1_000_000_000.0);
        }
    }

    /// Sets the open-connection gauges to this interval's (groups of the
    /// same workload summed); gauges not in it are removed. `workload`
    /// names a group.
    pub fn set_open_connections(
        &mut self,
        gauges: &[OpenConnections],
        mut workload: impl FnMut(&OpenConnections) -> Arc<str>,
    ) {
        let mut totals: HashMap<ConnectionLabels, i64> = HashMap::new();
        for gauge in gauges.iter().take(MAX_SERIES) {
            let labels = ConnectionLabels {
                role: gauge.key.role,
                workload: workload(gauge),
                endpoint: gauge.key.server.to_string().into(),
            };
            *totals.entry(labels).or_default() += i64::try_from(gauge.open).unwrap_or(i64::MAX);
        }
        for labels in self.open_connection_labels.drain(..) {
            if !totals.contains_key(&labels) {
                self.open_connections.remove(&labels);
            }
        }
        for (labels, open) in totals {
            self.open_connections.get_or_create(&labels).set(open);
            self.open_connection_labels.push(labels);
        }
    }

    /// Updates the agent's counters to the totals in `stats`.
    pub fn set_agent_stats(&mut self, stats: &Stats) {
        for (counter, (_, _, value)) in self.agent.iter().zip(AGENT_COUNTERS) {
            counter.inc_by(value(stats).saturating_sub(counter.get()));
        }
    }

    /// `resptrace_alert_firing{kind, endpoint}`: 1 while firing, 0 after.
    pub fn set_alert(&mut self, kind: &str, endpoint: Option<SocketAddr>, firing: bool) {
        let labels = AlertLabels {
            kind: kind.into(),
            endpoint: endpoint.map_or_else(|| "".into(), |e| e.to_string().into()),
        };
        self.alerts.get_or_create(&labels).set(i64::from(firing));
    }

    /// Sets `resptrace_workload_info` and `resptrace_endpoint_info` for the
    /// workloads and endpoints of the current series, as `names` knows them
    /// now; info of series gone or no longer named is removed. At most one
    /// info series per request, connect and gauge series: bounded by them.
    pub fn set_names(&mut self, names: &crate::kube::Names) {
        use std::collections::BTreeSet;
        let mut workloads: BTreeSet<&Arc<str>> = BTreeSet::new();
        let mut endpoints: BTreeSet<&Arc<str>> = BTreeSet::new();
        for labels in self.request_series.keys() {
            workloads.insert(&labels.workload);
            endpoints.insert(&labels.endpoint);
        }
        for series in self.connect_series.values() {
            workloads.insert(&series.labels.workload);
            endpoints.insert(&series.labels.endpoint);
        }
        for labels in &self.open_connection_labels {
            workloads.insert(&labels.workload);
            endpoints.insert(&labels.endpoint);
        }
        let workload_info: HashSet<WorkloadInfoLabels> = workloads
            .into_iter()
            .filter_map(|workload| {
                let meta = names.pod(workload.strip_prefix("pod:")?)?;
                Some(WorkloadInfoLabels {
                    workload: Arc::clone(workload),
                    namespace: meta.namespace.clone(),
                    pod: meta.name.clone(),
                    owner: meta.workload.clone(),
                })
            })
            .collect();
        let endpoint_info: HashSet<EndpointInfoLabels> = endpoints
            .into_iter()
            .filter_map(|endpoint| {
                let addr: SocketAddr = endpoint.parse().ok()?;
                Some(match names.peer(addr.ip())? {
                    crate::kube::Peer::Pod(meta) => EndpointInfoLabels {
                        endpoint: Arc::clone(endpoint),
                        namespace: meta.namespace.clone(),
                        pod: Some(meta.name.clone()),
                        owner: meta.workload.clone(),
                        service: None,
                    },
                    crate::kube::Peer::Service { namespace, name } => EndpointInfoLabels {
                        endpoint: Arc::clone(endpoint),
                        namespace,
                        pod: None,
                        owner: None,
                        service: Some(name),
                    },
                })
            })
            .collect();
        let (old_workloads, old_endpoints) = std::mem::take(&mut self.info_labels);
        for labels in old_workloads {
            if !workload_info.contains(&labels) {
                self.workload_info.remove(&labels);
            }
        }
        for labels in old_endpoints {
            if !endpoint_info.contains(&labels) {
                self.endpoint_info.remove(&labels);
            }
        }
        for labels in &workload_info {
            self.workload_info.get_or_create(labels).set(1);
        }
        for labels in &endpoint_info {
            self.endpoint_info.get_or_create(labels).set(1);
        }
        self.info_labels = (workload_info, endpoint_info);
    }

    /// At the end of a window: removes the series idle for
    /// [`SERIES_IDLE_LIMIT`].
    pub fn end_window(&mut self, now: Instant) {
        self.request_series.retain(|labels, series| {
            if !series.activity.idle(now) {
                return true;
            }
            series.activity.removed.set(true);
            self.request_duration.remove(labels);
            for outcome in series.outcome_label_sets() {
                self.requests.remove(&outcome);
            }
            false
        });
        self.request_keys
            .retain(|_, series| !series.activity.removed.get());
        self.connect_series.retain(|_, series| {
            if !series.activity.idle(now) {
                return true;
            }
            self.connect_duration.remove(&series.labels);
            for (outcome, _) in series.outcomes.borrow().iter() {
                self.connects.remove(&ConnectOutcomeLabels {
                    workload: Arc::clone(&series.labels.workload),
                    endpoint: Arc::clone(&series.labels.endpoint),
                    outcome,
                });
            }
            false
        });
    }
}

impl RequestSeries {
    fn outcome_labels(
        &self,
        outcome: &'static str,
        error: Option<Arc<str>>,
    ) -> RequestOutcomeLabels {
        RequestOutcomeLabels {
            role: self.labels.role,
            workload: Arc::clone(&self.labels.workload),
            endpoint: Arc::clone(&self.labels.endpoint),
            command: Arc::clone(&self.labels.command),
            outcome,
            error,
        }
    }

    /// The counter of an error prefix; beyond `MAX_ERROR_KINDS` prefixes,
    /// the series' `OTHER` counter.
    fn error_counter(
        &self,
        prefix: ErrorPrefix,
        family: &Family<RequestOutcomeLabels, Counter>,
    ) -> Counter {
        let mut errors = self.errors.borrow_mut();
        let slot =
            if errors.len() < MAX_ERROR_KINDS || errors.iter().any(|(p, _)| *p == Some(prefix)) {
                Some(prefix)
            } else {
                None
            };
        if let Some((_, counter)) = errors.iter().find(|(p, _)| *p == slot) {
            return counter.clone();
        }
        let counter =
            family.get_or_create_owned(&self.outcome_labels("error", Some(error_label(slot))));
        errors.push((slot, counter.clone()));
        counter
    }

    /// The `requests` label sets this series created.
    fn outcome_label_sets(&self) -> Vec<RequestOutcomeLabels> {
        let outcomes = self.outcomes.borrow();
        let mut sets: Vec<RequestOutcomeLabels> = [
            Outcome::Ok,
            Outcome::Nil,
            Outcome::Timeout,
            Outcome::NoReply,
            Outcome::Untimed,
        ]
        .into_iter()
        .filter(|&o| outcome_index(o).is_some_and(|i| outcomes[i].is_some()))
        .map(|o| self.outcome_labels(outcome_label(o), None))
        .collect();
        for (slot, _) in self.errors.borrow().iter() {
            sets.push(self.outcome_labels("error", Some(error_label(*slot))));
        }
        sets
    }
}

/// `error` label of an error prefix (`None`: beyond `MAX_ERROR_KINDS`).
fn error_label(prefix: Option<ErrorPrefix>) -> Arc<str> {
    match prefix {
        Some(prefix) => prefix.as_str().into(),
        None => "OTHER".into(),
    }
}

/// Slot of a non-error outcome in `RequestSeries::outcomes`.
fn outcome_index(outcome: Outcome) -> Option<usize> {
    match outcome {
        Outcome::Ok => Some(0),
        Outcome::Nil => Some(1),
        Outcome::Timeout => Some(2),
        Outcome::NoReply => Some(3),
        Outcome::Untimed => Some(4),
        Outcome::Error(_) => None,
    }
}

/// The OpenMetrics text of `registry`, as served on `/metrics`.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use agent_common::{ConnectOutcome, ConnectionRole, SynAnswer};

    use super::*;
    use crate::{decode::Task, gauges::GaugeKey, resp::command_of};

    const POD: &str = "pod:0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    fn exchange(command: &[u8], outcome: Outcome, latency_us: u64) -> Exchange {
        Exchange {
            ts_ns: 1,
            role: ConnectionRole::Client,
            client: "10.0.0.2:40000".parse().unwrap(),
            server: "10.0.0.1:6379".parse().unwrap(),
            cgroup_id: 7,
            cgroup: None,
            command: command_of(command, b"", 16).unwrap(),
            outcome,
            latency_ns: latency_us * 1_000,
            first_byte_ns: None,
            read_delay_ns: None,
            request_bytes: 10,
            reply_bytes: 5,
            depth: 1,
            closer: None,
            tls: false,
        }
    }

    fn connect(outcome: ConnectOutcome, handshake_us: u64) -> Connect {
        Connect {
            ts_ns: 1,
            src: "10.0.0.2:40000".parse().unwrap(),
            dst: "10.0.0.1:6379".parse().unwrap(),
            outcome,
            answer: SynAnswer::SynAck,
            error: None,
            syn_retransmits: 0,
            task: Task {
                pid: 1,
                tid: 1,
                comm: "java".into(),
                cgroup_id: 7,
                cgroup: None,
            },
            duration_ns: handshake_us * 1_000,
        }
    }

    fn exposition(metrics: &Metrics) -> String {
        encode(&metrics.registry()).unwrap()
    }

    /// The value of the sample line that starts with `series` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.parse().unwrap())
    }

    const GET: &str = r#"role="client",workload="pod:0a1b2c3d-4e5f-6789-abcd-ef0123456789",endpoint="10.0.0.1:6379",command="GET""#;

    #[test]
    fn named_workloads_and_endpoints_get_info_series_while_they_have_series() {
        let uid = POD.strip_prefix("pod:").unwrap();
        let names = crate::kube::Names::for_tests(
            &[serde_json::json!({
                "metadata": { "name": "api-1", "namespace": "shop", "uid": uid,
                    "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "DaemonSet",
                        "name": "api", "uid": "o", "controller": true }] },
            })],
            &[serde_json::json!({
                "metadata": { "name": "redis", "namespace": "cache" },
                "spec": { "clusterIP": "10.0.0.1" },
            })],
        );
        let mut metrics = Metrics::new();
        metrics.record_exchange(&exchange(b"GET", Outcome::Ok, 100), || POD.into());
        // Another cgroup's series, not a pod: no info.
        let mut other = exchange(b"GET", Outcome::Ok, 100);
        other.cgroup_id = 8;
        metrics.record_exchange(&other, || "comm:x".into());
        metrics.set_names(&names);
        let text = exposition(&metrics);
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"resptrace_workload_info{{workload="{POD}",namespace="shop",pod="api-1",owner="daemonset/api"}}"#
                )
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"resptrace_endpoint_info{endpoint="10.0.0.1:6379",namespace="cache",pod="",owner="",service="redis"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            text.matches("resptrace_workload_info{").count(),
            1,
            "{text}"
        );
        // Series gone (idle past the limit): their info goes too.
        metrics.end_window(Instant::now());
        metrics.end_window(Instant::now() + SERIES_IDLE_LIMIT);
        metrics.set_names(&names);
        let text = exposition(&metrics);
        assert!(!text.contains("resptrace_workload_info{"), "{text}");
        assert!(!text.contains("resptrace_endpoint_info{"), "{text}");
    }

    #[test]
    fn requests_are_counted_by_outcome_and_timed_when_answered() {
        let mut metrics = Metrics::new();
        let mut resolved = 0;
        for (outcome, latency_us) in [
            (Outcome::Ok, 100),
            (Outcome::Ok, 200),
            (Outcome::Nil, 300),
            (
                Outcome::Error(ErrorPrefix::of(b"MOVED 3999 10.0.0.9:6379")),
                400,
            ),
            (Outcome::Timeout, 30_000_000),
        ] {
            metrics.record_exchange(&exchange(b"GET", outcome, latency_us), || {
                resolved += 1;
                POD.into()
            });
        }
        assert_eq!(resolved, 1, "the workload is named once per series");
        let text = exposition(&metrics);
        let requests = |outcome: &str, error: &str| {
            sample(
                &text,
                &format!(
                    "resptrace_requests_total{{{GET},outcome=\"{outcome}\",error=\"{error}\"}}"
                ),
            )
        };
        assert_eq!(requests("ok", ""), Some(2.0), "{text}");
        assert_eq!(requests("nil", ""), Some(1.0));
        assert_eq!(requests("error", "MOVED"), Some(1.0));
        assert_eq!(requests("timeout", ""), Some(1.0));
        assert_eq!(requests("untimed", ""), None, "no empty outcome series");
        // Answered only: a timeout's age is not a latency.
        assert_eq!(
            sample(
                &text,
                &format!("resptrace_request_duration_seconds_count{{{GET}}}")
            ),
            Some(4.0)
        );
        let sum = sample(
            &text,
            &format!("resptrace_request_duration_seconds_sum{{{GET}}}"),
        )
        .unwrap();
        assert!((sum - 0.001).abs() < 1e-9, "{sum}");
        let bucket = |le: &str| {
            sample(
                &text,
                &format!("resptrace_request_duration_seconds_bucket{{le=\"{le}\",{GET}}}"),
            )
        };
        assert_eq!(bucket("0.0001"), Some(1.0), "{text}");
        assert_eq!(bucket("0.00025"), Some(2.0));
        assert_eq!(bucket("0.0005"), Some(4.0));
        assert_eq!(bucket("+Inf"), Some(4.0));
        assert!(text.contains("# TYPE resptrace_request_duration_seconds histogram"));
        assert!(text.contains("# UNIT resptrace_request_duration_seconds seconds"));
        assert!(text.ends_with("# EOF\n"));
    }

    /// Cost per exchange: `cargo test --release -p agent --bin resptrace
    /// metrics_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn metrics_cost_per_exchange() {
        let mut metrics = Metrics::new();
        let commands = [&b"GET"[..], b"SET", b"HGET", b"INCR"];
        let exchanges: Vec<Exchange> = (0..1_000u64)
            .map(|i| {
                let mut e = exchange(commands[i as usize % 4], Outcome::Ok, 100 + i);
                e.cgroup_id = i % 50;
                e
            })
            .collect();
        let rounds = 2_000;
        let started = Instant::now();
        for _ in 0..rounds {
            for e in &exchanges {
                metrics.record_exchange(e, || POD.into());
            }
        }
        let ns = started.elapsed().as_nanos() as f64 / (rounds * exchanges.len()) as f64;
        eprintln!("{ns:.0} ns per exchange");
    }

    #[test]
    fn error_prefixes_beyond_the_cap_are_other() {
        let mut metrics = Metrics::new();
        let words: Vec<String> = (0..MAX_ERROR_KINDS + 3).map(|i| format!("E{i}")).collect();
        for word in &words {
            let outcome = Outcome::Error(ErrorPrefix::of(word.as_bytes()));
            metrics.record_exchange(&exchange(b"GET", outcome, 100), || POD.into());
        }
        let text = exposition(&metrics);
        let errors = |error: &str| {
            sample(
                &text,
                &format!("resptrace_requests_total{{{GET},outcome=\"error\",error=\"{error}\"}}"),
            )
        };
        assert_eq!(errors("E0"), Some(1.0));
        assert_eq!(errors(&format!("E{}", MAX_ERROR_KINDS - 1)), Some(1.0));
        assert_eq!(errors(&format!("E{MAX_ERROR_KINDS}")), None);
        assert_eq!(errors("OTHER"), Some(3.0), "{text}");
    }

    #[test]
    fn series_beyond_the_cap_are_folded_into_other_and_counted() {
        let mut metrics = Metrics::new();
        for cgroup_id in 0..MAX_SERIES as u64 + 5 {
            let mut e = exchange(b"GET", Outcome::Ok, 100);
            e.cgroup_id = cgroup_id;
            metrics.record_exchange(&e, || format!("cgroup:/{cgroup_id}").into());
        }
        let text = exposition(&metrics);
        let other = r#"role="client",workload="other",endpoint="other",command="other""#;
        assert_eq!(
            sample(
                &text,
                &format!("resptrace_requests_total{{{other},outcome=\"ok\",error=\"\"}}")
            ),
            Some(5.0),
            "{}",
            &text[..2000]
        );
        assert_eq!(
            sample(&text, "resptrace_series_overflowed_total"),
            Some(5.0)
        );
        assert_eq!(
            text.matches("resptrace_request_duration_seconds_count{")
                .count(),
            MAX_SERIES + 1
        );
    }

    #[test]
    fn idle_series_are_removed_and_busy_ones_kept() {
        let mut metrics = Metrics::new();
        let start = Instant::now();
        metrics.record_exchange(&exchange(b"GET", Outcome::Ok, 100), || POD.into());
        metrics.record_exchange(&exchange(b"SET", Outcome::Ok, 100), || POD.into());
        metrics.record_connect(&connect(ConnectOutcome::Established, 50), POD.into());
        metrics.end_window(start);
        // GET stays busy; SET and the connects go idle.
        let later = start + SERIES_IDLE_LIMIT;
        metrics.record_exchange(&exchange(b"GET", Outcome::Ok, 100), || POD.into());
        metrics.end_window(later - Duration::from_secs(1));
        metrics.end_window(later);
        let text = exposition(&metrics);
        assert!(text.contains(r#"command="GET""#), "{text}");
        assert!(!text.contains(r#"command="SET""#), "{text}");
        assert!(!text.contains("resptrace_connects_total{"), "{text}");
        assert!(!text.contains("resptrace_connect_handshake_seconds_count{"));
        // A removed series starts again from zero when it comes back.
        metrics.record_exchange(&exchange(b"SET", Outcome::Ok, 100), || POD.into());
        let set = GET.replace("GET", "SET");
        assert_eq!(
            sample(
                &exposition(&metrics),
                &format!("resptrace_requests_total{{{set},outcome=\"ok\",error=\"\"}}")
            ),
            Some(1.0)
        );
    }

    #[test]
    fn connects_are_counted_by_outcome_and_handshakes_timed() {
        let mut metrics = Metrics::new();
        metrics.record_connect(&connect(ConnectOutcome::Established, 80), POD.into());
        metrics.record_connect(&connect(ConnectOutcome::Established, 3_000), POD.into());
        metrics.record_connect(&connect(ConnectOutcome::Refused, 20), POD.into());
        let text = exposition(&metrics);
        let labels = format!(r#"workload="{POD}",endpoint="10.0.0.1:6379""#);
        let connects = |outcome: &str| {
            sample(
                &text,
                &format!("resptrace_connects_total{{{labels},outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!(connects("established"), Some(2.0), "{text}");
        assert_eq!(connects("refused"), Some(1.0));
        assert_eq!(
            sample(
                &text,
                &format!("resptrace_connect_handshake_seconds_count{{{labels}}}")
            ),
            Some(2.0),
            "failed attempts have no handshake time"
        );
        assert_eq!(
            sample(
                &text,
                &format!("resptrace_connect_handshake_seconds_bucket{{le=\"0.0001\",{labels}}}")
            ),
            Some(1.0)
        );
    }

    #[test]
    fn open_connections_are_summed_per_workload_and_removed_when_gone() {
        let gauge = |cgroup_id: u64, open: u64| OpenConnections {
            key: GaugeKey {
                role: "client",
                cgroup_id,
                server: "10.0.0.1:6379".parse().unwrap(),
            },
            comm: None,
            cgroup: None,
            open,
        };
        let mut metrics = Metrics::new();
        // Two containers of one pod.
        metrics.set_open_connections(&[gauge(7, 3), gauge(8, 2)], |_| POD.into());
        let series = format!(
            r#"resptrace_open_connections{{role="client",workload="{POD}",endpoint="10.0.0.1:6379"}}"#
        );
        assert_eq!(sample(&exposition(&metrics), &series), Some(5.0));
        metrics.set_open_connections(&[gauge(7, 0), gauge(8, 0)], |_| POD.into());
        assert_eq!(sample(&exposition(&metrics), &series), Some(0.0));
        metrics.set_open_connections(&[], |_| POD.into());
        assert_eq!(sample(&exposition(&metrics), &series), None);
    }

    #[test]
    fn agent_counters_follow_the_stats_totals_and_alerts_fire_and_resolve() {
        let mut metrics = Metrics::new();
        let mut stats = Stats {
            events: 10,
            ring_buffer_full: 2,
            ..Stats::default()
        };
        metrics.set_agent_stats(&stats);
        stats.events = 25;
        metrics.set_agent_stats(&stats);
        metrics.set_alert("syn_drops", Some("10.0.0.1:6379".parse().unwrap()), true);
        let text = exposition(&metrics);
        assert_eq!(
            sample(&text, "resptrace_events_total"),
            Some(25.0),
            "{text}"
        );
        assert_eq!(sample(&text, "resptrace_ring_buffer_full_total"), Some(2.0));
        assert_eq!(
            sample(&text, "resptrace_resp_unparsed_bytes_total"),
            Some(0.0)
        );
        let alert = r#"resptrace_alert_firing{kind="syn_drops",endpoint="10.0.0.1:6379"}"#;
        assert_eq!(sample(&text, alert), Some(1.0));
        metrics.set_alert("syn_drops", Some("10.0.0.1:6379".parse().unwrap()), false);
        assert_eq!(sample(&exposition(&metrics), alert), Some(0.0));
    }
}
