//! Checks before loading anything, each failing with one clear message:
//! privileges, kernel version, BTF, tracefs.

use std::{fs, path::Path, path::PathBuf};

use crate::tracefs::TRACEFS_ROOTS;

/// Ring buffers (`BPF_MAP_TYPE_RINGBUF`) arrived in 5.8; EKS runs 5.10+.
pub const MIN_KERNEL: (u32, u32) = (5, 8);
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the kernel asks of the agent: CAP_BPF for maps, BTF and programs
/// and CAP_PERFMON for loading tracepoint programs (both also granted by
/// CAP_SYS_ADMIN); CAP_NET_ADMIN for attaching the `cgroup_skb` programs to
/// the cgroup2 root (they load without it; on 5.10 CAP_SYS_ADMIN does not
/// stand in for it). `deploy/` grants exactly these; `tests/caps.rs` proves
/// each necessary: without it the kernel says EPERM.
pub const NEEDED_CAPABILITIES: [(&str, u32); 3] = [
    ("CAP_BPF", CAP_BPF),
    ("CAP_PERFMON", CAP_PERFMON),
    ("CAP_NET_ADMIN", CAP_NET_ADMIN),
];
const NEEDED: &str = "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), and CAP_NET_ADMIN";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing privileges: resptrace needs {NEEDED}; run it as root or grant \
         those capabilities"
    )]
    Privileges,
    #[error("kernel {release} is too old: resptrace needs Linux {}.{} or newer", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { release: String },
    #[error("cannot tell the kernel version from `{release}`")]
    KernelVersion { release: String },
    #[error(
        "kernel BTF not found at {VMLINUX_BTF}: resptrace needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (every EKS AMI has it)"
    )]
    MissingBtf,
    #[error(
        "tracefs is not mounted at {} and mounting it failed; mount it with \
         `mount -t tracefs tracefs /sys/kernel/tracing`",
        TRACEFS_ROOTS[0]
    )]
    Tracefs(#[source] std::io::Error),
    #[error("cannot read {what}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the checks found out about the kernel and this process.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    pub release: String,
    pub tracefs: PathBuf,
    /// Needed capabilities this process lacks: loading will likely fail,
    /// but the kernel decides (see [`KernelInfo::explain`]).
    pub missing_capabilities: Vec<&'static str>,
    /// `kernel.perf_event_paranoid` when above 2 and this process lacks
    /// CAP_SYS_ADMIN: Debian's and Ubuntu's kernels
    /// (`CONFIG_SECURITY_PERF_EVENTS_RESTRICT`, level 3 by default) then
    /// refuse `perf_event_open` — tracepoint attachment — to anyone without
    /// CAP_SYS_ADMIN, CAP_PERFMON or not; mainline treats 3 as 2.
    pub perf_paranoid_restricts: Option<i32>,
    /// `RLIMIT_MEMLOCK` in bytes when it could not be raised on a kernel
    /// before 5.11, which charges BPF maps to it.
    pub memlock_limit: Option<u64>,
}

impl KernelInfo {
    /// A loading failure, with the capabilities this process lacks named
    /// in front of the kernel's own refusal, and a refused perf event
    /// explained when the paranoid level is why.
    pub fn explain(&self, mut err: anyhow::Error) -> anyhow::Error {
        if let Some(level) = self.perf_paranoid_restricts
            && refused_with(&err, libc::EACCES)
        {
            err = err.context(format!(
                "kernel.perf_event_paranoid is {level}: this kernel lets only CAP_SYS_ADMIN \
                 open perf events (CAP_PERFMON is not enough at level 3, a Debian/Ubuntu \
                 patch); set it to 2 on the node (`sysctl kernel.perf_event_paranoid=2`) \
                 or grant CAP_SYS_ADMIN"
            ));
        }
        if let Some(limit) = self.memlock_limit
            && refused_with(&err, libc::EPERM)
        {
            err = err.context(format!(
                "RLIMIT_MEMLOCK is {} KiB and could not be raised: Linux before 5.11 \
                 charges BPF maps to it (grant CAP_SYS_RESOURCE, or raise the limit)",
                limit / 1024
            ));
        }
        if !self.missing_capabilities.is_empty() {
            err = err.context(format!(
                "missing {} (resptrace needs {NEEDED})",
                self.missing_capabilities.join(", ")
            ));
        }
        err
    }
}

pub fn check() -> Result<KernelInfo, PreflightError> {
    let (effective, missing_capabilities) = check_privileges()?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|source| PreflightError::Read {
            what: "/proc/sys/kernel/osrelease",
            source,
        })?
        .trim()
        .to_owned();
    let version = parse_kernel_version(&release)?;
    if version < MIN_KERNEL {
        return Err(PreflightError::KernelTooOld { release });
    }
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(PreflightError::MissingBtf);
    }
    let tracefs = ensure_tracefs()?;
    let memlock_limit = raise_memlock_limit(version);
    let perf_paranoid_restricts = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|&level| level > 2 && effective & (1u64 << CAP_SYS_ADMIN) == 0);
    Ok(KernelInfo {
        release,
        tracefs,
        missing_capabilities,
        perf_paranoid_restricts,
        memlock_limit,
    })
}

