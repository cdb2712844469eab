//! Pods as kubelet-shaped cgroups, so the agent's cgroup id and
//! `/proc/<pid>/cgroup` look as they do on a Kubernetes node:
//!
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope`
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>/<id>`
//!
//! (Guaranteed pods sit directly under `kubepods[.slice]`, as kubelet puts them.)
//! [`Hierarchy::V2`] creates the pod in the cgroup2 mount; [`Hierarchy::V1`]
//! only in the v1 hierarchies (memory, pids, …) and leaves the process in the
//! v2 root: what BPF sees on a cgroup-v1 node such as Amazon Linux 2, where
//! `bpf_get_current_cgroup_id()` is the root's id for every pod.

use std::{
    fs,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{netns::next_serial, scaled, wait_until};

/// The marker in every lab pod uid (`72746c61` is "rtla"): the first group is
/// the owning test process's pid in hex, so the sweep knows whose it is.
const UID_MARKER: &str = "7274-6c61";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    #[default]
    Burstable,
    BestEffort,
}

impl Qos {
    /// The path component kubelet uses (`None`: directly under kubepods).
    fn name(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// kubelet's `--cgroup-driver`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Driver {
    #[default]
    Systemd,
    Cgroupfs,
}

/// Which cgroup hierarchies hold the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hierarchy {
    /// The cgroup2 mount (a cgroup-v2 node).
    #[default]
    V2,
    /// Only the v1 controller hierarchies; the v2 cgroup stays the root.
    V1,
}

/// How a pod's cgroup looks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupSpec {
    pub qos: Qos,
    pub driver: Driver,
    pub hierarchy: Hierarchy,
}

impl CgroupSpec {
    /// The cgroupfs layout in v1 hierarchies only: an Amazon Linux 2 node.
    pub fn v1_host() -> Self {
        Self {
            qos: Qos::Burstable,
            driver: Driver::Cgroupfs,
            hierarchy: Hierarchy::V1,
        }
    }
}

/// One pod with one container: its cgroup directories exist while this
/// lives; on drop its processes are killed and the directories removed.
pub struct PodCgroup {
    spec: CgroupSpec,
    uid: String,
    container_id: String,
    /// Container path relative to a hierarchy root, starting with `/`.
    path: String,
    /// Hierarchy roots the pod exists in (the cgroup2 mount, or v1 mounts).
    roots: Vec<PathBuf>,
    /// `None` on a cgroup-v1-only host (Amazon Linux 2, the 5.10 guest).
    cgroup2: Option<PathBuf>,
}

