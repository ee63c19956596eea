//! Ferrite test guest: a freestanding PVH guest whose CPL0 part is tiny (paging, IDT,
//! `int3` services, port I/O) and whose real work runs at CPL3. See docs/testguest.md.
#![no_std]
#![no_main]

mod abi;
mod acpi;
mod blkbench;
mod cmd;
mod console;
mod dirty;
mod hostile;
mod kernel;
mod netbench;
mod netstack;
mod pattern;
mod pci;
mod platform;
mod pvh;
mod sys;
mod virtio;
mod virtio_balloon;
mod virtio_blk;
mod virtio_console;
mod virtio_net;
mod virtio_rng;
mod virtio_vsock;

use core::arch::global_asm;

global_asm!(include_str!("boot.s"), options(att_syntax));

/// Marker line printed once commands are accepted.
const READY: &str = "FERRITE-TESTGUEST READY";

extern "C" {
    static pvh_info_ptr: u64;
}

/// CPL3 entry point, called by `user_start` in boot.s after .bss is zeroed.
#[no_mangle]
extern "C" fn user_main() -> ! {
    println!("");
    println!(
        "FERRITE-TESTGUEST v{} (PVH, CPL0 services + CPL3 userland)",
        env!("CARGO_PKG_VERSION")
    );
    sys::extend_identity_map();
    // SAFETY: written once by the 32-bit entry code before CPL3 started.
    let info = unsafe { core::ptr::addr_of!(pvh_info_ptr).read_volatile() } & 0xffff_ffff;
    let boot = match pvh::BootInfo::parse(info) {
        Ok(b) => b,
        Err(pvh::PvhError::BadPointer) => {
            println!("FERRITE-TESTGUEST FATAL bad start-info pointer {:#x}", info);
            sys::halt()
        }
        Err(pvh::PvhError::BadMagic(m)) => {
            println!("FERRITE-TESTGUEST FATAL bad start-info magic {:#x}", m);
            sys::halt()
        }
    };
    let mut machine = cmd::Machine::init(boot);
    machine.banner();
    machine.enable_power_button();
    machine.enable_vmgenid_gpe();
    println!("{}", READY);

    let mut cmds = [0u8; pvh::CMDLINE_MAX];
    let cmdline = machine.boot.cmdline();
    let len = pvh::cmds_param(cmdline).map(|c| {
        let n = c.len().min(cmds.len());
        cmds[..n].copy_from_slice(&c.as_bytes()[..n]);
        n
    });
    if let Some(n) = len {
        let list = core::str::from_utf8(&cmds[..n]).unwrap_or("");
        for c in list.split(';') {
            machine.run(c);
        }
    }

    let mut reader = console::LineReader::new();
    let mut buf = [0u8; 256];
    let mut last_check = 0u64;
    loop {
        let line = reader.read_line(&mut buf, &mut || {
            machine.check_power_button(&mut last_check);
        });
        match line {
            Some(n) => match core::str::from_utf8(&buf[..n]) {
                Ok(line) => machine.run(line),
                Err(_) => println!("ERR ? invalid-utf8"),
            },
            None => println!("ERR ? line-too-long"),
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    if cs & 3 == 0 {
        kernel::kernel_panic();
    }
    println!("FERRITE-TESTGUEST PANIC {}", info);
    sys::halt()
}
