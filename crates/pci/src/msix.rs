//! MSI-X: the capability, the vector table and the pending-bit array of one function.
//!
//! Every change that affects whether or where a vector is delivered is pushed to the VMM via
//! [`MsiRouter::update`]; a vector that fires while masked sets its pending bit and is delivered
//! when it is unmasked.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::{MsiRoute, MsiRouter};

use crate::PciError;

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
const MSG_CTL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: per-vector mask.
const VECTOR_CTL_MASK: u32 = 1;

/// One table entry as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MsixTableEntry {
    /// Message address, low dword.
    pub addr_lo: u32,
    /// Message address, high dword.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0 = masked).
    pub vector_ctl: u32,
}

impl MsixTableEntry {
    fn masked(&self) -> bool {
        self.vector_ctl & VECTOR_CTL_MASK != 0
    }

    fn addr(&self) -> u64 {
        u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo)
    }

    fn get_byte(&self, i: usize) -> u8 {
        let word = match i / 4 {
            0 => self.addr_lo,
            1 => self.addr_hi,
            2 => self.data,
            _ => self.vector_ctl,
        };
        (word >> ((i % 4) * 8)) as u8
    }

    fn set_byte(&mut self, i: usize, b: u8) {
        let shift = (i % 4) * 8;
        let word = match i / 4 {
            0 => &mut self.addr_lo,
            1 => &mut self.addr_hi,
            2 => &mut self.data,
            _ => &mut self.vector_ctl,
        };
        *word = (*word & !(0xff << shift)) | u32::from(b) << shift;
    }
}

/// Serialisable MSI-X state (the GSIs are re-allocated on restore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The vector table.
    pub table: Vec<MsixTableEntry>,
    /// Pending bits, 64 vectors per word.
    pub pba: Vec<u64>,
    /// MSI-X enable bit.
    pub enabled: bool,
    /// Function mask bit.
    pub function_masked: bool,
}

/// The MSI-X model of one function. Shared (behind a mutex) between the vCPU that programs the
/// table and the device worker thread that triggers vectors.
pub struct MsixConfig {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    routes: Vec<Option<MsiRoute>>,
    /// Whether each route is currently programmed as deliverable.
    live: Vec<bool>,
    router: Arc<dyn MsiRouter>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl MsixConfig {
    /// `num_vectors` vectors, each with a GSI + irqfd from `router`, all masked, MSI-X off.
    pub fn new(num_vectors: u16, router: Arc<dyn MsiRouter>) -> Result<Self, PciError> {
        if num_vectors == 0 || num_vectors > MAX_MSIX_VECTORS {
            return Err(PciError::InvalidMsixVectors(num_vectors));
        }
        let mut routes = Vec::with_capacity(num_vectors as usize);
        for _ in 0..num_vectors {
            match router.allocate() {
                Ok(r) => routes.push(Some(r)),
                Err(e) => {
                    for r in routes.into_iter().flatten() {
                        let _ = router.release(r);
                    }
                    return Err(PciError::Interrupt(e));
                }
            }
        }
        let n = num_vectors as usize;
        Ok(Self {
            table: vec![
                MsixTableEntry {
                    vector_ctl: VECTOR_CTL_MASK,
                    ..Default::default()
                };
                n
            ],
            pba: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routes,
            live: vec![false; n],
            router,
        })
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Size in bytes of the table (for BAR layout).
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size in bytes of the PBA (for BAR layout).
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// The GSI behind a vector (for diagnostics and the VMM).
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.routes.get(vector as usize)?.as_ref().map(|r| r.gsi)
    }

    /// Whether a vector's pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = vector as usize;
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.pba.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.table.get(v).is_some_and(|e| !e.masked())
    }

