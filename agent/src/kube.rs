//! Kubernetes metadata: the names behind the pod UIDs and IPs the kernel
//! sees. Watches this node's pods and the node itself (and, when asked,
//! Redis pods cluster-wide and Services) on its own thread, and keeps a
//! bounded snapshot the pipeline reads ([`Names`]). The API being away
//! never stops tracing: events keep their pod UIDs, the watches retry with
//! backoff, and names come back with the API.
//!
//! kube-runtime's `watcher` does the protocol: list, then watch from the
//! list's resourceVersion, resume from the last one seen (bookmarks
//! included) when a stream ends, relist on `410 Gone`.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use ::kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod, Service};

/// Pods kept per watch (this node's; Redis pods cluster-wide). A node runs
/// at most a few hundred; the cap bounds a too-wide `--redis-pod-selector`.
pub const MAX_PODS: usize = 20_000;
/// Services with a ClusterIP kept at most.
pub const MAX_SERVICES: usize = 20_000;
/// Longest `--pod-labels` value copied (the API allows 63 bytes; this only
/// guards the snapshot's size against a server that does not).
const MAX_LABEL_VALUE_BYTES: usize = 256;
/// The node's zone label, and the one it replaced (still set on old clusters).
const ZONE_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];
/// Set by the Deployment controller on its ReplicaSets' pods; the RS name
/// is `<deployment>-<hash>`.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: ::kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (not in a pod, no kubeconfig): set --kubeconfig")]
    Infer(#[source] ::kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[source] ::kube::Error),
    #[error("starting the Kubernetes metadata thread")]
    Thread(#[source] std::io::Error),
}

/// What to watch (`--kubernetes`, `--kubeconfig`, `--pod-labels`,
/// `--redis-pod-selector`, `--watch-services`).
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// Else in-cluster (the service account), or the usual kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// `spec.nodeName` of the pods to watch, and the Node to read the zone from.
    pub node: String,
    /// Pod labels copied into events (`app`, `team`).
    pub pod_labels: Vec<String>,
    /// A label selector for Redis pods anywhere in the cluster.
    pub redis_pod_selector: Option<String>,
    pub watch_services: bool,
}

/// A pod, as events name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The owning workload, `deployment/api`, `statefulset/redis`; absent
    /// for a bare pod.
    pub workload: Option<Arc<str>>,
    /// The `--pod-labels` the pod has.
    pub labels: BTreeMap<Arc<str>, Arc<str>>,
}

/// What an IP address is in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Pod(Arc<PodMeta>),
    /// A Service's ClusterIP (the backend behind it is not guessed).
    Service {
        namespace: Arc<str>,
        name: Arc<str>,
    },
}

/// Whether names are being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KubeState {
    /// Not enabled.
    Off,
    /// Started; no watch has listed yet.
    Connecting,
    /// Every watch listed and its last request succeeded.
    Connected,
    /// A watch's last request failed: retrying with backoff.
    Unavailable,
}

/// The `kubernetes` object of `stats` events.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KubeStats {
    pub state: KubeState,
    /// Pods known on this node.
    pub pods: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_pods: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_zone: Option<String>,
    /// The last failure, kept after recovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Pods and ClusterIPs not kept because a store was at its cap
    /// (`MAX_PODS`, `MAX_SERVICES`), since the stores were last listed.
    pub not_kept: u64,
}

/// The shared snapshot: written by the watches, read by the pipeline
/// (lookups take the read lock for a hash lookup and clone an `Arc`).
#[derive(Clone, Debug, Default)]
pub struct Names(Arc<RwLock<Snapshot>>);

