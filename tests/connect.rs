//! Connect attempts (`agent-ebpf/src/connect.rs`): one event per attempt,
//! with the outcome the client itself saw and the kernel's own counters.

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use lab::{Agent, FirewallRule, RedisServer, event_timeout, free_port, nstat, scaled, serial};
use serde_json::Value;

/// Linux 5.14+; its absence (5.10) has a documented fallback.
const ERROR_REPORT: &str = "sock/inet_sk_error_report";

fn is_connect_to(port: u16) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["type"] == "connect" && e["dst"]["port"] == port
}

/// Waits past a barrier and checks no other connect event came for `port`.
fn assert_no_second_event(agent: &mut Agent, port: u16) -> anyhow::Result<()> {
    agent.barrier()?;
    let extra = agent.connects_to(port);
    assert!(
        extra.is_empty(),
        "a single event per attempt, also got {extra:#?}"
    );
    Ok(())
}

/// The agent's `failed_after_us` is what the client itself waited.
fn assert_failed_after_matches(event: &Value, client_waited: Duration) {
    let failed_after = Duration::from_micros(event["failed_after_us"].as_u64().unwrap());
    assert!(
        client_waited.abs_diff(failed_after) < scaled(Duration::from_millis(100)),
        "agent says {failed_after:?}, client waited {client_waited:?}"
    );
}

#[test]
fn each_connect_from_a_real_client_is_one_established_event() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;

    // Real client processes: redis-cli over IPv4, one event each, with its pid.
    let mut cli_pids = BTreeSet::new();
    for _ in 0..5 {
        let child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "ping"])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        cli_pids.insert(child.id());
        let output = child.wait_with_output()?;
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "PONG");
    }
    // This process over IPv4 and IPv6: the local port identifies each socket.
    let mut own_sockets = Vec::new();
    for addr in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, redis.port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, redis.port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, redis.port)),
    ] {
        let stream = TcpStream::connect(addr)?;
        own_sockets.push((stream.local_addr()?, stream.peer_addr()?));
    }
    agent.barrier()?;

    let events = agent.connects_to(redis.port);
    assert_eq!(
        events.len(),
        cli_pids.len() + own_sockets.len(),
        "exactly one event per connect: {events:#?}"
    );
    for event in &events {
        assert_eq!(event["outcome"], "established", "{event}");
        assert_eq!(event["answer"], "syn_ack", "{event}");
        assert!(event["handshake_us"].as_u64().unwrap() > 0, "{event}");
        assert_eq!(event["syn_retransmits"], 0, "{event}");
    }
    let event_cli_pids: BTreeSet<u32> = events
        .iter()
        .filter(|e| e["src"]["comm"] == "redis-cli")
        .map(|e| e["src"]["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        event_cli_pids, cli_pids,
        "one event per redis-cli process, with its pid"
    );

    for (local, peer) in own_sockets {
        let matching: Vec<&Value> = events
            .iter()
            .filter(|e| e["src"]["port"] == local.port())
            .collect();
        assert_eq!(matching.len(), 1, "one event for {local}: {events:#?}");
        let event = matching[0];
        assert_eq!(event["src"]["ip"], local.ip().to_string());
        assert_eq!(event["dst"]["ip"], peer.ip().to_string());
        assert_eq!(event["src"]["pid"], std::process::id());
    }
    agent.stop()?;
    Ok(())
}

/// Java and Node open dual-stack AF_INET6 sockets and connect them to
/// IPv4-mapped addresses: the event names the plain IPv4 endpoint.
#[test]
fn dual_stack_socket_to_an_ipv4_redis_is_reported_as_ipv4() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
    let stream = TcpStream::connect((mapped, redis.port))?;
    assert!(stream.local_addr()?.is_ipv6(), "an AF_INET6 socket");
    let local_port = stream.local_addr()?.port();

    let event = agent.wait_for(event_timeout(), is_connect_to(redis.port))?;
    assert_eq!(event["outcome"], "established", "{event}");
    assert_eq!(event["src"]["port"], local_port, "{event}");
    assert_eq!(event["src"]["ip"], "127.0.0.1", "{event}");
    assert_eq!(event["dst"]["ip"], "127.0.0.1", "{event}");
    drop(stream);
    let close = agent.wait_for(event_timeout(), |e| {
        e["type"] == "close" && e["role"] == "client" && e["src"]["port"] == local_port
    })?;
    assert_eq!(close["dst"]["ip"], "127.0.0.1", "{close}");
    agent.stop()?;
    Ok(())
}

