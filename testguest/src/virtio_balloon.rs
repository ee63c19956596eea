//! virtio-balloon driver (PCI device 0x1045) on the generic virtio layer, polled at CPL3,
//! and the `balloon`, `balloon-run`, `balloon-wait`, `balloon-report` and `touch` commands.
//!
//! Free memory: this guest keeps no data above [`POOL_BASE`] (32 MiB; the image, its .bss and
//! the `hostile`/`mem-fill` scratch areas are below or only used by those commands), so that
//! RAM is the "free pool". The balloon takes pool pages from the top of RAM downwards: page
//! `n` of the pool is the `n`-th 4 KiB page counted down from the highest RAM address. With
//! `held` pages in the balloon, pool pages `0..held` belong to the host and `held..` are free.
//! `touch MIB` writes one word into each of the MIB MiB of free pages just below the balloon,
//! so they are resident on the host before an inflation (otherwise there is nothing to give
//! back).

use crate::pci::Pci;
use crate::println;
use crate::pvh::BootInfo;
use crate::sys::{self, mmio, phys_ok};
use crate::virtio::{self, feat, status, Buf, Transport, Virtq};

/// PCI device ID of a modern virtio-balloon function.
const DEVICE_ID: u16 = 0x1045;
/// First byte of the free pool.
const POOL_BASE: u64 = 32 << 20;
const PAGE: u64 = 4096;
const PAGES_PER_MIB: u64 = 256;
/// Page numbers per inflate/deflate request (one 4 KiB buffer of le32 PFNs).
const PFNS_PER_REQUEST: u64 = 1024;
/// Bytes per reported free range, and ranges per reporting request.
const REPORT_CHUNK: u64 = 2 << 20;
const REPORT_CHUNKS_PER_REQUEST: usize = 16;
/// Seconds to wait for the device to use one buffer.
const TIMEOUT_S: u64 = 30;

/// virtio-balloon feature bits (virtio 1.2 §5.5.3).
mod bfeat {
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const REPORTING: u64 = 1 << 5;
}

/// Statistics tags (virtio 1.2 §5.5.6.3).
mod tag {
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
}

/// Free RAM ranges above POOL_BASE, highest first.
struct Pool {
    ranges: [(u64, u64); 8],
    n: usize,
    /// RAM bytes in total (what the stats report as total_memory).
    ram_bytes: u64,
}

impl Pool {
    fn new(boot: &BootInfo) -> Pool {
        let mut p = Pool {
            ranges: [(0, 0); 8],
            n: 0,
            ram_bytes: 0,
        };
        for e in boot.ram() {
            p.ram_bytes = p.ram_bytes.saturating_add(e.size);
            let start = e.addr.max(POOL_BASE).next_multiple_of(PAGE);
            let end = e.addr.saturating_add(e.size).min(sys::identity_limit()) & !(PAGE - 1);
            if end > start && p.n < p.ranges.len() {
                p.ranges[p.n] = (start, end);
                p.n += 1;
            }
        }
        p.ranges[..p.n].sort_unstable_by_key(|r| core::cmp::Reverse(r.0));
        p
    }

    fn pages(&self) -> u64 {
        self.ranges[..self.n]
            .iter()
            .map(|(s, e)| (e - s) / PAGE)
            .sum()
    }

    /// Address of pool page `n` (counted down from the top of RAM).
    fn page(&self, mut n: u64) -> Option<u64> {
        for &(s, e) in &self.ranges[..self.n] {
            let pages = (e - s) / PAGE;
            if n < pages {
                return Some(e - (n + 1) * PAGE);
            }
            n -= pages;
        }
        None
    }
}

struct BalloonDev {
    t: Transport,
    inflate: Virtq,
    deflate: Virtq,
    stats: Option<Virtq>,
    report: Option<Virtq>,
    pfn_buf: u64,
    stats_buf: u64,
    /// Pool pages in the balloon.
    held: u64,
    inflated: u64,
    deflated: u64,
    stats_answers: u64,
}

static mut DEV: Option<BalloonDev> = None;

