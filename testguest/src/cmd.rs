//! The machine state gathered at boot and the command language (see docs/testguest.md).

use core::sync::atomic::Ordering;

use crate::abi::{
    BENCH_MAX_N, IRQ_SLOT_COM1, IRQ_SLOT_MSIX, IRQ_SLOT_OTHER, IRQ_SLOT_SPURIOUS, IRQ_SLOT_TIMER,
    MSIX_VECTORS,
};
use crate::acpi::{find_rsdp, Acpi};
use crate::kernel::IRQ_COUNTS;
use crate::pattern::{check_sector, fill_sector, fnv1a64, FNV_OFFSET, SECTOR_SIZE};
use crate::pci::{BarKind, Pci};
use crate::platform::{self, IrqSetup, TscInfo};
use crate::println;
use crate::pvh::BootInfo;
use crate::sys::{self, mmio, phys_ok};
use crate::virtio_blk::{data_buf, Disk, CHUNK_SECTORS, MAX_DISKS};

/// Everything the commands report on, discovered once at boot.
pub struct Machine {
    /// PVH start info.
    pub boot: BootInfo,
    /// ACPI tables, if an RSDP was found.
    pub acpi: Option<Acpi>,
    /// Interrupt set-up result.
    pub irq: IrqSetup,
    /// TSC frequency.
    pub tsc: TscInfo,
    /// Processors the MADT lists as enabled.
    pub cpus_madt: u32,
    /// Processors running (BSP + APs that checked in).
    pub cpus_started: u32,
    /// PCI functions.
    pub pci: Pci,
    /// virtio-blk disks, in PCI order.
    pub disks: [Option<Disk>; MAX_DISKS],
    /// Number of entries of `disks`.
    pub ndisks: usize,
    /// The region the last `dirty` left behind, for `dirty-check`.
    pub dirty: Option<crate::dirty::Region>,
}

/// First byte of the RAM `mem-fill`/`mem-check` use (above the image and its .bss).
const MEM_PATTERN_BASE: u64 = 16 << 20;

/// Port `bench-pio` writes: the POST-code port, which VMMs handle (a real exit each).
const BENCH_PIO_PORT: u16 = 0x80;
/// Byte `bench-pio` writes.
const BENCH_PIO_VALUE: u8 = 0xbe;
/// Address `bench-mmio` writes: the start of Ferrite's platform MMIO area, which no device
/// claims (Ferrite counts and drops such writes; QEMU q35/microvm ignore them too).
const BENCH_MMIO_ADDR: u64 = 0xf000_0000;

/// PWRBTN_STS / PWRBTN_EN in PM1 status / enable.
const PWRBTN: u64 = 1 << 8;
/// How often the idle console and `spin` look at PWRBTN_STS.
const POWER_CHECK_MS: u64 = 250;

/// Command names, for `help`.
const COMMANDS: &str =
    "help,echo,cpus,mem,mem-fill,mem-check,mem-sum,dirty,dirty-check,pci,acpi,vmgenid,time,count,count-forever,irqs,poweroff,reboot,\
blk,blk-id,blk-write,blk-stream,blk-check,blk-sum,blk-flush,blk-discard,blk-zeroes,blk-bench,bench-pio,bench-mmio,\
rng,vcon,vcon-write,vcon-echo,vsock,vsock-listen,vsock-connect,hostile,net-up,net-serve,net-bench-tx,net-bench-rx,\
balloon,balloon-run,balloon-wait,balloon-report,touch,spin";

impl Machine {
    /// Discovers the platform: ACPI, interrupts, TSC, CPUs, PCI, virtio-blk disks.
    pub fn init(boot: BootInfo) -> Machine {
        let acpi = find_rsdp(boot.rsdp).map(Acpi::parse);
        let irq = platform::setup_interrupts(acpi.as_ref());
        let tsc = platform::tsc_frequency(acpi.as_ref());
        let (cpus_madt, cpus_started) = match acpi.as_ref().and_then(|a| a.madt.as_ref()) {
            Some(m) => (m.cpus, platform::start_aps(m, irq.bsp_apic_id, tsc.hz)),
            None => (0, 1),
        };
        let pci = Pci::scan(acpi.as_ref().and_then(|a| a.mcfg));
        let mut m = Machine {
            boot,
            acpi,
            irq,
            tsc,
            cpus_madt,
            cpus_started,
            pci,
            disks: [const { None }; MAX_DISKS],
            ndisks: 0,
            dirty: None,
        };
        for i in 0..m.pci.count {
            let f = m.pci.funcs[i];
            // 0x1042: modern virtio-blk; 0x1001: transitional (driven through its modern caps).
            let blk = f.vendor == 0x1af4 && (f.device == 0x1042 || f.device == 0x1001);
            if !blk || m.ndisks >= MAX_DISKS {
                continue;
            }
            let cfg = m.pci.cfg(&f);
            match Disk::init(&cfg, &f, m.ndisks, m.tsc.hz) {
                Ok(d) => {
                    m.disks[m.ndisks] = Some(d);
                    m.ndisks += 1;
                }
                Err(e) => println!(
                    "virtio-blk {:02x}:{:02x}.{} init failed: {}",
                    f.bus, f.dev, f.func, e
                ),
            }
        }
        m
    }

