//! The client drivers of `lab::clients` against a real redis-server, without
//! the agent: what each client says it sent equals what the server counted
//! (`INFO commandstats`), and the cluster helper gives real `MOVED` and
//! `CLUSTERDOWN` errors.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lab::{
    Cluster, Lab, Place, RedisServer, Workload,
    clients::{self, Benchmark, ClientResult, count_delta},
    cluster::key_in_slots,
};

const DEBUG: &[&str] = &["--enable-debug-command", "yes"];

fn local(server: &RedisServer) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, server.port).into()
}

/// Server-side growth of `addr`'s command counts while `run` ran, without
/// the commands of the stats queries and client handshakes.
fn server_delta<T>(
    place: Place<'_>,
    addr: SocketAddr,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, BTreeMap<String, u64>)> {
    place.reset_stats(addr)?;
    let before = place.server_command_counts(addr)?;
    let result = run()?;
    let after = place.server_command_counts(addr)?;
    let mut delta = count_delta(&before, &after);
    delta.retain(|name, _| {
        !(name == "INFO"
            || name == "HELLO"
            || name.starts_with("CONFIG|")
            || name.starts_with("CLIENT|")
            || name.starts_with("COMMAND|"))
    });
    Ok((result, delta))
}

/// A mixed workload whose raw prefix makes one WRONGTYPE per connection.
fn mixed(addr: SocketAddr, pipeline: usize) -> Workload {
    Workload::new(addr.ip(), addr.port())
        .connections(3)
        .requests(40)
        .pipeline(pipeline)
        .commands(&["GET", "SET", "INCR", "HGETALL", "LPUSH"])
        .raw(&["SET", "wrong", "x"])
        .raw(&["LPUSH", "wrong", "y"])
}

fn assert_matches_server(
    name: &str,
    workload: &Workload,
    result: &ClientResult,
    server: &BTreeMap<String, u64>,
) {
    eprintln!(
        "{name}: {:?} in {} µs; errors {:?}; median GET {:?} µs",
        result.counts,
        result.total_us,
        result.errors,
        result.median_us("GET")
    );
    assert_eq!(
        result.counts,
        workload.expected_counts(),
        "{name}: client counts"
    );
    assert_eq!(
        &result.counts, server,
        "{name}: client counts vs server commandstats"
    );
    assert_eq!(
        result.errors,
        BTreeMap::from([("WRONGTYPE".to_string(), workload.connections as u64)]),
        "{name}: errors"
    );
    assert_eq!(result.timeouts, 0, "{name}: timeouts");
}

fn assert_latencies(name: &str, result: &ClientResult) {
    for (command, &n) in &result.counts {
        let latencies = &result.latencies_us[command];
        assert_eq!(
            latencies.len() as u64,
            n,
            "{name}: one latency per {command}"
        );
        assert!(
            latencies.iter().all(|&us| us > 0),
            "{name}: {command} {latencies:?}"
        );
    }
}

type Driver = fn(&Workload) -> anyhow::Result<ClientResult>;

const DRIVERS: [(&str, Driver); 3] = [
    ("redis-py", clients::redis_py),
    ("ioredis", clients::ioredis),
    ("redis crate", clients::redis_crate),
];

#[test]
fn client_counts_equal_server_commandstats() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let addr = local(&server);
    for (name, driver) in DRIVERS {
        for pipeline in [1, 4] {
            let workload = mixed(addr, pipeline);
            let (result, server) = server_delta(Place::Here, addr, || driver(&workload))?;
            let name = format!("{name}, pipeline {pipeline}");
            assert_matches_server(&name, &workload, &result, &server);
            assert_latencies(&name, &result);
        }
    }
    Ok(())
}

#[test]
fn redis_cli_counts_equal_server_commandstats() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let addr = local(&server);
    let workload = mixed(addr, 1).connections(2).requests(20);
    let (result, server) = server_delta(Place::Here, addr, || clients::redis_cli(&workload))?;
    assert_matches_server("redis-cli", &workload, &result, &server);
    Ok(())
}

#[test]
fn redis_benchmark_sends_what_it_is_told() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let addr = local(&server);
    for (requests, pipeline) in [(2000, 1), (1000, 16), (1001, 16)] {
        let benchmark =
            Benchmark::new(Ipv4Addr::LOCALHOST, server.port, requests).pipeline(pipeline);
        let (result, server) =
            server_delta(Place::Here, addr, || clients::redis_benchmark(&benchmark))?;
        eprintln!(
            "redis-benchmark -n {requests} -P {pipeline}: {:?}, {:?} req/s",
            result.counts, result.throughput
        );
        let expected = requests.div_ceil(pipeline) * pipeline;
        assert_eq!(
            result.counts,
            BTreeMap::from([("GET".into(), expected), ("SET".into(), expected)])
        );
        assert_eq!(result.counts, server, "-n {requests} -P {pipeline}");
        assert!(
            result.throughput.values().all(|&rps| rps > 0.0),
            "{result:?}"
        );
    }
    Ok(())
}

