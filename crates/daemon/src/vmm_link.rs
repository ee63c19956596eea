//! Talking to one VM's monitor process over its control socket (`ferrite run --api-socket`):
//! one JSON request line, one JSON reply line, bounded in time.

use std::path::Path;
use std::time::Duration;

use api::{ApiError, ErrorCode};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply accepted.
const MAX_REPLY: usize = 1 << 20;

/// Send `request` to the control socket at `path` and return the reply object. A reply with
/// `"ok": false` becomes an error carrying the VMM's message.
pub async fn call(path: &Path, request: &Value) -> Result<Value, ApiError> {
    call_within(path, request, REQUEST_TIMEOUT).await
}

/// [`call`] with its own time limit (a snapshot writes all of guest memory).
pub async fn call_within(path: &Path, request: &Value, limit: Duration) -> Result<Value, ApiError> {
    let reply = tokio::time::timeout(limit, raw_call(path, request))
        .await
        .map_err(|_| unavailable(path, &format!("no answer within {} s", limit.as_secs())))??;
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        return Ok(reply);
    }
    let code = reply.get("error").and_then(Value::as_str).unwrap_or("");
    let message = reply
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("the VMM refused the request")
        .to_string();
    let code = match code {
        "not-supported" => ErrorCode::NotSupported,
        "busy" => ErrorCode::Conflict,
        "bad-request" | "unknown-device" => ErrorCode::BadRequest,
        "snapshot-failed" | "disk-error" | "migrate-failed" => ErrorCode::Internal,
        "disk-snapshot-failed" => ErrorCode::Conflict,
        _ => ErrorCode::VmmUnavailable,
    };
    Err(ApiError::new(code, message))
}

async fn raw_call(path: &Path, request: &Value) -> Result<Value, ApiError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| unavailable(path, &e.to_string()))?;
    let (read, mut write) = stream.into_split();
    let mut line = request.to_string();
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| unavailable(path, &e.to_string()))?;
    let mut reader = BufReader::new(read).take(MAX_REPLY as u64);
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .await
        .map_err(|e| unavailable(path, &e.to_string()))?;
    serde_json::from_str(&reply).map_err(|e| unavailable(path, &format!("bad reply: {e}")))
}

fn unavailable(path: &Path, why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::VmmUnavailable,
        format!(
            "The VM's monitor did not answer on {}: {why}",
            path.display()
        ),
    )
}
