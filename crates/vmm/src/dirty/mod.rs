//! Dirty-page tracking: one interface over KVM's two ways of reporting the pages the guest
//! writes, for every reader (migration rounds, the final pause round, diff snapshots). With
//! the dirty ring on, KVM refuses `KVM_GET_DIRTY_LOG`, so nothing may read the bitmap
//! directly. Either way the result is one bitmap per guest RAM region, merged with what
//! devices wrote (vm-memory's own per-region bitmaps).

pub mod ring;

use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};
use vm_device::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::DirtyLogMode;
use crate::memory::MemoryError;
pub use ring::DirtyRing;

/// Errors setting up or reading dirty-page tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// `--dirty-log ring` on a host whose KVM has no dirty ring.
    #[error(
        "This host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING): run the VM with \
         --dirty-log bitmap (or auto, which falls back to the bitmap)"
    )]
    NoRing,
    /// A bad `FERRITE_DIRTY_RING_BYTES`.
    #[error(
        "FERRITE_DIRTY_RING_BYTES={value:?} is not a usable ring size: give a power of two \
         from 4096 to {max} (this host's largest), or unset it"
    )]
    RingSize {
        /// What was given.
        value: String,
        /// The host's largest ring, bytes.
        max: u32,
    },
    /// KVM refused to turn the ring on.
    #[error("KVM refused a dirty ring of {bytes} bytes per vCPU")]
    Enable {
        /// Ring size asked for.
        bytes: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU's ring could not be mapped.
    #[error("Cannot map a vCPU's dirty ring")]
    Map(#[source] std::io::Error),
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    Reset(#[source] std::io::Error),
    /// The bitmap could not be read.
    #[error(transparent)]
    Bitmap(#[from] MemoryError),
}

/// How one VM's dirty pages are read: KVM's per-slot bitmap or its per-vCPU rings.
#[derive(Clone)]
pub enum DirtyLog {
    /// `KVM_GET_DIRTY_LOG` per memory slot.
    Bitmap,
    /// The vCPUs' dirty rings.
    Ring(Arc<DirtyRing>),
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl DirtyLog {
    /// `"ring"` or `"bitmap"` (for status reports and logs).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Bitmap => "bitmap",
            Self::Ring(_) => "ring",
        }
    }

    /// The rings, if this VM uses them (its vCPUs drain them when they fill up).
    pub fn ring(&self) -> Option<&Arc<DirtyRing>> {
        match self {
            Self::Ring(r) => Some(r),
            Self::Bitmap => None,
        }
    }

    /// The 4 KiB pages written since the last call, one bitmap per region of `mem` (bit `i`
    /// of word `w`: page `64 * w + i` of the region): what the vCPUs wrote (consumed from
    /// KVM) merged with what devices wrote (the regions' own bitmaps, also cleared).
    pub fn harvest(&self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, DirtyError> {
        match self {
            Self::Bitmap => Ok(crate::memory::dirty_pages(vm, mem)?),
            Self::Ring(ring) => {
                let mut pages = ring.harvest()?;
                for (bits, region) in pages.iter_mut().zip(mem.iter()) {
                    let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
                    for (word, dev) in bits.iter_mut().zip(devices) {
                        *word |= dev;
                    }
                }
                Ok(pages)
            }
        }
    }
}

/// Whether this host's KVM offers the dirty ring at all (asked of `/dev/kvm`, no VM needed).
pub fn host_offers_ring() -> bool {
    kvm_ioctls::Kvm::new().is_ok_and(|kvm| {
        [
            kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
        ]
        .into_iter()
        .any(|cap| kvm.check_extension_raw(libc::c_ulong::from(cap)) > 0)
    })
}

/// Decide how `vm` tracks dirty pages (`mode`, and what the host offers) and turn the ring on
/// if it is chosen: returns the ring size per vCPU, or None for the bitmap. Call before the
/// first vCPU is created.
pub fn prepare(vm: &VmFd, mode: DirtyLogMode) -> Result<Option<u32>, DirtyError> {
    if mode == DirtyLogMode::Bitmap {
        return Ok(None);
    }
    let Some((cap, max)) = ring::host_ring(vm) else {
        return match mode {
            DirtyLogMode::Ring => Err(DirtyError::NoRing),
            _ => Ok(None),
        };
    };
    let bytes = ring::ring_bytes(max)?;
    match ring::enable(vm, cap, bytes) {
        Ok(()) => Ok(Some(bytes)),
        Err(e) if mode == DirtyLogMode::Auto => {
            tracing::warn!("{e}: using the dirty bitmap");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The tracker for `vm` once its `vcpus` exist (`ring_bytes` from [`prepare`]).
pub fn attach(
    vm: Arc<VmFd>,
    ring_bytes: Option<u32>,
    vcpus: &[VcpuFd],
    mem: &GuestMemoryMmap,
) -> Result<DirtyLog, DirtyError> {
    let log = match ring_bytes {
        None => DirtyLog::Bitmap,
        Some(bytes) => {
            let slots: Vec<u64> = mem.iter().map(|r| r.len()).collect();
            DirtyLog::Ring(Arc::new(DirtyRing::new(vm, vcpus, bytes, &slots)?))
        }
    };
    match ring_bytes {
        Some(bytes) => tracing::info!(bytes, "dirty-page tracking: KVM dirty ring"),
        None => tracing::info!("dirty-page tracking: KVM dirty bitmap"),
    }
    Ok(log)
}
