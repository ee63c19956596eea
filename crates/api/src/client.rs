//! A blocking client of `ferrited`'s API over its Unix socket.
//!
//! Hand-written HTTP/1.1 rather than hyper/reqwest: the CLI has no async runtime and wants
//! none (a runtime and an HTTP stack would dwarf the rest of the binary for a handful of
//! requests), the daemon is the only server it talks to, and the console's upgraded stream is
//! just the socket, which std hands back as a plain [`UnixStream`]. The subset is small: one
//! request per connection with `Connection: close`, bodies framed by `Content-Length`,
//! chunked transfer coding or end of stream, server-sent events, and `101 Switching
//! Protocols`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    ApiError, Event, HostInfo, SnapshotInfo, SnapshotRequest, StopRequest, VmInfo, VmSpec, VmStats,
};

/// The `Upgrade` protocol of a console stream.
pub const CONSOLE_PROTOCOL: &str = "ferrite-console";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to.
    #[error(
        "Cannot reach ferrited at {}: is it running? (start it with `ferrited`, or set --socket / FERRITE_SOCKET)",
        path.display()
    )]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon answered with an error.
    #[error("{error}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        error: ApiError,
    },
    /// Reading or writing the socket failed.
    #[error("talking to ferrited: {0}")]
    Io(#[from] io::Error),
    /// The daemon's answer was not what the API promises.
    #[error("unexpected answer from ferrited: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The API error code, when the daemon answered with one.
    pub fn code(&self) -> Option<crate::ErrorCode> {
        match self {
            ClientError::Api { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

/// Response headers: lower-cased names and values, in order.
pub type Headers = Vec<(String, String)>;

/// Result of a client call.
pub type Result<T> = std::result::Result<T, ClientError>;

/// A response with its body read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A client of the daemon at one socket path. Each call opens its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    read_timeout: Option<Duration>,
}

impl Client {
    /// A client of the daemon listening at `socket`. No read timeout: `stop` waits for the
    /// guest as long as the daemon does.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            read_timeout: None,
        }
    }

    /// Give up on answers slower than `t` (`None`: wait forever).
    pub fn with_read_timeout(mut self, t: Option<Duration>) -> Self {
        self.read_timeout = t;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> Result<UnixStream> {
        let s = UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
            path: self.socket.clone(),
            source,
        })?;
        s.set_read_timeout(self.read_timeout)?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    }

    /// Send one request and read the head of its response.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        extra: &[(&str, &str)],
    ) -> Result<(u16, Headers, BufReader<UnixStream>)> {
        send_on(self.connect()?, "ferrited", method, path, body, extra)
    }

    /// Send a request and read the whole response; non-2xx statuses become
    /// [`ClientError::Api`].
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        request_on(self.connect()?, "ferrited", method, path, body)
    }

    /// A request with a JSON body (or none) whose answer is JSON.
    pub fn json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(format!("encoding the request: {e}")))?;
        let resp = self.request(method, path, bytes.as_deref())?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| ClientError::Protocol(format!("{method} {path}: {e}")))
    }

    /// `GET /v1/vms`.
    pub fn list_vms(&self) -> Result<Vec<VmInfo>> {
        self.json::<(), _>("GET", "/v1/vms", None)
    }

    /// `GET /v1/vms/{name}`.
    pub fn get_vm(&self, name: &str) -> Result<VmInfo> {
        self.json::<(), _>("GET", &crate::routes::vm(name), None)
    }

    /// `POST /v1/vms`.
    pub fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        self.json("POST", "/v1/vms", Some(spec))
    }

    /// `PATCH /v1/vms/{name}` with a raw JSON body: build it by hand to tell `null` (clear)
    /// from absent (keep) in resource fields.
    pub fn update_vm(&self, name: &str, update: &serde_json::Value) -> Result<VmInfo> {
        self.json("PATCH", &crate::routes::vm(name), Some(update))
    }

    /// `DELETE /v1/vms/{name}[?force=true]`.
    pub fn delete_vm(&self, name: &str, force: bool) -> Result<()> {
        let mut path = crate::routes::vm(name);
        if force {
            path.push_str("?force=true");
        }
        self.request("DELETE", &path, None).map(drop)
    }

    /// `POST /v1/vms/{name}/{action}` without a body (`start`, `kill`, `pause`, `resume`,
    /// `reboot`, `stop` with the default timeout).
    pub fn action(&self, name: &str, action: &str) -> Result<VmInfo> {
        self.json::<(), _>("POST", &crate::routes::vm_action(name, action), None)
    }

    /// `POST /v1/vms/{name}/stop`; returns once the VM stopped.
    pub fn stop(&self, name: &str, timeout_s: Option<u64>) -> Result<VmInfo> {
        let path = crate::routes::vm_action(name, "stop");
        match timeout_s {
            None => self.json::<(), _>("POST", &path, None),
            Some(t) => self.json("POST", &path, Some(&StopRequest { timeout_s: Some(t) })),
        }
    }

    /// `POST /v1/vms/{name}/snapshots`; returns once the snapshot is on disk.
    pub fn create_snapshot(&self, vm: &str, req: &SnapshotRequest) -> Result<SnapshotInfo> {
        self.json("POST", &crate::routes::snapshots(vm), Some(req))
    }

    /// `GET /v1/vms/{name}/snapshots`.
    pub fn list_snapshots(&self, vm: &str) -> Result<Vec<SnapshotInfo>> {
        self.json::<(), _>("GET", &crate::routes::snapshots(vm), None)
    }

    /// `DELETE /v1/vms/{name}/snapshots/{snapshot}`.
    pub fn delete_snapshot(&self, vm: &str, name: &str) -> Result<()> {
        self.request("DELETE", &crate::routes::snapshot(vm, name), None)
            .map(drop)
    }

    /// `POST /v1/vms/{name}/snapshots/{snapshot}/restore`; returns once the VM runs.
    pub fn restore_snapshot(&self, vm: &str, name: &str) -> Result<VmInfo> {
        let path = format!("{}/restore", crate::routes::snapshot(vm, name));
        self.json::<(), _>("POST", &path, None)
    }

    /// `POST /v1/vms/{name}/snapshots/{snapshot}/clone`; returns once every clone runs.
    pub fn clone_snapshot(
        &self,
        vm: &str,
        name: &str,
        req: &crate::CloneRequest,
    ) -> Result<Vec<VmInfo>> {
        let path = format!("{}/clone", crate::routes::snapshot(vm, name));
        self.json("POST", &path, Some(req))
    }

    /// `POST /v1/vms/{name}/disk-snapshots`; returns once every disk is on its overlay.
    pub fn create_disk_snapshot(&self, vm: &str, tag: &str) -> Result<crate::DiskSnapshotInfo> {
        let req = crate::DiskSnapshotRequest {
            tag: tag.to_string(),
        };
        self.json("POST", &crate::routes::disk_snapshots(vm), Some(&req))
    }

    /// `GET /v1/vms/{name}/disk-snapshots`.
    pub fn list_disk_snapshots(&self, vm: &str) -> Result<crate::DiskSnapshotList> {
        self.json::<(), _>("GET", &crate::routes::disk_snapshots(vm), None)
    }

    /// `POST /v1/vms/{name}/disk-snapshots/{tag}/revert` (the VM must be stopped).
    pub fn revert_disk_snapshot(&self, vm: &str, tag: &str) -> Result<crate::DiskRevertInfo> {
        self.json::<(), _>("POST", &crate::routes::disk_snapshot_revert(vm, tag), None)
    }

    /// `POST /v1/vms/{name}/disks/{disk}/flatten` (the VM must be stopped).
    pub fn flatten_disk(&self, vm: &str, disk: usize) -> Result<crate::FlattenInfo> {
        self.json::<(), _>("POST", &crate::routes::disk_flatten(vm, disk), None)
    }

    /// `POST /v1/vms/{name}/migrate`: returns once the migration started (202).
    pub fn migrate(&self, vm: &str, req: &crate::MigrateRequest) -> Result<crate::MigrationInfo> {
        self.json("POST", &crate::routes::vm_action(vm, "migrate"), Some(req))
    }

    /// `GET /v1/vms/{name}/migration`: the VM's current or last outgoing migration (also
    /// after it completed and the VM left this daemon).
    pub fn migration(&self, vm: &str) -> Result<crate::MigrationInfo> {
        self.json::<(), _>("GET", &crate::routes::vm_action(vm, "migration"), None)
    }

    /// `POST /v1/vms/{name}/migrate/cancel`.
    pub fn cancel_migration(&self, vm: &str) -> Result<crate::MigrationInfo> {
        self.json::<(), _>(
            "POST",
            &crate::routes::vm_action(vm, "migrate/cancel"),
            None,
        )
    }

    /// `GET /v1/stats`.
    pub fn stats(&self) -> Result<Vec<VmStats>> {
        self.json::<(), _>("GET", "/v1/stats", None)
    }

    /// `GET /v1/vms/{name}/stats`.
    pub fn vm_stats(&self, name: &str) -> Result<VmStats> {
        self.json::<(), _>("GET", &crate::routes::vm_action(name, "stats"), None)
    }

    /// `GET /v1/host`.
    pub fn host(&self) -> Result<HostInfo> {
        self.json::<(), _>("GET", "/v1/host", None)
    }

    /// `GET /v1/vms/{name}/console/log[?tail=N]`: the last bytes of the console log.
    pub fn console_log(&self, name: &str, tail: Option<u64>) -> Result<Vec<u8>> {
        let mut path = crate::routes::vm_action(name, "console/log");
        if let Some(t) = tail {
            path.push_str(&format!("?tail={t}"));
        }
        Ok(self.request("GET", &path, None)?.body)
    }

    /// `GET /v1/events`: a blocking iterator of lifecycle events.
    pub fn events(&self) -> Result<EventStream> {
        let (status, headers, reader) = self.send(
            "GET",
            "/v1/events",
            None,
            &[("Accept", "text/event-stream")],
        )?;
        if !(200..300).contains(&status) {
            let mut b = Vec::new();
            body_reader(&headers, reader)?.read_to_end(&mut b)?;
            check_status(status, &b)?;
            return Err(ClientError::Protocol(format!("status {status}")));
        }
        Ok(EventStream {
            sse: SseReader::new(BufReader::new(body_reader(&headers, reader)?)),
        })
    }

    /// `GET /v1/vms/{name}/console` upgraded to a raw byte stream: returns the socket and any
    /// console bytes that arrived with the `101` head.
    pub fn console(&self, name: &str) -> Result<(UnixStream, Vec<u8>)> {
        let path = crate::routes::vm_action(name, "console");
        let (status, headers, reader) = self.send(
            "GET",
            &path,
            None,
            &[("Connection", "Upgrade"), ("Upgrade", CONSOLE_PROTOCOL)],
        )?;
        if status != 101 {
            let mut b = Vec::new();
            body_reader(&headers, reader)?.read_to_end(&mut b)?;
            check_status(status, &b)?;
            return Err(ClientError::Protocol(format!(
                "the console did not switch protocols (status {status})"
            )));
        }
        let pending = reader.buffer().to_vec();
        let stream = reader.into_inner();
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        Ok((stream, pending))
    }
}

