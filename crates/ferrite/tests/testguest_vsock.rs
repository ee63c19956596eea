//! The test guest's virtio-vsock driver against Ferrite's hybrid vsock (host AF_UNIX sockets,
//! Firecracker's protocol): host-initiated echo through `CONNECT <port>\n` / `OK <port>\n`,
//! guest-initiated echo to `<socket>_<port>`, many concurrent connections, and resets for
//! ports nobody listens on, in both directions.

mod common;
mod testguest_common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;

use testguest_common::vsock::{
    assert_ok_line, connect_vm, echo_through, hybrid_connect, read_line, SockDir, HANG,
};
use testguest_common::{num, Guest, GuestRun};

/// Boot the guest with `--vsock cid=3,socket=...` and run `cmds`.
fn run_guest(dir: &SockDir, cmds: &[&str]) -> Guest {
    let spec = format!("cid=3,socket={}", dir.vm_socket().display());
    let extra = ["--vsock", spec.as_str()];
    GuestRun {
        extra: &extra,
        ..GuestRun::new(cmds)
    }
    .run()
}

fn data_for(conn: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(conn as u8) ^ (i >> 9) as u8)
        .collect()
}

/// Accept `count` connections on `listener` and echo each until its peer closes.
fn host_echo_server(listener: UnixListener, count: usize) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..count {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
            workers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            total += n as u64;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                total
            }));
        }
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

#[test]
fn test_vsock_host_initiated_echo_gets_ok_and_data_back() {
    // Arrange
    let dir = SockDir::new("host");
    let path = dir.vm_socket();
    let data = data_for(1, 200_000);
    let expected = data.clone();
    let host = std::thread::spawn(move || {
        let (mut s, line) = hybrid_connect(&path, 1234);
        let back = echo_through(&mut s, &data);
        (line, back)
    });

    // Act
    let guest = run_guest(&dir, &["vsock-listen 1234 1", "poweroff"]);
    let (line, back) = host.join().unwrap();

    // Assert
    guest.assert_powered_off();
    assert_ok_line(&line);
    assert!(
        back == expected,
        "echo differs: {} of {} bytes",
        back.len(),
        expected.len()
    );
    let ok = guest.ok("vsock-listen", 0);
    assert_eq!(num(ok, "conns"), 1, "{ok}");
    assert_eq!(num(ok, "bytes"), 200_000, "{ok}");
    assert_eq!(num(ok, "resets"), 0, "{ok}");
}

#[test]
fn test_vsock_guest_initiated_echo_verified_by_guest() {
    // Arrange
    let dir = SockDir::new("guest");
    let listener = UnixListener::bind(dir.host_port(5000)).unwrap();
    let echo = host_echo_server(listener, 1);

    // Act
    let guest = run_guest(&dir, &["vsock-connect 5000 150000", "poweroff"]);
    let echoed = echo.join().unwrap();

    // Assert
    guest.assert_powered_off();
    let ok = guest.ok("vsock-connect", 0);
    assert!(ok.contains("result=match"), "{ok}");
    assert_eq!(num(ok, "bytes"), 150_000, "{ok}");
    assert_eq!(echoed, 150_000);
}

#[test]
fn test_vsock_many_concurrent_host_connections_all_echo() {
    // Arrange
    const CONNS: usize = 64;
    let dir = SockDir::new("many");
    let path = dir.vm_socket();
    let host = std::thread::spawn(move || {
        let mut streams: Vec<UnixStream> = (0..CONNS)
            .map(|_| {
                let mut s = connect_vm(&path);
                s.write_all(b"CONNECT 1234\n").unwrap();
                s
            })
            .collect();
        let ports: Vec<u64> = streams
            .iter_mut()
            .map(|s| assert_ok_line(&read_line(s).unwrap()))
            .collect();
        // Interleave: every connection sends its data before any reads its echo.
        for (i, s) in streams.iter_mut().enumerate() {
            s.write_all(&data_for(i, 8000)).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        }
        let good = streams
            .iter_mut()
            .enumerate()
            .map(|(i, s)| {
                let mut back = Vec::new();
                s.read_to_end(&mut back).is_ok() && back == data_for(i, 8000)
            })
            .filter(|&ok| ok)
            .count();
        (ports, good)
    });

    // Act
    let guest = run_guest(&dir, &["vsock-listen 1234 64", "poweroff"]);
    let (mut ports, good) = host.join().unwrap();

    // Assert
    guest.assert_powered_off();
    assert_eq!(good, CONNS);
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), CONNS, "host ports must be distinct");
    let ok = guest.ok("vsock-listen", 0);
    assert_eq!(num(ok, "conns"), CONNS as u64, "{ok}");
    assert_eq!(num(ok, "bytes"), (CONNS * 8000) as u64, "{ok}");
}

