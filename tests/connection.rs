//! Established connections (`agent-ebpf/src/connection.rs`): who closed
//! first, lifetime, per-connection retransmits and resets, connections open
//! before the agent, open-connection gauges. Ground truth: what the test did
//! itself, the kernel's `TCP_INFO` for its own sockets, `ss` for the server's.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    time::{Duration, Instant},
};

use lab::{
    Agent, FirewallRule, LOSS_ALERTS, RedisServer, event_timeout, kernel::ConnectionRetransmits,
    kernel::ss_total_retransmits,
};
use serde_json::Value;

fn close_of(role: &'static str, client_port: u16) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["type"] == "close" && e["role"] == role && e["src"]["port"] == client_port
}

/// One RESP round trip: `PING` → `+PONG`.
fn ping(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply)?;
    anyhow::ensure!(&reply == b"+PONG\r\n", "unexpected reply {reply:?}");
    Ok(())
}

#[test]
fn client_closing_first_is_local_for_the_client_and_peer_for_the_server() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
    let opened = Instant::now();
    ping(&mut stream)?;
    let client_port = stream.local_addr()?.port();
    drop(stream);
    let held_open = opened.elapsed();

    let client = agent.wait_for(event_timeout(), close_of("client", client_port))?;
    let server = agent.wait_for(event_timeout(), close_of("server", client_port))?;
    assert_eq!(client["closed_by"], "local", "{client}");
    assert_eq!(server["closed_by"], "peer", "{server}");
    assert_eq!(client["src"]["pid"], std::process::id(), "{client}");
    assert_eq!(client["open_before_agent"], false);
    assert_eq!(client["retransmits"], 0);
    assert_eq!(client["resets_received"], 0);
    let duration = Duration::from_micros(client["duration_us"].as_u64().unwrap());
    assert!(
        duration >= held_open.saturating_sub(Duration::from_millis(1)),
        "{duration:?} vs {held_open:?}"
    );
    assert!(
        server["src"].get("pid").is_none(),
        "the server side's owner is not known: {server}"
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn server_closing_first_is_peer_for_the_client() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
    let client_port = stream.local_addr()?.port();
    // QUIT: Redis replies +OK and closes the connection itself.
    stream.write_all(b"*1\r\n$4\r\nQUIT\r\n")?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    assert_eq!(rest, b"+OK\r\n");
    drop(stream);

    let client = agent.wait_for(event_timeout(), close_of("client", client_port))?;
    let server = agent.wait_for(event_timeout(), close_of("server", client_port))?;
    assert_eq!(client["closed_by"], "peer", "{client}");
    assert_eq!(server["closed_by"], "local", "{server}");
    agent.stop()?;
    Ok(())
}

#[test]
fn abortive_close_is_a_reset_on_both_sides() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
    ping(&mut stream)?;
    let client_port = stream.local_addr()?.port();
    // SO_LINGER 0: close() sends a RST instead of a FIN.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(stream);

    let client = agent.wait_for(event_timeout(), close_of("client", client_port))?;
    let server = agent.wait_for(event_timeout(), close_of("server", client_port))?;
    assert_eq!(client["closed_by"], "local_abort", "{client}");
    assert_eq!(server["closed_by"], "peer_reset", "{server}");
    assert_eq!(server["resets_received"], 1, "{server}");
    agent.stop()?;
    Ok(())
}

/// Random loss on an established flow, both directions: each connection's
/// retransmits, per side, equal the kernel's own per-socket counters.
#[test]
fn data_retransmits_are_counted_per_connection() -> anyhow::Result<()> {
    const CONNECTIONS: usize = 3;
    const ROUND_TRIPS: usize = 40;
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    agent.expect_alerts(LOSS_ALERTS);
    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    round_trips_under_loss(redis.port, &mut streams, ROUND_TRIPS)?;
    let expected = ConnectionRetransmits::read_all(&streams, None, redis.port)?;
    drop(streams);

    let total = agent.assert_close_retransmits(&expected)?;
    assert!(
        total > 0,
        "10% loss over {ROUND_TRIPS} round trips caused retransmits"
    );
    agent.stop()?;
    Ok(())
}

/// Connections that retransmitted before the agent started: their `close`
/// counts only the retransmits since, per side, by the kernel's counters
/// read when the agent started and at the end.
#[test]
fn retransmits_of_connections_open_before_the_agent_count_from_its_start() -> anyhow::Result<()> {
    const CONNECTIONS: usize = 3;
    const ROUND_TRIPS: usize = 40;
    let redis = RedisServer::start()?;
    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let read_all =
        |streams: &[TcpStream]| ConnectionRetransmits::read_all(streams, None, redis.port);
    // Loss until every socket has retransmitted: a base to leave out.
    let mut before = read_all(&streams)?;
    for _ in 0..10 {
        if before.iter().all(|c| c.client > 0 && c.server > 0) {
            break;
        }
        round_trips_under_loss(redis.port, &mut streams, ROUND_TRIPS)?;
        before = read_all(&streams)?;
    }
    anyhow::ensure!(
        before.iter().all(|c| c.client > 0 && c.server > 0),
        "every socket retransmitted before the agent started: {before:?}"
    );

    let mut agent = Agent::start(&[redis.port], &[])?;
    agent.expect_alerts(LOSS_ALERTS);
    round_trips_under_loss(redis.port, &mut streams, ROUND_TRIPS)?;
    let after = read_all(&streams)?;
    drop(streams);
    let since_start: Vec<ConnectionRetransmits> = before
        .iter()
        .zip(&after)
        .map(|(before, after)| ConnectionRetransmits {
            client_port: after.client_port,
            client: after.client - before.client,
            server: after.server - before.server,
        })
        .collect();
    let total = agent.assert_close_retransmits(&since_start)?;
    assert!(
        total > 0,
        "10% loss over {ROUND_TRIPS} round trips caused retransmits"
    );
    agent.stop()?;
    Ok(())
}

