//! The RESP tracer's programs: `cgroup_skb` egress/ingress on the cgroup2
//! root and the application-read tracepoint.

use std::{fs::File, path::Path};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
};

use super::{TracepointProgram, attach_tracepoint, program};

/// Application reads (`tcp_recvmsg`), for read delays; attached when the
/// tracepoint carries `sock_cookie`.
const APP_READ: TracepointProgram = TracepointProgram {
    program: "resp_app_read",
    category: "tcp",
    name: "tcp_rcv_space_adjust",
    since: (4, 16),
    required: false,
};

/// What to attach to the packet path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketHook {
    /// The RESP tracer.
    Resp,
    /// Only the bare hook (port filter + one counter), for `cargo xtask bench`.
    Bare,
    /// The bare hook plus an exact count of RESP requests and replies in the
    /// kernel (`agent-ebpf/src/floor.rs`), for `cargo xtask bench`.
    CountingFloor,
}

/// Loads and attaches the packet programs to the cgroup2 root; returns
/// what was attached, for the `started` line.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup_root: &Path,
    hook: PacketHook,
    app_read_tracepoint: bool,
) -> anyhow::Result<Vec<String>> {
    let cgroup = File::open(cgroup_root)
        .with_context(|| format!("opening the cgroup2 root {}", cgroup_root.display()))?;
    let (egress, ingress) = match hook {
        PacketHook::Resp => ("resp_egress", "resp_ingress"),
        PacketHook::Bare => ("bare_egress", "bare_ingress"),
        PacketHook::CountingFloor => ("floor_egress", "floor_ingress"),
    };
    let mut attached = Vec::new();
    for (name, attach_type) in [
        (egress, CgroupSkbAttachType::Egress),
        (ingress, CgroupSkbAttachType::Ingress),
    ] {
        let program: &mut CgroupSkb = program(ebpf, name)?;
        program
            .load()
            .with_context(|| format!("verifier rejected program {name}"))?;
        program
            .attach(&cgroup, attach_type, CgroupAttachMode::Single)
            .with_context(|| {
                format!(
                    "attaching {name} to {} (another program may hold the root cgroup's \
                     hook exclusively)",
                    cgroup_root.display()
                )
            })?;
        attached.push(format!("cgroup_skb/{name}"));
    }
    if hook == PacketHook::Resp && app_read_tracepoint {
        attach_tracepoint(ebpf, &APP_READ)?;
        attached.push(format!("{}/{}", APP_READ.category, APP_READ.name));
    }
    Ok(attached)
}