impl PodCgroup {
    pub fn create(spec: CgroupSpec) -> anyhow::Result<Self> {
        crate::sweep::sweep_once();
        let cgroup2 = match spec.hierarchy {
            Hierarchy::V2 => Some(cgroup2_mount()?),
            Hierarchy::V1 => cgroup2_mount().ok(),
        };
        let uid = format!(
            "{:08x}-{UID_MARKER}-{:04x}-{:012x}",
            std::process::id(),
            next_serial() & 0xffff,
            fastrand::u64(..1 << 48)
        );
        let container_id: String = (0..4)
            .map(|_| format!("{:016x}", fastrand::u64(..)))
            .collect();
        let path = pod_path(spec, &uid, &container_id);
        let roots = match spec.hierarchy {
            Hierarchy::V2 => cgroup2.clone().into_iter().collect(),
            Hierarchy::V1 => v1_mounts()?,
        };
        let pod = Self {
            spec,
            uid,
            container_id,
            path,
            roots,
            cgroup2,
        };
        for root in &pod.roots {
            let dir = root.join(pod.path.trim_start_matches('/'));
            // Retried: a concurrent test process may rmdir an empty
            // kubepods parent between our mkdirs.
            let created = (0..5).any(|_| fs::create_dir_all(&dir).is_ok());
            if !created {
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        Ok(pod)
    }

    pub fn spec(&self) -> CgroupSpec {
        self.spec
    }

    /// The pod uid (UUID-shaped).
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The container id (64 hex digits).
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// The container's cgroup path, as in `/proc/<pid>/cgroup`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The v2 cgroup id BPF reports for the pod's processes
    /// (`bpf_get_current_cgroup_id`, `bpf_skb_cgroup_id`): the inode number
    /// of the v2 directory — the cgroup2 root's in [`Hierarchy::V1`] mode.
    pub fn cgroup_id(&self) -> anyhow::Result<u64> {
        let dir = match (self.spec.hierarchy, &self.cgroup2) {
            (Hierarchy::V2, Some(root)) => root.join(self.path.trim_start_matches('/')),
            (Hierarchy::V1, Some(root)) => root.clone(),
            // No cgroup2 mount: BPF reports the default hierarchy's root, id 1.
            (_, None) => return Ok(ROOT_CGROUP_ID),
        };
        Ok(fs::metadata(&dir)
            .with_context(|| format!("stat {}", dir.display()))?
            .ino())
    }

    /// The container directories, one per hierarchy.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.roots
            .iter()
            .map(|root| root.join(self.path.trim_start_matches('/')))
            .collect()
    }

    /// Pids in the container cgroup.
    pub fn pids(&self) -> Vec<u32> {
        self.dirs().iter().flat_map(|dir| read_procs(dir)).collect()
    }

    /// Makes `command`'s process join the pod (written to `cgroup.procs`
    /// between fork and exec, so it never runs outside the pod).
    pub fn enter_on_spawn(&self, command: &mut Command) {
        let mut files: Vec<std::ffi::CString> = self
            .dirs()
            .iter()
            .map(|dir| cstring(&dir.join("cgroup.procs")))
            .collect();
        if let (Hierarchy::V1, Some(root)) = (self.spec.hierarchy, &self.cgroup2) {
            // The test process may itself sit in a v2 cgroup; a v1 pod's is the root.
            files.push(cstring(&root.join("cgroup.procs")));
        }
        // SAFETY: open/write/close are async-signal-safe; nothing allocates.
        unsafe {
            command.pre_exec(move || {
                for file in &files {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" moves the writing process.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for root in &self.roots {
            if let Err(e) = remove_pod(root, &self.path) {
                eprintln!("lab: {e:#}");
            }
        }
    }
}

fn cstring(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in cgroup paths")
}

/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
/// or `/kubepods/burstable/pod<uid>/<id>`.
fn pod_path(spec: CgroupSpec, uid: &str, id: &str) -> String {
    match (spec.driver, spec.qos.name()) {
        (Driver::Systemd, qos) => {
            // systemd escapes `-` in unit names; kubelet writes `_` instead.
            let uid = uid.replace('-', "_");
            let slice = match qos {
                Some(qos) => {
                    format!("/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid}.slice")
                }
                None => format!("/kubepods.slice/kubepods-pod{uid}.slice"),
            };
            format!("{slice}/cri-containerd-{id}.scope")
        }
        (Driver::Cgroupfs, Some(qos)) => format!("/kubepods/{qos}/pod{uid}/{id}"),
        (Driver::Cgroupfs, None) => format!("/kubepods/pod{uid}/{id}"),
    }
}

/// Kills the container's processes, removes the container and pod
/// directories, and the kubepods parents if nothing else uses them.
pub(crate) fn remove_pod(root: &Path, container_path: &str) -> anyhow::Result<()> {
    let leaf = root.join(container_path.trim_start_matches('/'));
    if leaf.exists() {
        let emptied = wait_until(scaled(Duration::from_secs(5)), || {
            let pids = read_procs(&leaf);
            for &pid in &pids {
                crate::signal(pid, libc::SIGKILL);
            }
            pids.is_empty()
        });
        if !emptied {
            bail!(
                "processes survive in {}: {:?}",
                leaf.display(),
                read_procs(&leaf)
            );
        }
    }
    rmdir_retrying(&leaf)?;
    // Then the pod and kubepods parents, up to the first one another pod
    // still uses (rmdir fails on a cgroup with children).
    let mut dir = leaf.parent();
    while let Some(parent) = dir.filter(|d| *d != root && d.starts_with(root)) {
        match fs::remove_dir(parent) {
            Ok(()) => dir = parent.parent(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir = parent.parent(),
            Err(_) => break,
        }
    }
    Ok(())
}

fn rmdir_retrying(dir: &Path) -> anyhow::Result<()> {
    let mut last = None;
    // EBUSY right after the last task was killed: it is still exiting.
    let removed = wait_until(scaled(Duration::from_secs(5)), || {
        match fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                last = Some(e);
                false
            }
        }
    });
    match last {
        Some(e) if !removed => Err(e).with_context(|| format!("removing {}", dir.display())),
        _ => Ok(()),
    }
}

pub(crate) fn read_procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.parse().ok()).collect())
        .unwrap_or_default()
}

