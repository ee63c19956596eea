//! Ferrite's live-migration stream, independent of the VMM that drives it:
//!
//! - [`Endpoint`]: where a destination listens and a source connects (`tcp:HOST:PORT`,
//!   `unix:PATH`), and the connected [`Stream`];
//! - [`TlsClient`], [`TlsServer`]: mutual-certificate TLS over TCP, loaded from [`TlsFiles`];
//! - [`wire`]: the framed protocol (handshake, page runs, zero-page runs, the device and vCPU
//!   state, and the commit exchange that guarantees the guest runs on exactly one side);
//! - [`Pacer`]: the bandwidth limit.
//!
//! The protocol is described in `docs/migration.md`.

mod endpoint;
mod error;
mod pacer;
mod tls;
pub mod wire;

pub use endpoint::{Endpoint, Listener, Stream};
pub use error::{MigrationError, Result};
pub use pacer::Pacer;
pub use tls::{check_endpoint as check_tls_endpoint, TlsClient, TlsFiles, TlsServer, TlsStream};
