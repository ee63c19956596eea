//! A minimal i8042 PS/2 controller: enough for a guest to probe it, talk to a keyboard that
//! acknowledges commands, and reset the machine through it (command 0xfe).

mod device;
mod metrics;
mod state;

pub use device::{I8042, I8042_PORT_LEN};
pub use metrics::I8042Metrics;
pub use state::I8042State;