    /// Re-initialises the virtio-blk disks (after `hostile` reset every device).
    fn reinit_disks(&mut self) {
        let mut n = 0;
        for i in 0..self.pci.count {
            let f = self.pci.funcs[i];
            let blk = f.vendor == 0x1af4 && (f.device == 0x1042 || f.device == 0x1001);
            if !blk || n >= MAX_DISKS {
                continue;
            }
            let cfg = self.pci.cfg(&f);
            self.disks[n] = Disk::init(&cfg, &f, n, self.tsc.hz).ok();
            n += 1;
        }
        self.ndisks = n;
    }

    /// Sum of RAM entries and the highest RAM end.
    pub fn ram(&self) -> (u64, u64, usize) {
        let mut sum = 0u64;
        let mut top = 0u64;
        let mut n = 0;
        for e in self.boot.ram() {
            sum = sum.saturating_add(e.size);
            top = top.max(e.addr.saturating_add(e.size));
            n += 1;
        }
        (sum, top, n)
    }

    /// Bytes of RAM from `MEM_PATTERN_BASE` to the end of the RAM entry holding it (and
    /// inside the identity map); 0 if it is not RAM.
    fn pattern_ram(&self) -> u64 {
        let end = self
            .boot
            .ram()
            .filter(|e| {
                e.addr <= MEM_PATTERN_BASE && e.addr.saturating_add(e.size) > MEM_PATTERN_BASE
            })
            .map(|e| e.addr.saturating_add(e.size))
            .max()
            .unwrap_or(0);
        end.min(sys::identity_limit())
            .saturating_sub(MEM_PATTERN_BASE)
    }

    /// Prints the boot summary lines.
    pub fn banner(&self) {
        let (ram, _, _) = self.ram();
        let acpi_rev = self.acpi.as_ref().map(|a| a.revision as i32).unwrap_or(-1);
        println!(
            "boot start_info={:#x} memmap={:#x}/{} pvh_version={} modules={} cmdline_len={} ram_bytes={} acpi_rev={} cpus_madt={} cpus_started={} pci_functions={} disks={} tsc_hz={} tsc_source={} identity_map_gib={} com1_irq={}",
            self.boot.info_addr,
            self.boot.memmap_raw.0,
            self.boot.memmap_raw.1,
            self.boot.version,
            self.boot.nr_modules,
            self.boot.cmdline_len,
            ram,
            acpi_rev,
            self.cpus_madt,
            self.cpus_started,
            self.pci.count,
            self.ndisks,
            self.tsc.hz,
            self.tsc.source,
            sys::identity_limit() >> 30,
            self.irq.com1_irq as u8,
        );
    }

