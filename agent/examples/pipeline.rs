//! The agent's userspace pipeline on synthetic ring buffer records: decode →
//! RESP tracker → aggregate → detect → JSON (to a sink that discards) and
//! Prometheus metrics, on
//! one thread, as the agent runs it. `cargo xtask bench` runs it and reports
//! its line; run alone: `cargo run --release -p agent --example pipeline`.
//!
//! The traffic: `CONNECTIONS` client connections of `CGROUPS` workloads, each
//! sending one of `COMMANDS` unpipelined: per request a request segment, a
//! reply segment and the application's read — three records, each counted as
//! an event. 100 workloads × 10 commands = 1,000 `latency` series.

use std::{io::Write as _, time::Instant};

use agent::{
    aggregate::DEFAULT_MAX_SERIES,
    detect::DetectorConfig,
    enrich::Enricher,
    run::{Pipeline, PipelineOptions},
    sinks::{
        json::{JsonSink, Stats},
        metrics::Metrics,
    },
};
use agent_common::{
    EventHeader, EventKind, FlowTuple,
    resp::{
        ROLE_CLIENT, SEGMENT_FROM_START, SEGMENT_LAST, STREAM_REPLIES, STREAM_REQUESTS,
        SegmentEvent, SocketEvent,
    },
};

const CONNECTIONS: u32 = 10_000;
const CGROUPS: u32 = 100;
const COMMANDS: [&[u8]; 10] = [
    b"*2\r\n$3\r\nGET\r\n$8\r\nuser:123\r\n",
    b"*3\r\n$3\r\nSET\r\n$8\r\nuser:123\r\n$5\r\nhello\r\n",
    b"*3\r\n$4\r\nHGET\r\n$6\r\nh:1234\r\n$5\r\nfield\r\n",
    b"*2\r\n$4\r\nINCR\r\n$7\r\nctr:123\r\n",
    b"*3\r\n$5\r\nLPUSH\r\n$6\r\nq:1234\r\n$3\r\njob\r\n",
    b"*4\r\n$4\r\nZADD\r\n$6\r\nz:1234\r\n$1\r\n1\r\n$1\r\nm\r\n",
    b"*3\r\n$6\r\nEXPIRE\r\n$8\r\nuser:123\r\n$2\r\n60\r\n",
    b"*2\r\n$3\r\nDEL\r\n$8\r\nuser:123\r\n",
    b"*3\r\n$4\r\nMGET\r\n$3\r\nk:1\r\n$3\r\nk:2\r\n",
    b"*1\r\n$4\r\nPING\r\n",
];
const REPLY: &[u8] = b"$5\r\nhello\r\n";

/// The bytes of a `#[repr(C)]` record type with explicit padding.
fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: `T` is a plain `#[repr(C)]` struct of integers without
    // implicit padding (the shared types spell their padding out).
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

fn mapped(ip: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(&ip);
    a
}

struct Connection {
    cookie: u64,
    cgroup_id: u64,
    tuple: FlowTuple,
    command: &'static [u8],
    request_seq: u32,
    reply_seq: u32,
}

fn segment(
    out: &mut Vec<u8>,
    c: &Connection,
    ts_ns: u64,
    stream: u8,
    seq: u32,
    payload: &[u8],
    first: bool,
) {
    let event = SegmentEvent {
        header: EventHeader {
            kind: EventKind::Segment as u32,
            _pad: 0,
            ts_ns,
        },
        cookie: c.cookie,
        cgroup_id: c.cgroup_id,
        tuple: c.tuple,
        role: ROLE_CLIENT,
        stream,
        flags: SEGMENT_LAST | if first { SEGMENT_FROM_START } else { 0 },
        _pad: 0,
        len: payload.len() as u32,
        seq,
        offset: 0,
        captured: payload.len() as u32,
        drops: 0,
        _pad1: 0,
    };
    out.clear();
    out.extend_from_slice(bytes_of(&event));
    out.extend_from_slice(payload);
}

fn app_read(c: &Connection, ts_ns: u64) -> SocketEvent {
    SocketEvent {
        header: EventHeader {
            kind: EventKind::AppRead as u32,
            _pad: 0,
            ts_ns,
        },
        cookie: c.cookie,
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let rounds: u32 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(30);
    let mut connections: Vec<Connection> = (0..CONNECTIONS)
        .map(|i| Connection {
            cookie: u64::from(i) + 1,
            cgroup_id: u64::from(1_000 + i % CGROUPS),
            tuple: FlowTuple {
                saddr: mapped([10, 1, (i >> 8) as u8, i as u8]),
                daddr: mapped([10, 2, 0, 1]),
                sport: 40_000 + (i % 20_000) as u16,
                dport: 6379,
            },
            command: COMMANDS[(i / CGROUPS) as usize % COMMANDS.len()],
            request_seq: 1,
            reply_seq: 1,
        })
        .collect();
    let mut pipeline = Pipeline::new(
        Enricher::default(),
        &DetectorConfig::default(),
        // As in the DaemonSet, with `--http-addr`.
        Some(Metrics::new()),
        PipelineOptions {
            emit_all: false,
            slow_ns: u64::MAX,
            max_series: DEFAULT_MAX_SERIES,
            zones: Default::default(),
        },
    );
    let mut sink = JsonSink::new(std::io::sink(), agent::clock::Clock::new(), "bench");
    let mut stats = Stats::default();
    let mut record = Vec::with_capacity(256);
    let mut ts_ns = 1_000_000_000u64;
    let mut events = 0u64;

    let started = Instant::now();
    let cpu_started = cpu_seconds();
    for round in 0..rounds {
        for c in &mut connections {
            ts_ns += 1_000;
            segment(
                &mut record,
                c,
                ts_ns,
                STREAM_REQUESTS,
                c.request_seq,
                c.command,
                round == 0,
            );
            pipeline.record(&record, &mut sink, &mut stats)?;
            c.request_seq = c.request_seq.wrapping_add(c.command.len() as u32);
            ts_ns += 50_000;
            segment(
                &mut record,
                c,
                ts_ns,
                STREAM_REPLIES,
                c.reply_seq,
                REPLY,
                round == 0,
            );
            pipeline.record(&record, &mut sink, &mut stats)?;
            c.reply_seq = c.reply_seq.wrapping_add(REPLY.len() as u32);
            ts_ns += 2_000;
            pipeline.record(bytes_of(&app_read(c, ts_ns)), &mut sink, &mut stats)?;
            events += 3;
        }
        // As the agent's loop: exchanges written after each drain, alerts
        // evaluated and a window written now and then.
        pipeline.write_exchanges(&mut sink)?;
        pipeline.write_alerts(ts_ns, &mut sink)?;
        if round % 10 == 9 {
            pipeline.write_window(10.0, &mut sink)?;
        }
    }
    let cpu = cpu_seconds() - cpu_started;
    let wall = started.elapsed().as_secs_f64();
    let rss = rss_kib("VmRSS:");
    let peak = rss_kib("VmHWM:");
    let requests = u64::from(rounds) * u64::from(CONNECTIONS);
    let line = serde_json::json!({
        "connections": CONNECTIONS,
        "series": CGROUPS as usize * COMMANDS.len(),
        "events": events,
        "requests": requests,
        "decode_errors": stats.decode_errors,
        "cpu_s": (cpu * 1000.0).round() / 1000.0,
        "events_per_cpu_s": (events as f64 / cpu).round(),
        "events_per_s": (events as f64 / wall).round(),
        "rss_kib": rss,
        "peak_rss_kib": peak,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    anyhow::ensure!(stats.decode_errors == 0, "synthetic records did not decode");
    Ok(())
}
