//! Named network namespaces (`ip netns`), removed with everything inside them
//! on drop, and ways to run code in one: child processes (`setns` before
//! exec) and closures (a thread that `setns`es first).

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::{scaled, wait_until};

/// Every namespace, cgroup and rule the lab creates carries this prefix and
/// the pid of the test process that owns it: `rtl-<pid>-<n>-<role>`.
pub const NAME_PREFIX: &str = "rtl";

/// A name unique among concurrent test threads and processes:
/// `rtl-<pid>-<n>-<role>`.
pub(crate) fn unique_name(role: &str) -> String {
    format!(
        "{NAME_PREFIX}-{}-{}-{role}",
        std::process::id(),
        next_serial()
    )
}

/// Per-process counter behind every lab name.
pub(crate) fn next_serial() -> u32 {
    static SERIAL: AtomicU32 = AtomicU32::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// Runs `command`, fails with its stderr unless it exits 0, returns stdout.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A named network namespace (`/run/netns/<name>`). On drop every process
/// inside is killed and the namespace deleted; its veth ends go with it.
pub struct Netns {
    name: String,
    /// Open handle for `setns`; shared with prepared commands.
    file: Arc<File>,
}

impl Netns {
    /// Creates `rtl-<pid>-<n>-<role>` with `lo` up.
    pub fn create(role: &str) -> anyhow::Result<Self> {
        crate::sweep::sweep_once();
        let name = unique_name(role);
        run(Command::new("ip").args(["netns", "add", &name])).with_context(|| {
            format!("creating network namespace {name} (needs root and CONFIG_NET_NS)")
        })?;
        let file = match File::open(format!("/run/netns/{name}")) {
            Ok(file) => file,
            Err(e) => {
                let _ = run(Command::new("ip").args(["netns", "del", &name]));
                return Err(e).with_context(|| format!("opening /run/netns/{name}"));
            }
        };
        let netns = Self {
            name,
            file: Arc::new(file),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Several `ip` commands in one process (`ip -n <name> -batch -`).
    pub fn ip_batch(&self, lines: &[String]) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ip -batch")?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(lines.join("\n").as_bytes())?;
        drop(stdin);
        let output = child.wait_with_output()?;
        ensure!(
            output.status.success(),
            "ip -n {} -batch failed: {}\ncommands:\n{}",
            self.name,
            String::from_utf8_lossy(&output.stderr).trim(),
            lines.join("\n")
        );
        Ok(())
    }

    /// Sets a sysctl of this namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        run(self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")]))
        .map(drop)
    }

    /// A command that runs inside this namespace (`setns` between fork and
    /// exec; the mount namespace stays the host's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        let file = Arc::clone(&self.file);
        // SAFETY: setns is async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(move || enter(&file));
        }
        command
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// creates live here (and stay here when handed back). Processes must
    /// be spawned with [`Netns::command`] instead.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<T> {
                    enter(&self.file).with_context(|| format!("setns into {}", self.name))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The open namespace file, for threads the lab moves in for good.
    pub(crate) fn file_handle(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Every SNMP/netstat counter of this namespace (`nstat -a`): the
    /// kernel's own view, separate from other tests' namespaces.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let text = run(self.command("nstat").args(["-a", "-s", "-z"]))?;
        Ok(Counters::parse(&text))
    }

    /// Pids of processes inside this namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        netns_pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

/// Kills what runs in `name`, then deletes it. Used by the guard and the sweep.
pub(crate) fn remove_netns(name: &str) {
    let kill_all = || {
        for pid in netns_pids(name) {
            crate::signal(pid, libc::SIGKILL);
        }
        netns_pids(name).is_empty()
    };
    if !wait_until(scaled(Duration::from_secs(5)), kill_all) {
        eprintln!(
            "lab: processes survive in netns {name}: {:?}",
            netns_pids(name)
        );
    }
    if let Err(e) = run(Command::new("ip").args(["netns", "del", name])) {
        eprintln!("lab: {e:#}");
    }
}

pub(crate) fn netns_pids(name: &str) -> Vec<u32> {
    run(Command::new("ip").args(["netns", "pids", name]))
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Names in `ip netns list` (first word of each line).
pub(crate) fn list_netns() -> anyhow::Result<Vec<String>> {
    Ok(run(Command::new("ip").args(["netns", "list"]))?
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(String::from))
        .collect())
}

pub(crate) fn enter(file: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A snapshot of `nstat -a` counters.
#[derive(Clone, Debug, Default)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// Parses `nstat -a` output: `<name> <value> <rate>` lines.
    pub(crate) fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|line| {
                    let mut fields = line.split_whitespace();
                    let name = fields.next()?;
                    let value = fields.next()?.parse().ok()?;
                    Some((name.to_string(), value))
                })
                .collect(),
        )
    }

    /// A counter's value; 0 if the kernel does not list it (nstat omits
    /// some zero counters even with `-z` on older versions).
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// How much `name` grew since `earlier`.
    pub fn since(&self, earlier: &Counters, name: &str) -> u64 {
        self.get(name).saturating_sub(earlier.get(name))
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Process {
    /// `None` once handed to [`Process::wait_with_output`].
    child: Option<Child>,
    what: String,
}

impl Process {
    /// Spawns `command` (prepared by [`Netns::command`] or `Host::command`).
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let what = format!("{command:?}");
        let child = command
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        Ok(Self {
            child: Some(child),
            what,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// Fails if the process has exited (e.g. a server that could not bind).
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child_mut().try_wait()? {
            bail!("{} exited: {status}", self.what);
        }
        Ok(())
    }

    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("child present until consumed")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until consumed")
    }

    /// Waits for exit and collects piped output (for commands that end).
    pub fn wait_with_output(mut self) -> anyhow::Result<Output> {
        let child = self.child.take().expect("child present until consumed");
        child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", self.what))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