    /// Runs one command line; always prints exactly one OK/ERR line (plus detail lines
    /// for `pci` and `blk`).
    pub fn run(&mut self, line: &str) {
        let line = line.trim();
        let mut words = line.split_ascii_whitespace();
        let Some(cmd) = words.next() else { return };
        if !cmd.bytes().all(|b| b.is_ascii_graphic()) {
            println!("ERR ? bad-command-name");
            return;
        }
        if cmd == "echo" {
            println!("OK echo {}", line[4..].trim());
            return;
        }
        if cmd == "vcon-write" {
            crate::virtio_console::cmd_write(&self.pci, self.tsc.hz, line[10..].trim());
            return;
        }
        let mut args = [""; 8];
        let mut nargs = 0;
        for w in words {
            if nargs == args.len() {
                println!("ERR {} too-many-arguments", cmd);
                return;
            }
            args[nargs] = w;
            nargs += 1;
        }
        let args = &args[..nargs];
        match cmd {
            "help" => println!("OK help commands={}", COMMANDS),
            "cpus" => println!(
                "OK cpus madt={} started={}",
                self.cpus_madt, self.cpus_started
            ),
            "mem" => self.cmd_mem(),
            "pci" => self.cmd_pci(),
            "time" => self.cmd_time(),
            "count" => self.cmd_count(args),
            "count-forever" => self.cmd_count_forever(args),
            "spin" => self.cmd_spin(args),
            "mem-fill" | "mem-check" => self.cmd_mem_pattern(cmd, args),
            "mem-sum" => crate::dirty::cmd_mem_sum(MEM_PATTERN_BASE, self.pattern_ram(), args),
            "dirty" => {
                let avail = self.pattern_ram();
                let mut region = self.dirty.take();
                let mut last_check = 0u64;
                crate::dirty::cmd_dirty(
                    &mut region,
                    self.tsc.hz,
                    MEM_PATTERN_BASE,
                    avail,
                    &mut || self.check_power_button(&mut last_check),
                    args,
                );
                self.dirty = region;
            }
            "dirty-check" => crate::dirty::cmd_check(&self.dirty),
            "irqs" => cmd_irqs(),
            "bench-pio" | "bench-mmio" => self.cmd_bench(cmd, args),
            "acpi" => self.cmd_acpi(),
            "vmgenid" => self.cmd_vmgenid(),
            "poweroff" => {
                println!("OK poweroff");
                platform::poweroff(self.acpi.as_ref(), self.tsc.hz);
                println!("ERR poweroff still-running");
            }
            "reboot" => {
                println!("OK reboot");
                platform::reboot(self.acpi.as_ref(), self.tsc.hz);
                println!("ERR reboot still-running");
            }
            "rng" => crate::virtio_rng::cmd(&self.pci, self.tsc.hz, args),
            "balloon" | "balloon-run" | "balloon-wait" | "balloon-report" | "touch" => {
                crate::virtio_balloon::cmd(cmd, &self.pci, &self.boot, self.tsc.hz, args)
            }
            "net-up" => crate::virtio_net::cmd_up(&self.pci, args),
            "net-serve" => crate::virtio_net::cmd_serve(self.tsc.hz, args),
            "net-bench-tx" => crate::netbench::cmd_tx(&self.pci, self.tsc.hz, args),
            "net-bench-rx" => crate::netbench::cmd_rx(&self.pci, self.tsc.hz, args),
            "vsock" => crate::virtio_vsock::cmd_info(&self.pci, self.tsc.hz),
            "vsock-listen" => crate::virtio_vsock::cmd_listen(&self.pci, self.tsc.hz, args),
            "vsock-connect" => crate::virtio_vsock::cmd_connect(&self.pci, self.tsc.hz, args),
            "hostile" => {
                let (_, top, _) = self.ram();
                crate::hostile::cmd(&self.pci, self.tsc.hz, top);
                self.reinit_disks();
            }
            "vcon" => crate::virtio_console::cmd_info(&self.pci),
            "vcon-echo" => crate::virtio_console::cmd_echo(&self.pci, self.tsc.hz, args),
            "blk" => self.cmd_blk(),
            "blk-bench" => {
                let boot = &self.boot;
                let ram_ok = |a: u64, len: u64| {
                    let end = a.saturating_add(len);
                    boot.ram()
                        .any(|e| e.addr <= a && e.addr.saturating_add(e.size) >= end)
                };
                crate::blkbench::cmd(&self.pci, self.tsc.hz, &ram_ok, args);
                // The benchmark drove the disk through its own queue: set it up again.
                self.reinit_disks();
            }
            "blk-id" | "blk-write" | "blk-check" | "blk-sum" | "blk-flush" | "blk-discard"
            | "blk-zeroes" | "blk-stream" => self.cmd_blk_op(cmd, args),
            _ => println!("ERR {} unknown-command", cmd),
        }
    }

    fn cmd_acpi(&self) {
        let Some(a) = self.acpi.as_ref() else {
            println!("ERR acpi no-rsdp");
            return;
        };
        let mut line = crate::console::Line::new();
        use core::fmt::Write as _;
        let _ = write!(
            line,
            "OK acpi rsdp={:#x} revision={} tables=",
            a.rsdp, a.revision
        );
        for (i, s) in a.sigs[..a.nsigs].iter().enumerate() {
            let name = core::str::from_utf8(s).unwrap_or("????");
            let _ = write!(line, "{}{}", if i == 0 { "" } else { "," }, name);
        }
        if let Some(m) = a.mcfg {
            let _ = write!(
                line,
                " ecam={:#x} buses={}-{}",
                m.base, m.start_bus, m.end_bus
            );
        }
        if let Some(f) = a.fadt {
            let _ = write!(
                line,
                " pm1a_cnt={:#x} s5_typ={}",
                f.pm1a_cnt,
                f.s5_typ.map(|v| v as i32).unwrap_or(-1)
            );
        }
        let _ = line.write_str("\n");
        line.flush();
    }

    /// The GPE0 status and enable ports, if the FADT has a GPE0 block in port space.
    fn gpe0_ports(&self) -> Option<(u16, u16)> {
        let f = self.acpi.as_ref()?.fadt?;
        event_block_ports(f.gpe0_blk, f.gpe0_len, 2)
    }

