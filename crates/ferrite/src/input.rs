//! The stdin thread: host keystrokes to the guest's COM1, with QEMU-style Ctrl-A escapes when
//! stdin is a terminal.

use std::io::Read;
use std::time::Duration;

use vmm::{ConsoleInput, StopHandle};

/// The escape character (Ctrl-A).
pub const ESCAPE: u8 = 0x01;

/// What the escape filter decided for some input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Bytes for the guest.
    pub guest: Vec<u8>,
    /// Ctrl-A x was typed.
    pub quit: bool,
    /// Ctrl-A h was typed.
    pub help: bool,
}

/// The Ctrl-A escape state machine (state carries over between reads).
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending_escape: bool,
}

impl EscapeFilter {
    /// Process one chunk of terminal input.
    pub fn feed(&mut self, input: &[u8]) -> Filtered {
        let mut out = Filtered::default();
        for &b in input {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    b'x' | b'X' => {
                        out.quit = true;
                        return out;
                    }
                    b'h' | b'H' | b'?' => out.help = true,
                    ESCAPE => out.guest.push(ESCAPE),
                    // Unknown escapes pass through unchanged.
                    other => out.guest.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending_escape = true;
            } else {
                out.guest.push(b);
            }
        }
        out
    }
}

const ESCAPE_HELP: &str =
    "\r\n[ferrite] Ctrl-A x: quit   Ctrl-A Ctrl-A: send Ctrl-A   Ctrl-A h: this help\r\n";

/// Deliver `bytes` to the guest, waiting for FIFO room; gives up when the VM is stopping.
pub fn deliver(input: &ConsoleInput, stop: &StopHandle, mut bytes: &[u8]) {
    while !bytes.is_empty() && !stop.requested() {
        let taken = input.send(bytes);
        bytes = &bytes[taken..];
        if taken == 0 {
            input.wait_for_room(Duration::from_millis(50));
        }
    }
}

/// Start the stdin thread. `escapes` enables Ctrl-A handling (terminal stdin). End of input
/// or a read error ends the thread and leaves the VM running.
pub fn spawn_stdin_thread(
    input: ConsoleInput,
    stop: StopHandle,
    escapes: bool,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ferrite-stdin".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                if !escapes {
                    deliver(&input, &stop, &buf[..n]);
                    continue;
                }
                let f = filter.feed(&buf[..n]);
                deliver(&input, &stop, &f.guest);
                if f.help {
                    eprint!("{ESCAPE_HELP}");
                }
                if f.quit {
                    stop.request_stop();
                    return;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_filter_plain_bytes_pass_through() {
        let f = EscapeFilter::default().feed(b"ls\r");
        assert_eq!(f.guest, b"ls\r");
        assert!(!f.quit);
    }

    #[test]
    fn test_filter_ctrl_a_x_quits() {
        let f = EscapeFilter::default().feed(b"ab\x01xcd");
        assert_eq!(f.guest, b"ab");
        assert!(f.quit);
    }

    #[test]
    fn test_filter_double_ctrl_a_sends_one() {
        let f = EscapeFilter::default().feed(b"\x01\x01z");
        assert_eq!(f.guest, b"\x01z");
        assert!(!f.quit);
    }

    #[test]
    fn test_filter_escape_split_across_reads() {
        let mut filter = EscapeFilter::default();
        assert_eq!(filter.feed(b"\x01").guest, b"");
        assert!(filter.feed(b"x").quit);
    }

    #[test]
    fn test_filter_unknown_escape_passes_both_bytes() {
        let f = EscapeFilter::default().feed(b"\x01q");
        assert_eq!(f.guest, b"\x01q");
    }

    #[test]
    fn test_filter_help_is_reported() {
        assert!(EscapeFilter::default().feed(b"\x01h").help);
    }
}