    /// The capability body (ID first) for a table in `table_bar` at `table_offset` and a PBA
    /// in `pba_bar` at `pba_offset` (offsets 8-byte aligned), plus its write mask.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; 12], [u8; 12]) {
        let mut body = [0u8; 12];
        body[0] = MSIX_CAP_ID;
        let ctl = self.num_vectors() - 1; // Table size is N-1 encoded.
        body[2..4].copy_from_slice(&ctl.to_le_bytes());
        body[4..8].copy_from_slice(&((table_offset & !7) | u32::from(table_bar & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bar & 7)).to_le_bytes());
        let mut mask = [0u8; 12];
        mask[3] = 0xc0; // Enable and function mask.
        (body, mask)
    }

    /// The message-control register as the guest should read it.
    pub fn message_control(&self) -> u16 {
        let mut ctl = self.num_vectors() - 1;
        if self.enabled {
            ctl |= MSG_CTL_ENABLE;
        }
        if self.function_masked {
            ctl |= MSG_CTL_FUNCTION_MASK;
        }
        ctl
    }

    /// The guest wrote the message-control register.
    pub fn set_message_control(&mut self, ctl: u16) {
        let enabled = ctl & MSG_CTL_ENABLE != 0;
        let masked = ctl & MSG_CTL_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.table.len() {
            self.sync_route(v);
        }
    }

    /// Push vector `v`'s state to the router if it changed, and deliver a pending message
    /// that became deliverable.
    fn sync_route(&mut self, v: usize) {
        let deliver = self.deliverable(v);
        let entry = self.table[v];
        let Some(route) = self.routes[v].as_ref() else {
            return;
        };
        if deliver || self.live[v] {
            if let Err(e) = self
                .router
                .update(route.gsi, entry.addr(), entry.data, deliver)
            {
                tracing::warn!("MSI-X vector {v}: route update failed: {e}");
            }
        }
        let fire = deliver && self.is_pending(v as u16);
        if fire {
            let _ = route.event.write(1);
            self.set_pending(v, false);
        }
        self.live[v] = deliver;
    }

    /// Guest read of the vector table at byte `offset` (any width; out of range reads 0).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            let v = (off / MSIX_TABLE_ENTRY_SIZE) as usize;
            *b = self
                .table
                .get(v)
                .map_or(0, |e| e.get_byte((off % MSIX_TABLE_ENTRY_SIZE) as usize));
        }
    }

    /// Guest write of the vector table at byte `offset`.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if data.len() > 8 {
            return;
        }
        let mut touched: Vec<usize> = Vec::with_capacity(2);
        for (i, b) in data.iter().enumerate() {
            let off = offset.saturating_add(i as u64);
            let v = (off / MSIX_TABLE_ENTRY_SIZE) as usize;
            let byte = (off % MSIX_TABLE_ENTRY_SIZE) as usize;
            let Some(entry) = self.table.get_mut(v) else {
                continue;
            };
            // Only the mask bit of vector control is writable.
            let b = if byte == 12 {
                *b & 1
            } else if byte > 12 {
                0
            } else {
                *b
            };
            entry.set_byte(byte, b);
            if !touched.contains(&v) {
                touched.push(v);
            }
        }
        for v in touched {
            self.sync_route(v);
        }
    }

    /// Guest read of the PBA (read-only to the guest).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            *b = self
                .pba
                .get((off / 8) as usize)
                .map_or(0, |w| (w >> ((off % 8) * 8)) as u8);
        }
    }

    /// Fire `vector`: delivered now if enabled and unmasked, else left pending (when MSI-X is
    /// enabled) or dropped (when it is disabled: there is no INTx fallback).
    pub fn trigger(&mut self, vector: u16) {
        let v = vector as usize;
        if v >= self.table.len() || !self.enabled {
            return;
        }
        if self.deliverable(v) {
            if let Some(route) = self.routes[v].as_ref() {
                if let Err(e) = route.event.write(1) {
                    tracing::warn!("MSI-X vector {v}: signalling failed: {e}");
                }
            }
        } else {
            self.set_pending(v, true);
        }
    }

    /// Back to power-on state: all vectors masked, MSI-X disabled, nothing pending.
    pub fn reset(&mut self) {
        for e in &mut self.table {
            *e = MsixTableEntry {
                vector_ctl: VECTOR_CTL_MASK,
                ..Default::default()
            };
        }
        self.pba.iter_mut().for_each(|w| *w = 0);
        self.enabled = false;
        self.function_masked = false;
        for v in 0..self.table.len() {
            self.sync_route(v);
        }
    }

    /// Snapshot.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Restore a snapshot taken from a function with the same vector count, reprogramming
    /// every route.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), PciError> {
        if state.table.len() != self.table.len() || state.pba.len() != self.pba.len() {
            return Err(PciError::InvalidState("MSI-X vector count"));
        }
        self.table.clone_from(&state.table);
        for e in &mut self.table {
            e.vector_ctl &= VECTOR_CTL_MASK;
        }
        self.pba.clone_from(&state.pba);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for v in 0..self.table.len() {
            // Force a reprogram even if `live` says it is already in place.
            self.live[v] = true;
            self.sync_route(v);
        }
        Ok(())
    }
}

