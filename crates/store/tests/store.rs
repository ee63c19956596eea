//! The store against real SQLite files: migrations, refusals, atomicity, concurrency and
//! survival of a `kill -9` mid-write.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use store::{Runtime, Snapshot, Store, StoreError, MAX_EVENTS, MIGRATIONS, SCHEMA_VERSION};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferrite-store-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("state").join("ferrited.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

fn user_version(path: &Path) -> i64 {
    raw(path)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

fn running(pid: u32) -> Runtime {
    Runtime {
        state: "running".into(),
        pid: Some(pid),
        pid_start_ticks: Some(123_456_789),
        run_dir: "/run/ferrite/vms/x".into(),
        started_ms: Some(1_700_000_000_000),
        last_exit: Some(json!({"code": 0, "signal": null})),
        crash_restarts: 2,
    }
}

#[test]
fn migrates_from_empty_and_reopens_idempotently() {
    let t = TempDir::new("migrate");
    let db = t.db();
    // The parent directory does not exist yet: open creates it.
    let s = Store::open(&db).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.path(), db);
    s.create_vm("a", &json!({"vcpus": 1})).unwrap();
    drop(s);
    for _ in 0..3 {
        let s = Store::open(&db).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.list_vms().unwrap().len(), 1);
        s.check().unwrap();
    }
    assert_eq!(user_version(&db), SCHEMA_VERSION);
    let c = raw(&db);
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn newer_schema_is_refused_naming_both_versions() {
    let t = TempDir::new("newer");
    let db = t.db();
    drop(Store::open(&db).unwrap());
    let future = SCHEMA_VERSION + 7;
    raw(&db)
        .pragma_update(None, "user_version", future)
        .unwrap();
    let err = Store::open(&db).unwrap_err();
    assert!(
        matches!(err, StoreError::TooNew { found, supported, .. } if found == future && supported == SCHEMA_VERSION),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&future.to_string()), "{msg}");
    assert!(msg.contains(&SCHEMA_VERSION.to_string()), "{msg}");
    assert!(msg.contains(&db.display().to_string()), "{msg}");
    // Untouched.
    assert_eq!(user_version(&db), future);
}

#[test]
fn garbage_file_is_refused_naming_the_path() {
    let t = TempDir::new("garbage");
    let db = t.db();
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let junk: Vec<u8> = b"this is not an SQLite database\n"
        .iter()
        .copied()
        .cycle()
        .take(8192)
        .collect();
    std::fs::write(&db, &junk).unwrap();
    let err = Store::open(&db).unwrap_err();
    assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&db.display().to_string()), "{msg}");
    assert!(msg.starts_with(char::is_uppercase), "{msg}");
    // The file is left as it was.
    assert_eq!(std::fs::read(&db).unwrap(), junk);
}

