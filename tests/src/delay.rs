//! A userspace delay line over iptables `NFQUEUE`: the kernel hands each
//! matching packet to this thread, which holds it and gives the verdict
//! ACCEPT at its due time. The packet itself is untouched (same 4-tuple, SYNs
//! included), unlike a TCP relay. This kernel has no netem; NFQUEUE is what
//! delays packets here.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    io::{self, Read as _},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixStream,
    },
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use nfq::{Queue, Verdict};

use crate::netns::Netns;

/// How a delay line treats each packet.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DelaySpec {
    /// Added to every packet.
    pub delay: Duration,
    /// Each packet gets `delay ± uniform(jitter)`, but never leaves before
    /// the packet ahead of it: jitter without reordering.
    pub jitter: Duration,
    /// With `reorder_probability`, a packet is held `reorder_extra` longer
    /// and later packets overtake it.
    pub reorder_probability: f64,
    pub reorder_extra: Duration,
}

/// Packets seen by a delay line.
#[derive(Debug, Default)]
pub struct DelayStats {
    pub queued: AtomicU64,
    pub released: AtomicU64,
    /// Packets given the extra reorder delay.
    pub reordered: AtomicU64,
}

/// How early before a packet is due the delay line stops sleeping.
const SPIN: Duration = Duration::from_micros(80);

/// Kernel queue length; past it the kernel drops (a delay line must not
/// silently turn into loss: it is far above what a test keeps in flight).
const QUEUE_MAX_LEN: u32 = 8192;

/// A running delay line bound to one NFQUEUE number. On drop it releases
/// every held packet and stops (remove the iptables rule first).
pub struct DelayLine {
    queue_num: u16,
    stats: Arc<DelayStats>,
    /// Dropping it wakes the thread (EOF on the other end) to stop.
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl DelayLine {
    /// Binds the first free queue number from `first_queue` on, in `netns`
    /// (the caller's namespace if `None`), and starts holding packets.
    pub fn start(netns: Option<&Netns>, first_queue: u16, spec: DelaySpec) -> anyhow::Result<Self> {
        let (stop, stop_rx) = UnixStream::pair().context("socketpair")?;
        let stats = Arc::new(DelayStats::default());
        let (bound_tx, bound_rx) = mpsc::channel();
        let thread_stats = Arc::clone(&stats);
        // The thread enters the namespace before opening the netlink socket:
        // a queue belongs to the namespace its socket was created in.
        let target = netns.map(|n| (n.name().to_string(), n.file_handle()));
        let thread = std::thread::Builder::new()
            .name("lab-delay-line".into())
            .spawn(move || {
                let entered = match &target {
                    Some((name, file)) => {
                        crate::netns::enter(file).with_context(|| format!("setns into {name}"))
                    }
                    None => Ok(()),
                };
                let opened = entered.and_then(|()| open_queue(first_queue));
                let (queue, fd, queue_num) = match opened {
                    Ok(opened) => opened,
                    Err(e) => {
                        let message = format!("{e:#}");
                        let _ = bound_tx.send(Err(e));
                        return Err(anyhow!(message));
                    }
                };
                let _ = bound_tx.send(Ok(queue_num));
                run(queue, fd, stop_rx, spec, &thread_stats)
            })
            .context("spawning the delay line thread")?;
        let queue_num = bound_rx
            .recv()
            .map_err(|_| anyhow!("delay line thread died"))??;
        Ok(Self {
            queue_num,
            stats,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn queue_num(&self) -> u16 {
        self.queue_num
    }

    pub fn stats(&self) -> &DelayStats {
        &self.stats
    }

    /// Stops the thread, releasing held packets; reports a failure it hit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> anyhow::Result<()> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow!("delay line thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        if let Err(e) = self.stop_thread() {
            eprintln!("lab: delay line: {e:#}");
        }
    }
}

/// Serializes finding the fd of a new queue socket (see [`open_queue`]).
static OPEN_LOCK: Mutex<()> = Mutex::new(());

/// Opens an NFQUEUE socket bound to the first free queue number from
/// `first` on; returns it with its raw fd, for poll().
fn open_queue(first: u16) -> anyhow::Result<(Queue, RawFd, u16)> {
    let (mut queue, fd) = {
        let _guard = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // nfq 0.2.5, the latest release, does not expose its socket (upstream
        // added fd conversions later, unreleased). We need it to sleep until
        // "packet arrives or next packet is due": the new NETLINK_NETFILTER
        // socket among our fds is it.
        let before = netfilter_sockets();
        let queue = Queue::open().context(
            "opening an NFQUEUE netlink socket (kernel needs CONFIG_NETFILTER_NETLINK_QUEUE)",
        )?;
        let new: Vec<RawFd> = netfilter_sockets()
            .into_iter()
            .filter(|fd| !before.contains(fd))
            .collect();
        let [fd] = new[..] else {
            anyhow::bail!("cannot tell the NFQUEUE socket among new fds {new:?}");
        };
        (queue, fd)
    };
    let mut num = first;
    loop {
        match queue.bind(num) {
            Ok(()) => break,
            // Another process (or delay line) owns this queue number.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && num < first.saturating_add(512) => {
                num += 1
            }
            Err(e) => return Err(e).with_context(|| format!("binding NFQUEUE {num}")),
        }
    }
    // Metadata only: the verdict needs the packet id, not the bytes.
    queue.set_copy_range(num, 0)?;
    queue.set_queue_max_len(num, QUEUE_MAX_LEN)?;
    queue.set_nonblocking(true);
    Ok((queue, fd, num))
}

fn netfilter_sockets() -> Vec<RawFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| {
            sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
                && sockopt(fd, libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER)
        })
        .collect()
}