#[test]
fn test_vsock_many_concurrent_guest_connections_all_echo() {
    // Arrange
    let dir = SockDir::new("gmany");
    let listener = UnixListener::bind(dir.host_port(5000)).unwrap();
    let echo = host_echo_server(listener, 32);

    // Act
    let guest = run_guest(&dir, &["vsock-connect 5000 20000 32", "poweroff"]);
    let echoed = echo.join().unwrap();

    // Assert
    guest.assert_powered_off();
    let ok = guest.ok("vsock-connect", 0);
    assert!(ok.contains("result=match"), "{ok}");
    assert_eq!(num(ok, "conns"), 32, "{ok}");
    assert_eq!(echoed, 32 * 20_000);
}

#[test]
fn test_vsock_connect_to_closed_guest_port_is_reset_without_ok() {
    // Arrange
    let dir = SockDir::new("closed");
    let path = dir.vm_socket();
    let host = std::thread::spawn(move || {
        let (mut refused, line) = hybrid_connect(&path, 4321);
        let mut rest = Vec::new();
        let rest_ok = refused.read_to_end(&mut rest).map(|_| rest.len());
        // Then a good one, so the guest's listener finishes.
        let (mut s, ok) = hybrid_connect(&path, 1234);
        let back = echo_through(&mut s, b"ping");
        (line, rest_ok.ok(), ok, back)
    });

    // Act
    let guest = run_guest(&dir, &["vsock-listen 1234 1", "poweroff"]);
    let (line, rest, ok, back) = host.join().unwrap();

    // Assert
    guest.assert_powered_off();
    assert_eq!(line, "", "a refused connection must be closed without OK");
    assert!(matches!(rest, Some(0) | None), "{rest:?}");
    assert_ok_line(&ok);
    assert_eq!(back, b"ping");
    let answer = guest.ok("vsock-listen", 0);
    assert!(num(answer, "refused") >= 1, "{answer}");
}

#[test]
fn test_vsock_guest_connect_to_unlistened_host_port_gets_reset() {
    // Arrange
    let dir = SockDir::new("norst");

    // Act
    let guest = run_guest(&dir, &["vsock", "vsock-connect 5999 100", "poweroff"]);

    // Assert
    guest.assert_powered_off();
    let info = guest.ok("vsock", 0);
    assert_eq!(num(info, "cid"), 3, "{info}");
    let err = guest.err("vsock-connect", 0);
    assert!(err.contains("refused port=5999"), "{err}");
}

#[test]
fn test_vsock_socket_in_use_is_refused_with_a_fix() {
    // Arrange
    let dir = SockDir::new("inuse");
    let _other = UnixListener::bind(dir.vm_socket()).unwrap();

    // Act
    let guest = run_guest(&dir, &["poweroff"]);

    // Assert
    assert_ne!(guest.out.code, Some(0));
    assert!(
        guest.out.stderr.contains("in use by another process"),
        "{}",
        guest.out.stderr
    );
}

#[test]
fn test_vsock_reserved_cid_is_refused_with_a_fix() {
    // Arrange
    let dir = SockDir::new("cid");
    let spec = format!("cid=2,socket={}", dir.vm_socket().display());
    let kernel = common::asset("testguest.elf");
    let kernel = kernel.display().to_string();

    // Act
    let out = common::run_ferrite(
        &["run", "--kernel", &kernel, "--vsock", &spec],
        testguest_common::WATCHDOG,
    );

    // Assert
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("use cid=3 or more"), "{}", out.stderr);
    assert!(!dir.vm_socket().exists());
}
