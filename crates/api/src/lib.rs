//! Ferrite's management API as data: what `ferrited` accepts and returns, shared with the
//! `ferrite` CLI so both sides agree by construction. The routes are listed in [`routes`]
//! and described for outsiders in `openapi.json` (served at `/openapi.json`).

pub mod client;
pub mod disk_model;
pub mod error;
pub mod model;
pub mod routes;

pub use disk_model::*;
pub use error::{ApiError, ErrorCode};
pub use model::*;

/// The OpenAPI 3 document of the API, kept in the repository beside this crate.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Where `ferrited` listens by default.
pub const DEFAULT_SOCKET: &str = "/run/ferrite/ferrited.sock";
