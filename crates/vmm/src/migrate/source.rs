//! The source side of a live migration: pre-copy in rounds while the guest runs, then pause,
//! send the rest and the VM's state, and hand the guest over with a commit exchange. Until
//! the commit is sent, any failure (connection cut, destination refusal or death, cancel,
//! timeout) leaves the guest running here as if nothing happened.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use disk::DiskBackend;
use migration::wire::{self, Frame, Hello, RegionInfo, Reply, MAX_RUN_PAGES, PAGE_SIZE};
use migration::{Pacer, Stream};
use vm_device::ShutdownKind;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::disk_send::{self, CopiedDisk, Piece};
use super::throttle::Throttle;
use super::{Converge, MigrateOptions, MigrateTarget, MigrationStatus, Phase, SharedStatus};
use crate::control::VmOps;
use crate::live::LiveVm;

mod postcopy;

/// How long the source waits for the destination to connect-accept.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);
/// How long the source waits for the destination to build the VM from the final state.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source waits for the destination to confirm it runs the guest.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy rounds after which a remainder that still does not fit the budget counts as not
/// converging (throttle harder, or give up with [`Converge::Abort`]).
const FREE_ROUNDS: u32 = 4;
/// Auto-converge: the first throttle and each step up, percent.
const THROTTLE_STEP: u32 = 20;
/// Auto-converge ceiling, percent.
const THROTTLE_MAX: u32 = 95;
/// How long a failed migration's source waits for the destination to let go of the disks.
const DISK_RETAKE_PATIENCE: Duration = Duration::from_secs(10);
/// Pages in one stripe of a parallel round 0 (16 MiB).
const STRIPE_PAGES: usize = 4096;
/// Buffer in front of the socket: run headers and small runs are gathered.
const SEND_BUFFER: usize = 256 << 10;

/// What is still dirty when the copy rounds end: memory pages and disk blocks, one bitmap
/// per RAM region and per copied disk.
type DirtySets = (Vec<Vec<u64>>, Vec<Vec<u64>>);

/// A migration running on its own thread.
pub struct SourceJob {
    cancel: Arc<AtomicBool>,
    stream: Arc<Mutex<Vec<Stream>>>,
    thread: Option<JoinHandle<()>>,
}

impl SourceJob {
    /// Start migrating `vm` to `target` as `opts` says (`target` is what `opts.validate()`
    /// checked and loaded); progress goes to `status`.
    pub fn start(
        vm: Arc<LiveVm>,
        opts: MigrateOptions,
        target: MigrateTarget,
        status: SharedStatus,
    ) -> std::io::Result<Self> {
        let cancel = Arc::new(AtomicBool::new(false));
        let stream: Arc<Mutex<Vec<Stream>>> = Arc::default();
        {
            let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
            *st = MigrationStatus {
                phase: Phase::Connecting,
                to: opts.to.clone(),
                tls: target.tls.is_some(),
                ..MigrationStatus::default()
            };
        }
        let (c, s) = (cancel.clone(), stream.clone());
        let thread = std::thread::Builder::new()
            .name("migrate-source".into())
            .spawn(move || {
                let mut job = Migration {
                    vm: &vm,
                    opts: &opts,
                    status: &status,
                    cancel: &c,
                    stream_slot: &s,
                    target: &target,
                    start: Instant::now(),
                    committed: false,
                    paused_at: None,
                    resumed_at: None,
                    postcopy_started: false,
                    disks_released: false,
                    copied: Vec::new(),
                };
                let result = job.run(&target);
                job.finish(result);
            })?;
        Ok(Self {
            cancel,
            stream,
            thread: Some(thread),
        })
    }

    /// Whether the migration thread has ended.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Ask the migration to stop: the connection is cut, and the guest keeps running here
    /// unless the commit was already sent.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        for s in self.stream.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            s.shutdown();
        }
    }
}

