//! The kernel's own per-socket counters, as ground truth for the agent's.

use std::{net::TcpStream, os::fd::AsRawFd, process::Command};

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
}