#[derive(Debug, Default)]
struct Snapshot {
    enabled: bool,
    node_pods: PodStore,
    redis_pods: Option<PodStore>,
    services: Option<ServiceStore>,
    node_zone: Option<Arc<str>>,
    watches: HashMap<Watch, WatchHealth>,
    last_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Watch {
    NodePods,
    Node,
    RedisPods,
    Services,
}

impl Watch {
    fn name(self) -> &'static str {
        match self {
            Watch::NodePods => "pods on this node",
            Watch::Node => "node",
            Watch::RedisPods => "redis pods",
            Watch::Services => "services",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum WatchHealth {
    #[default]
    Starting,
    Listed,
    Failing,
}

impl Names {
    /// The names of a pod on this node.
    pub fn pod(&self, uid: &str) -> Option<Arc<PodMeta>> {
        let snapshot = self.0.read().unwrap_or_else(|e| e.into_inner());
        snapshot
            .node_pods
            .by_uid
            .get(uid)
            .map(|(meta, _)| meta.clone())
    }

    /// What `ip` is: a pod on this node, a Redis pod elsewhere, a Service.
    pub fn peer(&self, ip: IpAddr) -> Option<Peer> {
        let ip = ip.to_canonical();
        let snapshot = self.0.read().unwrap_or_else(|e| e.into_inner());
        let pod = |store: &PodStore| {
            let uid = store.by_ip.get(&ip)?;
            store
                .by_uid
                .get(uid)
                .map(|(meta, _)| Peer::Pod(meta.clone()))
        };
        pod(&snapshot.node_pods)
            .or_else(|| snapshot.redis_pods.as_ref().and_then(pod))
            .or_else(|| {
                let (namespace, name) = snapshot.services.as_ref()?.by_ip.get(&ip)?;
                Some(Peer::Service {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
            })
    }

    /// The node's zone from its `topology.kubernetes.io/zone` label.
    pub fn node_zone(&self) -> Option<Arc<str>> {
        let snapshot = self.0.read().unwrap_or_else(|e| e.into_inner());
        snapshot.node_zone.clone()
    }

    pub fn stats(&self) -> KubeStats {
        let snapshot = self.0.read().unwrap_or_else(|e| e.into_inner());
        KubeStats {
            state: snapshot.state(),
            pods: snapshot.node_pods.by_uid.len(),
            redis_pods: snapshot.redis_pods.as_ref().map(|s| s.by_uid.len()),
            services: snapshot.services.as_ref().map(|s| s.by_ip.len()),
            node_zone: snapshot.node_zone.as_deref().map(str::to_string),
            last_error: snapshot.last_error.clone(),
            not_kept: snapshot.node_pods.not_kept
                + snapshot.redis_pods.as_ref().map_or(0, |s| s.not_kept)
                + snapshot.services.as_ref().map_or(0, |s| s.not_kept),
        }
    }

    /// Test names: `pod` (from its API JSON) on this node, `service` a
    /// Service's.
    #[cfg(test)]
    pub(crate) fn for_tests(pods: &[serde_json::Value], services: &[serde_json::Value]) -> Self {
        let names = Self::default();
        {
            let mut snapshot = names.write();
            for pod in pods {
                let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
                snapshot.node_pods.apply(&pod, &["app".to_string()]);
            }
            let store = snapshot.services.get_or_insert_default();
            for service in services {
                store.apply(&serde_json::from_value(service.clone()).unwrap());
            }
        }
        names
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Names with the watches of `options` registered, none listed yet.
    fn enabled(options: &KubeOptions) -> Self {
        let names = Self::default();
        {
            let mut snapshot = names.write();
            snapshot.enabled = true;
            snapshot
                .watches
                .insert(Watch::NodePods, WatchHealth::Starting);
            snapshot.watches.insert(Watch::Node, WatchHealth::Starting);
            if options.redis_pod_selector.is_some() {
                snapshot.redis_pods = Some(PodStore::default());
                snapshot
                    .watches
                    .insert(Watch::RedisPods, WatchHealth::Starting);
            }
            if options.watch_services {
                snapshot.services = Some(ServiceStore::default());
                snapshot
                    .watches
                    .insert(Watch::Services, WatchHealth::Starting);
            }
        }
        names
    }

    /// Records what a watch's stream yielded; logs once when names become
    /// unavailable and once when they are back.
    fn health(&self, watch: Watch, progress: Progress<'_>) {
        let mut snapshot = self.write();
        let before = snapshot.state();
        let health = snapshot.watches.entry(watch).or_default();
        match progress {
            Progress::Object if *health == WatchHealth::Starting => return,
            Progress::Object | Progress::Listed | Progress::Watching => {
                *health = WatchHealth::Listed
            }
            Progress::Failed(err) => {
                *health = WatchHealth::Failing;
                snapshot.last_error = Some(format!("{}: {}", watch.name(), error_chain(err)));
            }
        }
        let after = snapshot.state();
        if before != after {
            match after {
                KubeState::Unavailable => tracing::warn!(
                    "kubernetes API unavailable ({}); events carry pod UIDs only until it answers again",
                    snapshot.last_error.as_deref().unwrap_or_default()
                ),
                KubeState::Connected => tracing::info!(
                    "kubernetes API connected: {} pods on this node",
                    snapshot.node_pods.by_uid.len()
                ),
                KubeState::Off | KubeState::Connecting => {}
            }
        }
    }
}

/// What a watch's stream, or its HTTP requests, showed.
enum Progress<'a> {
    /// An object listed or changed.
    Object,
    /// The (re)list is complete.
    Listed,
    /// The API accepted a watch request: a resumed watch that has no event
    /// to deliver is healthy too.
    Watching,
    Failed(&'a watcher::Error),
}

/// A layer in the client's stack: a watch request the API accepts marks its
/// watch healthy (kube-runtime yields nothing for it).
#[derive(Clone)]
struct ObserveWatches<S> {
    inner: S,
    names: Names,
}

impl<S, B> tower::Service<http::Request<B>> for ObserveWatches<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Box<::kube::client::DynBody>>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let watch = watch_of(request.uri());
        let names = self.names.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if let Some(watch) = watch
                && response.status().is_success()
            {
                names.health(watch, Progress::Watching);
            }
            Ok(response)
        })
    }
}

/// Which of our watches a `?watch=true` request is for.
fn watch_of(uri: &http::Uri) -> Option<Watch> {
    let query = uri.query()?;
    if !query.split('&').any(|pair| pair == "watch=true") {
        return None;
    }
    match uri.path() {
        "/api/v1/nodes" => Some(Watch::Node),
        "/api/v1/services" => Some(Watch::Services),
        "/api/v1/pods" if query.contains("fieldSelector=") => Some(Watch::NodePods),
        "/api/v1/pods" => Some(Watch::RedisPods),
        _ => None,
    }
}

impl Snapshot {
    fn state(&self) -> KubeState {
        if !self.enabled {
            return KubeState::Off;
        }
        let healths = self.watches.values();
        if healths.clone().any(|h| *h == WatchHealth::Failing) {
            KubeState::Unavailable
        } else if healths.clone().all(|h| *h == WatchHealth::Listed) {
            KubeState::Connected
        } else {
            KubeState::Connecting
        }
    }
}

/// `err: cause: cause`, one line; a cause already in its error's message
/// (kube's errors repeat their source) is left out.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Pods by UID and by IP; a relist builds a new store and replaces the old
/// one when the list is complete (pods deleted meanwhile disappear).
#[derive(Debug, Default)]
struct PodStore {
    by_uid: HashMap<Arc<str>, (Arc<PodMeta>, Vec<IpAddr>)>,
    by_ip: HashMap<IpAddr, Arc<str>>,
    /// Pods not kept: the store was full.
    not_kept: u64,
}

impl PodStore {
    fn apply(&mut self, pod: &Pod, labels: &[String]) {
        let Some((uid, meta, ips)) = pod_meta(pod, labels) else {
            return;
        };
        self.remove(&uid);
        if self.by_uid.len() >= MAX_PODS {
            self.not_kept += 1;
            return;
        }
        let uid: Arc<str> = uid.into();
        for ip in &ips {
            self.by_ip.insert(*ip, uid.clone());
        }
        self.by_uid.insert(uid, (Arc::new(meta), ips));
    }

