//! `docs/events.schema.json` itself: a valid 2020-12 schema, strict (no
//! unknown fields anywhere but the two free maps), accepting one sample of
//! every event type, rejecting wrong lines, and documented field by field
//! in `docs/events.md`. Needs no root: runs anywhere.

use lab::schema::{SCHEMA, check_line, validator};
use serde_json::{Value, json};

/// One event of each type, as the agent writes them (and `alert`, as the
/// detectors will).
fn samples() -> Vec<Value> {
    let head = |kind: &str| json!({"ts": "2026-11-25T17:17:06.967463Z", "type": kind, "node": "ip-10-0-1-5.ec2.internal", "schema_version": 1});
    let with = |kind: &str, body: Value| {
        let mut event = head(kind);
        event
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        event
    };
    let process = json!({"ip": "10.0.1.5", "port": 46742, "pid": 8496, "tid": 8497, "comm": "java", "cgroup_id": 4242,
                         "cgroup": "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-0123abcd.scope"});
    let redis = json!({"ip": "2001:db8::9", "port": 6379});
    vec![
        with(
            "started",
            json!({"version": "0.1.0", "pid": 1, "kernel": "6.1.0", "ports": [6379, 6380],
            "tracepoints": ["sock/inet_sock_set_state", "cgroup_skb/resp_egress"], "seeded_connections": 3}),
        ),
        with(
            "connect",
            json!({"outcome": "established", "answer": "syn_ack", "handshake_us": 166, "syn_retransmits": 0,
            "path_drop_suspected": false, "src": process, "dst": redis}),
        ),
        with(
            "connect",
            json!({"outcome": "aborted", "answer": "none", "failed_after_us": 1_500_712, "syn_retransmits": 1,
            "path_drop_suspected": true, "error": "ETIMEDOUT", "src": process, "dst": {"ip": "10.2.0.9", "port": 6379}}),
        ),
        with(
            "close",
            json!({"role": "server", "closed_by": "peer_reset", "open_before_agent": true, "retransmits": 2,
            "resets_received": 1, "resets_sent": 0, "src": {"ip": "10.0.1.5", "port": 46742}, "dst": process}),
        ),
        with(
            "synack_retransmit",
            json!({"src": {"ip": "10.0.1.5", "port": 46742}, "dst": redis}),
        ),
        with(
            "connections",
            json!({"role": "client", "open": 12, "src": {"cgroup_id": 4242, "comm": "java"}, "dst": redis}),
        ),
        with(
            "connections",
            json!({"role": "server", "open": 0, "dst": redis}),
        ),
        with(
            "request",
            json!({"role": "client", "command": "CLIENT SETNAME", "outcome": "error", "error": "MOVED",
            "latency_us": 512.3, "reply_arrival_us": 512.3, "first_byte_us": 510.0, "app_read_delay_us": 3.1,
            "request_bytes": 40, "reply_bytes": 30, "depth": 1, "cgroup_id": 4242, "cgroup": "/x",
            "src": {"ip": "10.0.1.5", "port": 46742}, "dst": redis}),
        ),
        with(
            "request",
            json!({"role": "client", "command": "tls", "outcome": "ok", "latency_us": 812.0,
            "reply_arrival_us": 812.0, "first_byte_us": 790.5, "request_bytes": 58, "reply_bytes": 44,
            "depth": 1, "tls": true, "cgroup_id": 4242, "src": {"ip": "10.0.1.5", "port": 46744}, "dst": redis}),
        ),
        with(
            "latency",
            json!({"window_s": 10.002, "role": "client", "cgroup_id": 4242, "endpoint": redis, "op": "GET",
            "count": 10, "ok": 7, "nil": 1, "errors": {"MOVED": 1, "ERR": 1}, "timeouts": 0, "no_reply": 0, "untimed": 0,
            "p50_us": 120.0, "p90_us": 180.5, "p99_us": 300.0, "p999_us": 300.0, "max_us": 301.0, "mean_us": 130.2,
            "request_bytes": 400, "reply_bytes": 300, "lines_suppressed": 2}),
        ),
        with(
            "stats",
            json!({"events": 1, "decode_errors": 0, "ring_buffer_full": 0, "connect_map_full": 0,
            "connection_map_full": 0, "read_failed": 0, "resp_gaps": 0, "resp_flow_map_full": 0, "resp_truncated": 0,
            "missed_runs": 0, "resp_unparsed_bytes": 0, "resp_desyncs": 0, "resp_unmatched_replies": 0, "tls_connections": 2, "tls_unresolved": 0, "lines_dropped": 7,
            "detector_untracked": 0,
            "kubernetes": {"state": "unavailable", "pods": 31, "redis_pods": 3, "services": 120,
                           "node_zone": "us-east-1a", "last_error": "pods on this node: tcp connect error",
                           "not_kept": 0}}),
        ),
        // Named by the Kubernetes API: the client pod, and a Redis pod or Service.
        with(
            "request",
            json!({"role": "client", "command": "GET", "outcome": "ok", "latency_us": 212.0,
            "request_bytes": 20, "reply_bytes": 9, "depth": 1, "cgroup_id": 4242, "cgroup": "/x",
            "pod_uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "namespace": "shop", "pod": "api-7d9f8b6c5d-x2x9q",
            "workload": "deployment/api", "labels": {"app": "api", "team": "core"},
            "src": {"ip": "10.0.1.5", "port": 46742},
            "dst": {"ip": "10.0.33.7", "port": 6379, "namespace": "cache", "pod": "redis-0",
                    "workload": "statefulset/redis", "labels": {"app": "redis"}}}),
        ),
        with(
            "connect",
            json!({"outcome": "established", "answer": "syn_ack", "handshake_us": 166, "syn_retransmits": 0,
            "path_drop_suspected": false,
            "src": {"ip": "10.0.1.5", "port": 46742, "pid": 8496, "tid": 8497, "comm": "java", "cgroup_id": 4242,
                    "pod_uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "namespace": "shop", "pod": "api-1", "workload": "deployment/api"},
            "dst": {"ip": "172.20.14.9", "port": 6379, "namespace": "cache", "service": "redis"}}),
        ),
        with(
            "alert",
            json!({"kind": "connect_storm", "id": "connect_storm/10.2.0.9:6379", "state": "firing", "severity": "warning",
            "message": "pod 1b4e28ba… opens 250 connections/s to 10.2.0.9:6379 (baseline 2/s)",
            "endpoint": {"ip": "10.2.0.9", "port": 6379, "zone": "us-east-1b", "locality": "cross_zone"},
            "workloads": [{"key": "pod:1b4e28ba-2fa1-11d2-883f-0016d3cca427", "pod_uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                           "container_id": "0123abcd", "cgroup": "/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/0123abcd",
                           "comm": "java"}, {"key": "comm:redis-cli", "comm": "redis-cli"}],
            "started": "2026-11-25T17:17:01.000000Z",
            "evidence": {"connects_per_s": 250.0, "baseline_per_s": 2, "window": "10s", "fleet_reconnect": false,
                         "workload_rates_per_s": {"pod:1b4e28ba-2fa1-11d2-883f-0016d3cca427": 250.0}}}),
        ),
        with(
            "alert",
            json!({"kind": "syn_drops", "id": "syn_drops/10.2.0.9:6379", "state": "resolved", "severity": "critical",
            "message": "SYNs answered again", "workloads": [], "started": "2026-11-25T17:17:01.000000Z",
            "ended": "2026-11-25T17:18:01.000000Z", "duration_s": 60.0, "evidence": {}}),
        ),
    ]
}

fn assert_valid(event: &Value) {
    if let Err(why) = check_line(&event.to_string()) {
        panic!("{why}");
    }
}

/// `event` with `path` (a JSON pointer to an object) given `field: value`.
fn changed(event: &Value, path: &str, field: &str, value: Value) -> Value {
    let mut event = event.clone();
    event
        .pointer_mut(path)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("no object at {path}"))
        .insert(field.into(), value);
    event
}

