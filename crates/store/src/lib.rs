//! ferrited's persistent state: VM definitions, their last known runtime state and an event
//! log, in one embedded SQLite database.
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`, so every committed
//! transaction is fsynced before the call returns. A `kill -9` of the daemon (or a power
//! loss) at any point leaves either the whole of a transaction or none of it; SQLite rolls
//! a half-written one back the next time the file is opened. The daemon writes rarely (on
//! lifecycle changes), so the extra fsync per commit that FULL costs over NORMAL is cheap,
//! and NORMAL could lose the last few commits on power loss.
//!
//! The schema is versioned with `PRAGMA user_version` and moved forward by [`MIGRATIONS`],
//! each step in its own transaction; a database written by a newer ferrited is refused.
//!
//! The store is JSON-agnostic: VM specs and exit records are [`serde_json::Value`]s that the
//! daemon maps to its own types.
//!
//! [`Store`] is `Send + Sync`: one connection behind a mutex. Every call is one short
//! transaction; [`Store::transaction`] groups several changes into one atomic unit.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod disk_snapshots;

pub use disk_snapshots::DiskSnapshot;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use serde_json::Value;

/// How many events the log keeps; older ones are pruned as new ones are added.
pub const MAX_EVENTS: i64 = 10_000;

/// How long a call waits for another process holding the database's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The runtime state a newly created VM starts in.
pub const INITIAL_STATE: &str = "stopped";

/// The schema steps, in order: step `i` moves the database from version `i` to `i + 1`.
/// Never edit a released step; append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: definitions, runtime state, events.
    r#"
    CREATE TABLE vms (
        name       TEXT PRIMARY KEY NOT NULL,
        spec       TEXT NOT NULL CHECK (json_valid(spec)),
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE runtime (
        name            TEXT PRIMARY KEY NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        state           TEXT NOT NULL,
        pid             INTEGER,
        pid_start_ticks INTEGER,
        run_dir         TEXT NOT NULL DEFAULT '',
        started_ms      INTEGER,
        last_exit       TEXT CHECK (last_exit IS NULL OR json_valid(last_exit)),
        crash_restarts  INTEGER NOT NULL DEFAULT 0
    );
    -- Every VM has a runtime row from the moment it exists.
    CREATE TRIGGER vms_runtime AFTER INSERT ON vms BEGIN
        INSERT INTO runtime (name, state) VALUES (NEW.name, 'stopped');
    END;
    CREATE TABLE events (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms  INTEGER NOT NULL,
        vm     TEXT NOT NULL,
        kind   TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX events_vm ON events (vm, id);
    "#,
    // 2: snapshots of VMs (deleted with their VM).
    r#"
    CREATE TABLE snapshots (
        vm           TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        name         TEXT NOT NULL,
        path         TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        state_bytes  INTEGER NOT NULL,
        PRIMARY KEY (vm, name)
    );
    "#,
    // 3: live disk snapshots of VMs (deleted with their VM).
    r#"
    CREATE TABLE disk_snapshots (
        vm         TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        tag        TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        disks      TEXT NOT NULL CHECK (json_valid(disks)),
        PRIMARY KEY (vm, tag)
    );
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
const _: () = assert!(SCHEMA_VERSION >= 1);

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database's directory could not be created.
    #[error("Cannot create the state directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or set up.
    #[error("Cannot open the state database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is not an SQLite database, or is corrupt.
    #[error("The state database {path} is corrupt or not an SQLite database: move it away or use another state directory")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// SQLite's complaint.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer ferrited.
    #[error("The state database {path} has schema version {found}, newer than version {supported} that this ferrited knows: run a newer ferrited")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A migration step failed (and was rolled back).
    #[error("Cannot migrate the state database {path} to schema version {version}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The version the failed step leads to.
        version: i64,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// `integrity_check`, `foreign_key_check` or the store's own invariants failed.
    #[error("The state database {path} is inconsistent: {problem}")]
    Inconsistent {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A VM with that name already exists.
    #[error("VM {0:?} already exists")]
    Exists(String),
    /// No VM has that name.
    #[error("No VM named {0:?}")]
    NotFound(String),
    /// VM `vm` already has a snapshot named `name`.
    #[error("VM {vm:?} already has a snapshot named {name:?}")]
    SnapshotExists {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// VM `vm` has no snapshot named `name`.
    #[error("VM {vm:?} has no snapshot named {name:?}")]
    SnapshotNotFound {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// A value does not fit the database (an integer over `i64::MAX`).
    #[error("Value of {field} for VM {vm:?} is out of range")]
    OutOfRange {
        /// The VM.
        vm: String,
        /// The field.
        field: &'static str,
    },
    /// Stored JSON could not be read back.
    #[error("Stored {field} of VM {vm:?} is not valid JSON")]
    Json {
        /// The VM.
        vm: String,
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Any other SQLite failure.
    #[error("State database {path} failed")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
}

/// A VM's last known runtime state, as the daemon last saved it.
#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    /// The daemon's state name (e.g. "stopped", "running").
    pub state: String,
    /// Its VMM process, while one runs.
    pub pid: Option<u32>,
    /// That process's start time (field 22 of `/proc/PID/stat`), to detect pid reuse.
    pub pid_start_ticks: Option<u64>,
    /// The VM's run directory (sockets, pid file).
    pub run_dir: String,
    /// When it was last started (ms since the epoch).
    pub started_ms: Option<u64>,
    /// How its last run ended.
    pub last_exit: Option<Value>,
    /// Automatic restarts after crashes since the last explicit start.
    pub crash_restarts: u32,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            state: INITIAL_STATE.to_string(),
            pid: None,
            pid_start_ticks: None,
            run_dir: String::new(),
            started_ms: None,
            last_exit: None,
            crash_restarts: 0,
        }
    }
}

/// One stored VM: its definition and last known runtime state.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// Its name (unique).
    pub name: String,
    /// Its definition.
    pub spec: Value,
    /// When it was created (ms since the epoch).
    pub created_ms: i64,
    /// When its definition last changed (ms since the epoch).
    pub updated_ms: i64,
    /// Its last known runtime state.
    pub runtime: Runtime,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Increasing, never reused.
    pub id: i64,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// The VM it is about ("" for the daemon itself).
    pub vm: String,
    /// What happened (e.g. "started").
    pub kind: String,
    /// Free text.
    pub detail: String,
}

/// One stored snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The VM it was taken of.
    pub vm: String,
    /// Its name (unique per VM).
    pub name: String,
    /// Its directory.
    pub path: String,
    /// When it was taken (ms since the epoch).
    pub created_ms: i64,
    /// Guest memory bytes written to it.
    pub memory_bytes: i64,
    /// Bytes of device and vCPU state.
    pub state_bytes: i64,
}

/// The daemon's persistent state. Cheap to share (`Send + Sync`): wrap it in an `Arc`.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn is_code(e: &rusqlite::Error, code: ErrorCode) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == code)
}

fn is_extended(e: &rusqlite::Error, extended: i32) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == extended)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, creating its parent directory,
    /// and brings its schema up to [`SCHEMA_VERSION`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let open_err = |source: rusqlite::Error| {
            if is_code(&source, ErrorCode::NotADatabase)
                || is_code(&source, ErrorCode::DatabaseCorrupt)
            {
                StoreError::NotADatabase {
                    path: path.clone(),
                    source,
                }
            } else {
                StoreError::Open {
                    path: path.clone(),
                    source,
                }
            }
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // The first statement that reads the file: a garbage file fails here.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Inconsistent {
                path,
                problem: format!("cannot switch to WAL mode (journal mode stays {mode:?})"),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        migrate(&mut conn, &path)?;
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database's schema version.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let conn = self.lock();
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|source| self.sql(source))
    }

    /// Runs `f` in one write transaction: it commits if `f` returns `Ok`, and rolls back
    /// everything `f` did if `f` returns `Err` or panics.
    pub fn transaction<T, E>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| self.sql(source))?;
        let wrapped = Tx {
            tx,
            path: &self.path,
        };
        let value = f(&wrapped)?; // dropping `wrapped` on error rolls back
        wrapped.tx.commit().map_err(|source| self.sql(source))?;
        Ok(value)
    }

    /// Defines a VM with runtime state [`Runtime::default`]; [`StoreError::Exists`] if the
    /// name is taken.
    pub fn create_vm(&self, name: &str, spec: &Value) -> Result<(), StoreError> {
        self.transaction(|tx| tx.create_vm(name, spec))
    }

    /// The VM `name`, if it exists.
    pub fn get_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        self.transaction(|tx| tx.get_vm(name))
    }

    /// Every VM, ordered by name.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.transaction(|tx| tx.list_vms())
    }

    /// Replaces a VM's definition; [`StoreError::NotFound`] if it does not exist.
    pub fn update_spec(&self, name: &str, spec: &Value) -> Result<(), StoreError> {
        self.transaction(|tx| tx.update_spec(name, spec))
    }

    /// Saves a VM's runtime state; [`StoreError::NotFound`] if it does not exist.
    pub fn set_runtime(&self, name: &str, runtime: &Runtime) -> Result<(), StoreError> {
        self.transaction(|tx| tx.set_runtime(name, runtime))
    }

    /// Deletes a VM, its runtime state and its snapshot records (its events stay; the
    /// snapshot directories are the caller's to remove); [`StoreError::NotFound`] if
    /// it does not exist.
    pub fn delete_vm(&self, name: &str) -> Result<(), StoreError> {
        self.transaction(|tx| tx.delete_vm(name))
    }

    /// Records a snapshot; [`StoreError::SnapshotExists`] if the VM has one of that name,
    /// [`StoreError::NotFound`] if the VM does not exist.
    pub fn add_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.transaction(|tx| tx.add_snapshot(snapshot))
    }

    /// The snapshots of VM `vm`, oldest first.
    pub fn list_snapshots(&self, vm: &str) -> Result<Vec<Snapshot>, StoreError> {
        self.transaction(|tx| tx.list_snapshots(vm))
    }

    /// Snapshot `name` of VM `vm`, if it exists.
    pub fn get_snapshot(&self, vm: &str, name: &str) -> Result<Option<Snapshot>, StoreError> {
        self.transaction(|tx| tx.get_snapshot(vm, name))
    }

    /// Forgets snapshot `name` of VM `vm`; [`StoreError::SnapshotNotFound`] if there is none.
    pub fn delete_snapshot(&self, vm: &str, name: &str) -> Result<(), StoreError> {
        self.transaction(|tx| tx.delete_snapshot(vm, name))
    }

    /// Appends an event, pruning the log to the last [`MAX_EVENTS`].
    pub fn add_event(&self, vm: &str, kind: &str, detail: &str) -> Result<Event, StoreError> {
        self.transaction(|tx| tx.add_event(vm, kind, detail))
    }

    /// Up to `limit` events with id greater than `after`, oldest first.
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.transaction(|tx| tx.events_after(after, limit))
    }

    /// Up to `limit` events of VM `vm` with id greater than `after`, oldest first.
    pub fn vm_events(&self, vm: &str, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.transaction(|tx| tx.vm_events(vm, after, limit))
    }

    /// The id of the newest event (0 if there is none).
    pub fn last_event_id(&self) -> Result<i64, StoreError> {
        self.transaction(|tx| tx.last_event_id())
    }

    /// Checks the file (`PRAGMA integrity_check`, `foreign_key_check`) and the store's
    /// invariants (every VM has exactly one runtime row); [`StoreError::Inconsistent`] says
    /// what is wrong.
    pub fn check(&self) -> Result<(), StoreError> {
        let conn = self.lock();
        let sql = |source| self.sql(source);
        let bad = |problem: String| StoreError::Inconsistent {
            path: self.path.clone(),
            problem,
        };
        let mut stmt = conn.prepare("PRAGMA integrity_check").map_err(sql)?;
        let lines = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        if lines != ["ok"] {
            return Err(bad(format!("integrity_check: {}", lines.join("; "))));
        }
        let fk: i64 = conn
            .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })
            .map_err(sql)?;
        if fk != 0 {
            return Err(bad(format!("{fk} rows break foreign keys")));
        }
        let missing: i64 = conn
            .query_row(
                "SELECT count(*) FROM vms WHERE name NOT IN (SELECT name FROM runtime)",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if missing != 0 {
            return Err(bad(format!("{missing} VMs have no runtime row")));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic inside a transaction rolled it back (Transaction's Drop), so the
        // connection is still sound.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

/// Brings the schema to [`SCHEMA_VERSION`], one transaction per step.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let version = |conn: &Connection| -> rusqlite::Result<i64> {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
    };
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let found = version(conn).map_err(open_err)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let target = i as i64 + 1;
        let fail = |source| StoreError::Migrate {
            path: path.to_path_buf(),
            version: target,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        // Another process may have migrated while we waited for the write lock.
        let now = version(&tx).map_err(fail)?;
        if now >= target {
            continue;
        }
        tx.execute_batch(step).map_err(fail)?;
        tx.pragma_update(None, "user_version", target)
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
    }
    Ok(())
}

/// An open write transaction (see [`Store::transaction`]): the same operations as
/// [`Store`], all committed together or not at all.
pub struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
}

const VM_COLUMNS: &str = "SELECT v.name, v.spec, v.created_ms, v.updated_ms, r.state, r.pid, \
     r.pid_start_ticks, r.run_dir, r.started_ms, r.last_exit, r.crash_restarts \
     FROM vms v LEFT JOIN runtime r ON r.name = v.name";

/// A row of [`VM_COLUMNS`] before its JSON is parsed.
struct RawVm {
    name: String,
    spec: String,
    created_ms: i64,
    updated_ms: i64,
    state: Option<String>,
    pid: Option<i64>,
    pid_start_ticks: Option<i64>,
    run_dir: Option<String>,
    started_ms: Option<i64>,
    last_exit: Option<String>,
    crash_restarts: Option<i64>,
}

impl RawVm {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawVm> {
        Ok(RawVm {
            name: r.get(0)?,
            spec: r.get(1)?,
            created_ms: r.get(2)?,
            updated_ms: r.get(3)?,
            state: r.get(4)?,
            pid: r.get(5)?,
            pid_start_ticks: r.get(6)?,
            run_dir: r.get(7)?,
            started_ms: r.get(8)?,
            last_exit: r.get(9)?,
            crash_restarts: r.get(10)?,
        })
    }

    fn into_record(self) -> Result<VmRecord, StoreError> {
        let vm = &self.name;
        let json = |field, text: &str| {
            serde_json::from_str(text).map_err(|source| StoreError::Json {
                vm: vm.clone(),
                field,
                source,
            })
        };
        let range = |field| StoreError::OutOfRange {
            vm: vm.clone(),
            field,
        };
        let spec = json("spec", &self.spec)?;
        let last_exit = match &self.last_exit {
            Some(t) => Some(json("last_exit", t)?),
            None => None,
        };
        let runtime = Runtime {
            state: self
                .state
                .clone()
                .unwrap_or_else(|| INITIAL_STATE.to_string()),
            pid: self
                .pid
                .map(|p| u32::try_from(p).map_err(|_| range("pid")))
                .transpose()?,
            pid_start_ticks: self
                .pid_start_ticks
                .map(|t| u64::try_from(t).map_err(|_| range("pid_start_ticks")))
                .transpose()?,
            run_dir: self.run_dir.clone().unwrap_or_default(),
            started_ms: self
                .started_ms
                .map(|t| u64::try_from(t).map_err(|_| range("started_ms")))
                .transpose()?,
            last_exit,
            crash_restarts: u32::try_from(self.crash_restarts.unwrap_or(0))
                .map_err(|_| range("crash_restarts"))?,
        };
        Ok(VmRecord {
            name: self.name,
            spec,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            runtime,
        })
    }
}

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        vm: r.get(2)?,
        kind: r.get(3)?,
        detail: r.get(4)?,
    })
}

const SNAPSHOT_COLUMNS: &str =
    "SELECT vm, name, path, created_ms, memory_bytes, state_bytes FROM snapshots";

fn snapshot_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        vm: r.get(0)?,
        name: r.get(1)?,
        path: r.get(2)?,
        created_ms: r.get(3)?,
        memory_bytes: r.get(4)?,
        state_bytes: r.get(5)?,
    })
}

fn limit_sql(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Tx<'_> {
    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// See [`Store::create_vm`].
    pub fn create_vm(&self, name: &str, spec: &Value) -> Result<(), StoreError> {
        let now = now_ms();
        self.tx
            .execute(
                "INSERT INTO vms (name, spec, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?3)",
                params![name, spec.to_string(), now],
            )
            .map_err(|e| {
                if is_extended(&e, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) {
                    StoreError::Exists(name.to_string())
                } else {
                    self.sql(e)
                }
            })?;
        Ok(())
    }

    /// See [`Store::get_vm`].
    pub fn get_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let raw = self
            .tx
            .query_row(
                &format!("{VM_COLUMNS} WHERE v.name = ?1"),
                [name],
                RawVm::from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        raw.map(RawVm::into_record).transpose()
    }

    /// See [`Store::list_vms`].
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self
            .tx
            .prepare(&format!("{VM_COLUMNS} ORDER BY v.name"))
            .map_err(|e| self.sql(e))?;
        let raws = stmt
            .query_map([], RawVm::from_row)
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        raws.into_iter().map(RawVm::into_record).collect()
    }

    /// See [`Store::update_spec`].
    pub fn update_spec(&self, name: &str, spec: &Value) -> Result<(), StoreError> {
        let n = self
            .tx
            .execute(
                "UPDATE vms SET spec = ?2, updated_ms = ?3 WHERE name = ?1",
                params![name, spec.to_string(), now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// See [`Store::set_runtime`].
    pub fn set_runtime(&self, name: &str, rt: &Runtime) -> Result<(), StoreError> {
        let range = |field| StoreError::OutOfRange {
            vm: name.to_string(),
            field,
        };
        let to_i64 = |v: Option<u64>, field| {
            v.map(|v| i64::try_from(v).map_err(|_| range(field)))
                .transpose()
        };
        let ticks = to_i64(rt.pid_start_ticks, "pid_start_ticks")?;
        let started = to_i64(rt.started_ms, "started_ms")?;
        let last_exit = rt.last_exit.as_ref().map(Value::to_string);
        // Immediate transaction: nobody can delete the VM between these statements.
        let exists = self
            .tx
            .query_row("SELECT 1 FROM vms WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map_err(|e| self.sql(e))?
            .is_some();
        if !exists {
            return Err(StoreError::NotFound(name.to_string()));
        }
        self.tx
            .execute(
                "INSERT INTO runtime (name, state, pid, pid_start_ticks, run_dir, started_ms, \
                     last_exit, crash_restarts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (name) DO UPDATE SET state = excluded.state, pid = excluded.pid, \
                     pid_start_ticks = excluded.pid_start_ticks, run_dir = excluded.run_dir, \
                     started_ms = excluded.started_ms, last_exit = excluded.last_exit, \
                     crash_restarts = excluded.crash_restarts",
                params![
                    name,
                    rt.state,
                    rt.pid,
                    ticks,
                    rt.run_dir,
                    started,
                    last_exit,
                    rt.crash_restarts
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// See [`Store::delete_vm`].
    pub fn delete_vm(&self, name: &str) -> Result<(), StoreError> {
        let n = self
            .tx
            .execute("DELETE FROM vms WHERE name = ?1", [name])
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// See [`Store::add_snapshot`].
    pub fn add_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let exists = self
            .tx
            .query_row("SELECT 1 FROM vms WHERE name = ?1", [&snap.vm], |_| Ok(()))
            .optional()
            .map_err(|e| self.sql(e))?
            .is_some();
        if !exists {
            return Err(StoreError::NotFound(snap.vm.clone()));
        }
        self.tx
            .execute(
                "INSERT INTO snapshots (vm, name, path, created_ms, memory_bytes, state_bytes) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    snap.vm,
                    snap.name,
                    snap.path,
                    snap.created_ms,
                    snap.memory_bytes,
                    snap.state_bytes
                ],
            )
            .map_err(|e| {
                if is_extended(&e, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) {
                    StoreError::SnapshotExists {
                        vm: snap.vm.clone(),
                        name: snap.name.clone(),
                    }
                } else {
                    self.sql(e)
                }
            })?;
        Ok(())
    }

    /// See [`Store::list_snapshots`].
    pub fn list_snapshots(&self, vm: &str) -> Result<Vec<Snapshot>, StoreError> {
        let mut stmt = self
            .tx
            .prepare(&format!(
                "{SNAPSHOT_COLUMNS} WHERE vm = ?1 ORDER BY created_ms, name"
            ))
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([vm], snapshot_from_row)
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e));
        rows
    }

    /// See [`Store::get_snapshot`].
    pub fn get_snapshot(&self, vm: &str, name: &str) -> Result<Option<Snapshot>, StoreError> {
        self.tx
            .query_row(
                &format!("{SNAPSHOT_COLUMNS} WHERE vm = ?1 AND name = ?2"),
                [vm, name],
                snapshot_from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// See [`Store::delete_snapshot`].
    pub fn delete_snapshot(&self, vm: &str, name: &str) -> Result<(), StoreError> {
        let n = self
            .tx
            .execute(
                "DELETE FROM snapshots WHERE vm = ?1 AND name = ?2",
                [vm, name],
            )
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(StoreError::SnapshotNotFound {
                vm: vm.to_string(),
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// See [`Store::add_event`].
    pub fn add_event(&self, vm: &str, kind: &str, detail: &str) -> Result<Event, StoreError> {
        let at_ms = now_ms();
        self.tx
            .execute(
                "INSERT INTO events (at_ms, vm, kind, detail) VALUES (?1, ?2, ?3, ?4)",
                params![at_ms, vm, kind, detail],
            )
            .map_err(|e| self.sql(e))?;
        let id = self.tx.last_insert_rowid();
        // Ids only grow (AUTOINCREMENT), so this is one short range delete on the key.
        self.tx
            .execute("DELETE FROM events WHERE id <= ?1", [id - MAX_EVENTS])
            .map_err(|e| self.sql(e))?;
        Ok(Event {
            id,
            at_ms,
            vm: vm.to_string(),
            kind: kind.to_string(),
            detail: detail.to_string(),
        })
    }

    /// See [`Store::events_after`].
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.events(
            "SELECT id, at_ms, vm, kind, detail FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            params![after, limit_sql(limit)],
        )
    }

    /// See [`Store::vm_events`].
    pub fn vm_events(&self, vm: &str, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.events(
            "SELECT id, at_ms, vm, kind, detail FROM events WHERE vm = ?1 AND id > ?2 \
             ORDER BY id LIMIT ?3",
            params![vm, after, limit_sql(limit)],
        )
    }

    /// See [`Store::last_event_id`].
    pub fn last_event_id(&self) -> Result<i64, StoreError> {
        self.tx
            .query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| r.get(0))
            .map_err(|e| self.sql(e))
    }

    fn events(&self, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Result<Vec<Event>, StoreError> {
        let mut stmt = self.tx.prepare(sql).map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params, event_from_row)
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e));
        rows
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<Store>();
    }
}