    /// Sets GPE0 bit 0 (the VM generation ID change) in GPE0_EN, at boot.
    pub fn enable_vmgenid_gpe(&self) {
        if let Some((_, en)) = self.gpe0_ports() {
            set_enable_bit(en, 1, 1);
        }
    }

    /// `vmgenid`: prints `OK vmgenid addr=A id=HEX32 changed=0|1`: the 16-byte ID at the
    /// address the DSDT's `VGEN.ADDR` gives, and whether GPE0 bit 0 (the host's "the ID
    /// changed" notification) was pending, which it clears, as an OS's `_E00` handling would.
    fn cmd_vmgenid(&self) {
        let Some(addr) = self
            .acpi
            .as_ref()
            .and_then(|a| a.fadt)
            .and_then(|f| f.vmgenid)
        else {
            println!("ERR vmgenid no-device");
            return;
        };
        if addr % 8 != 0 || !phys_ok(addr, 16) {
            println!("ERR vmgenid bad-address={:#x}", addr);
            return;
        }
        let changed = match self.gpe0_ports() {
            Some((sts, _)) => {
                let v = sys::pio_in(sts, 1) & 1;
                if v != 0 {
                    sys::pio_out(sts, 1, 1);
                }
                v
            }
            None => 0,
        };
        let mut line = crate::console::Line::new();
        use core::fmt::Write as _;
        let _ = write!(line, "OK vmgenid addr={:#x} id=", addr);
        for i in 0..16 {
            let _ = write!(line, "{:02x}", mmio::r8(addr + i));
        }
        let _ = writeln!(line, " changed={}", changed);
        line.flush();
    }

    fn cmd_mem(&self) {
        let (sum, top, n) = self.ram();
        if n == 0 {
            println!("ERR mem no-memory-map");
            return;
        }
        let probe = top.saturating_sub(8) & !7;
        if probe == 0 || !phys_ok(probe, 8) {
            println!("ERR mem top-not-mapped top={:#x}", top);
            return;
        }
        let old = mmio::r64(probe);
        let pattern = 0x5a5a_a5a5_0123_4567u64 ^ probe;
        mmio::w64(probe, pattern);
        let ok = mmio::r64(probe) == pattern;
        mmio::w64(probe, old);
        if ok {
            println!(
                "OK mem ram_bytes={} ram_mib={} regions={} top={:#x} probe=ok",
                sum,
                sum >> 20,
                n,
                top
            );
        } else {
            println!("ERR mem probe-mismatch top={:#x}", top);
        }
    }

    /// `mem-fill SEED [MIB]` / `mem-check SEED [MIB]`: a pattern over guest RAM starting at
    /// `MEM_PATTERN_BASE` (u64 at physical address `a` = splitmix64(seed ^ a)).
    fn cmd_mem_pattern(&self, cmd: &str, args: &[&str]) {
        let (seed, mib) = match args {
            [seed] => (parse_u64(seed), Some(16)),
            [seed, mib] => (parse_u64(seed), parse_u64(mib)),
            _ => {
                println!("ERR {} usage: {} SEED [MIB]", cmd, cmd);
                return;
            }
        };
        let (Some(seed), Some(mib)) = (seed, mib) else {
            println!("ERR {} bad-number", cmd);
            return;
        };
        let len = mib.saturating_mul(1 << 20);
        let end = MEM_PATTERN_BASE.saturating_add(len);
        let inside = self
            .boot
            .ram()
            .any(|e| e.addr <= MEM_PATTERN_BASE && e.addr.saturating_add(e.size) >= end);
        if mib == 0 || !inside || !phys_ok(MEM_PATTERN_BASE, len) {
            println!(
                "ERR {} not-ram start={:#x} mib={}",
                cmd, MEM_PATTERN_BASE, mib
            );
            return;
        }
        let t0 = sys::rdtsc();
        let words = len / 8;
        let base = MEM_PATTERN_BASE as *mut u64;
        if cmd == "mem-fill" {
            for i in 0..words {
                let a = MEM_PATTERN_BASE + i * 8;
                // SAFETY: the range is RAM inside the identity map (checked above) and not
                // used by this program (it ends below MEM_PATTERN_BASE).
                unsafe {
                    base.add(i as usize)
                        .write_volatile(crate::pattern::splitmix64(seed ^ a))
                };
            }
            let cycles = sys::rdtsc().wrapping_sub(t0);
            println!(
                "OK mem-fill start={:#x} mib={} seed={} cycles={}",
                MEM_PATTERN_BASE, mib, seed, cycles
            );
            return;
        }
        let mut bad = 0u64;
        let mut first = 0u64;
        for i in 0..words {
            let a = MEM_PATTERN_BASE + i * 8;
            // SAFETY: as above.
            let v = unsafe { base.add(i as usize).read_volatile() };
            if v != crate::pattern::splitmix64(seed ^ a) {
                if bad == 0 {
                    first = a;
                }
                bad += 1;
            }
        }
        if bad == 0 {
            println!(
                "OK mem-check start={:#x} mib={} seed={} result=match",
                MEM_PATTERN_BASE, mib, seed
            );
        } else {
            println!(
                "ERR mem-check mismatch first_bad={:#x} bad_words={} mib={} seed={}",
                first, bad, mib, seed
            );
        }
    }