#[test]
fn connect_to_a_port_without_listener_is_refused() -> anyhow::Result<()> {
    let port = free_port();
    let mut agent = Agent::start(&[port], &[])?;
    let error = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect_err("nothing listens");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);

    let event = agent.wait_for(event_timeout(), is_connect_to(port))?;
    assert_eq!(event["outcome"], "refused", "{event}");
    assert_eq!(event["answer"], "rst", "{event}");
    assert_eq!(event["error"], "ECONNREFUSED", "{event}");
    assert_eq!(event["src"]["pid"], std::process::id());
    assert!(event.get("handshake_us").is_none(), "{event}");
    assert_no_second_event(&mut agent, port)?;
    agent.stop()?;
    Ok(())
}

/// The client gives up after 1.5 s while its SYN is silently dropped: the
/// kernel has retransmitted the SYN once (at ~1 s) and the application closes
/// the socket in SYN_SENT.
#[test]
fn client_giving_up_on_a_dropped_syn_is_aborted() -> anyhow::Result<()> {
    let _serial = serial();
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    // The dropped SYN rightly raises `syn_drops` (checked below).
    agent.expect_alerts(&["syn_drops"]);
    let _drop = FirewallRule::drop_syns_to(redis.port)?;

    let retrans_before = nstat("TcpExtTCPSynRetrans")?;
    let started = Instant::now();
    let error = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, redis.port)),
        Duration::from_millis(1500),
    )
    .expect_err("the SYN is dropped");
    let client_waited = started.elapsed();
    assert_eq!(error.kind(), io::ErrorKind::TimedOut);

    let event = agent.wait_for(event_timeout(), is_connect_to(redis.port))?;
    let retrans_after = nstat("TcpExtTCPSynRetrans")?;
    assert_eq!(
        retrans_after - retrans_before,
        1,
        "kernel counted one SYN retransmit"
    );

    assert_eq!(event["outcome"], "aborted", "{event}");
    assert_eq!(event["answer"], "none", "{event}");
    agent.assert_count(
        &format!("SYN retransmits: {event}"),
        event["syn_retransmits"].as_u64().unwrap(),
        retrans_after - retrans_before,
    )?;
    assert_eq!(event["path_drop_suspected"], true, "{event}");
    assert_eq!(event["src"]["pid"], std::process::id());
    assert_failed_after_matches(&event, client_waited);
    let alert = agent.wait_for(event_timeout(), |e| {
        e["type"] == "alert" && e["kind"] == "syn_drops" && e["state"] == "firing"
    })?;
    assert_eq!(alert["endpoint"]["port"], redis.port, "{alert}");
    assert_no_second_event(&mut agent, redis.port)?;
    agent.stop()?;
    Ok(())
}

/// With `TCP_SYNCNT=1` the kernel itself gives up (ETIMEDOUT after ~3 s).
#[test]
fn kernel_giving_up_on_a_dropped_syn_is_timeout() -> anyhow::Result<()> {
    let _serial = serial();
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    // The dropped SYN rightly raises `syn_drops` (checked below).
    agent.expect_alerts(&["syn_drops"]);
    let _drop = FirewallRule::drop_syns_to(redis.port)?;

    let retrans_before = nstat("TcpExtTCPSynRetrans")?;
    let started = Instant::now();
    let error = connect_with_syn_count(SocketAddr::from((Ipv4Addr::LOCALHOST, redis.port)), 1)
        .expect_err("the SYN is dropped");
    let client_waited = started.elapsed();
    assert_eq!(error.raw_os_error(), Some(libc::ETIMEDOUT), "{error}");

    let event = agent.wait_for(event_timeout(), is_connect_to(redis.port))?;
    // One retransmit on 5.10/6.1; two since tcp_syn_linear_timeouts (6.5)
    // spaces the first SYN retransmits 1 s apart. The kernel's count rules.
    let kernel_retransmits = nstat("TcpExtTCPSynRetrans")? - retrans_before;
    assert!(kernel_retransmits >= 1);

    assert_eq!(event["outcome"], "timeout", "{event}");
    if agent.attached(ERROR_REPORT) {
        assert_eq!(event["error"], "ETIMEDOUT", "{event}");
    } else {
        // 5.10 fallback (docs/kernels.md): the errno is not known.
        eprintln!("no {ERROR_REPORT} on this kernel: the errno is not reported");
        assert!(event.get("error").is_none(), "{event}");
    }
    assert_eq!(event["answer"], "none", "{event}");
    agent.assert_count(
        &format!("SYN retransmits: {event}"),
        event["syn_retransmits"].as_u64().unwrap(),
        kernel_retransmits,
    )?;
    assert_eq!(event["path_drop_suspected"], true, "{event}");
    assert_failed_after_matches(&event, client_waited);
    let alert = agent.wait_for(event_timeout(), |e| {
        e["type"] == "alert" && e["kind"] == "syn_drops" && e["state"] == "firing"
    })?;
    assert_eq!(alert["endpoint"]["port"], redis.port, "{alert}");
    assert_no_second_event(&mut agent, redis.port)?;
    agent.stop()?;
    Ok(())
}