/// Send one request on `stream` (any transport: a Unix socket, a TLS session) naming `host`,
/// and read the head of its response.
fn send_on<S: Read + Write>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    extra: &[(&str, &str)],
) -> Result<(u16, Headers, BufReader<S>)> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ferrite/{}\r\nAccept: application/json\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if !extra
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        head.push_str("Connection: close\r\n");
    }
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Some(b) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )),
        None if method != "GET" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    if let Some(b) = body {
        msg.extend_from_slice(b);
    }
    stream.write_all(&msg)?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader)?;
    Ok((status, headers, reader))
}

/// One whole request on `stream`, as [`Client::request`] does over the Unix socket: for
/// clients that reach a daemon another way (a TLS session to its `--tls-listen`). Non-2xx
/// statuses become [`ClientError::Api`].
pub fn request_on<S: Read + Write + Send + 'static>(
    stream: S,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Response> {
    let (status, headers, reader) = send_on(stream, host, method, path, body, &[])?;
    let body = if status == 204 || status == 304 || method == "HEAD" {
        Vec::new()
    } else {
        let mut b = Vec::new();
        body_reader(&headers, reader)?.read_to_end(&mut b)?;
        b
    };
    check_status(status, &body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Turn a non-2xx status into [`ClientError::Api`].
fn check_status(status: u16, body: &[u8]) -> Result<()> {
    if (200..300).contains(&status) || status == 101 {
        return Ok(());
    }
    let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(body).trim().to_string();
        let code = match status {
            400 => crate::ErrorCode::BadRequest,
            404 => crate::ErrorCode::NotFound,
            409 => crate::ErrorCode::Conflict,
            501 => crate::ErrorCode::NotSupported,
            502 => crate::ErrorCode::VmmUnavailable,
            _ => crate::ErrorCode::Internal,
        };
        let msg = if text.is_empty() {
            format!("ferrited answered HTTP {status}")
        } else {
            format!("ferrited answered HTTP {status}: {text}")
        };
        ApiError::new(code, msg)
    });
    Err(ClientError::Api { status, error })
}