fn init(pci: &Pci) -> Result<BalloonDev, &'static str> {
    let f = virtio::find_function(pci, DEVICE_ID, 0).ok_or("no-device")?;
    let cfg = pci.cfg(&f);
    let mut t = Transport::probe(&cfg, &f).map_err(|_| "probe-failed")?;
    t.negotiate(feat::VERSION_1 | bfeat::STATS_VQ | bfeat::DEFLATE_ON_OOM | bfeat::REPORTING)
        .map_err(|_| "features-rejected")?;
    let inflate = t.setup_queue(0, 64).map_err(|_| "queue-unavailable")?;
    let deflate = t.setup_queue(1, 64).map_err(|_| "queue-unavailable")?;
    // Queue indices are compact over the negotiated features.
    let mut next = 2;
    let stats = if t.has(bfeat::STATS_VQ) {
        next += 1;
        Some(
            t.setup_queue(next - 1, 4)
                .map_err(|_| "queue-unavailable")?,
        )
    } else {
        None
    };
    let report = if t.has(bfeat::REPORTING) {
        Some(t.setup_queue(next, 32).map_err(|_| "queue-unavailable")?)
    } else {
        None
    };
    let pfn_buf = virtio::dma_alloc((PFNS_PER_REQUEST * 4) as usize).ok_or("out-of-dma-memory")?;
    let stats_buf = virtio::dma_alloc(PAGE as usize).ok_or("out-of-dma-memory")?;
    t.driver_ok();
    t.cfg_w32(4, 0);
    Ok(BalloonDev {
        t,
        inflate,
        deflate,
        stats,
        report,
        pfn_buf,
        stats_buf,
        held: 0,
        inflated: 0,
        deflated: 0,
        stats_answers: 0,
    })
}

/// The device, (re)initialised if it is not running (first use, after a reset).
fn device(pci: &Pci, pool: &Pool) -> Result<&'static mut BalloonDev, &'static str> {
    // SAFETY: single-threaded CPL3 code; nothing else holds a reference to DEV.
    let slot = unsafe { &mut *core::ptr::addr_of_mut!(DEV) };
    let healthy = slot.as_ref().is_some_and(|d| {
        d.t.status() & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET) == status::DRIVER_OK
    });
    if !healthy {
        let mut d = init(pci)?;
        if d.stats.is_some() {
            // The first statistics go with the buffer (as Linux does).
            d.post_stats(pool)?;
        }
        *slot = Some(d);
    }
    slot.as_mut().ok_or("no-device")
}

fn wait_used(q: &mut Virtq, tsc_hz: u64) -> Result<u32, &'static str> {
    match q.wait(tsc_hz.saturating_mul(TIMEOUT_S)) {
        Ok(Some((_, len))) => Ok(len),
        Ok(None) => Err("timeout"),
        Err(_) => Err("bad-used-id"),
    }
}

impl BalloonDev {
    fn target(&self) -> u64 {
        u64::from(self.t.cfg_r32(0))
    }

    fn actual(&self) -> u64 {
        u64::from(self.t.cfg_r32(4))
    }

    fn free_bytes(&self, pool: &Pool) -> u64 {
        pool.pages().saturating_sub(self.held) * PAGE
    }

