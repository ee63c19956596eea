//! How errors leave the daemon: every failure is an [`api::ApiError`] JSON body with the HTTP
//! status its code maps to.

use api::{ApiError, ErrorCode};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An API error as an axum response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl From<store::StoreError> for HttpError {
    fn from(e: store::StoreError) -> Self {
        HttpError(store_error(e))
    }
}

/// Maps a store failure to the API's codes.
pub fn store_error(e: store::StoreError) -> ApiError {
    match &e {
        store::StoreError::Exists(name) => ApiError::new(
            ErrorCode::Conflict,
            format!("A VM named {name:?} already exists: choose another name or delete it first"),
        ),
        store::StoreError::NotFound(name) => ApiError::no_vm(name),
        store::StoreError::SnapshotExists { vm, name } => ApiError::new(
            ErrorCode::Conflict,
            format!("VM {vm:?} already has a snapshot named {name:?}: choose another name or delete it first"),
        ),
        store::StoreError::SnapshotNotFound { vm, name } => no_snapshot(vm, name),
        _ => internal(e),
    }
}

/// `not-found` for snapshot `name` of VM `vm`.
pub fn no_snapshot(vm: &str, name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("VM {vm:?} has no snapshot named {name:?} (see GET /v1/vms/{vm}/snapshots)"),
    )
}

/// A 500 with `e`'s whole source chain as the message.
pub fn internal(e: impl std::error::Error) -> ApiError {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    ApiError::new(ErrorCode::Internal, msg)
}

/// A 409 for a request the VM's current state forbids.
pub fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Conflict, message)
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

/// Handler result.
pub type HttpResult<T> = Result<T, HttpError>;
