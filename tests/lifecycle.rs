//! The agent's lifecycle as the kubelet drives it: SIGTERM mid-run flushes
//! the window in progress and the final counters, the agent exits well
//! within a pod's grace period, and it leaves nothing in the kernel.
//! Ground truth: the client's own request count and the kernel's lists of
//! BPF programs and maps (`bpftool`, `/proc/<pid>/fdinfo`).

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lab::{Agent, RedisServer, scaled, serial, wait_until};
use serde_json::Value;

/// The ids of the BPF programs and maps whose fds `pid` holds (links hold
/// their program's id too), from the kernel's fdinfo.
fn bpf_ids_held_by(pid: u32) -> anyhow::Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let (mut programs, mut maps) = (BTreeSet::new(), BTreeSet::new());
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        for line in info.lines() {
            let id = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|v| v.trim().parse().ok())
            };
            if let Some(id) = id("prog_id:") {
                programs.insert(id);
            }
            if let Some(id) = id("map_id:") {
                maps.insert(id);
            }
        }
    }
    Ok((programs, maps))
}

/// Ids in the kernel's list of `kind` (`prog` or `map`), from bpftool.
fn bpftool_ids(kind: &str) -> anyhow::Result<BTreeSet<u64>> {
    let output = Command::new("bpftool")
        .args(["-j", kind, "list"])
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    anyhow::ensure!(output.status.success(), "bpftool {kind} list: {output:?}");
    let list: Vec<Value> = serde_json::from_slice(&output.stdout)?;
    Ok(list
        .iter()
        .filter_map(|entry| entry["id"].as_u64())
        .collect())
}

#[test]
fn sigterm_flushes_the_last_window_and_leaves_no_bpf_object() -> anyhow::Result<()> {
    let _serial = serial();
    let redis = RedisServer::start()?;
    // No window ends on its own during the test: the one written is the
    // flush at exit.
    let mut agent = Agent::start(&[redis.port], &["--interval", "1h"])?;
    let (programs, maps) = bpf_ids_held_by(agent.pid())?;
    let loaded = bpftool_ids("prog")?;
    anyhow::ensure!(
        !programs.is_empty() && programs.is_subset(&loaded),
        "the agent's programs {programs:?} in the kernel's list {loaded:?}"
    );
    anyhow::ensure!(!maps.is_empty(), "the agent holds no map");

    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port))?;
    let mut connection = client.get_connection()?;
    let sent = 500u64;
    for _ in 0..sent {
        let _: i64 = redis::cmd("INCR").arg("lifecycle").query(&mut connection)?;
    }
    drop(connection);
    // Every request is answered, so its records are in the ring buffer;
    // the agent sees its own close before the signal.
    agent.barrier()?;

    let signalled = Instant::now();
    let events = agent.terminate()?;
    let exited_after = signalled.elapsed();
    assert!(
        exited_after < scaled(Duration::from_secs(5)),
        "exited {exited_after:?} after SIGTERM"
    );
    let counted: u64 = events
        .iter()
        .filter(|e| e["type"] == "latency" && e["role"] == "client" && e["op"] == "INCR")
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, sent, "the flushed window counts every INCR");
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some("stats".into()),
        "the final counters come last"
    );

    // Freed once the last reference goes (after an RCU grace period).
    let gone = wait_until(scaled(Duration::from_secs(5)), || {
        let programs_left = bpftool_ids("prog").map(|ids| ids.intersection(&programs).count());
        let maps_left = bpftool_ids("map").map(|ids| ids.intersection(&maps).count());
        matches!((programs_left, maps_left), (Ok(0), Ok(0)))
    });
    assert!(
        gone,
        "left in the kernel: programs {:?}, maps {:?}",
        bpftool_ids("prog")?
            .intersection(&programs)
            .collect::<Vec<_>>(),
        bpftool_ids("map")?.intersection(&maps).collect::<Vec<_>>()
    );
    Ok(())
}
