//! JSON lines on stdout: one object per line, schema in `docs/events.md`
//! and `docs/events.schema.json`. Field names are an API: stable, units in
//! the name. With `--format pretty`, the same objects as aligned text.

use std::{io::Write, net::IpAddr, time::SystemTime};

use agent_common::{Closer, ConnectOutcome, ConnectionRole, SynAnswer, errno};
use serde::Serialize;

use crate::{
    aggregate::Window,
    clock::Clock,
    decode::{Close, Connect, Event, SynAckRetransmit, Task},
    detect::{Alert, AlertState, Severity},
    gauges::Gauge,
    kube::{Names, Peer, PodMeta},
    probes::KernelStats,
    resp::Command,
    tracker::{Exchange, Outcome},
    workload::{Workload, kubelet_pod},
    zones::{Locality, Zones},
};

/// Bumped when a field changes meaning or disappears (adding one does not).
pub const SCHEMA_VERSION: u32 = 1;

pub struct JsonSink<W: Write> {
    out: W,
    clock: Clock,
    /// Shared so bodies can borrow it while `self` writes.
    places: std::sync::Arc<Places>,
    /// `node` of every line.
    node: Box<str>,
    /// `Some(colour)`: `--format pretty`, with ANSI colours if `colour`.
    pretty: Option<bool>,
}

/// What names places: zones for Redis endpoints, the Kubernetes API's
/// names for pod UIDs and addresses (empty without it).
#[derive(Clone, Default)]
struct Places {
    zones: Zones,
    names: Names,
}

/// The fields every event has, then its own.
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    ts: Rfc3339Micros,
    #[serde(rename = "type")]
    kind: &'a str,
    node: &'a str,
    schema_version: u32,
    #[serde(flatten)]
    body: T,
}

/// `2026-11-25T17:17:06.967463Z`, written without an intermediate String.
struct Rfc3339Micros(SystemTime);

impl Serialize for Rfc3339Micros {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

#[derive(Serialize)]
struct ConnectBody<'a> {
    outcome: &'static str,
    answer: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    handshake_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_after_us: Option<u64>,
    syn_retransmits: u32,
    /// A failed attempt whose SYNs got no answer at all: dropped in the path.
    path_drop_suspected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    src: Endpoint<'a>,
    dst: Endpoint<'a>,
}

/// One end of a connection; process fields only for the traced end, when known.
#[derive(Serialize)]
struct Endpoint<'a> {
    ip: IpAddr,
    port: u16,
    /// Redis side: its zone, when a `--zone-cidr` covers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
    /// Redis side: `same_zone`, `cross_zone` or `unknown_zone`.
    #[serde(skip_serializing_if = "Option::is_none")]
    locality: Option<Locality>,
    /// Redis side, without a traced process: the pod or Service at the
    /// address, as the Kubernetes API names it.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    peer: Option<PeerNames>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    process: Option<Process<'a>>,
}

#[derive(Serialize)]
struct Process<'a> {
    pid: u32,
    tid: u32,
    comm: &'a str,
    cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(flatten)]
    pod: PodFields,
}

/// The pod and container a kubelet cgroup path names (absent otherwise),
/// and the pod's names when the Kubernetes API knows its UID.
#[derive(Serialize, Default)]
struct PodFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_id: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    names: Option<PodNames>,
}

impl PodFields {
    fn of(cgroup: Option<&str>, names: &Names) -> Self {
        match cgroup.and_then(kubelet_pod) {
            Some(pod) => Self {
                names: names.pod(&pod.uid).map(PodNames),
                pod_uid: Some(pod.uid),
                container_id: pod.container_id,
            },
            None => Self::default(),
        }
    }
}

/// `namespace`, `pod`, `workload` (the owner, `deployment/api`) and the
/// `--pod-labels` it has (`labels`).
struct PodNames(std::sync::Arc<PodMeta>);

impl Serialize for PodNames {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let meta = &self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("namespace", &*meta.namespace)?;
        map.serialize_entry("pod", &*meta.name)?;
        if let Some(workload) = &meta.workload {
            map.serialize_entry("workload", &**workload)?;
        }
        if !meta.labels.is_empty() {
            let labels: std::collections::BTreeMap<&str, &str> =
                meta.labels.iter().map(|(k, v)| (&**k, &**v)).collect();
            map.serialize_entry("labels", &labels)?;
        }
        map.end()
    }
}

