//! CPU time a process (all its threads) has used, from `/proc/PID/task/*/schedstat`.

use std::time::Duration;

/// Sum of the on-CPU time of every thread of `pid`; `None` if the process is gone.
///
/// Threads that exit between listing and reading are skipped; their time is lost, which only
/// matters for a process that starts and stops threads while idle.
pub fn process_cpu_time(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total_ns: u64 = 0;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total_ns = total_ns.saturating_add(parse_schedstat(&text).unwrap_or(0));
    }
    Some(Duration::from_nanos(total_ns))
}

/// First field of a schedstat line: nanoseconds spent on the CPU.
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_schedstat_first_field_ns() {
        // Arrange
        let text = "381516 88192 2\n";

        // Act
        let ns = parse_schedstat(text);

        // Assert
        assert_eq!(ns, Some(381_516));
    }

    #[test]
    fn test_process_cpu_time_own_process_some() {
        // Arrange
        let pid = std::process::id();

        // Act
        let t = process_cpu_time(pid);

        // Assert
        assert!(t.is_some());
    }
}
