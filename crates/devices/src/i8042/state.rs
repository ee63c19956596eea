//! Serialisable i8042 state.

use serde::{Deserialize, Serialize};

/// Everything the guest can observe of the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller configuration byte ("command byte", read with 0x20, written with 0x60).
    pub config: u8,
    /// Controller output port (read with 0xd0, written with 0xd1).
    pub output_port: u8,
    /// A controller command waiting for its data byte on port 0x60.
    pub pending_command: Option<u8>,
    /// A keyboard command waiting for its parameter byte.
    pub pending_kbd_command: Option<u8>,
    /// Bytes waiting for the guest on port 0x60, oldest first.
    pub output: Vec<u8>,
    /// Whether the last guest write went to the command port (status bit 3).
    pub last_write_was_command: bool,
}
