//! `cargo xtask vm-test`: the integration tests built on this host, run on
//! the kernels EKS nodes run (5.10: Amazon Linux 2; 6.1: AL2023,
//! Bottlerocket), each booted from Debian's package under qemu. The guest
//! sees the host's root read-only (writes go to guest memory), so it runs the
//! very binaries built here, with the host's redis-server, iptables and nstat.
//!
//! Per kernel: download and unpack the kernel (cached), build an initramfs
//! (cached), boot, start the agent alone (which programs load and attach),
//! run the chosen test binaries, power off; then a summary and the table in
//! `docs/kernels.md`.

mod guest;
mod initramfs;
mod kernel;
mod report;

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::util::{cargo, output, step};
use kernel::Series;
use report::{KernelRun, Timings};

/// Debian packages the host needs for this command.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];

/// Test executables run by default: the connect tests and the CLI's.
pub const DEFAULT_TESTS: &[&str] = &["connect", "connection", "pods", "cli", "resp", "caps"];

/// A TCG guest runs code ~9× and starts processes up to ~36× slower than
/// this host (docs/development.md): the lab scales its timeouts by this.
pub const DEFAULT_TIME_SCALE: u32 = 10;

/// Per kernel, from qemu's start to its exit.
const GUEST_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// Per test binary, inside the guest.
const TEST_BINARY_TIMEOUT: Duration = Duration::from_secs(25 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    #[value(name = "5.10")]
    V5_10,
    #[value(name = "6.1")]
    V6_1,
    /// This machine's own kernel (6.18 on the development VMs), no qemu.
    Host,
    /// 6.1, 5.10 and this host.
    All,
}

impl KernelChoice {
    /// The guests to boot, and whether to run on this host too.
    fn plan(self) -> (Vec<Series>, bool) {
        match self {
            Self::V5_10 => (vec![Series::V5_10], false),
            Self::V6_1 => (vec![Series::V6_1], false),
            Self::Host => (Vec::new(), true),
            Self::All => (vec![Series::V6_1, Series::V5_10], true),
        }
    }
}

pub struct Options {
    pub kernel: KernelChoice,
    pub tests: Vec<String>,
    pub filter: Option<String>,
    pub time_scale: u32,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    step("vm-test: host packages (qemu, busybox, kmod)");
    crate::setup::ensure_packages(PACKAGES).context("vm-test step `host packages` failed")?;
    crate::build_agent().context("vm-test step `build the agent` failed")?;
    step("vm-test: build the test executables");
    let tests = test_executables(&options.tests)
        .context("vm-test step `build the test executables` failed")?;

    let workspace = crate::workspace_root();
    let mut runs = Vec::new();
    let (guests, host) = options.kernel.plan();
    for series in guests {
        runs.push(run_kernel(series, options, &tests, &workspace));
    }
    if host {
        runs.push(run_host(options, &tests, &workspace));
    }

    step("vm-test: summary");
    eprint!("{}", report::summary(&runs));
    let docs = workspace.join("docs/kernels.md");
    report::update_docs(&docs, &runs, &today())?;
    eprintln!("==> table refreshed in {}", docs.display());
    let (passed, failed) = runs.iter().fold((0, 0), |(p, f), run| {
        let (rp, rf) = run.counts();
        (p + rp, f + rf)
    });
    eprintln!(
        "==> vm-test took {:.0?}",
        Duration::from_secs(started.elapsed().as_secs())
    );
    // A closing line CI reads as the test count.
    println!("vm-test: {passed} passed, {failed} failed");
    let failing: Vec<&str> = runs
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.series.as_str())
        .collect();
    anyhow::ensure!(
        failing.is_empty(),
        "vm-test failed on Linux {} (see the summary above)",
        failing.join(", ")
    );
    Ok(())
}

fn cache_dir() -> PathBuf {
    crate::setup::cache_dir().join("vm")
}

