//! The error body every failing request gets: a stable machine code plus a human message.

use serde::{Deserialize, Serialize};

/// Stable error codes; clients branch on these, never on the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// 400: the body or a parameter is invalid (`field` names which).
    BadRequest,
    /// 404: no such VM (or route).
    NotFound,
    /// 405: the route exists but not with this HTTP method.
    MethodNotAllowed,
    /// 409: the VM already exists or is in a state that forbids the request.
    Conflict,
    /// 409: starting the VM would exceed the host's capacity (the message says what is short).
    InsufficientCapacity,
    /// 501: the request is valid but this build or host cannot do it.
    NotSupported,
    /// 500: the daemon failed (the message says how).
    Internal,
    /// 502: the VM's monitor process did not answer.
    VmmUnavailable,
    /// 502: another ferrited (a migration's destination) could not be reached or did not
    /// answer as the API says.
    PeerUnavailable,
}

impl ErrorCode {
    /// Every code, in declaration order (for documentation checks and exhaustive tests).
    pub const ALL: &[ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::InsufficientCapacity,
        ErrorCode::NotSupported,
        ErrorCode::Internal,
        ErrorCode::VmmUnavailable,
        ErrorCode::PeerUnavailable,
    ];

    /// The HTTP status this code is sent with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict | ErrorCode::InsufficientCapacity => 409,
            ErrorCode::NotSupported => 501,
            ErrorCode::Internal => 500,
            ErrorCode::VmmUnavailable | ErrorCode::PeerUnavailable => 502,
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// What went wrong and how to fix it, for people.
    pub message: String,
    /// The request field at fault (`vcpus`, `disks[1]`), for `bad-request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A `bad-request` naming `field`.
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    /// `not-found` for VM `name`.
    pub fn no_vm(name: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("No VM named {name:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The position of `code` in [`ErrorCode::ALL`]; the exhaustive match stops compiling
    /// when a variant is added, so `ALL` cannot silently miss it.
    fn index(code: ErrorCode) -> usize {
        match code {
            ErrorCode::BadRequest => 0,
            ErrorCode::NotFound => 1,
            ErrorCode::MethodNotAllowed => 2,
            ErrorCode::Conflict => 3,
            ErrorCode::InsufficientCapacity => 4,
            ErrorCode::NotSupported => 5,
            ErrorCode::Internal => 6,
            ErrorCode::VmmUnavailable => 7,
            ErrorCode::PeerUnavailable => 8,
        }
    }

    #[test]
    fn test_all_lists_every_code_once() {
        let mut seen = vec![false; ErrorCode::ALL.len()];

        for &code in ErrorCode::ALL {
            let i = index(code);
            assert!(!seen[i], "{code:?} is listed twice in ErrorCode::ALL");
            seen[i] = true;
        }

        assert!(
            seen.iter().all(|&s| s),
            "ErrorCode::ALL misses a variant: {seen:?}"
        );
    }
}
