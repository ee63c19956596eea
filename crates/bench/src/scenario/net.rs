//! Network round trips over TAP: the test guest's `net-serve` echoes UDP datagrams (port 7)
//! and the host sends them from a network namespace of the harness's own, keeping a window
//! of datagrams in flight, so every datagram crosses host→guest and guest→host once.
//!
//! The namespace, its TAP and every VMM of the scenario live in one thread that entered the
//! namespace with setns(2) (children inherit it); the host's own network is never touched.

use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::child::{CommandSpec, VmmProcess};
use crate::error::{BenchError, Result};
use crate::scenario::{wait_ready, RunConfig};
use crate::vmm::{Vmm, VmmKind};

/// Host address on the TAP.
pub const HOST_CIDR: &str = "10.77.0.1/24";
/// Guest address.
pub const GUEST_IP: &str = "10.77.0.2";
/// How long `net-serve` runs (the harness kills the VMM as soon as it is done).
const SERVE_SECONDS: u64 = 120;
/// How long one datagram may take to come back before it counts as lost.
const RECV_TIMEOUT: Duration = Duration::from_millis(200);
/// How long to wait for the first echo (the guest must answer ARP first).
const FIRST_ECHO_GUARD: Duration = Duration::from_secs(20);

/// Settings of the network benchmark.
#[derive(Debug, Clone)]
pub struct NetPlan {
    /// TAP name (created in the namespace).
    pub tap: String,
    /// Datagrams per payload size.
    pub count: u64,
    /// Datagrams in flight.
    pub window: u64,
    /// UDP payload sizes measured, bytes.
    pub sizes: Vec<usize>,
}

/// One payload size's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoResult {
    /// Payload size.
    pub size: usize,
    /// Echoed datagrams per second (each one crossed the device twice).
    pub pps: f64,
    /// Payload MiB/s in each direction.
    pub mib_s: f64,
    /// Datagrams that did not come back (or came back wrong).
    pub lost: u64,
}

impl NetPlan {
    /// The guest's `cmds=`.
    pub fn guest_cmds(&self) -> String {
        format!("net-up 0 {GUEST_IP}/24;net-serve {SERVE_SECONDS};poweroff")
    }

