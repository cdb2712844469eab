//! Soak and overload (`lab::soak`): the load — 10,000 held
//! connections, 1,000 new connections/s, pipelined requests toward 100k/s,
//! error replies, resets and dropped SYNs — for a minute with the agent,
//! between two no-agent phases. The clients saw only the errors injected,
//! the agent's memory stayed flat, and it dropped nothing for lack of
//! capacity. `cargo xtask soak --minutes N` runs the long version
//! (`soak_for_minutes`, ignored here) and keeps its report.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use lab::{serial, soak};

fn report_dir() -> PathBuf {
    std::env::var_os("RESPTRACE_SOAK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/soak"))
}

fn soak(options: &soak::Options, stem: &str, command: &str) -> anyhow::Result<()> {
    let _serial = serial();
    let report = soak::run(options)?;
    soak::write(&report, &report_dir(), stem, command)?;
    eprintln!("{}", soak::markdown(&report, command));
    soak::check(&report, options)
}

#[test]
fn a_minute_of_overload_leaves_clients_unharmed_and_the_agent_flat() -> anyhow::Result<()> {
    let options = soak::Options::new(Duration::from_secs(60), Duration::from_secs(15));
    soak(&options, "soak-60s", "cargo xtask test soak")
}

/// `RESPTRACE_SOAK_MINUTES` (agent phase) and `RESPTRACE_SOAK_BASELINE_MINUTES`
/// (each no-agent phase); `cargo xtask soak` sets them.
#[test]
#[ignore = "long; run by `cargo xtask soak --minutes N`"]
fn soak_for_minutes() -> anyhow::Result<()> {
    let minutes = |name: &str, default: f64| -> anyhow::Result<f64> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .ok()
                .filter(|m: &f64| m.is_finite() && *m > 0.0)
                .with_context(|| format!("{name}={v}: not a positive number of minutes")),
            Err(_) => Ok(default),
        }
    };
    let agent = minutes("RESPTRACE_SOAK_MINUTES", 30.0)?;
    let baseline = minutes(
        "RESPTRACE_SOAK_BASELINE_MINUTES",
        (agent / 6.0).clamp(0.25, 5.0),
    )?;
    let options = soak::Options::new(
        Duration::from_secs_f64(agent * 60.0),
        Duration::from_secs_f64(baseline * 60.0),
    );
    soak(
        &options,
        &format!("soak-{agent}m"),
        &format!("cargo xtask soak --minutes {agent}"),
    )
}