/// Whether the kernel's refusal somewhere in `err` was `errno`.
fn refused_with(err: &anyhow::Error, errno: i32) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.raw_os_error() == Some(errno))
    })
}

/// Fails at once without any of the capabilities (an ordinary user); with
/// some, returns the effective set and the missing ones, and lets the
/// kernel say no.
fn check_privileges() -> Result<(u64, Vec<&'static str>), PreflightError> {
    let status =
        fs::read_to_string("/proc/self/status").map_err(|source| PreflightError::Read {
            what: "/proc/self/status",
            source,
        })?;
    let effective = parse_effective_caps(&status).unwrap_or(0);
    let missing = missing_capabilities(effective);
    if missing.len() == NEEDED_CAPABILITIES.len() {
        return Err(PreflightError::Privileges);
    }
    Ok((effective, missing))
}

fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    NEEDED_CAPABILITIES
        .iter()
        .filter(|&&(_, cap)| !has(cap) && (cap == CAP_NET_ADMIN || !has(CAP_SYS_ADMIN)))
        .map(|(name, _)| *name)
        .collect()
}

fn parse_effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// `5.10.223-212.873.amzn2.x86_64` → (5, 10).
pub fn parse_kernel_version(release: &str) -> Result<(u32, u32), PreflightError> {
    let bad = || PreflightError::KernelVersion {
        release: release.into(),
    };
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    Ok((major, minor))
}

/// Returns the tracefs root, mounting tracefs at its usual place if no
/// mount is found (minimal hosts and some containers have none).
fn ensure_tracefs() -> Result<PathBuf, PreflightError> {
    if let Some(root) = TRACEFS_ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|root| root.join("events").is_dir())
    {
        return Ok(root);
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PreflightError::Tracefs(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted tracefs at {}", TRACEFS_ROOTS[0]);
    Ok(PathBuf::from(TRACEFS_ROOTS[0]))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the
/// memory cgroup, where raising the limit is unnecessary (and may be refused
/// without CAP_SYS_RESOURCE).
/// Returns the limit left in place, in bytes, when it could not be raised on
/// a kernel that charges BPF maps to it.
fn raise_memlock_limit(version: (u32, u32)) -> Option<u64> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc == 0 || version >= (5, 11) {
        return None;
    }
    tracing::warn!(
        "cannot raise RLIMIT_MEMLOCK ({}): loading may fail on this kernel; \
         grant CAP_SYS_RESOURCE or raise the limit",
        std::io::Error::last_os_error()
    );
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } == 0)
        .then_some(current.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_of_eks_amis() {
        assert_eq!(
            parse_kernel_version("5.10.223-212.873.amzn2.x86_64").unwrap(),
            (5, 10)
        );
        assert_eq!(
            parse_kernel_version("6.1.115-126.197.amzn2023.x86_64").unwrap(),
            (6, 1)
        );
        assert_eq!(parse_kernel_version("6.18.0").unwrap(), (6, 18));
        assert!(parse_kernel_version("linux").is_err());
    }

    #[test]
    fn effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000000000\n";
        let caps = parse_effective_caps(status).unwrap();
        assert_ne!(caps & (1 << CAP_BPF), 0);
        assert_ne!(caps & (1 << CAP_PERFMON), 0);
        assert_eq!(caps & (1 << CAP_SYS_ADMIN), 0);
        assert_eq!(missing_capabilities(caps), ["CAP_NET_ADMIN"]);
        assert!(missing_capabilities(caps | 1 << CAP_NET_ADMIN).is_empty());
        assert_eq!(missing_capabilities(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
        assert!(missing_capabilities(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN).is_empty());
        assert_eq!(missing_capabilities(0).len(), 3);
    }

    #[test]
    fn a_refused_perf_event_is_explained_by_the_paranoid_level() {
        let info = KernelInfo {
            release: "6.1.0".into(),
            tracefs: TRACEFS_ROOTS[0].into(),
            missing_capabilities: Vec::new(),
            perf_paranoid_restricts: Some(3),
            memlock_limit: None,
        };
        let refused = |errno| {
            anyhow::Error::new(std::io::Error::from_raw_os_error(errno))
                .context("attaching to tracepoint sock/inet_sock_set_state")
        };
        let message = format!("{:#}", info.explain(refused(libc::EACCES)));
        assert!(
            message.starts_with("kernel.perf_event_paranoid is 3: "),
            "{message}"
        );
        let message = format!("{:#}", info.explain(refused(libc::EPERM)));
        assert!(message.starts_with("attaching"), "{message}");
    }
}