    /// The VMM's command with one NIC on the TAP.
    pub fn command(&self, vmm: &Vmm, cfg: &RunConfig, cmdline: &str) -> CommandSpec {
        let mut spec = vmm.command(&cfg.guest, cmdline);
        match vmm.kind {
            VmmKind::Ferrite => {
                spec.args.push("--net".into());
                spec.args.push(format!("tap={}", self.tap));
            }
            VmmKind::QemuMicrovm | VmmKind::QemuQ35 => {
                spec.args.push("-netdev".into());
                spec.args.push(format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    self.tap
                ));
                spec.args.push("-device".into());
                // Modern-only (device 0x1041), like Ferrite's: the guest drives modern functions.
                spec.args
                    .push("virtio-net-pci,netdev=n0,disable-legacy=on".into());
            }
        }
        spec
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| BenchError::Spawn {
            program: "ip".into(),
            source: e,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Tool {
            tool: format!("ip {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A network namespace the calling thread has entered; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create a namespace with `tap` (vnet header capable, holding [`HOST_CIDR`], up) and move
    /// the calling thread into it. Call from a thread of its own: the thread stays there.
    pub fn enter(tap: &str) -> Result<Self> {
        let name = format!("ferrite-bench-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        let f = File::open(format!("/run/netns/{}", ns.name))
            .map_err(|e| BenchError::Prepare(format!("/run/netns/{}", ns.name).into(), e))?;
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(BenchError::Prepare(
                format!("/run/netns/{}", ns.name).into(),
                std::io::Error::last_os_error(),
            ));
        }
        ip(&["link", "set", "lo", "up"])?;
        ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])?;
        ip(&["addr", "add", HOST_CIDR, "dev", tap])?;
        ip(&["link", "set", tap, "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Datagram `seq` of `size` bytes (at least 8): the sequence number, then a pattern of it.
fn datagram(seq: u64, size: usize) -> Vec<u8> {
    let mut d = seq.to_le_bytes().to_vec();
    d.extend((8..size.max(8)).map(|i| (seq as u8).wrapping_add(i as u8)));
    d
}

/// Whether `d` is the intact echo of a datagram of `size` bytes; its sequence number.
pub fn check(d: &[u8], size: usize) -> Option<u64> {
    let seq = u64::from_le_bytes(d.get(..8)?.try_into().ok()?);
    (d.len() == size.max(8) && datagram(seq, size) == d).then_some(seq)
}

/// Boot `vmm` with `net-serve` and measure every payload size.
pub fn net_once(vmm: &Vmm, plan: &NetPlan, cfg: &RunConfig) -> Result<Vec<EchoResult>> {
    let spec = plan.command(vmm, cfg, &cfg.cmdline(&plan.guest_cmds()));
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout)?;
    let out = measure(&mut p, plan, cfg);
    p.kill();
    out
}

fn measure(p: &mut VmmProcess, plan: &NetPlan, cfg: &RunConfig) -> Result<Vec<EchoResult>> {
    wait_ready(p, cfg)?;
    let deadline = Instant::now() + cfg.command_timeout;
    let (line, _) = p.wait_line(deadline, "net-serve to start", |l| {
        l.starts_with("OK net-serve started") || l.starts_with("ERR net")
    })?;
    if !line.text.starts_with("OK") {
        return Err(BenchError::CommandRefused {
            cmd: "net-up/net-serve".into(),
            line: line.text,
        });
    }
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(io_err)?;
    sock.connect((GUEST_IP, 7)).map_err(io_err)?;
    first_echo(&sock)?;
    sock.set_read_timeout(Some(RECV_TIMEOUT)).map_err(io_err)?;
    plan.sizes
        .iter()
        .map(|&size| echo(&sock, plan, size))
        .collect()
}

fn io_err(e: std::io::Error) -> BenchError {
    BenchError::Tool {
        tool: "UDP socket".into(),
        message: e.to_string(),
    }
}

/// Send one datagram until it comes back (ARP and the guest's first answer).
fn first_echo(sock: &UdpSocket) -> Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(io_err)?;
    let start = Instant::now();
    let probe = datagram(u64::MAX, 64);
    let mut buf = vec![0u8; 2048];
    while start.elapsed() < FIRST_ECHO_GUARD {
        sock.send(&probe).map_err(io_err)?;
        if let Ok(n) = sock.recv(&mut buf) {
            if buf[..n] == probe[..] {
                return Ok(());
            }
        }
    }
    Err(BenchError::Timeout {
        after: FIRST_ECHO_GUARD,
        waiting_for: "the guest's first UDP echo".into(),
        stderr: String::new(),
    })
}

/// `plan.count` datagrams of `size` bytes with `plan.window` in flight.
fn echo(sock: &UdpSocket, plan: &NetPlan, size: usize) -> Result<EchoResult> {
    let mut buf = vec![0u8; 65536];
    // Drain stragglers of an earlier size.
    sock.set_nonblocking(true).map_err(io_err)?;
    while sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false).map_err(io_err)?;
    let (mut sent, mut got, mut lost) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut last = start;
    while got + lost < plan.count {
        while sent < plan.count && sent - got - lost < plan.window {
            sock.send(&datagram(sent, size)).map_err(io_err)?;
            sent += 1;
        }
        match sock.recv(&mut buf) {
            Ok(n) if check(&buf[..n], size).is_some() => {
                got += 1;
                last = Instant::now();
            }
            Ok(_) => {}
            // Everything still in flight is lost (timeout): send the next window.
            Err(_) => lost += sent - got - lost,
        }
    }
    let secs = last.saturating_duration_since(start).as_secs_f64();
    if got == 0 || secs <= 0.0 {
        return Err(BenchError::MalformedAnswer(format!(
            "no UDP echo of {size}-byte datagrams came back"
        )));
    }
    let pps = got as f64 / secs;
    Ok(EchoResult {
        size,
        pps,
        mib_s: pps * size as f64 / (1u64 << 20) as f64,
        lost,
    })
}

/// Guest port of the host→guest flood.
const RX_PORT: u16 = 9000;
/// Host port of the guest→host flood.
const TX_PORT: u16 = 9001;
/// Host port of the datagram that makes the host resolve the guest's MAC before a flood.
const PRIMER_PORT: u16 = 9002;
/// Host receive buffer for the guest→host flood (SO_RCVBUFFORCE, root).
const HOST_RCVBUF: libc::c_int = 32 << 20;
/// A flood ends after this long without a datagram.
const IDLE: Duration = Duration::from_secs(1);

/// One direction of one payload size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneWay {
    /// Payload size.
    pub size: usize,
    /// True for guest→host.
    pub to_host: bool,
    /// Datagrams per second at the receiver.
    pub pps: f64,
    /// Payload MiB/s at the receiver.
    pub mib_s: f64,
    /// Datagrams sent and not received.
    pub lost: u64,
}

impl NetPlan {
    /// The guest's `cmds=` of the one-way boot: per size, receive then send.
    pub fn oneway_cmds(&self) -> String {
        let host = HOST_CIDR.split('/').next().unwrap_or("");
        let mut cmds: Vec<String> = self
            .sizes
            .iter()
            .map(|size| {
                format!(
                    "net-bench-rx 0 {GUEST_IP} {RX_PORT} {} 60;net-bench-tx 0 {GUEST_IP} {host} {TX_PORT} {} {size}",
                    self.count, self.count
                )
            })
            .collect();
        cmds.push("poweroff".into());
        cmds.join(";")
    }
}

/// Boot `vmm` with the one-way floods and measure both directions of every size.
pub fn oneway_once(vmm: &Vmm, plan: &NetPlan, cfg: &RunConfig) -> Result<Vec<OneWay>> {
    let host = HOST_CIDR.split('/').next().unwrap_or("");
    let rx = UdpSocket::bind((host, TX_PORT)).map_err(io_err)?;
    let big = HOST_RCVBUF;
    // SAFETY: setsockopt on our socket with a pointer to a live c_int of the given size.
    unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let spec = plan.command(vmm, cfg, &cfg.cmdline(&plan.oneway_cmds()));
    let mut p = VmmProcess::spawn(&spec, cfg.hard_timeout)?;
    let out = oneway_measure(&mut p, plan, cfg, &rx);
    p.kill();
    out
}

fn answer(p: &mut VmmProcess, cfg: &RunConfig, cmd: &str, prefix: &str) -> Result<String> {
    let deadline = Instant::now() + cfg.command_timeout;
    let (line, _) = p.wait_line(deadline, &format!("the answer to {cmd}"), |l| {
        l.starts_with(&format!("OK {cmd}")) || l.starts_with(&format!("ERR {cmd}"))
    })?;
    if !line.text.starts_with(prefix) {
        return Err(BenchError::CommandRefused {
            cmd: cmd.into(),
            line: line.text,
        });
    }
    Ok(line.text)
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn oneway_measure(
    p: &mut VmmProcess,
    plan: &NetPlan,
    cfg: &RunConfig,
    rx: &UdpSocket,
) -> Result<Vec<OneWay>> {
    wait_ready(p, cfg)?;
    let tx = UdpSocket::bind("0.0.0.0:0").map_err(io_err)?;
    tx.connect((GUEST_IP, RX_PORT)).map_err(io_err)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    for &size in &plan.sizes {
        answer(p, cfg, "net-bench-rx", "OK net-bench-rx started")?;
        // Resolve the guest's MAC first (the guest answers ARP while it counts).
        let _ = tx.send_to(&[0u8; 8], (GUEST_IP, PRIMER_PORT));
        std::thread::sleep(Duration::from_millis(200));
        for seq in 0..plan.count {
            // A full socket buffer drops the datagram: counted as lost by the guest.
            let _ = tx.send(&datagram(seq, size));
        }
        let line = answer(p, cfg, "net-bench-rx", "OK net-bench-rx frames=")?;
        let (frames, ns) = (field(&line, "frames"), field(&line, "ns"));
        let (Some(frames), Some(ns)) = (frames, ns) else {
            return Err(BenchError::MalformedAnswer(line));
        };
        let secs = ns as f64 / 1e9;
        let pps = if secs > 0.0 {
            frames as f64 / secs
        } else {
            0.0
        };
        out.push(OneWay {
            size,
            to_host: false,
            pps,
            mib_s: pps * size as f64 / (1u64 << 20) as f64,
            lost: plan.count.saturating_sub(frames),
        });
        // The guest floods us now.
        rx.set_read_timeout(Some(cfg.command_timeout))
            .map_err(io_err)?;
        let (mut got, mut first, mut last) = (0u64, None, Instant::now());
        while got < plan.count {
            match rx.recv(&mut buf) {
                Ok(n) if n == size.max(8) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    got += 1;
                    rx.set_read_timeout(Some(IDLE)).map_err(io_err)?;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        answer(p, cfg, "net-bench-tx", "OK net-bench-tx frames=")?;
        let secs = first.map_or(0.0, |f| last.saturating_duration_since(f).as_secs_f64());
        if got < 2 || secs <= 0.0 {
            return Err(BenchError::MalformedAnswer(format!(
                "the host received {got} of the guest's {size}-byte datagrams"
            )));
        }
        // Rate between the first and the last datagram: got - 1 intervals.
        let pps = (got - 1) as f64 / secs;
        out.push(OneWay {
            size,
            to_host: true,
            pps,
            mib_s: pps * size as f64 / (1u64 << 20) as f64,
            lost: plan.count.saturating_sub(got),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn test_check_accepts_echo_refuses_other_size() {
        // Arrange
        let d = datagram(42, 100);

        // Act
        let ok = check(&d, 100);
        let wrong = check(&d, 101);

        // Assert
        assert_eq!(ok, Some(42));
        assert_eq!(wrong, None);
    }

    #[test]
    fn test_oneway_cmds_receive_then_send_per_size() {
        // Arrange
        let plan = NetPlan {
            tap: "t".into(),
            count: 100,
            window: 4,
            sizes: vec![64],
        };

        // Act
        let cmds = plan.oneway_cmds();

        // Assert
        assert_eq!(
            cmds,
            "net-bench-rx 0 10.77.0.2 9000 100 60;net-bench-tx 0 10.77.0.2 10.77.0.1 9001 100 64;poweroff"
        );
    }

    #[test]
    fn test_field_reads_named_number() {
        // Arrange
        let line = "OK net-bench-rx frames=12 bytes=768 ns=5000";

        // Act
        let (frames, ns, missing) = (field(line, "frames"), field(line, "ns"), field(line, "x"));

        // Assert
        assert_eq!((frames, ns, missing), (Some(12), Some(5000), None));
    }

    #[test]
    fn test_command_qemu_tap_script_off() {
        // Arrange
        let plan = NetPlan {
            tap: "fbtap0".into(),
            count: 10,
            window: 4,
            sizes: vec![64],
        };
        let vmm = Vmm {
            kind: VmmKind::QemuQ35,
            program: PathBuf::from("/q"),
            machine: "q35".into(),
            extra_args: vec![],
        };
        let cfg = crate::scenario::test_support::config();

        // Act
        let line = plan.command(&vmm, &cfg, "x").args.join(" ");

        // Assert
        assert!(line.ends_with(
            "-netdev tap,id=n0,ifname=fbtap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,disable-legacy=on"
        ));
    }
}
