//! Aggregate: exchanges and connect attempts → one `latency` series per
//! (role, cgroup, Redis endpoint, op) and window, with an HDR histogram of
//! the answered requests' latencies (op: the command) or of the completed
//! handshakes (op: `connect`).

use std::{collections::BTreeMap, net::SocketAddr};

use rustc_hash::FxHashMap;

use agent_common::{ConnectOutcome, ConnectionRole};
use hdrhistogram::Histogram;

use crate::{
    decode::Connect,
    tracker::{Exchange, Outcome},
};

/// Series kept per window at most by default (`--max-series`); further
/// ones are merged into an `OTHER` series per role and endpoint (counted in
/// `overflowed`).
pub const DEFAULT_MAX_SERIES: usize = 10_000;
/// `request` lines written per series and window at most (slow requests and
/// timeouts, not `--emit all`); the rest are counted in `lines_suppressed`.
pub const MAX_LINES_PER_SERIES: u64 = 20;
/// Latencies are recorded in µs from 1 µs to 1 h.
const HIGHEST_US: u64 = 3_600_000_000;
/// 2 significant digits: values within 1% (p99 of 4.37 ms reads 4.35–4.39
/// ms). Each histogram takes 13 KiB with `u32` counts (3 digits would take
/// 90 KiB: 90 MiB for 1,000 series).
const SIGNIFICANT_DIGITS: u8 = 2;

/// One series of a window.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub role: ConnectionRole,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub endpoint: SocketAddr,
    pub op: String,
    pub count: u64,
    pub ok: u64,
    pub nil: u64,
    pub errors: BTreeMap<String, u64>,
    pub timeouts: u64,
    pub no_reply: u64,
    pub untimed: u64,
    /// p50, p90, p99, p99.9 in µs over answered requests.
    pub percentiles: Option<[f64; 4]>,
    pub max_us: Option<f64>,
    pub mean_us: Option<f64>,
    pub request_bytes: u64,
    pub reply_bytes: u64,
    /// `request` lines written for this series in the window, and held back.
    pub lines: u64,
    pub lines_suppressed: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Window {
    pub seconds: f64,
    pub series: Vec<Series>,
    /// Exchanges folded into `OTHER` series because of `--max-series`.
    pub overflowed: u64,
}

/// (role as u8, cgroup id, Redis endpoint, command identity; `OTHER_OP`,
/// `CONNECT_OP`).
type Key = (u8, u64, SocketAddr, (usize, usize));
const OTHER_OP: (usize, usize) = (0, 0);
const CONNECT_OP: (usize, usize) = (usize::MAX, usize::MAX);

struct Accumulator {
    series: Series,
    histogram: Histogram<u32>,
}

pub struct Aggregator {
    current: FxHashMap<Key, Accumulator>,
    overflowed: u64,
    max_series: usize,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SERIES)
    }
}

impl Aggregator {
    pub fn new(max_series: usize) -> Self {
        Self {
            current: FxHashMap::default(),
            overflowed: 0,
            max_series,
        }
    }

    /// Counts an exchange. `line`: it deserves a `request` line (slow or
    /// a timeout); returns whether the per-series budget allows it.
    pub fn record(&mut self, exchange: &Exchange, line: bool) -> bool {
        let key: Key = (
            exchange.role as u8,
            exchange.cgroup_id,
            exchange.server,
            exchange.command.id(),
        );
        let command = exchange.command;
        let entry = self.series(key, || command.to_string());
        let series = &mut entry.series;
        series.count += 1;
        series.request_bytes += exchange.request_bytes;
        series.reply_bytes += exchange.reply_bytes;
        let timed = match exchange.outcome {
            Outcome::Ok => {
                series.ok += 1;
                true
            }
            Outcome::Nil => {
                series.nil += 1;
                true
            }
            Outcome::Error(prefix) => {
                *series.errors.entry(prefix.to_string()).or_default() += 1;
                true
            }
            Outcome::Timeout => {
                series.timeouts += 1;
                false
            }
            Outcome::NoReply => {
                series.no_reply += 1;
                false
            }
            Outcome::Untimed => {
                series.untimed += 1;
                false
            }
        };
        if timed {
            let us = exchange.latency_ns.div_ceil(1_000).clamp(1, HIGHEST_US);
            entry.histogram.saturating_record(us);
        }
        if !line {
            return false;
        }
        if entry.series.lines < MAX_LINES_PER_SERIES {
            entry.series.lines += 1;
            true
        } else {
            entry.series.lines_suppressed += 1;
            false
        }
    }

    /// Counts a connect attempt in the `connect` series of its workload
    /// and endpoint: `ok` when established (handshake timed), else an error
    /// named by the outcome; `timeout` and `aborted` (a client-side connect
    /// timeout) also count as `timeouts`.
    pub fn record_connect(&mut self, connect: &Connect) {
        let key: Key = (
            ConnectionRole::Client as u8,
            connect.task.cgroup_id,
            connect.dst,
            CONNECT_OP,
        );
        let entry = self.series(key, || "connect".to_string());
        let series = &mut entry.series;
        series.count += 1;
        match connect.outcome {
            ConnectOutcome::Established => {
                series.ok += 1;
                let us = connect.duration_ns.div_ceil(1_000).clamp(1, HIGHEST_US);
                entry.histogram.saturating_record(us);
            }
            outcome => {
                if matches!(outcome, ConnectOutcome::Timeout | ConnectOutcome::Aborted) {
                    series.timeouts += 1;
                }
                *series.errors.entry(outcome.name().to_string()).or_default() += 1;
            }
        }
    }

