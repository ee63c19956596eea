//! End-to-end `ferrite run` behaviour with tiny hand-assembled PVH guests: serial output,
//! power-off, reboot with --no-reboot, triple fault, host stop, and stdin delivery/EOF.
//!
//! Each guest is a few bytes of 32-bit code (PVH entry: protected mode, paging off) wrapped in
//! a minimal ELF with a Xen PHYS32_ENTRY note.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LOAD_ADDR: u64 = 0x10_0000;
const TIMEOUT: Duration = Duration::from_secs(60);

/// A minimal ELF64 executable: one PT_LOAD with `code` at 1 MiB and a PT_NOTE with the PVH
/// entry pointing at its first byte.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let code_off = 0x1000u64;
    let note_off = 0xb0u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());

    let mut elf = vec![0u8; code_off as usize];
    // e_ident
    elf[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let put16 =
        |e: &mut Vec<u8>, off: usize, v: u16| e[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |e: &mut Vec<u8>, off: usize, v: u32| e[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |e: &mut Vec<u8>, off: usize, v: u64| e[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut elf, 16, 2); // ET_EXEC
    put16(&mut elf, 18, 0x3e); // x86_64
    put32(&mut elf, 20, 1);
    put64(&mut elf, 24, LOAD_ADDR); // e_entry
    put64(&mut elf, 32, 64); // e_phoff
    put16(&mut elf, 52, 64); // e_ehsize
    put16(&mut elf, 54, 56); // e_phentsize
    put16(&mut elf, 56, 2); // e_phnum
                            // PT_LOAD
    let ph = 64;
    put32(&mut elf, ph, 1);
    put32(&mut elf, ph + 4, 5);
    put64(&mut elf, ph + 8, code_off);
    put64(&mut elf, ph + 16, LOAD_ADDR);
    put64(&mut elf, ph + 24, LOAD_ADDR);
    put64(&mut elf, ph + 32, code.len() as u64);
    put64(&mut elf, ph + 40, code.len() as u64);
    put64(&mut elf, ph + 48, 0x1000);
    // PT_NOTE
    let ph = 64 + 56;
    put32(&mut elf, ph, 4);
    put32(&mut elf, ph + 4, 4);
    put64(&mut elf, ph + 8, note_off);
    put64(&mut elf, ph + 32, note.len() as u64);
    put64(&mut elf, ph + 40, note.len() as u64);
    put64(&mut elf, ph + 48, 4);
    elf[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
    elf.extend_from_slice(code);
    elf
}

/// 32-bit code: write each byte of `text` to COM1.
fn print(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in text {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// 32-bit code: ACPI S5 through PM1a_CNT (SLP_TYP=5, SLP_EN).
fn power_off() -> Vec<u8> {
    vec![
        0x66, 0xba, 0x04, 0x06, // mov dx, 0x604
        0x66, 0xb8, 0x00, 0x34, // mov ax, 0x3400
        0x66, 0xef, // out dx, ax
        0xf4, 0xeb, 0xfd, // hlt; jmp hlt
    ]
}

/// 32-bit code: spin forever.
fn spin() -> Vec<u8> {
    vec![0xeb, 0xfe]
}

/// 32-bit code: print `text` on COM1, then power off.
fn print_then_power_off(text: &[u8]) -> Vec<u8> {
    let mut code = print(text);
    code.extend(power_off());
    code
}

/// Write `code` as a PVH guest into a fresh directory named after `tag`. Returns the
/// directory (for other test files) and the kernel path.
fn write_guest(tag: &str, code: &[u8]) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("ferrite-cli-boot-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tempdir");
    let path = dir.join("guest");
    std::fs::write(&path, pvh_elf(code)).expect("write guest");
    let kernel = path.to_str().expect("utf-8 path").to_string();
    (dir, kernel)
}

/// `ferrite run --kernel KERNEL EXTRA...` to completion (with the common watchdog).
fn run_guest(kernel: &str, extra: &[&str]) -> common::RunOutput {
    let mut args = vec!["run", "--kernel", kernel];
    args.extend_from_slice(extra);
    common::run_ferrite(&args, TIMEOUT)
}

/// Start `ferrite run --kernel KERNEL EXTRA...` with piped stdout/stderr, for tests that talk
/// to the guest while it runs.
fn spawn_guest(kernel: &str, extra: &[&str], stdin: Stdio) -> Child {
    common::require_kvm();
    Command::new(common::ferrite_bin())
        .args(["run", "--kernel", kernel])
        .args(extra)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Wait for `child` to exit; returns its exit code and everything it wrote to stderr.
fn wait_with_stderr(mut child: Child) -> (Option<i32>, String) {
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status.code(), stderr)
}

/// Read `stdout` until `needle` has appeared `count` times in `seen`.
fn read_until_count(stdout: &mut impl Read, seen: &mut String, needle: &str, count: usize) {
    let mut buf = [0u8; 64];
    while seen.matches(needle).count() < count {
        let n = stdout.read(&mut buf).expect("read stdout");
        assert!(n > 0, "ferrite exited early; output so far: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

fn host_emulates_kernel_code() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn test_run_pvh_guest_prints_and_powers_off_with_status_0() {
    let (_, kernel) = write_guest("poweroff", &print_then_power_off(b"OK\n"));

    let out = run_guest(&kernel, &[]);

    assert!(!out.timed_out, "timed out: {out:?}");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("OK"), "{out:?}");
}

#[test]
fn test_run_with_4_cpus_and_2g_powers_off() {
    let (_, kernel) = write_guest("smp", &print_then_power_off(b"SMP\n"));

    let out = run_guest(&kernel, &["--cpus", "4", "--memory", "2G"]);

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("SMP"), "{out:?}");
}

#[test]
fn test_run_guest_reset_with_no_reboot_exits_3() {
    let mut code = print(b"R\n");
    // i8042 pulse reset: mov al, 0xfe; out 0x64, al; then spin.
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let (_, kernel) = write_guest("reset", &code);

    let out = run_guest(&kernel, &["--no-reboot"]);

    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("rebooted"), "{out:?}");
}

#[test]
fn test_run_triple_fault_exits_1_with_register_dump() {
    // ud2 with an empty IDT: #UD → #DF → triple fault.
    let (_, kernel) = write_guest("triple", &[0x0f, 0x0b]);

    let out = run_guest(&kernel, &[]);

    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("triple fault"), "{out:?}");
    assert!(out.stderr.contains("rip="), "{out:?}");
    assert!(out.stderr.contains("cr0="), "{out:?}");
    assert!(out.stderr.contains("bytes at rip"), "{out:?}");
}

#[test]
fn test_run_sigterm_stops_vm_with_status_4() {
    let mut code = print(b"READY\n");
    code.extend(spin());
    let (_, kernel) = write_guest("sigterm", &code);
    let mut child = spawn_guest(&kernel, &[], Stdio::null());
    // Wait for the guest to be running.
    let mut stdout = child.stdout.take().expect("stdout");
    read_until_count(&mut stdout, &mut String::new(), "READY", 1);

    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (code, stderr) = wait_with_stderr(child);

    assert_eq!(code, Some(4), "stderr: {stderr}");
    assert!(stderr.contains("SIGTERM"), "stderr: {stderr}");
}

/// 32-bit code: wait for a byte on COM1; 'q' powers off, anything else is echoed.
fn echo_until_q() -> Vec<u8> {
    let mut c = vec![
        // poll: mov dx, 0x3fd; in al, dx; test al, 1; jz poll
        0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7,
        // mov dx, 0x3f8; in al, dx; cmp al, 'q'; je off
        0x66, 0xba, 0xf8, 0x03, 0xec, 0x3c, b'q', 0x74, 0x03,
        // out dx, al; jmp poll (back to the start: -21)
        0xee, 0xeb, 0xeb,
    ];
    c.extend(power_off());
    c
}

#[test]
fn test_run_stdin_bytes_reach_guest_and_eof_keeps_vm_running() {
    let (_, kernel) = write_guest("stdin", &echo_until_q());
    let mut child = spawn_guest(&kernel, &[], Stdio::piped());
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hello q").expect("write stdin");
        // Dropping stdin closes it: EOF must not stop the VM before the guest reads 'q'.
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    let status = child.wait().expect("wait");

    assert_eq!(status.code(), Some(0));
    assert!(stdout.contains("hello "), "stdout: {stdout:?}");
}

/// 32-bit code that installs an IDT gate for `vector` (handler prints "B" and returns with
/// `iretd`), executes `trigger`, prints "A" and powers off. Expected output: "BA".
fn idt_guest(trigger: &[u8], vector: u8) -> Vec<u8> {
    const IDT: u32 = 0x2000;
    let gate = IDT + u32::from(vector) * 8;
    let mut c = vec![0xbc, 0x00, 0x80, 0x00, 0x00]; // mov esp, 0x8000
    let handler_fix = c.len() + 1;
    c.extend_from_slice(&[0xb8, 0, 0, 0, 0]); // mov eax, handler
    c.extend_from_slice(&[0x66, 0xa3]); // mov [gate], ax
    c.extend_from_slice(&gate.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xc7, 0x05]); // mov word [gate+2], 0x0008
    c.extend_from_slice(&(gate + 2).to_le_bytes());
    c.extend_from_slice(&[0x08, 0x00]);
    c.extend_from_slice(&[0x66, 0xc7, 0x05]); // mov word [gate+4], 0x8e00
    c.extend_from_slice(&(gate + 4).to_le_bytes());
    c.extend_from_slice(&[0x00, 0x8e]);
    c.extend_from_slice(&[0xc1, 0xe8, 0x10]); // shr eax, 16
    c.extend_from_slice(&[0x66, 0xa3]); // mov [gate+6], ax
    c.extend_from_slice(&(gate + 6).to_le_bytes());
    let idtr_fix = c.len() + 3;
    c.extend_from_slice(&[0x0f, 0x01, 0x1d, 0, 0, 0, 0]); // lidt [idtr]
    c.extend_from_slice(trigger);
    c.extend(print(b"A\n"));
    c.extend(power_off());
    let handler = LOAD_ADDR as u32 + c.len() as u32;
    c.extend(print(b"B"));
    c.push(0xcf); // iretd
    let idtr = LOAD_ADDR as u32 + c.len() as u32;
    c.extend_from_slice(&0x7ffu16.to_le_bytes());
    c.extend_from_slice(&IDT.to_le_bytes());
    c[handler_fix..handler_fix + 4].copy_from_slice(&handler.to_le_bytes());
    c[idtr_fix..idtr_fix + 4].copy_from_slice(&idtr.to_le_bytes());
    c
}

#[test]
fn test_run_int3_in_guest_kernel_reaches_its_handler() {
    let (_, kernel) = write_guest("int3", &idt_guest(&[0xcc], 3));

    let out = run_guest(&kernel, &["--stats"]);

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("BA"), "{out:?}");
    if host_emulates_kernel_code() {
        assert!(out.stderr.contains("int3=1"), "{out:?}");
    }
}

#[test]
fn test_run_int_0x80_in_guest_kernel_reaches_its_handler() {
    let (_, kernel) = write_guest("int80", &idt_guest(&[0xcd, 0x80], 0x80));

    let out = run_guest(&kernel, &["--stats"]);

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("BA"), "{out:?}");
}