#[test]
fn timeouts_and_read_delays_are_the_clients_own() -> anyhow::Result<()> {
    let server = RedisServer::start_with(DEBUG)?;
    let addr = local(&server);
    for (name, driver) in DRIVERS {
        // DEBUG SLEEP 0.4 with a 150 ms timeout: the client gives up DEBUG
        // and the first PING on its new connection (the server still
        // sleeps), closes each time; the later PINGs are answered.
        let workload = Workload::new(addr.ip(), addr.port())
            .raw(&["DEBUG", "SLEEP", "0.4"])
            .requests(4)
            .timeout(Duration::from_millis(150));
        let (result, server) = server_delta(Place::Here, addr, || driver(&workload))?;
        eprintln!("{name}: {result:?}");
        assert_eq!(result.counts, workload.expected_counts(), "{name}");
        assert_eq!(result.counts, server, "{name}: vs server");
        assert!((2..=3).contains(&result.timeouts), "{name}: {result:?}");
        assert_eq!(
            result.latencies_us["PING"].len() as u64 + result.timeouts,
            5,
            "{name}: every command replied or timed out"
        );
        assert!(result.errors.is_empty(), "{name}: {result:?}");

        let delay = Duration::from_millis(30);
        let workload = Workload::new(addr.ip(), addr.port())
            .requests(6)
            .pipeline(2)
            .commands(&["SET", "GET"])
            .read_delay(delay);
        let result = driver(&workload)?;
        let fastest = result.latencies_us.values().flatten().min().copied();
        assert!(
            fastest >= Some(delay.as_micros() as u64),
            "{name}: read delay {delay:?}, latencies {:?}",
            result.latencies_us
        );
    }
    Ok(())
}

#[test]
fn cluster_answers_moved_for_the_other_nodes_slots() -> anyhow::Result<()> {
    let cluster = Cluster::start(DEBUG)?;
    let (first, second) = (cluster.node(0), cluster.node(1));
    let key = key_in_slots(second.slots.clone(), "k");
    let error = Place::Here
        .query::<Option<String>>(first.addr, redis::cmd("GET").arg(&key))
        .expect_err("GET of a key in the other node's slots");
    let error = error.downcast::<redis::RedisError>()?;
    assert_eq!(error.code(), Some("MOVED"), "{error}");
    let target = format!("{} {}", lab::cluster::key_slot(&key), second.addr);
    assert!(
        error.to_string().contains(&target),
        "{error}, expected {target}"
    );
    let ok = Place::Here.query::<Option<String>>(second.addr, redis::cmd("GET").arg(&key))?;
    assert_eq!(ok, None);

    // The drivers count it as a MOVED error reply.
    for (name, driver) in DRIVERS {
        let workload = Workload::new(first.addr.ip(), first.addr.port()).raw(&["GET", &key]);
        let (result, server) = server_delta(Place::Here, first.addr, || driver(&workload))?;
        assert_eq!(
            result.errors,
            BTreeMap::from([("MOVED".into(), 1)]),
            "{name}"
        );
        // A MOVED is a rejected call: in the server's count too.
        assert_eq!(result.counts, server, "{name}");
    }
    Ok(())
}

#[test]
fn a_cluster_with_missing_slots_is_down() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(Place::Here, &[0..=8191], &[])?;
    let node = cluster.node(0);
    assert!(cluster.info(node)?.contains("cluster_state:fail"));
    let key = key_in_slots(0..=8191, "k");
    let workload = Workload::new(node.addr.ip(), node.addr.port()).raw(&["GET", &key]);
    let result = clients::redis_py(&workload)?;
    assert_eq!(result.errors, BTreeMap::from([("CLUSTERDOWN".into(), 1)]));
    Ok(())
}

/// The drivers run inside a pod (its netns; processes also in its cgroup)
/// against a server in another lab host.
#[test]
fn drivers_run_inside_a_lab_pod() -> anyhow::Result<()> {
    let lab = Lab::builder()
        .pod("client", 'a')
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let _server = redis.start_redis(6379)?;
    let addr: SocketAddr = (redis.ip(), 6379).into();
    let workload = mixed(addr, 2).connections(2).requests(10);
    let pod = Place::Host(client);
    for name in ["redis-py", "ioredis", "redis crate", "redis-cli"] {
        let run = || match name {
            "redis-py" => pod.redis_py(&workload),
            "ioredis" => pod.ioredis(&workload),
            "redis crate" => pod.redis_crate(&workload),
            _ => pod.redis_cli(&workload.clone().pipeline(1)),
        };
        let (result, server) = server_delta(Place::Host(redis), addr, run)?;
        assert_matches_server(&format!("{name} in a pod"), &workload, &result, &server);
    }
    Ok(())
}
