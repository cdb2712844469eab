//! What `/proc` tells about processes and sockets: cgroups of a process
//! (attribution on cgroup-v1 nodes), and the TCP connections already open
//! when the agent starts (seeding the kernel's connection map).

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// This host's name (the agent's UTS namespace: with `hostNetwork` or
/// `hostPID` pods, the node's), for the `node` of events.
pub fn hostname() -> anyhow::Result<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| anyhow::anyhow!("reading /proc/sys/kernel/hostname: {e}"))?;
    Ok(name.trim_end().to_owned())
}

/// The cgroup2 mount point (`/sys/fs/cgroup` on v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    })
}

/// `dir` if it is the root of a cgroup2 mount (`--cgroup-root`).
pub fn check_cgroup2(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| anyhow::anyhow!("{} contains a NUL byte", dir.display()))?;
    // SAFETY: `statfs` is plain old data; all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        anyhow::bail!("{}: {}", dir.display(), std::io::Error::last_os_error());
    }
    anyhow::ensure!(
        stat.f_type == libc::CGROUP2_SUPER_MAGIC,
        "{} is not a cgroup2 mount (mount the host's /sys/fs/cgroup there)",
        dir.display()
    );
    Ok(dir.to_owned())
}

/// The cgroup2 root the packet programs attach to: the mounted one, or on
/// a cgroup-v1-only node a cgroup2 hierarchy mounted for the agent (every
/// socket belongs to its root there).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    if let Some(mount) = cgroup2_mount() {
        return Ok(mount);
    }
    let target = PathBuf::from("/run/resptrace/cgroup2");
    fs::create_dir_all(&target)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", target.display()))?;
    // A syscall, not mount(8): container images carry no `mount`.
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/run/resptrace/cgroup2".as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    anyhow::ensure!(
        rc == 0,
        "no cgroup2 hierarchy is mounted and mounting one at {} failed \
         (in a container this needs CAP_SYS_ADMIN): {}",
        target.display(),
        std::io::Error::last_os_error()
    );
    Ok(target)
}

/// A process's cgroup as the kubelet laid it out: the v2 path when the
/// process is in a non-root v2 cgroup, else the path of its v1 hierarchy
/// (Amazon Linux 2 nodes are cgroup v1 only: BPF sees every process in the
/// v2 root there).
pub fn process_cgroup(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_process_cgroup(&text)
}

pub fn parse_process_cgroup(text: &str) -> Option<String> {
    let mut v1 = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // `/../…`: outside the reader's cgroup namespace (an agent in a
        // container), relative to its root: names no directory of the host.
        if path.starts_with("/..") {
            continue;
        }
        if id == "0" && controllers.is_empty() {
            if path != "/" {
                return Some(path.to_owned());
            }
        } else if v1.is_none() || controllers.split(',').any(|c| c == "memory" || c == "pids") {
            // Prefer a hierarchy every kubelet uses; any one will do otherwise.
            if path != "/" {
                v1 = Some(path.to_owned());
            }
        }
    }
    v1
}

/// The cgroup v2 id of a process: the inode of its cgroup directory, as
/// `bpf_get_current_cgroup_id()` reports it.
pub fn process_cgroup_id(pid: u32, cgroup2: &Path) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .filter(|path| !path.starts_with("/.."))?;
    let dir = cgroup2.join(path.trim_start_matches('/'));
    fs::metadata(dir).ok().map(|m| m.ino())
}

pub fn process_comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// An ESTABLISHED TCP socket from `/proc/<pid>/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u64,
    pub ipv6: bool,
}

/// Parses `/proc/net/tcp` or `/proc/net/tcp6`, keeping ESTABLISHED sockets.
pub fn parse_proc_net_tcp(text: &str, ipv6: bool) -> Vec<OpenSocket> {
    const ESTABLISHED: &str = "01";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != ESTABLISHED {
                return None;
            }
            Some(OpenSocket {
                local: parse_hex_socket_addr(fields[1], ipv6)?,
                remote: parse_hex_socket_addr(fields[2], ipv6)?,
                inode: fields[9].parse().ok()?,
                ipv6,
            })
        })
        .collect()
}

/// `0100007F:18EB` (IPv4) or 32 hex digits (IPv6): 32-bit words in host
/// byte order, then the port in hex.
fn parse_hex_socket_addr(text: &str, ipv6: bool) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for chunk in addr.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match (ipv6, bytes.len()) {
        (false, 4) => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        (true, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// ESTABLISHED sockets of every network namespace on the node (each pod
/// has its own), with the pid owning each, when one is found.
pub fn established_sockets() -> Vec<(OpenSocket, Option<u32>)> {
    let pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();

    let mut seen_netns = HashSet::new();
    let mut sockets = Vec::new();
    for &pid in &pids {
        let Ok(netns) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !seen_netns.insert(netns.ino()) {
            continue;
        }
        for (file, ipv6) in [("tcp", false), ("tcp6", true)] {
            if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
                sockets.extend(parse_proc_net_tcp(&text, ipv6));
            }
        }
    }

    let wanted: HashSet<u64> = sockets.iter().map(|s| s.inode).collect();
    let mut owners: HashMap<u64, u32> = HashMap::new();
    for &pid in &pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if wanted.contains(&inode) {
                owners.entry(inode).or_insert(pid);
            }
        }
    }
    sockets
        .into_iter()
        .map(|socket| {
            let owner = owners.get(&socket.inode).copied();
            (socket, owner)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_ipv4_and_ipv6_sockets() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   100        0 16977 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 24107 1 0000000000000000 20 4 30 10 -1
";
        let sockets = parse_proc_net_tcp(v4, false);
        assert_eq!(sockets.len(), 1, "LISTEN is skipped");
        assert_eq!(sockets[0].local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(sockets[0].remote, "127.0.0.1:6379".parse().unwrap());
        assert_eq!(sockets[0].inode, 24107);

        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:18EB 00000000000000000000000001000000:A0C2 01 00000000:00000000 00:00000000 00000000   100        0 30001 1 0000000000000000 20 4 0 10 -1
   1: 0000000000000000FFFF00000100007F:18EB 0000000000000000FFFF00000100007F:A0C3 01 00000000:00000000 00:00000000 00000000   100        0 30002 1 0000000000000000 20 4 0 10 -1
";
        let sockets = parse_proc_net_tcp(v6, true);
        assert_eq!(sockets[0].local, "[::1]:6379".parse().unwrap());
        assert_eq!(sockets[0].remote, "[::1]:41154".parse().unwrap());
        assert_eq!(sockets[1].local, "[::ffff:127.0.0.1]:6379".parse().unwrap());
    }

    #[test]
    fn cgroup_v2_path_wins_v1_is_the_fallback() {
        let v2 = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-abc.scope\n";
        assert_eq!(
            parse_process_cgroup(v2).unwrap(),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-abc.scope"
        );
        // Amazon Linux 2: v1 hierarchies carry the pod, the v2 root does not.
        let v1 = "12:pids:/kubepods/burstable/pod1234/abc\n4:cpu,cpuacct:/kubepods/burstable/pod1234/abc\n1:name=systemd:/kubepods/burstable/pod1234/abc\n0::/\n";
        assert_eq!(
            parse_process_cgroup(v1).unwrap(),
            "/kubepods/burstable/pod1234/abc"
        );
        assert_eq!(parse_process_cgroup("0::/\n"), None);
        // Seen from a container's cgroup namespace: unusable as a path.
        let outside = "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice\n";
        assert_eq!(parse_process_cgroup(outside), None);
        assert_eq!(parse_process_cgroup("4:memory:/../../x\n0::/../y\n"), None);
    }
}
