//! The Unix socket: binds PATH (0600, refusing anything but a stale socket), serves each
//! connection on its own thread, removes PATH on drop.

use super::protocol::{handle_line, ControlState, MAX_REQUEST_BYTES};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use thiserror::Error;

/// Why the control socket could not start.
#[derive(Debug, Error)]
pub enum ControlError {
    /// PATH exists and is not a stale socket.
    #[error("{0} exists and is not a stale socket: remove it or choose another --api-socket path")]
    PathInUse(PathBuf),
    /// Binding, chmod or thread creation failed.
    #[error("Cannot create the control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A running control socket; dropping it stops accepting and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ControlServer {
    /// Binds `path` and serves requests against `state` until dropped.
    pub fn start(path: &Path, state: ControlState) -> Result<Self, ControlError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            let stale = meta.file_type().is_socket() && UnixStream::connect(path).is_err();
            if !stale {
                return Err(ControlError::PathInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
        let listener = UnixListener::bind(path).map_err(io_err(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(state);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, state, stop2))
            .map_err(io_err(path))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

fn accept_loop(listener: UnixListener, state: Arc<ControlState>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let state = state.clone();
        // A connection thread that cannot start just drops the connection.
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || serve(conn, &state));
    }
}

fn serve(conn: UnixStream, state: &ControlState) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut buf = Vec::new();
        // Read at most one byte past the limit so an endless line cannot exhaust memory.
        let limit = (MAX_REQUEST_BYTES + 2) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = buf.last() == Some(&b'\n');
        if !complete && buf.len() as u64 >= limit {
            // Skip the rest of the oversized line.
            let mut sink = Vec::new();
            loop {
                sink.clear();
                match (&mut reader).take(limit).read_until(b'\n', &mut sink) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if sink.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        let mut reply = handle_line(state, line);
        reply.push('\n');
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    fn state() -> ControlState {
        ControlState {
            limiters: BTreeMap::new(),
            device_stats: BTreeMap::new(),
            balloon: None,
            info: serde_json::json!({}),
            started: Instant::now(),
            live: Default::default(),
            reboots: Default::default(),
            disks: Vec::new(),
            migration: Default::default(),
        }
    }

    #[test]
    fn test_server_replies_per_line_and_removes_socket() {
        let dir = std::env::temp_dir().join(format!("ferrite-ctl-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let server = ControlServer::start(&path, state()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let mut c = UnixStream::connect(&path).unwrap();

        c.write_all(b"junk\n{\"op\":\"stats\"}\n").unwrap();
        let mut lines = BufReader::new(c.try_clone().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let second = lines.next().unwrap().unwrap();
        drop(server);

        assert_eq!(mode, 0o600);
        assert!(first.contains("\"ok\":false"));
        assert!(second.contains("\"ok\":true"));
        assert!(!path.exists());
    }

    #[test]
    fn test_server_refuses_regular_file() {
        let dir = std::env::temp_dir().join(format!("ferrite-ctl2-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("file");
        std::fs::write(&path, b"x").unwrap();

        let r = ControlServer::start(&path, state());

        assert!(matches!(r, Err(ControlError::PathInUse(_))));
        assert!(path.exists());
    }
}
