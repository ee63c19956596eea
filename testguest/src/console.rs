//! CPL3 console: line-buffered output through the write service, line input.

use core::fmt;

use crate::sys;

/// Collects one line of output and sends it with a single service call.
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        if self.len + 2 >= self.buf.len() {
            self.flush();
        }
        if b == b'\n' {
            self.buf[self.len] = b'\r';
            self.len += 1;
        }
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// Sends what has been collected.
    pub fn flush(&mut self) {
        if self.len > 0 {
            sys::write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            self.push(b);
        }
        Ok(())
    }
}

/// Prints one formatted line (CRLF terminated).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::console::Line::new();
        let _ = write!(line, $($arg)*);
        let _ = line.write_str("\n");
        line.flush();
    }};
}

/// Line-based serial input with a small read-ahead buffer.
pub struct LineReader {
    pend: [u8; 64],
    pos: usize,
    end: usize,
}

impl LineReader {
    /// A reader with nothing buffered.
    pub const fn new() -> Self {
        LineReader {
            pend: [0; 64],
            pos: 0,
            end: 0,
        }
    }

    /// Reads serial input into `buf` until a newline; returns the line length (without
    /// CR/LF), or `None` if the line was longer than `buf` (the line is discarded).
    /// Sleeps (wait service) while no input is pending, calling `idle` after each wake-up.
    pub fn read_line(&mut self, buf: &mut [u8], idle: &mut dyn FnMut()) -> Option<usize> {
        let mut len = 0usize;
        let mut overflow = false;
        loop {
            if self.pos >= self.end {
                let n = sys::read(&mut self.pend);
                if n == 0 {
                    crate::platform::arm_wakeup_timer();
                    sys::wait();
                    idle();
                    continue;
                }
                self.pos = 0;
                self.end = n;
            }
            let b = self.pend[self.pos];
            self.pos += 1;
            match b {
                b'\r' | b'\n' => {
                    if len == 0 && !overflow {
                        continue;
                    }
                    return if overflow { None } else { Some(len) };
                }
                0x08 | 0x7f => len = len.saturating_sub(1),
                _ => {
                    if len < buf.len() {
                        buf[len] = b;
                        len += 1;
                    } else {
                        overflow = true;
                    }
                }
            }
        }
    }
}
