//! Redis over TLS (`redis-server --tls-port`, a certificate the test makes):
//! what the agent tells of encrypted connections, held against the clients'
//! own counts and timings and the server's `INFO commandstats` (asked on
//! its cleartext port, which the agent does not watch).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path as FilePath, PathBuf},
    time::Duration,
};

use anyhow::ensure;
use lab::{
    Agent, Fault, Lab, Path, Place, TlsCert, Workload,
    clients::{Benchmark, count_delta},
    event_timeout, free_port, request_lines, serial,
};
use serde_json::Value;

/// One TLS Redis server of the test and the client that talks to it.
struct Endpoint {
    client: &'static str,
    tls: SocketAddr,
    plain: SocketAddr,
}

/// Turns of clients that wait for each reply: one per command, except
/// redis-benchmark's two `CONFIG GET`s, written together before it starts.
fn turns(calls: &BTreeMap<String, u64>) -> u64 {
    let config_gets = calls.get("CONFIG GET").copied().unwrap_or(0);
    calls.values().sum::<u64>() - config_gets.saturating_sub(1)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Calls of each command the server counted while `run` ran, named as the
/// agent names them, less the `INFO` of the first count, which went to the
/// cleartext port.
fn server_calls<T>(
    place: Place<'_>,
    plain: SocketAddr,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, BTreeMap<String, u64>)> {
    let before = place.server_command_counts(plain)?;
    let result = run()?;
    let after = place.server_command_counts(plain)?;
    let mut calls: BTreeMap<String, u64> = count_delta(&before, &after)
        .into_iter()
        .map(|(name, n)| (name.replace('|', " ").to_ascii_uppercase(), n))
        .collect();
    if let Some(info) = calls.get_mut("INFO") {
        *info -= 1;
    }
    calls.retain(|_, n| *n > 0);
    Ok((result, calls))
}

/// Without the TLS library's plaintext (`--no-tls-uprobes`), each request
/// and its answer is a turn on the wire: with clients that wait for each
/// reply, the agent's `tls` request lines equal the commands the server ran,
/// in both roles, no `unparsed` byte is counted, and a turn's latency across
/// a 5 ms delay line agrees with the client's own timing of the command.
#[test]
fn tls_turns_are_counted_and_timed_without_plaintext() -> anyhow::Result<()> {
    trace_tls_clients(false)
}

/// With OpenSSL probed (the default), the clients that use the system's
/// libssl (redis-cli, redis-benchmark, redis-py) have every command named
/// and counted exactly in role `client`, timed like the client times it;
/// ioredis (Node's own OpenSSL, over memory BIOs) and the server's side stay
/// exact turns. No syscall tracepoint is attached for it.
#[test]
fn tls_commands_are_named_from_the_clients_openssl() -> anyhow::Result<()> {
    trace_tls_clients(true)
}

fn trace_tls_clients(uprobes: bool) -> anyhow::Result<()> {
    let _serial = serial();
    let lab = Lab::builder()
        .host("client", 'a')
        .host("redis", 'b')
        .build()?;
    let (client, redis) = (lab.host("client"), lab.host("redis"));
    let (pod, server) = (Place::Host(client), Place::Host(redis));
    let cert = TlsCert::new(redis.ip().into())?;
    let endpoints: Vec<Endpoint> = ["redis-cli", "redis-benchmark", "redis-py", "ioredis"]
        .into_iter()
        .map(|name| Endpoint {
            client: name,
            tls: SocketAddr::from((redis.ip(), free_port())),
            plain: SocketAddr::from((redis.ip(), free_port())),
        })
        .collect();
    let mut servers = Vec::new();
    for endpoint in &endpoints {
        let args = cert.server_args(endpoint.tls.port());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        servers.push(redis.start_redis_with(endpoint.plain.port(), &args)?);
    }
    let delay = Duration::from_millis(5);
    let mut faults = Vec::new();
    for endpoint in &endpoints {
        faults.push(lab.inject(
            Path::between(client.ip(), redis.ip(), endpoint.tls.port()),
            Fault::delay(delay),
        )?);
    }
    let ports: Vec<u16> = endpoints.iter().map(|e| e.tls.port()).collect();
    let mut args = vec!["--emit", "all", "--interval", "10m"];
    if !uprobes {
        args.push("--no-tls-uprobes");
    }
    let mut agent = Agent::start(&ports, &args)?;

    let mut expected: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut client_latencies = BTreeMap::new();
    for endpoint in &endpoints {
        let (ip, port) = (endpoint.tls.ip(), endpoint.tls.port());
        let workload = Workload::new(ip, port)
            .commands(&["GET", "SET", "INCR", "PING"])
            .tls(&cert.ca());
        let calls = match endpoint.client {
            "redis-cli" => {
                let w = workload.connections(2).requests(40);
                server_calls(server, endpoint.plain, || pod.redis_cli(&w))?.1
            }
            "redis-benchmark" => {
                let b = Benchmark::new(ip, port, 200).clients(4).tls(&cert.ca());
                server_calls(server, endpoint.plain, || pod.redis_benchmark(&b))?.1
            }
            "redis-py" | "ioredis" => {
                let w = workload.connections(2).requests(60);
                let (result, calls) = server_calls(server, endpoint.plain, || {
                    if endpoint.client == "redis-py" {
                        pod.redis_py(&w)
                    } else {
                        pod.ioredis(&w)
                    }
                })?;
                ensure!(
                    result.total() == calls.values().sum::<u64>(),
                    "{}: the client sent {:?}, the server ran {calls:?}",
                    endpoint.client,
                    result.counts
                );
                let all: Vec<f64> = result
                    .latencies_us
                    .values()
                    .flatten()
                    .map(|&us| us as f64)
                    .collect();
                client_latencies.insert(endpoint.client, median(all));
                calls
            }
            other => unreachable!("{other}"),
        };
        eprintln!("{}: the server ran {calls:?} over TLS", endpoint.client);
        expected.insert(endpoint.client, calls);
    }

    let mut events = Vec::new();
    let covered = |events: &[Value]| {
        endpoints.iter().all(|endpoint| {
            ["client", "server"].iter().all(|role| {
                request_lines(events, endpoint.tls, role).len() as u64
                    >= turns(&expected[endpoint.client])
            })
        })
    };
    let deadline = std::time::Instant::now() + event_timeout();
    while !covered(&events) && std::time::Instant::now() < deadline {
        match agent.wait_for(Duration::from_millis(250), |_| true) {
            Ok(event) => events.push(event),
            Err(e) if e.to_string().starts_with("no matching event") => {}
            Err(e) => return Err(e),
        }
    }
    // Held while the commands were named: no syscall tracepoint, which would
    // put every syscall of every process on the node on the kernel's slow
    // path.
    let tracepoints = lab::kernel::tracepoints_held_by(agent.pid())?;
    events.extend(agent.stop()?);

    let mut failures = Vec::new();
    // From 6.6 a link's fdinfo names its tracepoint: the agent's own
    // `tcp_rcv_space_adjust` shows the list is real.
    let listed = tracepoints.iter().any(|tp| tp == "tcp_rcv_space_adjust");
    if uprobes && listed && tracepoints.iter().any(|tp| tp.starts_with("sys_")) {
        failures.push(format!(
            "syscall tracepoints held while naming TLS commands: {tracepoints:?}"
        ));
    }
    if uprobes && !listed && lab::kernel::release()? >= (6, 6) {
        failures.push(format!(
            "the agent's tracepoints not listed: {tracepoints:?}"
        ));
    }
    for endpoint in &endpoints {
        let named_by_client = uprobes && endpoint.client != "ioredis";
        for role in ["client", "server"] {
            let lines = request_lines(&events, endpoint.tls, role);
            let mut seen: BTreeMap<String, u64> = BTreeMap::new();
            for line in &lines {
                if line["tls"] != true || !(line["outcome"] == "ok" || line["outcome"] == "nil") {
                    failures.push(format!("{} role {role}: {line}", endpoint.client));
                }
                let name = line["command"].as_str().unwrap_or("?").to_string();
                *seen.entry(name).or_default() += 1;
            }
            eprintln!("{} role {role}: {seen:?}", endpoint.client);
            let want = if named_by_client && role == "client" {
                expected[endpoint.client].clone()
            } else {
                BTreeMap::from([("tls".to_string(), turns(&expected[endpoint.client]))])
            };
            if seen != want {
                failures.push(format!(
                    "{} role {role}: the agent's lines {seen:?}, expected {want:?}",
                    endpoint.client
                ));
            }
        }
        if let Some(&client_us) = client_latencies.get(endpoint.client) {
            let agent_us = median(
                request_lines(&events, endpoint.tls, "client")
                    .iter()
                    .filter_map(|e| e["latency_us"].as_f64())
                    .collect(),
            );
            eprintln!(
                "{}: median agent latency {agent_us:.0} µs, client {client_us:.0} µs",
                endpoint.client
            );
            // The client's clock also runs while it encrypts, decrypts and
            // schedules: the agent's time is at most the client's, and close.
            if !(agent_us <= client_us * 1.02 && agent_us >= client_us * 0.85) {
                failures.push(format!(
                    "{}: median agent latency {agent_us:.0} µs vs the client's {client_us:.0} µs",
                    endpoint.client
                ));
            }
        }
    }
    let stats = events
        .iter()
        .rev()
        .find(|e| e["type"] == "stats")
        .cloned()
        .unwrap_or_default();
    eprintln!("agent stats: {stats}");
    if stats["resp_unparsed_bytes"] != 0 || stats["resp_desyncs"] != 0 {
        failures.push(format!("ciphertext was parsed as RESP: {stats}"));
    }
    if stats["tls_connections"].as_u64().unwrap_or(0) == 0 {
        failures.push(format!("no connection was found carrying TLS: {stats}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(faults);
    Ok(())
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client with a libssl of its own (as a container has): the agent probes
/// that file when the client connects to a watched port — its requests then
/// come named — and detaches it once the client has exited, as the kernel's
/// fdinfo of the agent's links shows.
#[test]
fn a_private_libssl_is_probed_while_its_client_lives() -> anyhow::Result<()> {
    let (cert, tls_port, _server) = local_tls_server()?;
    let private = std::env::temp_dir().join(format!("resptrace-libssl-{}", std::process::id()));
    std::fs::create_dir_all(&private)?;
    let _cleanup = RemoveDir(private.clone());
    for library in ["libssl.so.3", "libcrypto.so.3"] {
        std::fs::copy(
            FilePath::new("/usr/lib/x86_64-linux-gnu").join(library),
            private.join(library),
        )?;
    }
    let marker = private.display().to_string();
    let mut agent = Agent::start(&[tls_port], &["--emit", "all", "--interval", "500ms"])?;
    let pid = agent.pid();
    let probes_on = |part: &str| -> anyhow::Result<usize> {
        let files = lab::kernel::uprobe_files_held_by(pid)?;
        Ok(files.iter().filter(|file| file.contains(part)).count())
    };
    ensure!(
        probes_on(&marker)? == 0,
        "probes on {marker} before any client"
    );

    // Three PINGs a second apart: the first connect gets the library probed.
    let mut client = pings(std::process::Command::new("redis-cli"), &cert, tls_port, 3)
        .env("LD_LIBRARY_PATH", &private)
        .spawn()?;
    let attached = lab::wait_until(lab::scaled(Duration::from_secs(10)), || {
        probes_on(&marker).is_ok_and(|n| n > 0)
    });
    let named = agent.wait_for(event_timeout(), a_named_tls_ping);
    ensure!(client.wait()?.success(), "redis-cli failed");
    ensure!(attached, "no probe on {marker} while its client ran");
    named?;
    eprintln!("attached to the private copy, and a PING named from it");
    let detached = lab::wait_until(lab::scaled(Duration::from_secs(10)), || {
        probes_on(&marker).is_ok_and(|n| n == 0)
    });
    ensure!(
        detached,
        "{} probes left on {marker} after its client exited",
        probes_on(&marker)?
    );
    agent.stop()?;
    Ok(())
}

/// Debian 13's OpenSSL 3.5 (from `cargo xtask setup`, run under its own
/// loader as in a container) writes through `SSL_write_ex2`: its client's
/// commands are named from the plaintext, and while it runs its library
/// carries exactly one entry and one return probe per direction, none on
/// a public call's entry (those begin with an instruction the kernel
/// single-steps; docs/design.md), and the handshake's pair on
/// `SSL_do_handshake` (once per connection). Public entries from binutils.
#[test]
fn openssl_3_5_is_probed_at_its_internal_calls() -> anyhow::Result<()> {
    let libs = lab::clients::openssl_3_5_libs()?;
    let public = public_entries(&libs.join("libssl.so.3"))?;
    ensure!(
        public.len() == 6,
        "SSL_write/read(_ex), SSL_write_ex2 and SSL_do_handshake not all in {}: {public:?}",
        libs.display()
    );
    let handshake = public["SSL_do_handshake"];
    let (cert, tls_port, _server) = local_tls_server()?;
    let mut agent = Agent::start(&[tls_port], &["--emit", "all", "--interval", "500ms"])?;
    let pid = agent.pid();
    let marker = libs.display().to_string();
    let probes_on_libssl = || -> Vec<lab::kernel::Uprobe> {
        lab::kernel::uprobes_held_by(pid)
            .unwrap_or_default()
            .into_iter()
            .filter(|probe| probe.file.contains(&marker) && probe.file.ends_with("libssl.so.3"))
            .collect()
    };

    // PINGs a second apart: the first connect gets the library probed.
    let redis_cli = which("redis-cli")?;
    let mut loader = std::process::Command::new(libs.join("ld-linux-x86-64.so.2"));
    loader
        .arg("--library-path")
        .arg(format!("{}:/lib/x86_64-linux-gnu", libs.display()))
        .arg(&redis_cli);
    let mut client = pings(loader, &cert, tls_port, 4).spawn()?;
    let placed = lab::wait_until(lab::scaled(Duration::from_secs(10)), || {
        probes_on_libssl().len() == 6
    });
    let probes = probes_on_libssl();
    let named = agent.wait_for(event_timeout(), |e| {
        a_named_tls_ping(e) && e["outcome"] == "ok"
    });
    ensure!(client.wait()?.success(), "redis-cli failed");
    ensure!(placed, "not 6 probes on {marker}'s libssl: {probes:?}");
    let (on_handshake, calls): (Vec<_>, Vec<_>) =
        probes.iter().partition(|probe| probe.offset == handshake);
    ensure!(
        on_handshake.len() == 2 && on_handshake.iter().filter(|probe| probe.ret).count() == 1,
        "not an entry and a return probe on SSL_do_handshake: {probes:?}"
    );
    let on_public: Vec<_> = calls
        .iter()
        .filter(|probe| public.values().any(|&entry| entry == probe.offset))
        .collect();
    ensure!(
        on_public.is_empty(),
        "probes on public entries {on_public:?} (public: {public:?})"
    );
    let returns = calls.iter().filter(|probe| probe.ret).count();
    ensure!(returns == 2, "{returns} return probes of 4: {calls:?}");
    named?;
    agent.stop()?;
    Ok(())
}

/// A TLS-only redis-server on 127.0.0.1: its certificate, port and guard.
fn local_tls_server() -> anyhow::Result<(TlsCert, u16, lab::RedisServer)> {
    let cert = TlsCert::new(std::net::Ipv4Addr::LOCALHOST.into())?;
    let tls_port = free_port();
    let args = cert.server_args(tls_port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = lab::RedisServer::start_with(&args)?;
    Ok((cert, tls_port, server))
}

/// `redis_cli` (a redis-cli command line so far) sending `count` PINGs a
/// second apart over TLS to `port`: the first connect gets the client's
/// library probed, the later PINGs come named.
fn pings(
    mut redis_cli: std::process::Command,
    cert: &TlsCert,
    port: u16,
    count: u32,
) -> std::process::Command {
    redis_cli
        .args(["-p", &port.to_string(), "--tls", "--cacert"])
        .arg(cert.ca())
        .args(["-r", &count.to_string(), "-i", "1", "PING"])
        .stdout(std::process::Stdio::null());
    redis_cli
}

/// A client's PING named from a TLS connection's plaintext.
fn a_named_tls_ping(e: &Value) -> bool {
    e["type"] == "request" && e["role"] == "client" && e["command"] == "PING" && e["tls"] == true
}

/// File offsets of the public write, read and handshake calls of a libssl:
/// `objdump -T` addresses, less `.text`'s address-to-offset difference
/// (`readelf`).
fn public_entries(libssl: &FilePath) -> anyhow::Result<BTreeMap<String, u64>> {
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let sections = std::process::Command::new("readelf")
        .args(["-SW"])
        .arg(libssl)
        .output()?;
    let sections = String::from_utf8_lossy(&sections.stdout);
    // `[Nr] Name Type Address Off Size ...` (the `[ N]` may hold a space).
    let text = sections
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(']').nth(1)?.split_whitespace().collect();
            (fields.first() == Some(&".text")).then(|| Some((hex(fields[2])?, hex(fields[3])?)))?
        })
        .ok_or_else(|| anyhow::anyhow!("no .text in readelf -SW {}", libssl.display()))?;
    let symbols = std::process::Command::new("objdump")
        .arg("-T")
        .arg(libssl)
        .output()?;
    let wanted = [
        "SSL_write",
        "SSL_read",
        "SSL_write_ex",
        "SSL_read_ex",
        "SSL_write_ex2",
        "SSL_do_handshake",
    ];
    Ok(String::from_utf8_lossy(&symbols.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = *fields.last()?;
            let address = hex(fields.first()?)?;
            (wanted.contains(&name) && fields.contains(&".text"))
                .then(|| (name.to_string(), address - text.0 + text.1))
        })
        .collect())
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.exists())
        .ok_or_else(|| anyhow::anyhow!("{program} not on PATH"))
}
