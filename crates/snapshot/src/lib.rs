//! Ferrite's on-disk VM snapshot format. The VMM saves a paused VM into a snapshot directory
//! and restores it in a fresh process. The format is described precisely in `FORMAT.md`
//! next to this crate's `Cargo.toml`; in short:
//!
//! A **snapshot directory** holds two files, and is written under the name
//! `<name>.partial-<pid>` and renamed to `<name>` only once complete ([`SnapshotDir`]):
//!
//! - `state.bin` ([`STATE_FILE`]), the **state file**: named sections of device, vCPU and VM
//!   state. All integers little-endian:
//!
//!   | bytes          | field                                                |
//!   | -------------- | ---------------------------------------------------- |
//!   | 8              | magic `FERRSNAP` ([`MAGIC`])                          |
//!   | 4 (u32)        | format version, [`FORMAT_VERSION`]                   |
//!   | 4 (u32)        | section count `n`                                    |
//!   | `n` ×          | section: u16 name length, UTF-8 name, u64 payload length, u32 CRC32 of the payload, payload |
//!   | 4 (u32)        | trailer: CRC32 of every byte before it               |
//!
//!   Section names are unique. [`StateWriter::put`] payloads are JSON (`serde_json`);
//!   [`StateWriter::put_raw`] payloads are opaque bytes. [`StateReader::open`] checks the
//!   magic, the version, every length, every CRC and that nothing follows the trailer before
//!   it returns, so a damaged file fails before any device is touched.
//!
//! - `memory.bin` ([`MEMORY_FILE`]), the **memory file**: guest RAM regions one after another
//!   at 4 KiB aligned offsets ([`MemoryRegion::layout`]); the region list is stored by the
//!   caller as a state section. The file is sparse: it has the full length, but pages the
//!   guest never touched, or that are all zero, are holes ([`write_memory`]). A **diff**
//!   memory file has the same layout but holds only the pages dirtied since the last
//!   snapshot; which ones is a [`PageMap`] the caller stores in the state file, and
//!   [`merge_diff`] applies it onto the base. Restore maps the file copy-on-write
//!   ([`map_memory_private`]).

mod dir;
mod error;
mod mapping;
mod memory;
mod pagemap;
mod resident;
mod sparse_copy;
mod state;

pub use dir::{SnapshotDir, MEMORY_FILE, STATE_FILE};
pub use error::{Result, SnapshotError};
pub use mapping::{map_memory_private, PrivateMapping};
pub use memory::{
    memory_file_len, merge_diff, write_memory, write_memory_dirty, MemoryRegion, MemoryWriteStats,
    PAGE_SIZE,
};
pub use pagemap::{PageMap, PageRun};
pub use resident::resident_pages;
pub use sparse_copy::copy_sparse;
pub use state::{StateReader, StateWriter, FORMAT_VERSION, MAGIC};
