//! Post-copy live migration with the test guest: the guest runs on the destination before its
//! memory arrived; the pages it touches are fetched on demand (userfaultfd) while the source
//! pushes the rest. The guest keeps counting and its memory checks out; a connection lost
//! after the switch stops the guest on both sides instead of running it on invented pages.

mod common;
mod testguest_common;

use testguest_common::control::Vm;
use testguest_common::migrate::*;
use testguest_common::{num, WATCHDOG};

#[test]
fn test_postcopy_guest_runs_on_the_destination_at_once_and_its_memory_checks_out() {
    // Arrange: a guest dirtying 32 MiB (every page holds a checkable pattern); nothing is
    // copied before the switch.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("pc-pure", "dirty 32 2000 100");
    let before = src.wait_line("tick n=3 ");
    let mut dst = start_destination("pc-pure-d", &endpoint);

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "postcopy": true}),
    );
    let (status, _) = wait_migration(&mut src);
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    let first = dst.wait_line("tick ");
    let later = dst.wait_line(&format!("tick n={} ", num(&first, "n") + 3));
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let check = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);

    // Assert: handed over after the push; the guest continued from its own values and its
    // memory is whole.
    assert_eq!(src_exit.code(), Some(MIGRATED), "{status} {src_err}");
    assert!(src_err.contains("migrated to tcp:"), "{src_err}");
    assert!(
        num(&first, "value") > num(&before, "value"),
        "{before} / {first}"
    );
    assert!(
        num(&later, "value") > num(&first, "value"),
        "{first} / {later}"
    );
    assert!(check.starts_with("OK dirty-check pages=8192"), "{check}");
}

#[test]
fn test_postcopy_after_a_precopy_round_fetches_only_what_the_guest_wrote_since() {
    // Arrange: one full pass while the guest runs, then the switch.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("pc-hybrid", "dirty 16 4000 100");
    src.wait_line("tick n=3 ");
    let mut dst = start_destination("pc-hybrid-d", &endpoint);

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": endpoint, "postcopy": true, "precopy_rounds": 1}),
    );
    let (status, _) = wait_migration(&mut src);
    let src_exit = src.wait_exit(WATCHDOG);
    dst.wait_line("tick ");
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let check = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);

    // Assert
    assert_eq!(src_exit.code(), Some(MIGRATED), "{status}");
    assert!(check.starts_with("OK dirty-check pages=4096"), "{check}");
}

#[test]
fn test_postcopy_connection_lost_after_the_switch_stops_the_guest_on_both_sides() {
    // Arrange: 64 MiB to push at 8 MiB/s through a proxy that cuts after 4 MiB, well after
    // the switch.
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("pc-cut", "mem-fill 3 64;dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination("pc-cut-d", &endpoint);
    let proxy = cutting_proxy(&endpoint, Cut::SourceBytes(4 << 20));

    // Act
    migrate(
        &mut src,
        serde_json::json!({"to": proxy, "postcopy": true, "bandwidth_mib_s": 8}),
    );
    let (status, _) = wait_migration(&mut src);
    let dst_exit = dst.wait_exit(WATCHDOG);
    let dst_err = stderr_of(&mut dst);
    let stats = src.request(r#"{"op":"stats"}"#);

    // Assert: the destination stopped rather than run on missing pages; the source keeps
    // its stale copy paused and says so.
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("Post-copy failed")),
        "{status}"
    );
    assert_eq!(stats["state"], "paused", "{stats}");
    assert_eq!(dst_exit.code(), Some(1), "{dst_err}");
    assert!(dst_err.contains("post-copy migration failed"), "{dst_err}");
}
