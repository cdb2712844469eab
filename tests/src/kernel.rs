//! The kernel's own per-socket counters, as ground truth for the agent's,
//! and its lists of BPF objects, for what the agent leaves behind.

use std::{collections::BTreeSet, net::TcpStream, os::fd::AsRawFd, process::Command};

use anyhow::Context as _;
use serde_json::Value;

use crate::netns::Netns;

/// `tcpi_total_retrans` of one of this process's sockets (`TCP_INFO`).
pub fn total_retransmits(stream: &TcpStream) -> u32 {
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid socket and buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO");
    info.tcpi_total_retrans
}

/// Total retransmits of another process's established socket
/// `:server_port → :client_port`, from `ss -ti` (`retrans:<unacked>/<total>`,
/// absent when 0), in `netns` or this process's namespace.
pub fn ss_total_retransmits(
    netns: Option<&Netns>,
    server_port: u16,
    client_port: u16,
) -> anyhow::Result<u32> {
    let mut command = match netns {
        Some(netns) => netns.command("ss"),
        None => Command::new("ss"),
    };
    let output = command
        .args(["-tinH", "state", "established"])
        .arg(format!(
            "( sport = :{server_port} and dport = :{client_port} )"
        ))
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        !text.trim().is_empty(),
        "ss found no connection :{server_port} → :{client_port}"
    );
    Ok(text
        .split_whitespace()
        .find_map(|field| field.strip_prefix("retrans:"))
        .and_then(|r| r.split('/').nth(1))
        .and_then(|total| total.parse().ok())
        .unwrap_or(0))
}

/// The kernel's retransmit counts of both ends of one connection, read
/// while it is still open.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionRetransmits {
    pub client_port: u16,
    /// The client socket's `tcpi_total_retrans`.
    pub client: u32,
    /// The server socket's total from `ss -ti` (in `server_netns`).
    pub server: u32,
}

impl ConnectionRetransmits {
    /// Reads both ends of `stream`, a client socket of this process, whose
    /// server listens on `server_port` in `server_netns` (or here).
    pub fn read(
        stream: &TcpStream,
        server_netns: Option<&Netns>,
        server_port: u16,
    ) -> anyhow::Result<Self> {
        let client_port = stream.local_addr()?.port();
        Ok(Self {
            client_port,
            client: total_retransmits(stream),
            server: ss_total_retransmits(server_netns, server_port, client_port)?,
        })
    }

    /// [`ConnectionRetransmits::read`] for each of `streams`.
    pub fn read_all(
        streams: &[TcpStream],
        server_netns: Option<&Netns>,
        server_port: u16,
    ) -> anyhow::Result<Vec<Self>> {
        streams
            .iter()
            .map(|stream| Self::read(stream, server_netns, server_port))
            .collect()
    }
}

/// The kernel's fdinfo text of each descriptor `pid` holds (those closed
/// while being read are left out).
pub fn fdinfos(pid: u32) -> anyhow::Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut infos = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        if let Ok(info) = std::fs::read_to_string(entry?.path()) {
            infos.push(info);
        }
    }
    Ok(infos)
}

/// The files of the uprobe links whose fds `pid` holds, one entry per
/// link, from the kernel's fdinfo (`event_type: uprobe|uretprobe`, `name`).
pub fn uprobe_files_held_by(pid: u32) -> anyhow::Result<Vec<String>> {
    Ok(uprobes_held_by(pid)?
        .into_iter()
        .map(|probe| probe.file)
        .collect())
}

/// A uprobe or uretprobe link, from its fdinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uprobe {
    pub file: String,
    /// File offset of the probed instruction.
    pub offset: u64,
    pub ret: bool,
}

/// The uprobes and uretprobes whose links `pid` holds (6.6+ fdinfo).
pub fn uprobes_held_by(pid: u32) -> anyhow::Result<Vec<Uprobe>> {
    let mut probes = Vec::new();
    for info in fdinfos(pid)? {
        let field = |name: &str| fdinfo_field(&info, name);
        let ret = match field("event_type:") {
            Some("uprobe") => false,
            Some("uretprobe") => true,
            _ => continue,
        };
        if let Some(file) = field("name:") {
            let offset = field("offset:")
                .and_then(|o| u64::from_str_radix(o.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0);
            probes.push(Uprobe {
                file: file.to_string(),
                offset,
                ret,
            });
        }
    }
    Ok(probes)
}

/// The running kernel's `(major, minor)` (`/proc/sys/kernel/osrelease`).
pub fn release() -> anyhow::Result<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut number = || {
        parts
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("kernel release {release:?}"))
    };
    Ok((number()?, number()?))
}

/// The tracepoints whose perf links `pid` holds, by name (6.6+ fdinfo
/// `tp_name`).
pub fn tracepoints_held_by(pid: u32) -> anyhow::Result<Vec<String>> {
    Ok(fdinfos(pid)?
        .iter()
        .filter(|info| fdinfo_field(info, "event_type:") == Some("tracepoint"))
        .filter_map(|info| fdinfo_field(info, "tp_name:").map(String::from))
        .collect())
}

/// The value of an fdinfo line `name value`.
fn fdinfo_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
}

/// The ids of the BPF programs and maps whose fds `pid` holds (links hold
/// their program's id too), from the kernel's fdinfo.
pub fn bpf_ids_held_by(pid: u32) -> anyhow::Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let (programs, maps, _) = bpf_objects_held_by(pid)?;
    Ok((programs, maps))
}

/// The ids of the BPF programs, maps and links whose fds `pid` holds.
pub fn bpf_objects_held_by(
    pid: u32,
) -> anyhow::Result<(BTreeSet<u64>, BTreeSet<u64>, BTreeSet<u64>)> {
    let (mut programs, mut maps, mut links) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for info in fdinfos(pid)? {
        for line in info.lines() {
            let id = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|v| v.trim().parse().ok())
            };
            if let Some(id) = id("prog_id:") {
                programs.insert(id);
            }
            if let Some(id) = id("map_id:") {
                maps.insert(id);
            }
            if let Some(id) = id("link_id:") {
                links.insert(id);
            }
        }
    }
    Ok((programs, maps, links))
}

/// Ids in the kernel's list of `kind` (`prog`, `map` or `link`), from bpftool.
pub fn bpftool_ids(kind: &str) -> anyhow::Result<BTreeSet<u64>> {
    Ok(bpftool_list(kind)?
        .iter()
        .filter_map(|entry| entry["id"].as_u64())
        .collect())
}

/// The kernel's list of `kind` objects, as bpftool prints it in JSON.
pub fn bpftool_list(kind: &str) -> anyhow::Result<Vec<Value>> {
    let output = Command::new("bpftool")
        .args(["-j", kind, "list"])
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    anyhow::ensure!(output.status.success(), "bpftool {kind} list: {output:?}");
    serde_json::from_slice(&output.stdout).with_context(|| format!("parsing bpftool {kind} list"))
}
