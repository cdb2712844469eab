//! Enrich: adds what the kernel cannot see cheaply to decoded events — the
//! process's cgroup path, which names the pod on cgroup v1 nodes too.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{
    decode::{Event, Task},
    procfs,
    workload::Workload,
};

/// Processes remembered at once; the cache is cleared when full.
const MAX_CACHED_PROCESSES: usize = 8_192;
/// A pid's cgroup is read again after this long (pids are reused).
const CACHE_TTL: Duration = Duration::from_secs(30);

/// The cgroup2 tree is walked again on a miss at most this often.
const CGROUP_RESCAN: Duration = Duration::from_secs(5);
/// Cgroup ids remembered at most (a node's cgroup tree is far smaller).
const MAX_CGROUP_IDS: usize = 65_536;

#[derive(Default)]
pub struct Enricher {
    cgroups: HashMap<u32, (Instant, Option<String>)>,
    cgroup_paths: CgroupPaths,
    /// Cgroup id → workload, for the hot path (one lookup per request).
    workloads: rustc_hash::FxHashMap<u64, Workload>,
}

/// Cgroup v2 id → path below the cgroup2 mount (the id is the directory's
/// inode number). Rebuilt by walking the tree when an unknown id shows up,
/// so a new pod is named from its first event on; deleted cgroups go with
/// the next walk.
#[derive(Default)]
pub struct CgroupPaths {
    root: Option<std::path::PathBuf>,
    paths: HashMap<u64, String>,
    scanned: Option<Instant>,
}

impl CgroupPaths {
    pub fn new(root: Option<std::path::PathBuf>) -> Self {
        Self {
            root,
            ..Default::default()
        }
    }

    pub fn path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(path) = self.paths.get(&id) {
            return Some(path.clone());
        }
        let due = self.scanned.is_none_or(|at| at.elapsed() >= CGROUP_RESCAN);
        if due && let Some(root) = self.root.clone() {
            self.scanned = Some(Instant::now());
            self.paths.clear();
            self.walk(&root, &root);
        }
        self.paths.get(&id).cloned()
    }

    fn walk(&mut self, root: &std::path::Path, dir: &std::path::Path) {
        use std::os::unix::fs::MetadataExt as _;
        if self.paths.len() >= MAX_CGROUP_IDS {
            return;
        }
        if let Ok(meta) = std::fs::metadata(dir) {
            let relative = dir.strip_prefix(root).unwrap_or(dir);
            self.paths
                .insert(meta.ino(), format!("/{}", relative.display()));
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.walk(root, &entry.path());
            }
        }
    }
}

impl Enricher {
    pub fn enrich(&mut self, event: &mut Event) {
        match event {
            Event::Connect(connect) => self.task(&mut connect.task),
            Event::Close(close) => {
                if let Some(task) = close.task.as_mut() {
                    self.task(task);
                }
            }
            Event::SynAckRetransmit(_) => {}
            Event::AppRead { .. } | Event::SocketGone { .. } => {}
        }
    }

    pub fn with_cgroup_root(root: Option<std::path::PathBuf>) -> Self {
        Self {
            cgroup_paths: CgroupPaths::new(root),
            ..Default::default()
        }
    }

    /// Names the cgroups of a window's series.
    pub fn window(&mut self, window: &mut crate::aggregate::Window) {
        for series in &mut window.series {
            series.cgroup = self.cgroup_paths.path(series.cgroup_id);
        }
    }

    /// Names the cgroups of open-connection gauges.
    pub fn gauges(&mut self, gauges: &mut [crate::gauges::Gauge]) {
        for gauge in gauges {
            gauge.cgroup = self.cgroup_paths.path(gauge.key.cgroup_id);
        }
    }

    /// The workload of a cgroup v2 id (requests and gauges carry only that).
    pub fn workload_of_cgroup(&mut self, cgroup_id: u64) -> Workload {
        if let Some(workload) = self.workloads.get(&cgroup_id) {
            return workload.clone();
        }
        if self.workloads.len() >= MAX_CGROUP_IDS {
            self.workloads.clear();
        }
        let workload = Workload::new(self.cgroup_paths.path(cgroup_id).as_deref(), None);
        // Unknown ids are asked again after the next tree walk.
        if workload.cgroup.is_some() {
            self.workloads.insert(cgroup_id, workload.clone());
        }
        workload
    }

    /// The workload of an enriched task: its process's cgroup (which names
    /// the pod on cgroup v1 nodes too), else its v2 cgroup, else its name.
    pub fn workload_of_task(&mut self, task: &Task) -> Workload {
        match &task.cgroup {
            Some(path) => Workload::new(Some(path), Some(&task.comm)),
            None => {
                let mut workload = self.workload_of_cgroup(task.cgroup_id);
                if workload.cgroup.is_none() || workload.cgroup.as_deref() == Some("/") {
                    workload = Workload::new(None, Some(&task.comm));
                }
                workload
            }
        }
    }

    /// Names the cgroup of an exchange.
    pub fn exchange(&mut self, exchange: &mut crate::tracker::Exchange) {
        exchange.cgroup = self.cgroup_paths.path(exchange.cgroup_id);
    }

    fn task(&mut self, task: &mut Task) {
        if task.pid != 0 {
            task.cgroup = self.cgroup(task.pid);
        }
        // The kernel's cgroup id names the cgroup when /proc cannot: a
        // short-lived client (`redis-cli`) gone before its event is read,
        // or a container's cgroup namespace, where `/proc/<pid>/cgroup`
        // names no host path. Not on v1-only nodes (the id is the v2 root's).
        if task.cgroup.is_none() {
            task.cgroup = self
                .cgroup_paths
                .path(task.cgroup_id)
                .filter(|path| path != "/");
        }
    }

    fn cgroup(&mut self, pid: u32) -> Option<String> {
        let now = Instant::now();
        if let Some((read_at, cgroup)) = self.cgroups.get(&pid)
            && now.duration_since(*read_at) < CACHE_TTL
        {
            return cgroup.clone();
        }
        if self.cgroups.len() >= MAX_CACHED_PROCESSES {
            self.cgroups.clear();
        }
        let cgroup = procfs::process_cgroup(pid);
        self.cgroups.insert(pid, (now, cgroup.clone()));
        cgroup
    }
}
