//! The agent's main loop: ring buffer → decode → sink, stats on a timer,
//! clean detach on SIGINT/SIGTERM.

use std::{
    collections::BTreeSet,
    io::{BufWriter, ErrorKind, Write},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    aggregate::Aggregator,
    cli::{Cli, Emit},
    clock::{Clock, monotonic_ns},
    decode::{Event, decode},
    enrich::Enricher,
    gauges::{Gauge, open_connection_gauges},
    http::{self, Health},
    preflight,
    probes::{LoadOptions, Probes, connection, resp::PacketHook},
    procfs,
    sinks::{
        json::{JsonSink, SCHEMA_VERSION, Started, Stats},
        metrics::Metrics,
    },
    tracker::{Exchange, Outcome, Tracker},
    workload::Workload,
};

/// Longest time an event waits in the ring buffer before it is written.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// How often unanswered requests are checked against `--request-timeout`
/// and exchanges waiting for a read are given up.
const TICK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

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

    let cgroup_root = procfs::cgroup2_root()?;
    let (mut probes, ring) = Probes::load(&LoadOptions {
        ports: &ports,
        ring_buffer_bytes: cli.ring_buffer_kib * 1024,
        tracefs: &kernel.tracefs,
        cgroup_root: &cgroup_root,
        hook: if cli.bare_hook {
            PacketHook::Bare
        } else {
            PacketHook::Resp
        },
    })?;
    let attached = std::mem::take(&mut probes.attached);
    let seeds = connection::seeds(&ports, procfs::cgroup2_mount().as_deref(), monotonic_ns());
    let seeded_connections = probes.seed_connections(&seeds);
    tracing::info!(
        "watching TCP ports {ports:?} with {} kernel programs on Linux {}",
        attached.len(),
        kernel.release
    );

    // Before `started`: whoever waits for it may signal us right away.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let mut sink = JsonSink::new(BufWriter::new(std::io::stdout().lock()), Clock::new());
    sink.started(&Started {
        schema_version: SCHEMA_VERSION,
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
    let mut gauge_timer = tokio::time::interval(cli.interval);
    gauge_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gauge_timer.reset();
    let mut gauge_keys = BTreeSet::new();
    let enricher = Enricher::with_cgroup_root(procfs::cgroup2_mount());
    let mut pipeline = Pipeline {
        enricher,
        tracker: Tracker::default(),
        aggregator: Aggregator::default(),
        metrics,
        exchanges: Vec::new(),
        emit_all: cli.emit == Emit::All,
        slow_ns: u64::try_from(cli.slow_threshold.as_nanos()).unwrap_or(u64::MAX),
    };
    let mut window_start = std::time::Instant::now();
    let mut last_tick = std::time::Instant::now();
    let mut stats = Stats::default();
    // SAFETY: the ring buffer owns its fd, which stays open and the same until
    // the AsyncFd (and the ring buffer inside it) is dropped.
    let mut events = unsafe { AsyncFd::register(ring) }
        .map_err(std::io::Error::from)
        .context("polling the event ring buffer")?;

    let result: anyhow::Result<()> = loop {
        tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready.context("waiting for events")?;
                drain(guard.get_inner_mut(), &mut pipeline, &mut sink, &mut stats)?;
                guard.clear_ready();
                sink.flush()?;
            }
            _ = async { stats_timer.as_mut().unwrap().tick().await }, if stats_timer.is_some() => {
                let kernel = probes.kernel_stats();
                sink.stats(&stats.with_kernel(kernel).with_tracker(pipeline.tracker.stats()))?;
                sink.flush()?;
            }
            _ = drain_timer.tick() => {
                health.beat();
                drain(events.get_mut(), &mut pipeline, &mut sink, &mut stats)?;
                if last_tick.elapsed() >= TICK_INTERVAL {
                    last_tick = std::time::Instant::now();
                    pipeline.tracker.tick(monotonic_ns(), cli.request_timeout, &mut pipeline.exchanges);
                    pipeline.write_exchanges(&mut sink).map_err(output_error)?;
                }
                sink.flush()?;
            }
            _ = gauge_timer.tick() => {
                let gauges = open_connection_gauges(&probes.open_connections(), &gauge_keys);
                gauge_keys = gauges.iter().filter(|g| g.open > 0).map(|g| g.key.clone()).collect();
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
    drain(events.get_mut(), &mut pipeline, &mut sink, &mut stats)?;
    pipeline.tracker.flush(&mut pipeline.exchanges);
    pipeline.write_exchanges(&mut sink).map_err(output_error)?;
    pipeline
        .write_window(window_start.elapsed().as_secs_f64(), &mut sink)
        .map_err(output_error)?;
    let kernel = probes.kernel_stats();
    sink.stats(
        &stats
            .with_kernel(kernel)
            .with_tracker(pipeline.tracker.stats()),
    )?;
    sink.flush()?;
    tracing::info!("detaching");
    result
}

/// The stages after decode: enrich, track RESP, aggregate.
struct Pipeline {
    enricher: Enricher,
    tracker: Tracker,
    aggregator: Aggregator,
    /// With `--http-addr` only.
    metrics: Option<Metrics>,
    /// Finished exchanges not yet written.
    exchanges: Vec<Exchange>,
    emit_all: bool,
    slow_ns: u64,
}

impl Pipeline {
    /// Writes the `latency` window that ends now and starts the next.
    fn write_window<W: Write>(
        &mut self,
        seconds: f64,
        sink: &mut JsonSink<W>,
    ) -> std::io::Result<()> {
        let mut window = self.aggregator.window(seconds);
        self.enricher.window(&mut window);
        sink.latency(&window)
    }

    /// Aggregates the finished exchanges and writes those that get a line.
    fn write_exchanges<W: Write>(&mut self, sink: &mut JsonSink<W>) -> std::io::Result<()> {
        for mut exchange in self.exchanges.drain(..) {
            // Slow requests and timeouts get a line within a per-series
            // budget (an incident must not flood the log pipeline);
            // `--emit all` is asked for and gets every line.
            let notable =
                exchange.outcome == Outcome::Timeout || exchange.latency_ns >= self.slow_ns;
            let allowed = self.aggregator.record(&exchange, notable && !self.emit_all);
            if let Some(metrics) = &mut self.metrics {
                metrics.record_exchange(&exchange, || self.enricher.workload(exchange.cgroup_id));
            }
            if self.emit_all || allowed {
                self.enricher.exchange(&mut exchange);
                sink.exchange(&exchange)?;
            }
        }
        Ok(())
    }

    /// The interval's gauges and counters to `/metrics`; a window ended.
    fn update_metrics(&mut self, gauges: &[Gauge], stats: &Stats) {
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        metrics.set_open_connections(gauges, |gauge| self.enricher.workload(gauge.key.cgroup_id));
        metrics.set_agent_stats(stats);
        metrics.end_window(std::time::Instant::now());
    }
}

/// Writes every queued event; a closed stdout ends the agent quietly.
fn drain<W: Write>(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pipeline: &mut Pipeline,
    sink: &mut JsonSink<W>,
    stats: &mut Stats,
) -> anyhow::Result<()> {
    while let Some(record) = ring.next() {
        // The hot path: RESP payload records, parsed in place.
        match crate::decode::segment(&record) {
            Some(Ok(segment)) => {
                stats.events += 1;
                pipeline.tracker.segment(&segment, &mut pipeline.exchanges);
                continue;
            }
            Some(Err(err)) => {
                stats.decode_errors += 1;
                tracing::warn!("dropping an event record: {err}");
                continue;
            }
            None => {}
        }
        match decode(&record) {
            Ok(mut event) => {
                stats.events += 1;
                match &event {
                    Event::AppRead { ts_ns, cookie } => {
                        pipeline
                            .tracker
                            .app_read(*cookie, *ts_ns, &mut pipeline.exchanges);
                        continue;
                    }
                    Event::SocketGone { ts_ns, cookie } => {
                        pipeline
                            .tracker
                            .socket_gone(*cookie, *ts_ns, &mut pipeline.exchanges);
                        continue;
                    }
                    _ => {}
                }
                pipeline.enricher.enrich(&mut event);
                if let (Some(metrics), Event::Connect(connect)) = (&mut pipeline.metrics, &event) {
                    let task = &connect.task;
                    let workload = Workload::new(task.cgroup.as_deref(), Some(&task.comm));
                    metrics.record_connect(connect, workload.key);
                }
                if let Err(err) = sink.event(&event) {
                    return Err(output_error(err));
                }
            }
            Err(err) => {
                stats.decode_errors += 1;
                tracing::warn!("dropping an event record: {err}");
            }
        }
    }
    pipeline.write_exchanges(sink).map_err(output_error)?;
    Ok(())
}

fn output_error(err: std::io::Error) -> anyhow::Error {
    if err.kind() == ErrorKind::BrokenPipe {
        anyhow::anyhow!("stdout was closed")
    } else {
        anyhow::Error::new(err).context("writing events to stdout")
    }
}