    fn post_stats(&mut self, pool: &Pool) -> Result<(), &'static str> {
        let free = self.free_bytes(pool);
        let entries = [
            (tag::MEMTOT, pool.ram_bytes),
            (tag::MEMFREE, free),
            (tag::AVAIL, free),
        ];
        for (i, (t, v)) in entries.iter().enumerate() {
            let a = self.stats_buf + i as u64 * 10;
            for (k, b) in t
                .to_le_bytes()
                .iter()
                .chain(v.to_le_bytes().iter())
                .enumerate()
            {
                mmio::w8(a + k as u64, *b);
            }
        }
        let q = self.stats.as_mut().ok_or("no-stats-queue")?;
        q.add(&[Buf::read(self.stats_buf, (entries.len() * 10) as u32)])
            .ok_or("stats-queue-full")?;
        q.kick();
        Ok(())
    }

    /// Sends pool pages `from..from+n` on the inflate or deflate queue.
    fn send_pfns(
        &mut self,
        deflate: bool,
        from: u64,
        n: u64,
        pool: &Pool,
        tsc_hz: u64,
    ) -> Result<(), &'static str> {
        for i in 0..n {
            let addr = pool.page(from + i).ok_or("pool-exhausted")?;
            mmio::w32(self.pfn_buf + i * 4, (addr / PAGE) as u32);
        }
        let q = if deflate {
            &mut self.deflate
        } else {
            &mut self.inflate
        };
        q.add(&[Buf::read(self.pfn_buf, (n * 4) as u32)])
            .ok_or("queue-full")?;
        q.kick();
        wait_used(q, tsc_hz)?;
        Ok(())
    }

    /// Moves the balloon one request towards `target` pages; true if it moved.
    fn step(&mut self, target: u64, pool: &Pool, tsc_hz: u64) -> Result<bool, &'static str> {
        let target = target.min(pool.pages());
        if target > self.held {
            let n = (target - self.held).min(PFNS_PER_REQUEST);
            self.send_pfns(false, self.held, n, pool, tsc_hz)?;
            self.held += n;
            self.inflated += n;
        } else if target < self.held {
            let n = (self.held - target).min(PFNS_PER_REQUEST);
            self.send_pfns(true, self.held - n, n, pool, tsc_hz)?;
            self.held -= n;
            self.deflated += n;
        } else {
            return Ok(false);
        }
        self.t.cfg_w32(4, self.held as u32);
        Ok(true)
    }

    /// Answers a statistics request if the device gave the buffer back.
    fn poll_stats(&mut self, pool: &Pool) -> Result<(), &'static str> {
        let Some(q) = self.stats.as_mut() else {
            return Ok(());
        };
        match q.poll() {
            Ok(Some(_)) => {
                self.stats_answers += 1;
                self.post_stats(pool)
            }
            Ok(None) => Ok(()),
            Err(_) => Err("bad-used-id"),
        }
    }

    /// Services the device until `done(self)` or `seconds` pass; prints a progress line each
    /// time the balloon reaches the target. Err(reason) on device failure, Ok(false) on
    /// timeout.
    fn service(
        &mut self,
        pool: &Pool,
        tsc_hz: u64,
        seconds: u64,
        done: &dyn Fn(&BalloonDev, u64) -> bool,
    ) -> Result<bool, &'static str> {
        let start = sys::rdtsc();
        let deadline = tsc_hz.saturating_mul(seconds);
        let check_every = (tsc_hz / 500).max(1); // 2 ms
        let reread_every = tsc_hz / 2; // 500 ms, in case a config interrupt was missed
        let mut target = self.target();
        let mut last_check = start;
        let mut last_read = start;
        let mut moving = false;
        loop {
            let now = sys::rdtsc();
            if now.wrapping_sub(last_check) >= check_every {
                last_check = now;
                // ISR bit 1: the configuration changed (reading clears it).
                if self.t.isr() & 2 != 0 || now.wrapping_sub(last_read) >= reread_every {
                    last_read = now;
                    target = self.target();
                }
                self.poll_stats(pool)?;
            }
            if self.step(target, pool, tsc_hz)? {
                moving = true;
                continue;
            }
            if moving {
                moving = false;
                println!(
                    "balloon actual_mib={} target_mib={}",
                    self.held / PAGES_PER_MIB,
                    target / PAGES_PER_MIB
                );
            }
            if done(self, target) {
                return Ok(true);
            }
            if sys::rdtsc().wrapping_sub(start) >= deadline {
                return Ok(false);
            }
            core::hint::spin_loop();
        }
    }

    /// Reports `mib` MiB of free pool pages (just below the balloon) in 2 MiB ranges; returns
    /// the number of ranges.
    fn report_free(&mut self, mib: u64, pool: &Pool, tsc_hz: u64) -> Result<u64, &'static str> {
        let pages = mib * PAGES_PER_MIB;
        if self.held + pages > pool.pages() {
            return Err("not-enough-free-memory");
        }
        let q = self
            .report
            .as_mut()
            .ok_or("feature-not-negotiated=REPORTING")?;
        let mut bufs = [Buf::write(0, 0); REPORT_CHUNKS_PER_REQUEST];
        let mut n = 0;
        let mut chunks = 0;
        let mut page = self.held;
        let end = self.held + pages;
        while page < end {
            // A range is a run of pages contiguous in guest-physical memory.
            let top = pool.page(page).ok_or("pool-exhausted")? + PAGE;
            let mut len = 0u64;
            while page < end && len < REPORT_CHUNK && pool.page(page) == Some(top - len - PAGE) {
                len += PAGE;
                page += 1;
            }
            bufs[n] = Buf::write(top - len, len as u32);
            n += 1;
            chunks += 1;
            if n == bufs.len() || page == end {
                q.add(&bufs[..n]).ok_or("queue-full")?;
                q.kick();
                wait_used(q, tsc_hz)?;
                n = 0;
            }
        }
        Ok(chunks)
    }
}

fn parse(args: &[&str], i: usize) -> Option<u64> {
    args.get(i).and_then(|a| crate::cmd::parse_u64(a))
}

/// Writes one word into each free pool page `from..from+n`.
fn touch_pages(pool: &Pool, from: u64, n: u64) -> bool {
    for i in 0..n {
        let Some(addr) = pool.page(from + i) else {
            return false;
        };
        if !phys_ok(addr, PAGE) {
            return false;
        }
        // SAFETY: a free pool page: RAM inside the identity map that this program keeps no
        // data in and that is not in the balloon.
        unsafe { (addr as *mut u64).write_volatile(0x5eed_0000_0000_0000 | i) };
    }
    true
}