/// The cgroup v2 id of the root cgroup, which BPF reports for every process
/// on a cgroup-v1-only host.
pub const ROOT_CGROUP_ID: u64 = 1;

/// The cgroup2 mount point, from `/proc/mounts` (`/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|(fstype, _, _)| fstype == "cgroup2")
        .map(|(_, dir, _)| dir)
        .context("no cgroup2 mount in /proc/mounts")
}

/// v1 hierarchies a pod is created in: every mounted one but cpuset (whose
/// new groups need cpus/mems set before a task may join).
pub fn v1_mounts() -> anyhow::Result<Vec<PathBuf>> {
    let found: Vec<PathBuf> = mounts()?
        .into_iter()
        .filter(|(fstype, _, options)| {
            fstype == "cgroup" && !options.split(',').any(|o| o == "cpuset")
        })
        .map(|(_, dir, _)| dir)
        .collect();
    if found.is_empty() {
        bail!("no cgroup v1 hierarchy is mounted: this host cannot play a cgroup-v1 node");
    }
    Ok(found)
}

/// Every cgroup hierarchy root (v2 and v1), for the sweep.
pub(crate) fn all_roots() -> Vec<PathBuf> {
    mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|(fstype, _, _)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(_, dir, _)| dir)
        .collect()
}

fn mounts() -> anyhow::Result<Vec<(String, PathBuf, String)>> {
    let text = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let dir = fields.next()?;
            let fstype = fields.next()?;
            let options = fields.next()?;
            Some((fstype.to_string(), PathBuf::from(dir), options.to_string()))
        })
        .collect())
}

/// Lab pods under `root` (container paths) whose owning pid is `dead`.
pub(crate) fn leftover_pods(root: &Path, dead: impl Fn(u32) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.join("kubepods.slice"), root.join("kubepods")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match lab_pod_owner(&name) {
                Some(pid) if dead(pid) => {
                    // The container dirs below the pod dir.
                    let containers: Vec<PathBuf> = fs::read_dir(&path)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect();
                    let pod_rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    if containers.is_empty() {
                        found.push(format!("/{}", pod_rel.display()));
                    }
                    for container in containers {
                        let rel = container.strip_prefix(root).unwrap_or(&container);
                        found.push(format!("/{}", rel.display()));
                    }
                }
                Some(_) => {}
                None => stack.push(path),
            }
        }
    }
    found
}

/// The owner pid of a lab pod directory name (`pod<uid>` or
/// `kubepods-…-pod<uid>.slice`), `None` for anything else.
fn lab_pod_owner(dir_name: &str) -> Option<u32> {
    let uid = dir_name
        .rsplit_once("pod")?
        .1
        .trim_end_matches(".slice")
        .replace('_', "-");
    let (pid, rest) = uid.split_once('-')?;
    if pid.len() != 8 || !rest.starts_with(UID_MARKER) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_paths() {
        let uid = "0000002a-7274-6c61-0001-0000000000ff";
        let spec = CgroupSpec::default();
        assert_eq!(
            pod_path(spec, uid, "c0ffee"),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0000002a_7274_6c61_0001_0000000000ff.slice/cri-containerd-c0ffee.scope"
        );
        let cgroupfs = CgroupSpec {
            driver: Driver::Cgroupfs,
            qos: Qos::Guaranteed,
            ..spec
        };
        assert_eq!(
            pod_path(cgroupfs, uid, "c0ffee"),
            format!("/kubepods/pod{uid}/c0ffee")
        );
        assert_eq!(lab_pod_owner(&format!("pod{uid}")), Some(42));
        assert_eq!(
            lab_pod_owner("kubepods-besteffort-pod0000002a_7274_6c61_0001_0000000000ff.slice"),
            Some(42)
        );
        assert_eq!(
            lab_pod_owner("pod3f1b2c4d-1111-2222-3333-444444444444"),
            None
        );
        assert_eq!(lab_pod_owner("kubepods-burstable.slice"), None);
    }
}