impl Drop for SourceJob {
    fn drop(&mut self) {
        if !self.finished() {
            self.cancel();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a migration ended early.
pub(super) enum Failure {
    Cancelled,
    Failed(String),
}

impl From<migration::MigrationError> for Failure {
    fn from(e: migration::MigrationError) -> Self {
        Failure::Failed(e.to_string())
    }
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::Failed(m)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Failed(format!("Migration connection lost: {e}"))
    }
}

struct Migration<'a> {
    vm: &'a Arc<LiveVm>,
    opts: &'a MigrateOptions,
    status: &'a SharedStatus,
    cancel: &'a AtomicBool,
    /// Every connection of the migration, for a cancel to cut.
    stream_slot: &'a Mutex<Vec<Stream>>,
    target: &'a MigrateTarget,
    start: Instant,
    committed: bool,
    paused_at: Option<Instant>,
    /// When the destination said the guest runs there (post-copy: before every page
    /// arrived).
    resumed_at: Option<Instant>,
    /// Post-copy committed: the guest's memory is split between the hosts.
    postcopy_started: bool,
    disks_released: bool,
    /// Block migration: the disks whose contents are copied (empty: shared storage).
    copied: Vec<CopiedDisk>,
}

/// The socket with its buffer, pacing and counters.
struct Out {
    w: BufWriter<Stream>,
    pacer: Pacer,
    pages: u64,
    zeros: u64,
    /// Disk bytes sent with their data.
    disk_bytes: u64,
    /// Disk bytes sent as zero ranges (or left out in round 0).
    disk_zero_bytes: u64,
}

impl Out {
    fn frame(&mut self, frame: &Frame) -> Result<(), Failure> {
        let bytes = wire::frame_bytes(frame);
        self.w.write_all(&bytes)?;
        self.pacer.sent(bytes.len() as u64);
        Ok(())
    }

    fn pages(&mut self, region: u32, first: usize, data: &[u8]) -> Result<(), Failure> {
        self.frame(&Frame::Pages {
            region,
            first_page: first as u64,
            count: (data.len() as u64 / PAGE_SIZE) as u32,
        })?;
        self.w.write_all(data)?;
        self.pacer.sent(data.len() as u64);
        self.pages += data.len() as u64 / PAGE_SIZE;
        Ok(())
    }

    fn disk_piece(&mut self, disk: u32, piece: Piece<'_>) -> Result<(), Failure> {
        match piece {
            Piece::Data { offset, bytes } => {
                self.frame(&Frame::DiskData {
                    disk,
                    offset,
                    len: bytes.len() as u32,
                })?;
                self.w.write_all(bytes)?;
                self.pacer.sent(bytes.len() as u64);
                self.disk_bytes += bytes.len() as u64;
            }
            Piece::Zero { offset, len } => {
                self.frame(&Frame::DiskZero { disk, offset, len })?;
                self.disk_zero_bytes += len;
            }
        }
        Ok(())
    }
}

/// One guest RAM region as the sender reads it.
struct RegionView {
    ptr: *const u8,
    len: usize,
    file_backed: bool,
}

// SAFETY: the pointer is into guest RAM, which the `LiveVm` the migration holds keeps mapped;
// it is only read.
unsafe impl Send for RegionView {}

// SAFETY: as above: shared views only read guest RAM (the stripe senders of a parallel round
// 0 read disjoint pages of it).
unsafe impl Sync for RegionView {}

impl RegionView {
    fn pages(&self) -> usize {
        self.len / PAGE_SIZE as usize
    }

    /// Whether page `p` is all zero. The guest may be writing it: a torn read only decides
    /// how this copy is sent, and the dirty log sends the page again.
    fn is_zero(&self, p: usize) -> bool {
        let base = self.ptr.wrapping_add(p * PAGE_SIZE as usize) as *const u64;
        (0..PAGE_SIZE as usize / 8).all(|i| {
            // SAFETY: page `p` lies inside the region (callers pass p < pages()), which stays
            // mapped; volatile because the guest may write it concurrently.
            unsafe { std::ptr::read_volatile(base.add(i)) == 0 }
        })
    }

    /// Pages `first..first+count` as bytes for the socket.
    fn bytes(&self, first: usize, count: usize) -> &[u8] {
        // SAFETY: the range lies inside the mapped region (first + count <= pages()). The
        // guest may change the bytes while they are copied into the socket; the dirty log
        // resends any page written after it was harvested.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.add(first * PAGE_SIZE as usize),
                count * PAGE_SIZE as usize,
            )
        }
    }
}

