//! Seeds for the fuzz targets from real traffic: a real `redis-server`, real
//! clients (redis-benchmark, redis-cli, a raw socket for inline commands),
//! and a relay between them that records what each side wrote, chunk by
//! chunk, in the order the relay saw it. Each client connection becomes one
//! seed per target, written in that target's input format (see the headers
//! of `fuzz/fuzz_targets/*.rs`).
//!
//! Values are the clients' own test data (benchmark keys, the strings
//! below); nothing from elsewhere is recorded.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use agent_common::{
    AF_INET, COMM_LEN, ConnectEvent, ConnectOutcome, EventHeader, EventKind, FlowTuple, SynAnswer,
    TaskInfo,
    resp::{
        CHUNK_BYTES, MAX_CHUNKS, ROLE_CLIENT, SEGMENT_FIN, SEGMENT_FROM_START, SEGMENT_LAST,
        STREAM_REPLIES, STREAM_REQUESTS, SegmentEvent, SocketEvent,
    },
};
use anyhow::Context as _;

use crate::util::RedisServer;

/// Bytes of one connection kept for a seed: the capture stops there (at a
/// chunk boundary), so the committed corpus stays small.
const MAX_SEED_BYTES: usize = 8 * 1024;
/// The relay reads up to this much at a time (a chunk ≈ one syscall).
const READ_BYTES: usize = 64 * 1024;

/// Bytes one side wrote in one read of the relay.
struct Chunk {
    requests: bool,
    data: Vec<u8>,
}

/// Connections recorded since the last `take`.
type Recorded = Arc<Mutex<Vec<Vec<Chunk>>>>;

/// Records real connections and writes them as seeds under `seeds_dir`
/// (`<target>/<scenario>-<n>`); returns how many connections.
pub fn capture(seeds_dir: &Path) -> anyhow::Result<usize> {
    let server_port = free_port()?;
    let _server = RedisServer::start(
        Command::new("redis-server"),
        server_port,
        // DEBUG for RESP3's `DEBUG PROTOCOL` replies (attributes, big
        // numbers, verbatim strings).
        &["--enable-debug-command", "yes"],
    )?;
    let relay = TcpListener::bind("127.0.0.1:0").context("binding the recording relay")?;
    let port = relay.local_addr()?.port();
    let recorded: Recorded = Arc::default();
    {
        let recorded = Arc::clone(&recorded);
        thread::spawn(move || relay_loop(relay, server_port, recorded));
    }
    let p = port.to_string();
    let big = "v".repeat(100_000);
    let binary: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let mut written = 0;
    let mut scenario = |name: &str, run: &mut dyn FnMut() -> anyhow::Result<()>| {
        crate::util::step(&format!("capture: {name}"));
        run().with_context(|| format!("capture scenario {name}"))?;
        // Both copiers of every connection must have finished.
        let deadline = Instant::now() + Duration::from_secs(5);
        thread::sleep(Duration::from_millis(200));
        let connections = loop {
            let taken = std::mem::take(&mut *recorded.lock().expect("relay thread panicked"));
            if !taken.is_empty() || Instant::now() > deadline {
                break taken;
            }
            thread::sleep(Duration::from_millis(50));
        };
        anyhow::ensure!(!connections.is_empty(), "{name}: no connection recorded");
        for (i, chunks) in connections.iter().enumerate() {
            write_seeds(seeds_dir, &format!("{name}-{i}"), chunks)?;
        }
        written += connections.len();
        Ok::<_, anyhow::Error>(())
    };
    let cli =
        |args: &[&str], stdin: &[u8]| run_client("redis-cli", &[&["-p", &p], args].concat(), stdin);
    scenario("benchmark", &mut || {
        run_client(
            "redis-benchmark",
            &[
                "-p",
                &p,
                "-c",
                "2",
                "-n",
                "60",
                "-q",
                "-t",
                "ping,set,get,incr,lpush,lpop,sadd,hset,spop,zadd,lrange_100,mset",
            ],
            b"",
        )
    })?;
    scenario("benchmark-pipelined", &mut || {
        run_client(
            "redis-benchmark",
            &[
                "-p",
                &p,
                "-c",
                "1",
                "-P",
                "16",
                "-n",
                "96",
                "-q",
                "-t",
                "set,get,lpush,lrange_100,mset",
            ],
            b"",
        )
    })?;
    scenario("cli-errors-multi", &mut || {
        cli(
            &[],
            b"SET greeting hello\nGET greeting\nLPUSH list a b c\nGET list\nNOSUCHCOMMAND x\n\
              GET missing\nMULTI\nSET n 1\nINCR n\nINCR greeting\nEXEC\nMULTI\nNOSUCHCOMMAND\nEXEC\n\
              HSET h f 1 g 2\nHGETALL h\nCLIENT SETNAME fuzz\nCLIENT GETNAME\nDEL list nothing\n\
              EVAL \"return redis.error_reply('MYERR custom')\" 0\nOBJECT ENCODING greeting\n",
        )
    })?;
    scenario("cli-resp3", &mut || {
        cli(
            &["-3"],
            b"HSET h f 1 g 2\nHGETALL h\nSADD s a b\nSMEMBERS s\nZADD z 1.5 m 2.25 n\nZSCORE z m\n\
              ZRANGE z 0 -1 WITHSCORES\nGET missing\nLPUSH h x\nDEBUG PROTOCOL map\n\
              DEBUG PROTOCOL set\nDEBUG PROTOCOL double\nDEBUG PROTOCOL true\nDEBUG PROTOCOL null\n",
        )
    })?;
    // What redis-cli 7.0 cannot print ("Unknown reply type" for big
    // numbers): pipelined from a raw socket, as client libraries write it.
    scenario("resp3-pipelined", &mut || {
        let commands: &[&[&[u8]]] = &[
            &[b"HELLO", b"3"],
            &[b"DEBUG", b"PROTOCOL", b"bignum"],
            &[b"DEBUG", b"PROTOCOL", b"attrib"],
            &[b"DEBUG", b"PROTOCOL", b"verbatim"],
            &[b"DEBUG", b"PROTOCOL", b"push"],
            &[b"DEBUG", b"PROTOCOL", b"false"],
            &[b"CLIENT", b"TRACKING", b"on"],
            &[b"GET", b"tracked"],
            &[b"SET", b"tracked", b"changed"],
            &[b"NOSUCHCOMMAND"],
            &[b"QUIT"],
        ];
        raw(
            port,
            &commands
                .iter()
                .flat_map(|args| multibulk(args))
                .collect::<Vec<_>>(),
        )
    })?;
    scenario("cli-large-value", &mut || {
        cli(&["-x", "SET", "big"], big.as_bytes())?;
        cli(&["GET", "big"], b"").map(drop)
    })?;
    scenario("cli-binary", &mut || {
        cli(&["-x", "SET", "bin"], &binary)?;
        cli(&["GETRANGE", "bin", "0", "300"], b"").map(drop)
    })?;
    scenario("pubsub", &mut || {
        let mut subscriber = Command::new("redis-cli")
            .args(["-p", &p, "SUBSCRIBE", "news", "other"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-cli SUBSCRIBE")?;
        thread::sleep(Duration::from_millis(300));
        let published = cli(&["PUBLISH", "news", "hello"], b"");
        thread::sleep(Duration::from_millis(200));
        let _ = subscriber.kill();
        let _ = subscriber.wait();
        published
    })?;
    scenario("inline", &mut || {
        raw(
            port,
            b"PING\r\nSET inline value\r\nGET inline\r\nECHO \"two words\"\r\n\
              *3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n*2\r\n$3\r\nGET\r\n$6\r\ninline\r\n\
              PING\r\nQUIT\r\n",
        )
    })?;
    Ok(written)
}

fn run_client(program: &str, args: &[&str], stdin: &[u8]) -> anyhow::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin)
        .with_context(|| format!("writing to {program}"))?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "{program} {args:?} exited with {status}");
    Ok(())
}