    fn cmd_pci(&self) {
        for f in &self.pci.funcs[..self.pci.count] {
            let mut line = crate::console::Line::new();
            use core::fmt::Write as _;
            let _ = write!(
                line,
                "pci {:02x}:{:02x}.{} {:04x}:{:04x} class={:06x} hdr={}",
                f.bus, f.dev, f.func, f.vendor, f.device, f.class, f.header
            );
            for (i, b) in f.bars.iter().enumerate() {
                let kind = match b.kind {
                    BarKind::None => continue,
                    BarKind::Io => "io",
                    BarKind::Mem32 => "mem32",
                    BarKind::Mem64 => "mem64",
                };
                let _ = write!(line, " bar{}={}:{:#x}+{:#x}", i, kind, b.addr, b.size);
                if b.prefetch {
                    let _ = write!(line, ",pf");
                }
                if b.assigned {
                    let _ = write!(line, ",assigned");
                }
            }
            let _ = line.write_str("\n");
            line.flush();
        }
        let access = match self.pci.access {
            crate::pci::CfgAccess::Ecam(m) => m.base,
            crate::pci::CfgAccess::Legacy => 0,
        };
        println!(
            "OK pci count={} ecam={:#x} dropped={}",
            self.pci.count, access, self.pci.dropped
        );
    }

    fn cmd_time(&self) {
        let raw = sys::rtc();
        let tsc = sys::rdtsc();
        let b = |i: u32| ((raw >> (i * 8)) & 0xff) as u8;
        let status_b = b(6);
        let bcd = status_b & 0x04 == 0;
        let conv = |v: u8| if bcd { (v >> 4) * 10 + (v & 0xf) } else { v };
        let sec = conv(b(0));
        let min = conv(b(1));
        let hour_raw = b(2);
        let mut hour = conv(hour_raw & 0x7f);
        if status_b & 0x02 == 0 && hour_raw & 0x80 != 0 {
            hour = (hour % 12) + 12; // 12-hour mode, PM
        }
        let day = conv(b(3));
        let month = conv(b(4));
        let year = conv(b(5)) as u32;
        let century = conv(b(7)) as u32;
        let full_year = if (19..=21).contains(&century) {
            century * 100 + year
        } else {
            2000 + year
        };
        println!(
            "OK time rtc={:04}-{:02}-{:02}T{:02}:{:02}:{:02} tsc={} tsc_hz={}",
            full_year, month, day, hour, min, sec, tsc, self.tsc.hz
        );
    }

    fn cmd_count(&self, args: &[&str]) {
        let [n] = args else {
            println!("ERR count usage: count N");
            return;
        };
        let Some(n) = parse_u64(n) else {
            println!("ERR count bad-number");
            return;
        };
        let t0 = sys::rdtsc();
        let mut v = 0u64;
        for _ in 0..n {
            v = core::hint::black_box(v + 1);
        }
        let cycles = sys::rdtsc().wrapping_sub(t0);
        println!("OK count n={} value={} cycles={}", n, v, cycles);
    }

    /// `bench-pio N` / `bench-mmio N`: N exit-causing writes, timed by the guest's TSC.
    /// `bench-pio`: one service call whose CPL0 loop does N `out 0x80, al` (CPL3 cannot do
    /// port I/O), cycles read at CPL0 around the loop. `bench-mmio`: N volatile 4-byte writes
    /// from CPL3 to `BENCH_MMIO_ADDR`, cycles read at CPL3 around the loop.
    fn cmd_bench(&self, cmd: &str, args: &[&str]) {
        let [n] = args else {
            println!("ERR {} usage: {} N", cmd, cmd);
            return;
        };
        let Some(n) = parse_u64(n) else {
            println!("ERR {} bad-number", cmd);
            return;
        };
        if !(1..=BENCH_MAX_N).contains(&n) {
            println!("ERR {} out-of-range n={} max={}", cmd, n, BENCH_MAX_N);
            return;
        }
        let cycles = if cmd == "bench-pio" {
            match sys::pio_out_repeat(BENCH_PIO_PORT, BENCH_PIO_VALUE, n) {
                Some(c) => c,
                None => {
                    println!("ERR {} service-refused n={}", cmd, n);
                    return;
                }
            }
        } else {
            if !phys_ok(BENCH_MMIO_ADDR, 4) {
                println!("ERR {} not-mapped addr={:#x}", cmd, BENCH_MMIO_ADDR);
                return;
            }
            let t0 = sys::rdtsc();
            for i in 0..n {
                mmio::w32(BENCH_MMIO_ADDR, i as u32);
            }
            sys::rdtsc().wrapping_sub(t0)
        };
        let ns = (cycles as u128 * 1_000_000_000 / self.tsc.hz.max(1) as u128) as u64;
        println!("OK {} n={} tsc={} ns={}", cmd, n, cycles, ns);
    }

