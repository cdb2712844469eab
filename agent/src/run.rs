//! The agent's main loop: ring buffer → decode → sink, stats on a timer,
//! clean detach on SIGINT/SIGTERM.

use std::{
    collections::BTreeSet,
    io::{ErrorKind, IsTerminal as _, Write},
    os::fd::AsFd as _,
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use agent_common::{ConnectionRole, ConnectionState, FlowTuple};

use crate::{
    aggregate::Aggregator,
    cli::{Cli, Emit, Format},
    clock::{Clock, monotonic_ns},
    decode::{Event, decode},
    detect::{Alert, AlertState, DetectorConfig, Detectors, Observation},
    enrich::Enricher,
    gauges::{Gauge, open_connection_gauges},
    http::{self, Health},
    kube,
    observe::Observer,
    preflight,
    probes::{KernelStats, LoadOptions, Probes, connection, resp::PacketHook},
    procfs,
    rings::{self, EventRings},
    sinks::{
        json::{JsonSink, Started, Stats},
        metrics::Metrics,
        stdout::{LineQueue, QUEUE_LIMIT_BYTES},
    },
    tracker::{Exchange, Outcome, Tracker},
    workload::Workload,
    zones::Zones,
};

/// Longest time an event waits in the ring buffer before it is written.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// How often unanswered requests are checked against `--request-timeout`
/// and exchanges waiting for a read are given up.
const TICK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long the agent waits at exit for its last lines to reach stdout
/// (well within Kubernetes' default 30 s termination grace period).
const EXIT_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let ports = cli.watched_ports().map_err(anyhow::Error::msg)?;
    let kernel = preflight::check()?;
    tracing::debug!(?kernel, "preflight checks passed");

    // Listening before the programs load: `/readyz` says 503 meanwhile.
    let health = Arc::new(Health::default());
    let metrics = match cli.http_addr {
        Some(addr) => {
            let metrics = Metrics::new();
            let bound = http::serve(addr, metrics.registry(), Arc::clone(&health))?;
            tracing::info!("serving /metrics, /healthz and /readyz on http://{bound}");
            Some(metrics)
        }
        None => None,
    };

    // The mount cgroup ids are named from; `cgroup_root` is where the packet
    // programs attach (on a cgroup-v1-only node, one mounted for the agent).
    let cgroup_mount = match &cli.cgroup_root {
        Some(dir) => Some(procfs::check_cgroup2(dir).context("--cgroup-root")?),
        None => procfs::cgroup2_mount(),
    };
    let cgroup_root = match &cgroup_mount {
        Some(mount) => mount.clone(),
        None => procfs::cgroup2_root().map_err(|e| kernel.explain(e))?,
    };
    let (mut probes, rings) = Probes::load(&LoadOptions {
        ports: &ports,
        ring_buffer_bytes: cli.ring_buffer_kib * 1024,
        tracefs: &kernel.tracefs,
        cgroup_root: &cgroup_root,
        hook: if cli.counting_floor {
            PacketHook::CountingFloor
        } else if cli.bare_hook {
            PacketHook::Bare
        } else {
            PacketHook::Resp
        },
        tls_uprobes: !cli.no_tls_uprobes,
    })
    .map_err(|e| kernel.explain(e))?;
    let attached = std::mem::take(&mut probes.attached);
    let seeds = connection::seeds(&ports, cgroup_mount.as_deref(), monotonic_ns());
    let seeded_connections = probes.seed_connections(&seeds);
    tracing::info!(
        "watching TCP ports {ports:?} with {} kernel programs on Linux {}",
        attached.len(),
        kernel.release
    );

    // Before `started`: whoever waits for it may signal us right away.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let node = match cli.node_name.clone() {
        Some(node) => node,
        None => procfs::hostname().context("naming the node (or set --node-name)")?,
    };
    let names = kubernetes(&cli, &node)?;
    let mut zones = Zones::new(cli.zone.clone(), cli.zone_cidr.clone());
    if cli.zone.is_none() {
        zones = zones.with_node_zone_from(names.clone());
    }
    let mut sink = stdout_sink(cli.format, &node)?
        .with_zones(zones.clone())
        .with_names(names.clone());
    sink.started(&Started {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        kernel: &kernel.release,
        ports: &ports,
        tracepoints: &attached,
        seeded_connections,
    })?;
    sink.flush()?;

    let mut stats_timer = (!cli.stats_interval.is_zero()).then(|| {
        let mut timer = tokio::time::interval(cli.stats_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer.reset();
        timer
    });
    // The kernel wakes us only when the ring buffer fills up (see
    // `Config::wakeup_bytes`); below that, events wait at most this long.
    let mut drain_timer = tokio::time::interval(DRAIN_INTERVAL);
    drain_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Records too young to hand on at a read are read again shortly, not
    // at the next tick (see `rings`).
    let mut redrain_at: Option<tokio::time::Instant> = None;
    let redrain_time =
        || tokio::time::Instant::now() + std::time::Duration::from_nanos(2 * rings::SETTLE_NS);
    let mut gauge_timer = tokio::time::interval(cli.interval);
    gauge_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gauge_timer.reset();
    let mut gauge_keys = BTreeSet::new();
    let enricher = Enricher::with_cgroup_root(cgroup_mount);
    let mut pipeline = Pipeline::new(
        enricher,
        &cli.detectors.config(cli.slow_threshold),
        metrics,
        PipelineOptions {
            emit_all: cli.emit == Emit::All,
            slow_ns: u64::try_from(cli.slow_threshold.as_nanos()).unwrap_or(u64::MAX),
            max_series: cli.max_series,
            zones,
        },
    )
    .with_names(names);
    let mut window_start = std::time::Instant::now();
    let mut last_tick = std::time::Instant::now();
    let mut stats = Stats::default();
    let rings = EventRings::new(rings).context("polling the event rings")?;
    // SAFETY: `EventRings` owns its epoll fd, which stays open and the same
    // until the AsyncFd (and the rings inside it) is dropped.
    let mut events = unsafe { AsyncFd::register(rings) }
        .map_err(std::io::Error::from)
        .context("polling the event rings")?;

    let result: anyhow::Result<()> = loop {
        tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready.context("waiting for events")?;
                if drain(guard.get_inner_mut(), &mut pipeline, &mut sink, &mut stats)? {
                    redrain_at.get_or_insert_with(redrain_time);
                }
                guard.clear_ready();
                pipeline.inspect_connecting(&mut probes);
                sink.flush()?;
            }
            _ = async { stats_timer.as_mut().unwrap().tick().await }, if stats_timer.is_some() => {
                let kernel = probes.kernel_stats();
                let lines_dropped = sink.output().lines_dropped();
                sink.stats(&pipeline.stats(stats, kernel).with_lines_dropped(lines_dropped))?;
                sink.flush()?;
            }
            _ = async { tokio::time::sleep_until(redrain_at.unwrap()).await }, if redrain_at.is_some() => {
                redrain_at = None;
                if drain(events.get_mut(), &mut pipeline, &mut sink, &mut stats)? {
                    redrain_at = Some(redrain_time());
                }
                pipeline.inspect_connecting(&mut probes);
                sink.flush()?;
            }
            _ = drain_timer.tick() => {
                health.beat();
                if drain(events.get_mut(), &mut pipeline, &mut sink, &mut stats)? {
                    redrain_at.get_or_insert_with(redrain_time);
                }
                pipeline.inspect_connecting(&mut probes);
                if last_tick.elapsed() >= TICK_INTERVAL {
                    last_tick = std::time::Instant::now();
                    let now = monotonic_ns();
                    pipeline.tracker.tick(now, cli.request_timeout, &mut pipeline.exchanges);
                    pipeline.write_exchanges(&mut sink).map_err(output_error)?;
                    pipeline.write_alerts(now, &mut sink).map_err(output_error)?;
                }
                sink.flush()?;
            }
            _ = gauge_timer.tick() => {
                probes.tls_upkeep();
                let connections = probes.open_connections();
                let mut gauges = open_connection_gauges(&connections, &gauge_keys);
                gauge_keys = gauges.iter().filter(|g| g.open > 0).map(|g| g.key.clone()).collect();
                pipeline.enricher.gauges(&mut gauges);
                pipeline.observe_connections(monotonic_ns(), &connections, &gauges);
                sink.gauges(&gauges).map_err(output_error)?;
                let seconds = window_start.elapsed().as_secs_f64();
                window_start = std::time::Instant::now();
                pipeline.write_window(seconds, &mut sink).map_err(output_error)?;
                sink.flush()?;
                let totals = stats.with_kernel(probes.kernel_stats()).with_tracker(pipeline.tracker.stats());
                pipeline.update_metrics(&gauges, &totals);
                health.set_ready();
            }
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    // Whatever is still queued, the last partial window, the final counters.
    drain_all(events.get_mut(), &mut pipeline, &mut sink, &mut stats)?;
    pipeline.tracker.flush(&mut pipeline.exchanges);
    pipeline.write_exchanges(&mut sink).map_err(output_error)?;
    pipeline
        .write_window(window_start.elapsed().as_secs_f64(), &mut sink)
        .map_err(output_error)?;
    let kernel = probes.kernel_stats();
    let lines_dropped = sink.output().lines_dropped();
    sink.stats(
        &pipeline
            .stats(stats, kernel)
            .with_lines_dropped(lines_dropped),
    )?;
    match sink.into_output().finish(EXIT_FLUSH_TIMEOUT) {
        Err(err) if err.kind() == ErrorKind::TimedOut => tracing::warn!("{err}"),
        other => other.map_err(output_error)?,
    }
    if cli.counting_floor {
        let [requests, replies, sent, received, unwalked] = probes.floor_counts()?;
        tracing::info!(
            "counting floor: {requests} requests and {replies} replies in {sent} segments sent \
             ({unwalked} not walked to their end); {received} segments received"
        );
    }
    tracing::info!("detaching");
    result
}