#[test]
fn test_run_repair_off_on_emulating_host_fails_with_instruction_bytes() {
    let (_, kernel) = write_guest("repairoff", &idt_guest(&[0xcc], 3));

    let out = run_guest(&kernel, &["--repair-emulation", "off"]);

    if host_emulates_kernel_code() {
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains("repair is off"), "{out:?}");
        assert!(out.stderr.contains("bytes at rip: cc"), "{out:?}");
    } else {
        assert_eq!(out.code, Some(0), "{out:?}");
    }
}

/// 32-bit code: print "R", then wait for a COM1 byte: 'p' powers off, 'r' resets (i8042).
fn reset_or_power_off() -> Vec<u8> {
    let mut c = print(b"R\n");
    c.extend_from_slice(&[
        0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7, // poll LSR.DR
        0x66, 0xba, 0xf8, 0x03, 0xec, // in al, 0x3f8
        0x3c, b'p', 0x74, 0x0a, // cmp al, 'p'; je off
        0x3c, b'r', 0x75, 0xea, // cmp al, 'r'; jne poll
        0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe, // i8042 reset; spin
    ]);
    c.extend(power_off());
    c
}

#[test]
fn test_run_guest_reset_restarts_vm_in_the_same_process() {
    use std::io::Write;
    let (_, kernel) = write_guest("reboot", &reset_or_power_off());
    let mut child = spawn_guest(&kernel, &["--stats"], Stdio::piped());
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();

    read_until_count(&mut stdout, &mut seen, "R", 1);
    stdin.write_all(b"r").expect("write");
    read_until_count(&mut stdout, &mut seen, "R", 2);
    stdin.write_all(b"p").expect("write");
    let (code, stderr) = wait_with_stderr(child);

    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stderr.contains("reboots: 1"), "stderr: {stderr}");
}