/// A Redis endpoint's pod names, or `namespace` and `service` for a
/// Service's ClusterIP.
struct PeerNames(Peer);

impl Serialize for PeerNames {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        match &self.0 {
            Peer::Pod(meta) => PodNames(meta.clone()).serialize(serializer),
            Peer::Service { namespace, name } => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("namespace", &**namespace)?;
                map.serialize_entry("service", &**name)?;
                map.end()
            }
        }
    }
}

impl<'a> Endpoint<'a> {
    fn new(addr: std::net::SocketAddr, task: Option<&'a Task>, names: &Names) -> Self {
        Self {
            ip: addr.ip(),
            port: addr.port(),
            zone: None,
            locality: None,
            peer: None,
            process: task.map(|t| Process {
                pid: t.pid,
                tid: t.tid,
                comm: &t.comm,
                cgroup_id: t.cgroup_id,
                cgroup: t.cgroup.as_deref(),
                pod: PodFields::of(t.cgroup.as_deref(), names),
            }),
        }
    }

    /// The Redis side of a connection, placed in its zone and named by its
    /// address (unless its process, and so its pod, is known).
    fn redis(addr: std::net::SocketAddr, task: Option<&'a Task>, places: &'a Places) -> Self {
        Self {
            zone: places.zones.zone_of(addr.ip()),
            locality: Some(places.zones.locality(addr.ip())),
            peer: match task {
                Some(_) => None,
                None => places.names.peer(addr.ip()).map(PeerNames),
            },
            ..Self::new(addr, task, &places.names)
        }
    }
}

#[derive(Serialize)]
struct CloseBody<'a> {
    role: &'static str,
    closed_by: &'static str,
    /// Absent for connections that were open before the agent started.
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_us: Option<u64>,
    open_before_agent: bool,
    retransmits: u32,
    resets_received: u32,
    resets_sent: u32,
    src: Endpoint<'a>,
    dst: Endpoint<'a>,
}

#[derive(Serialize)]
struct RequestBody<'a> {
    role: &'static str,
    /// `UNKNOWN` for names not in Redis' command table.
    command: String,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Client: request's first byte sent → reply complete at the socket.
    /// Server: request arrived → reply's last byte written. Timeout: age.
    latency_us: f64,
    /// Client: same as `latency_us` — when the reply had reached the socket
    /// (whether or not the application read it).
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_arrival_us: Option<f64>,
    /// Request sent → the reply's first byte (arrived, or written).
    #[serde(skip_serializing_if = "Option::is_none")]
    first_byte_us: Option<f64>,
    /// Client: reply at the socket → the application read it. Server:
    /// request at the socket → Redis read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    app_read_delay_us: Option<f64>,
    /// Server: Redis read the request → wrote the first reply byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_us: Option<f64>,
    request_bytes: u64,
    reply_bytes: u64,
    /// Requests in flight on the connection when this one was sent, itself
    /// included (1: not pipelined).
    depth: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    closed_by: Option<&'static str>,
    /// On a TLS connection (op `tls`: a turn, or a command read in
    /// plaintext from the client's TLS library).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    tls: bool,
    cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(flatten)]
    pod: PodFields,
    src: Endpoint<'a>,
    dst: Endpoint<'a>,
}

#[derive(Serialize)]
struct LatencyBody<'a> {
    window_s: f64,
    role: &'static str,
    cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(flatten)]
    pod: PodFields,
    endpoint: Endpoint<'a>,
    /// The command (`GET`, `CLIENT SETNAME`), `UNKNOWN` if not in the table.
    op: &'a str,
    /// Requests that ended in the window, whatever the outcome.
    count: u64,
    ok: u64,
    nil: u64,
    errors: &'a std::collections::BTreeMap<String, u64>,
    timeouts: u64,
    /// Sent under `CLIENT REPLY OFF|SKIP`: no reply expected.
    no_reply: u64,
    /// Counted but not timed (too many in flight on one connection, or
    /// in flight when the stream had to be resynchronised).
    untimed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p90_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p999_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mean_us: Option<f64>,
    request_bytes: u64,
    reply_bytes: u64,
    /// Requests of series beyond `--max-series`, folded into `OTHER`.
    #[serde(skip_serializing_if = "is_zero")]
    overflowed: u64,
    /// Slow or timed-out requests whose `request` line was held back (at
    /// most `MAX_LINES_PER_SERIES` lines per series and window).
    #[serde(skip_serializing_if = "is_zero")]
    lines_suppressed: u64,
}