/// Starts the Kubernetes metadata watches when enabled (`--kubernetes`);
/// names stay empty otherwise.
fn kubernetes(cli: &Cli, node: &str) -> anyhow::Result<kube::Names> {
    let flags = &cli.kubernetes;
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
    if !flags.enabled(in_cluster) {
        return Ok(kube::off());
    }
    tracing::info!("naming pods of node {node} from the Kubernetes API");
    let names = kube::start(kube::KubeOptions {
        kubeconfig: flags.kubeconfig.clone(),
        node: node.to_string(),
        pod_labels: flags.pod_labels.clone(),
        redis_pod_selector: flags.redis_pod_selector.clone(),
        watch_services: flags.watch_services,
    })
    .context("--kubernetes")?;
    Ok(names)
}

/// The event sink on stdout, through a writer thread (see `sinks::stdout`).
fn stdout_sink(format: Format, node: &str) -> anyhow::Result<JsonSink<LineQueue>> {
    let stdout = std::io::stdout();
    // Written through its own fd, past std's line-buffered `Stdout`.
    let fd = stdout
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdout")?;
    let queue = LineQueue::spawn(std::fs::File::from(fd), QUEUE_LIMIT_BYTES)
        .context("starting the stdout writer thread")?;
    let sink = JsonSink::new(queue, Clock::new(), node);
    Ok(match format {
        Format::Json => sink,
        Format::Pretty => sink.pretty(stdout.is_terminal()),
    })
}