fn sample(kind: &str) -> Value {
    samples().into_iter().find(|e| e["type"] == kind).unwrap()
}

#[test]
fn the_schema_is_a_valid_2020_12_schema() {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    jsonschema::meta::validate(&schema).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let _ = validator();
}

#[test]
fn a_sample_of_every_event_type_is_valid() {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let types = schema["properties"]["type"]["enum"].as_array().unwrap();
    let samples = samples();
    for kind in types {
        assert!(
            samples.iter().any(|e| &e["type"] == kind),
            "no sample of {kind}"
        );
    }
    samples.iter().for_each(assert_valid);
}

#[test]
fn wrong_lines_fail() {
    let connect = sample("connect");
    let wrong = [
        ("not JSON", None, "not JSON"),
        ("{\"type\":\"connect\"", None, "not JSON"),
        (
            "unknown field",
            Some(changed(&connect, "", "colour", json!("blue"))),
            "colour",
        ),
        (
            "unknown nested field",
            Some(changed(&connect, "/dst", "rack", json!("a"))),
            "rack",
        ),
        (
            "wrong type",
            Some(changed(&connect, "", "syn_retransmits", json!("1"))),
            "/syn_retransmits",
        ),
        (
            "negative count",
            Some(changed(&connect, "", "syn_retransmits", json!(-1))),
            "minimum",
        ),
        (
            "unknown type",
            Some(changed(&connect, "", "type", json!("connected"))),
            "/type",
        ),
        (
            "unknown outcome",
            Some(changed(&connect, "", "outcome", json!("ok"))),
            "/outcome",
        ),
        (
            "wrong schema version",
            Some(changed(&connect, "", "schema_version", json!(2))),
            "/schema_version",
        ),
        (
            "empty node",
            Some(changed(&connect, "", "node", json!(""))),
            "/node",
        ),
        (
            "ts without microseconds",
            Some(changed(&connect, "", "ts", json!("2026-11-25T17:17:06Z"))),
            "/ts",
        ),
        (
            "workload without its kind",
            Some(changed(&connect, "/src", "workload", json!("api"))),
            "/src/workload",
        ),
        (
            "unknown kubernetes state",
            Some(changed(
                &sample("stats"),
                "/kubernetes",
                "state",
                json!("up"),
            )),
            "/kubernetes/state",
        ),
        (
            "not an IP",
            Some(changed(&connect, "/dst", "ip", json!("redis.local"))),
            "/dst/ip",
        ),
        (
            "IPv4-mapped IPv6",
            Some(changed(&connect, "/dst", "ip", json!("::ffff:10.2.0.9"))),
            "/dst/ip",
        ),
        (
            "failure time on an established connect",
            Some(changed(&connect, "", "failed_after_us", json!(3))),
            "failed_after_us",
        ),
        (
            "alert evidence nested",
            Some(changed(
                &sample("alert"),
                "/evidence",
                "pods",
                json!({"a": {"b": 1}}),
            )),
            "/evidence/pods",
        ),
        (
            "alert state",
            Some(changed(&sample("alert"), "", "state", json!("pending"))),
            "/state",
        ),
        (
            "two-line message",
            Some(changed(&sample("alert"), "", "message", json!("a\nb"))),
            "/message",
        ),
        (
            "unknown workload field",
            Some(changed(
                &sample("alert"),
                "/workloads/0",
                "pod_name",
                json!("x"),
            )),
            "pod_name",
        ),
        (
            "stats without lines_dropped",
            {
                let mut stats = sample("stats");
                stats.as_object_mut().unwrap().remove("lines_dropped");
                Some(stats)
            },
            "lines_dropped",
        ),
        (
            "missing node",
            {
                let mut event = sample("latency");
                event.as_object_mut().unwrap().remove("node");
                Some(event)
            },
            "\"node\" is a required property",
        ),
    ];
    for (what, event, reason) in wrong {
        let line = event.map_or(what.to_string(), |e| e.to_string());
        let Err(why) = check_line(&line) else {
            panic!("{what} accepted: {line}");
        };
        assert!(why.contains(reason), "{what}: `{reason}` not in: {why}");
    }
}