/// A request as clients write it: an array of bulk strings.
fn multibulk(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A client that writes `bytes` and reads until the server closes.
fn raw(port: u16, bytes: &[u8]) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(bytes)?;
    let mut sink = Vec::new();
    stream.read_to_end(&mut sink).context("reading replies")?;
    Ok(())
}

fn relay_loop(listener: TcpListener, server_port: u16, recorded: Recorded) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
            continue;
        };
        let recorded = Arc::clone(&recorded);
        thread::spawn(move || {
            let chunks = Arc::new(Mutex::new(Vec::new()));
            let forward = |mut from: TcpStream, mut to: TcpStream, requests: bool| {
                let chunks = Arc::clone(&chunks);
                thread::spawn(move || {
                    let mut buf = vec![0; READ_BYTES];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        // Recorded before forwarding: a reply is recorded
                        // after the request it answers.
                        chunks.lock().expect("copier panicked").push(Chunk {
                            requests,
                            data: buf[..n].to_vec(),
                        });
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                })
            };
            let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                return;
            };
            let up = forward(client, server, true);
            let down = forward(server2, client2, false);
            let _ = (up.join(), down.join());
            let chunks = std::mem::take(&mut *chunks.lock().expect("copier panicked"));
            recorded.lock().expect("relay panicked").push(chunks);
        });
    }
}

/// Chunks up to [`MAX_SEED_BYTES`] in all.
fn kept(chunks: &[Chunk]) -> &[Chunk] {
    let mut total = 0;
    let n = chunks
        .iter()
        .take_while(|c| {
            total += c.data.len().min(CHUNK_BYTES);
            total <= MAX_SEED_BYTES
        })
        .count();
    &chunks[..n.max(1)]
}