/// What the pipeline writes and keeps.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// A `request` line for every request, else only for those at least
    /// `slow_ns` slow and timeouts.
    pub emit_all: bool,
    pub slow_ns: u64,
    /// `latency` series per window at most (`--max-series`).
    pub max_series: usize,
    /// For the detectors: where each request's endpoint is relative to its
    /// client.
    pub zones: Zones,
}

/// The stages after decode: enrich, track RESP, aggregate, detect.
pub struct Pipeline {
    enricher: Enricher,
    tracker: Tracker,
    aggregator: Aggregator,
    /// With `--http-addr` only.
    metrics: Option<Metrics>,
    /// Finished exchanges not yet written.
    exchanges: Vec<Exchange>,
    observer: Observer,
    detectors: Detectors,
    alerts: Vec<Alert>,
    emit_all: bool,
    slow_ns: u64,
    zones: Zones,
    /// For `/metrics`' info series (events are named by the sink).
    names: kube::Names,
    /// Processes that connected to a watched port since the last
    /// [`Pipeline::inspect_connecting`].
    connecting_pids: Vec<u32>,
}

impl Pipeline {
    pub fn new(
        enricher: Enricher,
        detectors: &DetectorConfig,
        metrics: Option<Metrics>,
        options: PipelineOptions,
    ) -> Self {
        let PipelineOptions {
            emit_all,
            slow_ns,
            max_series,
            zones,
        } = options;
        Self {
            enricher,
            tracker: Tracker::default(),
            aggregator: Aggregator::new(max_series),
            metrics,
            exchanges: Vec::new(),
            observer: Observer::default(),
            detectors: Detectors::new(detectors),
            alerts: Vec::new(),
            emit_all,
            slow_ns,
            zones,
            names: kube::Names::default(),
            connecting_pids: Vec::new(),
        }
    }

