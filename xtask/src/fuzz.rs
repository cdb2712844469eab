//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (libFuzzer with
//! AddressSanitizer, debug assertions and overflow checks), run side by side
//! for a fixed time each, with a memory limit; a summary of executions,
//! coverage and peak memory per target, and failure on any crash.

mod capture;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::util::{run_status, stdout_of, step};

/// The targets (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["resp_matcher", "event_decoder"];
/// cargo-fuzz built with stable; the targets themselves need nightly
/// (`-Z sanitizer=address`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const NIGHTLY: &str = "nightly";
/// A target that needs more than this is a failure (libFuzzer's
/// `-rss_limit_mb`; also its per-allocation limit).
pub const RSS_LIMIT_MB: u32 = 2048;
/// One input running longer than this is a failure (a hang).
const INPUT_TIMEOUT_S: u32 = 10;

pub struct Options<'a> {
    pub seconds: u64,
    pub targets: &'a [String],
    pub capture: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("fuzz");
    let seeds = dir.join("seeds");
    if options.capture || !seeds.join(TARGETS[0]).is_dir() {
        step("capture seeds from real Redis traffic");
        let connections = capture::capture(&seeds)?;
        eprintln!(
            "==> {connections} connections recorded into {}",
            seeds.display()
        );
    }
    if options.seconds == 0 {
        return Ok(());
    }
    ensure_cargo_fuzz()?;
    step("build the fuzz targets (nightly, AddressSanitizer, debug assertions)");
    run_status(cargo_fuzz(&dir).arg("build"))?;
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut running = Vec::new();
    for target in options.targets {
        let corpus = dir.join("corpus").join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let log = logs.join(format!("{target}.log"));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        step(&format!(
            "fuzz {target} for {} s (log: {})",
            options.seconds,
            log.display()
        ));
        // libFuzzer adds what it finds to the first corpus directory and
        // only reads the seeds.
        let child = cargo_fuzz(&dir)
            .args(["run", target])
            .arg(&corpus)
            .arg(seeds.join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", options.seconds))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
            .arg("-print_final_stats=1")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting the fuzzer of {target}"))?;
        running.push((target, child, log));
    }
    let mut failed = Vec::new();
    for (target, mut child, log) in running {
        let status = child.wait()?;
        let text =
            fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        let summary = Summary::parse(&text);
        eprintln!("==> {target}: {}", summary.line());
        if !status.success() || !summary.done {
            let why = text
                .lines()
                .find(|l| l.contains("ERROR:") || l.contains("panicked"))
                .unwrap_or("no libFuzzer error line; see the log");
            eprintln!("    FAILED ({status}): {why}");
            eprintln!(
                "    artifacts: {}",
                dir.join("artifacts").join(target).display()
            );
            failed.push(target.as_str());
        }
    }
    anyhow::ensure!(failed.is_empty(), "fuzzing failed: {}", failed.join(", "));
    Ok(())
}

/// What libFuzzer reported: its last status line and final stats.
#[derive(Default, Debug, PartialEq)]
struct Summary {
    executions: u64,
    exec_per_s: u64,
    /// Coverage: edges (`cov:`) and features (`ft:`), from the last status line.
    cov: u64,
    ft: u64,
    corpus: u64,
    peak_rss_mb: u64,
    /// libFuzzer ran out its time (`Done N runs in S second(s)`).
    done: bool,
}

impl Summary {
    fn parse(log: &str) -> Self {
        let mut summary = Self::default();
        let field = |line: &str, name: &str| -> Option<u64> {
            let mut words = line.split_whitespace();
            words.find(|w| *w == name)?;
            words.next()?.split('/').next()?.parse().ok()
        };
        for line in log.lines() {
            if line.starts_with('#') {
                summary.cov = field(line, "cov:").unwrap_or(summary.cov);
                summary.ft = field(line, "ft:").unwrap_or(summary.ft);
                summary.corpus = field(line, "corp:").unwrap_or(summary.corpus);
            } else if let Some((name, value)) =
                line.strip_prefix("stat::").and_then(|l| l.split_once(':'))
            {
                let value = value.trim().parse().unwrap_or(0);
                match name {
                    "number_of_executed_units" => summary.executions = value,
                    "average_exec_per_sec" => summary.exec_per_s = value,
                    "peak_rss_mb" => summary.peak_rss_mb = value,
                    _ => {}
                }
            } else if line.starts_with("Done ") && line.contains(" runs in ") {
                summary.done = true;
            }
        }
        summary
    }

    fn line(&self) -> String {
        format!(
            "{} executions ({}/s), cov {} ft {}, corpus {} inputs, peak RSS {} MB (limit {RSS_LIMIT_MB})",
            self.executions, self.exec_per_s, self.cov, self.ft, self.corpus, self.peak_rss_mb
        )
    }
}

/// `cargo +nightly fuzz` in `dir`.
fn cargo_fuzz(dir: &Path) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", NIGHTLY, "cargo", "fuzz"])
        .current_dir(dir)
        // The cargo running xtask is stable's; the fuzz build needs nightly's.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    command
}

/// Checks for the nightly toolchain and installs cargo-fuzz on first use (with stable; about 2 minutes), so
/// `cargo xtask setup` stays quick for those who never fuzz.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if stdout_of(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])).is_none() {
        bail!(
            "the fuzz targets build with the rustup toolchain `{NIGHTLY}`: `rustup toolchain install {NIGHTLY}`"
        );
    }
    let version = stdout_of(Command::new(cargo_fuzz_binary()).arg("--version"));
    if version.is_some_and(|v| v.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    step(&format!("install cargo-fuzz {CARGO_FUZZ_VERSION}"));
    run_status(
        Command::new("rustup")
            .args(["run", "stable", "cargo", "install", "--locked"])
            .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"))
            .env_remove("CARGO")
            .stdin(Stdio::null()),
    )?;
    Ok(())
}

fn cargo_fuzz_binary() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_default();
    cargo_home.join("bin/cargo-fuzz")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_status_and_final_stats() {
        let log = "\
INFO: Seed: 1234
#2\tINITED cov: 812 ft: 1903 corp: 17/90Kb exec/s: 0 rss: 40Mb
#65536\tpulse  cov: 1210 ft: 4410 corp: 301/120Kb lim: 4096 exec/s: 21845 rss: 61Mb
#90000\tDONE   cov: 1234 ft: 4567 corp: 320/130Kb lim: 4096 exec/s: 15000 rss: 63Mb
Done 90000 runs in 6 second(s)
stat::number_of_executed_units: 90000
stat::average_exec_per_sec:     15000
stat::new_units_added:          303
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              63
";
        assert_eq!(
            Summary::parse(log),
            Summary {
                executions: 90000,
                exec_per_s: 15000,
                cov: 1234,
                ft: 4567,
                corpus: 320,
                peak_rss_mb: 63,
                done: true,
            }
        );
    }
}
