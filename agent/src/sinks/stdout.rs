//! Stdout through a writer thread, so that a slow or stopped reader of the
//! agent's stdout (a stalled log pipeline, a paused terminal) never stalls
//! the loop that drains the kernel's ring buffer: lines that do not fit in a
//! bounded queue are dropped and counted instead.

use std::{
    io::{self, Write},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

/// Most bytes waiting for the writer thread; beyond, lines are dropped.
/// Holds a 10,000-series `latency` window (~6 MB) while keeping the agent's
/// memory bounded when nobody reads.
pub const QUEUE_LIMIT_BYTES: usize = 8 << 20;

/// A batch goes to the writer thread once it is this big (and at each
/// flush), so that a long drain of the ring buffer streams out.
const BATCH_BYTES: usize = 64 << 10;

/// Complete lines in, whole batches out to the writer thread. Implements
/// `Write` for the sinks; a batch is handed over only at a line end.
pub struct LineQueue {
    batch: Vec<u8>,
    /// Lines in `batch`.
    batch_lines: u64,
    /// `None` once finished.
    sender: Option<mpsc::Sender<Vec<u8>>>,
    /// Bytes handed over and not yet written, shared with the writer thread.
    queued_bytes: Arc<AtomicUsize>,
    /// Set by the writer thread when a write failed (e.g. `EPIPE`).
    failed: Arc<OnceLock<io::ErrorKind>>,
    /// Disconnected when the writer thread has ended.
    writer_done: mpsc::Receiver<()>,
    limit_bytes: usize,
    lines_dropped: u64,
}

impl LineQueue {
    /// Starts the writer thread on `out`.
    pub fn spawn(out: impl Write + Send + 'static, limit_bytes: usize) -> io::Result<Self> {
        let (sender, batches) = mpsc::channel::<Vec<u8>>();
        let (done, writer_done) = mpsc::channel();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(OnceLock::new());
        let (queued, failure) = (Arc::clone(&queued_bytes), Arc::clone(&failed));
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                let _done = done;
                let mut out = out;
                for batch in batches {
                    let written = out.write_all(&batch).and_then(|()| out.flush());
                    queued.fetch_sub(batch.len(), Ordering::Relaxed);
                    if let Err(err) = written {
                        let _ = failure.set(err.kind());
                        return;
                    }
                }
            })?;
        Ok(Self {
            batch: Vec::with_capacity(BATCH_BYTES),
            batch_lines: 0,
            sender: Some(sender),
            queued_bytes,
            failed,
            writer_done,
            limit_bytes,
            lines_dropped: 0,
        })
    }

    /// Lines that did not fit in the queue, since start.
    pub fn lines_dropped(&self) -> u64 {
        self.lines_dropped
    }

    /// Hands over what is left, whatever the queue holds (the last lines of
    /// a run matter most), and waits up to `timeout` for it to be written.
    /// Errors if stdout failed, or is still blocked after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> io::Result<()> {
        if !self.batch.is_empty() {
            self.send_batch();
        }
        self.sender = None;
        match self.writer_done.recv_timeout(timeout) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => self.check_failed(),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "stdout still blocked after {timeout:?}, {} bytes not written",
                    self.queued_bytes.load(Ordering::Relaxed)
                ),
            )),
        }
    }

    fn check_failed(&self) -> io::Result<()> {
        match self.failed.get() {
            Some(&kind) => Err(io::Error::from(kind)),
            None => Ok(()),
        }
    }

    /// The batch to the writer thread, or dropped if the queue is full.
    fn hand_over(&mut self) {
        let queued = self.queued_bytes.load(Ordering::Relaxed);
        if queued + self.batch.len() > self.limit_bytes {
            self.lines_dropped += self.batch_lines;
            self.batch.clear();
            self.batch_lines = 0;
        } else {
            self.send_batch();
        }
    }

    fn send_batch(&mut self) {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_BYTES));
        let lines = std::mem::take(&mut self.batch_lines);
        self.queued_bytes.fetch_add(batch.len(), Ordering::Relaxed);
        let sent = self.sender.as_ref().map(|sender| sender.send(batch));
        if !matches!(sent, Some(Ok(()))) {
            // The writer thread has ended (its error is in `failed`).
            self.lines_dropped += lines;
        }
    }
}