/// `round_trips` PINGs on each stream with 10% of the packets dropped both
/// ways (the client's SYNs spared), then one clean round trip each: after
/// it nothing is left to resend.
fn round_trips_under_loss(
    port: u16,
    streams: &mut [TcpStream],
    round_trips: usize,
) -> anyhow::Result<()> {
    {
        let port = port.to_string();
        let loss = [
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.1",
            "-j",
            "DROP",
        ];
        let to_server = [
            &["-p", "tcp", "!", "--syn", "--dport", port.as_str()][..],
            &loss[..],
        ]
        .concat();
        let to_client = [&["-p", "tcp", "--sport", port.as_str()][..], &loss[..]].concat();
        let _to_server = FirewallRule::insert(false, "INPUT", &to_server)?;
        let _to_client = FirewallRule::insert(false, "INPUT", &to_client)?;
        for _ in 0..round_trips {
            for stream in streams.iter_mut() {
                ping(stream)?;
            }
        }
    }
    for stream in streams.iter_mut() {
        ping(stream)?;
    }
    Ok(())
}

/// A handshake whose last ACK is lost: the server retransmits its SYN-ACK,
/// and the kernel starts the accepted socket's `tcpi_total_retrans` at that
/// count. So does the agent's server-side `close`.
#[test]
fn synack_retransmits_count_toward_the_accepted_connection() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let port = redis.port.to_string();
    let handshake_ack_lost = FirewallRule::insert(
        false,
        "INPUT",
        &["-p", "tcp", "!", "--syn", "--dport", &port, "-j", "DROP"],
    )?;
    // connect() returns on the SYN-ACK; the ACK that would complete the
    // server's half is dropped until the server has resent its SYN-ACK.
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
    let client_port = stream.local_addr()?.port();
    agent.wait_for(event_timeout(), |e| {
        e["type"] == "synack_retransmit" && e["src"]["port"] == client_port
    })?;
    drop(handshake_ack_lost);
    // The request's ACK completes the handshake on the server.
    ping(&mut stream)?;
    let kernel = ss_total_retransmits(None, redis.port, client_port)?;
    assert!(
        kernel >= 1,
        "the server socket counts its SYN-ACK retransmit: {kernel}"
    );
    drop(stream);

    let server = agent.wait_for(event_timeout(), close_of("server", client_port))?;
    agent.assert_count(
        &format!("server side: {server}"),
        server["retransmits"].as_u64().unwrap_or(u64::MAX),
        kernel.into(),
    )?;
    agent.stop()?;
    Ok(())
}

/// The cgroup v2 id of this process: the inode of its cgroup directory, or
/// the root's id (1) on a cgroup-v1-only host.
fn own_cgroup_id() -> u64 {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let Some(root) = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
    }) else {
        return lab::cgroup::ROOT_CGROUP_ID;
    };
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    std::fs::metadata(format!("{root}{path}")).unwrap().ino()
}

#[test]
fn connections_open_before_the_agent_are_seeded_and_gauged() -> anyhow::Result<()> {
    const OPEN: usize = 3;
    let redis = RedisServer::start()?;
    let mut streams = Vec::new();
    for _ in 0..OPEN {
        streams.push(TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?);
    }
    let mut agent = Agent::start(&[redis.port], &["--interval", "200ms"])?;

    let gauge = agent.wait_for(event_timeout(), |e| {
        e["type"] == "connections" && e["role"] == "client" && e["dst"]["port"] == redis.port
    })?;
    assert_eq!(gauge["open"], OPEN, "{gauge}");
    assert_eq!(gauge["src"]["cgroup_id"], own_cgroup_id(), "{gauge}");

    // One more, opened while the agent runs, shows in a later gauge.
    let extra = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
    agent.wait_for(event_timeout(), |e| {
        e["type"] == "connections"
            && e["role"] == "client"
            && e["dst"]["port"] == redis.port
            && e["open"] == OPEN + 1
    })?;

    let ports: Vec<u16> = streams
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    drop(streams);
    for port in ports {
        let close = agent.wait_for(event_timeout(), close_of("client", port))?;
        assert_eq!(close["open_before_agent"], true, "{close}");
        assert!(close.get("duration_us").is_none(), "{close}");
        assert_eq!(close["src"]["pid"], std::process::id(), "{close}");
        assert_eq!(close["closed_by"], "local", "{close}");
    }
    let extra_port = extra.local_addr()?.port();
    drop(extra);
    let close = agent.wait_for(event_timeout(), close_of("client", extra_port))?;
    assert_eq!(close["open_before_agent"], false, "{close}");
    // Every connection is gone: the client gauge drops to zero once.
    agent.wait_for(event_timeout(), |e| {
        e["type"] == "connections"
            && e["role"] == "client"
            && e["dst"]["port"] == redis.port
            && e["open"] == 0
    })?;
    agent.stop()?;
    Ok(())
}