/// The longest head line or head we accept.
const MAX_HEAD: usize = 64 * 1024;

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut buf = Vec::new();
    let n = r.take(MAX_HEAD as u64).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(ClientError::Protocol(
            "connection closed before the response".into(),
        ));
    }
    if buf.last() != Some(&b'\n') {
        return Err(ClientError::Protocol(
            "response line too long or cut".into(),
        ));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| ClientError::Protocol("response head is not UTF-8".into()))
}

/// Read a status line and headers (names lower-cased). Skips `1xx` heads other than `101`.
pub fn read_head(r: &mut impl BufRead) -> Result<(u16, Headers)> {
    loop {
        let line = read_line(r)?;
        let mut parts = line.splitn(3, ' ');
        let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if !version.starts_with("HTTP/1.") {
            return Err(ClientError::Protocol(format!("bad status line {line:?}")));
        }
        let status: u16 = code
            .parse()
            .map_err(|_| ClientError::Protocol(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        let mut total = 0;
        loop {
            let h = read_line(r)?;
            if h.is_empty() {
                break;
            }
            total += h.len();
            if total > MAX_HEAD {
                return Err(ClientError::Protocol("response head too long".into()));
            }
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| ClientError::Protocol(format!("bad header {h:?}")))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        return Ok((status, headers));
    }
}

/// The body of a response with `headers`, framed as they say.
pub fn body_reader<R: BufRead + Send + 'static>(
    headers: &[(String, String)],
    r: R,
) -> Result<Box<dyn Read + Send>> {
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return Ok(Box::new(ChunkedReader::new(r)));
    }
    match header(headers, "content-length") {
        Some(v) => {
            let n: u64 = v
                .trim()
                .parse()
                .map_err(|_| ClientError::Protocol(format!("bad Content-Length {v:?}")))?;
            Ok(Box::new(ExactReader {
                inner: r.take(n),
                left: n,
            }))
        }
        None => Ok(Box::new(r)),
    }
}