impl Write for LineQueue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.batch.extend_from_slice(buf);
        let lines = buf.iter().filter(|&&b| b == b'\n').count() as u64;
        self.batch_lines += lines;
        // Sinks end a line with a write ending in `\n` (JSON escapes the
        // newlines inside strings): hand over only there.
        if lines > 0 && buf.ends_with(b"\n") && self.batch.len() >= BATCH_BYTES {
            self.hand_over();
        }
        Ok(buf.len())
    }

    /// Hands the lines written so far to the writer thread (or drops them);
    /// fails once stdout has failed, e.g. when its reader is gone.
    fn flush(&mut self) -> io::Result<()> {
        self.check_failed()?;
        if !self.batch.is_empty() {
            self.hand_over();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;

    /// A writer that blocks until opened, then collects what it gets.
    #[derive(Clone, Default)]
    struct Gate {
        state: Arc<(Mutex<GateState>, Condvar)>,
    }

    #[derive(Default)]
    struct GateState {
        open: bool,
        written: Vec<u8>,
    }

    impl Gate {
        fn open(&self) {
            self.state.0.lock().unwrap().open = true;
            self.state.1.notify_all();
        }

        fn written(&self) -> String {
            String::from_utf8(self.state.0.lock().unwrap().written.clone()).unwrap()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, opened) = &*self.state;
            let mut state = opened
                .wait_while(lock.lock().unwrap(), |s| !s.open)
                .unwrap();
            state.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_writer_drops_whole_lines_and_counts_them() {
        let gate = Gate::default();
        let mut queue = LineQueue::spawn(gate.clone(), 100).unwrap();
        for i in 0..50 {
            writeln!(queue, "line {i:04}").unwrap(); // 10 bytes
            queue.flush().unwrap();
        }
        // 100 bytes fit while the writer is blocked (a batch counts until
        // written): 10 lines queued, 40 dropped.
        let dropped = queue.lines_dropped();
        assert_eq!(dropped, 40);
        writeln!(queue, "last").unwrap();
        gate.open();
        queue.finish(Duration::from_secs(10)).unwrap();
        let written = gate.written();
        assert!(
            written.ends_with("last\n"),
            "the final lines are kept: {written}"
        );
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len() as u64, 51 - dropped);
        assert!(lines.iter().all(|l| l.starts_with("line ") || *l == "last"));
    }

    #[test]
    fn a_large_drain_streams_out_in_batches() {
        let gate = Gate::default();
        gate.open();
        let mut queue = LineQueue::spawn(gate.clone(), QUEUE_LIMIT_BYTES).unwrap();
        let line = "x".repeat(99);
        for _ in 0..2_000 {
            writeln!(queue, "{line}").unwrap();
        }
        // No flush yet: batches went out at line ends.
        assert!(queue.batch.len() < BATCH_BYTES);
        queue.finish(Duration::from_secs(10)).unwrap();
        assert_eq!(gate.written().len(), 200_000);
    }

    #[test]
    fn a_closed_stdout_fails_the_next_flush() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut queue = LineQueue::spawn(Closed, QUEUE_LIMIT_BYTES).unwrap();
        writeln!(queue, "{{}}").unwrap();
        queue.flush().unwrap();
        // The writer thread ends on the error.
        let ended = queue.writer_done.recv_timeout(Duration::from_secs(10));
        assert_eq!(ended, Err(mpsc::RecvTimeoutError::Disconnected));
        let err = queue.flush().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn finish_gives_up_on_a_stdout_blocked_for_good() {
        let mut queue = LineQueue::spawn(Gate::default(), QUEUE_LIMIT_BYTES).unwrap();
        writeln!(queue, "stuck").unwrap();
        let err = queue.finish(Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