    fn delete(&mut self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.remove(uid);
        }
    }

    fn remove(&mut self, uid: &str) {
        if let Some((_, ips)) = self.by_uid.remove(uid) {
            for ip in ips {
                // Another pod may have the address by now.
                if self.by_ip.get(&ip).is_some_and(|owner| &**owner == uid) {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }
}

/// ClusterIP → (namespace, name).
#[derive(Debug, Default)]
struct ServiceStore {
    by_ip: HashMap<IpAddr, (Arc<str>, Arc<str>)>,
    /// ClusterIPs not kept: the store was full.
    not_kept: u64,
}

impl ServiceStore {
    fn apply(&mut self, service: &Service) {
        self.delete(service);
        let (Some(namespace), Some(name)) = (
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
        ) else {
            return;
        };
        let (namespace, name): (Arc<str>, Arc<str>) = (namespace.into(), name.into());
        for ip in cluster_ips(service) {
            if self.by_ip.len() >= MAX_SERVICES {
                self.not_kept += 1;
                continue;
            }
            self.by_ip.insert(ip, (namespace.clone(), name.clone()));
        }
    }

    fn delete(&mut self, service: &Service) {
        for ip in cluster_ips(service) {
            self.by_ip.remove(&ip);
        }
    }
}

/// A Service's ClusterIPs (`None` for headless ones: their names resolve
/// to pod IPs, named as pods).
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// A pod's UID, names and IP addresses (none for host-network pods, whose
/// address is the node's, nor for finished pods, whose address is free
/// for another pod).
pub fn pod_meta(pod: &Pod, labels: &[String]) -> Option<(String, PodMeta, Vec<IpAddr>)> {
    let metadata = &pod.metadata;
    let uid = metadata.uid.clone()?;
    let pod_labels = metadata.labels.as_ref();
    let meta = PodMeta {
        namespace: metadata.namespace.as_deref()?.into(),
        name: metadata.name.as_deref()?.into(),
        workload: owner_workload(pod).map(Arc::from),
        labels: labels
            .iter()
            .filter_map(|key| {
                let value = pod_labels?.get(key)?;
                (value.len() <= MAX_LABEL_VALUE_BYTES)
                    .then(|| (Arc::from(key.as_str()), Arc::from(value.as_str())))
            })
            .collect(),
    };
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    let mut ips = Vec::new();
    if !host_network
        && !finished
        && let Some(status) = &pod.status
    {
        ips = status
            .pod_ips
            .iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(status.pod_ip.as_deref())
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .collect();
        ips.sort();
        ips.dedup();
    }
    Some((uid, meta, ips))
}

/// `deployment/api` from the pod's controller reference: a ReplicaSet
/// whose name is `<deployment>-<pod-template-hash>` is that Deployment's
/// (ReplicaSets are never read); other kinds as `kind/name`, lowercased.
pub fn owner_workload(pod: &Pod) -> Option<String> {
    let owners = pod.metadata.owner_references.as_ref()?;
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())?;
    if owner.kind == "ReplicaSet"
        && let Some(hash) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POD_TEMPLATE_HASH))
        && let Some(deployment) = owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
        && !deployment.is_empty()
    {
        return Some(format!("deployment/{deployment}"));
    }
    Some(format!(
        "{}/{}",
        owner.kind.to_ascii_lowercase(),
        owner.name
    ))
}

/// The zone a Node's labels name.
pub fn node_zone(node: &Node) -> Option<String> {
    let labels = node.metadata.labels.as_ref()?;
    ZONE_LABELS
        .iter()
        .find_map(|key| labels.get(*key))
        .filter(|zone| !zone.is_empty())
        .cloned()
}

/// Names that stay empty: `--kubernetes off`.
pub fn off() -> Names {
    Names::default()
}

/// Starts the watches on their own thread (its own single-threaded
/// runtime: the ring-buffer reader never waits for a list to parse).
/// Fails only on a configuration that cannot work (an unreadable
/// kubeconfig, no configuration at all); an API that does not answer is
/// retried for as long as the agent runs.
pub fn start(options: KubeOptions) -> Result<Names, KubeError> {
    let names = Names::enabled(&options);
    let (ready, ready_rx) = std::sync::mpsc::sync_channel(1);
    let shared = names.clone();
    std::thread::Builder::new()
        .name("kubernetes".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready.send(Err(KubeError::Thread(err)));
                    return;
                }
            };
            runtime.block_on(async move {
                let client = match client(&options, &shared).await {
                    Ok(client) => {
                        let _ = ready.send(Ok(()));
                        client
                    }
                    Err(err) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                };
                watch_all(client, options, shared).await;
            });
        })
        .map_err(KubeError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(names),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(KubeError::Thread(std::io::Error::other(
            "the metadata thread exited",
        ))),
    }
}