    /// The accumulator of `key`, created if the series budget allows, else
    /// the `OTHER` series of its role and endpoint (cgroup id 0: a burst of
    /// new pods must not grow the overflow itself).
    fn series(&mut self, mut key: Key, op: impl FnOnce() -> String) -> &mut Accumulator {
        let mut op = Some(op);
        if self.current.len() >= self.max_series && !self.current.contains_key(&key) {
            self.overflowed += 1;
            key.1 = 0;
            key.3 = OTHER_OP;
            op = None;
        }
        self.current.entry(key).or_insert_with(|| Accumulator {
            series: Series {
                role: if key.0 == ConnectionRole::Server as u8 {
                    ConnectionRole::Server
                } else {
                    ConnectionRole::Client
                },
                cgroup_id: key.1,
                cgroup: None,
                endpoint: key.2,
                op: op.map_or_else(|| "OTHER".to_string(), |op| op()),
                count: 0,
                ok: 0,
                nil: 0,
                errors: BTreeMap::new(),
                timeouts: 0,
                no_reply: 0,
                untimed: 0,
                percentiles: None,
                max_us: None,
                mean_us: None,
                request_bytes: 0,
                reply_bytes: 0,
                lines: 0,
                lines_suppressed: 0,
            },
            histogram: Histogram::new_with_bounds(1, HIGHEST_US, SIGNIFICANT_DIGITS)
                .expect("static histogram bounds are valid"),
        })
    }

    /// The window since the last call; starts a new one.
    pub fn window(&mut self, seconds: f64) -> Window {
        let mut series: Vec<Series> = self
            .current
            .drain()
            .map(|(_, mut acc)| {
                let h = &acc.histogram;
                if !h.is_empty() {
                    acc.series.percentiles =
                        Some([50.0, 90.0, 99.0, 99.9].map(|q| h.value_at_percentile(q) as f64));
                    acc.series.max_us = Some(h.max() as f64);
                    acc.series.mean_us = Some((h.mean() * 10.0).round() / 10.0);
                }
                acc.series
            })
            .collect();
        series.sort_by(|a, b| {
            (a.role as u8, a.cgroup_id, a.endpoint, &a.op).cmp(&(
                b.role as u8,
                b.cgroup_id,
                b.endpoint,
                &b.op,
            ))
        });
        Window {
            seconds,
            series,
            overflowed: std::mem::take(&mut self.overflowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Command, ErrorPrefix};

    fn exchange(command: Command, outcome: Outcome, latency_us: u64) -> Exchange {
        Exchange {
            ts_ns: 1,
            role: ConnectionRole::Client,
            client: "10.0.0.2:40000".parse().unwrap(),
            server: "10.0.0.1:6379".parse().unwrap(),
            cgroup_id: 7,
            cgroup: None,
            command,
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

    #[test]
    fn a_window_counts_outcomes_and_times_only_answers() {
        let get = crate::resp::command_of(b"GET", b"", 16).unwrap();
        let mut agg = Aggregator::default();
        for _ in 0..99 {
            agg.record(&exchange(get, Outcome::Ok, 100), false);
        }
        agg.record(&exchange(get, Outcome::Ok, 10_000), false);
        agg.record(&exchange(get, Outcome::Error(ErrorPrefix::ERR), 50), false);
        agg.record(&exchange(get, Outcome::Timeout, 2_000_000), true);
        let w = agg.window(10.0);
        assert_eq!(w.series.len(), 1);
        let s = &w.series[0];
        assert_eq!((s.count, s.ok, s.timeouts), (102, 100, 1));
        assert_eq!(s.errors.get("ERR"), Some(&1));
        let [p50, _, p99, p999] = s.percentiles.unwrap();
        assert!((p50 - 100.0).abs() <= 1.0, "{p50}");
        assert!(p99 <= 101.0 && p999 >= 9_990.0, "{p99} {p999}");
        assert!(
            s.max_us.unwrap() < 1_000_000.0,
            "timeouts are not latencies"
        );
        assert!(agg.window(10.0).series.is_empty(), "windows start empty");
    }

    #[test]
    fn series_beyond_the_cap_fold_into_one_other_series_per_role_and_endpoint() {
        let get = crate::resp::command_of(b"GET", b"", 16).unwrap();
        let mut agg = Aggregator::new(3);
        for cgroup_id in 0..100 {
            let mut e = exchange(get, Outcome::Ok, 100);
            e.cgroup_id = cgroup_id;
            agg.record(&e, false);
        }
        let w = agg.window(1.0);
        assert_eq!(w.series.len(), 4, "3 series and OTHER");
        let other = w.series.iter().find(|s| s.op == "OTHER").unwrap();
        assert_eq!((other.count, other.cgroup_id), (97, 0));
        assert_eq!(w.overflowed, 97);
    }

    #[test]
    fn request_lines_are_limited_per_series_and_window() {
        let get = crate::resp::command_of(b"GET", b"", 16).unwrap();
        let mut agg = Aggregator::default();
        let written = (0..50)
            .filter(|_| agg.record(&exchange(get, Outcome::Ok, 600_000), true))
            .count();
        assert_eq!(written as u64, MAX_LINES_PER_SERIES);
        let w = agg.window(1.0);
        assert_eq!(w.series[0].lines_suppressed, 50 - MAX_LINES_PER_SERIES);
        assert!(
            agg.record(&exchange(get, Outcome::Ok, 600_000), true),
            "a new window"
        );
    }
}
