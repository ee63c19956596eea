//! The per-device worker thread: waits (epoll) on the queue doorbells, a kill eventfd, a
//! pause eventfd and any file descriptors the device registers (a TAP device, sockets, a
//! rate limiter's timer), and hands each event to a [`QueueHandler`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Result, VirtioError};

/// What the worker thread runs when a queue's doorbell rings or a registered fd is ready.
pub trait QueueHandler: Send + 'static {
    /// Queue `index` was notified: process what the driver made available.
    fn process_queue(&mut self, index: usize);

    /// Called once on the worker thread before anything else: register the device's own
    /// file descriptors (TAP, sockets, timers) with `ctl`.
    fn register(&mut self, _ctl: &EventControl<'_>) -> std::io::Result<()> {
        Ok(())
    }

    /// A descriptor registered under `token` is ready with `events`. `ctl` adds, changes or
    /// removes descriptors (connections come and go).
    fn process_event(&mut self, _token: u32, _events: EventSet, _ctl: &EventControl<'_>) {}
}

const KILL_TOKEN: u64 = u64::MAX;
const PAUSE_TOKEN: u64 = u64::MAX - 1;
/// Handler tokens are stored above every queue index.
const HANDLER_TOKEN_BASE: u64 = 1 << 32;

/// The worker's epoll set as seen by a [`QueueHandler`]: handler tokens are a separate space
/// from queue indices, so a device cannot confuse the two.
pub struct EventControl<'a> {
    epoll: &'a Epoll,
}

impl EventControl<'_> {
    /// Watch `fd` for `events`, reported to [`QueueHandler::process_event`] as `token`.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u32) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, HANDLER_TOKEN_BASE + u64::from(token)),
        )
    }

    /// Change the events watched on `fd` (already added).
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u32) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, HANDLER_TOKEN_BASE + u64::from(token)),
        )
    }

    /// Stop watching `fd` (call before closing it).
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

#[derive(Default)]
struct PauseState {
    requested: bool,
    acknowledged: bool,
}

/// Handle on a running worker thread. Dropping it stops and joins the thread.
pub struct Worker {
    kill: EventFd,
    pause_evt: EventFd,
    pause: Arc<(Mutex<PauseState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start a thread named `name` serving `queue_events` with `handler`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        queue_events: Vec<EventFd>,
        mut handler: H,
    ) -> Result<Self> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let pause_evt = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            pause_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, PAUSE_TOKEN),
        )?;
        for (i, evt) in queue_events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let pause: Arc<(Mutex<PauseState>, Condvar)> = Arc::default();
        let thread_kill = kill.try_clone()?;
        let thread_pause_evt = pause_evt.try_clone()?;
        let thread_pause = pause.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let ctl = EventControl { epoll: &epoll };
                if let Err(e) = handler.register(&ctl) {
                    tracing::error!("virtio worker cannot register device fds: {e}");
                    return;
                }
                // Drain anything rung before activation: the driver may have notified already.
                for i in 0..queue_events.len() {
                    handler.process_queue(i);
                }
                let mut events = vec![EpollEvent::default(); queue_events.len() + 64];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!("virtio worker epoll failed: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        match ev.data() {
                            KILL_TOKEN => {
                                let _ = thread_kill.read();
                                return;
                            }
                            PAUSE_TOKEN => {
                                let _ = thread_pause_evt.read();
                                let (lock, cvar) = &*thread_pause;
                                let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                                if st.requested {
                                    st.acknowledged = true;
                                    cvar.notify_all();
                                    while st.requested {
                                        st = cvar.wait(st).unwrap_or_else(|e| e.into_inner());
                                    }
                                    st.acknowledged = false;
                                }
                                // Doorbells rung while paused are still counted in their
                                // eventfds, so epoll reports them on the next wait.
                            }
                            t if t >= HANDLER_TOKEN_BASE => {
                                let token = (t - HANDLER_TOKEN_BASE) as u32;
                                handler.process_event(token, ev.event_set(), &ctl);
                            }
                            i => {
                                let Some(evt) = queue_events.get(i as usize) else {
                                    continue;
                                };
                                // The eventfd only wakes us; the avail ring is the truth.
                                let _ = evt.read();
                                handler.process_queue(i as usize);
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            kill,
            pause_evt,
            pause,
            thread: Some(thread),
        })
    }

    fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop processing: returns once the thread has finished its current batch of requests
    /// and parked. Safe to call when already paused.
    pub fn pause(&self) -> Result<()> {
        let (lock, cvar) = &*self.pause;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.requested = true;
        self.pause_evt.write(1)?;
        while !st.acknowledged {
            if !self.alive() {
                st.requested = false;
                return Err(VirtioError::WorkerGone);
            }
            // The timeout only re-checks that the thread is still alive.
            let (g, _) = cvar
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner());
            st = g;
        }
        Ok(())
    }

    /// Let a paused worker continue.
    pub fn resume(&self) {
        let (lock, cvar) = &*self.pause;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.requested = false;
        cvar.notify_all();
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        self.resume();
        if let Err(e) = self.kill.write(1) {
            tracing::error!("cannot signal virtio worker to stop: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("virtio worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo(mpsc::Sender<usize>);
    impl QueueHandler for Echo {
        fn process_queue(&mut self, index: usize) {
            let _ = self.0.send(index);
        }
    }

    #[test]
    fn test_worker_dispatches_pauses_and_stops() {
        let (tx, rx) = mpsc::channel();
        let evts = vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let bell = evts[1].try_clone().unwrap();
        let mut w = Worker::spawn("test-worker", evts, Echo(tx)).unwrap();
        // Initial drain of both queues.
        assert_eq!(rx.recv().unwrap(), 0);
        assert_eq!(rx.recv().unwrap(), 1);
        bell.write(1).unwrap();
        assert_eq!(rx.recv().unwrap(), 1);
        w.pause().unwrap();
        bell.write(1).unwrap();
        assert!(rx.try_recv().is_err());
        w.resume();
        assert_eq!(rx.recv().unwrap(), 1);
        w.stop();
        assert!(!w.alive());
    }

    struct Watcher {
        fd: EventFd,
        tx: mpsc::Sender<u32>,
    }
    impl QueueHandler for Watcher {
        fn process_queue(&mut self, _index: usize) {}
        fn register(&mut self, ctl: &EventControl<'_>) -> std::io::Result<()> {
            ctl.add(self.fd.as_raw_fd(), EventSet::IN, 7)
        }
        fn process_event(&mut self, token: u32, events: EventSet, ctl: &EventControl<'_>) {
            assert!(events.contains(EventSet::IN));
            let _ = self.fd.read();
            let _ = ctl.remove(self.fd.as_raw_fd());
            let _ = self.tx.send(token);
        }
    }

    #[test]
    fn test_worker_registered_fd_reaches_handler_with_its_token() {
        let (tx, rx) = mpsc::channel();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let bell = fd.try_clone().unwrap();
        let _w = Worker::spawn(
            "test-watch",
            vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            Watcher { fd, tx },
        )
        .unwrap();

        bell.write(1).unwrap();

        assert_eq!(rx.recv().unwrap(), 7);
    }
}
