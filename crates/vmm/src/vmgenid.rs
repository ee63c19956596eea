//! The VM generation ID (ACPI VMGENID): 16 random bytes at `arch::layout::VMGENID_ADDR` that
//! change whenever the VM is duplicated, so the guest knows to reseed its RNG and forget
//! anything that must be unique (Microsoft's "Virtual Machine Generation ID" spec; Linux
//! `drivers/virt/vmgenid.c`).
//!
//! The DSDT (`arch::acpi`) describes the device from the first boot. The ID is chosen once per
//! run (kept across guest reboots), saved in every snapshot (`vmgenid` section), kept by a plain
//! restore, and replaced by a restore as a clone, which also raises GPE0 bit
//! `arch::acpi::VMGENID_GPE` so the guest's `\_GPE._E00` notifies `\_SB.VGEN`.

use arch::layout::{VMGENID_ADDR, VMGENID_LEN};
use serde::{Deserialize, Serialize};
use vm_device::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// Errors choosing or publishing a generation ID.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    /// The host's random source failed.
    #[error("Cannot read random bytes for the VM generation ID: {0}")]
    Random(#[source] std::io::Error),
    /// Guest memory does not cover the ID's address.
    #[error("Cannot write the VM generation ID to guest memory at {VMGENID_ADDR:#x}")]
    Write,
}

/// A 128-bit VM generation ID (serialisable: the `vmgenid` section of a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationId(pub [u8; VMGENID_LEN]);

impl GenerationId {
    /// A fresh ID from the host's CSPRNG (never all zeroes, which the spec reserves).
    pub fn random() -> Result<Self, VmGenIdError> {
        let mut id = [0u8; VMGENID_LEN];
        while id == [0u8; VMGENID_LEN] {
            virtio::rng::fill::getrandom_fill(&mut id).map_err(VmGenIdError::Random)?;
        }
        Ok(Self(id))
    }

    /// Write the ID where the DSDT's `ADDR` method points the guest.
    pub fn publish(&self, mem: &GuestMemoryMmap) -> Result<(), VmGenIdError> {
        mem.write_slice(&self.0, GuestAddress(VMGENID_ADDR))
            .map_err(|_| VmGenIdError::Write)
    }

    /// The ID as 32 lowercase hex digits, in memory byte order (as the test guest prints it).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_random_generation_ids_differ_and_are_not_zero() {
        let a = GenerationId::random().unwrap();
        let b = GenerationId::random().unwrap();

        assert_ne!(a, b);
        assert_ne!(a.0, [0u8; VMGENID_LEN]);
        assert_eq!(a.hex().len(), 32);
    }

    #[test]
    fn test_publish_writes_the_id_at_the_acpi_address() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let id = GenerationId::random().unwrap();

        id.publish(&mem).unwrap();

        let mut back = [0u8; VMGENID_LEN];
        mem.read_slice(&mut back, GuestAddress(VMGENID_ADDR))
            .unwrap();
        assert_eq!(back, id.0);
    }

    #[test]
    fn test_publish_without_memory_there_is_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();

        let err = GenerationId::random().unwrap().publish(&mem).unwrap_err();

        assert!(matches!(err, VmGenIdError::Write));
    }
}