#[test]
fn test_run_64_vcpus_and_16g_memory_boot() {
    let (_, kernel) = write_guest("big", &print_then_power_off(b"BIG\n"));

    let out = run_guest(&kernel, &["--cpus", "64", "--memory", "16G"]);

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("BIG"), "{out:?}");
}

#[test]
fn test_run_with_disks_attached_powers_off() {
    let (dir, kernel) = write_guest("disks", &print_then_power_off(b"D\n"));
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    std::fs::write(&a, vec![0u8; 1 << 20]).expect("disk a");
    std::fs::write(&b, vec![0u8; 1 << 20]).expect("disk b");
    let b_spec = format!("{},readonly,id=data", b.display());

    let out = run_guest(
        &kernel,
        &["--disk", a.to_str().expect("utf-8 path"), "--disk", &b_spec],
    );

    assert_eq!(out.code, Some(0), "{out:?}");
}

#[test]
fn test_run_string_port_output_reaches_serial_byte_by_byte() {
    let msg = b"HELLO\n";
    let mut code = vec![0xbe, 0, 0, 0, 0]; // mov esi, msg
    code.extend_from_slice(&[0xb9, msg.len() as u8, 0, 0, 0]); // mov ecx, len
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    code.extend(power_off());
    let msg_addr = LOAD_ADDR as u32 + code.len() as u32;
    code[1..5].copy_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(msg);
    let (_, kernel) = write_guest("outsb", &code);

    let out = run_guest(&kernel, &[]);

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("HELLO"), "{out:?}");
}

#[test]
fn test_run_console_file_receives_guest_output() {
    let (dir, kernel) = write_guest("consolefile", &print_then_power_off(b"TOFILE\n"));
    let log = dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let console = format!("file:{}", log.display());

    let out = run_guest(&kernel, &["--console", &console]);

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("TOFILE"), "{out:?}");
    let logged = std::fs::read_to_string(&log).expect("console log");
    assert!(logged.contains("TOFILE"), "{logged:?}");
}

#[test]
fn test_run_console_none_discards_guest_output() {
    let (_, kernel) = write_guest("consolenone", &print_then_power_off(b"HIDDEN\n"));

    let out = run_guest(&kernel, &["--console", "none"]);

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("HIDDEN"), "{out:?}");
}
