//! The host side of the multiplexer: the listening socket, clients sending their
//! `CONNECT <port>` line, readiness of connected sockets, epoll interest, timeouts.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::Instant;

use super::super::connection::{ConnKey, ConnState, Connection};
use super::super::hostsock::{parse_connect, peek, MAX_CONNECT_LINE};
use super::super::metrics::VsockMetrics;
use super::{PendingHost, VsockHandler, CONNECT_LINE_TIMEOUT, REQUEST_TIMEOUT, TICK};
use crate::worker::{EventControl, EventSet};

impl VsockHandler {
    pub(super) fn sync_interest(&mut self, ctl: &EventControl<'_>) {
        let dirty = std::mem::take(&mut self.dirty);
        for token in dirty {
            let Some(key) = self.tokens.get(&token).copied() else {
                continue;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let desired = c.desired_events();
            let r = match (c.stream(), c.registered, desired) {
                // A closed socket left the epoll set with its last descriptor.
                (None, _, _) => Ok(()),
                (Some(s), None, Some(ev)) => ctl.add(s.as_raw_fd(), ev, token),
                (Some(s), Some(r), Some(ev)) if r != ev => ctl.modify(s.as_raw_fd(), ev, token),
                (Some(s), Some(_), None) => ctl.remove(s.as_raw_fd()),
                _ => Ok(()),
            };
            match r {
                Ok(()) => c.registered = desired,
                Err(e) => {
                    tracing::warn!("virtio-vsock: cannot watch a host socket: {e}");
                    c.reset();
                    c.registered = None;
                    VsockMetrics::add(&self.metrics.resets, 1);
                    self.enqueue(key);
                }
            }
        }
    }

    pub(super) fn accept_all(&mut self, ctl: &EventControl<'_>) {
        for _ in 0..64 {
            let stream = match self.host.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors: the client would stay in the backlog and the
                    // level-triggered listener would spin. Free the spare, refuse the
                    // client, take the spare back.
                    tracing::warn!("virtio-vsock: out of file descriptors, refusing a client");
                    VsockMetrics::add(&self.metrics.host_connect_errors, 1);
                    self.spare_fd = None;
                    drop(self.host.listener.accept());
                    self.spare_fd = std::fs::File::open("/dev/null").ok();
                    return;
                }
                Err(e) => {
                    tracing::warn!("virtio-vsock: accept failed: {e}");
                    return;
                }
            };
            if self.broken || self.at_capacity() || stream.set_nonblocking(true).is_err() {
                VsockMetrics::add(&self.metrics.host_connect_errors, 1);
                continue;
            }
            let Some(token) = self.alloc_token() else {
                VsockMetrics::add(&self.metrics.host_connect_errors, 1);
                continue;
            };
            if ctl.add(stream.as_raw_fd(), EventSet::IN, token).is_err() {
                VsockMetrics::add(&self.metrics.host_connect_errors, 1);
                continue;
            }
            self.pending_host.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
            self.arm_timer();
        }
    }

    /// A client that is still sending `CONNECT <port>\n` has bytes (or hung up).
    pub(super) fn on_pending_host(&mut self, token: u32) {
        let Some(ph) = self.pending_host.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - ph.line.len();
        let outcome = match peek(&ph.stream, &mut buf[..room]) {
            Ok(0) => Err(()),
            Ok(n) => {
                // Consume up to the newline only: what follows is the client's payload.
                let take = buf[..n]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(n, |p| p + 1);
                let mut got = vec![0u8; take];
                match ph.stream.read_exact(&mut got) {
                    Ok(()) => {
                        ph.line.extend_from_slice(&got);
                        if ph.line.last() == Some(&b'\n') {
                            parse_connect(&ph.line).ok_or(()).map(Some)
                        } else if ph.line.len() >= MAX_CONNECT_LINE {
                            Err(())
                        } else {
                            Ok(None)
                        }
                    }
                    Err(_) => Err(()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(_) => Err(()),
        };
        match outcome {
            Ok(None) => {}
            Err(()) => {
                VsockMetrics::add(&self.metrics.host_connect_errors, 1);
                self.pending_host.remove(&token);
            }
            Ok(Some(peer_port)) => {
                let Some(ph) = self.pending_host.remove(&token) else {
                    return;
                };
                let Some(local_port) = self.alloc_local_port() else {
                    VsockMetrics::add(&self.metrics.host_connect_errors, 1);
                    return;
                };
                let key = ConnKey {
                    local_port,
                    peer_port,
                };
                let mut c =
                    Connection::new_host_initiated(token, key, ph.stream, self.host.guest_cid);
                c.registered = Some(EventSet::IN);
                self.conns.insert(key, c);
                self.tokens.insert(token, key);
                self.host_ports.insert(local_port);
                self.update_gauge();
                self.touched(key);
            }
        }
    }

    pub(super) fn on_conn_event(&mut self, token: u32, events: EventSet) {
        let Some(key) = self.tokens.get(&token).copied() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            c.reset();
            VsockMetrics::add(&self.metrics.resets, 1);
        } else {
            if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
                c.info.pending.data = true;
            }
            if events.contains(EventSet::HANG_UP) {
                // Always reported, whatever the interest: take the socket out of the set and
                // let reads and writes find out the rest.
                c.hup = true;
            }
            if events.contains(EventSet::OUT) {
                c.flush_to_host();
                if c.info.state == ConnState::Closing {
                    VsockMetrics::add(&self.metrics.resets, 1);
                }
            }
        }
        self.touched(key);
    }

    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        let before = self.pending_host.len();
        self.pending_host
            .retain(|_, p| now.duration_since(p.since) < CONNECT_LINE_TIMEOUT);
        let dropped = before - self.pending_host.len();
        VsockMetrics::add(&self.metrics.host_connect_errors, dropped as u64);
        let late: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| {
                c.info.state == ConnState::LocalInit
                    && now.duration_since(c.since) >= REQUEST_TIMEOUT
            })
            .map(|c| c.info.key)
            .collect();
        for key in late {
            if let Some(c) = self.conns.get_mut(&key) {
                tracing::debug!(
                    "virtio-vsock: guest did not answer a request to port {}",
                    key.peer_port
                );
                c.reset();
                VsockMetrics::add(&self.metrics.host_connect_errors, 1);
            }
            self.touched(key);
        }
    }

    /// Make sure the timeout check runs while a client or a request waits.
    pub(super) fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        if let Some(t) = self.timer.as_mut() {
            match t.reset(TICK, None) {
                Ok(()) => self.timer_armed = true,
                Err(e) => tracing::error!("virtio-vsock: cannot arm the timeout timer: {e}"),
            }
        }
    }

    pub(super) fn anything_waits(&self) -> bool {
        !self.pending_host.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.info.state == ConnState::LocalInit)
    }

    pub(super) fn kick_if_dirty(&self) {
        if !self.dirty.is_empty() {
            if let Err(e) = self.kick.write(1) {
                tracing::error!("virtio-vsock: cannot wake the worker: {e}");
            }
        }
    }
}
