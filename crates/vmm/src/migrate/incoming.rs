//! The destination side of a live migration (`ferrite run --incoming ENDPOINT`): accept one
//! source, check its hello, receive guest RAM into fresh anonymous memory, then the VM's
//! state; the VM is built from it and its vCPUs start only once the source commits.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use migration::wire::{self, Frame, Hello, Reply};
use migration::{Endpoint, Listener, MigrationError, Stream, TlsServer};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::disk_receive::ReceivedDisks;
use crate::config::VmConfig;
use crate::vm_snapshot::{LoadedSnapshot, SnapshotMemory};

/// How long the destination waits for the source's commit once it reported ready.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one read from the source may block while memory arrives.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors receiving a VM.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The stream failed or the source broke the protocol.
    #[error(transparent)]
    Stream(#[from] MigrationError),
    /// The source's VM cannot run here (refused before any memory moved).
    #[error("Refused the incoming VM: {0}")]
    Refused(String),
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The KVM VM could not be created.
    #[error("Cannot create the VM: {0}")]
    Prebuild(String),
    /// A received disk could not be written (or the source sent a bad disk frame).
    #[error("Block migration: {0}")]
    Disk(String),
    /// The received state is not usable.
    #[error(transparent)]
    State(#[from] crate::vm_snapshot::VmSnapshotError),
}

/// A source connected and accepted: its VM's configuration is known, memory not yet
/// received.
pub struct Incoming {
    stream: Stream,
    /// Kept for the extra connections of a parallel round 0 ([`Frame::Parallel`]).
    listener: Listener,
    hello: Hello,
    /// Same-host handover: guest RAM's memory files, one per region.
    memory_files: Option<Vec<std::fs::File>>,
    /// Block migration: the images the disks' contents go into (removed unless committed).
    disks: ReceivedDisks,
    /// The VM's configuration (the source's; with a block migration its disks point at the
    /// images created here).
    pub config: VmConfig,
}

/// Wait on `endpoint` for one source and check its hello (protocol and Ferrite versions, a
/// valid configuration whose memory layout matches the one it announces). With `tls`, the
/// source must connect with TLS and a certificate `tls` accepts. A block migration's disks
/// are created in `disk_dir` (refused without one, or when a file is in the way) before it
/// is accepted. Refusals are told to the source before they are returned.
pub fn accept(
    endpoint: &Endpoint,
    tls: Option<&TlsServer>,
    disk_dir: Option<&Path>,
) -> Result<Incoming, IncomingError> {
    let listener = endpoint.listen(tls)?;
    tracing::info!(
        endpoint = listener.describe(),
        tls = tls.is_some(),
        "waiting for the migration source"
    );
    let mut stream = listener.accept()?;
    stream.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
    let hello = match wire::read_hello(&mut stream) {
        Ok(h) => h,
        Err(e @ MigrationError::Incompatible(_)) => {
            let _ = wire::write_reply(&mut stream, &Reply::Refuse(e.to_string()));
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let checked = check_hello(&hello).and_then(|mut config| {
        if hello.memory_fds && !hello.disks.is_empty() {
            return Err("disk copies in a same-host handover are not supported".to_string());
        }
        let disks = ReceivedDisks::create(disk_dir, &hello.disks, &mut config)?;
        Ok((config, disks))
    });
    match checked {
        Ok((config, disks)) => {
            wire::write_reply(&mut stream, &Reply::Accept)?;
            let memory_files = if hello.memory_fds {
                Some(receive_memory_files(&stream, hello.regions.len())?)
            } else {
                None
            };
            Ok(Incoming {
                stream,
                listener,
                hello,
                config,
                memory_files,
                disks,
            })
        }
        Err(reason) => {
            let _ = wire::write_reply(&mut stream, &Reply::Refuse(reason.clone()));
            Err(IncomingError::Refused(reason))
        }
    }
}

/// Receive the memory files of a same-host handover: exactly one per region.
fn receive_memory_files(
    stream: &Stream,
    regions: usize,
) -> Result<Vec<std::fs::File>, IncomingError> {
    let (tag, files) = stream.recv_fds(wire::MEMORY_FDS_TAG.len(), regions + 1)?;
    if tag != wire::MEMORY_FDS_TAG || files.len() != regions {
        return Err(MigrationError::Protocol(format!(
            "expected {regions} memory files, got {} with a {}-byte message",
            files.len(),
            tag.len()
        ))
        .into());
    }
    Ok(files)
}

fn check_hello(hello: &Hello) -> Result<VmConfig, String> {
    let ours = env!("CARGO_PKG_VERSION");
    if hello.ferrite_version != ours {
        return Err(format!(
            "the source runs Ferrite {}, this destination {ours}: run the same version on both \
             hosts",
            hello.ferrite_version
        ));
    }
    if hello.postcopy && hello.memory_fds {
        return Err("post-copy and a same-host memory handover exclude each other".to_string());
    }
    let config: VmConfig = serde_json::from_value(hello.config.clone())
        .map_err(|e| format!("its configuration cannot be read here: {e}"))?;
    crate::devices::vsock::validate_incoming(&config, None).map_err(|e| e.to_string())?;
    // Before any memory moves: a VM that asks for the dirty ring explicitly does not run on a
    // host without it (with auto it falls back to the bitmap here).
    if config.dirty_log == crate::config::DirtyLogMode::Ring && !crate::dirty::host_offers_ring() {
        return Err(
            "the VM asks for the dirty ring (--dirty-log ring), which this host's KVM lacks \
             (no KVM_CAP_DIRTY_LOG_RING): run the VM with --dirty-log auto or bitmap"
                .to_string(),
        );
    }
    let layout =
        arch::e820::MemoryLayout::new(config.memory_bytes, Some(arch::e820::host_phys_bits()))
            .map_err(|e| e.to_string())?;
    let ranges = layout.ram_ranges();
    let same = ranges.len() == hello.regions.len()
        && ranges
            .iter()
            .zip(&hello.regions)
            .all(|(r, h)| r.0 .0 == h.guest_addr && r.1 as u64 == h.size);
    if !same {
        return Err(
            "its memory layout differs from the one its configuration gives here (the \
                    hosts differ in physical address width?)"
                .to_string(),
        );
    }
    Ok(config)
}

/// Guest RAM as the receivers write it, checked against the regions the hello announced.
#[derive(Clone)]
struct RamTarget {
    infos: Vec<migration::wire::RegionInfo>,
    /// (host address, bytes) per region.
    regions: Vec<(usize, u64)>,
    /// Keeps the mappings alive while any receiver runs (a failed receive may return while
    /// extra-connection threads still write).
    _memory: vm_device::GuestMemoryMmap,
}

impl RamTarget {
    /// Write a page run (its bytes come from `reader`) or empty a zero run.
    fn apply(&self, frame: &Frame, reader: &mut impl std::io::Read) -> Result<(), IncomingError> {
        match *frame {
            Frame::Pages {
                region,
                first_page,
                count,
            } => {
                let (offset, len) =
                    wire::run_bounds(&self.infos, region, first_page, u64::from(count))?;
                let (base, size) = self.regions[region as usize];
                debug_assert!(offset + len <= size);
                // SAFETY: run_bounds checked offset..offset+len lies inside region `region`
                // (the hello's sizes equal the mapped regions', checked at accept); the
                // mapping is owned by the received memory, no vCPU runs yet, and the
                // receivers of a parallel round 0 write disjoint runs.
                let dest = unsafe {
                    std::slice::from_raw_parts_mut(
                        (base + offset as usize) as *mut u8,
                        len as usize,
                    )
                };
                wire::read_pages_into(reader, dest)?;
            }
            Frame::Zero {
                region,
                first_page,
                count,
            } => {
                let (offset, len) = wire::run_bounds(&self.infos, region, first_page, count)?;
                let (base, _) = self.regions[region as usize];
                // SAFETY: as above; the range is page-aligned inside a private anonymous
                // mapping, which MADV_DONTNEED turns back into zero pages.
                let ret = unsafe {
                    libc::madvise(
                        (base + offset as usize) as *mut libc::c_void,
                        len as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if ret != 0 {
                    return Err(MigrationError::Io(std::io::Error::last_os_error()).into());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// How long the destination waits for each announced extra connection.
const STRIPE_ACCEPT: Duration = Duration::from_secs(10);

impl Incoming {
    /// Accept the `count` extra connections a parallel round 0 announced (each must present
    /// `token` and its own index) and receive their page runs on threads of their own.
    fn accept_stripes(
        &self,
        count: u32,
        token: u64,
        ram: &RamTarget,
    ) -> Result<Vec<std::thread::JoinHandle<Result<(), IncomingError>>>, IncomingError> {
        let mut seen = vec![false; count as usize];
        let mut handles = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut stream = self.listener.accept_within(STRIPE_ACCEPT)?;
            stream.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
            let (got, index) = wire::read_parallel_hello(&mut stream)?;
            let slot = index
                .checked_sub(1)
                .and_then(|i| seen.get_mut(i as usize))
                .filter(|s| !**s);
            match slot {
                Some(s) if got == token => *s = true,
                _ => {
                    return Err(MigrationError::Protocol(
                        "an extra connection with a wrong token or index".into(),
                    )
                    .into())
                }
            }
            let ram = ram.clone();
            let handle = std::thread::Builder::new()
                .name(format!("migrate-stripe{index}"))
                .spawn(move || -> Result<(), IncomingError> {
                    let mut reader = std::io::BufReader::with_capacity(1 << 20, stream);
                    loop {
                        match wire::read_frame(&mut reader)? {
                            frame @ (Frame::Pages { .. } | Frame::Zero { .. }) => {
                                ram.apply(&frame, &mut reader)?
                            }
                            Frame::Done => return Ok(()),
                            other => {
                                return Err(MigrationError::Protocol(format!(
                                    "unexpected {other:?} on an extra connection"
                                ))
                                .into())
                            }
                        }
                    }
                })
                .map_err(MigrationError::Io)?;
            handles.push(handle);
        }
        Ok(handles)
    }

    /// Receive guest RAM and the VM's state. The returned snapshot carries the commit gate:
    /// the builder calls it with the VM built, right before the vCPUs start.
    pub fn receive(mut self) -> Result<LoadedSnapshot, IncomingError> {
        let layout = arch::e820::MemoryLayout::new(
            self.config.memory_bytes,
            Some(arch::e820::host_phys_bits()),
        )
        .map_err(|e| IncomingError::Refused(e.to_string()))?;
        let handed_over = self.memory_files.is_some();
        let mem = match self.memory_files.take() {
            Some(files) => {
                crate::memory::create_guest_memory_from_files(&layout.ram_ranges(), files)?
            }
            None => crate::memory::create_guest_memory(&layout.ram_ranges())?,
        };
        // The KVM VM is built while memory arrives, off the guest's pause.
        let mut prebuild_done = None;
        let mut prebuild = Some({
            let (config, mem) = (self.config.clone(), mem.clone());
            std::thread::Builder::new()
                .name("migrate-prebuild".into())
                .spawn(move || crate::builder::PrebuiltVm::create(&config, &mem))
                .map_err(MigrationError::Io)?
        });
        if handed_over {
            // The source pauses only once the VM is built over its memory.
            let prebuilt = join_prebuild(prebuild.take())?;
            wire::write_reply(&mut self.stream, &Reply::Mapped)?;
            prebuild_done = Some(prebuilt);
        }
        let regions: Vec<(*mut u8, u64)> = mem.iter().map(|r| (r.as_ptr(), r.len())).collect();
        let mut fetch = super::postcopy::FetchMaps::new(regions.len());
        // Only read until the state arrived; the start gate writes on `self.stream` after
        // `reader` is gone (over TLS both share one connection).
        let mut reader = std::io::BufReader::with_capacity(1 << 20, self.stream.try_clone()?);
        let mut disk_buf = Vec::new();
        let ram = RamTarget {
            infos: self.hello.regions.clone(),
            regions: regions.iter().map(|&(p, len)| (p as usize, len)).collect(),
            _memory: mem.clone(),
        };
        // A parallel round 0's extra connections, until their pages are all in.
        let mut stripes: Option<Vec<std::thread::JoinHandle<Result<(), IncomingError>>>> = None;
        let state = loop {
            let frame = wire::read_frame(&mut reader)?;
            if !matches!(frame, Frame::Pages { .. } | Frame::Zero { .. }) {
                // Whatever follows round 0 may rewrite its pages: they must be in first.
                if let Some(handles) = stripes.as_mut() {
                    for h in handles.drain(..) {
                        h.join().map_err(|_| {
                            MigrationError::Protocol("a stripe receiver panicked".into())
                        })??;
                    }
                }
            }
            match frame {
                Frame::Pages { .. } | Frame::Zero { .. } if handed_over => {
                    return Err(MigrationError::Protocol(
                        "page data in a same-host handover, whose memory is shared".into(),
                    )
                    .into())
                }
                Frame::Pages { .. } | Frame::Zero { .. } if fetch.any() => {
                    return Err(MigrationError::Protocol(
                        "page data after the post-copy fetch maps, before the state".into(),
                    )
                    .into())
                }
                Frame::Fetch { region, bitmap } if self.hello.postcopy => {
                    fetch.set(&self.hello.regions, region, bitmap)?;
                }
                frame @ (Frame::Pages { .. } | Frame::Zero { .. }) => {
                    ram.apply(&frame, &mut reader)?
                }
                Frame::Parallel { count, token } if !handed_over && stripes.is_none() => {
                    stripes = Some(self.accept_stripes(count, token, &ram)?);
                }
                Frame::DiskData { disk, offset, len } => {
                    // Checked before a byte is read into the buffer or written.
                    wire::disk_bounds(&self.hello.disks, disk, offset, u64::from(len))?;
                    disk_buf.resize(len as usize, 0);
                    wire::read_pages_into(&mut reader, &mut disk_buf)?;
                    self.disks
                        .write(disk, offset, &disk_buf)
                        .map_err(IncomingError::Disk)?;
                }
                Frame::DiskZero { disk, offset, len } => {
                    self.disks
                        .zero(disk, offset, len)
                        .map_err(IncomingError::Disk)?;
                }
                Frame::Round(n) => tracing::debug!(round = n, "migration round"),
                Frame::DiskSync => {
                    // The source is about to pause: what arrived so far goes to storage now,
                    // while the guest still runs there, so the flush in the pause is short.
                    self.disks.flush().map_err(IncomingError::Disk)?;
                    wire::write_reply(&mut self.stream, &Reply::DiskSynced)?;
                }
                Frame::State(bytes) => match wire::read_frame(&mut reader)? {
                    Frame::Done => break bytes,
                    other => {
                        return Err(MigrationError::Protocol(format!(
                            "expected the end of the stream after the state, got {other:?}"
                        ))
                        .into())
                    }
                },
                Frame::Abort(reason) => {
                    return Err(MigrationError::Refused {
                        side: "source",
                        reason,
                    }
                    .into())
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "unexpected {other:?} before the state"
                    ))
                    .into())
                }
            }
        };
        // The VM opens the images next.
        self.disks.close().map_err(IncomingError::Disk)?;
        let state = snapshot::StateReader::from_bytes(&state, Path::new("the migration stream"))
            .map_err(crate::vm_snapshot::VmSnapshotError::from)?;
        let mut snap =
            crate::vm_snapshot::from_reader(&state, None, SnapshotMemory::Received(mem))?;
        let prebuilt = match prebuild_done {
            Some(p) => p,
            None => join_prebuild(prebuild.take())?,
        };
        snap.prebuilt = Some(Mutex::new(Some(prebuilt)));
        // The state's configuration is the source's: its disks are the received images.
        snap.meta.config.disks = self.config.disks.clone();
        let gate = if self.hello.postcopy {
            // From here on guest RAM faults are served from the stream: the state is applied
            // and the guest runs before every page arrived.
            let SnapshotMemory::Received(mem) = &snap.memory else {
                return Err(IncomingError::Prebuild(
                    "received memory went missing".into(),
                ));
            };
            let postcopy = super::postcopy::start(
                mem,
                &self.hello.regions,
                fetch,
                Box::new(reader),
                self.stream,
            )?;
            StartGate {
                writer: postcopy.writer,
                commits: Some(postcopy.events),
                disks: self.disks,
            }
        } else {
            drop(reader);
            StartGate {
                writer: std::sync::Arc::new(Mutex::new(self.stream)),
                commits: None,
                disks: self.disks,
            }
        };
        snap.start_gate = Some(Mutex::new(Some(gate)));
        Ok(snap)
    }
}

fn join_prebuild(
    prebuild: Option<std::thread::JoinHandle<Result<crate::builder::PrebuiltVm, crate::VmmError>>>,
) -> Result<crate::builder::PrebuiltVm, IncomingError> {
    prebuild
        .ok_or_else(|| IncomingError::Prebuild("it was already taken".into()))?
        .join()
        .map_err(|_| IncomingError::Prebuild("the thread building it panicked".into()))?
        .map_err(|e| IncomingError::Prebuild(crate::error::chain_to_line(&e)))
}

/// Holds the destination's vCPUs until the source commits.
pub struct StartGate {
    /// The stream's write half (post-copy's fault thread writes on it too).
    writer: std::sync::Arc<Mutex<Stream>>,
    /// Post-copy: the receiver thread reads the stream and reports the commit here;
    /// otherwise the gate reads it from the stream itself.
    commits: Option<std::sync::mpsc::Receiver<super::postcopy::GateEvent>>,
    /// Removed if the gate never opens; kept once the source committed.
    disks: ReceivedDisks,
}

impl StartGate {
    fn reply(&self, reply: &Reply) -> Result<(), MigrationError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        wire::write_reply(&mut *w, reply)
    }

    /// Tell the source the VM is ready and wait for its commit; then confirm it runs. An
    /// error means the guest must not run here.
    pub fn open(self) -> Result<(), String> {
        self.reply(&Reply::Ready).map_err(|e| e.to_string())?;
        match &self.commits {
            Some(events) => match events.recv_timeout(COMMIT_TIMEOUT) {
                Ok(super::postcopy::GateEvent::Commit) => {}
                Ok(super::postcopy::GateEvent::Failed(reason)) => return Err(reason),
                Err(_) => return Err("the source did not commit in time".to_string()),
            },
            None => {
                let mut stream = self.writer.lock().unwrap_or_else(|e| e.into_inner());
                stream
                    .set_read_timeout(Some(COMMIT_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                match wire::read_frame(&mut *stream).map_err(|e| e.to_string())? {
                    Frame::Commit => {}
                    Frame::Abort(reason) => return Err(format!("the source aborted: {reason}")),
                    other => return Err(format!("expected the commit, got {other:?}")),
                }
            }
        }
        let StartGate { writer, disks, .. } = self;
        disks.keep();
        // Best effort: the source already stopped for good; if it misses this, it keeps its
        // copy paused and says so.
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = wire::write_reply(&mut *w, &Reply::Running) {
            tracing::warn!("cannot confirm the migration to the source: {e}");
        }
        Ok(())
    }
}
