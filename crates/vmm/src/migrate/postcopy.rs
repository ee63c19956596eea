//! Post-copy, the destination side: the guest runs before all of its memory arrived. Guest
//! RAM is registered with userfaultfd (missing-page mode), so a vCPU, KVM or a device that
//! touches a page not here yet blocks in the kernel until the page is placed. A fault thread
//! asks the source for fetch-map pages it has not sent yet and answers every other missing
//! page with a zero page; a receiver thread places the pages the source sends (asked for or
//! pushed in the background) with `UFFDIO_COPY`, which wakes the threads waiting on them.
//! Once the source pushed every page, the memory is unregistered and the source let go.
//!
//! After the commit the guest's memory lives on two hosts: if the connection drops before
//! every page arrived, the guest cannot go on (a missing page has no other copy), so this
//! process stops with an error rather than let a vCPU run on a page it would have to invent.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use migration::wire::{self, Frame, RegionInfo, Reply, PAGE_SIZE};
use migration::{MigrationError, Stream};
use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use vm_device::GuestMemoryMmap;

/// What the receiver tells the start gate.
pub(crate) enum GateEvent {
    /// The source committed: run the guest.
    Commit,
    /// The source aborted or the stream failed before the commit (why).
    Failed(String),
}

/// Guest RAM region as the post-copy threads see it.
struct Region {
    /// Host address of the region's first byte.
    base: usize,
    pages: usize,
    /// Pages to fetch from the source (any other missing page is zero).
    fetch: Vec<u64>,
    /// Fetch pages placed here.
    received: Vec<AtomicU64>,
    /// Fetch pages asked for.
    requested: Vec<AtomicU64>,
}

impl Region {
    fn fetch(&self, p: usize) -> bool {
        self.fetch
            .get(p / 64)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    fn received(&self, p: usize) -> bool {
        self.received
            .get(p / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (p % 64)) != 0)
    }

    fn mark(map: &[AtomicU64], p: usize) -> bool {
        map.get(p / 64)
            .is_some_and(|w| w.fetch_or(1 << (p % 64), Ordering::AcqRel) & (1 << (p % 64)) != 0)
    }
}

struct Shared {
    uffd: Uffd,
    regions: Vec<Region>,
    writer: Arc<Mutex<Stream>>,
    committed: AtomicBool,
    stop: EventFd,
    /// Faults answered by asking the source.
    requests: AtomicU64,
    /// Faults answered with a zero page.
    zero_faults: AtomicU64,
}

/// A post-copy receiver: the threads run until every page arrived (or the process stops).
pub(crate) struct Postcopy {
    /// The commit (or the failure before it), for the start gate.
    pub events: mpsc::Receiver<GateEvent>,
    /// The stream's write half, shared with the fault thread's requests.
    pub writer: Arc<Mutex<Stream>>,
}

/// The fetch maps of every region, as the source announced them.
pub(crate) struct FetchMaps(pub Vec<Option<Vec<u64>>>);

impl FetchMaps {
    pub(crate) fn new(regions: usize) -> Self {
        Self(vec![None; regions])
    }

    /// Record region `region`'s map after checking it fits the region.
    pub(crate) fn set(
        &mut self,
        regions: &[RegionInfo],
        region: u32,
        bitmap: Vec<u64>,
    ) -> Result<(), MigrationError> {
        wire::check_fetch(regions, region, &bitmap)?;
        match self.0.get_mut(region as usize) {
            Some(slot @ None) => {
                *slot = Some(bitmap);
                Ok(())
            }
            _ => Err(MigrationError::Protocol(format!(
                "a second fetch map for region {region}"
            ))),
        }
    }

    /// Whether any map arrived.
    pub(crate) fn any(&self) -> bool {
        self.0.iter().any(Option::is_some)
    }

    fn complete(self) -> Result<Vec<Vec<u64>>, MigrationError> {
        self.0
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.ok_or_else(|| {
                    MigrationError::Protocol(format!(
                        "no fetch map for region {i} before the state"
                    ))
                })
            })
            .collect()
    }
}

