//! Running commands with their failures named.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

pub fn step(name: &str) {
    eprintln!("==> {name}");
}

/// `cargo` of the toolchain running xtask, at the workspace root.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(crate::workspace_root());
    command
}

/// Runs `command` with inherited stdio; an error names the command.
pub fn run_status(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    anyhow::ensure!(status.success(), "{command:?} failed with {status}");
    Ok(())
}

/// Runs `command` capturing its output; fails unless it exits 0.
pub fn output(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output)
}

/// Stdout of a command that succeeded, or `None`.
pub fn stdout_of(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A `redis-server` without persistence on 127.0.0.1:`port`, started from
/// `command` (e.g. pinned to a CPU) with `extra` arguments; ready once it
/// accepts connections, killed when dropped.
pub struct RedisServer(Child);

impl RedisServer {
    pub fn start(mut command: Command, port: u16, extra: &[&str]) -> anyhow::Result<Self> {
        let child = command
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (`cargo xtask setup` installs it)")?;
        let server = Self(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

/// A self-signed certificate for 127.0.0.1 (`openssl req`), for a Redis
/// TLS port; its directory is removed on drop.
pub struct TlsCert(PathBuf);

impl TlsCert {
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("resptrace-xtask-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cert = Self(dir);
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=resptrace-bench",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(cert.0.join("key.pem"))
            .arg("-out")
            .arg(cert.ca())
            .stderr(Stdio::null())
            .status()
            .context("running openssl (`cargo xtask setup` installs it)")?;
        anyhow::ensure!(status.success(), "openssl req failed");
        Ok(cert)
    }

    pub fn ca(&self) -> PathBuf {
        self.0.join("cert.pem")
    }

    /// `redis-server` arguments for TLS on `port`, clients unauthenticated.
    pub fn server_args(&self, port: u16) -> Vec<String> {
        let (cert, key) = (
            self.ca().display().to_string(),
            self.0.join("key.pem").display().to_string(),
        );
        [
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &cert,
            "--tls-auth-clients",
            "no",
        ]
        .map(String::from)
        .into()
    }
}

impl Drop for TlsCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
