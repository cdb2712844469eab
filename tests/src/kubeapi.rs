//! A fake Kubernetes API server: no API server can run here, so the agent's
//! metadata client is pointed (through a kubeconfig this writes) at plain
//! HTTP on 127.0.0.1 that answers what the client asks, the way the API
//! does: `GET /api/v1/{pods,nodes,services}` lists with a resourceVersion,
//! and `?watch=true` streams of ADDED/MODIFIED/DELETED/BOOKMARK/ERROR
//! events from the requested resourceVersion on; a resourceVersion older
//! than the last compaction gets an ERROR event with code 410 (Gone), as a
//! real API server answers it. Every request is recorded for the test to
//! check (`fieldSelector`, `resourceVersion`).

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};

/// One request the server got.
#[derive(Clone, Debug)]
pub struct Request {
    /// `pods`, `nodes` or `services`.
    pub resource: String,
    pub watch: bool,
    pub query: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Current objects by resource, keyed by `metadata.uid` (name for nodes).
    objects: HashMap<&'static str, Vec<Value>>,
    /// Every change: (resourceVersion, resource, event type, object).
    log: Vec<(u64, &'static str, &'static str, Value)>,
    /// Watches from an older resourceVersion get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch stream.
    breaks: u64,
    requests: Vec<Request>,
    /// Answer every request with this status instead (e.g. 503).
    failing: Option<u16>,
    /// Expired resourceVersions get an HTTP 410 answer instead of an ERROR
    /// event in a 200 stream.
    gone_as_http: bool,
    /// The newest resourceVersion written to a watch stream, by resource.
    delivered: HashMap<&'static str, u64>,
}

/// The fake API server; stops (its streams end) when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    kubeconfig: PathBuf,
}

const RESOURCES: [&str; 3] = ["pods", "nodes", "services"];

impl FakeApi {
    /// A server on a free port, not listening yet (the API is "down": its
    /// port refuses connections until [`FakeApi::listen`]).
    pub fn reserve() -> anyhow::Result<Self> {
        let port = crate::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let kubeconfig = std::env::temp_dir().join(format!("resptrace-kubeconfig-{port}.yaml"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\n"
            ),
        )
        .context("writing the kubeconfig")?;
        let mut state = State {
            resource_version: 100,
            ..Default::default()
        };
        for resource in RESOURCES {
            state.objects.insert(resource, Vec::new());
        }
        Ok(Self {
            addr,
            state: Arc::new((Mutex::new(state), Condvar::new())),
            stop: Arc::default(),
            kubeconfig,
        })
    }

    /// A listening server.
    pub fn start() -> anyhow::Result<Self> {
        let api = Self::reserve()?;
        api.listen()?;
        Ok(api)
    }

