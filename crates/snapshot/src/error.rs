//! The one error type of the snapshot crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong writing or reading a snapshot. Each message names the
/// problem and, where there is one, what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A snapshot directory is being created where something already exists.
    #[error("Snapshot {path} already exists: choose another name or delete it")]
    AlreadyExists {
        /// The path that is taken.
        path: PathBuf,
    },
    /// A section name in the state file is not UTF-8.
    #[error("Section name at byte {offset} of {path} is not UTF-8: the file is corrupt, take the snapshot again")]
    CorruptSectionName {
        /// The state file.
        path: PathBuf,
        /// Where the name starts.
        offset: u64,
    },
    /// The state file holds the same section name twice.
    #[error(
        "Section {name} is in the state file twice: the file is corrupt, take the snapshot again"
    )]
    DuplicateInFile {
        /// The repeated name.
        name: String,
    },
    /// [`crate::StateWriter::put`] was called twice with one name.
    #[error("Section {name} was already added: section names must be unique")]
    DuplicateSection {
        /// The repeated name.
        name: String,
    },
    /// A section's bytes do not match the checksum stored with them.
    #[error("Checksum mismatch in section {section} of {path}: the file is corrupt, take the snapshot again")]
    ChecksumMismatch {
        /// The state file.
        path: PathBuf,
        /// The section whose payload is damaged.
        section: String,
    },
    /// A dirty bitmap does not cover every page of its region.
    #[error("Dirty bitmap {index} has {words} words, region needs {needed}: pass one bit per 4 KiB page")]
    DirtyBitmapTooShort {
        /// Which region's bitmap.
        index: usize,
        /// Words given.
        words: usize,
        /// Words needed.
        needed: usize,
    },
    /// The number of dirty bitmaps does not match the number of regions.
    #[error("{bitmaps} dirty bitmaps for {regions} regions: pass one bitmap per region")]
    DirtyBitmapCount {
        /// Bitmaps given.
        bitmaps: usize,
        /// Regions given.
        regions: usize,
    },
    /// The whole-file checksum in the trailer does not match.
    #[error(
        "Checksum mismatch in the header of {path}: the file is corrupt, take the snapshot again"
    )]
    FileChecksumMismatch {
        /// The state file.
        path: PathBuf,
    },
    /// The memory layout is unusable (misaligned, overlapping or overflowing).
    #[error("Invalid memory layout: {reason}")]
    InvalidLayout {
        /// What is wrong with it.
        reason: String,
    },
    /// A section name cannot be stored (empty, or longer than 65535 bytes).
    #[error("Invalid section name {name:?}: use 1 to 65535 bytes")]
    InvalidSectionName {
        /// The rejected name.
        name: String,
    },
    /// A file or directory operation failed.
    #[error("Cannot {action} {path}")]
    Io {
        /// What was being done, as a verb phrase ("open", "write").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A memory file is shorter than the region that is being mapped or merged from it.
    #[error("Memory file {path} is {len} bytes, {needed} needed: it is truncated or belongs to another snapshot")]
    MemoryFileTooShort {
        /// The memory file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length the request needs.
        needed: u64,
    },
    /// A section the caller needs is not in the state file.
    #[error("Section {name} is missing from {path}: the snapshot was taken by a Ferrite without that device or state")]
    MissingSection {
        /// The state file.
        path: PathBuf,
        /// The missing section.
        name: String,
    },
    /// The file does not start with the snapshot magic.
    #[error(
        "{path} is not a Ferrite snapshot state file: pass the state.bin of a snapshot directory"
    )]
    NotASnapshot {
        /// The file.
        path: PathBuf,
    },
    /// A page map's runs are not sorted, overlap, or overflow.
    #[error("Invalid page map: {reason}")]
    InvalidPageMap {
        /// What is wrong with it.
        reason: String,
    },
    /// A section's payload does not decode as the requested type.
    #[error("Section {name} does not decode: {source}")]
    SectionDecode {
        /// The section.
        name: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A value does not encode as JSON.
    #[error("Section {name} does not encode")]
    SectionEncode {
        /// The section.
        name: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The file ends before its contents do, or has bytes after its end.
    #[error("{path} is truncated at byte {offset} ({what}): take the snapshot again")]
    Truncated {
        /// The state file.
        path: PathBuf,
        /// Where the missing bytes should start.
        offset: u64,
        /// What was being read there.
        what: String,
    },
    /// The state file has bytes after its trailer.
    #[error("{path} has {extra} unexpected bytes after its end: the file is corrupt, take the snapshot again")]
    TrailingData {
        /// The state file.
        path: PathBuf,
        /// How many bytes follow the trailer.
        extra: u64,
    },
    /// The state file was written by a Ferrite with another format version.
    #[error("Snapshot format version {found}, this Ferrite reads version {expected}: take the snapshot again with this version")]
    VersionMismatch {
        /// The file's version.
        found: u32,
        /// [`crate::FORMAT_VERSION`].
        expected: u32,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, SnapshotError>;

/// Builds the I/O variant; a helper so call sites stay one line.
pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.into();
    move |source| SnapshotError::Io {
        action,
        path,
        source,
    }
}