#[derive(Serialize)]
struct AlertBody<'a> {
    kind: &'static str,
    /// The same on an alert's `firing` and `resolved` events.
    id: &'a str,
    state: AlertState,
    severity: Severity,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<Endpoint<'a>>,
    workloads: Vec<WorkloadBody<'a>>,
    /// When the condition started.
    started: String,
    /// Resolved: when it ended, and how long it lasted.
    #[serde(skip_serializing_if = "Option::is_none")]
    ended: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_s: Option<f64>,
    evidence: &'a serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct WorkloadBody<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_id: Option<&'a str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    names: Option<PodNames>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<&'a str>,
}

impl<'a> WorkloadBody<'a> {
    fn new(w: &'a Workload, names: &Names) -> Self {
        Self {
            key: &w.key,
            pod_uid: w.pod_uid.as_deref(),
            container_id: w.container_id.as_deref(),
            names: w
                .pod_uid
                .as_deref()
                .and_then(|uid| names.pod(uid))
                .map(PodNames),
            cgroup: w.cgroup.as_deref(),
            comm: w.comm.as_deref(),
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct SynAckRetransmitBody<'a> {
    src: Endpoint<'a>,
    dst: Endpoint<'a>,
}

#[derive(Serialize)]
struct ConnectionsBody<'a> {
    role: &'static str,
    open: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    src: Option<GaugeSource<'a>>,
    dst: Endpoint<'a>,
}

#[derive(Serialize)]
struct GaugeSource<'a> {
    cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(flatten)]
    pod: PodFields,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<&'a str>,
}

/// Facts about the running agent, written once after all programs attached.
#[derive(Serialize)]
pub struct Started<'a> {
    pub version: &'a str,
    pub pid: u32,
    pub kernel: &'a str,
    pub ports: &'a [u16],
    pub tracepoints: &'a [String],
    /// Connections open before the agent started, now tracked.
    pub seeded_connections: usize,
}

/// Counters of the agent, written every `--stats-interval` and at exit.
#[derive(Serialize, Default, Debug, Clone, Copy)]
pub struct Stats {
    pub events: u64,
    pub decode_errors: u64,
    pub ring_buffer_full: u64,
    pub connect_map_full: u64,
    pub connection_map_full: u64,
    pub read_failed: u64,
    /// Holes in a stream that never filled (bytes lost to a full ring
    /// buffer, or waited for too long); the stream resynchronised.
    pub resp_gaps: u64,
    pub resp_flow_map_full: u64,
    /// Segments longer than what is copied per segment (rest skipped by length).
    pub resp_truncated: u64,
    /// Program runs the kernel skipped (another tracing program was
    /// running on that CPU): events lost in the kernel.
    pub missed_runs: u64,
    /// RESP bytes that could not be followed (skipped to the next boundary).
    pub resp_unparsed_bytes: u64,
    pub resp_desyncs: u64,
    /// Replies with no request they could answer.
    pub resp_unmatched_replies: u64,
    /// Connections found carrying TLS (timed as turns, op `tls`).
    pub tls_connections: u64,
    /// TLS library calls whose connection was not found (a memory BIO, a
    /// socket connected before the agent): their connections stay turns.
    pub tls_unresolved: u64,
    /// Observations a detector could not track: its bounded maps were full.
    pub detector_untracked: u64,
    /// Lines not written because stdout was not read fast enough (the
    /// queue to it was full); the ring buffer is drained regardless.
    pub lines_dropped: u64,
}

impl Stats {
    pub fn with_tracker(mut self, tracker: crate::tracker::TrackerStats) -> Self {
        self.resp_unparsed_bytes = tracker.unparsed_bytes;
        self.resp_desyncs = tracker.desyncs;
        self.resp_gaps = tracker.gaps;
        self.resp_unmatched_replies = tracker.unmatched_replies;
        self.tls_connections = tracker.tls_connections;
        self
    }