    /// Has the TLS library of each process that connected to a watched
    /// port since the last call probed (`probes::tls`).
    pub fn inspect_connecting(&mut self, probes: &mut Probes) {
        for pid in self.connecting_pids.drain(..) {
            probes.inspect_tls(pid);
        }
    }

    /// Names from the Kubernetes API for `/metrics` (`resptrace_*_info`).
    pub fn with_names(mut self, names: kube::Names) -> Self {
        self.names = names;
        self
    }

    /// Writes the `latency` window that ends now and starts the next.
    pub fn write_window<W: Write>(
        &mut self,
        seconds: f64,
        sink: &mut JsonSink<W>,
    ) -> std::io::Result<()> {
        let mut window = self.aggregator.window(seconds);
        self.enricher.window(&mut window);
        sink.latency(&window)
    }

    /// One ring buffer record through decode, enrich, the RESP tracker,
    /// aggregation and the detectors; kernel events are written, finished
    /// exchanges queued (see `write_exchanges`).
    pub fn record<W: Write>(
        &mut self,
        record: &[u8],
        sink: &mut JsonSink<W>,
        stats: &mut Stats,
    ) -> std::io::Result<()> {
        // The hot path: RESP payload records, parsed in place.
        match crate::decode::segment(record) {
            Some(Ok(segment)) => {
                stats.events += 1;
                self.tracker.segment(&segment, &mut self.exchanges);
                return Ok(());
            }
            Some(Err(err)) => {
                stats.decode_errors += 1;
                tracing::warn!("dropping an event record: {err}");
                return Ok(());
            }
            None => {}
        }
        let mut event = match decode(record) {
            Ok(event) => event,
            Err(err) => {
                stats.decode_errors += 1;
                tracing::warn!("dropping an event record: {err}");
                return Ok(());
            }
        };
        stats.events += 1;
        match event {
            Event::AppRead { ts_ns, cookie } => {
                self.tracker.app_read(cookie, ts_ns, &mut self.exchanges);
                Ok(())
            }
            Event::SocketGone { ts_ns, cookie } => {
                self.tracker.socket_gone(cookie, ts_ns, &mut self.exchanges);
                Ok(())
            }
            _ => {
                self.enricher.enrich(&mut event);
                self.event(&event);
                sink.event(&event)
            }
        }
    }

    /// The agent's counters with the pipeline's and the kernel's.
    fn stats(&self, stats: Stats, kernel: KernelStats) -> Stats {
        Stats {
            detector_untracked: self.detectors.untracked(),
            ..stats.with_kernel(kernel).with_tracker(self.tracker.stats())
        }
    }

    fn observe(&mut self, observation: &Observation) {
        self.detectors.observe(observation);
    }

    /// A decoded kernel event (enriched): counted and shown to the detectors.
    fn event(&mut self, event: &Event) {
        match event {
            Event::Connect(connect) => {
                self.connecting_pids.push(connect.task.pid);
                self.aggregator.record_connect(connect);
                let workload = self.enricher.workload_of_task(&connect.task);
                if let Some(metrics) = &mut self.metrics {
                    metrics.record_connect(connect, workload.key.clone());
                }
                self.observe(&Observer::connect(connect, workload));
            }
            Event::Close(close) => {
                let workload = match &close.task {
                    Some(task) => self.enricher.workload_of_task(task),
                    None => Workload::unknown(),
                };
                if let Some(observation) = self.observer.close(close, workload) {
                    self.observe(&observation);
                }
            }
            _ => {}
        }
    }

    fn observe_connections(
        &mut self,
        now_ns: u64,
        connections: &[(FlowTuple, ConnectionState)],
        gauges: &[Gauge],
    ) {
        let mut observations = Vec::new();
        self.observer.connections(
            now_ns,
            connections,
            gauges,
            &mut self.enricher,
            &mut observations,
        );
        for observation in &observations {
            self.observe(observation);
        }
    }

    /// Evaluates the detectors and writes the alerts that changed state.
    pub fn write_alerts<W: Write>(
        &mut self,
        now_ns: u64,
        sink: &mut JsonSink<W>,
    ) -> std::io::Result<()> {
        self.detectors.evaluate(now_ns, &mut self.alerts);
        for alert in self.alerts.drain(..) {
            if let Some(metrics) = &mut self.metrics {
                let firing = alert.state == AlertState::Firing;
                metrics.set_alert(alert.kind, alert.endpoint, firing);
            }
            sink.alert(&alert)?;
        }
        Ok(())
    }

