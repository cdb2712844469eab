//! The Kubernetes manifests in `deploy/`, as a cluster would get them:
//! rendered by kustomize (the kubectl of `cargo xtask setup`) and parsed into
//! JSON, and the capability set the DaemonSet grants the agent.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The capabilities the DaemonSet adds (after dropping all), in its order:
/// `tests/caps.rs` proves each necessary and the three sufficient,
/// `tests/deploy.rs` that the rendered DaemonSet grants exactly these.
pub const AGENT_CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN"];

/// The capabilities `deploy/overlays/amazon-linux-2` grants instead, for
/// kernel 5.10 and cgroup v1: CAP_NET_ADMIN (attaching to a cgroup: 5.10
/// takes nothing else for it), CAP_SYS_ADMIN (the agent mounts a cgroup2
/// hierarchy of its own; it also covers CAP_BPF and CAP_PERFMON) and
/// CAP_SYS_RESOURCE (5.10 charges BPF maps to RLIMIT_MEMLOCK).
/// `tests/caps.rs` proves them on kernels before 5.11.
pub const AMAZON_LINUX_2_CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"];

/// `deploy/` in this checkout.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `~/.cache/resptrace/deploy/venv/bin` (`$XDG_CACHE_HOME` first), as
/// xtask's setup makes it; an error naming the fix when it is missing.
pub fn tools_dir() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("resptrace/deploy/venv/bin");
    anyhow::ensure!(
        bin.join("kubectl").exists() && bin.join("kubernetes-validate").exists(),
        "{} lacks kubectl or kubernetes-validate: run `cargo xtask setup`",
        bin.display()
    );
    Ok(bin)
}

/// `kubectl kustomize <dir>`: the YAML stream a cluster would be sent.
pub fn render(dir: &Path) -> anyhow::Result<String> {
    let output = Command::new(tools_dir()?.join("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize")?;
    if !output.status.success() {
        bail!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Every document of a YAML stream, as JSON (PyYAML of the same venv).
pub fn parse_yaml(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let script = "import json, sys, yaml\n\
                  json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
    let stdout = pipe(
        Command::new(tools_dir()?.join("python")).args(["-c", script]),
        yaml,
    )?;
    Ok(serde_json::from_str(&stdout)?)
}

/// `kubernetes-validate --strict` against Kubernetes `version` (e.g.
/// `1.30.0`): Ok with its report when every object passes, Err with it
/// otherwise. Unknown fields fail (`--strict`); kinds it has no schema for
/// only warn, so callers pass core kinds only.
pub fn validate(yaml: &str, version: &str) -> Result<String, String> {
    let bin = tools_dir().map_err(|e| e.to_string())?;
    let mut child = Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running kubernetes-validate: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(yaml.as_bytes())
        .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// Objects as YAML again (JSON is YAML), one document each.
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{o}\n"))
        .collect::<String>()
}

fn pipe(command: &mut Command, input: &str) -> anyhow::Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
}