    pub fn with_lines_dropped(mut self, lines_dropped: u64) -> Self {
        self.lines_dropped = lines_dropped;
        self
    }

    pub fn with_kernel(mut self, kernel: KernelStats) -> Self {
        self.ring_buffer_full = kernel.ring_buffer_full;
        self.connect_map_full = kernel.connect_map_full;
        self.connection_map_full = kernel.connection_map_full;
        self.read_failed = kernel.read_failed;
        self.resp_flow_map_full = kernel.resp_flow_map_full;
        self.resp_truncated = kernel.resp_truncated;
        self.tls_unresolved = kernel.tls_unresolved;
        self.missed_runs = kernel.missed_runs;
        self
    }
}

impl<W: Write> JsonSink<W> {
    /// JSON lines on `out`, each naming `node`.
    pub fn new(out: W, clock: Clock, node: &str) -> Self {
        Self {
            out,
            clock,
            node: node.into(),
            pretty: None,
            places: Default::default(),
        }
    }

    /// Redis endpoints get their zone and locality from `zones`.
    pub fn with_zones(mut self, zones: Zones) -> Self {
        std::sync::Arc::make_mut(&mut self.places).zones = zones;
        self
    }

    /// Pods and Redis endpoints get their names from the Kubernetes API.
    pub fn with_names(mut self, names: Names) -> Self {
        std::sync::Arc::make_mut(&mut self.places).names = names;
        self
    }

    /// `--format pretty` instead of JSON; ANSI colours if `colour`.
    pub fn pretty(mut self, colour: bool) -> Self {
        self.pretty = Some(colour);
        self
    }

    pub fn output(&self) -> &W {
        &self.out
    }

    pub fn into_output(self) -> W {
        self.out
    }

    pub fn event(&mut self, event: &Event) -> std::io::Result<()> {
        let places = self.places.clone();
        match event {
            Event::Connect(connect) => {
                let ts = self.clock.wall_time(connect.ts_ns);
                self.line(ts, "connect", connect_body(connect, &places))
            }
            Event::Close(close) => {
                let ts = self.clock.wall_time(close.ts_ns);
                self.line(ts, "close", close_body(close, &places))
            }
            Event::SynAckRetransmit(retransmit) => {
                let ts = self.clock.wall_time(retransmit.ts_ns);
                self.line(ts, "synack_retransmit", synack_body(retransmit, &places))
            }
            // Raw RESP capture: the tracker turns it into exchanges.
            Event::AppRead { .. } | Event::SocketGone { .. } => Ok(()),
        }
    }

    /// One `request` line.
    pub fn exchange(&mut self, exchange: &Exchange) -> std::io::Result<()> {
        let ts = self.clock.wall_time(exchange.ts_ns);
        let places = self.places.clone();
        self.line(ts, "request", request_body(exchange, &places))
    }

    /// One `latency` line per (role, cgroup, endpoint, command) active in
    /// the window.
    pub fn latency(&mut self, window: &Window) -> std::io::Result<()> {
        let now = SystemTime::now();
        let places = self.places.clone();
        for series in &window.series {
            let body = LatencyBody {
                window_s: window.seconds,
                role: role_name(series.role),
                cgroup_id: series.cgroup_id,
                cgroup: series.cgroup.as_deref(),
                pod: PodFields::of(series.cgroup.as_deref(), &places.names),
                endpoint: Endpoint::redis(series.endpoint, None, &places),
                op: &series.op,
                count: series.count,
                ok: series.ok,
                nil: series.nil,
                errors: &series.errors,
                timeouts: series.timeouts,
                no_reply: series.no_reply,
                untimed: series.untimed,
                p50_us: series.percentiles.map(|p| p[0]),
                p90_us: series.percentiles.map(|p| p[1]),
                p99_us: series.percentiles.map(|p| p[2]),
                p999_us: series.percentiles.map(|p| p[3]),
                max_us: series.max_us,
                mean_us: series.mean_us,
                request_bytes: series.request_bytes,
                reply_bytes: series.reply_bytes,
                overflowed: if series.op == "OTHER" {
                    window.overflowed
                } else {
                    0
                },
                lines_suppressed: series.lines_suppressed,
            };
            self.line(now, "latency", body)?;
        }
        Ok(())
    }

