//! What the Linux boot tests share: the guest configuration, the boot milestones we time, and
//! the checks that the kernel's own report of the platform matches what Ferrite built.
//!
//! The Debian cloud kernel runs only under emulation on our development machines (see
//! `../shared/kvm-on-our-machines.md`, "Linux guests here"), so every run is bounded by a
//! budget and asserts on what the kernel printed by then.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use arch::e820::{E820Type, MemoryLayout};
use arch::layout::{ACPI_TABLES_END, ACPI_TABLES_START, PCI_ECAM_START};

use crate::common::stream::{StreamedRun, TimedLine};

/// Guest RAM of every Linux test, as passed to `--memory`.
pub const MEMORY: &str = "512M";
/// Guest RAM in bytes (must equal [`MEMORY`]).
pub const MEMORY_BYTES: u64 = 512 << 20;
/// vCPUs of every Linux test.
pub const CPUS: &str = "2";

/// The command line that gets the Debian kernel furthest under emulation: no SSE/crypto code
/// paths the emulator cannot run, no crypto self-tests, no TSC calibration, no lockup
/// detectors (emulated code is slow enough to trip them). `panic=-1` with `--no-reboot` turns
/// a kernel panic into a prompt exit instead of a hang.
pub const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 nokaslr noxsave \
clearcpuid=cx16,popcnt,rdtscp,invpcid,pcid,smap,pku,pni,ssse3,sse4_1,sse4_2,aes,pclmulqdq,sha_ni,gfni,vaes,vpclmulqdq \
cryptomgr.notests mitigations=off lpj=10384576 tsc=reliable no_timer_check nowatchdog panic=-1 \
ferrite.init=poweroff";

/// PCI vendor:device of a modern virtio-blk function (virtio 1.x: 0x1040 + device type 2).
pub const VIRTIO_BLK_PCI_ID: &str = "[1af4:1042]";

/// PCI vendor:device of every modern virtio function Ferrite can attach, as Linux prints
/// them when it enumerates bus 0 (`pci 0000:00:0N.0: [1af4:1041] type 00 class ...`).
pub const VIRTIO_NET_PCI_ID: &str = "[1af4:1041]";
/// virtio-console (type 3).
pub const VIRTIO_CONSOLE_PCI_ID: &str = "[1af4:1043]";
/// virtio-rng (type 4).
pub const VIRTIO_RNG_PCI_ID: &str = "[1af4:1044]";
/// virtio-balloon (type 5).
pub const VIRTIO_BALLOON_PCI_ID: &str = "[1af4:1045]";
/// virtio-vsock (type 19).
pub const VIRTIO_VSOCK_PCI_ID: &str = "[1af4:1053]";

/// Console lines after which a Linux run has nothing more to show on these machines: `/init`
/// is reached (its first system call cannot work here) or the kernel gave up.
pub const TERMINAL_LINES: &[&str] = &[
    "Run /init as init process",
    "FERRITE-INITRD-START",
    "Kernel panic",
];

/// Boot milestones whose first appearance is timed and printed (label, console text).
pub const MILESTONES: &[(&str, &str)] = &[
    ("kernel banner", "Linux version"),
    ("e820 map", "BIOS-e820:"),
    ("ACPI RSDP", "ACPI: RSDP"),
    ("CPUs from MADT", "smpboot: Allowing"),
    ("memory ready", "Memory: "),
    ("delay loop (lpj)", "Calibrating delay loop"),
    ("SMP bring-up", "smp: Bringing up secondary CPUs"),
    ("SMP up", "smp: Brought up"),
    ("devtmpfs", "devtmpfs: initialized"),
    ("ACPI interpreter", "ACPI: Interpreter enabled"),
    ("MMCONFIG", "PCI: MMCONFIG for domain"),
    ("PCI root bridge", "PCI Root Bridge"),
    ("virtio-blk on PCI", VIRTIO_BLK_PCI_ID),
    ("clocksource switch", "clocksource: Switched to clocksource"),
    ("initramfs unpack", "Trying to unpack rootfs"),
    ("initramfs freed", "Freeing initrd memory"),
    ("serial driver", "Serial: 8250/16550 driver"),
    ("free init memory", "Freeing unused kernel image"),
    ("run /init", "Run /init as init process"),
    ("initrd marker", "FERRITE-INITRD-START"),
];

/// Console text that means the kernel itself failed. (Lockup-detector reports are not in the
/// list: under emulation a CPU is legitimately "stuck" for seconds, and `nowatchdog` is on.)
const CRASH_MARKERS: &[&str] = &[
    "Kernel panic",
    "Oops:",
    "kernel BUG at",
    "BUG: unable to handle",
    "BUG: kernel NULL pointer dereference",
    "general protection fault",
];

/// A budget in seconds from `var`, or `default_secs`.
pub fn budget(var: &str, default_secs: u64) -> Duration {
    let secs = std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default_secs);
    Duration::from_secs(secs)
}