fn sockopt(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

fn run(
    mut queue: Queue,
    fd: RawFd,
    mut stop: UnixStream,
    spec: DelaySpec,
    stats: &DelayStats,
) -> anyhow::Result<()> {
    // Default timer slack (50 µs) would be a visible part of a 2 ms delay.
    // SAFETY: prctl on the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
    let mut held: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut messages = BTreeMap::new();
    let mut serial = 0u64;
    let mut last_due = Instant::now();
    loop {
        // Within SPIN of the next due time, poll without sleeping: a timer
        // wake-up comes ~50 µs late in a VM, a bias on every packet.
        let timeout = held.peek().map(|Reverse((due, _))| {
            due.saturating_duration_since(Instant::now())
                .saturating_sub(SPIN)
        });
        let (packets, stopping) = wait(fd, stop.as_raw_fd(), timeout)?;
        if stopping {
            let mut buf = [0u8; 1];
            // EOF (the guard dropped its end) means stop; ignore stray bytes.
            if matches!(stop.read(&mut buf), Ok(0) | Err(_)) {
                break;
            }
        }
        if packets {
            loop {
                let message = match queue.recv() {
                    Ok(message) => message,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("receiving from NFQUEUE"),
                };
                let now = Instant::now();
                let due = if fastrand::f64() < spec.reorder_probability {
                    stats.reordered.fetch_add(1, Ordering::Relaxed);
                    now + spec.delay + spec.reorder_extra
                } else {
                    let jitter = spec.jitter.as_secs_f64() * (2.0 * fastrand::f64() - 1.0);
                    let delay = (spec.delay.as_secs_f64() + jitter).max(0.0);
                    let due = (now + Duration::from_secs_f64(delay)).max(last_due);
                    last_due = due;
                    due
                };
                stats.queued.fetch_add(1, Ordering::Relaxed);
                held.push(Reverse((due, serial)));
                messages.insert(serial, message);
                serial += 1;
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((due, id))) = held.peek() {
            if due > now {
                break;
            }
            held.pop();
            let mut message = messages.remove(&id).expect("held message");
            message.set_verdict(Verdict::Accept);
            queue.verdict(message).context("NFQUEUE verdict")?;
            stats.released.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Stopping: let everything still held go now rather than drop it.
    for (_, mut message) in messages {
        message.set_verdict(Verdict::Accept);
        let _ = queue.verdict(message);
        stats.released.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Sleeps until the queue or the stop socket is readable or `timeout`
/// passes (`None`: no limit); returns (queue readable, stop readable).
fn wait(queue: RawFd, stop: RawFd, timeout: Option<Duration>) -> anyhow::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: queue,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timespec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let timespec_ptr = timespec
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds and timespec outlive the call.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, timespec_ptr, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(e).context("ppoll");
    }
    let ready = |fd: &libc::pollfd| fd.revents != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}