/// `balloon`, `balloon-run SECONDS`, `balloon-wait MIB [SECONDS]`, `balloon-report MIB`,
/// `touch MIB`.
pub fn cmd(name: &str, pci: &Pci, boot: &BootInfo, tsc_hz: u64, args: &[&str]) {
    let pool = Pool::new(boot);
    if name == "touch" {
        cmd_touch(&pool, tsc_hz, args);
        return;
    }
    let dev = match device(pci, &pool) {
        Ok(d) => d,
        Err(e) => {
            println!("ERR {} {}", name, e);
            return;
        }
    };
    match (name, args.len()) {
        ("balloon", 0) => println!(
            "OK balloon features={:#x} offered={:#x} num_pages={} actual={} held_mib={} pool_mib={}",
            dev.t.features,
            dev.t.offered,
            dev.target(),
            dev.actual(),
            dev.held / PAGES_PER_MIB,
            pool.pages() / PAGES_PER_MIB
        ),
        ("balloon-run", 1) => {
            let Some(secs) = parse(args, 0).filter(|s| (1..=3600).contains(s)) else {
                println!("ERR balloon-run bad-seconds={}", args[0]);
                return;
            };
            println!("balloon-run started seconds={}", secs);
            match dev.service(&pool, tsc_hz, secs, &|_, _| false) {
                Err(e) => println!("ERR balloon-run {}", e),
                Ok(_) => println!(
                    "OK balloon-run actual_mib={} target_mib={} inflated={} deflated={} stats_answers={}",
                    dev.held / PAGES_PER_MIB,
                    dev.target() / PAGES_PER_MIB,
                    dev.inflated,
                    dev.deflated,
                    dev.stats_answers
                ),
            }
        }
        ("balloon-wait", 1 | 2) => {
            let (Some(mib), Some(secs)) = (parse(args, 0), parse(args, 1).or(Some(60))) else {
                println!("ERR balloon-wait bad-number");
                return;
            };
            let want = mib.saturating_mul(PAGES_PER_MIB);
            let reached = dev.service(&pool, tsc_hz, secs.clamp(1, 3600), &|d, target| {
                d.held == want && target == want
            });
            match reached {
                Err(e) => println!("ERR balloon-wait {}", e),
                Ok(true) => println!(
                    "OK balloon-wait actual_mib={} stats_answers={}",
                    dev.held / PAGES_PER_MIB,
                    dev.stats_answers
                ),
                Ok(false) => println!(
                    "ERR balloon-wait timeout actual_mib={} target_mib={}",
                    dev.held / PAGES_PER_MIB,
                    dev.target() / PAGES_PER_MIB
                ),
            }
        }
        ("balloon-report", 1) => {
            let Some(mib) = parse(args, 0).filter(|m| *m > 0) else {
                println!("ERR balloon-report bad-number={}", args[0]);
                return;
            };
            match dev.report_free(mib, &pool, tsc_hz) {
                Ok(ranges) => println!("OK balloon-report mib={} ranges={}", mib, ranges),
                Err(e) => println!("ERR balloon-report {}", e),
            }
        }
        _ => println!(
            "ERR {} usage: balloon | balloon-run SECONDS | balloon-wait MIB [SECONDS] | balloon-report MIB | touch MIB",
            name
        ),
    }
}

/// `touch MIB`: makes MIB MiB of free pages resident. With too little free memory and
/// DEFLATE_ON_OOM negotiated, the balloon is deflated first (and the host told).
fn cmd_touch(pool: &Pool, tsc_hz: u64, args: &[&str]) {
    let Some(mib) = parse(args, 0).filter(|m| *m > 0 && args.len() == 1) else {
        println!("ERR touch usage: touch MIB");
        return;
    };
    let pages = mib.saturating_mul(PAGES_PER_MIB);
    if pages > pool.pages() {
        println!(
            "ERR touch out-of-memory mib={} pool_mib={}",
            mib,
            pool.pages() / PAGES_PER_MIB
        );
        return;
    }
    // The balloon only exists once a balloon command initialised the driver.
    // SAFETY: single-threaded CPL3 code; nothing else holds a reference to DEV.
    let dev = unsafe { (*core::ptr::addr_of_mut!(DEV)).as_mut() };
    let mut held = 0;
    let mut oom_deflated = 0;
    if let Some(d) = dev {
        let free = pool.pages() - d.held;
        if pages > free {
            if !d.t.has(bfeat::DEFLATE_ON_OOM) {
                println!(
                    "ERR touch out-of-memory mib={} free_mib={}",
                    mib,
                    free / PAGES_PER_MIB
                );
                return;
            }
            let need = d.held - (pool.pages() - pages);
            while d.held > pool.pages() - pages {
                if let Err(e) = d.step(pool.pages() - pages, pool, tsc_hz) {
                    println!("ERR touch deflate-failed {}", e);
                    return;
                }
            }
            oom_deflated = need;
        }
        held = d.held;
    }
    let t0 = sys::rdtsc();
    if !touch_pages(pool, held, pages) {
        println!("ERR touch not-mapped mib={}", mib);
        return;
    }
    let ms = sys::rdtsc().wrapping_sub(t0) as u128 * 1000 / tsc_hz.max(1) as u128;
    println!(
        "OK touch mib={} oom_deflated_mib={} ms={}",
        mib,
        oom_deflated / PAGES_PER_MIB,
        ms
    );
}