    /// Aggregates the finished exchanges and writes those that get a line.
    pub fn write_exchanges<W: Write>(&mut self, sink: &mut JsonSink<W>) -> std::io::Result<()> {
        // Taken out (and put back, keeping its allocation) so the loop can
        // use `self`; walked in place, not drained: an exchange is a few
        // hundred bytes and moving each out cost 5% of the agent's CPU with
        // `-P 16`.
        let mut exchanges = std::mem::take(&mut self.exchanges);
        let written = self.write_each(&mut exchanges, sink);
        exchanges.clear();
        self.exchanges = exchanges;
        written
    }

    fn write_each<W: Write>(
        &mut self,
        exchanges: &mut [Exchange],
        sink: &mut JsonSink<W>,
    ) -> std::io::Result<()> {
        for exchange in exchanges {
            // Slow requests and timeouts get a line within a per-series
            // budget (an incident must not flood the log pipeline);
            // `--emit all` is asked for and gets every line.
            let notable =
                exchange.outcome == Outcome::Timeout || exchange.latency_ns >= self.slow_ns;
            let allowed = self.aggregator.record(exchange, notable && !self.emit_all);
            // Client side only: the server side of the same request, when
            // Redis runs on the node, would count it twice.
            if exchange.role == ConnectionRole::Client {
                let workload = self.enricher.workload_of_cgroup(exchange.cgroup_id);
                if let Some(metrics) = &mut self.metrics {
                    metrics.record_exchange(exchange, || workload.key.clone());
                }
                self.observe(&Observer::request(exchange, workload, &self.zones));
            } else if let Some(metrics) = &mut self.metrics {
                let workload = self.enricher.workload_of_cgroup(exchange.cgroup_id);
                metrics.record_exchange(exchange, || workload.key.clone());
            }
            if self.emit_all || allowed {
                self.enricher.exchange(exchange);
                sink.exchange(exchange)?;
            }
        }
        Ok(())
    }

    /// The interval's gauges and counters to `/metrics`; a window ended.
    fn update_metrics(&mut self, gauges: &[Gauge], stats: &Stats) {
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        metrics.set_open_connections(gauges, |gauge| {
            self.enricher
                .workload_of_cgroup(gauge.key.cgroup_id)
                .key
                .clone()
        });
        metrics.set_agent_stats(stats);
        metrics.end_window(std::time::Instant::now());
        metrics.set_names(&self.names);
    }
}

/// The settled records of the rings (see [`EventRings`]) through the
/// pipeline; true when younger ones wait. A closed stdout ends the agent
/// quietly.
fn drain<W: Write>(
    rings: &mut EventRings,
    pipeline: &mut Pipeline,
    sink: &mut JsonSink<W>,
    stats: &mut Stats,
) -> anyhow::Result<bool> {
    let settled_before = monotonic_ns().saturating_sub(rings::SETTLE_NS);
    drain_before(rings, settled_before, pipeline, sink, stats)
}

/// Every record written until now through the pipeline (at exit; the
/// programs, still attached, may keep writing).
fn drain_all<W: Write>(
    rings: &mut EventRings,
    pipeline: &mut Pipeline,
    sink: &mut JsonSink<W>,
    stats: &mut Stats,
) -> anyhow::Result<()> {
    drain_before(rings, monotonic_ns(), pipeline, sink, stats).map(|_| ())
}

fn drain_before<W: Write>(
    rings: &mut EventRings,
    settled_before: u64,
    pipeline: &mut Pipeline,
    sink: &mut JsonSink<W>,
    stats: &mut Stats,
) -> anyhow::Result<bool> {
    let waiting = rings
        .drain(settled_before, |record| {
            pipeline.record(record, sink, stats)
        })
        .map_err(output_error)?;
    pipeline.write_exchanges(sink).map_err(output_error)?;
    Ok(waiting)
}

fn output_error(err: std::io::Error) -> anyhow::Error {
    if err.kind() == ErrorKind::BrokenPipe {
        anyhow::anyhow!("stdout was closed")
    } else {
        anyhow::Error::new(err).context("writing events to stdout")
    }
}
