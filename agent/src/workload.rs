//! Workload attribution without Kubernetes: a cgroup path → the pod UID and
//! container ID when it follows a kubelet layout, otherwise the process name
//! and cgroup path. Pod names and namespaces come later from the API (the
//! `names` seam).

use std::sync::Arc;

/// Who made a connection or a request, as far as the node can tell. One
/// shared allocation: every request's observation carries a clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload(Arc<Identity>);

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Stable, human-readable identity used to group series and alerts:
    /// `pod:<uid>` when the cgroup names a pod, else `cgroup:<path>`, else
    /// `comm:<name>`, else `unknown`.
    pub key: Arc<str>,
    pub pod_uid: Option<Arc<str>>,
    pub container_id: Option<Arc<str>>,
    pub cgroup: Option<Arc<str>>,
    pub comm: Option<Arc<str>>,
}

impl Workload {
    pub fn unknown() -> Self {
        Self::new(None, None)
    }

    /// Attribution from what is known of a socket's owner.
    pub fn new(cgroup: Option<&str>, comm: Option<&str>) -> Self {
        let pod = cgroup.and_then(kubelet_pod);
        let key: Arc<str> = match (&pod, cgroup, comm) {
            (Some(pod), _, _) => format!("pod:{}", pod.uid).into(),
            (None, Some(path), _) => format!("cgroup:{path}").into(),
            (None, None, Some(comm)) if !comm.is_empty() => format!("comm:{comm}").into(),
            _ => "unknown".into(),
        };
        Self(Arc::new(Identity {
            key,
            pod_uid: pod.as_ref().map(|p| Arc::from(p.uid.as_str())),
            container_id: pod.and_then(|p| p.container_id).map(Arc::from),
            cgroup: cgroup.map(Arc::from),
            comm: comm.filter(|c| !c.is_empty()).map(Arc::from),
        }))
    }
}

#[cfg(test)]
impl Workload {
    pub fn with_pod_uid(mut self, uid: &str) -> Self {
        Arc::make_mut(&mut self.0).pod_uid = Some(uid.into());
        self
    }
}

impl std::ops::Deref for Workload {
    type Target = Identity;

    fn deref(&self) -> &Identity {
        &self.0
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct KubeletPod {
    /// With dashes, as the API writes it.
    pub uid: String,
    pub container_id: Option<String>,
}

/// Pod UID and container ID from a kubelet cgroup path, for both cgroup
/// drivers:
/// - systemd: `…/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
///   (the UID's dashes written as `_`; runtimes `cri-containerd-`, `crio-`, `docker-`)
/// - cgroupfs: `…/kubepods/burstable/pod<uid>/<id>` (guaranteed pods sit
///   directly under `kubepods`).
pub fn kubelet_pod(path: &str) -> Option<KubeletPod> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let kubepods = parts
        .iter()
        .position(|p| *p == "kubepods" || *p == "kubepods.slice")?;
    let rest = &parts[kubepods + 1..];
    let (index, uid) = rest.iter().enumerate().find_map(|(i, part)| {
        let uid = if let Some(slice) = part.strip_suffix(".slice") {
            slice
                .rsplit_once("-pod")
                .map(|(_, uid)| uid.replace('_', "-"))
        } else {
            part.strip_prefix("pod").map(str::to_string)
        }?;
        is_uid(&uid).then_some((i, uid))
    })?;
    let container_id = rest.get(index + 1).and_then(|part| {
        let id = match part.strip_suffix(".scope") {
            Some(scope) => scope.rsplit_once('-').map_or(scope, |(_, id)| id),
            None => part,
        };
        is_container_id(id).then(|| id.to_string())
    });
    Some(KubeletPod { uid, container_id })
}

fn is_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn is_container_id(id: &str) -> bool {
    id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
    const ID: &str = "4f2a9b1c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a";

    #[test]
    fn systemd_driver_paths_name_pod_and_container() {
        for runtime in ["cri-containerd", "crio", "docker"] {
            let path = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/{runtime}-{ID}.scope",
                UID.replace('-', "_")
            );
            let pod = kubelet_pod(&path).unwrap();
            assert_eq!(pod.uid, UID);
            assert_eq!(pod.container_id.as_deref(), Some(ID), "{runtime}");
        }
        let guaranteed = format!(
            "/kubepods.slice/kubepods-pod{}.slice",
            UID.replace('-', "_")
        );
        assert_eq!(kubelet_pod(&guaranteed).unwrap().container_id, None);
    }

    #[test]
    fn cgroupfs_driver_paths_name_pod_and_container() {
        let path = format!("/kubepods/burstable/pod{UID}/{ID}");
        let pod = kubelet_pod(&path).unwrap();
        assert_eq!(
            (pod.uid.as_str(), pod.container_id.as_deref()),
            (UID, Some(ID))
        );
        let guaranteed = format!("/kubepods/pod{UID}/{ID}");
        assert_eq!(kubelet_pod(&guaranteed).unwrap().uid, UID);
    }

    #[test]
    fn other_paths_are_not_pods() {
        for path in [
            "/",
            "/system.slice/redis-server.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/podnot-a-uid/abc",
            "/other/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789",
        ] {
            assert_eq!(kubelet_pod(path), None, "{path}");
        }
    }

    #[test]
    fn workload_key_prefers_pod_then_cgroup_then_comm() {
        let path = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(
            &*Workload::new(Some(&path), Some("java")).key,
            format!("pod:{UID}")
        );
        assert_eq!(
            &*Workload::new(Some("/system.slice/x.service"), Some("java")).key,
            "cgroup:/system.slice/x.service"
        );
        assert_eq!(&*Workload::new(None, Some("java")).key, "comm:java");
        assert_eq!(&*Workload::unknown().key, "unknown");
    }
}
