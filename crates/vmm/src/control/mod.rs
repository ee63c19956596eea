//! The per-VM control socket (`--api-socket PATH`): JSON lines, one request and one reply per
//! line, to read statistics and change rate limits while the VM runs.

mod protocol;
mod server;

pub use protocol::{
    handle_line, BalloonControl, ControlState, LiveSlot, StatsFn, VmOps, MAX_REQUEST_BYTES,
};
pub use server::{ControlError, ControlServer};
