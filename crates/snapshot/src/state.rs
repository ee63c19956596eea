//! The state file: a versioned, checksummed container of named sections.
//!
//! See the crate documentation (or `FORMAT.md`) for the byte layout.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{io_err, Result, SnapshotError};

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"FERRSNAP";

/// The state file format version this build writes and reads. Bump it for any layout change.
pub const FORMAT_VERSION: u32 = 1;

/// Collects sections in memory and writes them as one state file, so a snapshot's device and
/// vCPU state lands on disk atomically and checksummed.
#[derive(Debug, Default)]
pub struct StateWriter {
    sections: Vec<(String, Vec<u8>)>,
}

impl StateWriter {
    /// Starts an empty state file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds section `name` holding `value` as JSON.
    pub fn put<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<()> {
        let payload = serde_json::to_vec(value).map_err(|source| SnapshotError::SectionEncode {
            name: name.to_string(),
            source,
        })?;
        self.put_owned(name, payload)
    }

    /// Adds section `name` holding `payload` as is, for state that is already bytes.
    pub fn put_raw(&mut self, name: &str, payload: &[u8]) -> Result<()> {
        self.put_owned(name, payload.to_vec())
    }

    fn put_owned(&mut self, name: &str, payload: Vec<u8>) -> Result<()> {
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            return Err(SnapshotError::InvalidSectionName {
                name: name.to_string(),
            });
        }
        if self.sections.iter().any(|(n, _)| n == name) {
            return Err(SnapshotError::DuplicateSection {
                name: name.to_string(),
            });
        }
        self.sections.push((name.to_string(), payload));
        Ok(())
    }

    /// The file's bytes, for callers that store them elsewhere than a local file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // put_owned keeps the count far below u32::MAX only in practice; saturate rather
        // than wrap so a reader would see a truncated file instead of a wrong one.
        let count = u32::try_from(self.sections.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        for (name, payload) in &self.sections {
            // put_owned checked the name fits in a u16.
            let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&name_len.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            out.extend_from_slice(payload);
        }
        let total = crc32fast::hash(&out);
        out.extend_from_slice(&total.to_le_bytes());
        out
    }

    /// Writes the file to `path` atomically: to `path.tmp` first, fsynced, then renamed over
    /// `path` and the directory fsynced, so a crash leaves either the old file or the new one.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let tmp = tmp_path(path);
        let bytes = self.to_bytes();
        let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(&bytes).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        sync_parent(path)
    }
}

/// `path` with `.tmp` appended to its file name.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Fsyncs the directory holding `path`, so a rename into it is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", parent))
}

/// A state file read and fully verified (magic, version, every checksum) when opened, so a
/// restore fails before it touches any device rather than halfway through.
#[derive(Debug)]
pub struct StateReader {
    path: PathBuf,
    order: Vec<String>,
    sections: HashMap<String, Vec<u8>>,
}

impl StateReader {
    /// Reads and verifies the state file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(io_err("read", path))?;
        Self::from_bytes(&bytes, path)
    }

    /// Verifies state file bytes obtained elsewhere; `path` only names them in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut cur = Cursor {
            bytes,
            pos: 0,
            path,
        };
        if cur.take(MAGIC.len(), "magic").ok() != Some(&MAGIC[..]) {
            return Err(SnapshotError::NotASnapshot {
                path: path.to_path_buf(),
            });
        }
        let found = cur.u32("format version")?;
        if found != FORMAT_VERSION {
            return Err(SnapshotError::VersionMismatch {
                found,
                expected: FORMAT_VERSION,
            });
        }
        let count = cur.u32("section count")?;
        let mut order = Vec::new();
        let mut sections = HashMap::new();
        let mut damaged = None;
        for index in 0..count {
            let what = format!("section {index} name");
            let name_len = cur.u16(&what)?;
            let name_at = cur.pos as u64;
            let name_bytes = cur.take(usize::from(name_len), &what)?;
            let name = String::from_utf8(name_bytes.to_vec()).map_err(|_| {
                SnapshotError::CorruptSectionName {
                    path: path.to_path_buf(),
                    offset: name_at,
                }
            })?;
            let what = format!("section {name}");
            let len = cur.u64(&what)?;
            let crc = cur.u32(&what)?;
            let len = usize::try_from(len).map_err(|_| cur.truncated(&what))?;
            let payload = cur.take(len, &what)?;
            if crc32fast::hash(payload) != crc && damaged.is_none() {
                damaged = Some(name.clone());
            }
            if sections.insert(name.clone(), payload.to_vec()).is_some() {
                return Err(SnapshotError::DuplicateInFile { name });
            }
            order.push(name);
        }
        let body_end = cur.pos;
        let total = cur.u32("trailer checksum")?;
        if cur.pos != bytes.len() {
            return Err(SnapshotError::TrailingData {
                path: path.to_path_buf(),
                extra: (bytes.len() - cur.pos) as u64,
            });
        }
        if let Some(section) = damaged {
            return Err(SnapshotError::ChecksumMismatch {
                path: path.to_path_buf(),
                section,
            });
        }
        if crc32fast::hash(&bytes[..body_end]) != total {
            return Err(SnapshotError::FileChecksumMismatch {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            order,
            sections,
        })
    }

    /// Decodes section `name` from JSON.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        serde_json::from_slice(self.get_raw(name)?).map_err(|source| SnapshotError::SectionDecode {
            name: name.to_string(),
            source,
        })
    }

    /// Section `name`'s payload as stored.
    pub fn get_raw(&self, name: &str) -> Result<&[u8]> {
        self.sections
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| SnapshotError::MissingSection {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Whether section `name` is present, for optional state.
    pub fn contains(&self, name: &str) -> bool {
        self.sections.contains_key(name)
    }

    /// The section names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.order.iter().map(String::as_str)
    }
}

/// Bounds-checked little-endian reads over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: &str) -> SnapshotError {
        SnapshotError::Truncated {
            path: self.path.to_path_buf(),
            offset: self.bytes.len() as u64,
            what: what.to_string(),
        }
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.truncated(what))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }
}