    /// One `connections` line per gauge.
    pub fn gauges(&mut self, gauges: &[Gauge]) -> std::io::Result<()> {
        let now = SystemTime::now();
        let places = self.places.clone();
        for gauge in gauges {
            let body = ConnectionsBody {
                role: gauge.key.role,
                open: gauge.open,
                src: (gauge.key.role == "client").then(|| GaugeSource {
                    cgroup_id: gauge.key.cgroup_id,
                    cgroup: gauge.cgroup.as_deref(),
                    pod: PodFields::of(gauge.cgroup.as_deref(), &places.names),
                    comm: gauge.comm.as_deref(),
                }),
                dst: Endpoint::redis(gauge.key.server, None, &places),
            };
            self.line(now, "connections", body)?;
        }
        Ok(())
    }

    /// One `alert` line: a detector's alert started or ended.
    pub fn alert(&mut self, alert: &Alert) -> std::io::Result<()> {
        let places = self.places.clone();
        let body = AlertBody {
            kind: alert.kind,
            id: &alert.id,
            state: alert.state,
            severity: alert.severity,
            message: &alert.message,
            endpoint: alert.endpoint.map(|e| Endpoint::redis(e, None, &places)),
            workloads: alert
                .workloads
                .iter()
                .map(|w| WorkloadBody::new(w, &places.names))
                .collect(),
            started: self.rfc3339(alert.started_ns),
            ended: alert.ended_ns.map(|ns| self.rfc3339(ns)),
            duration_s: alert
                .ended_ns
                .map(|ended| (ended.saturating_sub(alert.started_ns) as f64 / 1e6).round() / 1e3),
            evidence: &alert.evidence,
        };
        self.line(SystemTime::now(), "alert", body)
    }

    fn rfc3339(&self, monotonic_ns: u64) -> String {
        humantime::format_rfc3339_micros(self.clock.wall_time(monotonic_ns)).to_string()
    }

    pub fn started(&mut self, started: &Started<'_>) -> std::io::Result<()> {
        self.line(SystemTime::now(), "started", started)
    }

    pub fn stats(&mut self, stats: &Stats) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct StatsBody<'a> {
            #[serde(flatten)]
            counters: &'a Stats,
            kubernetes: crate::kube::KubeStats,
        }
        let body = StatsBody {
            counters: stats,
            kubernetes: self.places.names.stats(),
        };
        self.line(SystemTime::now(), "stats", body)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn line<T: Serialize>(&mut self, ts: SystemTime, kind: &str, body: T) -> std::io::Result<()> {
        let line = Line {
            ts: Rfc3339Micros(ts),
            kind,
            node: &self.node,
            schema_version: SCHEMA_VERSION,
            body,
        };
        if let Some(colour) = self.pretty {
            let value = serde_json::to_value(&line)?;
            return super::pretty::write_line(&mut self.out, &value, colour);
        }
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }
}

fn connect_body<'a>(c: &'a Connect, places: &'a Places) -> ConnectBody<'a> {
    // Rounded up: a handshake that happened never reports 0 µs.
    let micros = c.duration_ns.div_ceil(1_000);
    let established = c.outcome == ConnectOutcome::Established;
    ConnectBody {
        outcome: c.outcome.name(),
        answer: answer_name(c.answer),
        handshake_us: established.then_some(micros),
        failed_after_us: (!established).then_some(micros),
        syn_retransmits: c.syn_retransmits,
        path_drop_suspected: !established && c.answer == SynAnswer::None && c.syn_retransmits > 0,
        error: c.error.map(errno_name),
        src: Endpoint::new(c.src, Some(&c.task), &places.names),
        dst: Endpoint::redis(c.dst, None, places),
    }
}

