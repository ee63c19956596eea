//! Network namespaces for tests that use TAP devices: the test thread enters a namespace of
//! its own with setns(2), creates its TAPs there, and a `ferrite` spawned from that thread
//! inherits it, so the host's own network is never touched. Needs root and `ip` (iproute2).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Hang guard while waiting for a guest to answer its first ping (not a threshold).
const UP_GUARD: Duration = Duration::from_secs(60);

/// Run `ip ARGS`, failing the test if it fails.
pub fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2)");
    assert!(st.success(), "ip {} failed", args.join(" "));
}

/// A network namespace the calling thread has entered, deleted on drop (also when a test
/// fails).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create a namespace, move the calling thread into it and bring its loopback up.
    pub fn enter() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ferrite-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        let f = File::open(format!("/run/netns/{}", ns.name)).expect("open netns");
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A TAP (with vnet header support) holding `host_cidr`, up.
    pub fn tap(&self, name: &str, host_cidr: &str) {
        ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"]);
        ip(&["addr", "add", host_cidr, "dev", name]);
        ip(&["link", "set", name, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `ping -c COUNT ADDR` (from the calling thread's namespace); whether it was answered.
pub fn ping(addr: &str, count: u32) -> bool {
    Command::new("ping")
        .args(["-c", &count.to_string(), "-W", "1", "-i", "0.2", addr])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run ping (iputils-ping)")
        .success()
}

/// Ping until the guest answers (it needs a moment to boot), within the hang guard.
pub fn wait_up(addr: &str) {
    let start = Instant::now();
    while !ping(addr, 1) {
        assert!(start.elapsed() < UP_GUARD, "{addr} never answered a ping");
    }
}
