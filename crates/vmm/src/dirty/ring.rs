//! KVM's per-vCPU dirty ring, by hand: kvm-ioctls 0.25 knows only the capability number
//! (`Cap::DirtyLogRing`), not the enable call's size argument, the ring mapping on each vCPU
//! fd, `KVM_RESET_DIRTY_RINGS` or the `KVM_EXIT_DIRTY_RING_FULL` exit, so those are raw
//! ioctls and an mmap here (see the kernel's Documentation/virt/kvm/api.rst, "dirty ring").
//!
//! Each vCPU's ring is an array of `struct kvm_dirty_gfn {flags, slot, offset}` shared with
//! the kernel. KVM pushes one entry per page the vCPU dirties (flags `DIRTY`, set last with
//! release semantics); userspace reads entries in order from its fetch index while `DIRTY`
//! is set (acquire), marks each one `RESET` (release), and then `KVM_RESET_DIRTY_RINGS`
//! lets KVM reuse them and write-protect those pages again. A page written between the
//! harvest and the reset is not logged again, so a page's contents must be read after the
//! harvest that returned it (every reader here does).

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::DirtyError;

/// `KVM_EXIT_DIRTY_RING_FULL`: a vCPU's ring reached its soft limit; harvest and reset
/// before running it again (kvm-ioctls reports it as `VcpuExit::Unsupported(31)`).
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;
/// `KVM_RESET_DIRTY_RINGS` = `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xae << 8 | 0xc7;
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// Ring size per vCPU when nothing else is asked: 16384 entries (64 MiB of 4 KiB pages
/// between harvests before a vCPU must stop and harvest its ring itself).
pub const DEFAULT_RING_BYTES: u32 = 256 << 10;
/// The smallest ring KVM takes (one page: 256 entries).
const MIN_RING_BYTES: u32 = 4096;
/// Test and tuning knob: the ring size in bytes per vCPU (a power of two, 4096 up to the
/// host's maximum). Small rings make vCPUs hit `KVM_EXIT_DIRTY_RING_FULL` often.
pub const RING_BYTES_ENV: &str = "FERRITE_DIRTY_RING_BYTES";