fn write_seeds(seeds_dir: &Path, name: &str, chunks: &[Chunk]) -> anyhow::Result<()> {
    let chunks = kept(chunks);
    for (target, bytes) in [
        ("resp_matcher", matcher_input(chunks)),
        ("event_decoder", decoder_input(chunks)),
    ] {
        let dir = seeds_dir.join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `resp_matcher` input: a fresh connection with the default limit, each
/// chunk 1 µs after the last; as in the kernel, only the first
/// [`CHUNK_BYTES`] of a chunk are captured and the rest is a gap.
fn matcher_input(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = vec![0u8];
    for chunk in chunks {
        let captured = &chunk.data[..chunk.data.len().min(CHUNK_BYTES)];
        let gap = chunk.data.len() - captured.len();
        let op = u8::from(!chunk.requests) | if gap > 0 { 1 << 2 } else { 0 } | 1 << 3;
        out.push(op);
        out.extend_from_slice(&(captured.len() as u16).to_le_bytes());
        out.extend_from_slice(captured);
        if gap > 0 {
            out.extend_from_slice(&u16::try_from(gap).unwrap_or(u16::MAX).to_le_bytes());
        }
    }
    out
}

/// `event_decoder` input: the records the kernel programs write for a
/// client socket traced from its connect: the connect, each chunk as one
/// TCP segment (at most [`MAX_CHUNKS`] records of [`CHUNK_BYTES`]), an
/// application read after each reply, the client's FIN, the socket's end.
fn decoder_input(chunks: &[Chunk]) -> Vec<u8> {
    const COOKIE: u64 = 0x5eed;
    const CGROUP: u64 = 4242;
    let mut out = Vec::new();
    let mut record = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    let mut ts = 1_000_000u64;
    let header = |kind: EventKind, ts_ns| EventHeader {
        kind: kind as u32,
        _pad: 0,
        ts_ns,
    };
    let mut tuple = FlowTuple {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 40_312,
        dport: 6379,
    };
    for addr in [&mut tuple.saddr, &mut tuple.daddr] {
        addr[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
    }
    let mut comm = [0u8; COMM_LEN];
    comm[..9].copy_from_slice(b"redis-cli");
    let task = TaskInfo {
        cgroup_id: CGROUP,
        pid: 812,
        tid: 812,
        comm,
    };
    record(bytes_of(&ConnectEvent {
        header: header(EventKind::Connect, ts),
        flow: tuple,
        family: AF_INET,
        outcome: ConnectOutcome::Established as u8,
        answer: SynAnswer::SynAck as u8,
        error: 0,
        syn_retransmits: 0,
        task,
        start_ns: ts - 50_000,
        duration_ns: 50_000,
    }));
    let mut seq = [1_000_000u32, 3_000_000_000u32];
    let segment = |ts_ns, requests: bool, seq, len: usize, offset, data: &[u8], flags| {
        let event = SegmentEvent {
            header: header(EventKind::Segment, ts_ns),
            cookie: COOKIE,
            cgroup_id: CGROUP,
            tuple,
            role: ROLE_CLIENT,
            stream: if requests {
                STREAM_REQUESTS
            } else {
                STREAM_REPLIES
            },
            flags: flags | SEGMENT_FROM_START,
            _pad: 0,
            len: len as u32,
            seq,
            offset,
            captured: data.len() as u32,
            drops: 0,
            _pad1: 0,
        };
        let mut bytes = bytes_of(&event).to_vec();
        bytes.extend_from_slice(data);
        bytes
    };
    for chunk in chunks {
        ts += 1_000;
        let stream = usize::from(!chunk.requests);
        let records: Vec<&[u8]> = chunk
            .data
            .chunks(CHUNK_BYTES)
            .take(MAX_CHUNKS as usize)
            .collect();
        for (i, data) in records.iter().enumerate() {
            let last = if i + 1 == records.len() {
                SEGMENT_LAST
            } else {
                0
            };
            let offset = (i * CHUNK_BYTES) as u32;
            record(&segment(
                ts,
                chunk.requests,
                seq[stream],
                chunk.data.len(),
                offset,
                data,
                last,
            ));
        }
        seq[stream] = seq[stream].wrapping_add(chunk.data.len() as u32);
        if !chunk.requests {
            ts += 1_000;
            record(bytes_of(&SocketEvent {
                header: header(EventKind::AppRead, ts),
                cookie: COOKIE,
            }));
        }
    }
    ts += 1_000;
    record(&segment(
        ts,
        true,
        seq[0],
        0,
        0,
        &[],
        SEGMENT_LAST | SEGMENT_FIN,
    ));
    record(bytes_of(&SocketEvent {
        header: header(EventKind::SocketGone, ts),
        cookie: COOKIE,
    }));
    out
}

/// The bytes of one of agent-common's `#[repr(C)]` records (no padding:
/// agent-common asserts their sizes).
fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: plain-integer `#[repr(C)]` types without padding bytes.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
