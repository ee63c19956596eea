//! COM1: a 16550A UART (vm-superio's model) with an interrupt line, a non-blocking console sink
//! and a host-input path with backpressure.

mod console;
mod device;
mod metrics;
mod state;

pub use console::{ConsoleHandle, ConsoleWriter, DEFAULT_CONSOLE_BUFFER};
pub use device::{Serial, SERIAL_FIFO_SIZE, SERIAL_PORT_LEN};
pub use metrics::SerialMetrics;
pub use state::SerialState;