/// A `Content-Length` body: a short read is an error, not a short body.
struct ExactReader<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the response body",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Decodes the chunked transfer coding (trailers are read and dropped).
pub struct ChunkedReader<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> ChunkedReader<R> {
    /// Decode the chunked body read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            done: false,
        }
    }

    fn line(&mut self) -> io::Result<String> {
        let mut buf = Vec::new();
        let n = (&mut self.inner).take(4096).read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a chunked body",
            ));
        }
        Ok(String::from_utf8_lossy(&buf).trim_end().to_string())
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                // Trailers up to the blank line.
                while !self.line()?.is_empty() {}
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            // The CRLF after the chunk data.
            self.line()?;
        }
        Ok(n)
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// `id:` (last one seen).
    pub id: Option<String>,
    /// `event:` (default `message`).
    pub event: String,
    /// `data:` lines joined by `\n`.
    pub data: String,
}

/// Parses a `text/event-stream` into messages; comments (keep-alives) are skipped.
pub struct SseReader<R> {
    inner: R,
    last_id: Option<String>,
}

impl<R: BufRead> SseReader<R> {
    /// Parse the stream read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            last_id: None,
        }
    }

    /// The next message, or `None` at the end of the stream.
    pub fn next_message(&mut self) -> io::Result<Option<SseMessage>> {
        let mut event = String::new();
        let mut data: Option<String> = None;
        loop {
            let mut buf = Vec::new();
            let n = self.inner.read_until(b'\n', &mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            let line = String::from_utf8_lossy(&buf);
            if line.is_empty() {
                if let Some(data) = data.take() {
                    return Ok(Some(SseMessage {
                        id: self.last_id.clone(),
                        event: if event.is_empty() {
                            "message".to_string()
                        } else {
                            std::mem::take(&mut event)
                        },
                        data,
                    }));
                }
                event.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_ref(), ""),
            };
            match field {
                "event" => event = value.to_string(),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                "id" => self.last_id = Some(value.to_string()),
                _ => {}
            }
        }
    }
}

/// `GET /v1/events` as an iterator of [`Event`]s; ends when the daemon closes the stream.
pub struct EventStream {
    sse: SseReader<BufReader<Box<dyn Read + Send>>>,
}

impl Iterator for EventStream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.sse.next_message() {
                Ok(None) => return None,
                Err(e) => return Some(Err(e.into())),
                Ok(Some(m)) if m.event == "vm" || m.event == "message" => {
                    return Some(serde_json::from_str(&m.data).map_err(|e| {
                        ClientError::Protocol(format!("bad event {:?}: {e}", m.data))
                    }))
                }
                Ok(Some(_)) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests;