fn close_body<'a>(c: &'a Close, places: &'a Places) -> CloseBody<'a> {
    let (client_task, server_task) = match c.role {
        ConnectionRole::Client => (c.task.as_ref(), None),
        ConnectionRole::Server => (None, c.task.as_ref()),
    };
    CloseBody {
        role: role_name(c.role),
        closed_by: closer_name(c.closer),
        duration_us: c.duration_ns.map(|ns| ns.div_ceil(1_000)),
        open_before_agent: c.duration_ns.is_none(),
        retransmits: c.counters.retransmits,
        resets_received: c.counters.resets_received,
        resets_sent: c.counters.resets_sent,
        src: Endpoint::new(c.client, client_task, &places.names),
        dst: Endpoint::redis(c.server, server_task, places),
    }
}

fn micros(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

pub fn role_name(role: ConnectionRole) -> &'static str {
    match role {
        ConnectionRole::Client => "client",
        ConnectionRole::Server => "server",
    }
}

pub fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Nil => "nil",
        Outcome::Error(_) => "error",
        Outcome::Timeout => "timeout",
        Outcome::NoReply => "no_reply",
        Outcome::Untimed => "untimed",
    }
}

fn request_body<'a>(e: &'a Exchange, places: &'a Places) -> RequestBody<'a> {
    let client = e.role == ConnectionRole::Client;
    let answered = matches!(e.outcome, Outcome::Ok | Outcome::Nil | Outcome::Error(_));
    // Plaintext from the client's TLS library ends at its read, not at the
    // socket.
    let plaintext = e.tls && e.command.id() != Command::TLS.id();
    RequestBody {
        role: role_name(e.role),
        command: e.command.to_string(),
        outcome: outcome_label(e.outcome),
        error: match e.outcome {
            Outcome::Error(prefix) => Some(prefix.to_string()),
            _ => None,
        },
        latency_us: micros(e.latency_ns),
        reply_arrival_us: (client && answered && !plaintext).then(|| micros(e.latency_ns)),
        first_byte_us: e.first_byte_ns.map(micros),
        app_read_delay_us: e.read_delay_ns.map(micros),
        service_us: (!client && answered)
            .then_some(())
            .and(e.read_delay_ns)
            .map(|read| micros(e.latency_ns.saturating_sub(read))),
        request_bytes: e.request_bytes,
        reply_bytes: e.reply_bytes,
        depth: e.depth,
        closed_by: e.closer.map(closer_name),
        tls: e.tls,
        cgroup_id: e.cgroup_id,
        cgroup: e.cgroup.as_deref(),
        pod: PodFields::of(e.cgroup.as_deref(), &places.names),
        src: Endpoint::new(e.client, None, &places.names),
        dst: Endpoint::redis(e.server, None, places),
    }
}

fn synack_body<'a>(r: &'a SynAckRetransmit, places: &'a Places) -> SynAckRetransmitBody<'a> {
    SynAckRetransmitBody {
        src: Endpoint::new(r.client, None, &places.names),
        dst: Endpoint::redis(r.server, None, places),
    }
}

pub fn closer_name(closer: Closer) -> &'static str {
    match closer {
        Closer::Unknown => "unknown",
        Closer::Local => "local",
        Closer::Peer => "peer",
        Closer::PeerReset => "peer_reset",
        Closer::LocalAbort => "local_abort",
    }
}

pub fn answer_name(answer: SynAnswer) -> &'static str {
    match answer {
        SynAnswer::None => "none",
        SynAnswer::SynAck => "syn_ack",
        SynAnswer::Rst => "rst",
        SynAnswer::Icmp => "icmp",
    }
}

