//! Helpers for the live-migration tests: a destination `ferrite run --incoming`, the
//! `migrate` request and its status, what "the guest never ran here" and "the source still
//! runs its guest" look like, and a TCP proxy that cuts the stream at a chosen point.

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::control::Vm;
use super::{num, WATCHDOG};

/// Exit status of a source whose guest was migrated away.
pub const MIGRATED: i32 = 5;

/// A TCP endpoint on loopback nobody listens on yet.
pub fn free_tcp_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("tcp:{}", listener.local_addr().expect("addr"))
}

pub fn start_destination(name: &str, endpoint: &str) -> Vm {
    start_destination_with(name, endpoint, &[])
}

/// [`start_destination`] with more `ferrite run` flags (TLS files, say).
pub fn start_destination_with(name: &str, endpoint: &str, extra: &[String]) -> Vm {
    let mut args = vec!["--incoming".to_string(), endpoint.to_string()];
    args.extend_from_slice(extra);
    Vm::spawn(name, &args)
}

/// Send `{"op":"migrate", ...request}` and require it to start.
pub fn migrate(src: &mut Vm, request: Value) -> Value {
    let reply = request_migrate(src, request);
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

/// Send `{"op":"migrate", ...request}`; the reply, whatever it is.
pub fn request_migrate(src: &mut Vm, request: Value) -> Value {
    let mut req = request;
    req["op"] = "migrate".into();
    src.request(&req.to_string())
}

/// Poll `migrate-status` until the migration ends here (failed, cancelled, unknown) or the
/// source exits (completed); returns the last status seen and the highest throttle.
pub fn wait_migration(src: &mut Vm) -> (Value, u64) {
    let deadline = Instant::now() + WATCHDOG;
    let mut last = Value::Null;
    let mut max_throttle = 0;
    while Instant::now() < deadline {
        if src.child.try_wait().expect("try_wait").is_some() {
            return (last, max_throttle);
        }
        let sock = src.sock.clone();
        let Some(reply) = status_once(&sock) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let status = reply["migration"].clone();
        max_throttle = max_throttle.max(status["throttle_pct"].as_u64().unwrap_or(0));
        last = status;
        if matches!(
            last["phase"].as_str(),
            Some("failed" | "cancelled" | "unknown")
        ) {
            return (last, max_throttle);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    panic!("the migration did not end: {last}");
}

/// One `migrate-status` on a fresh connection (None once the source's socket is gone).
pub fn status_once(sock: &std::path::Path) -> Option<Value> {
    let mut conn = std::os::unix::net::UnixStream::connect(sock).ok()?;
    conn.write_all(b"{\"op\":\"migrate-status\"}\n").ok()?;
    let mut reply = String::new();
    std::io::BufReader::new(conn).read_line(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}

pub fn stderr_of(vm: &mut Vm) -> String {
    let mut text = String::new();
    if let Some(mut err) = vm.child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    text
}

/// The destination exited without ever running the guest; its exit code and stderr.
pub fn assert_never_ran(dst: &mut Vm) -> (Option<i32>, String) {
    let status = dst.wait_exit(WATCHDOG);
    dst.lines_within(Duration::from_millis(200));
    let stderr = stderr_of(dst);
    let guest_lines: Vec<&String> = dst.seen.iter().filter(|l| !l.is_empty()).collect();
    assert!(
        !status.success(),
        "the destination must fail: {status:?} {stderr}"
    );
    assert!(
        guest_lines.is_empty(),
        "the destination must never run the guest: {guest_lines:?}"
    );
    (status.code(), stderr)
}

/// The source kept running its guest: its dirtying loop still ticks, and stops and checks
/// its memory on request.
pub fn assert_source_runs_on(src: &mut Vm) {
    let a = src.wait_line("tick ");
    let b = src.wait_line("tick ");
    assert!(num(&b, "value") > num(&a, "value"), "{a} / {b}");
    src.send("x");
    src.wait_line("OK dirty stopped");
    src.send("dirty-check");
    src.wait_line("OK dirty-check");
}

/// Where the proxy between source and destination cuts the connection.
#[derive(Clone, Copy)]
pub enum Cut {
    /// After this many bytes from the source (during the copy rounds).
    SourceBytes(u64),
    /// Instead of passing on the destination's reply byte number `n` (1: accept, 2: ready,
    /// 3: running).
    ReplyByte(u64),
}

/// Forward `from` to `to`; with `limit`, pass on only that many bytes, then `cut`.
pub fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    limit: Option<u64>,
    cut: Arc<dyn Fn() + Send + Sync>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        let mut total = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n as u64,
            };
            if let Some(l) = limit.filter(|&l| total + n > l) {
                let _ = to.write_all(&buf[..(l - total) as usize]);
                cut();
                break;
            }
            total += n;
            if to.write_all(&buf[..n as usize]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    })
}

/// A one-connection TCP proxy in front of `target` that cuts both ways at `cut`; returns its
/// endpoint.
pub fn cutting_proxy(target: &str, cut: Cut) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp:{}", listener.local_addr().expect("addr"));
    let target = target.trim_start_matches("tcp:").to_string();
    std::thread::spawn(move || {
        let (src, _) = listener.accept().expect("accept");
        let deadline = Instant::now() + Duration::from_secs(10);
        let dst = loop {
            match TcpStream::connect(&target) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("proxy cannot reach {target}: {e}"),
            }
        };
        let cut_all: Arc<dyn Fn() + Send + Sync> = {
            let (a, b) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            Arc::new(move || {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            })
        };
        let (src_limit, reply_limit) = match cut {
            Cut::SourceBytes(n) => (Some(n), None),
            // Pass on the replies before byte n, cut instead of passing byte n.
            Cut::ReplyByte(n) => (None, Some(n - 1)),
        };
        let a = pump(
            src.try_clone().unwrap(),
            dst.try_clone().unwrap(),
            src_limit,
            cut_all.clone(),
        );
        let b = pump(dst, src, reply_limit, cut_all);
        let _ = a.join();
        let _ = b.join();
    });
    endpoint
}