    /// The PM1a status and enable ports, if the FADT has a PM1a event block in port space.
    fn pm1_ports(&self) -> Option<(u16, u16)> {
        let f = self.acpi.as_ref()?.fadt?;
        event_block_ports(f.pm1a_evt, f.pm1_evt_len, 4)
    }

    /// Sets PWRBTN_EN in PM1a_EN (at boot), so the VMM reports the button as handled.
    pub fn enable_power_button(&self) {
        if let Some((_, en)) = self.pm1_ports() {
            set_enable_bit(en, PWRBTN, 2);
        }
    }

    /// At most every `POWER_CHECK_MS` of TSC time (tracked in `last`): reads PM1a_STS and,
    /// if PWRBTN_STS is set, clears it, prints `OK power-button` and powers off (S5).
    pub fn check_power_button(&self, last: &mut u64) {
        let now = sys::rdtsc();
        let period = (self.tsc.hz / 1000).saturating_mul(POWER_CHECK_MS);
        if *last != 0 && now.wrapping_sub(*last) < period {
            return;
        }
        *last = now;
        let Some((sts, _)) = self.pm1_ports() else {
            return;
        };
        if sys::pio_in(sts, 2) & PWRBTN == 0 {
            return;
        }
        sys::pio_out(sts, PWRBTN, 2);
        println!("OK power-button");
        platform::poweroff(self.acpi.as_ref(), self.tsc.hz);
        println!("ERR power-button still-running");
    }

    /// `spin SECONDS`: a CPU-bound loop at CPL3; every second of TSC time it prints
    /// `spin t=<sec> iters=<N>` (loop iterations in that second) and checks the power button.
    /// 0 spins forever.
    fn cmd_spin(&self, args: &[&str]) {
        let secs = match args {
            [s] => match parse_u64(s) {
                Some(v) => v,
                None => {
                    println!("ERR spin bad-number");
                    return;
                }
            },
            _ => {
                println!("ERR spin usage: spin SECONDS");
                return;
            }
        };
        let period = self.tsc.hz.max(1);
        let mut next = sys::rdtsc().wrapping_add(period);
        let mut iters = 0u64;
        let mut t = 0u64;
        let mut last_check = 0u64;
        loop {
            iters = core::hint::black_box(iters + 1);
            if iters & 0xffff == 0 {
                let now = sys::rdtsc();
                if (now.wrapping_sub(next) as i64) >= 0 {
                    t += 1;
                    println!("spin t={} iters={}", t, iters);
                    iters = 0;
                    next = next.wrapping_add(period);
                    if (now.wrapping_sub(next) as i64) >= 0 {
                        // Paused or descheduled for a while: restart the second from now.
                        next = now.wrapping_add(period);
                    }
                    self.check_power_button(&mut last_check);
                    if secs != 0 && t >= secs {
                        break;
                    }
                }
            }
        }
        println!("OK spin");
    }

    fn cmd_count_forever(&self, args: &[&str]) {
        let ms = match args {
            [] => 1000,
            [ms] => match parse_u64(ms) {
                Some(v) if (1..=3_600_000).contains(&v) => v,
                _ => {
                    println!("ERR count-forever bad-number");
                    return;
                }
            },
            _ => {
                println!("ERR count-forever usage: count-forever [MS]");
                return;
            }
        };
        println!("OK count-forever interval_ms={}", ms);
        let period = (self.tsc.hz / 1000).saturating_mul(ms).max(1);
        let mut next = sys::rdtsc().wrapping_add(period);
        let mut v = 0u64;
        let mut ticks = 0u64;
        loop {
            v = core::hint::black_box(v + 1);
            if v & 0xffff == 0 {
                let now = sys::rdtsc();
                if (now.wrapping_sub(next) as i64) >= 0 {
                    ticks += 1;
                    println!("tick n={} value={} tsc={}", ticks, v, now);
                    next = next.wrapping_add(period);
                }
            }
        }
    }

