//! The state file: round trips, and every kind of damage refused with a useful error.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use snapshot::{SnapshotError, StateReader, StateWriter, FORMAT_VERSION};
use vmm_sys_util::tempdir::TempDir;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Regs {
    rip: u64,
    rflags: u64,
    name: String,
}

fn regs() -> Regs {
    Regs {
        rip: 0xfff0,
        rflags: 2,
        name: "vcpu0".into(),
    }
}

/// A small valid file with a JSON section, a raw section and an empty one.
fn sample_bytes() -> Vec<u8> {
    let mut w = StateWriter::new();
    w.put("vcpu0", &regs()).expect("put vcpu0");
    w.put_raw("serial", &[1, 2, 3, 4, 5]).expect("put serial");
    w.put_raw("empty", &[]).expect("put empty");
    w.to_bytes()
}

fn parse(bytes: &[u8]) -> Result<StateReader, SnapshotError> {
    StateReader::from_bytes(bytes, Path::new("state.bin"))
}

/// A small deterministic generator so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn test_state_written_to_file_reads_back_every_section() {
    // Arrange
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("state.bin");
    let mut w = StateWriter::new();
    w.put("vcpu0", &regs()).expect("put");
    w.put_raw("serial", b"\x00\xffraw").expect("put_raw");

    // Act
    w.write_to(&path).expect("write");
    let r = StateReader::open(&path).expect("open");

    // Assert
    assert_eq!(r.get::<Regs>("vcpu0").expect("get"), regs());
    assert_eq!(r.get_raw("serial").expect("get_raw"), b"\x00\xffraw");
    assert_eq!(r.names().collect::<Vec<_>>(), vec!["vcpu0", "serial"]);
    assert!(!dir.as_path().join("state.bin.tmp").exists());
}

#[test]
fn test_write_to_replaces_an_existing_file() {
    // Arrange
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("state.bin");
    std::fs::write(&path, b"old").expect("write old");
    let mut w = StateWriter::new();
    w.put("n", &7u32).expect("put");

    // Act
    w.write_to(&path).expect("write");

    // Assert
    let r = StateReader::open(&path).expect("open");
    assert_eq!(r.get::<u32>("n").expect("get"), 7);
}

#[test]
fn test_put_same_name_twice_is_refused() {
    // Arrange
    let mut w = StateWriter::new();
    w.put("vcpu0", &1u8).expect("first put");

    // Act
    let result = w.put_raw("vcpu0", &[]);

    // Assert
    assert!(matches!(result, Err(SnapshotError::DuplicateSection { name }) if name == "vcpu0"));
}

#[test]
fn test_put_empty_name_is_refused() {
    // Arrange
    let mut w = StateWriter::new();

    // Act
    let result = w.put("", &1u8);

    // Assert
    assert!(matches!(
        result,
        Err(SnapshotError::InvalidSectionName { .. })
    ));
}

#[test]
fn test_get_missing_section_names_it() {
    // Arrange
    let r = parse(&sample_bytes()).expect("valid");

    // Act
    let err = r.get::<Regs>("vcpu1").expect_err("missing");

    // Assert
    assert!(matches!(err, SnapshotError::MissingSection { ref name, .. } if name == "vcpu1"));
    assert!(err.to_string().contains("vcpu1"), "{err}");
}

#[test]
fn test_get_wrong_type_names_section_and_serde_error() {
    // Arrange
    let r = parse(&sample_bytes()).expect("valid");

    // Act
    let err = r
        .get::<BTreeMap<String, String>>("vcpu0")
        .expect_err("wrong type");

    // Assert
    assert!(matches!(err, SnapshotError::SectionDecode { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("vcpu0") && msg.contains("invalid type"),
        "{msg}"
    );
}

#[test]
fn test_open_bad_magic_says_not_a_snapshot() {
    // Arrange
    let mut bytes = sample_bytes();
    bytes[0] = b'X';

    // Act
    let err = parse(&bytes).expect_err("bad magic");

    // Assert
    assert!(matches!(err, SnapshotError::NotASnapshot { .. }));
    assert!(err.to_string().contains("not a Ferrite snapshot"), "{err}");
}

#[test]
fn test_open_other_version_tells_to_take_snapshot_again() {
    // Arrange
    let mut bytes = sample_bytes();
    bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());

    // Act
    let err = parse(&bytes).expect_err("other version");

    // Assert
    assert_eq!(
        err.to_string(),
        format!(
            "Snapshot format version {}, this Ferrite reads version {}: take the snapshot again with this version",
            FORMAT_VERSION + 1,
            FORMAT_VERSION
        )
    );
}

#[test]
fn test_open_damaged_payload_names_the_section() {
    // Arrange
    let mut bytes = sample_bytes();
    let at = bytes
        .windows(5)
        .position(|w| w == [1, 2, 3, 4, 5])
        .expect("serial payload");
    bytes[at + 2] ^= 0x40;

    // Act
    let err = parse(&bytes).expect_err("damaged");

    // Assert
    assert!(
        matches!(err, SnapshotError::ChecksumMismatch { ref section, .. } if section == "serial")
    );
}

#[test]
fn test_open_cut_at_section_boundary_is_truncated() {
    // Arrange: drop the last section and the trailer, leaving a file that ends cleanly
    // after a section.
    let full = sample_bytes();
    let empty_section_len = 2 + "empty".len() + 8 + 4;
    let cut = full.len() - 4 - empty_section_len;

    // Act
    let err = parse(&full[..cut]).expect_err("truncated");

    // Assert
    assert!(
        matches!(err, SnapshotError::Truncated { offset, .. } if offset == cut as u64),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("byte {cut}")), "{err}");
}

#[test]
fn test_open_trailing_bytes_is_refused() {
    // Arrange
    let mut bytes = sample_bytes();
    bytes.push(0);

    // Act
    let result = parse(&bytes);

    // Assert
    assert!(matches!(
        result,
        Err(SnapshotError::TrailingData { extra: 1, .. })
    ));
}

#[test]
fn test_open_every_truncation_is_an_error() {
    // Arrange
    let full = sample_bytes();

    for len in 0..full.len() {
        // Act
        let result = parse(&full[..len]);

        // Assert
        assert!(result.is_err(), "accepted a file cut to {len} bytes");
    }
}

#[test]
fn test_open_random_bit_flips_are_errors() {
    // Arrange
    let full = sample_bytes();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);

    for round in 0..600 {
        let mut bytes = full.clone();
        // One to three flipped bits; CRC32 catches every such error in files this small.
        let flips = 1 + rng.next() % 3;
        for _ in 0..flips {
            let bit = rng.next() as usize % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        if bytes == full {
            continue;
        }

        // Act
        let result = parse(&bytes);

        // Assert
        assert!(result.is_err(), "round {round}: accepted a damaged file");
    }
}

#[test]
fn test_open_random_garbage_never_panics() {
    // Arrange
    let mut rng = XorShift(42);

    for _ in 0..300 {
        let len = (rng.next() % 200) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if bytes.len() >= 12 && rng.next().is_multiple_of(2) {
            bytes[..8].copy_from_slice(b"FERRSNAP");
            bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        }

        // Act
        let result = parse(&bytes);

        // Assert
        assert!(result.is_err());
    }
}

#[test]
fn test_open_missing_file_names_the_path() {
    // Arrange
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("nope.bin");

    // Act
    let err = StateReader::open(&path).expect_err("missing");

    // Assert
    assert!(matches!(err, SnapshotError::Io { .. }));
    assert!(err.to_string().contains("nope.bin"), "{err}");
}
