//! A console sink that never blocks the vCPU: a bounded in-memory buffer drained into the real
//! output (stdout, a file, a pipe) by a dedicated thread.
//!
//! When the real output stalls (a pipe nobody reads, a stopped terminal) the buffer fills and
//! further guest output is dropped and counted instead of blocking the vCPU thread that executes
//! the UART's THR write. Losing console output is preferred to hanging the guest.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::counter::Counter;

/// Buffer size the VMM should use unless it has a reason not to (a screenful of boot log).
pub const DEFAULT_CONSOLE_BUFFER: usize = 64 * 1024;

/// Bytes waiting for the drain thread, plus its bookkeeping.
struct Pending {
    data: VecDeque<u8>,
    capacity: usize,
    /// The writer is gone or the sink failed for good: the thread exits once `data` is empty.
    closed: bool,
    /// The drain thread holds a batch it has not finished writing.
    writing: bool,
}

/// What the writer, the drain thread and the handle share.
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when data arrives or the writer closes (wakes the drain thread) and when a
    /// batch was written (wakes [`ConsoleHandle::flush_timeout`]).
    changed: Condvar,
    dropped: Counter,
    sink_errors: Counter,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `Write` end given to the UART. `write` copies into the bounded buffer and returns at
/// once; when the buffer is full it fails with `WouldBlock` (the UART counts the byte as lost).
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

/// The VMM's end: counters and a bounded wait for queued output at exit.
pub struct ConsoleHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleWriter {
    /// Start a drain thread writing into `sink`, buffering at most `capacity` bytes (at least 1).
    pub fn spawn(
        sink: Box<dyn Write + Send>,
        capacity: usize,
    ) -> io::Result<(ConsoleWriter, ConsoleHandle)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                data: VecDeque::new(),
                capacity: capacity.max(1),
                closed: false,
                writing: false,
            }),
            changed: Condvar::new(),
            dropped: Counter::default(),
            sink_errors: Counter::default(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferrite-console".into())
            .spawn(move || drain(&thread_shared, sink))?;
        Ok((
            ConsoleWriter {
                shared: shared.clone(),
            },
            ConsoleHandle {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut pending = self.shared.lock();
        if pending.closed {
            self.shared.dropped.add(buf.len() as u64);
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let room = pending.capacity.saturating_sub(pending.data.len());
        if room == 0 {
            self.shared.dropped.add(buf.len() as u64);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = room.min(buf.len());
        pending.data.extend(&buf[..n]);
        drop(pending);
        self.shared.changed.notify_all();
        Ok(n)
    }

    /// The drain thread flushes the sink after every batch; nothing to do on the vCPU thread.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

impl ConsoleHandle {
    /// Bytes dropped because the buffer was full or the sink had failed.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped.get()
    }

    /// Writes to the real sink that failed (a broken pipe ends draining).
    pub fn sink_errors(&self) -> u64 {
        self.shared.sink_errors.get()
    }

    /// Wait until everything queued so far reached the sink, for at most `timeout` (the sink may
    /// be stuck forever). Returns whether the buffer drained. Call at VM exit before returning.
    pub fn flush_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pending = self.shared.lock();
        loop {
            if pending.data.is_empty() && !pending.writing {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            pending = match self.shared.changed.wait_timeout(pending, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl Drop for ConsoleHandle {
    /// Joins the drain thread only if it already finished: a thread stuck on a dead sink must not
    /// hang the VMM's exit.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// The drain thread: move batches from the buffer to the sink until closed and empty.
fn drain(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    loop {
        let batch: Vec<u8> = {
            let mut pending = shared.lock();
            while pending.data.is_empty() && !pending.closed {
                pending = match shared.changed.wait(pending) {
                    Ok(guard) => guard,
                    Err(e) => e.into_inner(),
                };
            }
            if pending.data.is_empty() {
                return;
            }
            pending.writing = true;
            pending.data.drain(..).collect()
        };
        let result = sink.write_all(&batch).and_then(|()| sink.flush());
        let mut pending = shared.lock();
        pending.writing = false;
        if let Err(e) = result {
            shared.sink_errors.inc();
            shared.dropped.add(batch.len() as u64);
            if e.kind() == io::ErrorKind::BrokenPipe {
                // Nobody will ever read: drop everything from now on, quickly.
                pending.closed = true;
                shared.dropped.add(pending.data.len() as u64);
                pending.data.clear();
            }
            if shared.sink_errors.get() == 1 {
                tracing::warn!("Console output failed (further failures only counted): {e}");
            }
        }
        drop(pending);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// A sink that forwards to a channel, optionally blocking until released.
    struct GatedSink {
        gate: Option<mpsc::Receiver<()>>,
        out: mpsc::Sender<Vec<u8>>,
    }

    impl Write for GatedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(gate) = &self.gate {
                let _ = gate.recv();
            }
            let _ = self.out.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_console_writer_delivers_bytes_to_sink() {
        let (tx, rx) = mpsc::channel();
        let sink = GatedSink {
            gate: None,
            out: tx,
        };
        let (mut writer, handle) = ConsoleWriter::spawn(Box::new(sink), 16).unwrap();

        writer.write_all(b"hello").unwrap();
        drop(writer);

        let received: Vec<u8> = rx.iter().flatten().collect();
        assert_eq!(received, b"hello");
        assert!(handle.flush_timeout(Duration::from_secs(60)));
        assert_eq!(handle.dropped_bytes(), 0);
    }

    #[test]
    fn test_console_writer_full_buffer_drops_instead_of_blocking() {
        let (tx, rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel();
        let sink = GatedSink {
            gate: Some(gate_rx),
            out: tx,
        };
        let (mut writer, handle) = ConsoleWriter::spawn(Box::new(sink), 4).unwrap();

        // The drain thread takes at most one batch and then blocks in the sink; the buffer
        // behind it holds 4 more bytes: writing 100 single bytes must hit a full buffer.
        let mut lost = 0;
        for _ in 0..100 {
            if writer.write_all(b"x").is_err() {
                lost += 1;
            }
        }

        assert!(lost >= 100 - 8);
        assert_eq!(handle.dropped_bytes(), lost);
        assert!(!handle.flush_timeout(Duration::ZERO));
        drop(gate_tx); // Release the sink.
        drop(writer);
        let delivered: usize = rx.iter().map(|b| b.len()).sum();
        assert_eq!(delivered as u64 + lost, 100);
    }

    /// A sink whose reader has gone away.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_console_writer_broken_pipe_drops_later_output() {
        let (mut writer, handle) = ConsoleWriter::spawn(Box::new(ClosedPipe), 16).unwrap();
        writer.write_all(b"ab").unwrap();
        assert!(handle.flush_timeout(Duration::from_secs(600)));

        let result = writer.write_all(b"cd");

        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(handle.dropped_bytes(), 4);
        assert_eq!(handle.sink_errors(), 1);
    }
}