/// A firewall answering the SYN with a RST (`REJECT --reject-with tcp-reset`).
#[test]
fn reject_with_reset_is_refused() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let _reject = FirewallRule::on_syns_to(redis.port, &["REJECT", "--reject-with", "tcp-reset"])?;
    let error = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port)).expect_err("rejected");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);

    let event = agent.wait_for(event_timeout(), is_connect_to(redis.port))?;
    assert_eq!(event["outcome"], "refused", "{event}");
    assert_eq!(event["answer"], "rst", "{event}");
    assert_eq!(event["syn_retransmits"], 0, "{event}");
    assert_eq!(event["path_drop_suspected"], false, "{event}");
    agent.stop()?;
    Ok(())
}

/// A firewall answering the SYN with ICMP host unreachable.
#[test]
fn reject_with_icmp_is_unreachable() -> anyhow::Result<()> {
    // On loopback the first ICMP finds the socket owned by connect() (a soft
    // error) and the SYN is retransmitted: keep that out of other tests' counts.
    let _serial = serial();
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let _reject = FirewallRule::on_syns_to(
        redis.port,
        &["REJECT", "--reject-with", "icmp-host-unreachable"],
    )?;
    let started = Instant::now();
    let error = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port)).expect_err("rejected");
    let client_waited = started.elapsed();
    assert_eq!(error.raw_os_error(), Some(libc::EHOSTUNREACH), "{error}");

    let event = agent.wait_for(event_timeout(), is_connect_to(redis.port))?;
    if !agent.attached(ERROR_REPORT) {
        // 5.10 fallback (docs/kernels.md): without the errno an ICMP error
        // cannot be told from the kernel giving up.
        eprintln!("no {ERROR_REPORT} on this kernel: ICMP errors show as timeouts");
        assert_eq!(event["outcome"], "timeout", "{event}");
        assert_eq!(event["answer"], "none", "{event}");
        agent.stop()?;
        return Ok(());
    }
    assert_eq!(event["outcome"], "unreachable", "{event}");
    assert_eq!(event["answer"], "icmp", "{event}");
    assert_eq!(event["error"], "EHOSTUNREACH", "{event}");
    let failed_after = Duration::from_micros(event["failed_after_us"].as_u64().unwrap());
    assert!(
        failed_after <= client_waited,
        "{failed_after:?} > {client_waited:?}"
    );
    assert_no_second_event(&mut agent, redis.port)?;
    agent.stop()?;
    Ok(())
}

/// A listener that never accepts (backlog 1), on loopback: once its accept
/// queue is full, SYNs are dropped and retransmitted. Every SYN (and SYN-ACK)
/// retransmit the kernel counts shows up in the agent's events. The server
/// side's SYN-ACK retransmits: `tests/pods.rs`, across a delayed path.
#[test]
fn full_accept_queue_drops_and_retransmits_syns() -> anyhow::Result<()> {
    const CLIENTS: usize = 6;
    let _serial = serial();
    let (listener, port) = listener_with_backlog(1)?;
    let mut agent = Agent::start(&[port], &[])?;
    // Clients that time out together read as one workload retrying at its
    // connect timeout (concurrent callers merge into one chain): on a slow
    // kernel (the 5.10 guest) four of the six time out and it fires.
    agent.expect_alerts(&["syn_drops", "retry_storm"]);

    let overflows_before = nstat("TcpExtListenOverflows")?;
    let retrans_before = nstat("TcpExtTCPSynRetrans")?;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    Duration::from_millis(2500),
                )
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // Closing the listener ends every pending handshake before the counts.
    drop(listener);
    drop(results);
    agent.barrier()?;
    let kernel_retransmits = nstat("TcpExtTCPSynRetrans")? - retrans_before;
    let overflows = nstat("TcpExtListenOverflows")? - overflows_before;

    let events = agent.take_seen(|e| e["dst"]["port"] == port);
    let connects: Vec<&Value> = events.iter().filter(|e| e["type"] == "connect").collect();
    assert_eq!(
        connects.len(),
        CLIENTS,
        "one connect event per client: {events:#?}"
    );
    let syn_retransmits: u64 = connects
        .iter()
        .map(|e| e["syn_retransmits"].as_u64().unwrap())
        .sum();
    let synack_retransmits = events
        .iter()
        .filter(|e| e["type"] == "synack_retransmit")
        .count() as u64;
    eprintln!(
        "accept queue full: {overflows} overflows, {syn_retransmits} SYN and {synack_retransmits} SYN-ACK retransmits (kernel: {kernel_retransmits})"
    );
    assert!(overflows > 0, "the accept queue overflowed");
    assert!(
        syn_retransmits > 0,
        "client side: SYNs retransmitted: {events:#?}"
    );
    agent.assert_count(
        &format!("every SYN and SYN-ACK retransmit the kernel counted: {events:#?}"),
        syn_retransmits + synack_retransmits,
        kernel_retransmits,
    )?;
    agent.stop()?;
    Ok(())
}