    /// Starts answering on the reserved port.
    pub fn listen(&self) -> anyhow::Result<()> {
        let listener =
            TcpListener::bind(self.addr).with_context(|| format!("binding {}", self.addr))?;
        let (state, stop) = (Arc::clone(&self.state), Arc::clone(&self.stop));
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
                thread::spawn(move || {
                    let _ = serve(stream, &state, &stop);
                });
            }
        });
        Ok(())
    }

    /// `--kubeconfig` for the agent.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (lock, wake) = &*self.state;
        let result = f(&mut lock.lock().unwrap());
        wake.notify_all();
        result
    }

    /// Adds or replaces an object (ADDED or MODIFIED to open watches).
    pub fn apply(&self, resource: &'static str, mut object: Value) {
        self.with(|state| {
            state.resource_version += 1;
            let rv = state.resource_version;
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            let key = key(&object);
            let objects = state.objects.get_mut(resource).expect("known resource");
            let kind = match objects.iter().position(|o| self::key(o) == key) {
                Some(i) => {
                    objects[i] = object.clone();
                    "MODIFIED"
                }
                None => {
                    objects.push(object.clone());
                    "ADDED"
                }
            };
            state.log.push((rv, resource, kind, object));
        });
    }

    /// Deletes an object (DELETED to open watches).
    pub fn delete(&self, resource: &'static str, key_of: &str) {
        self.with(|state| {
            state.resource_version += 1;
            let rv = state.resource_version;
            let objects = state.objects.get_mut(resource).expect("known resource");
            if let Some(i) = objects.iter().position(|o| key(o) == key_of) {
                let mut object = objects.remove(i);
                object["metadata"]["resourceVersion"] = rv.to_string().into();
                state.log.push((rv, resource, "DELETED", object));
            }
        });
    }

    /// Deletes an object with no event left to watch: as if the API server
    /// compacted its history past it (only a relist can notice).
    pub fn delete_silently(&self, resource: &'static str, key_of: &str) {
        self.with(|state| {
            state.resource_version += 1;
            state
                .objects
                .get_mut(resource)
                .expect("known resource")
                .retain(|o| key(o) != key_of);
        });
    }

    /// A BOOKMARK on every open watch, at a new resourceVersion that no
    /// object change has; returns it.
    pub fn bookmark(&self) -> u64 {
        self.with(|state| {
            state.resource_version += 1;
            let rv = state.resource_version;
            for resource in RESOURCES {
                let kind = kind_of(resource);
                let marker = json!({ "kind": kind, "apiVersion": "v1", "metadata": { "resourceVersion": rv.to_string() } });
                state.log.push((rv, resource, "BOOKMARK", marker));
            }
            rv
        })
    }

    /// History before now is gone: watches from an older resourceVersion
    /// get `410 Gone`.
    pub fn compact(&self) {
        self.with(|state| state.compacted = state.resource_version);
    }

    /// Whether an expired resourceVersion gets HTTP 410 (`true`) or, as API
    /// servers usually answer, an ERROR event with code 410 (`false`).
    pub fn gone_as_http(&self, http: bool) {
        self.with(|state| state.gone_as_http = http);
    }

    /// Ends every open watch stream (as a load balancer's idle timeout, or
    /// an API server restart, does).
    pub fn break_watches(&self) {
        self.with(|state| state.breaks += 1);
    }

    /// Answers every request with `status` (`None`: normally again).
    pub fn fail_with(&self, status: Option<u16>) {
        self.with(|state| state.failing = status);
    }

    /// The newest resourceVersion written to a `resource` watch (its events
    /// and bookmarks up to it are on the wire).
    pub fn delivered(&self, resource: &str) -> u64 {
        self.with(|state| state.delivered.get(resource).copied().unwrap_or(0))
    }

    /// Requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.with(|state| state.requests.clone())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.break_watches();
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn key(object: &Value) -> String {
    let metadata = &object["metadata"];
    metadata["uid"]
        .as_str()
        .or(metadata["name"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "pods" => "Pod",
        "nodes" => "Node",
        _ => "Service",
    }
}

/// Whether `object` matches the request's field and label selectors (the
/// `a=b` forms the agent uses).
fn selected(object: &Value, query: &HashMap<String, String>) -> bool {
    let fields_match = query.get("fieldSelector").is_none_or(|selector| {
        selector.split(',').all(|term| {
            let Some((path, value)) = term.split_once('=') else {
                return false;
            };
            let field = path
                .split('.')
                .fold(object, |v, part| &v[part])
                .as_str()
                .unwrap_or_default();
            field == value
        })
    });
    let labels_match = query.get("labelSelector").is_none_or(|selector| {
        selector.split(',').all(|term| {
            let Some((key, value)) = term.split_once('=') else {
                return false;
            };
            object["metadata"]["labels"][key] == value
        })
    });
    fields_match && labels_match
}

fn serve(
    stream: TcpStream,
    state: &(Mutex<State>, Condvar),
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: HashMap<String, String> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let resource = path.trim_start_matches("/api/v1/").to_string();
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let mut out = stream;
    let (lock, wake) = state;
    let mut guard = lock.lock().unwrap();
    guard.requests.push(Request {
        resource: resource.clone(),
        watch,
        query: query.clone(),
    });
    if let Some(status) = guard.failing {
        drop(guard);
        let body = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status, "message": "unavailable" }).to_string();
        write!(
            out,
            "HTTP/1.1 {status} Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let Some(resource) = RESOURCES.into_iter().find(|r| *r == resource) else {
        drop(guard);
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    };
    if !watch {
        let items: Vec<Value> = guard.objects[resource]
            .iter()
            .filter(|o| selected(o, &query))
            .cloned()
            .collect();
        let body = json!({
            "kind": format!("{}List", kind_of(resource)),
            "apiVersion": "v1",
            "metadata": { "resourceVersion": guard.resource_version.to_string() },
            "items": items,
        })
        .to_string();
        drop(guard);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    // A watch: events after the requested resourceVersion, until a break.
    let mut cursor: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    if cursor < guard.compacted {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {cursor} ({})", guard.compacted),
        });
        let http = guard.gone_as_http;
        drop(guard);
        if http {
            let body = status.to_string();
            write!(
                out,
                "HTTP/1.1 410 Gone\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
        } else {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            )?;
            writeln!(out, "{}", json!({ "type": "ERROR", "object": status }))?;
        }
        return Ok(());
    }
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let breaks = guard.breaks;
    loop {
        if guard.breaks != breaks || stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let events: Vec<String> = guard
            .log
            .iter()
            .filter(|(rv, r, kind, object)| {
                *rv > cursor && *r == resource && (*kind == "BOOKMARK" || selected(object, &query))
            })
            .map(|(_, _, kind, object)| {
                // Watch events carry kind and apiVersion; list items do not.
                let mut object = object.clone();
                object["kind"] = kind_of(resource).into();
                object["apiVersion"] = "v1".into();
                json!({ "type": kind, "object": object }).to_string()
            })
            .collect();
        cursor = guard.resource_version;
        if !events.is_empty() {
            drop(guard);
            for event in events {
                writeln!(out, "{event}")?;
            }
            out.flush()?;
            guard = lock.lock().unwrap();
            let delivered = guard.delivered.entry(resource).or_default();
            *delivered = (*delivered).max(cursor);
            continue;
        }
        guard = wake
            .wait_timeout(guard, Duration::from_millis(200))
            .unwrap()
            .0;
    }
}

