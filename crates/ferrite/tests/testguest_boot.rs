//! The test guest (docs/testguest.md) on Ferrite: boot, vCPUs, memory, PCI, time, power
//! control and a console that survives bad input. Each test judges the guest's own answers.

mod common;
mod testguest_common;

use testguest_common::{num, value, GuestRun};

#[test]
fn test_testguest_one_vcpu_boot_sees_one_cpu() {
    // Arrange
    let run = GuestRun {
        cpus: 1,
        ..GuestRun::new(&["cpus", "poweroff"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let cpus = guest.ok("cpus", 0);
    assert_eq!(num(cpus, "madt"), 1, "{cpus}");
    assert_eq!(num(cpus, "started"), 1, "{cpus}");
}

#[test]
fn test_testguest_four_vcpus_boot_starts_all_aps() {
    // Arrange
    let run = GuestRun {
        cpus: 4,
        ..GuestRun::new(&["cpus", "poweroff"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let cpus = guest.ok("cpus", 0);
    assert_eq!(num(cpus, "madt"), 4, "{cpus}");
    assert_eq!(
        num(cpus, "started"),
        4,
        "every AP must reach long mode after INIT-SIPI-SIPI: {cpus}"
    );
}

#[test]
fn test_testguest_128m_memory_reports_128m_ram() {
    // Arrange
    let run = GuestRun {
        memory: "128M",
        ..GuestRun::new(&["mem", "poweroff"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let mem = guest.ok("mem", 0);
    let ram = num(mem, "ram_bytes");
    assert!(ram <= 128 << 20, "more RAM than configured: {mem}");
    assert!(
        ram >= 127 << 20,
        "RAM missing from the PVH memory map: {mem}"
    );
    assert_eq!(value(mem, "probe"), Some("ok"), "{mem}");
    assert!(num(mem, "top") <= 128 << 20, "{mem}");
}

#[test]
fn test_testguest_6g_memory_reports_ram_above_4g() {
    // Arrange
    let run = GuestRun {
        memory: "6G",
        ..GuestRun::new(&["mem", "poweroff"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let mem = guest.ok("mem", 0);
    let ram = num(mem, "ram_bytes");
    assert!(ram <= 6 << 30, "more RAM than configured: {mem}");
    assert!(
        ram >= (6 << 30) - (16 << 20),
        "RAM missing from the PVH memory map: {mem}"
    );
    assert!(
        num(mem, "top") > 4 << 30,
        "RAM beyond 3 GiB must be above 4 GiB: {mem}"
    );
    assert_eq!(
        value(mem, "probe"),
        Some("ok"),
        "top of RAM not writable: {mem}"
    );
    assert!(num(mem, "regions") >= 2, "{mem}");
}

#[test]
fn test_testguest_64_vcpus_and_16g_are_all_seen() {
    // Arrange
    let run = GuestRun {
        cpus: 64,
        memory: "16G",
        ..GuestRun::new(&["cpus", "mem", "poweroff"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let cpus = guest.ok("cpus", 0);
    assert_eq!(num(cpus, "madt"), 64, "{cpus}");
    assert_eq!(num(cpus, "started"), 64, "{cpus}");
    let mem = guest.ok("mem", 0);
    let ram = num(mem, "ram_bytes");
    assert!(((16 << 30) - (16 << 20)..=16 << 30).contains(&ram), "{mem}");
    assert_eq!(
        value(mem, "probe"),
        Some("ok"),
        "top of RAM not writable: {mem}"
    );
}

#[test]
fn test_testguest_poweroff_exits_with_status_zero() {
    // Arrange
    let run = GuestRun::new(&["echo bye", "poweroff", "echo after"]);

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    assert_eq!(guest.ok("echo", 0), "OK echo bye");
    assert!(
        !guest.lines().any(|l| l.contains("after")),
        "ran past poweroff: {}",
        guest.context()
    );
}

#[test]
fn test_testguest_reboot_with_no_reboot_exits_with_reboot_status() {
    // Arrange
    let run = GuestRun {
        extra: &["--no-reboot"],
        ..GuestRun::new(&["reboot", "echo after"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_healthy();
    assert_eq!(guest.ok("reboot", 0), "OK reboot");
    assert!(
        !guest.lines().any(|l| l.contains("OK echo after")),
        "ran past reboot: {}",
        guest.context()
    );
    assert_eq!(
        guest.out.code,
        Some(3),
        "--no-reboot reboot must exit with 3: {}",
        guest.context()
    );
}

#[test]
fn test_testguest_malformed_commands_answer_err_and_guest_keeps_running() {
    // Arrange
    let run = GuestRun::new(&[
        "bogus",
        "count",
        "count 12x",
        "count 99999999999999999999999",
        "blk-write 0 0 1 1",
        "blk-check",
        "blk-sum 0 0 0x",
        "mem extra",
        "count 1000",
        "poweroff",
    ]);

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    assert!(guest.err("bogus", 0).contains("unknown-command"));
    assert!(guest.err("count", 0).contains("usage"));
    assert!(guest.err("count", 1).contains("bad-number"));
    assert!(guest.err("count", 2).contains("bad-number"));
    assert!(guest.err("blk-write", 0).contains("no-such-disk"));
    assert!(guest.err("blk-check", 0).contains("usage"));
    assert!(guest.err("blk-sum", 0).contains("bad-number"));
    let count = guest.ok("count", 3);
    assert_eq!(num(count, "value"), 1000, "{count}");
}

#[test]
fn test_testguest_pci_lists_virtio_blk_with_memory_bars() {
    // Arrange
    let disk = testguest_common::ScratchDisk::zeroed("pci", 1 << 20);
    let run = GuestRun {
        disks: vec![disk.arg()],
        ..GuestRun::new(&["pci", "acpi", "poweroff"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let pci = guest.ok("pci", 0);
    assert_eq!(num(pci, "ecam"), 0xe000_0000, "ECAM from the MCFG: {pci}");
    let blk: Vec<&str> = guest
        .details("pci")
        .into_iter()
        .filter(|l| l.contains(" 1af4:1042 "))
        .collect();
    assert_eq!(
        blk.len(),
        1,
        "one virtio-blk function expected: {}",
        guest.context()
    );
    assert!(blk[0].contains("class=010000"), "{}", blk[0]);
    assert!(
        blk[0].contains("=mem"),
        "virtio-blk needs a memory BAR: {}",
        blk[0]
    );
    assert!(
        !blk[0].contains(",assigned"),
        "Ferrite must assign BARs itself: {}",
        blk[0]
    );
    assert_eq!(
        num(pci, "count") as usize,
        guest.details("pci").len(),
        "{pci}"
    );
    let acpi = guest.ok("acpi", 0);
    for table in ["FACP", "APIC", "MCFG"] {
        assert!(
            value(acpi, "tables").is_some_and(|t| t.contains(table)),
            "{table} missing: {acpi}"
        );
    }
}

#[test]
fn test_testguest_time_reports_rtc_date_and_tsc() {
    // Arrange
    let run = GuestRun::new(&["time", "count 100000", "time", "poweroff"]);

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    let first = guest.ok("time", 0);
    let second = guest.ok("time", 1);
    let rtc = value(first, "rtc").expect("rtc=");
    let year: u32 = rtc[..4]
        .parse()
        .unwrap_or_else(|_| panic!("bad rtc in {first}"));
    assert!(year >= 2024, "RTC year from the host clock: {first}");
    assert_eq!(rtc.len(), "YYYY-MM-DDTHH:MM:SS".len(), "{first}");
    assert!(
        num(second, "tsc") > num(first, "tsc"),
        "TSC must advance: {first} / {second}"
    );
    let count = guest.ok("count", 0);
    assert_eq!(num(count, "value"), 100_000, "{count}");
}

#[test]
fn test_testguest_serial_console_input_runs_commands() {
    // Arrange
    let input = [
        "echo typed on the console",
        "",
        "nonsense 1 2 3",
        "cpus",
        "poweroff",
    ];

    // Act
    let guest = testguest_common::run_interactive(2, &input);

    // Assert
    guest.assert_powered_off();
    assert_eq!(guest.ok("echo", 0), "OK echo typed on the console");
    assert!(guest.err("nonsense", 0).contains("unknown-command"));
    guest.ok("cpus", 0);
}

#[test]
fn test_testguest_without_instruction_repair_runs_every_cpl0_path() {
    // Arrange: real-mode AP start-up, services, interrupts, MSI-X and power-off, all with
    // Ferrite's emulation-failure repair off: the guest's CPL0 code must need none.
    let disk = testguest_common::ScratchDisk::zeroed("no-repair", 1 << 20);
    let cmds = [
        "cpus",
        "time",
        "blk-write 0 0 8 1",
        "blk-check 0 0 8 1",
        "irqs",
        "poweroff",
    ];
    let run = GuestRun {
        cpus: 4,
        disks: vec![disk.arg()],
        extra: &["--repair-emulation", "off"],
        ..GuestRun::new(&cmds)
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    assert_eq!(num(guest.ok("cpus", 0), "started"), 4);
    guest.ok("time", 0);
    guest.ok("blk-check", 0);
}

#[test]
fn test_testguest_ram_pattern_fill_then_check_matches() {
    // Arrange
    let run = GuestRun::new(&[
        "mem-fill 77 32",
        "mem-check 77 32",
        "mem-check 78 1",
        "mem-fill 1 4096",
        "poweroff",
    ]);

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    guest.ok("mem-fill", 0);
    assert_eq!(value(guest.ok("mem-check", 0), "result"), Some("match"));
    assert!(guest
        .err("mem-check", 1)
        .contains("mismatch first_bad=0x1000000"));
    assert!(
        guest.err("mem-fill", 1).contains("not-ram"),
        "4 GiB do not fit in 128 MiB"
    );
}

#[test]
fn test_testguest_random_garbage_lines_each_get_one_answer() {
    // Arrange: 200 deterministic lines of random bytes (invalid UTF-8, control bytes, long
    // lines, random numbers after real command names), then a marker and poweroff.
    let mut state = 0x5eed_u64;
    let mut next = || {
        state = state.wrapping_add(1);
        common::pattern::splitmix64(state)
    };
    let names = [
        "blk-write",
        "blk-check",
        "blk-sum",
        "blk-id",
        "time",
        "mem-check",
        "echo",
        "pci",
    ];
    let mut input: Vec<Vec<u8>> = Vec::new();
    for _ in 0..200 {
        let mut line = Vec::new();
        if next() % 2 == 0 {
            line.extend_from_slice(names[(next() % names.len() as u64) as usize].as_bytes());
            for _ in 0..next() % 6 {
                line.push(b' ');
                let word = match next() % 4 {
                    0 => (next() % 100_000).to_string(),
                    1 => format!("{:#x}", next()),
                    2 => "99999999999999999999999".to_string(),
                    _ => format!("{:x}z", next() % 1000),
                };
                line.extend_from_slice(word.as_bytes());
            }
        } else {
            line.push(b'#'); // never blank, so every line gets an answer
            for _ in 0..next() % 400 {
                let b = (next() % 255 + 1) as u8;
                if !matches!(b, b'\r' | b'\n' | 0x08 | 0x7f | 0x01) {
                    line.push(b);
                }
            }
        }
        input.push(line);
    }
    input.push(b"echo garbage-done".to_vec());
    input.push(b"poweroff".to_vec());

    // Act
    let guest = testguest_common::run_interactive(1, &input);

    // Assert
    guest.assert_powered_off();
    let answers = guest.answers();
    assert_eq!(
        answers[answers.len().saturating_sub(2)..],
        ["OK echo garbage-done", "OK poweroff"],
        "{}",
        guest.context()
    );
    assert_eq!(
        guest.answers().len(),
        input.len(),
        "one answer per line: {}",
        guest.context()
    );
}

#[test]
fn test_testguest_reboot_restarts_guest_with_all_cpus() {
    // Arrange
    let input = [
        "cpus",
        "reboot",
        testguest_common::WAIT_READY,
        "cpus",
        "poweroff",
    ];

    // Act
    let guest = testguest_common::run_interactive(2, &input);

    // Assert
    guest.assert_powered_off();
    let readies = guest
        .lines()
        .filter(|l| *l == testguest_common::READY)
        .count();
    assert_eq!(
        readies,
        2,
        "the guest must boot again after reboot: {}",
        guest.context()
    );
    guest.ok("reboot", 0);
    assert_eq!(num(guest.ok("cpus", 0), "started"), 2);
    assert_eq!(
        num(guest.ok("cpus", 1), "started"),
        2,
        "APs must start again after the reset"
    );
}

/// Checks one `OK bench-pio|bench-mmio n=N tsc=CYCLES ns=NANOS` answer: exactly these keys,
/// `n` as asked, all numbers parse. No timing thresholds.
fn assert_bench_answer(line: &str, cmd: &str, n: u64) {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    assert_eq!(words.len(), 5, "answer shape: {line}");
    assert_eq!(&words[..2], &["OK", cmd], "{line}");
    let keys: Vec<&str> = words[2..]
        .iter()
        .map(|w| w.split_once('=').map_or("", |(k, _)| k))
        .collect();
    assert_eq!(keys, ["n", "tsc", "ns"], "{line}");
    assert_eq!(num(line, "n"), n, "{line}");
    num(line, "tsc");
    num(line, "ns");
}

#[test]
fn test_testguest_bench_pio_and_mmio_answer_with_requested_count() {
    // Arrange
    let run = GuestRun::new(&["bench-pio 1000", "bench-mmio 1000", "poweroff"]);

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    assert_bench_answer(guest.ok("bench-pio", 0), "bench-pio", 1000);
    assert_bench_answer(guest.ok("bench-mmio", 0), "bench-mmio", 1000);
}

#[test]
fn test_testguest_bench_bad_counts_answer_err() {
    // Arrange
    let run = GuestRun::new(&[
        "bench-pio 0",
        "bench-pio 10000001",
        "bench-mmio 12x",
        "bench-mmio",
        "bench-pio 1 2",
        "poweroff",
    ]);

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    assert!(guest.err("bench-pio", 0).contains("out-of-range"));
    assert!(guest.err("bench-pio", 1).contains("out-of-range"));
    assert!(guest.err("bench-mmio", 0).contains("bad-number"));
    assert!(guest.err("bench-mmio", 1).contains("usage"));
    assert!(guest.err("bench-pio", 2).contains("usage"));
}

#[test]
fn test_testguest_bench_pio_without_instruction_repair_runs_cpl0_loop() {
    // Arrange: the CPL0 `out`/`dec`/`jnz` loop and its `rdtsc` must need no repair.
    let run = GuestRun {
        extra: &["--repair-emulation", "off"],
        ..GuestRun::new(&["bench-pio 100", "bench-mmio 100", "poweroff"])
    };

    // Act
    let guest = run.run();

    // Assert
    guest.assert_powered_off();
    assert_bench_answer(guest.ok("bench-pio", 0), "bench-pio", 100);
    assert_bench_answer(guest.ok("bench-mmio", 0), "bench-mmio", 100);
}