#[test]
fn crud_round_trip_and_errors() {
    let t = TempDir::new("crud");
    let s = Store::open(t.db()).unwrap();
    let spec = json!({"name": "b", "vcpus": 2, "memory_mib": 256, "disks": [{"path": "/x"}]});
    s.create_vm("b", &spec).unwrap();
    s.create_vm("a", &json!({})).unwrap();
    let err = s.create_vm("b", &json!({"other": true})).unwrap_err();
    assert!(matches!(&err, StoreError::Exists(n) if n == "b"), "{err:?}");
    assert!(err.to_string().contains("\"b\""), "{err}");

    let rec = s.get_vm("b").unwrap().unwrap();
    assert_eq!(rec.spec, spec);
    assert_eq!(rec.runtime, Runtime::default());
    assert!(rec.created_ms > 0 && rec.created_ms == rec.updated_ms);
    assert!(s.get_vm("nope").unwrap().is_none());

    let names: Vec<_> = s.list_vms().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["a", "b"]);

    s.set_runtime("b", &running(4242)).unwrap();
    let spec2 = json!({"vcpus": 4});
    s.update_spec("b", &spec2).unwrap();
    let rec = s.get_vm("b").unwrap().unwrap();
    assert_eq!(rec.runtime, running(4242));
    assert_eq!(rec.spec, spec2);
    assert!(rec.updated_ms >= rec.created_ms);

    for err in [
        s.set_runtime("gone", &running(1)).unwrap_err(),
        s.update_spec("gone", &json!({})).unwrap_err(),
        s.delete_vm("gone").unwrap_err(),
    ] {
        assert!(
            matches!(&err, StoreError::NotFound(n) if n == "gone"),
            "{err:?}"
        );
    }
    let big = Runtime {
        started_ms: Some(u64::MAX),
        ..Runtime::default()
    };
    assert!(matches!(
        s.set_runtime("b", &big).unwrap_err(),
        StoreError::OutOfRange { .. }
    ));

    s.delete_vm("b").unwrap();
    assert!(s.get_vm("b").unwrap().is_none());
    assert!(matches!(s.delete_vm("b"), Err(StoreError::NotFound(_))));
    // Runtime rows go with their VM.
    let orphans: i64 = raw(s.path())
        .query_row("SELECT count(*) FROM runtime WHERE name = 'b'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(orphans, 0);
    // The name can be reused, with a fresh runtime.
    s.create_vm("b", &json!({})).unwrap();
    assert_eq!(s.get_vm("b").unwrap().unwrap().runtime, Runtime::default());
    s.check().unwrap();
}

#[test]
fn events_are_ordered_paged_and_bounded() {
    let t = TempDir::new("events");
    let s = Store::open(t.db()).unwrap();
    assert_eq!(s.last_event_id().unwrap(), 0);
    let e1 = s.add_event("a", "defined", "").unwrap();
    let e2 = s.add_event("b", "started", "pid 7").unwrap();
    let e3 = s.add_event("a", "stopped", "exit 0").unwrap();
    assert!(e1.id < e2.id && e2.id < e3.id);
    assert!(e1.at_ms > 0);
    assert_eq!(
        s.events_after(0, 100).unwrap(),
        [e1.clone(), e2.clone(), e3.clone()]
    );
    assert_eq!(s.events_after(e1.id, 1).unwrap(), std::slice::from_ref(&e2));
    assert_eq!(s.vm_events("a", 0, 10).unwrap(), [e1, e3.clone()]);
    assert_eq!(s.last_event_id().unwrap(), e3.id);

    // Past the cap the oldest go, ids keep growing.
    let last = s
        .transaction(|tx| {
            let mut last = None;
            for i in 0..MAX_EVENTS + 5 {
                last = Some(tx.add_event("c", "tick", &i.to_string())?);
            }
            Ok::<_, StoreError>(last.unwrap())
        })
        .unwrap();
    let all = s.events_after(0, usize::MAX).unwrap();
    assert_eq!(all.len() as i64, MAX_EVENTS);
    assert_eq!(all.last().unwrap(), &last);
    assert_eq!(all.first().unwrap().id, last.id - MAX_EVENTS + 1);
    let next = s.add_event("c", "tick", "").unwrap();
    assert_eq!(next.id, last.id + 1);
    assert_eq!(
        s.events_after(0, usize::MAX).unwrap().len() as i64,
        MAX_EVENTS
    );
}

#[derive(Debug)]
enum AppError {
    Store(StoreError),
    Refused,
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Store(e)
    }
}

