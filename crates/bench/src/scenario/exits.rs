//! Exits handled per second: the guest's `bench-pio N` and `bench-mmio N` commands, timed by
//! the guest (its `ns=` answer field) and by the host (arrival of the answer line minus arrival
//! of the line before it).

use std::time::Instant;

use crate::child::{CommandSpec, VmmProcess};
use crate::error::{BenchError, Result};
use crate::scenario::{wait_ready, RunConfig};

/// Exit rates of one boot, in exits per second.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitSample {
    /// `bench-pio`: N / guest-measured time.
    pub pio_guest: f64,
    /// `bench-pio`: N / host wall time between console lines.
    pub pio_host: f64,
    /// `bench-mmio`: N / guest-measured time.
    pub mmio_guest: f64,
    /// `bench-mmio`: N / host wall time between console lines.
    pub mmio_host: f64,
}

/// A parsed `OK bench-xxx n=N tsc=CYCLES ns=NANOS` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchAnswer {
    /// Operations the guest did.
    pub n: u64,
    /// Guest-measured duration in nanoseconds.
    pub ns: u64,
}

/// Parse the answer to `cmd` (`bench-pio` or `bench-mmio`).
pub fn parse_answer(cmd: &str, line: &str) -> Result<BenchAnswer> {
    let mut words = line.split_whitespace();
    if words.next() != Some("OK") || words.next() != Some(cmd) {
        return Err(BenchError::CommandRefused {
            cmd: cmd.to_string(),
            line: line.to_string(),
        });
    }
    let mut n = None;
    let mut ns = None;
    for word in words {
        match word.split_once('=') {
            Some(("n", v)) => n = v.parse::<u64>().ok(),
            Some(("ns", v)) => ns = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    match (n, ns) {
        (Some(n), Some(ns)) if n > 0 && ns > 0 => Ok(BenchAnswer { n, ns }),
        _ => Err(BenchError::MalformedAnswer(line.to_string())),
    }
}

/// Is `line` the guest's answer (OK or error) to `cmd`?
fn answers(cmd: &str, line: &str) -> bool {
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or("");
    (first == "OK" || first.starts_with("ERR")) && line.contains(cmd)
}

/// Boot the guest with `bench-pio N; bench-mmio M; poweroff` and compute the rates.
pub fn exits_once(command: &dyn Fn(&str) -> CommandSpec, cfg: &RunConfig) -> Result<ExitSample> {
    let cmds = format!(
        "bench-pio {};bench-mmio {};poweroff",
        cfg.pio_count, cfg.mmio_count
    );
    let mut p = VmmProcess::spawn(&command(&cfg.cmdline(&cmds)), cfg.hard_timeout)?;
    let ready = wait_ready(&mut p, cfg)?;
    let (pio_guest, pio_host, after_pio) = run_one(&mut p, cfg, "bench-pio", ready.at)?;
    let (mmio_guest, mmio_host, _) = run_one(&mut p, cfg, "bench-mmio", after_pio)?;
    p.kill();
    Ok(ExitSample {
        pio_guest,
        pio_host,
        mmio_guest,
        mmio_host,
    })
}

/// Wait for `cmd`'s answer; returns (guest rate, host rate, answer arrival).
fn run_one(
    p: &mut VmmProcess,
    cfg: &RunConfig,
    cmd: &str,
    last_seen: Instant,
) -> Result<(f64, f64, Instant)> {
    let deadline = Instant::now() + cfg.command_timeout;
    let (line, previous) = p.wait_line(deadline, &format!("the answer to {cmd}"), |l| {
        answers(cmd, l)
    })?;
    let answer = parse_answer(cmd, &line.text)?;
    let began = previous.unwrap_or(last_seen);
    let wall = line.at.saturating_duration_since(began).as_secs_f64();
    if wall <= 0.0 {
        return Err(BenchError::MalformedAnswer(format!(
            "{} arrived together with the line before it",
            line.text
        )));
    }
    let n = answer.n as f64;
    Ok((n / (answer.ns as f64 / 1e9), n / wall, line.at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::test_support::{config, sh};

    #[test]
    fn test_parse_answer_all_fields() {
        // Arrange
        let line = "OK bench-pio n=1000 tsc=5000000 ns=2000000";

        // Act
        let a = parse_answer("bench-pio", line).expect("parsed");

        // Assert
        assert_eq!(
            a,
            BenchAnswer {
                n: 1000,
                ns: 2_000_000
            }
        );
    }

    #[test]
    fn test_parse_answer_err_line_refused() {
        // Arrange
        let line = "ERR bench-mmio unknown command";

        // Act
        let r = parse_answer("bench-mmio", line);

        // Assert
        assert!(matches!(r, Err(BenchError::CommandRefused { .. })));
    }

    #[test]
    fn test_parse_answer_missing_ns_malformed() {
        // Arrange
        let line = "OK bench-pio n=10 tsc=5";

        // Act
        let r = parse_answer("bench-pio", line);

        // Assert
        assert!(matches!(r, Err(BenchError::MalformedAnswer(_))));
    }

    #[test]
    fn test_exits_once_fake_guest_rates_from_both_clocks() {
        // Arrange
        let vmm = sh("echo 'FERRITE-TESTGUEST READY'; sleep 0.1; \
             echo 'OK bench-pio n=1000 tsc=1 ns=1000000'; sleep 0.1; \
             echo 'OK bench-mmio n=500 tsc=1 ns=1000000'; echo 'OK poweroff'");
        let cfg = config();

        // Act
        let s = exits_once(&vmm, &cfg).expect("rates");

        // Assert
        assert_eq!(s.pio_guest, 1_000_000.0);
        assert_eq!(s.mmio_guest, 500_000.0);
        assert!(s.pio_host > 0.0 && s.pio_host < 1000.0 / 0.05);
        assert!(s.mmio_host > 0.0 && s.mmio_host < 500.0 / 0.05);
    }

    #[test]
    fn test_exits_once_guest_without_command_refused() {
        // Arrange
        let vmm = sh("echo 'FERRITE-TESTGUEST READY'; echo 'ERR bench-pio: unknown command'");
        let cfg = config();

        // Act
        let r = exits_once(&vmm, &cfg);

        // Assert
        assert!(matches!(r, Err(BenchError::CommandRefused { .. })));
    }
}