/// True for a console line after which the run can stop.
pub fn is_terminal(line: &str) -> bool {
    TERMINAL_LINES.iter().any(|marker| line.contains(marker))
}

/// A sparse scratch disk image, removed when dropped.
pub struct ScratchDisk {
    path: PathBuf,
}

impl ScratchDisk {
    /// Creates `size` bytes of zeros (sparse) in the temporary directory.
    pub fn new(name: &str, size: u64) -> Self {
        let path =
            std::env::temp_dir().join(format!("ferrite-test-{}-{}.img", name, std::process::id()));
        let file = std::fs::File::create(&path).expect("create scratch disk");
        file.set_len(size).expect("size scratch disk");
        ScratchDisk { path }
    }

    /// Path of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `ferrite run` arguments for a Linux guest with our standard platform: ACPI and PCI on,
/// [`CPUS`] vCPUs, [`MEMORY`] of RAM, the test initramfs and one virtio-blk disk.
pub fn run_args(kernel: &Path, initrd: &Path, disk: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--kernel",
        path_str(kernel),
        "--initrd",
        path_str(initrd),
        "--cmdline",
        CMDLINE,
        "--cpus",
        CPUS,
        "--memory",
        MEMORY,
        "--disk",
        path_str(disk),
        "--no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("asset paths are UTF-8")
}

/// Print when each milestone first appeared (the boot profile for docs/benchmarks.md).
pub fn print_profile(name: &str, run: &StreamedRun) {
    println!("boot profile of {name} (stopped: {:?}):", run.stop);
    let first_line = run.lines.first().map(|line| line.at.as_secs_f64());
    println!("  {:<22} {:>9}", "first console line", secs(first_line));
    for (label, needle) in MILESTONES {
        let at = run.first(needle).map(|line| line.at.as_secs_f64());
        println!("  {label:<22} {:>9}", secs(at));
    }
    println!(
        "  {:<22} {:>9}  ({} console lines, exit code {:?})",
        "end of run",
        secs(Some(run.output.elapsed.as_secs_f64())),
        run.lines.len(),
        run.output.code
    );
}

fn secs(at: Option<f64>) -> String {
    at.map_or_else(|| "-".to_string(), |s| format!("{s:.1}s"))
}

/// The text after `marker` on a line, trimmed.
fn after<'a>(line: &'a TimedLine, marker: &str) -> Option<&'a str> {
    line.text
        .find(marker)
        .map(|i| line.text[i + marker.len()..].trim())
}

/// The `BIOS-e820:` lines Linux prints for the map Ferrite builds for `ram` bytes.
pub fn expected_e820(ram: u64) -> Vec<String> {
    let layout = MemoryLayout::new(ram, None).expect("valid memory size");
    layout
        .e820_entries()
        .iter()
        .map(|entry| {
            let kind = match entry.kind {
                E820Type::Ram => "usable",
                E820Type::Reserved => "reserved",
                E820Type::Acpi => "ACPI data",
            };
            format!(
                "[mem {:#018x}-{:#018x}] {kind}",
                entry.addr,
                entry.addr + entry.size - 1
            )
        })
        .collect()
}

/// The `BIOS-e820:` lines the kernel printed, each once, in order.
pub fn printed_e820(run: &StreamedRun) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for line in run.all("BIOS-e820:") {
        if let Some(rest) = after(line, "BIOS-e820:") {
            if !seen.iter().any(|s| s == rest) {
                seen.push(rest.to_string());
            }
        }
    }
    seen
}

/// Fail with the console tail if the kernel crashed or Ferrite died before `budget_end`.
pub fn assert_no_crash(run: &StreamedRun) {
    for marker in CRASH_MARKERS {
        if let Some(line) = run.first(marker) {
            panic!(
                "the kernel crashed at {:.1}s: {}\n--- console tail ---\n{}\n--- ferrite stderr ---\n{}",
                line.at.as_secs_f64(),
                line.text,
                run.tail(40),
                run.output.stderr
            );
        }
    }
}

/// Fail if `needle` never appeared, showing the console tail and Ferrite's stderr.
pub fn require<'a>(run: &'a StreamedRun, needle: &str) -> &'a TimedLine {
    run.first(needle).unwrap_or_else(|| {
        panic!(
            "the kernel never printed {needle:?} (run stopped: {:?}, exit {:?})\n--- console tail ---\n{}\n--- ferrite stderr ---\n{}",
            run.stop,
            run.output.code,
            run.tail(40),
            run.output.stderr
        )
    })
}