impl Migration<'_> {
    /// The pages dirtied since the last harvest, timed into the status.
    fn harvest(&self) -> Result<Vec<Vec<u64>>, Failure> {
        let start = Instant::now();
        let dirty = self.vm.harvest_dirty().map_err(Failure::Failed)?;
        let took = start.elapsed().as_micros() as u64;
        self.update(|s| {
            s.harvests += 1;
            s.harvest_us += took;
        });
        Ok(dirty)
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        st.elapsed_ms = self.start.elapsed().as_millis() as u64;
    }

    fn check_cancel(&self) -> Result<(), Failure> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(Failure::Cancelled);
        }
        Ok(())
    }

    fn regions(&self) -> Vec<RegionView> {
        self.vm
            .snapshot
            .memory
            .iter()
            .map(|r| RegionView {
                ptr: r.as_ptr(),
                len: r.len() as usize,
                // A private file mapping (a restored VM): pages it never touched are still the
                // snapshot's. Shared memory files count their touched pages like anonymous
                // memory (mincore sees them in the page cache).
                file_backed: {
                    let m = std::ops::Deref::deref(r);
                    m.file_offset().is_some() && m.flags() & libc::MAP_SHARED == 0
                },
            })
            .collect()
    }

    fn run(&mut self, target: &MigrateTarget) -> Result<(), Failure> {
        let config = self.vm.current_config();
        let regions = self.regions();
        // With TLS, the handshake is done here: the destination accepted our certificate.
        let stream = target
            .endpoint
            .connect(CONNECT_PATIENCE, target.tls.as_ref())?;
        self.stream_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stream.try_clone()?);
        self.check_cancel()?;
        // `reader` and the writer below are handles on one connection (over TLS they share
        // it through a mutex): a reply is only read after what was written is flushed, never
        // while writing.
        let mut reader = stream.try_clone()?;
        if self.opts.copy_disks {
            self.copied = disk_send::copied_disks(self.vm);
        }
        let hello = Hello {
            ferrite_version: env!("CARGO_PKG_VERSION").to_string(),
            config: serde_json::to_value(&config)
                .map_err(|e| Failure::Failed(format!("Cannot encode the configuration: {e}")))?,
            regions: self
                .vm
                .snapshot
                .memory
                .iter()
                .map(|r| RegionInfo {
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                })
                .collect(),
            memory_fds: self.opts.fd_handover,
            postcopy: self.opts.postcopy,
            disks: disk_send::announce(&self.copied),
        };
        let mut out = Out {
            w: BufWriter::with_capacity(SEND_BUFFER, stream),
            pacer: Pacer::new(self.opts.bandwidth_mib_s.checked_mul(1 << 20)),
            pages: 0,
            zeros: 0,
            disk_bytes: 0,
            disk_zero_bytes: 0,
        };
        wire::write_hello(out.w.get_mut(), &hello)?;
        reader.set_read_timeout(Some(READY_TIMEOUT))?;
        match wire::read_reply(&mut reader)? {
            Reply::Accept => {}
            Reply::Refuse(reason) => {
                return Err(Failure::Failed(format!(
                    "The destination refused the migration: {reason}"
                )))
            }
            other => return Err(Failure::Failed(format!("Unexpected reply {other:?}"))),
        }
        let fd_handover = self.opts.fd_handover;
        let postcopy = self.opts.postcopy;
        // Pure post-copy sends nothing while the guest runs here: no log to keep.
        let dirty_log = !(fd_handover || postcopy && self.opts.precopy_rounds == 0);
        if fd_handover {
            self.hand_over_memory(&out, &mut reader)?;
        } else if dirty_log {
            self.vm.start_dirty_log().map_err(Failure::Failed)?;
            let tracker = self.vm.snapshot.dirty_log.name();
            tracing::info!(tracker, "migration: dirty-page log on");
            self.update(|s| s.dirty_log = Some(tracker.to_string()));
            // Before round 0 reads them: a write from now on is sent again.
            disk_send::start_tracking(&self.copied);
        }
        // Probe the MSR list now, not while the guest is paused.
        let result = self
            .vm
            .prepare_save()
            .map_err(|e| Failure::Failed(e.to_string()))
            .and_then(|()| {
                if fd_handover {
                    self.finish_copy(&mut out, &mut reader, &regions, None, 0)
                } else if postcopy {
                    self.postcopy(&mut out, &mut reader, &regions)
                } else {
                    self.copy(&mut out, &mut reader, &regions)
                }
            });
        if result.is_err() && !self.committed && dirty_log {
            self.vm.stop_dirty_log();
        }
        disk_send::stop_tracking(&self.copied);
        // A failure in the middle of a round still shows what was sent.
        self.count(&out);
        if result.is_err() && !self.committed {
            let reason = match &result {
                Err(Failure::Cancelled) => "cancelled on the source".to_string(),
                Err(Failure::Failed(m)) => m.clone(),
                Ok(()) => String::new(),
            };
            let _ = out.frame(&Frame::Abort(reason));
            let _ = out.w.flush();
        }
        for s in self
            .stream_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            s.shutdown();
        }
        result
    }

    /// Same-host handover: send the guest RAM's memory files and wait until the destination
    /// has mapped them and built its VM over them (while the guest still runs here).
    fn hand_over_memory(&self, out: &Out, reader: &mut Stream) -> Result<(), Failure> {
        let fds = crate::memory::shared_memory_fds(&self.vm.snapshot.memory).ok_or_else(|| {
            Failure::Failed(
                "Guest RAM is not in shared memory files: start the VM with --memory-shared \
                 to hand it over"
                    .into(),
            )
        })?;
        out.w.get_ref().send_fds(wire::MEMORY_FDS_TAG, &fds)?;
        match wire::read_reply(reader)? {
            Reply::Mapped => Ok(()),
            Reply::Failed(reason) => Err(Failure::Failed(format!(
                "The destination could not map the memory: {reason}"
            ))),
            other => Err(Failure::Failed(format!("Unexpected reply {other:?}"))),
        }
    }

    /// Send the pages `wanted` (in order) of every region: non-zero pages with their bytes;
    /// zero pages as markers, or not at all when `zero_known` (the destination's RAM is
    /// still all zero there).
    fn send_pages(
        &self,
        out: &mut Out,
        regions: &[RegionView],
        wanted: &dyn Fn(usize, usize) -> bool,
        zero_known: bool,
    ) -> Result<(), Failure> {
        for (ri, region) in regions.iter().enumerate() {
            let pages = (0..region.pages()).filter(|&p| wanted(ri, p));
            self.send_span(out, ri, region, pages, zero_known)?;
        }
        Ok(())
    }

    /// Block migration, before the pause: have the destination make the disk data it has
    /// durable, so its flush in the pause covers only the last blocks (the guest runs on
    /// meanwhile; its writes go into the final copy).
    fn sync_destination_disks(&self, out: &mut Out, reader: &mut Stream) -> Result<(), Failure> {
        out.frame(&Frame::DiskSync)?;
        out.w.flush()?;
        reader.set_read_timeout(Some(READY_TIMEOUT))?;
        match wire::read_reply(reader)? {
            Reply::DiskSynced => Ok(()),
            Reply::Failed(reason) => Err(Failure::Failed(format!(
                "The destination could not write the disks: {reason}"
            ))),
            other => Err(Failure::Failed(format!("Unexpected reply {other:?}"))),
        }
    }

    /// Flush every copied disk (what the guest wrote reaches the image).
    fn flush_copied(&self) -> Result<(), Failure> {
        for d in &self.copied {
            d.disk.flush().map_err(|e| {
                Failure::Failed(format!(
                    "Cannot flush the disk {}: {e}",
                    d.disk.path().display()
                ))
            })?;
        }
        Ok(())
    }

    /// Send the blocks set in `maps` of every copied disk (see [`disk_send::send_blocks`]).
    fn send_disks(
        &self,
        out: &mut Out,
        maps: &[Vec<u64>],
        zero_known: bool,
    ) -> Result<(), Failure> {
        for (i, (d, map)) in self.copied.iter().zip(maps).enumerate() {
            disk_send::send_blocks(d, map, zero_known, &mut |piece| {
                self.check_cancel()?;
                out.disk_piece(i as u32, piece)
            })?;
        }
        Ok(())
    }

    /// Send `pages` (ascending) of region `ri` in runs, as [`Self::send_pages`] does.
    fn send_span(
        &self,
        out: &mut Out,
        ri: usize,
        region: &RegionView,
        pages: impl Iterator<Item = usize>,
        zero_known: bool,
    ) -> Result<(), Failure> {
        let mut run: Option<(usize, usize, bool)> = None; // (first, count, zero)
        let flush = |out: &mut Out, run: (usize, usize, bool)| -> Result<(), Failure> {
            let (first, count, zero) = run;
            if zero {
                out.zeros += count as u64;
                if !zero_known {
                    out.frame(&Frame::Zero {
                        region: ri as u32,
                        first_page: first as u64,
                        count: count as u64,
                    })?;
                }
                Ok(())
            } else {
                out.pages(ri as u32, first, region.bytes(first, count))
            }
        };
        for p in pages {
            let zero = region.is_zero(p);
            match run {
                Some((first, count, z))
                    if z == zero
                        && first + count == p
                        && (zero || count < MAX_RUN_PAGES as usize) =>
                {
                    run = Some((first, count + 1, z));
                }
                Some(done) => {
                    flush(out, done)?;
                    self.check_cancel()?;
                    run = Some((p, 1, zero));
                }
                None => run = Some((p, 1, zero)),
            }
        }
        if let Some(done) = run {
            flush(out, done)?;
        }
        Ok(())
    }

    /// Round 0 over `connections` extra connections, each carrying every
    /// [`STRIPE_PAGES`]-page stripe of its own (a page always on one connection), with its
    /// share of the bandwidth limit; this connection carries none of it. Returns once every
    /// stripe is sent, so what follows on this connection comes after them.
    fn send_striped(
        &self,
        out: &mut Out,
        regions: &[RegionView],
        touched: &[Vec<bool>],
    ) -> Result<(), Failure> {
        let k = self.opts.connections as usize;
        let token = random_token()?;
        out.frame(&Frame::Parallel {
            count: k as u32,
            token,
        })?;
        out.w.flush()?;
        let mut extras = Vec::with_capacity(k);
        for i in 1..=k {
            let mut s = self
                .target
                .endpoint
                .connect(CONNECT_PATIENCE, self.target.tls.as_ref())?;
            self.stream_slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s.try_clone()?);
            self.check_cancel()?;
            wire::write_parallel_hello(&mut s, token, i as u32)?;
            extras.push(s);
        }
        let share = self
            .opts
            .bandwidth_mib_s
            .checked_mul(1 << 20)
            .map(|b| b / k as u64);
        let stripe = |p: usize| (p / STRIPE_PAGES) % k;
        let results: Vec<Result<(u64, u64, u64), Failure>> = std::thread::scope(|scope| {
            let handles: Vec<_> = extras
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    scope.spawn(move || -> Result<(u64, u64, u64), Failure> {
                        let mut o = Out {
                            w: BufWriter::with_capacity(SEND_BUFFER, s),
                            pacer: Pacer::new(share),
                            pages: 0,
                            zeros: 0,
                            disk_bytes: 0,
                            disk_zero_bytes: 0,
                        };
                        self.send_pages(
                            &mut o,
                            regions,
                            &|r, p| touched[r][p] && stripe(p) == i,
                            true,
                        )?;
                        o.frame(&Frame::Done)?;
                        o.w.flush()?;
                        Ok((o.pacer.bytes(), o.pages, o.zeros))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Failure::Failed("A stripe sender panicked".into())))
                })
                .collect()
        });
        for r in results {
            let (bytes, pages, zeros) = r?;
            out.pacer.sent(bytes);
            out.pages += pages;
            out.zeros += zeros;
        }
        Ok(())
    }

    /// Every page the guest ever touched, per region (file-backed RAM of a restored VM: every
    /// page, since untouched pages still hold the snapshot's data).
    fn touched_pages(&self, regions: &[RegionView]) -> Result<Vec<Vec<bool>>, Failure> {
        regions
            .iter()
            .map(|r| {
                if r.file_backed {
                    Ok(vec![true; r.pages()])
                } else {
                    snapshot::resident_pages(
                        r.bytes(0, r.pages()),
                        std::path::Path::new("guest RAM"),
                    )
                    .map_err(|e| Failure::Failed(e.to_string()))
                }
            })
            .collect()
    }

    /// Round 0: send every page the guest ever touched, while it runs.
    fn first_pass(&self, out: &mut Out, regions: &[RegionView]) -> Result<(), Failure> {
        let touched = self.touched_pages(regions)?;
        // Round 0 of the disks: every block that may hold data.
        let allocated: Vec<Vec<u64>> = self
            .copied
            .iter()
            .map(disk_send::allocated_blocks)
            .collect::<Result<_, _>>()?;
        let disk_bytes = disk_send::map_bytes(&allocated);
        self.update(|s| {
            s.phase = Phase::Copying;
            s.remaining_bytes =
                touched.iter().flatten().filter(|&&t| t).count() as u64 * PAGE_SIZE + disk_bytes;
            s.disk_remaining_bytes = disk_bytes;
        });
        out.frame(&Frame::Round(0))?;
        if self.opts.connections > 1 {
            self.send_striped(out, regions, &touched)?;
        } else {
            self.send_pages(out, regions, &|r, p| touched[r][p], true)?;
        }
        self.send_disks(out, &allocated, true)?;
        out.w.flush()?;
        self.report(out, 0);
        Ok(())
    }

    fn copy(
        &mut self,
        out: &mut Out,
        reader: &mut Stream,
        regions: &[RegionView],
    ) -> Result<(), Failure> {
        let deadline = self.start + Duration::from_secs(self.opts.timeout_s);
        self.first_pass(out, regions)?;

        let budget = Duration::from_millis(self.opts.downtime_ms);
        let mut throttle: Option<Throttle> = None;
        let mut previous = u64::MAX;
        let mut round = 0u32;
        let (dirty, disk_dirty) = loop {
            self.check_cancel()?;
            let dirty = self.harvest()?;
            let count: u64 = dirty
                .iter()
                .flatten()
                .map(|w| u64::from(w.count_ones()))
                .sum();
            // Flushed every round while the guest runs, so the flush in the pause is short.
            self.flush_copied()?;
            let disk_dirty = disk_send::harvest(&self.copied);
            let disk_bytes = disk_send::map_bytes(&disk_dirty);
            // The final copy carries the dirty disk blocks too.
            let bytes = count * PAGE_SIZE + disk_bytes;
            let rate = out.pacer.rate().unwrap_or(1e9).max(1.0);
            let predicted = Duration::from_secs_f64(bytes as f64 / rate);
            if predicted <= budget {
                break (dirty, disk_dirty);
            }
            if Instant::now() >= deadline {
                return Err(Failure::Failed(format!(
                    "The copy did not converge within {} s ({} MiB still dirty per round at \
                     {:.0} MiB/s); the VM keeps running here. Allow a longer downtime_ms, a \
                     higher bandwidth or a longer timeout_s, or use converge=throttle",
                    self.opts.timeout_s,
                    bytes >> 20,
                    rate / f64::from(1 << 20)
                )));
            }
            round += 1;
            if round > FREE_ROUNDS
                && bytes >= previous / 2
                && self.opts.converge == Converge::Throttle
            {
                match &throttle {
                    Some(t) => t.set((t.pct() + THROTTLE_STEP).min(THROTTLE_MAX)),
                    None => {
                        throttle = Some(
                            Throttle::start(self.vm.clone(), THROTTLE_STEP)
                                .map_err(|e| Failure::Failed(format!("Cannot throttle: {e}")))?,
                        )
                    }
                }
            }
            previous = bytes;
            let pct = throttle.as_ref().map_or(0, Throttle::pct);
            self.update(|s| {
                s.round = round;
                s.remaining_bytes = bytes;
                s.disk_remaining_bytes = disk_bytes;
                s.throttle_pct = pct;
            });
            out.frame(&Frame::Round(round))?;
            self.send_pages(out, regions, &|r, p| bit(&dirty[r], p), false)?;
            self.send_disks(out, &disk_dirty, false)?;
            out.w.flush()?;
            self.report(out, round);
        };
        drop(throttle);
        if !self.copied.is_empty() {
            self.sync_destination_disks(out, reader)?;
        }
        self.finish_copy(out, reader, regions, Some((dirty, disk_dirty)), round + 1)
    }

    /// Pause, send the rest and the state, and hand the guest over.
    fn finish_copy(
        &mut self,
        out: &mut Out,
        reader: &mut Stream,
        regions: &[RegionView],
        dirty: Option<DirtySets>,
        round: u32,
    ) -> Result<(), Failure> {
        self.pause_for_handover(round)?;
        // Without a copy (memory handed over by file), there are no pages to send.
        if let Some((mut dirty, mut disk_dirty)) = dirty {
            let last = self.harvest()?;
            for (acc, new) in dirty.iter_mut().zip(&last) {
                for (a, n) in acc.iter_mut().zip(new) {
                    *a |= n;
                }
            }
            out.frame(&Frame::Round(round))?;
            self.send_pages(out, regions, &|r, p| bit(&dirty[r], p), false)?;
            let last_disk = disk_send::harvest(&self.copied);
            for (acc, new) in disk_dirty.iter_mut().zip(&last_disk) {
                for (a, n) in acc.iter_mut().zip(new) {
                    *a |= n;
                }
            }
            self.update(|s| s.disk_remaining_bytes = disk_send::map_bytes(&disk_dirty));
            self.send_disks(out, &disk_dirty, false)?;
            tracing::debug!("final pages and disk blocks sent");
        }
        self.send_state(out)?;
        out.w.flush()?;
        self.report(out, round);
        tracing::debug!("state sent");
        reader.set_read_timeout(Some(READY_TIMEOUT))?;
        match wire::read_reply(reader)? {
            Reply::Ready => {}
            Reply::Failed(reason) => {
                return Err(Failure::Failed(format!(
                    "The destination could not start the VM: {reason}"
                )))
            }
            other => return Err(Failure::Failed(format!("Unexpected reply {other:?}"))),
        }
        tracing::debug!("destination ready");
        self.check_cancel()?;
        // From here on the guest never runs here again.
        self.committed = true;
        out.frame(&Frame::Commit)?;
        out.w.flush()?;
        reader.set_read_timeout(Some(RUNNING_TIMEOUT))?;
        match wire::read_reply(reader)? {
            Reply::Running => Ok(()),
            other => Err(Failure::Failed(format!("Unexpected reply {other:?}"))),
        }
    }

    /// Pause the guest for good (unless the migration fails before the commit) and let go of
    /// what the destination opens once the state arrived: the disks (flushed) and the host
    /// resources a destination on this host opens by name.
    fn pause_for_handover(&mut self, round: u32) -> Result<(), Failure> {
        self.check_cancel()?;
        self.vm
            .pause()
            .map_err(|(_, m)| Failure::Failed(format!("Cannot pause the VM: {m}")))?;
        self.paused_at = Some(Instant::now());
        tracing::debug!("paused for the final copy");
        self.update(|s| {
            s.phase = Phase::Final;
            s.round = round;
            s.throttle_pct = 0;
        });
        if self.copied.is_empty() {
            // The destination opens the disks once the state arrived, so they are flushed
            // and let go of before it is sent.
            self.disks_released = true;
            self.vm.release_disks().map_err(Failure::Failed)?;
        } else {
            // Block migration: the destination writes its own copies; this side keeps its
            // disks (and their locks) and only flushes them before the last blocks are read.
            self.flush_copied()?;
        }
        self.vm.release_host_devices().map_err(Failure::Failed)?;
        Ok(())
    }

    /// Send the paused VM's state (vCPUs, irqchip, clock, devices) and the end of the stream.
    fn send_state(&self, out: &mut Out) -> Result<(), Failure> {
        let vcpus = self
            .vm
            .save_vcpus()
            .map_err(|e| Failure::Failed(e.to_string()))?;
        let config = self.vm.current_config();
        let state = crate::vm_snapshot::state_bytes(&self.vm.sources(
            vcpus,
            crate::vm_snapshot::MemoryCapture::Touched,
            &config,
        ))
        .map_err(|e| Failure::Failed(e.to_string()))?;
        out.frame(&Frame::State(state))?;
        out.frame(&Frame::Done)?;
        Ok(())
    }

    fn report(&self, out: &Out, round: u32) {
        self.count(out);
        self.update(|s| s.round = round);
        let (sent, pages, zeros) = (out.pacer.bytes(), out.pages, out.zeros);
        let rate = out.pacer.rate().unwrap_or(0.0) as u64;
        tracing::debug!(round, sent, pages, zeros, rate, "migration round sent");
    }

    /// Put what was sent so far in the status.
    fn count(&self, out: &Out) {
        let rate = out.pacer.rate().unwrap_or(0.0) as u64;
        let (sent, pages, zeros) = (out.pacer.bytes(), out.pages, out.zeros);
        let (disk_sent, disk_zero) = (out.disk_bytes, out.disk_zero_bytes);
        self.update(|s| {
            s.sent_bytes = sent;
            s.pages_sent = pages;
            s.zero_pages = zeros;
            s.disk_sent_bytes = disk_sent;
            s.disk_zero_bytes = disk_zero;
            s.rate_bytes_per_s = rate;
        });
    }

    /// Record the outcome; hand the guest over (stop this VMM) or let it run on here.
    fn finish(&mut self, result: Result<(), Failure>) {
        let now = Instant::now();
        let resumed = self.resumed_at.unwrap_or(now);
        let downtime = self
            .paused_at
            .map(|t| resumed.duration_since(t).as_secs_f64() * 1e3);
        let total = self.start.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(()) => {
                self.update(|s| {
                    s.phase = Phase::Completed;
                    s.downtime_ms = downtime;
                    s.total_ms = Some(total);
                    s.remaining_bytes = 0;
                    s.disk_remaining_bytes = 0;
                });
                tracing::info!(
                    to = self.opts.to,
                    downtime_ms = downtime,
                    total_ms = total,
                    "migration completed: the guest runs on the destination"
                );
                self.vm.shutdown.request(ShutdownKind::Migrated);
            }
            Err(failure) if self.postcopy_started => {
                let message = match failure {
                    Failure::Cancelled => "cancelled after the switch".to_string(),
                    Failure::Failed(m) => m,
                };
                tracing::error!("post-copy failed after the switch: {message}");
                self.update(|s| {
                    s.phase = Phase::Failed;
                    s.total_ms = Some(total);
                    s.error = Some(format!(
                        "Post-copy failed after the guest started on the destination                          ({message}): part of its memory never got there, so the destination                          stops it. The copy here stays paused and is stale (the guest ran on                          the destination): do not resume it; restore from a snapshot"
                    ));
                });
            }
            Err(failure) if self.committed => {
                let message = match failure {
                    Failure::Cancelled => "cancelled after the commit".to_string(),
                    Failure::Failed(m) => m,
                };
                self.update(|s| {
                    s.phase = Phase::Unknown;
                    s.error = Some(format!(
                        "The destination did not confirm that it runs the guest ({message}). \
                         The VM stays paused here: check the destination, and resume this VM \
                         only if the destination is not running it"
                    ));
                });
            }
            Err(failure) => {
                let (phase, message) = match failure {
                    Failure::Cancelled => (Phase::Cancelled, "Cancelled".to_string()),
                    Failure::Failed(m) => (Phase::Failed, m),
                };
                let disks = if self.disks_released {
                    self.vm.retake_host_devices();
                    self.vm.retake_disks(DISK_RETAKE_PATIENCE)
                } else {
                    Ok(())
                };
                if let Err(e) = disks {
                    // Never run the guest without owning its disks.
                    self.update(|s| {
                        s.phase = Phase::Failed;
                        s.error = Some(format!(
                            "{message}. The VM stays paused here: {e}; resume it once the \
                             destination has exited"
                        ));
                        s.total_ms = Some(total);
                    });
                    return;
                }
                if self.paused_at.is_some() {
                    if let Err((_, m)) = self.vm.resume() {
                        tracing::warn!("cannot resume after a failed migration: {m}");
                    }
                }
                tracing::warn!(
                    to = self.opts.to,
                    "migration ended: {message}; the VM keeps running"
                );
                self.update(|s| {
                    s.phase = phase;
                    s.error = Some(message);
                    s.total_ms = Some(total);
                });
            }
        }
    }
}

/// A token an extra connection presents, so nobody else's connection is taken for it.
fn random_token() -> Result<u64, Failure> {
    let mut b = [0u8; 8];
    // SAFETY: `b` is 8 writable bytes for the duration of the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return Err(Failure::Failed(format!(
            "Cannot draw a connection token: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(u64::from_le_bytes(b))
}

fn bit(map: &[u64], p: usize) -> bool {
    map.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
}
