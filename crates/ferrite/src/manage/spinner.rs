//! A spinner on stderr for requests that take more than a second (a graceful stop waits for
//! the guest), so a terminal user sees that something is happening. It only appears on a
//! terminal, never with `--json`, and only once the request has run for a second.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long a request runs before the spinner appears.
const DELAY: Duration = Duration::from_secs(1);

/// A running spinner; dropping it (or [`Spinner::finish`]) clears it.
pub struct Spinner {
    done: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Spinner {
    /// Start a spinner labelled `message` (shown after [`DELAY`]) unless `quiet`.
    pub fn start(message: String, quiet: bool) -> Self {
        if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return Self {
                done: None,
                thread: None,
            };
        }
        let (done, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if rx.recv_timeout(DELAY) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                bar.set_style(style);
            }
            bar.set_message(message);
            bar.enable_steady_tick(Duration::from_millis(100));
            let _ = rx.recv();
            bar.finish_and_clear();
        });
        Self {
            done: Some(done),
            thread: Some(thread),
        }
    }

    /// Stop and clear the spinner before printing results.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop();
    }
}