    fn cmd_blk(&self) {
        for (i, d) in self.disks[..self.ndisks].iter().enumerate() {
            if let Some(d) = d {
                println!(
                    "blk {} bdf={:02x}:{:02x}.{} capacity={} ro={} blk_size={} seg_max={} features={:#x} offered={:#x} msix_vector={} msix_irqs={}",
                    i,
                    d.bdf.0,
                    d.bdf.1,
                    d.bdf.2,
                    d.capacity,
                    d.ro() as u8,
                    d.blk_size,
                    d.seg_max,
                    d.features,
                    d.offered,
                    d.msix_vector.map(|v| v as i32).unwrap_or(-1),
                    d.msix_vector
                        .map(|v| IRQ_COUNTS[IRQ_SLOT_MSIX + (v as u64 - crate::abi::VEC_MSIX_FIRST) as usize]
                            .load(Ordering::Relaxed))
                        .unwrap_or(0)
                );
            }
        }
        println!("OK blk count={}", self.ndisks);
    }

    fn cmd_blk_op(&mut self, cmd: &str, args: &[&str]) {
        let want = match cmd {
            "blk-id" | "blk-flush" => 1,
            "blk-sum" | "blk-discard" | "blk-zeroes" => 3,
            _ => 4,
        };
        if args.len() != want {
            let usage = match cmd {
                "blk-id" | "blk-flush" => "D",
                "blk-sum" | "blk-discard" | "blk-zeroes" => "D SECTOR COUNT",
                _ => "D SECTOR COUNT SEED",
            };
            println!("ERR {} usage: {} {}", cmd, cmd, usage);
            return;
        }
        let mut nums = [0u64; 4];
        for (i, a) in args.iter().enumerate() {
            match parse_u64(a) {
                Some(v) => nums[i] = v,
                None => {
                    println!("ERR {} bad-number={}", cmd, a);
                    return;
                }
            }
        }
        let idx = nums[0];
        let Some(disk) = self.disks.get_mut(idx as usize).and_then(|d| d.as_mut()) else {
            println!("ERR {} no-such-disk={}", cmd, idx);
            return;
        };
        let (sector, count, seed) = (nums[1], nums[2], nums[3]);
        match cmd {
            "blk-id" => {
                let mut id = [0u8; 20];
                match disk.get_id(&mut id) {
                    Ok(n) => {
                        let mut text = [b'_'; 20];
                        for (t, &c) in text.iter_mut().zip(&id[..n]) {
                            if c.is_ascii_graphic() {
                                *t = c;
                            }
                        }
                        let s = core::str::from_utf8(&text[..n]).unwrap_or("");
                        println!("OK blk-id {} id={} len={}", idx, s, n);
                    }
                    Err(e) => println!("ERR blk-id {}", e),
                }
            }
            "blk-flush" => match disk.flush() {
                Ok(()) => println!("OK blk-flush {}", idx),
                Err(e) => println!("ERR blk-flush {}", e),
            },
            "blk-discard" | "blk-zeroes" => match disk.discard_or_zero(cmd == "blk-zeroes", sector, count) {
                Ok(reqs) => println!("OK {} {} sector={} count={} requests={}", cmd, idx, sector, count, reqs),
                Err(e) => println!("ERR {} {}", cmd, e),
            },
            "blk-stream" => blk_stream(disk, idx, sector, count, seed),
            "blk-write" => match blk_write(disk, sector, count, seed) {
                Ok(()) => println!("OK blk-write {} sector={} count={} seed={}", idx, sector, count, seed),
                Err((at, e)) => println!("ERR blk-write {} sector={}", e, at),
            },
            "blk-check" => match blk_read_each(disk, sector, count, |s, buf| check_sector(seed, s, buf)) {
                Ok((0, _)) => println!("OK blk-check {} sector={} count={} seed={} result=match", idx, sector, count, seed),
                Ok((bad, first)) => println!(
                    "ERR blk-check mismatch first_bad_sector={} bad_sectors={} sector={} count={} seed={}",
                    first, bad, sector, count, seed
                ),
                Err((at, e)) => println!("ERR blk-check {} sector={}", e, at),
            },
            _ => {
                let mut hash = FNV_OFFSET;
                match blk_read_each(disk, sector, count, |_, buf| {
                    hash = fnv1a64(hash, buf);
                    true
                }) {
                    Ok(_) => println!("OK blk-sum {} sector={} count={} fnv1a64={:016x}", idx, sector, count, hash),
                    Err((at, e)) => println!("ERR blk-sum {} sector={}", e, at),
                }
            }
        }
    }
}

type OpResult<T> = Result<T, (u64, crate::virtio_blk::BlkError)>;

