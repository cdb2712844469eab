//! `deploy/` as a cluster gets it: rendered by kustomize, every object
//! validated strictly against the Kubernetes schemas (unknown fields fail),
//! the DaemonSet's security settings as `tests/caps.rs` proves them, and the
//! ConfigMap's settings accepted by the agent itself. Offline: the tools come
//! from `cargo xtask setup` (xtask/deploy-tools.txt).

use std::process::Command;

use lab::deploy::{self, AGENT_CAPABILITIES, AMAZON_LINUX_2_CAPABILITIES};
use serde_json::{Value, json};

/// The oldest Kubernetes in EKS extended support, and the newest the
/// validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// What `kubectl apply -k` applies for `dir` under `deploy/`, parsed.
fn rendered(dir: &str) -> (String, Vec<Value>) {
    let yaml = deploy::render(&deploy::deploy_dir().join(dir)).unwrap();
    let objects = deploy::parse_yaml(&yaml).unwrap();
    (yaml, objects)
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let mut matching = objects.iter().filter(|o| o["kind"] == kind);
    let found = matching.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(matching.next().is_none(), "one {kind}");
    found
}

fn agent_container(objects: &[Value]) -> &Value {
    let containers = &find(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers.as_array().unwrap().len(), 1, "{containers}");
    &containers[0]
}

#[test]
fn every_object_is_valid_for_every_supported_kubernetes() {
    for dir in ["", "overlays/amazon-linux-2", "overlays/bottlerocket"] {
        let (yaml, objects) = rendered(dir);
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "Service",
                "DaemonSet"
            ],
            "deploy/{dir}"
        );
        for version in KUBERNETES_VERSIONS {
            let report = deploy::validate(&yaml, version)
                .unwrap_or_else(|report| panic!("deploy/{dir} on {version}:\n{report}"));
            assert_eq!(
                report.matches(" passed for resource ").count(),
                objects.len(),
                "every object checked, none skipped: {report}"
            );
        }
    }
}

/// The validator must be able to fail: a typo in a field name, a wrong type
/// and a missing required field, each in the real DaemonSet, are rejected.
#[test]
fn the_validator_rejects_broken_manifests() {
    let (_, objects) = rendered("");
    let daemonset = find(&objects, "DaemonSet").clone();
    type Breakage = fn(&mut Value);
    let broken: [(&str, Breakage); 3] = [
        ("misspelt field", |d| {
            let context = &mut d["spec"]["template"]["spec"]["containers"][0]["securityContext"];
            let value = context
                .as_object_mut()
                .unwrap()
                .remove("readOnlyRootFilesystem");
            context["readOnlyRootFileSystem"] = value.unwrap();
        }),
        ("capabilities as a string", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                json!("BPF,PERFMON");
        }),
        ("no containers", |d| {
            d["spec"]["template"]["spec"]
                .as_object_mut()
                .unwrap()
                .remove("containers");
        }),
    ];
    assert!(deploy::validate(&deploy::to_yaml(std::slice::from_ref(&daemonset)), "1.30.0").is_ok());
    for (what, breakage) in broken {
        let mut object = daemonset.clone();
        breakage(&mut object);
        let result = deploy::validate(&deploy::to_yaml(&[object]), "1.30.0");
        assert!(result.is_err(), "{what} passed: {result:?}");
    }
}

#[test]
fn the_daemonset_runs_unprivileged_with_the_proven_capabilities() {
    let (_, objects) = rendered("");
    let daemonset = find(&objects, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let agent = agent_container(&objects);
    let security = &agent["securityContext"];

    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["runAsUser"], 0, "tests/caps.rs runs it as uid 0");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["capabilities"]["add"], json!(AGENT_CAPABILITIES));
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], false);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert!(pod["securityContext"]["privileged"].is_null());

    // Every hostPath is mounted read-only.
    let mounts = agent["volumeMounts"].as_array().unwrap();
    for volume in pod["volumes"].as_array().unwrap() {
        let mount = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("volume {} unmounted", volume["name"]));
        if !volume["hostPath"].is_null() {
            assert_eq!(mount["readOnly"], true, "{mount}");
        }
    }
    let host_cgroup = mounts
        .iter()
        .find(|m| m["mountPath"] == "/host/sys/fs/cgroup")
        .expect("the host's cgroup2 tree mounted");
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--cgroup-root=/host/sys/fs/cgroup"),
        "{args:?}"
    );
    assert_eq!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == host_cgroup["name"])
            .unwrap()["hostPath"]["path"],
        "/sys/fs/cgroup"
    );
}