fn uffd_error(what: &str, e: userfaultfd::Error) -> MigrationError {
    MigrationError::Io(std::io::Error::other(format!("{what}: {e}")))
}

/// Set guest RAM up for post-copy and start the threads: drop the pages the source will send
/// again, register every region with userfaultfd, then serve faults and place arriving pages.
/// `reader` continues the stream after the state; `writer` is the same connection's write
/// half (the start gate answers on it too).
pub(crate) fn start(
    mem: &GuestMemoryMmap,
    infos: &[RegionInfo],
    maps: FetchMaps,
    reader: Box<dyn Read + Send>,
    writer: Stream,
) -> Result<Postcopy, MigrationError> {
    let maps = maps.complete()?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // KVM and the devices touch guest RAM from the kernel (get_user_pages, copies):
        // those faults must reach the handler too.
        .user_mode_only(false)
        .create()
        .map_err(|e| {
            uffd_error(
                "Cannot create a userfaultfd for post-copy (the host kernel needs \
                 CONFIG_USERFAULTFD, and a non-root VMM vm.unprivileged_userfaultfd=1)",
                e,
            )
        })?;
    let mut regions = Vec::with_capacity(maps.len());
    for (r, fetch) in mem.iter().zip(maps) {
        let pages = (r.len() / PAGE_SIZE) as usize;
        // Pages sent in the pre-copy rounds and written since must come again: drop them so
        // they fault.
        for (first, count) in runs(&fetch, pages) {
            // SAFETY: the run lies inside this region's private anonymous mapping (the map
            // was checked against the region's size); MADV_DONTNEED only empties it, and no
            // vCPU runs yet.
            let ret = unsafe {
                libc::madvise(
                    r.as_ptr().add(first * PAGE_SIZE as usize).cast(),
                    count * PAGE_SIZE as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if ret != 0 {
                return Err(MigrationError::Io(std::io::Error::last_os_error()));
            }
        }
        uffd.register(r.as_ptr().cast(), r.len() as usize)
            .map_err(|e| uffd_error("Cannot register guest RAM with userfaultfd", e))?;
        let words = fetch.len();
        regions.push(Region {
            base: r.as_ptr() as usize,
            pages,
            fetch,
            received: (0..words).map(|_| AtomicU64::new(0)).collect(),
            requested: (0..words).map(|_| AtomicU64::new(0)).collect(),
        });
    }
    let writer = Arc::new(Mutex::new(writer));
    let shared = Arc::new(Shared {
        uffd,
        regions,
        writer: writer.clone(),
        committed: AtomicBool::new(false),
        stop: EventFd::new(libc::EFD_NONBLOCK).map_err(MigrationError::Io)?,
        requests: AtomicU64::new(0),
        zero_faults: AtomicU64::new(0),
    });
    let (tx, events) = mpsc::channel();
    let faults = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                if let Err(e) = serve_faults(&shared) {
                    fail(&shared, None, &format!("the fault handler failed: {e}"));
                }
            })
            .map_err(MigrationError::Io)?
    };
    let infos = infos.to_vec();
    std::thread::Builder::new()
        .name("postcopy-receive".into())
        .spawn(move || receive(&shared, &infos, reader, &tx, faults))
        .map_err(MigrationError::Io)?;
    Ok(Postcopy { events, writer })
}

/// The runs of set bits of `map` below `pages`: (first page, count).
pub(crate) fn runs(map: &[u64], pages: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let bit = move |p: usize| map.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
    let mut p = 0;
    std::iter::from_fn(move || {
        while p < pages && !bit(p) {
            // Skip empty words at once.
            if p.is_multiple_of(64) && map.get(p / 64) == Some(&0) {
                p += 64;
            } else {
                p += 1;
            }
        }
        if p >= pages {
            return None;
        }
        let first = p;
        while p < pages && bit(p) {
            p += 1;
        }
        Some((first, p - first))
    })
}

