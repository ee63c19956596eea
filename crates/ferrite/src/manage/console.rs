//! `ferrite vm console`: the daemon's console stream joined to this terminal or pipe.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use api::client::Client;

use super::{Failed, Res};
use crate::terminal::{is_tty, RawMode};

/// The detach key on a terminal: Ctrl-].
const DETACH: u8 = 0x1d;
/// How long to keep printing VM output after stdin ends.
const DRAIN: Duration = Duration::from_secs(1);

enum Done {
    /// The daemon closed the stream (or reading it failed).
    Output,
    /// Stdin ended (piped input).
    InputEof,
    /// Ctrl-] on the terminal.
    Detach,
}

/// Attach to `name`'s console until Ctrl-], end of input (plus a short drain) or the VM's
/// console closing.
pub fn attach(c: &Client, name: &str) -> Res {
    let (stream, pending) = c.console(name)?;
    let tty = is_tty(libc::STDIN_FILENO);
    let _raw = if tty {
        eprint!("Connected to {name} (Ctrl-] detaches)\r\n");
        Some(RawMode::enable(libc::STDIN_FILENO).map_err(|e| Failed(format!("terminal: {e}")))?)
    } else {
        None
    };
    let (tx, rx) = mpsc::channel();

    let mut from_vm = stream.try_clone()?;
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let _ = out.write_all(&pending).and_then(|_| out.flush());
        let mut buf = [0u8; 4096];
        loop {
            match from_vm.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = out_tx.send(Done::Output);
    });

    let to_vm = stream.try_clone()?;
    std::thread::spawn(move || {
        let _ = tx.send(copy_input(to_vm, tty));
    });

    let result = match rx.recv() {
        Ok(Done::InputEof) => {
            // Let the VM's answer to the last input arrive.
            let _ = rx.recv_timeout(DRAIN);
            Ok(())
        }
        Ok(Done::Detach) => {
            drop(_raw);
            eprintln!("\r\nDetached from {name} (it keeps running)");
            Ok(())
        }
        Ok(Done::Output) | Err(_) => {
            if tty {
                drop(_raw);
                eprintln!("\r\nConsole of {name} closed");
            }
            Ok(())
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    result
}

/// Copy stdin to the VM until end of input or (on a terminal) Ctrl-].
fn copy_input(mut to_vm: UnixStream, tty: bool) -> Done {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return Done::InputEof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Done::InputEof,
        };
        let data = &buf[..n];
        if tty {
            if let Some(i) = data.iter().position(|&b| b == DETACH) {
                let _ = to_vm.write_all(&data[..i]);
                return Done::Detach;
            }
        }
        if to_vm.write_all(data).is_err() {
            return Done::Output;
        }
    }
}