async fn client(options: &KubeOptions, names: &Names) -> Result<Client, KubeError> {
    let mut config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = ::kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            ::kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => ::kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    // The client would retry 429/503 answers itself, up to 15 times over
    // minutes, out of the watches' sight: the watches' own backoff retries
    // them, and `stats` says the API is unavailable meanwhile.
    config.default_retry = false;
    let names = names.clone();
    let observe = tower::layer::layer_fn(move |inner| ObserveWatches {
        inner,
        names: names.clone(),
    });
    Ok(::kube::client::ClientBuilder::try_from(config)
        .map_err(KubeError::Client)?
        .with_layer(&observe)
        .build())
}

async fn watch_all(client: Client, options: KubeOptions, names: Names) {
    let node_pods = {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", options.node));
        let api: Api<Pod> = Api::all(client.clone());
        let (names, labels) = (names.clone(), options.pod_labels.clone());
        watch_pods(api, config, names, Watch::NodePods, labels)
    };
    let node = {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", options.node));
        let api: Api<Node> = Api::all(client.clone());
        let names = names.clone();
        watch(api, config, names.clone(), Watch::Node, move |event| {
            let zone = match event {
                watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                    node_zone(&node).map(Arc::from)
                }
                watcher::Event::Delete(_) => None,
                watcher::Event::Init | watcher::Event::InitDone => return,
            };
            names.write().node_zone = zone;
        })
    };
    let redis_pods = options.redis_pod_selector.clone().map(|selector| {
        let config = watcher::Config::default().labels(&selector);
        let api: Api<Pod> = Api::all(client.clone());
        watch_pods(
            api,
            config,
            names.clone(),
            Watch::RedisPods,
            options.pod_labels.clone(),
        )
    });
    let services = options.watch_services.then(|| {
        let api: Api<Service> = Api::all(client.clone());
        let names = names.clone();
        let mut pending: Option<ServiceStore> = None;
        watch(
            api,
            watcher::Config::default(),
            names.clone(),
            Watch::Services,
            move |event| {
                let mut snapshot = names.write();
                let Some(store) = snapshot.services.as_mut() else {
                    return;
                };
                match event {
                    watcher::Event::Init => pending = Some(ServiceStore::default()),
                    watcher::Event::InitApply(service) => {
                        pending.get_or_insert_default().apply(&service)
                    }
                    watcher::Event::InitDone => *store = pending.take().unwrap_or_default(),
                    watcher::Event::Apply(service) => store.apply(&service),
                    watcher::Event::Delete(service) => store.delete(&service),
                }
            },
        )
    });
    tokio::join!(node_pods, node, optional(redis_pods), optional(services));
}

