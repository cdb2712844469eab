//! Userspace half of `agent-ebpf/src/tls.rs`: the OpenSSL probes, attached
//! one `libssl` file at a time.
//!
//! A file is attached when a process that connects to a watched port maps
//! it (read from `/proc/<pid>/maps`, opened through `/proc/<pid>/root`, so
//! a container's own libssl is the one probed), and the node's own libssl
//! at start. The probes then cover every process using that file from its
//! first call on: a client's first commands are not lost to the time it
//! takes to attach. The node's file stays attached while the agent runs; a process
//! that never talks to a watched port pays a trap per call and leaves
//! (its fds are not watched sockets). A container's library is detached once
//! the processes that connected to a watched port with it have exited.
//! Where in a file the probes go (the public calls, or OpenSSL's internal
//! functions where a probe costs one trap less): `openssl.rs`.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};

use super::{openssl, program};

/// The handshake's entry and return (program, symbol): its reads bind an
/// `SSL *` to its connection before the first request is written.
const HANDSHAKE: [(&str, &str); 2] = [
    ("ssl_handshake", "SSL_do_handshake"),
    ("ssl_handshake_return", "SSL_do_handshake"),
];

/// The programs of one direction of `SSL_*` calls.
struct Direction {
    name: &'static str,
    /// (program, symbol): entries and returns of the public calls, for
    /// files whose internal call is not found.
    public: [(&'static str, &'static str); 4],
    /// (argument holding the count's pointer, entry program) for the
    /// internal call (`openssl::InternalCall::count_arg`).
    internal_entries: &'static [(u8, &'static str)],
    /// The internal call's return program.
    internal_return: &'static str,
}

const DIRECTIONS: [Direction; 2] = [
    Direction {
        name: "write",
        public: [
            ("ssl_write", "SSL_write"),
            ("ssl_write_return", "SSL_write"),
            ("ssl_write_ex", "SSL_write_ex"),
            ("ssl_write_ex_return", "SSL_write_ex"),
        ],
        internal_entries: &[(3, "ssl_write_ex"), (4, "ssl_write_ex2")],
        internal_return: "ssl_write_ex_return",
    },
    Direction {
        name: "read",
        public: [
            ("ssl_read", "SSL_read"),
            ("ssl_read_return", "SSL_read"),
            ("ssl_read_ex", "SSL_read_ex"),
            ("ssl_read_ex_return", "SSL_read_ex"),
        ],
        internal_entries: &[(3, "ssl_read_ex")],
        internal_return: "ssl_read_ex_return",
    },
];

/// Where distributions keep libssl, tried under `/proc/1/root` (the node's
/// filesystem, from a container with the host's PID namespace) and `/`.
const NODE_LIBSSL: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/lib64/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.1.1",
];

/// Processes remembered as inspected, at most.
const MAX_INSPECTED: usize = 65_536;

/// A library file the probes are attached to.
struct ProbedFile {
    /// (device, inode).
    key: (u64, u64),
    path: PathBuf,
    links: Vec<(&'static str, UProbeLinkId)>,
    /// Processes using it that connected to a watched port; the node's own
    /// library is kept without them.
    users: HashSet<u32>,
    node: bool,
}

/// The OpenSSL probes and the files they are attached to.
pub struct TlsProbes {
    files: Vec<ProbedFile>,
    inspected: HashSet<u32>,
}

impl TlsProbes {
    /// Loads the programs.
    pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut names: Vec<&str> = HANDSHAKE.iter().map(|(name, _)| *name).collect();
        for direction in &DIRECTIONS {
            let public = direction.public.iter().map(|(name, _)| *name);
            let internal = direction.internal_entries.iter().map(|(_, name)| *name);
            for name in public.chain(internal) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        for name in names {
            let probe: &mut UProbe = program(ebpf, name)?;
            probe
                .load()
                .with_context(|| format!("verifier rejected program {name}"))?;
        }
        Ok(Self {
            files: Vec::new(),
            inspected: HashSet::new(),
        })
    }

    /// Attaches the node's own libssl, if there is one.
    pub fn attach_node_library(&mut self, ebpf: &mut Ebpf) {
        let roots = [Path::new("/proc/1/root"), Path::new("/")];
        let found = roots.iter().find_map(|root| {
            NODE_LIBSSL
                .iter()
                .map(|path| root.join(path.trim_start_matches('/')))
                .find(|path| path.exists())
        });
        if let Some(path) = found {
            self.attach_file(ebpf, &path, None);
        }
    }

