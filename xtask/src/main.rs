//! `cargo xtask`: what is not a plain `cargo build` — setting up a fresh
//! machine, running the agent as root, the incident demo, the test suite,
//! the test suite on other kernels under qemu, benchmarks, soaks and fuzzing.

mod bench;
mod fuzz;
mod image;
mod setup;
mod util;
mod vm;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::util::{cargo, run_status};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "resptrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and the tests need (Debian packages, bpf-linker,
    /// the eBPF toolchain, redis). Idempotent: seconds when all is present.
    Setup,
    /// Set up if needed, build `target/release/resptrace`.
    Build,
    /// Set up, build and run the agent as root until Ctrl-C. Arguments after
    /// `--` go to resptrace, e.g. `cargo xtask run -- --ports 6380`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The whole host suite: formatting, clippy, unit tests and the
    /// integration tests (real agent, real redis-server, as root).
    Test {
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// What the agent costs the traced applications: redis-benchmark
    /// throughput with the agent ÷ without, alternating, over several rounds;
    /// BPF run time per request, agent CPU and memory.
    ///
    /// Modes: `none` (no tracer), `agent` (resptrace, everything on), `bare`
    /// (`resptrace --bare-hook`: the cgroup_skb hook alone), `floor`
    /// (`resptrace --counting-floor`: the bare hook plus every request and
    /// reply counted in the kernel, the least an exact tracer does),
    /// `bpftrace` (a write→read latency script). Full runs write
    /// docs/performance.md.
    Bench {
        /// Rounds per workload (each: every mode once, each between two
        /// no-agent runs). Fewer than 10 leaves docs/performance.md alone.
        #[arg(long, default_value_t = bench::DOC_ROUNDS)]
        rounds: usize,
        /// Only the workloads whose name contains this (`unpipelined`,
        /// `pipelined`, `churn`).
        #[arg(long)]
        only: Option<String>,
        /// Modes to compare, comma-separated; `none` (the baseline) always runs.
        #[arg(long, value_enum, value_delimiter = ',', default_values = ["none", "agent", "bare", "floor", "bpftrace"])]
        modes: Vec<bench::Mode>,
        /// Multiply every workload's `-n` by this (smoke runs, e.g. 0.05).
        #[arg(long, hide = true, default_value_t = 1.0)]
        scale: f64,
    },
    /// Soak and overload: the lab's load (10,000 held connections, 1,000 new
    /// connections/s, pipelined requests toward 100k/s, error replies,
    /// resets, dropped SYNs) with the agent for N minutes, between two
    /// no-agent phases; samples the agent's RSS, CPU, BPF map memory and
    /// drop counters, and writes target/soak/soak-<N>m.md and .json.
    Soak {
        /// Minutes the agent runs under load.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Minutes of each no-agent phase (default: a sixth of `--minutes`,
        /// between 15 s and 5 min).
        #[arg(long)]
        baseline_minutes: Option<f64>,
    },
    /// The seed incidents, one after another, with the real agent: a scale-up
    /// (connect storm, pool pressure), dropped SYNs under connect-timeout
    /// retries, a failover, cross-zone reads; in network namespaces with a
    /// real Redis primary and replica and real clients. Narration on stderr,
    /// the agent's alerts on stdout. Fails if an incident goes undetected.
    Demo,
    /// Set up if needed, build, and write the agent's container image
    /// (binary + the libraries `ldd` lists, one layer) as an OCI image
    /// layout archive in target/image/, without a container engine.
    Image,
    /// Boot the kernels of EKS nodes (Debian's 5.10 and 6.1) under qemu and
    /// run integration test binaries built here inside them, with a real
    /// redis-server; report which programs attach and which tests pass, and
    /// refresh the table in docs/kernels.md.
    VmTest {
        /// Which kernels: 6.1 (AL2023, Bottlerocket), 5.10 (Amazon Linux 2),
        /// host (this machine's own, no qemu), or all three.
        #[arg(long, value_enum, default_value = "6.1")]
        kernel: vm::KernelChoice,
        /// Test binaries of the `tests` package to run (repeatable).
        #[arg(long = "test", default_values = vm::DEFAULT_TESTS)]
        tests: Vec<String>,
        /// Timeouts of the test lab are multiplied by this in the guest
        /// (`RESPTRACE_TIME_SCALE`).
        #[arg(long, default_value_t = vm::DEFAULT_TIME_SCALE)]
        time_scale: u32,
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Run the cargo-fuzz targets in fuzz/ side by side (nightly, libFuzzer,
    /// AddressSanitizer, a 2 GiB RSS limit) and report executions, coverage
    /// and peak memory; fails on any crash. Installs cargo-fuzz on first use.
    Fuzz {
        /// Seconds per target (0: only capture seeds, with --capture).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (repeatable); all by default.
        #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        targets: Vec<String>,
        /// Record the seed corpus (fuzz/seeds/) anew from real clients of a
        /// real redis-server (done anyway when it is missing).
        #[arg(long)]
        capture: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Setup => setup::run(),
        Command::Build => {
            setup::ensure()?;
            build_agent()
        }
        Command::Image => {
            setup::ensure()?;
            build_agent()?;
            image::build(&agent_binary(), env!("CARGO_PKG_VERSION")).map(drop)
        }
        Command::Demo => {
            require_root("cargo xtask demo creates network namespaces and loads eBPF programs")?;
            setup::ensure()?;
            build_agent()?;
            demo()
        }
        Command::Run { args } => {
            setup::ensure()?;
            build_agent()?;
            run_agent(&args)
        }
        Command::Test { filter } => {
            require_root("cargo xtask test loads eBPF programs and changes firewall rules")?;
            setup::ensure()?;
            test(filter.as_deref())
        }
        Command::Bench {
            rounds,
            only,
            modes,
            scale,
        } => {
            require_root("cargo xtask bench loads eBPF programs")?;
            setup::ensure()?;
            if modes.contains(&bench::Mode::Bpftrace) {
                setup::ensure_packages(setup::BENCH_PACKAGES)?;
            }
            if modes.iter().any(|m| {
                matches!(
                    m,
                    bench::Mode::Agent | bench::Mode::Bare | bench::Mode::Floor
                )
            }) {
                build_agent()?;
            }
            bench::run(&bench::Options {
                agent: &agent_binary(),
                rounds,
                only: only.as_deref(),
                modes: &modes,
                scale,
            })
        }
        Command::Soak {
            minutes,
            baseline_minutes,
        } => {
            require_root("cargo xtask soak loads eBPF programs and changes firewall rules")?;
            setup::ensure()?;
            build_agent()?;
            soak(minutes, baseline_minutes)
        }
        Command::VmTest {
            kernel,
            tests,
            time_scale,
            filter,
        } => {
            require_root("cargo xtask vm-test installs packages and loads eBPF programs")?;
            setup::ensure()?;
            vm::run(&vm::Options {
                kernel,
                tests,
                filter,
                time_scale,
            })
        }
        Command::Fuzz {
            seconds,
            mut targets,
            capture,
        } => {
            // The targets link the agent, whose build script needs the
            // eBPF toolchain.
            setup::ensure()?;
            if targets.is_empty() {
                targets = fuzz::TARGETS.iter().map(ToString::to_string).collect();
            }
            fuzz::run(&fuzz::Options {
                seconds,
                targets: &targets,
                capture,
            })
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn agent_binary() -> PathBuf {
    workspace_root().join("target/release/resptrace")
}

fn build_agent() -> anyhow::Result<()> {
    util::step("build target/release/resptrace");
    run_status(cargo().args(["build", "--release", "--locked", "--package", "agent"]))
}

fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "{why}: run it as root (e.g. `sudo -E cargo xtask ...`)"
    );
    Ok(())
}

fn run_agent(args: &[String]) -> anyhow::Result<()> {
    let binary = agent_binary();
    let mut command = if is_root() {
        std::process::Command::new(&binary)
    } else {
        eprintln!("==> not root: running the agent through sudo");
        let mut sudo = std::process::Command::new("sudo");
        sudo.arg(&binary);
        sudo
    };
    // A human at a terminal reads aligned lines, unless asked otherwise.
    let format_chosen = args
        .iter()
        .any(|a| a == "--format" || a.starts_with("--format="))
        || std::env::var_os("RESPTRACE_FORMAT").is_some();
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) && !format_chosen {
        command.args(["--format", "pretty"]);
    }
    command.args(args);
    // Ctrl-C reaches the agent (same process group), which detaches and exits;
    // xtask only waits for it.
    // SAFETY: setting a signal disposition to SIG_IGN is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = command
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    anyhow::ensure!(status.success(), "resptrace exited with {status}");
    Ok(())
}

/// Runs the lab's soak test (`tests/soak.rs`, `soak_for_minutes`), which
/// writes its report into target/soak/.
fn soak(minutes: f64, baseline_minutes: Option<f64>) -> anyhow::Result<()> {
    anyhow::ensure!(minutes > 0.0, "--minutes must be positive");
    anyhow::ensure!(
        baseline_minutes.is_none_or(|b| b > 0.0),
        "--baseline-minutes must be positive"
    );
    util::step(&format!("soak: {minutes} min with the agent"));
    let mut command = cargo();
    command
        .args([
            "test",
            "--release",
            "--locked",
            "-p",
            "tests",
            "--test",
            "soak",
        ])
        .args([
            "--",
            "--ignored",
            "--exact",
            "soak_for_minutes",
            "--nocapture",
        ])
        .env("RESPTRACE_BIN", agent_binary())
        .env("RESPTRACE_SOAK_MINUTES", minutes.to_string())
        .env("RESPTRACE_SOAK_DIR", workspace_root().join("target/soak"));
    if let Some(baseline) = baseline_minutes {
        command.env("RESPTRACE_SOAK_BASELINE_MINUTES", baseline.to_string());
    }
    run_status(&mut command)
}

fn demo() -> anyhow::Result<()> {
    util::step("build target/release/demo");
    run_status(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "tests",
        "--bin",
        "demo",
    ]))?;
    let demo = workspace_root().join("target/release/demo");
    let status = std::process::Command::new(&demo)
        .env("RESPTRACE_BIN", agent_binary())
        .status()
        .with_context(|| format!("starting {}", demo.display()))?;
    anyhow::ensure!(status.success(), "the demo failed ({status}): see above");
    Ok(())
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    util::step("rustfmt");
    run_status(cargo().args(["fmt", "--all", "--", "--check"]))?;
    util::step("clippy");
    run_status(cargo().args([
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build_agent()?;
    util::step("unit and integration tests");
    let mut command = cargo();
    command
        .args(["test", "--release", "--locked"])
        .env("RESPTRACE_BIN", agent_binary());
    if let Some(filter) = filter {
        command.args(["--", filter]);
    }
    run_status(&mut command)?;
    eprintln!(
        "==> all tests passed in {:.0?}",
        std::time::Duration::from_secs(started.elapsed().as_secs())
    );
    Ok(())
}
