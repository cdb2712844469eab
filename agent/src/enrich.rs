//! Enrich: adds what the kernel cannot see cheaply to decoded events — the
//! process's cgroup path, which names the pod on cgroup v1 nodes too.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{
    decode::{Event, Task},
    procfs,
};

/// Processes remembered at once; the cache is cleared when full.
const MAX_CACHED_PROCESSES: usize = 8_192;
/// A pid's cgroup is read again after this long (pids are reused).
const CACHE_TTL: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Enricher {
    cgroups: HashMap<u32, (Instant, Option<String>)>,
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
        }
    }

    fn task(&mut self, task: &mut Task) {
        if task.pid != 0 {
            task.cgroup = self.cgroup(task.pid);
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