#[test]
fn a_transaction_failing_halfway_leaves_nothing() {
    let t = TempDir::new("rollback");
    let s = Store::open(t.db()).unwrap();
    s.create_vm("keep", &json!({"v": 1})).unwrap();

    // An error from the caller after several writes.
    let r = s.transaction(|tx| {
        tx.create_vm("new", &json!({}))?;
        tx.set_runtime("new", &running(9))?;
        tx.update_spec("keep", &json!({"v": 2}))?;
        tx.add_event("new", "defined", "")?;
        tx.delete_vm("keep")?;
        Err::<(), _>(AppError::Refused)
    });
    assert!(matches!(r, Err(AppError::Refused)));

    // A store error halfway (duplicate name).
    let r = s.transaction(|tx| {
        tx.update_spec("keep", &json!({"v": 3}))?;
        tx.add_event("keep", "updated", "")?;
        tx.create_vm("keep", &json!({}))?;
        Ok::<_, AppError>(())
    });
    assert!(matches!(r, Err(AppError::Store(StoreError::Exists(_)))));

    // A panic halfway.
    let s = Arc::new(s);
    let s2 = s.clone();
    let joined = std::thread::spawn(move || {
        s2.transaction(|tx| {
            tx.create_vm("panicky", &json!({}))?;
            tx.add_event("panicky", "defined", "")?;
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<_, StoreError>(())
        })
    })
    .join();
    assert!(joined.is_err());

    let vms = s.list_vms().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].name, "keep");
    assert_eq!(vms[0].spec, json!({"v": 1}));
    assert!(s.events_after(0, 100).unwrap().is_empty());
    s.check().unwrap();

    // And a successful one commits everything.
    s.transaction(|tx| {
        tx.update_spec("keep", &json!({"v": 4}))?;
        tx.add_event("keep", "updated", "v4")
    })
    .unwrap();
    assert_eq!(s.get_vm("keep").unwrap().unwrap().spec, json!({"v": 4}));
    assert_eq!(s.events_after(0, 10).unwrap().len(), 1);
}

#[test]
fn data_survives_drop_and_reopen() {
    let t = TempDir::new("reopen");
    let db = t.db();
    {
        let s = Store::open(&db).unwrap();
        s.create_vm("x", &json!({"vcpus": 3})).unwrap();
        s.set_runtime("x", &running(77)).unwrap();
        s.create_vm("y", &json!({})).unwrap();
        s.delete_vm("y").unwrap();
        s.add_event("x", "started", "").unwrap();
    }
    let s = Store::open(&db).unwrap();
    let vms = s.list_vms().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].spec, json!({"vcpus": 3}));
    assert_eq!(vms[0].runtime, running(77));
    let ev = s.events_after(0, 10).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, "started");
    s.check().unwrap();
}

/// xorshift, so the test needs no extra crates.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn concurrent_creators_and_deleters_leave_a_consistent_store() {
    let t = TempDir::new("concurrent");
    let db = t.db();
    // Two independent connections (as two processes would have), four threads on each.
    let a = Arc::new(Store::open(&db).unwrap());
    let b = Arc::new(Store::open(&db).unwrap());
    let created = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let created = created.clone();
            std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15 ^ (i + 1).wrapping_mul(0x1234_5678_9ABC);
                for _ in 0..300 {
                    let name = format!("vm{}", next(&mut rng) % 12);
                    let r = match next(&mut rng) % 5 {
                        0 | 1 => s.create_vm(&name, &json!({"name": name})).map(|()| {
                            created.fetch_add(1, Ordering::Relaxed);
                        }),
                        2 => s.delete_vm(&name),
                        3 => s.set_runtime(&name, &running(i as u32 + 1)),
                        _ => s.transaction(|tx| {
                            tx.update_spec(&name, &json!({"name": name, "rev": i}))?;
                            tx.add_event(&name, "updated", "")?;
                            Ok(())
                        }),
                    };
                    match r {
                        Ok(()) | Err(StoreError::Exists(_)) | Err(StoreError::NotFound(_)) => {}
                        Err(e) => panic!("thread {i}: {e:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        created.load(Ordering::Relaxed) > 12,
        "the test exercised too little"
    );
    for s in [&a, &b] {
        s.check().unwrap();
        let vms = s.list_vms().unwrap();
        for v in &vms {
            assert_eq!(v.spec["name"], json!(v.name));
        }
    }
    let c = raw(&db);
    let count = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT count(*) FROM vms WHERE name NOT IN (SELECT name FROM runtime)"),
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM runtime WHERE name NOT IN (SELECT name FROM vms)"),
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM vms"),
        a.list_vms().unwrap().len() as i64
    );
}

