//! Live-migration workload: `dirty` rewrites guest RAM at a paced rate while counting and
//! measuring the longest stall it sees, `dirty-check` verifies what it left behind and
//! `mem-sum` checksums RAM (see docs/testguest.md).
//!
//! The region is `MIB` MiB from the pattern base, in 4 KiB pages. Page `i` written in
//! generation `g` holds 512 little-endian u64 words: word 0 is [`DIRTY_MAGIC`] `| (g & 0xffffff)`,
//! word 1 is `i`, word `w >= 2` is `seed(g, i) + w * GOLDEN` (wrapping), with
//! `seed(g, i) = splitmix64(splitmix64(g) ^ i)`, so every word of a page depends on the
//! generation, the page and the word's place. `dirty` first writes every page in generation 0,
//! then rewrites pages in order starting at generation 1: page `pos` in generation `gen`,
//! `pos += 1`, wrapping to 0 with `gen += 1`. So at any point pages `0..pos` hold `gen` and
//! pages `pos..` hold `gen - 1` (`dirty-check` reads that as 0 if `gen` is 0).
//!
//! Checksums (`sum=`) are FNV-1a 64 over the region's bytes in address order, as
//! [`fnv1a64`] (the `blk-sum` checksum, which host tests compile too).

use crate::pattern::{fnv1a64, splitmix64, FNV_OFFSET};
use crate::println;
use crate::sys;

/// Word 0 of a dirtied page ("DIRTY" in its top five bytes), or-ed with the generation's
/// low 24 bits.
pub const DIRTY_MAGIC: u64 = 0x4449_5254_5900_0000;
/// Generation bits kept in word 0.
const GEN_MASK: u64 = 0x00ff_ffff;
/// Step between consecutive words of a page (the 64-bit golden ratio).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const PAGE: u64 = 4096;
const WORDS: usize = (PAGE / 8) as usize;
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE;
/// Largest backlog the pacing catches up on: behind by more (a pause, a slow host), the
/// schedule moves forward so that at most this much is written in a burst.
const MAX_BURST_MS: u64 = 5;
/// How often the loop looks for a serial byte.
const POLL_MS: u64 = 1;

/// What the last `dirty` left behind (for `dirty-check`).
#[derive(Clone, Copy)]
pub struct Region {
    /// Physical address of page 0.
    pub base: u64,
    /// Pages in the region.
    pub pages: u64,
    /// Generation of pages `0..pos`.
    pub gen: u64,
    /// First page still holding generation `gen - 1`.
    pub pos: u64,
}

/// Word `w` of page `index` in generation `gen`.
fn page_word(gen: u64, index: u64, seed: u64, w: usize) -> u64 {
    match w {
        0 => DIRTY_MAGIC | (gen & GEN_MASK),
        1 => index,
        _ => seed.wrapping_add((w as u64).wrapping_mul(GOLDEN)),
    }
}

/// The per-page seed of words 2.. of page `index` in generation `gen`.
fn page_seed(gen: u64, index: u64) -> u64 {
    splitmix64(splitmix64(gen) ^ index)
}

/// Writes page `index` of the region at `base` with generation `gen` content.
fn write_page(base: u64, index: u64, gen: u64) {
    let p = (base + index * PAGE) as *mut u64;
    let seed = page_seed(gen, index);
    for w in 0..WORDS {
        // SAFETY: callers keep the region inside RAM that is identity mapped and unused by
        // this program (checked by `ram_ok` before the region is used).
        unsafe { p.add(w).write_volatile(page_word(gen, index, seed, w)) };
    }
}

/// Continues the region checksum over one little-endian u64 word.
fn sum_step(h: u64, word: u64) -> u64 {
    fnv1a64(h, &word.to_le_bytes())
}

/// FNV-1a 64 over the bytes of `[base, base + len)` (`len` a multiple of 8).
fn region_sum(base: u64, len: u64) -> u64 {
    let p = base as *const u64;
    let mut h = FNV_OFFSET;
    for i in 0..(len / 8) as usize {
        // SAFETY: as `write_page`.
        h = sum_step(h, unsafe { p.add(i).read_volatile() });
    }
    h
}