impl Drop for MsixConfig {
    fn drop(&mut self) {
        for route in self.routes.iter_mut().filter_map(Option::take) {
            if let Err(e) = self.router.release(route) {
                tracing::warn!("MSI-X route release failed: {e}");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::InterruptError;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Records every update and hands out plain eventfds.
    #[derive(Default)]
    pub struct FakeRouter {
        pub next_gsi: Mutex<u32>,
        pub updates: Mutex<Vec<(u32, u64, u32, bool)>>,
        pub released: Mutex<Vec<u32>>,
    }

    impl MsiRouter for FakeRouter {
        fn allocate(&self) -> Result<MsiRoute, InterruptError> {
            let mut g = self.next_gsi.lock().unwrap();
            *g += 1;
            Ok(MsiRoute {
                gsi: 23 + *g,
                event: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
        }
        fn update(&self, gsi: u32, addr: u64, data: u32, en: bool) -> Result<(), InterruptError> {
            self.updates.lock().unwrap().push((gsi, addr, data, en));
            Ok(())
        }
        fn release(&self, route: MsiRoute) -> Result<(), InterruptError> {
            self.released.lock().unwrap().push(route.gsi);
            Ok(())
        }
    }

    fn setup(n: u16) -> (Arc<FakeRouter>, MsixConfig) {
        let router = Arc::new(FakeRouter::default());
        let msix = MsixConfig::new(n, router.clone()).unwrap();
        (router, msix)
    }

    fn program(msix: &mut MsixConfig, v: u64, addr: u64, data: u32, masked: bool) {
        let base = v * 16;
        msix.write_table(base, &addr.to_le_bytes());
        msix.write_table(base + 8, &data.to_le_bytes());
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn fired(msix: &MsixConfig, v: u16) -> bool {
        msix.routes[v as usize]
            .as_ref()
            .unwrap()
            .event
            .read()
            .is_ok()
    }

    #[test]
    fn test_msix_entries_start_masked() {
        let (_r, msix) = setup(3);
        let mut ctl = [0u8; 4];
        msix.read_table(12, &mut ctl);
        assert_eq!(u32::from_le_bytes(ctl), 1);
        assert_eq!(msix.message_control(), 2);
    }

    #[test]
    fn test_msix_unmasked_enabled_vector_updates_route_and_fires() {
        let (router, mut msix) = setup(2);
        msix.set_message_control(MSG_CTL_ENABLE);
        program(&mut msix, 1, 0xfee0_0000, 0x4041, false);
        let last = *router.updates.lock().unwrap().last().unwrap();
        assert_eq!(last, (msix.gsi(1).unwrap(), 0xfee0_0000, 0x4041, true));
        msix.trigger(1);
        assert!(fired(&msix, 1));
        assert!(!msix.is_pending(1));
    }

    #[test]
    fn test_msix_masked_vector_sets_pending_and_delivers_on_unmask() {
        let (router, mut msix) = setup(2);
        msix.set_message_control(MSG_CTL_ENABLE);
        program(&mut msix, 0, 0xfee0_0000, 0x30, true);
        msix.trigger(0);
        assert!(!fired(&msix, 0));
        assert!(msix.is_pending(0));
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        msix.write_table(12, &0u32.to_le_bytes());
        assert!(fired(&msix, 0));
        assert!(!msix.is_pending(0));
        assert!(router.updates.lock().unwrap().last().unwrap().3);
    }

    #[test]
    fn test_msix_function_mask_holds_then_releases() {
        let (_r, mut msix) = setup(1);
        msix.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        program(&mut msix, 0, 0xfee0_0000, 0x31, false);
        msix.trigger(0);
        assert!(!fired(&msix, 0));
        assert!(msix.is_pending(0));
        msix.set_message_control(MSG_CTL_ENABLE);
        assert!(fired(&msix, 0));
    }

    #[test]
    fn test_msix_disabled_trigger_is_dropped() {
        let (_r, mut msix) = setup(1);
        program(&mut msix, 0, 0xfee0_0000, 0x31, false);
        msix.trigger(0);
        assert!(!fired(&msix, 0));
        assert!(!msix.is_pending(0));
    }

    #[test]
    fn test_msix_disable_removes_route() {
        let (router, mut msix) = setup(1);
        msix.set_message_control(MSG_CTL_ENABLE);
        program(&mut msix, 0, 0xfee0_0000, 0x31, false);
        msix.set_message_control(0);
        assert!(!router.updates.lock().unwrap().last().unwrap().3);
    }

    #[test]
    fn test_msix_hostile_table_accesses_are_harmless() {
        let (_r, mut msix) = setup(1);
        msix.write_table(u64::MAX - 2, &[0xff; 8]);
        msix.write_table(16, &[0xff; 4]);
        msix.write_table(0, &[0xff; 64]);
        msix.write_table(12, &[0xfe, 0xff, 0xff, 0xff]);
        let mut out = [0u8; 4];
        msix.read_table(12, &mut out);
        assert_eq!(u32::from_le_bytes(out), 0);
        msix.read_table(u64::MAX, &mut out);
        msix.trigger(5);
    }

    #[test]
    fn test_msix_state_roundtrip() {
        let (_r, mut msix) = setup(2);
        msix.set_message_control(MSG_CTL_ENABLE);
        program(&mut msix, 1, 0xfee0_1000, 0x55, true);
        msix.trigger(1);
        let state = msix.state();
        let (_r2, mut other) = setup(2);
        other.restore(&state).unwrap();
        assert_eq!(other.state(), state);
        let (_r3, mut small) = setup(1);
        assert!(small.restore(&state).is_err());
    }

    #[test]
    fn test_msix_drop_releases_routes() {
        let (router, msix) = setup(3);
        drop(msix);
        assert_eq!(router.released.lock().unwrap().len(), 3);
    }
}