    /// A process connected to a watched port: probes its libssl, once per
    /// process and once per file.
    pub fn inspect(&mut self, ebpf: &mut Ebpf, pid: u32) {
        if pid == 0 || !self.inspected.insert(pid) {
            return;
        }
        if self.inspected.len() > MAX_INSPECTED {
            self.inspected.clear();
        }
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return; // gone already, or not ours to read (CAP_SYS_PTRACE)
        };
        let libraries: HashSet<&str> = maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .filter(|path| {
                Path::new(path)
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("libssl.so"))
            })
            .collect();
        for library in libraries {
            let path = PathBuf::from(format!("/proc/{pid}/root{library}"));
            self.attach_file(ebpf, &path, Some(pid));
        }
    }

    /// Detaches the libraries whose processes that talked to a watched
    /// port have all exited (the node's own stays); forgets exited
    /// processes. Called every `--interval`.
    pub fn upkeep(&mut self, ebpf: &mut Ebpf) {
        let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists();
        self.inspected.retain(alive);
        for file in &mut self.files {
            file.users.retain(alive);
        }
        let (gone, kept) = std::mem::take(&mut self.files)
            .into_iter()
            .partition(|file| !file.node && file.users.is_empty());
        self.files = kept;
        for file in gone {
            for (name, link) in file.links {
                if let Err(err) =
                    program::<UProbe>(ebpf, name).and_then(|probe| Ok(probe.detach(link)?))
                {
                    tracing::warn!(
                        "TLS: detaching {name} from {}: {err:#}",
                        file.path.display()
                    );
                }
            }
            tracing::info!(
                "TLS: no longer probing {} (its processes exited)",
                file.path.display()
            );
        }
    }

    fn attach_file(&mut self, ebpf: &mut Ebpf, path: &Path, user: Option<u32>) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let key = (meta.dev(), meta.ino());
        if let Some(file) = self.files.iter_mut().find(|file| file.key == key) {
            file.users.extend(user);
            return;
        }
        let mut links = Vec::new();
        let mut placed = Vec::new();
        let attached = attach_probes(ebpf, path, &mut links, &mut placed);
        // Whatever attached is kept (and detached with the file): a library
        // without the `_ex` calls (OpenSSL 1.1.0) still has the others.
        match attached {
            Ok(()) => tracing::info!("TLS: probing {} ({})", path.display(), placed.join("; ")),
            Err(err) => tracing::warn!("TLS: cannot probe all of {}: {err:#}", path.display()),
        }
        self.files.push(ProbedFile {
            key,
            path: path.to_path_buf(),
            links,
            users: user.into_iter().collect(),
            node: user.is_none(),
        });
    }
}

fn attach_probes(
    ebpf: &mut Ebpf,
    path: &Path,
    links: &mut Vec<(&'static str, UProbeLinkId)>,
    placed: &mut Vec<String>,
) -> anyhow::Result<()> {
    // Read once per file; a file that cannot be read is attached by
    // symbol (and fails there with a clearer error).
    let internal = std::fs::read(path)
        .map(|data| openssl::find(&data))
        .unwrap_or_default();
    // A probe that does not attach (OpenSSL 1.1.0 has no `_ex` calls)
    // does not keep the others from attaching.
    let mut failed = Vec::new();
    attach_symbols(ebpf, path, &HANDSHAKE, links, &mut failed)?;
    for (direction, internal) in DIRECTIONS.iter().zip([internal.write, internal.read]) {
        let Some(call) = internal else {
            placed.push(format!("{}s: the public calls", direction.name));
            attach_symbols(ebpf, path, &direction.public, links, &mut failed)?;
            continue;
        };
        // The `_ex` entry program that reads the count's pointer from the
        // right argument.
        let Some(&(_, entry)) = direction
            .internal_entries
            .iter()
            .find(|(count_arg, _)| *count_arg == call.count_arg)
        else {
            failed.push(format!(
                "no {} program takes the count from argument {}",
                direction.name, call.count_arg
            ));
            continue;
        };
        placed.push(format!(
            "{}s: OpenSSL's internal call at file offset {:#x}",
            direction.name, call.offset
        ));
        for name in [entry, direction.internal_return] {
            let probe: &mut UProbe = program(ebpf, name)?;
            match probe.attach(call.offset, path, UProbeScope::AllProcesses) {
                Ok(link) => links.push((name, link)),
                Err(err) => failed.push(format!(
                    "{name} at file offset {:#x}: {:#}",
                    call.offset,
                    anyhow::Error::from(err)
                )),
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "attaching {}", failed.join(", "));
    Ok(())
}

/// Attaches each (program, symbol) of `probes` to `path`; a probe that
/// does not attach is noted in `failed` and does not stop the others.
fn attach_symbols(
    ebpf: &mut Ebpf,
    path: &Path,
    probes: &[(&'static str, &'static str)],
    links: &mut Vec<(&'static str, UProbeLinkId)>,
    failed: &mut Vec<String>,
) -> anyhow::Result<()> {
    for &(name, symbol) in probes {
        let probe: &mut UProbe = program(ebpf, name)?;
        match probe.attach(symbol, path, UProbeScope::AllProcesses) {
            Ok(link) => links.push((name, link)),
            Err(err) => failed.push(format!(
                "{name} on {symbol}: {:#}",
                anyhow::Error::from(err)
            )),
        }
    }
    Ok(())
}