/// The client's final ACK of the handshake is lost: the server retransmits
/// its SYN-ACK (`synack_retransmit` events), one for each the kernel counts.
#[test]
fn lost_handshake_ack_shows_synack_retransmits() -> anyhow::Result<()> {
    let _serial = serial();
    let redis = RedisServer::start()?;
    let mut agent = Agent::start(&[redis.port], &[])?;
    let retrans_before = nstat("TcpExtTCPSynRetrans")?;
    let stream = {
        // Pure ACKs to the server are dropped; the client is established at
        // once, the server waits for an ACK and retransmits its SYN-ACK.
        let _drop_acks = FirewallRule::insert(
            false,
            "INPUT",
            &[
                "-p",
                "tcp",
                "--dport",
                &redis.port.to_string(),
                "--tcp-flags",
                "ALL",
                "ACK",
                "-j",
                "DROP",
            ],
        )?;
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?;
        agent.wait_for(scaled(Duration::from_secs(5)), |e| {
            e["type"] == "synack_retransmit" && e["dst"]["port"] == redis.port
        })?;
        stream
    };
    let client_port = stream.local_addr()?.port();
    drop(stream);
    agent.barrier()?;
    let kernel_retransmits = nstat("TcpExtTCPSynRetrans")? - retrans_before;
    let synacks = 1 + agent
        .take_seen(|e| e["type"] == "synack_retransmit" && e["dst"]["port"] == redis.port)
        .iter()
        .inspect(|e| assert_eq!(e["src"]["port"], client_port, "{e}"))
        .count() as u64;
    agent.assert_count(
        "every SYN-ACK retransmit the kernel counted",
        synacks,
        kernel_retransmits,
    )?;
    agent.stop()?;
    Ok(())
}

/// A listening socket with the given accept backlog, never accepting.
fn listener_with_backlog(backlog: libc::c_int) -> io::Result<(OwnedFd, u16)> {
    // SAFETY: plain socket syscalls on an fd this function owns.
    unsafe {
        let socket = tcp_socket()?;
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(
            socket.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
            || libc::listen(socket.as_raw_fd(), backlog) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let listener = std::net::TcpListener::from(socket);
        let port = listener.local_addr()?.port();
        Ok((OwnedFd::from(listener), port))
    }
}

/// A new IPv4 TCP socket.
fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned by the returned value.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A blocking connect with `TCP_SYNCNT` set, through libc (std has no knob).
fn connect_with_syn_count(addr: SocketAddr, syn_count: libc::c_int) -> io::Result<TcpStream> {
    let SocketAddr::V4(v4) = addr else {
        unimplemented!("IPv4 only")
    };
    // SAFETY: plain socket syscalls on an fd this function owns.
    unsafe {
        let socket = tcp_socket()?;
        let rc = libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&syn_count as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            socket.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TcpStream::from(socket))
    }
}

/// With the agent stopped (SIGSTOP) a tiny ring buffer overflows: every
/// attempt is either delivered or counted as a drop, never lost silently.
#[test]
fn a_full_ring_buffer_is_counted_not_silent() -> anyhow::Result<()> {
    const CONNECTS: usize = 200;
    let redis = RedisServer::start()?;
    let agent = Agent::start(&[redis.port], &["--ring-buffer-kib", "4"])?;
    lab::signal(agent.pid(), libc::SIGSTOP);
    let stopped = scopeguard_cont(agent.pid());
    // Kept open until the agent has stopped: only connect events compete for
    // the ring, none for the closes.
    let mut streams = Vec::with_capacity(CONNECTS);
    for _ in 0..CONNECTS {
        streams.push(TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port))?);
    }
    drop(stopped);

    let events = agent.stop()?;
    drop(streams);
    let delivered = events
        .iter()
        .filter(|e| is_connect_to(redis.port)(e))
        .count();
    let stats = events
        .iter()
        .rfind(|e| e["type"] == "stats")
        .expect("a final stats event");
    let dropped = stats["ring_buffer_full"].as_u64().unwrap() as usize;
    assert!(
        dropped > 0,
        "a 4 KiB ring cannot hold {CONNECTS} events: {stats}"
    );
    assert_eq!(delivered + dropped, CONNECTS, "{stats}");
    Ok(())
}

/// Sends SIGCONT to `pid` when dropped, so a failing test never leaves the
/// agent stopped.
fn scopeguard_cont(pid: u32) -> impl Drop {
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            lab::signal(self.0, libc::SIGCONT);
        }
    }
    Cont(pid)
}
