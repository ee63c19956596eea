//! Snapshot directories appear complete under their final name, or not at all.

use snapshot::{SnapshotDir, SnapshotError, StateWriter};
use vmm_sys_util::tempdir::TempDir;

#[test]
fn test_committed_snapshot_appears_under_final_name() {
    // Arrange
    let tmp = TempDir::new().expect("tempdir");
    let final_path = tmp.as_path().join("snap1");
    let dir = SnapshotDir::create(&final_path).expect("create");
    assert!(!final_path.exists());
    let mut w = StateWriter::new();
    w.put("n", &1u32).expect("put");
    w.write_to(&dir.state_path()).expect("write state");
    std::fs::write(dir.memory_path(), b"mem").expect("write memory");
    let partial = dir.path().to_path_buf();

    // Act
    let committed = dir.commit().expect("commit");

    // Assert
    assert_eq!(committed.path(), final_path);
    assert!(!partial.exists());
    let opened = SnapshotDir::open(&final_path).expect("open");
    assert!(opened.state_path().is_file() && opened.memory_path().is_file());
    drop(committed);
    assert!(final_path.exists(), "dropping a committed dir must keep it");
}

#[test]
fn test_dropped_uncommitted_snapshot_leaves_nothing() {
    // Arrange
    let tmp = TempDir::new().expect("tempdir");
    let final_path = tmp.as_path().join("snap1");
    let dir = SnapshotDir::create(&final_path).expect("create");
    std::fs::write(dir.memory_path(), b"half").expect("write memory");

    // Act
    drop(dir);

    // Assert
    let left: Vec<_> = std::fs::read_dir(tmp.as_path()).expect("list").collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn test_create_over_existing_path_is_refused() {
    // Arrange
    let tmp = TempDir::new().expect("tempdir");
    let final_path = tmp.as_path().join("snap1");
    std::fs::create_dir(&final_path).expect("mkdir");

    // Act
    let err = SnapshotDir::create(&final_path).expect_err("exists");

    // Assert
    assert!(matches!(err, SnapshotError::AlreadyExists { .. }));
    assert!(
        err.to_string().contains("choose another name or delete it"),
        "{err}"
    );
}

#[test]
fn test_commit_when_final_path_appeared_meanwhile_is_refused() {
    // Arrange
    let tmp = TempDir::new().expect("tempdir");
    let final_path = tmp.as_path().join("snap1");
    let dir = SnapshotDir::create(&final_path).expect("create");
    std::fs::create_dir(&final_path).expect("someone else's empty dir");

    // Act
    let result = dir.commit();

    // Assert
    assert!(matches!(result, Err(SnapshotError::AlreadyExists { .. })));
    let left: Vec<_> = std::fs::read_dir(tmp.as_path()).expect("list").collect();
    assert_eq!(
        left.len(),
        1,
        "the partial dir must be cleaned up: {left:?}"
    );
}

#[test]
fn test_open_without_state_file_is_refused() {
    // Arrange
    let tmp = TempDir::new().expect("tempdir");

    // Act
    let result = SnapshotDir::open(tmp.as_path());

    // Assert
    assert!(matches!(result, Err(SnapshotError::Io { .. })));
}