/// The dirty-ring capability this host's KVM offers for `vm`, and its largest ring in bytes
/// (the ACQ_REL flavour preferred; same protocol for userspace, which uses acquire/release
/// either way).
pub fn host_ring(vm: &VmFd) -> Option<(u32, u32)> {
    [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find_map(|cap| {
            let max = vm.check_extension_raw(libc::c_ulong::from(cap));
            (max > 0).then_some((cap, max as u32))
        })
}

/// The ring size to ask for: [`RING_BYTES_ENV`] if set (checked), else the default, at
/// most `max`.
pub fn ring_bytes(max: u32) -> Result<u32, DirtyError> {
    let bytes = match std::env::var(RING_BYTES_ENV) {
        Ok(text) => {
            let bytes: u32 = text.trim().parse().map_err(|_| DirtyError::RingSize {
                value: text.clone(),
                max,
            })?;
            if !bytes.is_power_of_two() || bytes < MIN_RING_BYTES || bytes > max {
                return Err(DirtyError::RingSize { value: text, max });
            }
            bytes
        }
        Err(_) => DEFAULT_RING_BYTES,
    };
    Ok(bytes.min(max))
}

/// Turn the dirty ring on for `vm` (`cap` from [`host_ring`]), `bytes` per vCPU. Must come
/// before the first vCPU is created.
pub fn enable(vm: &VmFd, cap: u32, bytes: u32) -> Result<(), DirtyError> {
    let mut enable = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    enable.args[0] = u64::from(bytes);
    vm.enable_cap(&enable)
        .map_err(|source| DirtyError::Enable { bytes, source })
}

/// One vCPU's ring mapping.
struct RingMap {
    entries: NonNull<kvm_dirty_gfn>,
    count: u32,
}

// SAFETY: the mapping is plain shared memory; every access goes through `DirtyRing::state`'s
// mutex (the only consumer) and atomic operations on `flags` (shared with the kernel).
unsafe impl Send for RingMap {}
// SAFETY: as above.
unsafe impl Sync for RingMap {}

impl RingMap {
    fn map(vcpu: &VcpuFd, bytes: u32) -> Result<Self, DirtyError> {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: a fresh shared mapping of the vCPU fd's dirty-ring pages (the kernel
        // checks offset and length); the result is checked before use and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyError::Map(std::io::Error::last_os_error()));
        }
        let entries = NonNull::new(ptr.cast())
            .ok_or_else(|| DirtyError::Map(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
        Ok(Self {
            entries,
            count: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
        })
    }

    /// Entry `index` (modulo the ring size).
    fn entry(&self, index: u32) -> *mut kvm_dirty_gfn {
        // SAFETY: `index % count` is inside the mapping of `count` entries.
        unsafe { self.entries.as_ptr().add((index % self.count) as usize) }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, `count` entries long, unused from here on.
        unsafe {
            libc::munmap(
                self.entries.as_ptr().cast(),
                self.count as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            );
        }
    }
}

/// What the consumer side keeps between harvests.
struct RingState {
    /// Per vCPU: the next entry to read.
    fetch: Vec<u32>,
    /// Pages harvested but not yet returned by [`DirtyRing::harvest`] (one bitmap per
    /// memory slot): what vCPUs collected when their ring filled up.
    pending: Vec<Vec<u64>>,
    /// Entries naming a slot or page outside guest RAM (never expected from KVM).
    bad_entries: u64,
    /// A ring overflowed since the last harvest: entries were lost, so every page counts as
    /// dirty.
    overflowed: bool,
}

/// The dirty rings of every vCPU of one VM.
pub struct DirtyRing {
    vm: Arc<VmFd>,
    rings: Vec<RingMap>,
    /// Pages per memory slot (slot `i` is guest RAM region `i`).
    slot_pages: Vec<u64>,
    state: Mutex<RingState>,
    bytes: u32,
}

impl DirtyRing {
    /// Map the ring (`bytes` long, enabled with [`enable`]) of each of `vcpus`, for memory
    /// slots of `slot_bytes` bytes each.
    pub fn new(
        vm: Arc<VmFd>,
        vcpus: &[VcpuFd],
        bytes: u32,
        slot_bytes: &[u64],
    ) -> Result<Self, DirtyError> {
        let rings = vcpus
            .iter()
            .map(|v| RingMap::map(v, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let slot_pages: Vec<u64> = slot_bytes.iter().map(|b| b / 4096).collect();
        Ok(Self {
            vm,
            state: Mutex::new(RingState {
                fetch: vec![0; rings.len()],
                pending: empty_bitmaps(&slot_pages),
                bad_entries: 0,
                overflowed: false,
            }),
            rings,
            slot_pages,
            bytes,
        })
    }

    /// The ring size per vCPU, bytes.
    pub fn bytes(&self) -> u32 {
        self.bytes
    }

    /// Every page the vCPUs dirtied since the last call (one bitmap per slot), including
    /// what vCPUs collected themselves when their ring filled up.
    pub fn harvest(&self) -> Result<Vec<Vec<u64>>, DirtyError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.collect(&mut state)?;
        let fresh = empty_bitmaps(&self.slot_pages);
        let mut pages = std::mem::replace(&mut state.pending, fresh);
        if std::mem::take(&mut state.overflowed) {
            tracing::warn!("a dirty ring overflowed: counting every page as dirty once");
            for (bits, &n) in pages.iter_mut().zip(&self.slot_pages) {
                bits.fill(u64::MAX);
                if n % 64 != 0 {
                    if let Some(last) = bits.last_mut() {
                        *last = (1u64 << (n % 64)) - 1;
                    }
                }
            }
        }
        Ok(pages)
    }

    /// A vCPU exited with `KVM_EXIT_DIRTY_RING_FULL`: collect every ring into the pending
    /// bitmaps (returned by the next [`DirtyRing::harvest`]) and reset them, so the vCPU can
    /// run again. Returns how many entries it collected.
    pub fn drain_full(&self) -> Result<u64, DirtyError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let collected = self.collect(&mut state)?;
        if collected == 0 {
            // A full ring with nothing at the fetch index: KVM overflowed it and the indices
            // no longer meet (see `resync`).
            self.resync(&mut state)?;
        }
        Ok(collected)
    }

    /// Read every ring from its fetch index while entries are dirty, mark them in
    /// `state.pending` and for reset, then reset the rings.
    fn collect(&self, state: &mut RingState) -> Result<u64, DirtyError> {
        let mut collected = 0u64;
        for (ring, fetch) in self.rings.iter().zip(state.fetch.iter_mut()) {
            let mut this_ring = 0u32;
            // At most one lap: a ring never holds more than `count` entries.
            for _ in 0..ring.count {
                let entry = ring.entry(*fetch);
                // SAFETY: `entry` points into the live mapping and `flags` is a naturally
                // aligned u32 at its start; the kernel writes it concurrently, so it is only
                // ever accessed atomically.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
                if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: the acquire load above orders these reads after KVM's writes of
                // the entry, which it does not touch again until it is reset.
                let (slot, offset) = unsafe {
                    (
                        std::ptr::addr_of!((*entry).slot).read_volatile(),
                        std::ptr::addr_of!((*entry).offset).read_volatile(),
                    )
                };
                // The slot's upper 16 bits are the address space: always 0 on x86 outside SMM.
                let page = (slot >> 16 == 0)
                    .then_some(slot as usize)
                    .filter(|&s| self.slot_pages.get(s).is_some_and(|&n| offset < n));
                match page {
                    Some(s) => state.pending[s][(offset / 64) as usize] |= 1 << (offset % 64),
                    None => state.bad_entries += 1,
                }
                flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
                *fetch = fetch.wrapping_add(1);
                collected += 1;
                this_ring += 1;
            }
            // KVM stops a vCPU while its ring has room for the pages one guest entry may
            // still dirty (64 entries); a whole lap of dirty entries means it ran past that
            // (on kvm_pvm an emulated CPL0 stretch can): entries may have been overwritten.
            if this_ring == ring.count {
                state.overflowed = true;
            }
        }
        if collected > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only the VM's
            // rings, whose entries this consumer marked above.
            let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _) };
            if r < 0 {
                return Err(DirtyError::Reset(std::io::Error::last_os_error()));
            }
        }
        if state.bad_entries > 0 {
            tracing::warn!(
                entries = state.bad_entries,
                "dirty ring entries outside guest RAM ignored"
            );
            state.bad_entries = 0;
        }
        Ok(collected)
    }
}

