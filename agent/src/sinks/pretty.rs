//! `--format pretty`: one aligned line per event for a human at a terminal,
//! rendered from the same JSON object as `--format json` so that both show
//! the same fields.
//!
//! `17:17:06.967 connect           outcome=established handshake_us=166 … src=127.0.0.1:46742 redis-cli[8496] dst=127.0.0.1:6379`

use std::io::{self, Write};

use serde_json::{Map, Value};

/// Width of the type column: the longest type, `synack_retransmit`.
const TYPE_WIDTH: usize = 17;

/// Fields every line has, shown once at start (`ts`, `type`) or not at all.
const HEADER_FIELDS: [&str; 4] = ["ts", "type", "node", "schema_version"];

const RESET: &str = "\x1b[0m";
const DIM: &str = "\x1b[2m";
const BOLD_RED: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[33m";
const GREEN: &str = "\x1b[32m";
const CYAN: &str = "\x1b[36m";

/// Writes `event` (a JSON object) as one line, with ANSI colours if `colour`.
pub fn write_line(out: &mut impl Write, event: &Value, colour: bool) -> io::Result<()> {
    let Some(fields) = event.as_object() else {
        return writeln!(out, "{event}");
    };
    let ts = fields.get("ts").and_then(Value::as_str).unwrap_or("");
    // `2026-11-25T17:17:06.967463Z` → `17:17:06.967`.
    let time = ts.get(11..23).unwrap_or(ts);
    let kind = fields.get("type").and_then(Value::as_str).unwrap_or("?");
    let style = colour.then(|| style(kind, fields)).flatten();
    let (on, off) = style.map_or(("", ""), |s| (s, RESET));
    write!(out, "{time} {on}{kind:<TYPE_WIDTH$}{off}")?;
    for (key, value) in fields {
        if HEADER_FIELDS.contains(&key.as_str()) {
            continue;
        }
        write!(out, " ")?;
        write_field(out, key, value)?;
    }
    writeln!(out)
}

/// What stands out: firing alerts, failures, the agent's own lines dimmed.
fn style(kind: &str, fields: &Map<String, Value>) -> Option<&'static str> {
    let field = |name: &str| fields.get(name).and_then(Value::as_str);
    match kind {
        "alert" if field("state") == Some("resolved") => Some(GREEN),
        "alert" => Some(BOLD_RED),
        "connect" if field("outcome") != Some("established") => Some(YELLOW),
        "request" if field("outcome") != Some("ok") && field("outcome") != Some("nil") => {
            Some(YELLOW)
        }
        "latency" => Some(CYAN),
        "started" | "stats" | "connections" => Some(DIM),
        _ => None,
    }
}

fn write_field(out: &mut impl Write, key: &str, value: &Value) -> io::Result<()> {
    match value {
        Value::Object(object) if is_endpoint(object) => {
            write!(out, "{key}=")?;
            write_endpoint(out, object)
        }
        Value::Object(object) => {
            let mut first = true;
            for (sub, value) in object {
                if !std::mem::take(&mut first) {
                    write!(out, " ")?;
                }
                write_field(out, &format!("{key}.{sub}"), value)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            write!(out, "{key}=")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    write!(out, ",")?;
                }
                match item {
                    // Workloads and the like: their identity is enough here.
                    Value::Object(object) => match object.get("key") {
                        Some(key) => write_scalar(out, key)?,
                        None => write!(out, "{item}")?,
                    },
                    _ => write_scalar(out, item)?,
                }
            }
            Ok(())
        }
        _ => {
            write!(out, "{key}=")?;
            write_scalar(out, value)
        }
    }
}

fn write_scalar(out: &mut impl Write, value: &Value) -> io::Result<()> {
    match value {
        Value::String(text) if text.is_empty() || text.contains(char::is_whitespace) => {
            write!(out, "{value}")
        }
        Value::String(text) => write!(out, "{text}"),
        other => write!(out, "{other}"),
    }
}

fn is_endpoint(object: &Map<String, Value>) -> bool {
    object.get("ip").is_some_and(Value::is_string) && object.get("port").is_some()
}

/// `10.0.1.5:40312 java[812] cgroup=/kubepods/…`, `[2001:db8::9]:6379`.
fn write_endpoint(out: &mut impl Write, endpoint: &Map<String, Value>) -> io::Result<()> {
    let ip = endpoint["ip"].as_str().unwrap_or("");
    let port = &endpoint["port"];
    if ip.contains(':') {
        write!(out, "[{ip}]:{port}")?;
    } else {
        write!(out, "{ip}:{port}")?;
    }
    if let (Some(comm), Some(pid)) = (endpoint.get("comm"), endpoint.get("pid")) {
        write!(out, " ")?;
        write_scalar(out, comm)?;
        write!(out, "[{pid}]")?;
    }
    for (key, value) in endpoint {
        if !matches!(
            key.as_str(),
            "ip" | "port" | "comm" | "pid" | "tid" | "cgroup_id"
        ) {
            write!(out, " ")?;
            write_field(out, key, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(event: Value, colour: bool) -> String {
        let mut out = Vec::new();
        write_line(&mut out, &event, colour).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_connect_line_reads_left_to_right() {
        let line = render(
            serde_json::json!({
                "ts": "2026-11-25T17:17:06.967463Z", "type": "connect", "node": "n1",
                "schema_version": 1, "outcome": "established", "handshake_us": 166,
                "src": {"ip": "127.0.0.1", "port": 46742, "pid": 8496, "tid": 8496,
                        "comm": "redis-cli", "cgroup_id": 1},
                "dst": {"ip": "::1", "port": 6379},
            }),
            false,
        );
        assert_eq!(
            line,
            "17:17:06.967 connect           outcome=established handshake_us=166 \
             src=127.0.0.1:46742 redis-cli[8496] dst=[::1]:6379\n"
        );
    }

    #[test]
    fn nested_objects_lists_and_messages() {
        let line = render(
            serde_json::json!({
                "ts": "2026-11-25T17:17:06.967463Z", "type": "alert", "state": "firing",
                "message": "connect storm: 250/s", "errors": {"MOVED": 3},
                "workloads": [{"key": "pod:1"}, {"key": "comm:java"}], "ports": [6379, 6380],
            }),
            true,
        );
        assert!(
            line.starts_with(&format!("17:17:06.967 {BOLD_RED}alert")),
            "{line}"
        );
        assert!(line.contains(&format!("{RESET} state=firing")), "{line}");
        assert!(line.contains(" message=\"connect storm: 250/s\""), "{line}");
        assert!(line.contains(" errors.MOVED=3"), "{line}");
        assert!(line.contains(" workloads=pod:1,comm:java"), "{line}");
        assert!(line.ends_with(" ports=6379,6380\n"), "{line}");
    }

    #[test]
    fn no_colour_codes_unless_asked() {
        let line = render(serde_json::json!({"ts": "x", "type": "alert"}), false);
        assert!(!line.contains('\x1b'), "{line:?}");
    }
}