/// Every object in the schema rejects unknown fields, but the maps whose
/// keys are data: `latency.errors`, `alert.evidence` and pods' `labels`.
#[test]
fn every_object_is_closed() {
    fn walk(node: &Value, path: &str, open: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                let is_object = map.get("type") == Some(&json!("object"));
                if is_object && map.get("additionalProperties") != Some(&json!(false)) {
                    open.push(path.to_string());
                }
                for (key, child) in map {
                    walk(child, &format!("{path}/{key}"), open);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, &format!("{path}/{i}"), open);
                }
            }
            _ => {}
        }
    }
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let mut open = Vec::new();
    walk(&schema, "", &mut open);
    open.sort();
    // The root dispatches on `type` to per-type schemas, which are closed.
    assert_eq!(
        open,
        [
            "",
            "/$defs/alert/properties/evidence",
            "/$defs/alert/properties/evidence/additionalProperties/anyOf/1",
            "/$defs/k8s_labels",
            "/$defs/latency/properties/errors"
        ]
    );
}

/// Every event type and field of the schema is explained in docs/events.md.
#[test]
fn every_field_is_documented() {
    let docs = include_str!("../docs/events.md");
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let mut missing = Vec::new();
    for (name, definition) in schema["$defs"].as_object().unwrap() {
        let Some(properties) = definition["properties"].as_object() else {
            continue;
        };
        for field in properties.keys() {
            if !docs.contains(&format!("`{field}`")) && !docs.contains(&format!(".{field}`")) {
                missing.push(format!("{name}.{field}"));
            }
        }
        if definition["properties"]["type"]["const"].is_string()
            && !docs.contains(&format!("## `{name}`"))
        {
            missing.push(format!("section for {name}"));
        }
    }
    assert!(missing.is_empty(), "not in docs/events.md: {missing:?}");
}