impl DirtyRing {
    /// Recover a ring KVM overflowed: it then pushes entries further on than the fetch
    /// index, and resets (which walk from where the last reset stopped, i.e. the fetch index,
    /// while entries are marked harvested) never reach them, so the vCPU would exit "ring
    /// full" forever. Mark the clean gap between the fetch index and the run of dirty entries
    /// harvested (KVM then write-protects the stale pages they name again: harmless), collect
    /// the run, reset, and count every page dirty (entries were lost).
    fn resync(&self, state: &mut RingState) -> Result<(), DirtyError> {
        let dirty = |ring: &RingMap, i: u32| {
            // SAFETY: as in `collect`: `flags` is only ever accessed atomically.
            let flags =
                unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*ring.entry(i)).flags)) };
            flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY != 0
        };
        let mut repaired = false;
        for (ring, fetch) in self.rings.iter().zip(state.fetch.iter_mut()) {
            if dirty(ring, *fetch) {
                continue;
            }
            // The first dirty entry after a clean one, going forward from the fetch index.
            let Some(gap) = (1..ring.count).find(|&d| dirty(ring, fetch.wrapping_add(d))) else {
                continue;
            };
            for d in 0..gap {
                // SAFETY: as above.
                let flags = unsafe {
                    AtomicU32::from_ptr(std::ptr::addr_of_mut!(
                        (*ring.entry(fetch.wrapping_add(d))).flags
                    ))
                };
                flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            }
            *fetch = fetch.wrapping_add(gap);
            repaired = true;
        }
        if repaired {
            tracing::warn!("a dirty ring overflowed and was resynchronised");
            state.overflowed = true;
            self.collect(state)?;
        }
        Ok(())
    }
}

/// One all-clean bitmap per slot of `slot_pages` pages.
pub(super) fn empty_bitmaps(slot_pages: &[u64]) -> Vec<Vec<u64>> {
    slot_pages
        .iter()
        .map(|&n| vec![0u64; n.div_ceil(64) as usize])
        .collect()
}