/// The kernel's early report of the platform equals what Ferrite built: the banner, the exact
/// e820 map, the ACPI tables (RSDP where Ferrite writes it), the vCPU count from the MADT and
/// the amount of RAM.
pub fn assert_early_platform(run: &StreamedRun) {
    require(run, "Linux version");

    assert_eq!(
        printed_e820(run),
        expected_e820(MEMORY_BYTES),
        "the kernel's e820 map differs from the one Ferrite built"
    );

    let rsdp = require(run, "ACPI: RSDP ");
    let addr = after(rsdp, "ACPI: RSDP ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("unparsable RSDP line: {}", rsdp.text));
    assert!(
        (ACPI_TABLES_START..ACPI_TABLES_END).contains(&addr),
        "RSDP at {addr:#x}, outside Ferrite's ACPI area: {}",
        rsdp.text
    );
    for table in [
        "ACPI: XSDT ",
        "ACPI: FACP ",
        "ACPI: DSDT ",
        "ACPI: APIC ",
        "ACPI: MCFG ",
    ] {
        require(run, table);
    }

    let cpus = require(run, "smpboot: Allowing");
    assert!(
        cpus.text.contains(&format!("Allowing {CPUS} CPUs")),
        "the kernel found another CPU count than --cpus {CPUS}: {}",
        cpus.text
    );

    let memory = require(run, "Memory: ");
    let total_kib = after(memory, "Memory: ")
        .and_then(|rest| rest.split('/').nth(1))
        .and_then(|total| total.split('K').next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("unparsable Memory line: {}", memory.text));
    let usable_kib: u64 = MemoryLayout::new(MEMORY_BYTES, None)
        .expect("valid memory size")
        .e820_entries()
        .iter()
        .filter(|entry| entry.kind == E820Type::Ram)
        .map(|entry| entry.size / 1024)
        .sum();
    // Linux keeps the first page and rounds the low range down to whole pages.
    assert!(
        total_kib <= usable_kib && total_kib + 1024 >= usable_kib,
        "the kernel manages {total_kib} KiB, Ferrite's e820 gives {usable_kib} KiB usable: {}",
        memory.text
    );
}

/// The later platform lines, checked only as far as the boot got: both vCPUs came up, the
/// MMCONFIG window is Ferrite's ECAM and was accepted, the virtio-blk function enumerated.
pub fn assert_late_platform_so_far(run: &StreamedRun) {
    if let Some(line) = run.first("smp: Brought up") {
        assert!(
            line.text.contains(&format!("{CPUS} CPUs")),
            "not all vCPUs came up: {}",
            line.text
        );
    }
    if let Some(line) = run.first("PCI: MMCONFIG for domain") {
        let base = format!("{PCI_ECAM_START:#x}");
        assert!(
            line.text.contains(&base),
            "MMCONFIG is not Ferrite's ECAM at {base}: {}",
            line.text
        );
        if let Some(rejected) = run.first("not using MMCONFIG") {
            panic!("the kernel rejected the ECAM window: {}", rejected.text);
        }
    }
    // ACPI scans the PCI root bus in a subsys initcall; the clocksource switch is an fs
    // initcall, so once it is printed the enumeration is complete.
    if run.first("clocksource: Switched to clocksource").is_some() {
        require(run, VIRTIO_BLK_PCI_ID);
    }
}

/// The PCI functions of `run` (the `[vendor:device]` part of Linux's
/// `pci 0000:00:0N.0: [1af4:1042] type 00 class ...` lines), each once, in bus order.
pub fn enumerated_pci_ids(run: &StreamedRun) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for line in run.all("pci 0000:00:") {
        let id = line
            .text
            .split_whitespace()
            .find(|w| {
                w.len() == 11 && w.starts_with('[') && w.ends_with(']') && w.as_bytes()[5] == b':'
            })
            .map(str::to_string);
        if let Some(id) = id {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// Lines the kernel prints only after the ACPI scan of the PCI root bus (a subsys initcall):
/// the IRQ-routing choice of `pci_subsys_init` (later in the same initcall level, ~50 console
/// lines after the scan) and the clocksource switch (an fs initcall).
pub const PCI_SCAN_DONE_LINES: &[&str] = &[
    "PCI: Using ACPI for IRQ routing",
    "clocksource: Switched to clocksource",
];

/// Once PCI enumeration is complete (see [`PCI_SCAN_DONE_LINES`]), every function in
/// `expected` (`[1af4:DDDD]`) was enumerated. Only
/// the enumeration is asserted: whether the virtio drivers bind depends on their modules
/// loading from the initramfs, which needs userspace, and Linux userspace cannot run on
/// these hosts (its first `syscall` never reaches CPL0). Returns false if the run stopped
/// before enumeration was complete (nothing asserted then).
pub fn assert_virtio_functions_enumerated(run: &StreamedRun, expected: &[&str]) -> bool {
    if PCI_SCAN_DONE_LINES.iter().all(|l| run.first(l).is_none()) {
        return false;
    }
    let found = enumerated_pci_ids(run);
    for id in expected {
        assert!(
            found.iter().any(|f| f == id),
            "Linux did not enumerate the virtio function {id}; it found {found:?}\n--- pci lines ---\n{}",
            run.all("pci 0000:00:")
                .map(|l| l.text.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    true
}