/// Stop the guest for good: after the commit a lost page cannot be replaced. Before the
/// commit the start gate hears of it and the guest never runs here.
fn fail(shared: &Shared, tx: Option<&mpsc::Sender<GateEvent>>, reason: &str) {
    if shared.committed.load(Ordering::SeqCst) {
        tracing::error!("post-copy failed after the guest started here: {reason}");
        eprintln!(
            "ferrite: post-copy migration failed after the guest started here: {reason}; \
             part of its memory is still on the source, so the VM stops (exit status 1)"
        );
        std::process::exit(1);
    }
    if let Some(tx) = tx {
        let _ = tx.send(GateEvent::Failed(reason.to_string()));
    }
}

fn serve_faults(shared: &Shared) -> std::io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: shared.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` holds two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        loop {
            match shared.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => fault(shared, addr as usize)?,
                // Only missing-page faults are asked for.
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
    }
}

fn fault(shared: &Shared, addr: usize) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let Some((ri, region)) = shared
        .regions
        .iter()
        .enumerate()
        .find(|(_, r)| addr >= r.base && addr < r.base + r.pages * page)
    else {
        // Not guest RAM: cannot happen (only guest RAM is registered).
        return Err(std::io::Error::other(format!(
            "a fault at {addr:#x}, outside guest RAM"
        )));
    };
    let p = (addr - region.base) / page;
    let at = (region.base + p * page) as *mut libc::c_void;
    if region.fetch(p) && !region.received(p) {
        if !Region::mark(&region.requested, p) {
            shared.requests.fetch_add(1, Ordering::Relaxed);
            let reply = Reply::Request {
                region: ri as u32,
                first_page: p as u64,
                count: 1,
            };
            let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            wire::write_reply(&mut *w, &reply).map_err(std::io::Error::other)?;
        }
        // The receiver's copy wakes the faulting thread.
        return Ok(());
    }
    // Never on the source (zero there), or placed here and dropped since (the balloon):
    // a zero page. A page placed meanwhile only needs the wake.
    shared.zero_faults.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `at` is one page inside a registered region of guest RAM.
    match unsafe { shared.uffd.zeropage(at, page, true) } {
        Ok(_) => Ok(()),
        Err(_) => shared
            .uffd
            .wake(at, page)
            .map_err(|e| std::io::Error::other(e.to_string())),
    }
}

/// Place `len` bytes at `at` (pages of one region, not yet placed or placed meanwhile) and
/// wake whoever waits on them. `src` None: zero pages.
fn place(shared: &Shared, at: usize, src: Option<&[u8]>, len: usize) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    // SAFETY (both calls): `at..at+len` lies inside a registered region of guest RAM
    // (run_bounds checked it); `src` holds `len` bytes.
    let whole = unsafe {
        match src {
            Some(b) => shared
                .uffd
                .copy(b.as_ptr().cast(), at as *mut _, len, true)
                .map(|_| ()),
            None => shared.uffd.zeropage(at as *mut _, len, true).map(|_| ()),
        }
    };
    if whole.is_ok() {
        return Ok(());
    }
    // Some page of the run is already here (a zero-page fault answered meanwhile): place the
    // others one by one.
    for off in (0..len).step_by(page) {
        // SAFETY: as above, one page of the run.
        let one = unsafe {
            match src {
                Some(b) => shared
                    .uffd
                    .copy(b[off..].as_ptr().cast(), (at + off) as *mut _, page, true)
                    .map(|_| ()),
                None => shared
                    .uffd
                    .zeropage((at + off) as *mut _, page, true)
                    .map(|_| ()),
            }
        };
        if let Err(e) = one {
            if !already_there(&e) {
                return Err(std::io::Error::other(format!(
                    "cannot place a page of guest RAM: {e}"
                )));
            }
            shared
                .uffd
                .wake((at + off) as *mut _, page)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
    }
    Ok(())
}

fn already_there(e: &userfaultfd::Error) -> bool {
    match e {
        userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno) => {
            *errno as i32 == libc::EEXIST
        }
        _ => false,
    }
}

fn receive(
    shared: &Shared,
    infos: &[RegionInfo],
    mut reader: Box<dyn Read + Send>,
    tx: &mpsc::Sender<GateEvent>,
    faults: std::thread::JoinHandle<()>,
) {
    let start = Instant::now();
    let mut buf = vec![0u8; (wire::MAX_RUN_PAGES as u64 * PAGE_SIZE) as usize];
    let mut placed = 0u64;
    let result: Result<(), String> = (|| loop {
        let frame = wire::read_frame(&mut reader).map_err(|e| e.to_string())?;
        let (region, first_page, count, data) = match frame {
            Frame::Pages {
                region,
                first_page,
                count,
            } => (region, first_page, u64::from(count), true),
            Frame::Zero {
                region,
                first_page,
                count,
            } => (region, first_page, count, false),
            Frame::Commit => {
                shared.committed.store(true, Ordering::SeqCst);
                let _ = tx.send(GateEvent::Commit);
                continue;
            }
            Frame::Abort(reason) => return Err(format!("the source aborted: {reason}")),
            Frame::PostcopyEnd => {
                if !shared.committed.load(Ordering::SeqCst) {
                    return Err("the source ended post-copy before the commit".into());
                }
                return Ok(());
            }
            other => return Err(format!("unexpected {other:?} during post-copy")),
        };
        let (offset, len) =
            wire::run_bounds(infos, region, first_page, count).map_err(|e| e.to_string())?;
        let r = &shared.regions[region as usize];
        let first = first_page as usize;
        if (first..first + count as usize).any(|p| !r.fetch(p)) {
            return Err(format!(
                "the source sent pages {first}+{count} of region {region}, outside its fetch map"
            ));
        }
        let src = if data {
            let dest = &mut buf[..len as usize];
            wire::read_pages_into(&mut reader, dest).map_err(|e| e.to_string())?;
            Some(&buf[..len as usize])
        } else {
            None
        };
        place(shared, r.base + offset as usize, src, len as usize).map_err(|e| e.to_string())?;
        for p in first..first + count as usize {
            Region::mark(&r.received, p);
        }
        placed += count;
    })();
    if let Err(reason) = result {
        fail(shared, Some(tx), &reason);
        return;
    }
    let missing: usize = shared
        .regions
        .iter()
        .map(|r| {
            (0..r.pages)
                .filter(|&p| r.fetch(p) && !r.received(p))
                .count()
        })
        .sum();
    if missing != 0 {
        fail(
            shared,
            Some(tx),
            &format!("the source ended post-copy with {missing} pages never sent"),
        );
        return;
    }
    // Every page is here: faults go back to the kernel.
    for r in &shared.regions {
        if let Err(e) = shared
            .uffd
            .unregister(r.base as *mut _, r.pages * PAGE_SIZE as usize)
        {
            tracing::warn!("cannot unregister guest RAM from userfaultfd: {e}");
        }
    }
    let _ = shared.stop.write(1);
    let _ = faults.join();
    let requests = shared.requests.load(Ordering::Relaxed);
    let zero_faults = shared.zero_faults.load(Ordering::Relaxed);
    tracing::info!(
        pages = placed,
        requests,
        zero_faults,
        ms = start.elapsed().as_millis() as u64,
        "post-copy complete: every page is here"
    );
    let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = wire::write_reply(&mut *w, &Reply::PostcopyDone) {
        tracing::warn!("cannot tell the source post-copy is complete: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_runs_of_a_fetch_map_cover_exactly_its_set_bits() {
        let map = [0b1110_0001u64, 0, 1 << 63, 0b1];

        let got: Vec<_> = runs(&map, 193).collect();

        assert_eq!(got, vec![(0, 1), (5, 3), (191, 2)]);
    }
}