const CHILD_ENV: &str = "FERRITE_STORE_KILL9_CHILD_DB";

/// Not a test on its own: the body of the child process of
/// `committed_rows_survive_kill_9`. Does nothing unless that test started it.
#[test]
fn kill9_child_writer() {
    let Some(db) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let s = Store::open(&db).unwrap();
    let mut out = std::io::stdout();
    for n in 0u64.. {
        let name = format!("vm{n:08}");
        s.transaction(|tx| {
            tx.create_vm(&name, &json!({"n": n, "pad": "x".repeat(500)}))?;
            tx.set_runtime(&name, &running(n as u32 + 1))?;
            tx.add_event(&name, "defined", &n.to_string())?;
            Ok::<_, StoreError>(())
        })
        .unwrap();
        // Written only after the commit returned: every reported row must survive.
        writeln!(out, "committed {n}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn committed_rows_survive_kill_9() {
    let t = TempDir::new("kill9");
    let db = t.db();
    drop(Store::open(&db).unwrap());
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "kill9_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut last: Option<u64> = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Let it commit a varying number of rows, then SIGKILL it mid-stream.
        let target = 40 + round * 37;
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("committed ") {
                last = Some(n.parse().unwrap());
                if last.unwrap() >= target || Instant::now() > deadline {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Anything printed before the kill was committed too.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("committed ") {
                last = Some(n.parse().unwrap());
            }
        }
        let last = last.expect("the child committed nothing");

        let s = Store::open(&db).unwrap();
        s.check().unwrap();
        let vms = s.list_vms().unwrap();
        // Rows are named in order and never deleted: all reported ones are there, plus at
        // most the one committed after the last line was printed.
        assert!(
            (last + 1..=last + 2).contains(&(vms.len() as u64)),
            "round {round}: {} rows, last reported {last}",
            vms.len()
        );
        for (i, v) in vms.iter().enumerate() {
            assert_eq!(v.name, format!("vm{i:08}"));
            // Each transaction landed whole.
            assert_eq!(v.runtime, running(i as u32 + 1));
        }
        assert_eq!(s.events_after(0, usize::MAX).unwrap().len(), vms.len());
        drop(s);
        // Next round continues on the same file: wipe so names start at 0 again.
        raw(&db)
            .execute_batch("DELETE FROM runtime; DELETE FROM vms; DELETE FROM events;")
            .unwrap();
    }
}

fn snapshot(vm: &str, name: &str, created_ms: i64) -> Snapshot {
    Snapshot {
        vm: vm.into(),
        name: name.into(),
        path: format!("/var/lib/ferrite/snapshots/{vm}/{name}"),
        created_ms,
        memory_bytes: 5 << 20,
        state_bytes: 12_345,
    }
}

#[test]
fn snapshots_round_trip_refuse_duplicates_and_go_with_their_vm() {
    let t = TempDir::new("snap");
    let s = Store::open(t.db()).unwrap();
    s.create_vm("a", &json!({})).unwrap();
    s.create_vm("b", &json!({})).unwrap();

    s.add_snapshot(&snapshot("a", "s2", 20)).unwrap();
    s.add_snapshot(&snapshot("a", "s1", 10)).unwrap();
    s.add_snapshot(&snapshot("b", "s1", 30)).unwrap();
    let dup = s.add_snapshot(&snapshot("a", "s1", 40)).unwrap_err();
    let orphan = s.add_snapshot(&snapshot("gone", "s1", 50)).unwrap_err();

    assert!(
        matches!(&dup, StoreError::SnapshotExists { vm, name } if vm == "a" && name == "s1"),
        "{dup:?}"
    );
    assert!(
        matches!(&orphan, StoreError::NotFound(n) if n == "gone"),
        "{orphan:?}"
    );
    let listed: Vec<_> = s.list_snapshots("a").unwrap();
    assert_eq!(listed, [snapshot("a", "s1", 10), snapshot("a", "s2", 20)]);
    assert_eq!(
        s.get_snapshot("b", "s1").unwrap(),
        Some(snapshot("b", "s1", 30))
    );
    assert_eq!(s.get_snapshot("b", "s2").unwrap(), None);

    s.delete_snapshot("a", "s2").unwrap();
    let missing = s.delete_snapshot("a", "s2").unwrap_err();
    assert!(
        matches!(&missing, StoreError::SnapshotNotFound { vm, name } if vm == "a" && name == "s2"),
        "{missing:?}"
    );
    assert_eq!(s.list_snapshots("a").unwrap().len(), 1);

    s.delete_vm("a").unwrap();
    assert!(s.list_snapshots("a").unwrap().is_empty());
    assert_eq!(s.list_snapshots("b").unwrap().len(), 1);
    s.create_vm("a", &json!({})).unwrap();
    assert!(s.list_snapshots("a").unwrap().is_empty());
    s.check().unwrap();
}

#[test]
fn version_1_database_gains_snapshots_and_keeps_its_vms() {
    let t = TempDir::new("v1");
    let db = t.db();
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    {
        let c = raw(&db);
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO vms (name, spec, created_ms, updated_ms) VALUES ('old', '{}', 1, 1)",
            [],
        )
        .unwrap();
    }

    let s = Store::open(&db).unwrap();
    s.add_snapshot(&snapshot("old", "s1", 1)).unwrap();

    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert!(s.get_vm("old").unwrap().is_some());
    assert_eq!(s.list_snapshots("old").unwrap().len(), 1);
    s.check().unwrap();
}

fn disk_snapshot(vm: &str, tag: &str, created_ms: i64) -> store::DiskSnapshot {
    store::DiskSnapshot {
        vm: vm.into(),
        tag: tag.into(),
        created_ms,
        disks: json!([{"index": 0, "path": format!("/d/disk0@{tag}.qcow2"), "backing": "/d/disk0.img"}]),
    }
}

#[test]
fn disk_snapshots_update_the_spec_refuse_duplicates_and_go_with_their_vm() {
    let t = TempDir::new("dsnap");
    let s = Store::open(t.db()).unwrap();
    s.create_vm("a", &json!({"disks": ["/d/disk0.img"]}))
        .unwrap();
    let moved = json!({"disks": ["/d/disk0@s1.qcow2,format=qcow2"]});

    s.add_disk_snapshot(&disk_snapshot("a", "s1", 10), &moved)
        .unwrap();
    let dup = s
        .add_disk_snapshot(&disk_snapshot("a", "s1", 20), &json!({"disks": ["/other"]}))
        .unwrap_err();
    let orphan = s
        .add_disk_snapshot(&disk_snapshot("gone", "s1", 30), &moved)
        .unwrap_err();

    assert!(
        matches!(&dup, StoreError::SnapshotExists { name, .. } if name == "s1"),
        "{dup:?}"
    );
    assert!(
        matches!(&orphan, StoreError::NotFound(n) if n == "gone"),
        "{orphan:?}"
    );
    assert_eq!(
        s.get_vm("a").unwrap().unwrap().spec,
        moved,
        "a refused record changes nothing"
    );
    assert_eq!(
        s.list_disk_snapshots("a").unwrap(),
        [disk_snapshot("a", "s1", 10)]
    );
    assert_eq!(s.get_disk_snapshot("a", "s2").unwrap(), None);
    s.delete_vm("a").unwrap();
    assert!(s.list_disk_snapshots("a").unwrap().is_empty());
    s.check().unwrap();
}