fn blk_write(disk: &mut Disk, sector: u64, count: u64, seed: u64) -> OpResult<()> {
    if sector
        .checked_add(count)
        .is_none_or(|end| end > disk.capacity)
    {
        return Err((sector, crate::virtio_blk::BlkError::Range));
    }
    let mut done = 0;
    while done < count {
        let n = (count - done).min(CHUNK_SECTORS);
        let buf = data_buf();
        for k in 0..n {
            let off = (k as usize) * SECTOR_SIZE;
            fill_sector(seed, sector + done + k, &mut buf[off..off + SECTOR_SIZE]);
        }
        disk.write_chunk(sector + done, n)
            .map_err(|e| (sector + done, e))?;
        done += n;
    }
    Ok(())
}

/// `blk-stream D SECTOR COUNT SEED`: writes the pattern over SECTOR..SECTOR+COUNT chunk by
/// chunk, pass after pass (pass P uses seed SEED+P), until a byte arrives on the serial port;
/// then sectors SECTOR..NEXT hold pass P and NEXT.. pass P-1 (if P > 0).
fn blk_stream(disk: &mut Disk, idx: u64, sector: u64, count: u64, seed: u64) {
    if count == 0
        || sector
            .checked_add(count)
            .is_none_or(|end| end > disk.capacity)
    {
        println!(
            "ERR blk-stream {} sector={}",
            crate::virtio_blk::BlkError::Range,
            sector
        );
        return;
    }
    println!(
        "OK blk-stream {} sector={} count={} seed={}",
        idx, sector, count, seed
    );
    let (mut pass, mut next, mut writes) = (0u64, 0u64, 0u64);
    loop {
        let n = (count - next).min(CHUNK_SECTORS);
        if let Err((at, e)) = blk_write(disk, sector + next, n, seed + pass) {
            println!("ERR blk-stream {} sector={}", e, at);
            return;
        }
        writes += 1;
        next += n;
        if next == count {
            next = 0;
            pass += 1;
        }
        if writes % 64 == 0 {
            println!(
                "blk-stream writes={} pass={} next={}",
                writes,
                pass,
                sector + next
            );
        }
        let mut byte = [0u8; 1];
        if sys::read(&mut byte) == 1 {
            break;
        }
    }
    println!(
        "OK blk-stream stopped writes={} pass={} next={}",
        writes,
        pass,
        sector + next
    );
}

/// Reads a range chunk by chunk, calling `f(sector, bytes)` per sector; returns
/// (number of sectors where `f` returned false, first such sector).
fn blk_read_each(
    disk: &mut Disk,
    sector: u64,
    count: u64,
    mut f: impl FnMut(u64, &[u8]) -> bool,
) -> OpResult<(u64, u64)> {
    if sector
        .checked_add(count)
        .is_none_or(|end| end > disk.capacity)
    {
        return Err((sector, crate::virtio_blk::BlkError::Range));
    }
    let mut done = 0;
    let mut bad = 0;
    let mut first_bad = 0;
    while done < count {
        let n = (count - done).min(CHUNK_SECTORS);
        disk.read_chunk(sector + done, n)
            .map_err(|e| (sector + done, e))?;
        let buf = data_buf();
        for k in 0..n {
            let off = (k as usize) * SECTOR_SIZE;
            if !f(sector + done + k, &buf[off..off + SECTOR_SIZE]) {
                if bad == 0 {
                    first_bad = sector + done + k;
                }
                bad += 1;
            }
        }
        done += n;
    }
    Ok((bad, first_bad))
}

fn cmd_irqs() {
    let c = |i: usize| IRQ_COUNTS[i].load(Ordering::Relaxed);
    let msix: u64 = (0..MSIX_VECTORS as usize)
        .map(|i| c(IRQ_SLOT_MSIX + i))
        .sum();
    println!(
        "OK irqs timer={} com1={} spurious={} other={} msix={}",
        c(IRQ_SLOT_TIMER),
        c(IRQ_SLOT_COM1),
        c(IRQ_SLOT_SPURIOUS),
        c(IRQ_SLOT_OTHER),
        msix
    );
}

/// Parses a decimal or `0x` hexadecimal u64 (no overflow, no sign).
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// (status, enable) ports of an ACPI event block at port `blk` of `len` bytes (status and
/// enable registers are half each), if it is in port space and at least `min_len` long.
fn event_block_ports(blk: u32, len: u8, min_len: u8) -> Option<(u16, u16)> {
    if blk == 0 || blk > 0xfff0 || len < min_len {
        return None;
    }
    let sts = blk as u16;
    Some((sts, sts + u16::from(len / 2)))
}

/// Sets `bit` in the `width`-byte enable register at port `en`.
fn set_enable_bit(en: u16, bit: u64, width: u64) {
    let v = sys::pio_in(en, width);
    sys::pio_out(en, v | bit, width);
}
