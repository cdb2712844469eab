//! The agent's lifecycle as the kubelet drives it: SIGTERM mid-run flushes
//! the window in progress and the final counters, the agent exits well
//! within a pod's grace period, and it leaves nothing in the kernel; SIGKILL
//! (OOM killer, eviction) harms no traced application, leaves nothing
//! either, and the next agent traces the connections that stayed open.
//! Ground truth: the clients' own request and error counts and the kernel's
//! lists of BPF programs, maps and links (`bpftool`, `/proc/<pid>/fdinfo`).

use std::{
    os::unix::process::ExitStatusExt as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, Sender, channel},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lab::{
    Agent, RedisServer, event_timeout,
    kernel::{bpf_ids_held_by, bpf_objects_held_by, bpftool_ids, bpftool_list},
    scaled, serial, wait_until,
};
use serde_json::Value;

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

/// What a [`Client`] thread does next.
enum Order {
    /// Requests back to back until the next order.
    Run,
    /// Finish the request in progress, say so, and wait.
    Pause,
    /// Exactly this many requests, say so, and wait.
    Exactly(u64),
    Quit,
}

/// A Redis client on its own connection and thread, sending `INCR` on its
/// own key: the application the agent traces, with its own counts.
struct Client {
    /// Its local port: the agent's events name it as `src.port`.
    port: u16,
    answered: Arc<AtomicU64>,
    orders: Sender<Order>,
    done: Receiver<()>,
    thread: thread::JoinHandle<()>,
}