/// Percent-decoding of a query component (`+` is a space).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Pod as the API returns it.
pub struct PodSpec<'a> {
    pub uid: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub ip: std::net::Ipv4Addr,
    pub labels: Value,
    /// (kind, name) of the controller.
    pub owner: Option<(&'a str, &'a str)>,
}

impl PodSpec<'_> {
    pub fn json(&self) -> Value {
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "labels": self.labels,
            "creationTimestamp": "2026-12-04T18:00:00Z",
        });
        if let Some((kind, name)) = self.owner {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": name,
                "uid": "6b1d2f0e-0000-4000-8000-000000000001",
                "controller": true, "blockOwnerDeletion": true,
            }]);
        }
        json!({
            "metadata": metadata,
            "spec": {
                "nodeName": self.node,
                "containers": [{ "name": "main", "image": "example/app:1" }],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ip.to_string(),
                "podIPs": [{ "ip": self.ip.to_string() }],
                "hostIP": "10.0.0.10",
            },
        })
    }
}

/// A Node as the API returns it, in `zone`.
pub fn node(name: &str, zone: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "uid": format!("node-{name}"),
            "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/region": "us-east-1",
                "topology.kubernetes.io/zone": zone,
            },
        },
        "spec": { "providerID": format!("aws:///{zone}/i-0123456789abcdef0") },
        "status": { "addresses": [{ "type": "InternalIP", "address": "10.0.0.10" }] },
    })
}
