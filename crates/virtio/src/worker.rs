//! The per-device worker thread: waits (epoll) on the queue doorbells, a kill eventfd and a
//! pause eventfd, and hands queue notifications to a [`QueueHandler`].

use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Result, VirtioError};

/// What the worker thread runs when a queue's doorbell rings.
pub trait QueueHandler: Send + 'static {
    /// Queue `index` was notified: process what the driver made available.
    fn process_queue(&mut self, index: usize);
}

const KILL_TOKEN: u64 = u64::MAX;
const PAUSE_TOKEN: u64 = u64::MAX - 1;

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
                // Drain anything rung before activation: the driver may have notified already.
                for i in 0..queue_events.len() {
                    handler.process_queue(i);
                }
                let mut events = vec![EpollEvent::default(); queue_events.len() + 2];
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
}