impl Client {
    fn connect(redis_port: u16, errors: &Arc<Mutex<Vec<String>>>) -> anyhow::Result<Self> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{redis_port}/"))?;
        let mut connection = client.get_connection().context("connecting to redis")?;
        connection.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
        // The redis crate does not expose its socket: ask the server which
        // port this connection comes from.
        let info: String = redis::cmd("CLIENT").arg("INFO").query(&mut connection)?;
        let port = info
            .split(' ')
            .find_map(|field| field.strip_prefix("addr="))
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .with_context(|| format!("no client port in CLIENT INFO: {info}"))?;
        let answered = Arc::new(AtomicU64::new(0));
        let (orders, inbox) = channel();
        let (report, done) = channel();
        let (count, errors) = (Arc::clone(&answered), Arc::clone(errors));
        let key = format!("sigkill:{port}");
        let thread = thread::spawn(move || {
            let mut request = || match redis::cmd("INCR").arg(&key).query::<i64>(&mut connection) {
                Ok(_) => {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Err(error) => errors.lock().unwrap().push(format!(":{port}: {error}")),
            };
            let mut order = Order::Pause;
            loop {
                match order {
                    Order::Run => {
                        request();
                        match inbox.try_recv() {
                            Ok(next) => order = next,
                            Err(std::sync::mpsc::TryRecvError::Empty) => {}
                            Err(_) => return,
                        }
                        continue;
                    }
                    Order::Pause => {}
                    Order::Exactly(n) => (0..n).for_each(|_| request()),
                    Order::Quit => return,
                }
                let _ = report.send(());
                let Ok(next) = inbox.recv() else { return };
                order = next;
            }
        });
        Ok(Self {
            port,
            answered,
            orders,
            done,
            thread,
        })
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// Gives `order` and waits until it is carried out (not for `Run`).
    fn order(&self, order: Order) -> anyhow::Result<()> {
        let waits = !matches!(order, Order::Run | Order::Quit);
        self.orders.send(order).context("client thread gone")?;
        if waits {
            self.done
                .recv_timeout(scaled(Duration::from_secs(30)))
                .context("client did not carry out its order")?;
        }
        Ok(())
    }
}

#[test]
fn sigkill_harms_no_client_leaves_nothing_attached_and_the_next_agent_traces_open_connections()
-> anyhow::Result<()> {
    const CLIENTS: usize = 4;
    /// Requests per client once the second agent runs.
    const AFTER: u64 = 50;
    let _serial = serial();
    let redis = RedisServer::start()?;
    let errors = Arc::new(Mutex::new(Vec::new()));
    let clients = (0..CLIENTS)
        .map(|_| Client::connect(redis.port, &errors))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Paused until told otherwise; wait for each to say so.
    for client in &clients {
        client
            .done
            .recv_timeout(scaled(Duration::from_secs(10)))
            .context("client thread did not start")?;
    }

    let agent = Agent::start(&[redis.port], &["--interval", "1h"])?;
    let (programs, maps, links) = bpf_objects_held_by(agent.pid())?;
    // What the kernel has attached for it: every cgroup_skb program through
    // a bpf_link (aya does so from 5.7), which dies with its last fd; a
    // program attached with the older BPF_PROG_ATTACH would stay.
    let attached: Vec<Value> = bpftool_list("link")?
        .into_iter()
        .filter(|link| {
            link["prog_id"]
                .as_u64()
                .is_some_and(|id| programs.contains(&id))
        })
        .collect();
    let cgroup_links = attached.iter().filter(|l| l["type"] == "cgroup").count();
    anyhow::ensure!(
        cgroup_links == 2 && attached.len() == links.len(),
        "expected the agent's 2 cgroup_skb programs among its {} links: {attached:#?}",
        links.len()
    );

    for client in &clients {
        client.order(Order::Run)?;
    }
    let busy = wait_until(event_timeout(), || {
        clients.iter().all(|c| c.answered() >= 100)
    });
    anyhow::ensure!(busy, "clients did not get going: {errors:?}");

    let (_, status) = agent.kill()?;
    anyhow::ensure!(
        status.signal() == Some(libc::SIGKILL),
        "the agent ended with {status}, not by SIGKILL"
    );
    // The clients go on: each completes many more requests after the kill.
    let at_kill: Vec<u64> = clients.iter().map(Client::answered).collect();
    let going_on = wait_until(event_timeout(), || {
        clients
            .iter()
            .zip(&at_kill)
            .all(|(c, &then)| c.answered() >= then + 500)
    });
    anyhow::ensure!(going_on, "clients stalled after the kill: {errors:?}");

    // Freed once the last reference goes (after an RCU grace period).
    let left = || -> anyhow::Result<[Vec<u64>; 3]> {
        Ok(
            [("prog", &programs), ("map", &maps), ("link", &links)].map(|(kind, ours)| {
                bpftool_ids(kind)
                    .map(|ids| ids.intersection(ours).copied().collect())
                    .unwrap_or_else(|_| vec![u64::MAX])
            }),
        )
    };
    let gone = wait_until(scaled(Duration::from_secs(5)), || {
        left().is_ok_and(|lists| lists.iter().all(Vec::is_empty))
    });
    assert!(
        gone,
        "left in the kernel (programs, maps, links): {:?}",
        left()?
    );

    // The next agent starts while every connection stays open.
    for client in &clients {
        client.order(Order::Pause)?;
    }
    let agent = Agent::start(&[redis.port], &["--interval", "1h", "--emit", "all"])?;
    let seeded = agent.started()["seeded_connections"].as_u64().unwrap_or(0);
    // Both ends of each connection are on this node.
    anyhow::ensure!(
        seeded >= 2 * CLIENTS as u64,
        "the new agent found {seeded} open connections, the clients hold {CLIENTS}"
    );
    for client in &clients {
        client.order(Order::Exactly(AFTER))?;
    }
    let events = agent.stop()?;
    for client in &clients {
        let traced = |role: &str| {
            events
                .iter()
                .filter(|e| {
                    e["type"] == "request"
                        && e["role"] == role
                        && e["src"]["port"] == client.port
                        && e["command"] == "INCR"
                        && e["outcome"] == "ok"
                })
                .count() as u64
        };
        assert_eq!(
            (traced("client"), traced("server")),
            (AFTER, AFTER),
            "requests of the connection from :{} timed by the new agent (client, server side)",
            client.port
        );
    }

    for client in clients {
        client.order(Order::Quit)?;
        client.thread.join().expect("client thread panicked");
    }
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "the clients saw errors: {errors:?}");
    Ok(())
}
