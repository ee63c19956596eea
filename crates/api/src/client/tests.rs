//! The client against a tiny in-test server on a temporary Unix socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;

use super::*;
use crate::{ErrorCode, VmState};

/// A server answering one connection with `reply` and sending back the request it got.
fn serve_once(reply: Vec<u8>) -> (Client, mpsc::Receiver<(String, Vec<u8>)>, PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferrite-api-client-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut r = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(|v| v.trim().parse::<usize>().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let mut s = r.into_inner();
        s.write_all(&reply).unwrap();
        let upgraded = head.contains("Upgrade: ferrite-console");
        tx.send((head, body)).unwrap();
        if upgraded {
            // Echo until the client half-closes.
            let mut buf = [0u8; 64];
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).unwrap();
            }
        }
    });
    (Client::new(&path), rx, dir)
}

fn http(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn info_json(name: &str) -> String {
    serde_json::json!({
        "spec": {"name": name, "kernel": "/k"},
        "state": "running",
        "pid": 42,
    })
    .to_string()
}

#[test]
fn test_action_sends_post_with_empty_body_and_decodes_vm_info() {
    let (c, rx, _d) = serve_once(http("200 OK", "", &info_json("web")));

    let info = c.action("web", "start").unwrap();

    assert_eq!(info.spec.name, "web");
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.pid, Some(42));
    let (head, body) = rx.recv().unwrap();
    assert!(
        head.starts_with("POST /v1/vms/web/start HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("Connection: close\r\n"));
    assert!(head.contains("Content-Length: 0\r\n"));
    assert!(body.is_empty());
}

#[test]
fn test_stop_sends_timeout_body() {
    let (c, rx, _d) = serve_once(http("200 OK", "", &info_json("a")));

    c.stop("a", Some(7)).unwrap();

    let (head, body) = rx.recv().unwrap();
    assert!(head.starts_with("POST /v1/vms/a/stop "));
    assert!(head.contains("Content-Type: application/json"));
    assert_eq!(body, br#"{"timeout_s":7}"#);
}

#[test]
fn test_error_json_becomes_api_error() {
    let (c, _rx, _d) = serve_once(http(
        "404 Not Found",
        "Content-Type: application/json\r\n",
        r#"{"code":"not-found","message":"No VM named \"x\""}"#,
    ));

    let err = c.get_vm("x").unwrap_err();

    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert_eq!(err.to_string(), "No VM named \"x\"");
    assert!(matches!(err, ClientError::Api { status: 404, .. }));
}

#[test]
fn test_non_json_error_keeps_status_and_text() {
    let (c, _rx, _d) = serve_once(http("500 Oops", "", "boom"));

    let err = c.list_vms().unwrap_err();

    assert_eq!(err.code(), Some(ErrorCode::Internal));
    assert!(err.to_string().contains("500"), "{err}");
    assert!(err.to_string().contains("boom"), "{err}");
}

#[test]
fn test_delete_with_force_reads_204_without_body() {
    let (c, rx, _d) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec());

    c.delete_vm("a", true).unwrap();

    let (head, _) = rx.recv().unwrap();
    assert!(
        head.starts_with("DELETE /v1/vms/a?force=true HTTP/1.1\r\n"),
        "{head}"
    );
}

#[test]
fn test_chunked_body_is_decoded() {
    let body = format!("[{}]", info_json("c"));
    let (a, b) = body.split_at(10);
    let reply = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: y\r\n\r\n",
        a.len(),
        b.len()
    );
    let (c, _rx, _d) = serve_once(reply.into_bytes());

    let vms = c.list_vms().unwrap();

    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].spec.name, "c");
}

#[test]
fn test_body_until_close_without_length() {
    let (c, _rx, _d) = serve_once(b"HTTP/1.1 200 OK\r\n\r\nhello log".to_vec());

    assert_eq!(c.console_log("a", Some(5)).unwrap(), b"hello log");
}

#[test]
fn test_truncated_content_length_body_is_an_error() {
    let (c, _rx, _d) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[]".to_vec());

    assert!(matches!(c.list_vms(), Err(ClientError::Io(_))));
}

#[test]
fn test_sse_parser_skips_comments_and_joins_data() {
    let text =
        ": keep-alive\n\nid: 1\nevent: vm\ndata: a\ndata: b\n\n:\r\nid: 2\r\ndata: c\r\n\r\n";
    let mut r = SseReader::new(text.as_bytes());

    let m1 = r.next_message().unwrap().unwrap();
    let m2 = r.next_message().unwrap().unwrap();

    assert_eq!(
        m1,
        SseMessage {
            id: Some("1".into()),
            event: "vm".into(),
            data: "a\nb".into()
        }
    );
    assert_eq!(m2.id.as_deref(), Some("2"));
    assert_eq!(m2.event, "message");
    assert_eq!(m2.data, "c");
    assert_eq!(r.next_message().unwrap(), None);
}

#[test]
fn test_events_stream_over_chunked_sse() {
    let ev = r#"{"id":3,"at_ms":9,"vm":"a","kind":"running","detail":""}"#;
    let chunk1 = ":\n\n".to_string();
    let chunk2 = format!("id: 3\nevent: vm\ndata: {ev}\n\n");
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk1}\r\n{:x}\r\n{chunk2}\r\n0\r\n\r\n",
        chunk1.len(),
        chunk2.len()
    );
    let (c, rx, _d) = serve_once(reply.into_bytes());

    let events: Vec<Event> = c.events().unwrap().map(|e| e.unwrap()).collect();

    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "running");
    assert_eq!(events[0].id, 3);
    let (head, _) = rx.recv().unwrap();
    assert!(head.starts_with("GET /v1/events HTTP/1.1\r\n"));
}

#[test]
fn test_console_upgrade_returns_the_raw_stream() {
    let reply = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ferrite-console\r\n\r\nearly".to_vec();
    let (c, rx, _d) = serve_once(reply);

    let (mut s, pending) = c.console("vm1").unwrap();
    s.write_all(b"ping").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let mut all = pending;
    all.extend(rest);

    assert_eq!(all, b"earlyping");
    let (head, _) = rx.recv().unwrap();
    assert!(head.starts_with("GET /v1/vms/vm1/console HTTP/1.1\r\n"));
    assert!(head.contains("Connection: Upgrade\r\n"));
    assert!(!head.contains("Connection: close"));
}

#[test]
fn test_console_refusal_is_an_api_error() {
    let (c, _rx, _d) = serve_once(http(
        "409 Conflict",
        "",
        r#"{"code":"conflict","message":"VM is stopped"}"#,
    ));

    let err = c.console("a").unwrap_err();

    assert_eq!(err.code(), Some(ErrorCode::Conflict));
}

#[test]
fn test_missing_socket_is_unreachable_with_hint() {
    let c = Client::new("/nonexistent/ferrited.sock");

    let err = c.list_vms().unwrap_err();

    assert!(matches!(err, ClientError::Unreachable { .. }));
    assert_eq!(
        err.to_string(),
        "Cannot reach ferrited at /nonexistent/ferrited.sock: is it running? (start it with `ferrited`, or set --socket / FERRITE_SOCKET)"
    );
}

#[test]
fn test_read_head_skips_100_continue() {
    let mut r: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: b\r\n\r\n";

    let (status, headers) = read_head(&mut r).unwrap();

    assert_eq!(status, 200);
    assert_eq!(headers, vec![("x-a".to_string(), "b".to_string())]);
}
