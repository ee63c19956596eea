//! The serial console as the host sees it: one output sink and one input path that outlive
//! VM rebuilds (a guest reboot keeps the same terminal).

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use devices::serial::DEFAULT_CONSOLE_BUFFER;
use devices::{ConsoleHandle, ConsoleWriter, Serial};
use vmm_sys_util::eventfd::EventFd;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest console output (buffered, drained by a thread so a stalled reader never blocks a
/// vCPU) and the input path into the current VM's COM1.
pub struct Console {
    writer: Arc<Mutex<ConsoleWriter>>,
    handle: ConsoleHandle,
    input: ConsoleInput,
}

impl Console {
    /// A console writing guest output to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> io::Result<Self> {
        let (writer, handle) = ConsoleWriter::spawn(sink, DEFAULT_CONSOLE_BUFFER)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            handle,
            input: ConsoleInput::default(),
        })
    }

    /// A `Write` handle for one VM's UART.
    pub fn uart_output(&self) -> Box<dyn Write + Send> {
        Box::new(SharedWriter(self.writer.clone()))
    }

    /// The input path (cloneable; give it to the stdin thread).
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }

    /// Wait (bounded) until queued output reached the sink.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.handle.flush_timeout(timeout)
    }

    /// Guest output bytes lost because the sink stalled.
    pub fn dropped_bytes(&self) -> u64 {
        self.handle.dropped_bytes()
    }
}

struct SharedWriter(Arc<Mutex<ConsoleWriter>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        lock(&self.0).flush()
    }
}

struct InputTarget {
    serial: Arc<Mutex<Serial>>,
    room: EventFd,
}

/// Host keyboard input into whichever VM currently runs (none while a VM is being rebuilt).
#[derive(Clone, Default)]
pub struct ConsoleInput {
    target: Arc<Mutex<Option<InputTarget>>>,
    /// Signalled when a VM attaches, so input typed while none is (during a build or a
    /// restore) goes in as soon as one is.
    attached: Arc<Condvar>,
}

impl ConsoleInput {
    /// Route input to `serial` (called by the builder for each new VM).
    pub fn attach(&self, serial: Arc<Mutex<Serial>>) -> io::Result<()> {
        let room = lock(&serial).input_space_event()?;
        *lock(&self.target) = Some(InputTarget { serial, room });
        self.attached.notify_all();
        Ok(())
    }

    /// Stop routing input (the VM is going away).
    pub fn detach(&self) {
        *lock(&self.target) = None;
    }

    /// Offer `bytes` to the guest; returns how many the UART took (0 when its FIFO is full or
    /// no VM is attached).
    pub fn send(&self, bytes: &[u8]) -> usize {
        match &*lock(&self.target) {
            Some(t) => lock(&t.serial).enqueue_input(bytes),
            None => 0,
        }
    }

    /// Whether a VM is attached.
    pub fn attached(&self) -> bool {
        lock(&self.target).is_some()
    }

    /// Wait up to `timeout` for the guest to drain the receive FIFO.
    pub fn wait_for_room(&self, timeout: Duration) {
        let fd = match &*lock(&self.target) {
            Some(t) => t.room.try_clone().ok(),
            None => None,
        };
        match fd {
            Some(ev) => {
                let mut pfd = libc::pollfd {
                    fd: ev.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
                let _ = ev.read();
            }
            None => {
                let guard = lock(&self.target);
                let _ = self
                    .attached
                    .wait_timeout_while(guard, timeout, |t| t.is_none());
            }
        }
    }
}
