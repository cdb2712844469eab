//! Loading the kernel programs, attaching them, and reading their counters.

pub mod connect;
pub mod connection;
mod openssl;
pub mod resp;
pub mod tls;

use std::path::Path;

use agent_common::{Config, ConnectionState, EVENT_RINGS, FlowTuple, STAT_COUNT, StatId};
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};

/// The kernel programs, built by `build.rs` from `agent-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/resptrace"));

/// One tracepoint program and where it attaches.
#[derive(Debug, Clone, Copy)]
pub struct TracepointProgram {
    /// Function name in `agent-ebpf`.
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    /// First kernel that has the tracepoint; older kernels run without it.
    pub since: (u32, u32),
    pub required: bool,
}

pub struct LoadOptions<'a> {
    pub ports: &'a [u16],
    pub ring_buffer_bytes: u32,
    pub tracefs: &'a Path,
    /// Where the packet programs attach (the cgroup2 root).
    pub cgroup_root: &'a Path,
    pub hook: resp::PacketHook,
    /// Probe OpenSSL for TLS plaintext (`--no-tls-uprobes` clears it).
    pub tls_uprobes: bool,
}

/// Loaded and attached programs; dropping this detaches everything.
pub struct Probes {
    // Keeps programs and links alive.
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, u64>,
    connections: HashMap<MapData, FlowTuple, ConnectionState>,
    /// `category/name` of every attached tracepoint and packet program.
    pub attached: Vec<String>,
    tls: Option<tls::TlsProbes>,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelStats {
    pub ring_buffer_full: u64,
    pub connect_map_full: u64,
    pub connection_map_full: u64,
    pub read_failed: u64,
    pub resp_flow_map_full: u64,
    pub resp_truncated: u64,
    /// TLS library calls whose connection was not found.
    pub tls_unresolved: u64,
    /// Program runs the kernel skipped because another tracing program was
    /// running on the same CPU (an interrupt arriving during one): events
    /// lost without a trace otherwise. Linux 5.12+; 0 before.
    pub missed_runs: u64,
}

impl Probes {
    /// Loads and attaches everything; returns the probes and their event ring buffer.
    pub fn load(options: &LoadOptions<'_>) -> anyhow::Result<(Self, Vec<RingBuf<MapData>>)> {
        let layout = connect::resolve(options.tracefs)?;
        let rings = event_rings_used();
        let ring_bytes = ring_bytes(options.ring_buffer_bytes, rings);
        let mut config = Config {
            port_count: options.ports.len() as u32,
            flags: layout.flags,
            offsets: layout.offsets,
            wakeup_bytes: ring_bytes / 4,
            ..Default::default()
        };
        config.ports[..options.ports.len()].copy_from_slice(options.ports);

        let ring_names: Vec<String> = (0..EVENT_RINGS).map(|i| format!("EVENTS_{i}")).collect();
        let mut loader = EbpfLoader::new();
        loader.override_global("CONFIG", &config, true);
        for (index, name) in ring_names.iter().enumerate() {
            // A CPU number beyond the CPUs this node can have never picks it.
            let bytes = if (index as u32) < rings {
                ring_bytes
            } else {
                MIN_RING_BYTES
            };
            loader.map_max_entries(name, bytes);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF programs into the kernel")?;

        let mut attached = Vec::new();
        for tp in connect::PROGRAMS {
            if !layout.available.contains(&tp.program) {
                anyhow::ensure!(
                    !tp.required,
                    "tracepoint {}/{} is missing (needs Linux {}.{}+)",
                    tp.category,
                    tp.name,
                    tp.since.0,
                    tp.since.1
                );
                tracing::warn!(
                    "tracepoint {}/{} is missing (Linux {}.{}+): running without it",
                    tp.category,
                    tp.name,
                    tp.since.0,
                    tp.since.1
                );
                continue;
            }
            attach_tracepoint(&mut ebpf, tp)?;
            attached.push(format!("{}/{}", tp.category, tp.name));
        }

        attached.extend(resp::attach(
            &mut ebpf,
            options.cgroup_root,
            options.hook,
            layout.offsets.rcv_space_cookie != 0,
        )?);

        let mut tls = None;
        if options.tls_uprobes && options.hook == resp::PacketHook::Resp {
            if layout.offsets.rcv_space_cookie == 0 {
                tracing::warn!(
                    "TLS: no socket cookie in tcp/tcp_rcv_space_adjust on this kernel: TLS is timed as turns"
                );
            } else {
                match tls::TlsProbes::load(&mut ebpf) {
                    Ok(mut probes) => {
                        probes.attach_node_library(&mut ebpf);
                        attached.push("uprobe/SSL_write,SSL_read(_ex)".into());
                        tls = Some(probes);
                    }
                    // E.g. a kernel without uprobes: TLS is still timed.
                    Err(err) => {
                        tracing::warn!("TLS: no plaintext ({err:#}): TLS is timed as turns")
                    }
                }
            }
        }

        let events = ring_names[..rings as usize]
            .iter()
            .map(|name| {
                let map = ebpf
                    .take_map(name)
                    .with_context(|| format!("map {name} missing"))?;
                RingBuf::try_from(map).with_context(|| format!("map {name} is not a ring buffer"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let stats = PerCpuArray::try_from(ebpf.take_map("STATS").context("map STATS missing")?)
            .context("map STATS is not a per-CPU array")?;
        let connections = HashMap::try_from(
            ebpf.take_map("CONNECTIONS")
                .context("map CONNECTIONS missing")?,
        )
        .context("map CONNECTIONS is not a hash map")?;
        let probes = Self {
            ebpf,
            stats,
            connections,
            attached,
            tls,
        };
        Ok((probes, events))
    }

    /// Adds connections that were open before the programs attached; entries
    /// the programs created meanwhile are kept. Returns how many were added.
    pub fn seed_connections(&mut self, seeds: &[(FlowTuple, ConnectionState)]) -> usize {
        const BPF_NOEXIST: u64 = 1;
        seeds
            .iter()
            .filter(|(flow, state)| self.connections.insert(flow, state, BPF_NOEXIST).is_ok())
            .count()
    }

    /// A process connected to a watched port: probe its TLS library.
    pub fn inspect_tls(&mut self, pid: u32) {
        if let Some(tls) = &mut self.tls {
            tls.inspect(&mut self.ebpf, pid);
        }
    }

    /// Periodic: detaches TLS libraries no traced process uses any more.
    pub fn tls_upkeep(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.upkeep(&mut self.ebpf);
        }
    }

    /// The counting floor's counters (`agent_common::resp::floor`), summed
    /// over CPUs.
    pub fn floor_counts(&self) -> anyhow::Result<[u64; 5]> {
        use agent_common::resp::floor;
        const _: () = assert!(floor::COUNTERS == 5);
        let counts: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("FLOOR_COUNTS")
                .context("map FLOOR_COUNTS missing")?,
        )
        .context("map FLOOR_COUNTS is not a per-CPU array")?;
        let mut sums = [0u64; 5];
        for (index, sum) in sums.iter_mut().enumerate() {
            *sum = counts
                .get(&(index as u32), 0)
                .context("reading FLOOR_COUNTS")?
                .iter()
                .sum();
        }
        Ok(sums)
    }

    /// The connections the kernel tracks right now.
    pub fn open_connections(&self) -> Vec<(FlowTuple, ConnectionState)> {
        self.connections.iter().filter_map(Result::ok).collect()
    }

    pub fn kernel_stats(&self) -> KernelStats {
        let sum = |id: StatId| -> u64 {
            self.stats
                .get(&(id as u32), 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        debug_assert_eq!(STAT_COUNT, 7, "update KernelStats with the new counters");
        KernelStats {
            ring_buffer_full: sum(StatId::RingBufferFull),
            connect_map_full: sum(StatId::ConnectMapFull),
            connection_map_full: sum(StatId::ConnectionMapFull),
            read_failed: sum(StatId::ReadFailed),
            resp_flow_map_full: sum(StatId::RespFlowMapFull),
            resp_truncated: sum(StatId::RespTruncated),
            tls_unresolved: sum(StatId::TlsUnresolved),
            missed_runs: self
                .ebpf
                .programs()
                .map(|(_, program)| recursion_misses(program))
                .sum(),
        }
    }
}

/// `bpf_prog_info.recursion_misses` of `program` (0 where unknown): the
/// kernel runs at most one tracing program per CPU at a time and skips, but
/// counts, a tracepoint's program that would nest in another.
fn recursion_misses(program: &aya::programs::Program) -> u64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// The `info` member of `union bpf_attr`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let Ok(fd) = program.fd() else {
        return 0;
    };
    // SAFETY: a plain C struct of integers; all zeroes is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoByFd {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        // Older kernels fill only the prefix they know and leave the rest 0.
        info_len: std::mem::size_of_val(&info) as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: `attr` and `info` outlive the call; the kernel writes at most
    // `info_len` bytes into `info`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if rc == 0 { info.recursion_misses } else { 0 }
}

pub(crate) fn attach_tracepoint(ebpf: &mut Ebpf, tp: &TracepointProgram) -> anyhow::Result<()> {
    let program: &mut TracePoint = program(ebpf, tp.program)?;
    program
        .load()
        .with_context(|| format!("verifier rejected program {}", tp.program))?;
    program
        .attach(tp.category, tp.name)
        .with_context(|| format!("attaching to tracepoint {}/{}", tp.category, tp.name))?;
    Ok(())
}

/// A program of the eBPF object, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// The smallest ring the kernel takes: one page.
const MIN_RING_BYTES: u32 = 4096;

/// Rings the programs can write to here: one per possible CPU, up to
/// [`EVENT_RINGS`] (beyond, CPUs share them).
fn event_rings_used() -> u32 {
    let cpus = aya::util::nr_cpus().map_or(EVENT_RINGS as usize, |n| n.max(1));
    (cpus as u32).min(EVENT_RINGS)
}

/// Each ring's size: `total_bytes` (`--ring-buffer-kib`) shared by `rings`,
/// a power of two and at least a page.
fn ring_bytes(total_bytes: u32, rings: u32) -> u32 {
    let share = total_bytes / rings.max(1);
    if share < MIN_RING_BYTES {
        MIN_RING_BYTES
    } else {
        1 << share.ilog2()
    }
}

#[cfg(test)]
mod ring_size_tests {
    use super::*;

    #[test]
    fn rings_share_the_size_in_powers_of_two_of_at_least_a_page() {
        assert_eq!(ring_bytes(8 << 20, 1), 8 << 20);
        assert_eq!(ring_bytes(8 << 20, 2), 4 << 20);
        assert_eq!(ring_bytes(8 << 20, 3), 2 << 20);
        assert_eq!(ring_bytes(8 << 20, 8), 1 << 20);
        assert_eq!(ring_bytes(4096, 2), 4096);
        assert!(event_rings_used() >= 1 && event_rings_used() <= EVENT_RINGS);
    }
}