fn errno_name(error: i32) -> String {
    match error {
        errno::ECONNREFUSED => "ECONNREFUSED".into(),
        errno::ETIMEDOUT => "ETIMEDOUT".into(),
        errno::EHOSTUNREACH => "EHOSTUNREACH".into(),
        errno::ENETUNREACH => "ENETUNREACH".into(),
        errno::EHOSTDOWN => "EHOSTDOWN".into(),
        errno::ENETDOWN => "ENETDOWN".into(),
        other => format!("errno {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Task;

    fn connect(outcome: ConnectOutcome, answer: SynAnswer, retransmits: u32) -> Connect {
        Connect {
            ts_ns: 1,
            src: "10.0.1.5:40312".parse().unwrap(),
            dst: "[2001:db8::9]:6379".parse().unwrap(),
            outcome,
            answer,
            error: (outcome == ConnectOutcome::Timeout).then_some(errno::ETIMEDOUT),
            syn_retransmits: retransmits,
            task: Task {
                pid: 812,
                tid: 812,
                comm: "java".into(),
                cgroup_id: 4242,
                cgroup: Some("/kubepods/burstable/pod1234/abc".into()),
            },
            duration_ns: 56_001,
        }
    }

    fn render(event: &Event) -> serde_json::Value {
        let mut sink = JsonSink::new(Vec::new(), Clock::new(), "node-1");
        sink.event(event).unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn an_alert_line_names_its_workloads_zone_and_times() {
        use crate::detect::testing::{MS, S, pod, pod_uid, redis};
        let clock = Clock::new();
        let zones = Zones::new(
            Some("zone-a".into()),
            vec!["10.2.0.0/16=zone-b".parse().unwrap()],
        );
        let mut sink = JsonSink::new(Vec::new(), clock, "node-1").with_zones(zones);
        let alert = Alert {
            kind: "syn_drops",
            id: "syn_drops/10.2.0.9:6379".into(),
            state: AlertState::Resolved,
            severity: Severity::Critical,
            message: "m".into(),
            endpoint: Some(redis(9)),
            workloads: vec![pod(1)],
            started_ns: 5 * S,
            ended_ns: Some(7 * S + 500 * MS),
            evidence: serde_json::json!({ "unanswered_connects": 3 })
                .as_object()
                .unwrap()
                .clone(),
        };
        sink.alert(&alert).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&sink.out).unwrap();
        let started = humantime::format_rfc3339_micros(clock.wall_time(5 * S)).to_string();
        assert_eq!(v["started"], started.as_str());
        assert!(v["ended"].as_str().unwrap() > started.as_str());
        for field in ["ts", "node", "schema_version", "started", "ended"] {
            v.as_object_mut().unwrap().remove(field);
        }
        assert_eq!(
            v,
            serde_json::json!({
                "type": "alert",
                "kind": "syn_drops",
                "id": "syn_drops/10.2.0.9:6379",
                "state": "resolved",
                "severity": "critical",
                "message": "m",
                "endpoint": { "ip": "10.2.0.9", "port": 6379, "zone": "zone-b", "locality": "cross_zone" },
                "workloads": [{
                    "key": format!("pod:{}", pod_uid(1)),
                    "pod_uid": pod_uid(1),
                    "container_id": "4f2a9b1c8d7e6f5a4b3c2d1e0f9a8b7c",
                    "cgroup": pod(1).cgroup.as_deref().unwrap(),
                    "comm": "java",
                }],
                "duration_s": 2.5,
                "evidence": { "unanswered_connects": 3 },
            })
        );
    }

    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    fn names() -> Names {
        Names::for_tests(
            &[
                serde_json::json!({
                    "metadata": { "name": "api-7d9f8b6c5d-x2x9q", "namespace": "shop", "uid": UID,
                        "labels": { "app": "api", "pod-template-hash": "7d9f8b6c5d" },
                        "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet",
                            "name": "api-7d9f8b6c5d", "uid": "o", "controller": true }] },
                    "status": { "phase": "Running", "podIP": "10.0.1.5" },
                }),
                serde_json::json!({
                    "metadata": { "name": "redis-0", "namespace": "cache", "uid": "u-redis",
                        "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "StatefulSet",
                            "name": "redis", "uid": "o2", "controller": true }] },
                    "status": { "phase": "Running", "podIP": "10.0.2.9" },
                }),
            ],
            &[serde_json::json!({
                "metadata": { "name": "redis", "namespace": "cache" },
                "spec": { "clusterIP": "172.20.0.10" },
            })],
        )
    }

    #[test]
    fn pods_and_redis_endpoints_are_named_when_the_api_knows_them() {
        let mut sink = JsonSink::new(Vec::new(), Clock::new(), "node-1").with_names(names());
        let mut event = connect(ConnectOutcome::Established, SynAnswer::SynAck, 0);
        event.task.cgroup = Some(format!("/kubepods/burstable/pod{UID}/abcdef0123456789"));
        event.dst = "10.0.2.9:6379".parse().unwrap();
        sink.event(&Event::Connect(event.clone())).unwrap();
        // A Service's ClusterIP: the Service, not a guessed pod.
        event.dst = "172.20.0.10:6379".parse().unwrap();
        sink.event(&Event::Connect(event.clone())).unwrap();
        // Unknown to the API: the UID only.
        event.task.cgroup = Some(
            "/kubepods/burstable/pod11111111-2222-3333-4444-555555555555/abcdef0123456789".into(),
        );
        event.dst = "10.9.9.9:6379".parse().unwrap();
        sink.event(&Event::Connect(event)).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(sink.out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let src = &lines[0]["src"];
        assert_eq!(src["pod_uid"], UID);
        assert_eq!(src["namespace"], "shop");
        assert_eq!(src["pod"], "api-7d9f8b6c5d-x2x9q");
        assert_eq!(src["workload"], "deployment/api");
        assert_eq!(src["labels"], serde_json::json!({ "app": "api" }));
        let dst = &lines[0]["dst"];
        assert_eq!(
            (&dst["namespace"], &dst["pod"], &dst["workload"]),
            (
                &serde_json::json!("cache"),
                &serde_json::json!("redis-0"),
                &serde_json::json!("statefulset/redis")
            )
        );
        assert!(dst.get("labels").is_none(), "no chosen label: {dst}");
        assert_eq!(lines[1]["dst"]["service"], "redis");
        assert_eq!(lines[1]["dst"]["namespace"], "cache");
        assert!(lines[1]["dst"].get("pod").is_none());
        for field in ["namespace", "pod", "workload"] {
            assert!(lines[2]["src"].get(field).is_none(), "{}", lines[2]);
            assert!(lines[2]["dst"].get(field).is_none(), "{}", lines[2]);
        }
    }

    #[test]
    fn alert_workloads_and_stats_carry_the_api_state() {
        use crate::detect::testing::{pod, redis};
        let workload = pod(1).with_pod_uid(UID);
        let mut sink = JsonSink::new(Vec::new(), Clock::new(), "node-1").with_names(names());
        let alert = Alert {
            kind: "syn_drops",
            id: "syn_drops/x".into(),
            state: AlertState::Firing,
            severity: Severity::Warning,
            message: "m".into(),
            endpoint: Some(redis(9)),
            workloads: vec![workload],
            started_ns: 1,
            ended_ns: None,
            evidence: serde_json::Map::new(),
        };
        sink.alert(&alert).unwrap();
        sink.stats(&Stats::default()).unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        let mut lines = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        let alert = lines.next().unwrap();
        assert_eq!(alert["workloads"][0]["pod"], "api-7d9f8b6c5d-x2x9q");
        assert_eq!(alert["workloads"][0]["workload"], "deployment/api");
        let stats = lines.next().unwrap();
        assert_eq!(stats["kubernetes"]["state"], "off");
        assert_eq!(stats["kubernetes"]["pods"], 2);
    }

    #[test]
    fn established_connect_line() {
        let v = render(&Event::Connect(connect(
            ConnectOutcome::Established,
            SynAnswer::SynAck,
            0,
        )));
        assert_eq!(v["type"], "connect");
        assert_eq!(v["node"], "node-1");
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
        assert_eq!(v["outcome"], "established");
        assert_eq!(v["answer"], "syn_ack");
        assert_eq!(v["handshake_us"], 57);
        assert!(v.get("failed_after_us").is_none());
        assert_eq!(v["path_drop_suspected"], false);
        assert_eq!(v["src"]["ip"], "10.0.1.5");
        assert_eq!(v["src"]["comm"], "java");
        assert_eq!(v["src"]["cgroup"], "/kubepods/burstable/pod1234/abc");
        assert_eq!(v["dst"]["ip"], "2001:db8::9");
        assert_eq!(v["dst"]["port"], 6379);
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn unanswered_timeout_is_a_suspected_path_drop() {
        let v = render(&Event::Connect(connect(
            ConnectOutcome::Timeout,
            SynAnswer::None,
            1,
        )));
        assert_eq!(v["outcome"], "timeout");
        assert_eq!(v["failed_after_us"], 57);
        assert_eq!(v["error"], "ETIMEDOUT");
        assert_eq!(v["path_drop_suspected"], true);
    }
}