/// Cycles to microseconds at `hz`.
fn us(cycles: u64, hz: u64) -> u64 {
    (cycles as u128 * 1_000_000 / hz.max(1) as u128) as u64
}

/// Parses `MIB` and checks it against `avail` bytes of RAM from `base`; prints the error
/// (`ERR <cmd> bad-number` / `ERR <cmd> not-ram ...`) and returns `None` if it does not fit.
fn parse_mib(cmd: &str, s: &str, base: u64, avail: u64) -> Option<u64> {
    let Some(mib) = crate::cmd::parse_u64(s) else {
        println!("ERR {} bad-number", cmd);
        return None;
    };
    let max_mib = avail >> 20;
    if mib == 0 || mib > max_mib || !sys::phys_ok(base, mib << 20) {
        println!(
            "ERR {} not-ram start={:#x} mib={} max_mib={}",
            cmd, base, mib, max_mib
        );
        return None;
    }
    Some(mib)
}

/// `dirty MIB RATE [REPORT_MS]`: see the module comment for the page content. Prints
/// `OK dirty mib=M rate=R report_ms=T`, writes generation 0 everywhere, then rewrites RATE
/// pages a second (spread evenly; 0 = as fast as it can) forever, counting loop iterations
/// (`value`) and measuring the longest gap between two iterations by the TSC. Every
/// REPORT_MS ms (default 100) it prints
/// `tick n=N value=V gen=G pos=P dirtied=D gap_us=X maxgap_us=Y` (`gap_us`: longest gap
/// since the previous tick line, `maxgap_us`: since the start; a gap is the TSC time between
/// two consecutive iterations, including the serial poll and the printing of a tick line, so
/// a pause of the vCPU shows wherever it lands) and looks at the power button (`idle`). A
/// byte on the serial port (polled every ms, consumed) stops it:
/// `OK dirty stopped gen=G pos=P dirtied=D maxgap_us=Y byte=B` (B: the byte that stopped it).
/// `dirtied` counts the rewrites after the generation-0 fill.
pub fn cmd_dirty(
    last: &mut Option<Region>,
    tsc_hz: u64,
    base: u64,
    avail: u64,
    idle: &mut dyn FnMut(),
    args: &[&str],
) {
    let (mib, rate, report_ms) = match args {
        [m, r] => (m, r, None),
        [m, r, t] => (m, r, Some(t)),
        _ => {
            println!("ERR dirty usage: dirty MIB RATE [REPORT_MS]");
            return;
        }
    };
    let Some(mib) = parse_mib("dirty", mib, base, avail) else {
        return;
    };
    let Some(rate) = crate::cmd::parse_u64(rate) else {
        println!("ERR dirty bad-number");
        return;
    };
    let report_ms = match report_ms.map(|t| crate::cmd::parse_u64(t)) {
        None => 100,
        Some(Some(t)) if (1..=60_000).contains(&t) => t,
        Some(_) => {
            println!("ERR dirty bad-report-ms");
            return;
        }
    };
    println!("OK dirty mib={} rate={} report_ms={}", mib, rate, report_ms);
    let pages = mib * PAGES_PER_MIB;
    // Forget the old region while its pages are being rewritten.
    *last = None;
    for i in 0..pages {
        write_page(base, i, 0);
    }
    let mut gen = 1u64;
    let mut pos = 0u64;

    let hz = tsc_hz.max(1000);
    let ms = hz / 1000;
    let tick_period = ms.saturating_mul(report_ms);
    let max_behind = ms.saturating_mul(MAX_BURST_MS);
    let mut value = 0u64;
    let mut ticks = 0u64;
    let mut dirtied = 0u64;
    let mut gap_tick = 0u64;
    let mut gap_max = 0u64;
    let mut prev = sys::rdtsc();
    let mut next_tick = prev.wrapping_add(tick_period);
    let mut next_poll = prev.wrapping_add(ms * POLL_MS);
    // Pacing: write number `paced` is due at `pace_start + paced * hz / rate`
    // (`pace_start` moves forward after a stall longer than `max_behind`).
    let mut pace_start = prev;
    let mut paced = 0u64;
    let mut due = prev;
    let reached = |now: u64, t: u64| now.wrapping_sub(t) as i64 >= 0;
    // The byte that stopped the loop, reported (a stray byte would otherwise be a mystery).
    let mut stop_byte = [0u8; 1];
    loop {
        value = core::hint::black_box(value + 1);
        let now = sys::rdtsc();
        let gap = now.wrapping_sub(prev);
        prev = now;
        gap_tick = gap_tick.max(gap);

        if rate == 0 || reached(now, due) {
            let behind = now.wrapping_sub(due);
            if rate != 0 && behind > max_behind {
                // Catch up on at most `max_behind` of backlog: move the schedule forward.
                pace_start = pace_start.wrapping_add(behind - max_behind);
            }
            write_page(base, pos, gen);
            dirtied += 1;
            pos += 1;
            if pos == pages {
                pos = 0;
                gen += 1;
            }
            if rate != 0 {
                paced += 1;
                let offset = (paced as u128 * hz as u128 / rate as u128).min(u64::MAX as u128);
                due = pace_start.wrapping_add(offset as u64);
            }
        }

        if reached(now, next_poll) {
            next_poll = now.wrapping_add(ms * POLL_MS);
            if sys::read(&mut stop_byte) == 1 {
                break;
            }
        }

        if reached(now, next_tick) {
            ticks += 1;
            gap_max = gap_max.max(gap_tick);
            println!(
                "tick n={} value={} gen={} pos={} dirtied={} gap_us={} maxgap_us={}",
                ticks,
                value,
                gen,
                pos,
                dirtied,
                us(gap_tick, hz),
                us(gap_max, hz)
            );
            gap_tick = 0;
            idle();
            next_tick = next_tick.wrapping_add(tick_period);
            // `prev` stays the time of this iteration: the next gap includes the print and
            // the power-button look. Those are port I/O exits, where a pause often begins.
            let after = sys::rdtsc();
            if reached(after, next_tick) {
                // Paused or descheduled for longer than a period: restart from now.
                next_tick = after.wrapping_add(tick_period);
            }
        }
    }
    gap_max = gap_max.max(gap_tick);
    *last = Some(Region {
        base,
        pages,
        gen,
        pos,
    });
    println!(
        "OK dirty stopped gen={} pos={} dirtied={} maxgap_us={} byte={:#x}",
        gen,
        pos,
        dirtied,
        us(gap_max, hz),
        stop_byte[0]
    );
}