fn run_kernel(
    series: Series,
    options: &Options,
    tests: &[(String, PathBuf)],
    workspace: &std::path::Path,
) -> KernelRun {
    let started = Instant::now();
    let mut run = KernelRun {
        series: series.name().to_owned(),
        kernel: None,
        host_release: None,
        agent: None,
        tests: Vec::new(),
        timings: Timings::default(),
        failure: None,
    };
    let dir = cache_dir().join(series.name());
    if let Err(err) = fs::create_dir_all(&dir) {
        run.failure = Some(format!("creating {}: {err}", dir.display()));
        return run;
    }

    step(&format!("vm-test {}: kernel", series.name()));
    let kernel = match kernel::ensure(series, &dir) {
        Ok(kernel) => kernel,
        Err(err) => {
            run.failure = Some(format!("download the {} kernel: {err:#}", series.name()));
            return run;
        }
    };
    run.timings.download = started.elapsed();
    run.kernel = Some(kernel.clone());

    step(&format!("vm-test {}: initramfs", series.name()));
    let initramfs = match initramfs::ensure(&kernel, &dir) {
        Ok(path) => path,
        Err(err) => {
            run.failure = Some(format!("build the initramfs: {err:#}"));
            return run;
        }
    };

    // The results share: guest.sh, then what the guest writes back.
    let results = dir.join("results");
    let _ = fs::remove_dir_all(&results);
    let agent = crate::agent_binary();
    let script = guest::script(&guest::Plan {
        kernel: Some(&kernel),
        results: std::path::Path::new(initramfs::GUEST_RESULTS),
        workspace,
        agent: &agent,
        tests,
        filter: options.filter.as_deref(),
        time_scale: options.time_scale,
        test_timeout: TEST_BINARY_TIMEOUT,
    });
    if let Err(err) =
        fs::create_dir_all(&results).and_then(|()| fs::write(results.join("guest.sh"), script))
    {
        run.failure = Some(format!("writing {}/guest.sh: {err}", results.display()));
        return run;
    }

    step(&format!(
        "vm-test {}: boot {} {} under qemu (TCG) and run {} ",
        series.name(),
        kernel.package,
        kernel.version,
        tests
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let console_log = dir.join("console.log");
    let console = guest::boot(&kernel, &initramfs, &results, &console_log, GUEST_TIMEOUT);
    run.timings.total = started.elapsed();
    let console = match console {
        Ok(console) => console,
        Err(err) => {
            run.failure = Some(format!("boot and run the guest: {err:#}"));
            guest::Console::default()
        }
    };
    collect(&mut run, &console, tests, &results, &console_log);
    run
}

/// Timings, failures and results of one run from its marks and results dir.
fn collect(
    run: &mut KernelRun,
    console: &guest::Console,
    tests: &[(String, PathBuf)],
    results: &std::path::Path,
    console_log: &std::path::Path,
) {
    run.timings.boot = console.step_at("guest up");
    let agent_at = console.step_at("agent");
    let first_test = tests
        .first()
        .and_then(|(name, _)| console.step_at(&format!("test {name}")));
    let done = console.step_at("done");
    run.timings.agent = agent_at.zip(first_test).map(|(a, t)| t.saturating_sub(a));
    run.timings.tests = first_test.zip(done).map(|(t, d)| d.saturating_sub(t));
    if let Some(failure) = &console.failure {
        run.failure.get_or_insert(format!("setup: {failure}"));
    }
    if run.failure.is_none() && done.is_none() {
        run.failure = Some(format!(
            "the run stopped before finishing (console in {})",
            console_log.display()
        ));
    }
    if agent_at.is_some() {
        run.agent = Some(report::read_agent(results));
    }
    run.tests = tests
        .iter()
        .filter(|(name, _)| console.step_at(&format!("test {name}")).is_some())
        .map(|(name, _)| report::read_test(results, name))
        .collect();
}

/// The same script on this host's own kernel: its row in the table, by the
/// same agent-alone check and the same test binaries, at time scale 1.
fn run_host(
    options: &Options,
    tests: &[(String, PathBuf)],
    workspace: &std::path::Path,
) -> KernelRun {
    let started = Instant::now();
    let release = crate::util::stdout_of(Command::new("uname").arg("-r"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    // `6.18.44-fc-v1272` → `6.18`, the series the table sorts by.
    let series: String = release
        .split(['.', '-'])
        .take(2)
        .collect::<Vec<_>>()
        .join(".");
    let mut run = KernelRun {
        series,
        kernel: None,
        host_release: Some(release),
        agent: None,
        tests: Vec::new(),
        timings: Timings::default(),
        failure: None,
    };
    let dir = cache_dir().join("host");
    let results = dir.join("results");
    let _ = fs::remove_dir_all(&results);
    let script = guest::script(&guest::Plan {
        kernel: None,
        results: &results,
        workspace,
        agent: &crate::agent_binary(),
        tests,
        filter: options.filter.as_deref(),
        time_scale: 1,
        test_timeout: TEST_BINARY_TIMEOUT,
    });
    let script_path = results.join("host.sh");
    if let Err(err) = fs::create_dir_all(&results).and_then(|()| fs::write(&script_path, script)) {
        run.failure = Some(format!("writing {}: {err}", script_path.display()));
        return run;
    }
    step(&format!("vm-test {}: this host's own kernel", run.series));
    let console_log = dir.join("console.log");
    let console = guest::run_on_host(&script_path, &run.series, &console_log, GUEST_TIMEOUT)
        .unwrap_or_else(|err| {
            run.failure = Some(format!("run on this host: {err:#}"));
            guest::Console::default()
        });
    run.timings.total = started.elapsed();
    collect(&mut run, &console, tests, &results, &console_log);
    run
}

/// Builds the `tests` package's test executables (release, like `cargo
/// xtask test`) and returns the requested ones by target name.
fn test_executables(names: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let built = output(cargo().args([
        "test",
        "--release",
        "--locked",
        "--no-run",
        "--message-format=json",
        "--package",
        "tests",
    ]))?;
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&built.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let target = &message["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if message["reason"] == "compiler-artifact"
            && is_test
            && let (Some(name), Some(exe)) =
                (target["name"].as_str(), message["executable"].as_str())
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    names
        .iter()
        .map(|name| {
            found
                .iter()
                .find(|(found, _)| found == name)
                .cloned()
                .with_context(|| {
                    let known: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
                    format!("no test target `{name}` in package tests (it has: {known:?})")
                })
        })
        .collect()
}

fn today() -> String {
    crate::util::stdout_of(Command::new("date").args(["-u", "+%Y-%m-%d"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown date".to_owned())
}