async fn optional(watch: Option<impl Future<Output = ()>>) {
    if let Some(watch) = watch {
        watch.await
    }
}

fn watch_pods(
    api: Api<Pod>,
    config: watcher::Config,
    names: Names,
    which: Watch,
    labels: Vec<String>,
) -> impl Future<Output = ()> {
    let mut pending: Option<PodStore> = None;
    let shared = names.clone();
    watch(api, config, names, which, move |event| {
        let mut snapshot = shared.write();
        let store = match which {
            Watch::RedisPods => match snapshot.redis_pods.as_mut() {
                Some(store) => store,
                None => return,
            },
            _ => &mut snapshot.node_pods,
        };
        match event {
            watcher::Event::Init => pending = Some(PodStore::default()),
            watcher::Event::InitApply(pod) => pending.get_or_insert_default().apply(&pod, &labels),
            watcher::Event::InitDone => *store = pending.take().unwrap_or_default(),
            watcher::Event::Apply(pod) => store.apply(&pod, &labels),
            watcher::Event::Delete(pod) => store.delete(&pod),
        }
    })
}

/// Runs one watch for as long as the agent does: events to `apply`, its
/// health to `names`; after an error, kube-runtime's default backoff
/// (exponential from 0.8 s to 30 s, with jitter; reset by a success).
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    names: Names,
    which: Watch,
    mut apply: impl FnMut(watcher::Event<K>),
) where
    K: ::kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    loop {
        let mut stream = std::pin::pin!(watcher(api.clone(), config.clone()).default_backoff());
        while let Some(result) = stream.next().await {
            match result {
                Ok(event) => {
                    let progress = match event {
                        // Comes before the list request: it proves nothing.
                        watcher::Event::Init => None,
                        watcher::Event::InitDone => Some(Progress::Listed),
                        _ => Some(Progress::Object),
                    };
                    apply(event);
                    if let Some(progress) = progress {
                        names.health(which, progress);
                    }
                }
                // History compacted past our resourceVersion, told in the
                // stream (as API servers do): the watcher relists itself.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {}
                // Told as the watch request's HTTP status instead: the
                // watcher would retry the same resourceVersion forever, so
                // a new one starts over with a list.
                Err(watcher::Error::WatchStartFailed(::kube::Error::Api(status)))
                    if status.code == 410 =>
                {
                    break;
                }
                Err(err) => names.health(which, Progress::Failed(&err)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn owned_by(kind: &str, name: &str, hash: Option<&str>) -> Pod {
        let mut labels = serde_json::json!({ "app": "api" });
        if let Some(hash) = hash {
            labels["pod-template-hash"] = hash.into();
        }
        pod(serde_json::json!({
            "metadata": {
                "name": "x", "namespace": "shop", "uid": "u1", "labels": labels,
                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "o1", "controller": true }],
            },
        }))
    }

    #[test]
    fn pods_beyond_the_cap_are_counted_not_kept() {
        let mut store = PodStore::default();
        for i in 0..MAX_PODS + 3 {
            store.apply(
                &pod(serde_json::json!({
                    "metadata": { "name": format!("p{i}"), "namespace": "shop", "uid": format!("u{i}") },
                    "status": { "podIP": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255) },
                })),
                &[],
            );
        }
        assert_eq!(store.by_uid.len(), MAX_PODS);
        assert_eq!(store.not_kept, 3);
        // An update of a kept pod is not a new one.
        store.apply(
            &pod(serde_json::json!({ "metadata": { "name": "p0", "namespace": "shop", "uid": "u0" } })),
            &[],
        );
        assert_eq!(store.not_kept, 3);
    }

    #[test]
    fn a_replicasets_pod_belongs_to_its_deployment() {
        let p = owned_by("ReplicaSet", "api-7d9f8b6c5d", Some("7d9f8b6c5d"));
        assert_eq!(owner_workload(&p).as_deref(), Some("deployment/api"));
        // A ReplicaSet of its own (no hash label, or a name without it) stays one.
        let bare = owned_by("ReplicaSet", "api-7d9f8b6c5d", None);
        assert_eq!(
            owner_workload(&bare).as_deref(),
            Some("replicaset/api-7d9f8b6c5d")
        );
        let other = owned_by("ReplicaSet", "legacy", Some("7d9f8b6c5d"));
        assert_eq!(owner_workload(&other).as_deref(), Some("replicaset/legacy"));
    }

    #[test]
    fn other_owners_are_kind_and_name() {
        for (kind, expected) in [
            ("StatefulSet", "statefulset/redis"),
            ("DaemonSet", "daemonset/redis"),
            ("Job", "job/redis"),
        ] {
            assert_eq!(
                owner_workload(&owned_by(kind, "redis", None)).as_deref(),
                Some(expected)
            );
        }
        let bare = pod(serde_json::json!({ "metadata": { "name": "x", "uid": "u" } }));
        assert_eq!(owner_workload(&bare), None);
    }

    #[test]
    fn the_controller_reference_wins() {
        let p = pod(
            serde_json::json!({ "metadata": { "name": "x", "uid": "u", "ownerReferences": [
            { "apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "1" },
            { "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "redis", "uid": "2", "controller": true },
        ] } }),
        );
        assert_eq!(owner_workload(&p).as_deref(), Some("statefulset/redis"));
    }

    #[test]
    fn pod_meta_keeps_chosen_labels_and_addresses_of_running_pods_only() {
        let running = pod(serde_json::json!({
            "metadata": { "name": "api-1", "namespace": "shop", "uid": "u1",
                          "labels": { "app": "api", "team": "core", "secret": "x" } },
            "spec": { "containers": [], "nodeName": "n1" },
            "status": { "phase": "Running", "podIP": "10.0.1.5",
                        "podIPs": [{ "ip": "10.0.1.5" }, { "ip": "fd00::5" }] },
        }));
        let labels = vec!["app".to_string(), "team".to_string(), "missing".to_string()];
        let (uid, meta, ips) = pod_meta(&running, &labels).unwrap();
        assert_eq!(uid, "u1");
        assert_eq!((&*meta.namespace, &*meta.name), ("shop", "api-1"));
        let kept: Vec<(&str, &str)> = meta.labels.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(kept, [("app", "api"), ("team", "core")]);
        assert_eq!(
            ips,
            [
                "10.0.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );

        let mut host = running.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(pod_meta(&host, &labels).unwrap().2.is_empty());
        let mut done = running;
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(pod_meta(&done, &labels).unwrap().2.is_empty());
    }

    #[test]
    fn node_zone_from_topology_label_else_the_old_one() {
        let node = |labels: serde_json::Value| -> Node {
            serde_json::from_value(
                serde_json::json!({ "metadata": { "name": "n", "labels": labels } }),
            )
            .unwrap()
        };
        assert_eq!(
            node_zone(&node(serde_json::json!({
                "topology.kubernetes.io/zone": "us-east-1a",
                "failure-domain.beta.kubernetes.io/zone": "old",
            })))
            .as_deref(),
            Some("us-east-1a")
        );
        assert_eq!(
            node_zone(&node(
                serde_json::json!({ "failure-domain.beta.kubernetes.io/zone": "us-east-1b" })
            ))
            .as_deref(),
            Some("us-east-1b")
        );
        assert_eq!(node_zone(&node(serde_json::json!({ "x": "y" }))), None);
    }

    #[test]
    fn a_reused_address_belongs_to_the_newest_pod() {
        let at = |uid: &str, ip: &str| {
            pod(serde_json::json!({
                "metadata": { "name": uid, "namespace": "ns", "uid": uid },
                "status": { "phase": "Running", "podIP": ip },
            }))
        };
        let mut store = PodStore::default();
        store.apply(&at("old", "10.0.0.7"), &[]);
        store.apply(&at("new", "10.0.0.7"), &[]);
        // The old pod's deletion arrives late: the address stays the new pod's.
        store.delete(&at("old", "10.0.0.7"));
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(store.by_ip.get(&ip).map(|u| &**u), Some("new"));
        assert_eq!(store.by_uid.len(), 1);
    }

    #[test]
    fn services_are_named_by_cluster_ip_and_headless_ones_not_at_all() {
        let service = |ip: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "redis", "namespace": "cache" },
                "spec": { "clusterIP": ip, "clusterIPs": [ip] },
            }))
            .unwrap()
        };
        let mut store = ServiceStore::default();
        store.apply(&service("172.20.0.10"));
        store.apply(&service("None"));
        assert_eq!(store.by_ip.len(), 1);
        let names = Names::default();
        names.write().services = Some(store);
        assert_eq!(
            names.peer("172.20.0.10".parse().unwrap()),
            Some(Peer::Service {
                namespace: "cache".into(),
                name: "redis".into()
            })
        );
        assert_eq!(names.stats().state, KubeState::Off);
    }
}
