//! Userspace half of `agent-ebpf/src/connect.rs`: which tracepoints it uses
//! and where their fields sit on this kernel.

use std::path::Path;

use agent_common::{CONFIG_HAS_ERROR_REPORT, TracepointOffsets};
use anyhow::Context as _;

use super::TracepointProgram;
use crate::{
    btf::{self, Btf},
    preflight::VMLINUX_BTF,
    tracefs::{TracefsError, TracepointFormat},
};

pub const PROGRAMS: &[TracepointProgram] = &[
    TracepointProgram {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        since: (4, 16),
        required: true,
    },
    TracepointProgram {
        program: "tcp_retransmit_skb",
        category: "tcp",
        name: "tcp_retransmit_skb",
        since: (4, 15),
        required: true,
    },
    TracepointProgram {
        program: "tcp_receive_reset",
        category: "tcp",
        name: "tcp_receive_reset",
        since: (4, 15),
        required: true,
    },
    TracepointProgram {
        program: "tcp_destroy_sock",
        category: "tcp",
        name: "tcp_destroy_sock",
        since: (4, 15),
        required: true,
    },
    TracepointProgram {
        program: "tcp_send_reset",
        category: "tcp",
        name: "tcp_send_reset",
        since: (4, 15),
        required: true,
    },
    TracepointProgram {
        program: "tcp_retransmit_synack",
        category: "tcp",
        name: "tcp_retransmit_synack",
        since: (4, 15),
        required: true,
    },
    TracepointProgram {
        program: "inet_sk_error_report",
        category: "sock",
        name: "inet_sk_error_report",
        since: (5, 14),
        required: false,
    },
];

/// Field offsets and feature flags for this kernel.
pub struct Layout {
    pub offsets: TracepointOffsets,
    pub flags: u32,
    /// Programs whose tracepoint exists here.
    pub available: Vec<&'static str>,
}

pub fn resolve(tracefs: &Path) -> anyhow::Result<Layout> {
    let read = |category: &str, name: &str| TracepointFormat::read(tracefs, category, name);
    let mut offsets = TracepointOffsets::default();
    let mut available = Vec::new();

    let set_state = read("sock", "inet_sock_set_state")
        .context("resptrace needs sock/inet_sock_set_state (Linux 4.16+)")?;
    offsets.set_state_skaddr = set_state.offset("skaddr", 8)?;
    offsets.set_state_oldstate = set_state.offset("oldstate", 4)?;
    offsets.set_state_newstate = set_state.offset("newstate", 4)?;
    offsets.set_state_sport = set_state.offset("sport", 2)?;
    offsets.set_state_dport = set_state.offset("dport", 2)?;
    offsets.set_state_family = set_state.offset("family", 2)?;
    offsets.set_state_protocol = set_state.offset("protocol", 2)?;
    offsets.set_state_saddr_v6 = set_state.offset("saddr_v6", 16)?;
    offsets.set_state_daddr_v6 = set_state.offset("daddr_v6", 16)?;
    available.push("inet_sock_set_state");

    let retransmit = read("tcp", "tcp_retransmit_skb")?;
    offsets.retransmit_skaddr = retransmit.offset("skaddr", 8)?;
    offsets.retransmit_state = retransmit.offset("state", 4)?;
    offsets.retransmit_sport = retransmit.offset("sport", 2)?;
    offsets.retransmit_dport = retransmit.offset("dport", 2)?;
    offsets.retransmit_saddr_v6 = retransmit.offset("saddr_v6", 16)?;
    offsets.retransmit_daddr_v6 = retransmit.offset("daddr_v6", 16)?;
    offsets.retransmit_skbaddr = retransmit.offset("skbaddr", 8)?;
    offsets.retransmit_err = retransmit.offset("err", 4).unwrap_or(0);
    available.push("tcp_retransmit_skb");
    // The kernel's own count of a socket's retransmits, and the segments per
    // retransmitted skb where that count cannot be read (a seeded
    // connection's first retransmit).
    let btf = Btf::from_file(Path::new(VMLINUX_BTF)).map_err(anyhow::Error::from);
    let find = |finder: fn(&Btf) -> Result<u16, btf::BtfError>, without: &str| {
        let found = match &btf {
            Ok(btf) => finder(btf).map_err(anyhow::Error::from),
            Err(error) => Err(anyhow::anyhow!("{error:#}")),
        };
        found.unwrap_or_else(|error| {
            tracing::warn!("{error:#}: {without}");
            0
        })
    };
    offsets.tcp_sock_total_retrans = find(
        btf::tcp_sock_total_retrans,
        "data retransmits are counted per tracepoint run",
    );
    offsets.skb_tcp_gso_segs = find(
        btf::skb_tcp_gso_segs,
        "data retransmits are counted per packet sent, not per segment",
    );

    let reset = read("tcp", "tcp_receive_reset")?;
    offsets.receive_reset_skaddr = reset.offset("skaddr", 8)?;
    offsets.receive_reset_sport = reset.offset("sport", 2)?;
    offsets.receive_reset_dport = reset.offset("dport", 2)?;
    offsets.receive_reset_saddr_v6 = reset.offset("saddr_v6", 16)?;
    offsets.receive_reset_daddr_v6 = reset.offset("daddr_v6", 16)?;
    available.push("tcp_receive_reset");

    let destroy = read("tcp", "tcp_destroy_sock")?;
    offsets.destroy_skaddr = destroy.offset("skaddr", 8)?;
    offsets.destroy_sport = destroy.offset("sport", 2)?;
    offsets.destroy_dport = destroy.offset("dport", 2)?;
    offsets.destroy_saddr_v6 = destroy.offset("saddr_v6", 16)?;
    offsets.destroy_daddr_v6 = destroy.offset("daddr_v6", 16)?;
    offsets.destroy_cookie = destroy.offset("sock_cookie", 8).unwrap_or(0);
    available.push("tcp_destroy_sock");

    // Application reads, for the RESP tracer's read delays; optional.
    offsets.rcv_space_cookie = read("tcp", "tcp_rcv_space_adjust")
        .ok()
        .and_then(|format| format.offset("sock_cookie", 8).ok())
        .unwrap_or(0);

    offsets.send_reset_skaddr = read("tcp", "tcp_send_reset")?.offset("skaddr", 8)?;
    available.push("tcp_send_reset");

    let synack = read("tcp", "tcp_retransmit_synack")?;
    offsets.synack_sport = synack.offset("sport", 2)?;
    offsets.synack_dport = synack.offset("dport", 2)?;
    offsets.synack_saddr_v6 = synack.offset("saddr_v6", 16)?;
    offsets.synack_daddr_v6 = synack.offset("daddr_v6", 16)?;
    available.push("tcp_retransmit_synack");

    let mut flags = 0;
    match read("sock", "inet_sk_error_report") {
        Ok(report) => {
            offsets.error_report_error = report.offset("error", 4)?;
            offsets.error_report_sport = report.offset("sport", 2)?;
            offsets.error_report_dport = report.offset("dport", 2)?;
            offsets.error_report_protocol = report.offset("protocol", 2)?;
            offsets.error_report_saddr_v6 = report.offset("saddr_v6", 16)?;
            offsets.error_report_daddr_v6 = report.offset("daddr_v6", 16)?;
            flags |= CONFIG_HAS_ERROR_REPORT;
            available.push("inet_sk_error_report");
        }
        Err(TracefsError::MissingTracepoint { .. }) => {}
        Err(other) => return Err(other.into()),
    }
    Ok(Layout {
        offsets,
        flags,
        available,
    })
}