/// The overlays change what they say and nothing else that matters.
#[test]
fn the_overlays_grant_what_their_nodes_need() {
    let (_, objects) = rendered("overlays/amazon-linux-2");
    let agent = agent_container(&objects);
    let security = &agent["securityContext"];
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        json!(AMAZON_LINUX_2_CAPABILITIES),
        "tests/caps.rs proves this set on 5.10"
    );
    assert_eq!(security["privileged"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    let args = agent["args"].to_string();
    assert!(!args.contains("--cgroup-root"), "{args}");
    let run = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/run/resptrace")
        .expect("a writable /run/resptrace for the agent's cgroup2 mount");
    let pod = &find(&objects, "DaemonSet")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == run["name"])
        .unwrap();
    assert!(volume["emptyDir"].is_object(), "{volume}");
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["hostPath"]["path"] != "/sys/fs/cgroup"),
        "no host cgroup2 tree on a cgroup-v1 node"
    );

    let (_, objects) = rendered("overlays/bottlerocket");
    let security = &agent_container(&objects)["securityContext"];
    assert_eq!(security["seLinuxOptions"], json!({"type": "super_t"}));
    assert_eq!(security["capabilities"]["add"], json!(AGENT_CAPABILITIES));
    assert_eq!(security["privileged"], false);
}

#[test]
fn node_name_probes_and_service_match_the_agent() {
    let (_, objects) = rendered("");
    let agent = agent_container(&objects);
    let env = agent["env"].as_array().unwrap();
    let node_name = env.iter().find(|e| e["name"] == "NODE_NAME").unwrap();
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    // The agent's listener, from its own flag, is what probes and Service use.
    let http_addr = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--http-addr="))
        .expect("--http-addr");
    let port: u16 = http_addr.strip_prefix("0.0.0.0:").unwrap().parse().unwrap();
    let port_entry = &agent["ports"][0];
    assert_eq!(port_entry["containerPort"], port);
    let port_name = port_entry["name"].as_str().unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(agent[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], port_name, "{probe}");
    }
    let service = find(&objects, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port_name);
    let pod_labels = &find(&objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[key], value, "Service selects the agent pods");
    }

    // The PodMonitor example (a CRD: not validated) scrapes the same pods.
    let example =
        std::fs::read_to_string(deploy::deploy_dir().join("examples/podmonitor.yaml")).unwrap();
    let monitor = &deploy::parse_yaml(&example).unwrap()[0];
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], port_name);
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&pod_labels[key], value, "PodMonitor selects the agent pods");
    }
}

#[test]
fn the_rbac_reads_pods_and_nodes_only() {
    let (_, objects) = rendered("");
    let role = find(&objects, "ClusterRole");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = find(&objects, "ClusterRoleBinding");
    let account = find(&objects, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    let pod = &find(&objects, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
}

/// The agent reads the ConfigMap's file — every key, also those commented
/// out — and the DaemonSet's flags and variables, and accepts them: with no
/// capabilities it gets past the configuration (exit 2 is a config error)
/// and stops at the privilege check.
#[test]
fn the_agent_accepts_the_configmap_and_the_daemonset_args() {
    let (_, objects) = rendered("");
    let toml = find(&objects, "ConfigMap")["data"]["resptrace.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    // `# key = value` lines are settings shown at their defaults.
    let uncommented: String = toml
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting)
                if setting
                    .split_once(" = ")
                    .is_some_and(|(k, _)| !k.contains(' ')) =>
            {
                setting
            }
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(uncommented.matches('\n').count() == toml.matches('\n').count());
    assert!(uncommented.contains("\nzone-cidr = ["), "{uncommented}");

    let agent = agent_container(&objects);
    let dir = std::env::temp_dir().join(format!("resptrace-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in [
        ("as-shipped.toml", &toml),
        ("uncommented.toml", &uncommented),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let args: Vec<String> = agent["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let arg = a.as_str().unwrap();
                match arg.strip_prefix("--config=") {
                    Some(_) => format!("--config={}", path.display()),
                    None => arg.to_owned(),
                }
            })
            .collect();
        assert!(args.iter().any(|a| a.starts_with("--config=")));
        let output = Command::new("setpriv")
            .args(["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"])
            .arg(lab::agent_binary())
            .args(&args)
            .env("NODE_NAME", "ip-10-0-1-5.ec2.internal")
            // What the downward API gives for a label the pod lacks.
            .env("RESPTRACE_ZONE", "")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains("missing privileges"), "{name}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