/// `dirty-check`: verifies every page of the last `dirty` region (pages `0..pos` hold
/// generation `gen`, pages `pos..` generation `gen - 1`) and checksums it:
/// `OK dirty-check pages=N gen=G pos=P sum=HEX`, or at the first wrong word
/// `ERR dirty-check page=I word=W expected=HEX found=HEX`, or `ERR dirty-check no-region`.
pub fn cmd_check(last: &Option<Region>) {
    let Some(r) = last else {
        println!("ERR dirty-check no-region");
        return;
    };
    let mut h = FNV_OFFSET;
    for i in 0..r.pages {
        let gen = if i < r.pos {
            r.gen
        } else {
            r.gen.saturating_sub(1)
        };
        let seed = page_seed(gen, i);
        let p = (r.base + i * PAGE) as *const u64;
        for w in 0..WORDS {
            // SAFETY: the region was checked by `dirty` before it was written.
            let found = unsafe { p.add(w).read_volatile() };
            let expected = page_word(gen, i, seed, w);
            if found != expected {
                println!(
                    "ERR dirty-check page={} word={} expected={:016x} found={:016x}",
                    i, w, expected, found
                );
                return;
            }
            h = sum_step(h, found);
        }
    }
    println!(
        "OK dirty-check pages={} gen={} pos={} sum={:016x}",
        r.pages, r.gen, r.pos, h
    );
}

/// `mem-sum MIB`: `OK mem-sum mib=M sum=HEX`, the region checksum of MIB MiB from `base`
/// (the same checksum as `dirty-check`'s).
pub fn cmd_mem_sum(base: u64, avail: u64, args: &[&str]) {
    let [mib] = args else {
        println!("ERR mem-sum usage: mem-sum MIB");
        return;
    };
    let Some(mib) = parse_mib("mem-sum", mib, base, avail) else {
        return;
    };
    println!(
        "OK mem-sum mib={} sum={:016x}",
        mib,
        region_sum(base, mib << 20)
    );
}
