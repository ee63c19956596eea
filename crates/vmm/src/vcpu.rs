//! vCPU threads: the `KVM_RUN` loop, exit dispatch to the buses, failure capture, and the
//! exit/pause protocol the VM uses to stop them.

use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::AtomicI32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::{Bus, GuestMemoryMmap, ShutdownKind, ShutdownSignal};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dump::FailureReport;
use crate::kick;
use crate::repair::decode::DecodeError;
use crate::repair::{self, Injection, RepairError, RepairStats};
use crate::stats::{ExitCounters, ExitKind};

/// Start/stop/pause coordination between the VM and its vCPU threads.
pub struct RunControl {
    exit: AtomicBool,
    /// Mirror of `paused.requested` so the run loop checks it without taking the lock.
    pause: AtomicBool,
    paused: Mutex<PauseState>,
    cond: Condvar,
    failure: Mutex<Option<FailureReport>>,
    /// Written when a vCPU records a failure (the VM's main loop polls it).
    failure_evt: EventFd,
}

/// Work for each parked vCPU on its own thread (vCPU ioctls such as saving its state must
/// come from the thread that runs it): called with the vCPU index and its fd.
pub type ParkedTask = Arc<dyn Fn(u32, &VcpuFd) + Send + Sync>;

#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    /// vCPU loops that have returned (they will never park).
    exited: usize,
    /// The current task for parked vCPUs and its generation (each vCPU runs a generation once).
    task: Option<(u64, ParkedTask)>,
    /// Parked vCPUs that finished the current task.
    task_done: usize,
    /// The last task generation handed out (never reused, so a vCPU that ran generation N
    /// never mistakes the next task for one it already ran).
    task_gen: u64,
}

impl RunControl {
    /// A control block for a running VM.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            exit: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            paused: Mutex::new(PauseState::default()),
            cond: Condvar::new(),
            failure: Mutex::new(None),
            failure_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Ask every vCPU loop to return (callers then kick the threads).
    pub fn request_exit(&self) {
        self.exit.store(true, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Whether the vCPUs were told to exit.
    pub fn exit_requested(&self) -> bool {
        self.exit.load(Ordering::SeqCst)
    }

    fn lock_pause(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask the vCPUs to park (callers then kick them and [`RunControl::wait_parked`]).
    pub fn request_pause(&self) {
        self.lock_pause().requested = true;
        self.pause.store(true, Ordering::SeqCst);
    }

    /// Block until all `n` vCPUs are parked or gone (or the VM is exiting).
    pub fn wait_parked(&self, n: usize) {
        let mut st = self.lock_pause();
        while st.parked + st.exited < n && !self.exit_requested() {
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like [`RunControl::wait_parked`] but gives up after `timeout`, calling `kick` about
    /// every 10 ms meanwhile (to interrupt `KVM_RUN`). Returns whether all `n` are parked or
    /// gone (or the VM is exiting).
    pub fn wait_parked_timeout(&self, n: usize, timeout: Duration, mut kick: impl FnMut()) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock_pause();
        loop {
            if st.parked + st.exited >= n || self.exit_requested() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            drop(st);
            kick();
            st = self.lock_pause();
            // The vCPUs may have parked between the kick and this lock: their notification
            // is gone, so look before waiting.
            if st.parked + st.exited >= n || self.exit_requested() {
                return true;
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            st = self
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether a pause is requested (vCPUs parked or parking).
    pub fn is_pause_requested(&self) -> bool {
        self.pause_requested()
    }

    /// Let parked vCPUs run again.
    pub fn resume(&self) {
        let mut st = self.lock_pause();
        st.requested = false;
        self.pause.store(false, Ordering::SeqCst);
        drop(st);
        self.cond.notify_all();
    }

    fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    fn loop_exited(&self) {
        self.lock_pause().exited += 1;
        self.cond.notify_all();
    }

    /// Park until resumed, running each new [`ParkedTask`] once through `run_task`.
    fn park(&self, mut run_task: impl FnMut(&ParkedTask)) {
        let mut st = self.lock_pause();
        st.parked += 1;
        self.cond.notify_all();
        // A task handed out before this vCPU parked is not for it (it was not parked then).
        let mut done_gen = st.task_gen;
        while st.requested && !self.exit_requested() {
            if let Some((gen, task)) = st.task.clone().filter(|(gen, _)| *gen != done_gen) {
                done_gen = gen;
                drop(st);
                run_task(&task);
                st = self.lock_pause();
                if st.task.as_ref().is_some_and(|(g, _)| *g == gen) {
                    st.task_done += 1;
                }
                self.cond.notify_all();
                continue;
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
    }

    /// With all `n` vCPUs parked (see [`RunControl::wait_parked_timeout`]), run `task` on
    /// each parked vCPU's thread and wait up to `timeout` for all of them. Returns whether
    /// every parked vCPU ran it (vCPUs whose loop has ended are skipped).
    pub fn run_on_parked(&self, task: ParkedTask, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock_pause();
        if !st.requested {
            return false;
        }
        st.task_gen += 1;
        let gen = st.task_gen;
        st.task = Some((gen, task));
        st.task_done = 0;
        self.cond.notify_all();
        loop {
            if st.task_done >= st.parked {
                st.task = None;
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.exit_requested() {
                st.task = None;
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Record a failure (the first one wins) and wake the main loop.
    pub fn fail(&self, report: FailureReport) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(report);
            let _ = self.failure_evt.write(1);
        }
    }

    /// The recorded failure, if any.
    pub fn take_failure(&self) -> Option<FailureReport> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Readable once a failure was recorded.
    pub fn failure_event(&self) -> &EventFd {
        &self.failure_evt
    }
}

/// Runs a pausing vCPU may make to deliver an undelivered #BP before it parks (see
/// [`repair::soft_exception`]); each normally ends at the pausing side's next kick.
const MAX_SETTLE_RUNS: u32 = 8;

/// What every vCPU of one VM shares.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Guest RAM (for repairs and failure dumps).
    pub memory: GuestMemoryMmap,
    /// Where power-off and reset requests go.
    pub shutdown: ShutdownSignal,
    /// Exit/pause/failure coordination.
    pub control: Arc<RunControl>,
    /// Repair counters; `None` disables the repair hook.
    pub repair: Option<Arc<RepairStats>>,
    /// The VM's dirty rings, if it uses them: a vCPU whose ring is full drains them before
    /// it runs again.
    pub dirty_ring: Option<Arc<crate::dirty::DirtyRing>>,
}

/// One vCPU, ready to run on its own thread.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    ctx: Arc<VcpuContext>,
    counters: Arc<ExitCounters>,
    tid: Arc<AtomicI32>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    /// vCPU index.
    pub id: u32,
    /// The thread (joined when the VM stops).
    pub thread: JoinHandle<()>,
    /// Its exit counters.
    pub counters: Arc<ExitCounters>,
    /// The thread's kernel thread id (0 until the thread has started).
    pub tid: Arc<AtomicI32>,
}

impl VcpuHandle {
    /// Interrupt `KVM_RUN` on this vCPU's thread.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        if !self.thread.is_finished() {
            kick::kick(self.thread.as_pthread_t());
        }
    }
}

/// What the run loop does after one exit.
enum Next {
    Continue,
    PortIo,
    Stop,
    InternalError,
    Fail(String),
}

impl Vcpu {
    /// Wrap a configured vCPU.
    pub fn new(id: u32, fd: VcpuFd, ctx: Arc<VcpuContext>) -> Self {
        Self {
            id,
            fd,
            ctx,
            counters: Arc::new(ExitCounters::default()),
            tid: Arc::new(AtomicI32::new(0)),
        }
    }

    /// Start the run loop on a new thread named `vcpu<N>`.
    pub fn spawn(self) -> std::io::Result<VcpuHandle> {
        let id = self.id;
        let counters = self.counters.clone();
        let tid = self.tid.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(1 << 20)
            .spawn(move || self.run())?;
        Ok(VcpuHandle {
            id,
            thread,
            counters,
            tid,
        })
    }

    fn run(mut self) {
        // The raw syscall: the static glibc build does not link the gettid() wrapper.
        // SAFETY: SYS_gettid takes no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        self.tid
            .store(i32::try_from(tid).unwrap_or(0), Ordering::SeqCst);
        let ie = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        kick::set_immediate_exit_ptr(ie);
        let ctl = self.ctx.control.clone();
        let check_breakpoints = crate::vm::Hypervisor::needs_repair();
        let mut settle_runs = 0;
        loop {
            if ctl.exit_requested() {
                break;
            }
            if ctl.pause_requested() {
                self.complete_pending_io();
                // kvm_pvm: a #BP it queued but did not deliver would be lost by a snapshot;
                // one more run delivers it (the pausing side kicks again within 10 ms).
                let settle = check_breakpoints
                    && settle_runs < MAX_SETTLE_RUNS
                    && repair::soft_exception::may_hold_undelivered_breakpoint(
                        &self.fd,
                        &self.ctx.memory,
                    );
                if !settle {
                    settle_runs = 0;
                    let (id, fd) = (self.id, &self.fd);
                    ctl.park(|task| task(id, fd));
                    continue;
                }
                settle_runs += 1;
                self.counters.inc(ExitKind::SettleRun);
            }
            // A panic while handling an exit (in kvm-ioctls' decoding of kvm_run, a device, or
            // the repair code) must not silently end this thread: the VM would hang with a
            // dead vCPU. It becomes a VM failure like any other.
            let step = panic::catch_unwind(AssertUnwindSafe(|| self.step()));
            let keep_running = step.unwrap_or_else(|payload| {
                self.fail(
                    format!("vCPU thread panicked: {}", panic_text(&*payload)),
                    None,
                );
                false
            });
            if !keep_running {
                break;
            }
        }
        kick::set_immediate_exit_ptr(std::ptr::null_mut());
        ctl.loop_exited();
    }

    /// Finish an I/O or MMIO exit the guest is still inside before parking, so a parked
    /// vCPU's registers are at an instruction boundary (as a snapshot needs); see
    /// [`crate::persist::vcpu_state::complete_pending_io`].
    fn complete_pending_io(&mut self) {
        if let Err(e) = crate::persist::vcpu_state::complete_pending_io(&mut self.fd) {
            tracing::warn!(vcpu = self.id, "before parking: {e}");
        }
    }

    /// Run the guest until the next exit and handle it. Returns false once the loop must end
    /// (the VM stops, or a failure was recorded).
    fn step(&mut self) -> bool {
        match self.run_once() {
            Next::Continue => true,
            Next::Stop => false,
            Next::PortIo => match self.handle_port_io() {
                Ok(()) => true,
                Err(reason) => {
                    self.fail(reason, None);
                    false
                }
            },
            Next::InternalError => self.handle_internal_error(),
            Next::Fail(reason) => {
                self.fail(reason, None);
                false
            }
        }
    }

    fn run_once(&mut self) -> Next {
        let ctx = &self.ctx;
        let counters = &self.counters;
        match self.fd.run() {
            Ok(exit) => match exit {
                // kvm-ioctls hands over count*size bytes without the access size; string
                // I/O (`rep outsb`) must reach devices one access at a time, so port I/O is
                // decoded from the raw kvm_run below.
                VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => Next::PortIo,
                VcpuExit::MmioRead(_, data) if !mmio_len_valid(data.len()) => {
                    invalid_mmio("read", data.len())
                }
                VcpuExit::MmioWrite(_, data) if !mmio_len_valid(data.len()) => {
                    invalid_mmio("write", data.len())
                }
                VcpuExit::MmioRead(addr, data) => {
                    counters.inc(ExitKind::MmioRead);
                    if !ctx.mmio.read(addr, data) {
                        counters.inc(ExitKind::UnclaimedMmio);
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    counters.inc(ExitKind::MmioWrite);
                    if !ctx.mmio.write(addr, data) {
                        counters.inc(ExitKind::UnclaimedMmio);
                    }
                    Next::Continue
                }
                VcpuExit::Hlt => {
                    // With the in-kernel LAPIC, HLT never reaches userspace; if it does, the
                    // next KVM_RUN simply halts again in the kernel.
                    counters.inc(ExitKind::Hlt);
                    Next::Continue
                }
                // A triple fault is a VM failure, not a reset: Ferrite guests have ACPI and
                // i8042 reset paths, so a triple fault almost always means a crash (often a
                // broken boot), and restarting would hide it in a reboot loop. The failure
                // report carries the registers and the bytes at RIP.
                VcpuExit::Shutdown => {
                    counters.inc(ExitKind::Shutdown);
                    Next::Fail("triple fault (KVM_EXIT_SHUTDOWN)".into())
                }
                VcpuExit::SystemEvent(kind, _) => {
                    counters.inc(ExitKind::SystemEvent);
                    match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => {
                            ctx.shutdown.request(ShutdownKind::PowerOff);
                            Next::Stop
                        }
                        KVM_SYSTEM_EVENT_RESET => {
                            ctx.shutdown.request(ShutdownKind::Reset);
                            Next::Stop
                        }
                        KVM_SYSTEM_EVENT_CRASH => Next::Fail("guest crash system event".into()),
                        other => Next::Fail(format!("unexpected system event {other}")),
                    }
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    counters.inc(ExitKind::FailEntry);
                    Next::Fail(format!(
                        "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host cpu {cpu})"
                    ))
                }
                VcpuExit::InternalError => {
                    counters.inc(ExitKind::InternalError);
                    Next::InternalError
                }
                VcpuExit::Intr => {
                    counters.inc(ExitKind::Interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                    Next::Continue
                }
                // kvm-ioctls 0.25 does not decode KVM_EXIT_DIRTY_RING_FULL.
                VcpuExit::Unsupported(crate::dirty::ring::KVM_EXIT_DIRTY_RING_FULL) => {
                    counters.inc(ExitKind::DirtyRingFull);
                    match &ctx.dirty_ring {
                        // Collected pages wait for the next harvest; after the reset KVM
                        // lets this vCPU run again.
                        Some(ring) => match ring.drain_full() {
                            Ok(_) => Next::Continue,
                            Err(e) => Next::Fail(format!("dirty ring full: {e}")),
                        },
                        None => Next::Fail("KVM_EXIT_DIRTY_RING_FULL without a dirty ring".into()),
                    }
                }
                VcpuExit::IrqWindowOpen | VcpuExit::Debug(_) | VcpuExit::IoapicEoi(_) => {
                    counters.inc(ExitKind::Other);
                    Next::Continue
                }
                other => {
                    counters.inc(ExitKind::Other);
                    Next::Fail(format!("unexpected exit {other:?}"))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counters.inc(ExitKind::Interrupted);
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Fail(format!("KVM_RUN failed: {e}")),
        }
    }

    /// Dispatch a `KVM_EXIT_IO` to the port-I/O bus, one `size`-byte access per repetition.
    /// Fails (rather than touching memory) if KVM's access size, count or data offset are
    /// out of bounds.
    fn handle_port_io(&mut self) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO (kvm-ioctls decoded it), so `io` is the union
        // member KVM filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        let range = pio_data_range(io.size, io.count, io.data_offset)?;
        let size = usize::from(io.size);
        let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
        // SAFETY: `pio_data_range` checked that the bytes lie inside the PIO data page that
        // follows the kvm_run struct in the vCPU's mapping (KVM_PIO_PAGE_OFFSET; the mapping
        // is at least that long); it lives as long as `self.fd`, and nothing else touches the
        // bytes while this vCPU is out of KVM_RUN.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(range.start), range.len()) };
        let port = u64::from(io.port);
        let is_in = u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN;
        for access in data.chunks_mut(size) {
            if is_in {
                self.counters.inc(ExitKind::IoIn);
                if !ctx.pio.read(port, access) {
                    self.counters.inc(ExitKind::UnclaimedPio);
                    access.fill(0xff);
                }
            } else {
                self.counters.inc(ExitKind::IoOut);
                if !ctx.pio.write(port, access) {
                    self.counters.inc(ExitKind::UnclaimedPio);
                }
            }
        }
        Ok(())
    }

    /// Decode `run->internal` / `run->emulation_failure` and repair when possible. Returns
    /// false after recording a failure.
    fn handle_internal_error(&mut self) -> bool {
        match self.try_repair() {
            Ok(()) => true,
            Err((reason, insn)) => {
                self.fail(reason, insn);
                false
            }
        }
    }

    fn try_repair(&mut self) -> Result<(), (String, Option<Vec<u8>>)> {
        let (suberror, insn_from_kvm, data) = {
            let run = self.fd.get_kvm_run();
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` member of
            // the union is the one KVM filled; `emulation_failure` shares its prefix and is
            // only read when suberror says KVM wrote it.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let mut insn = None;
            if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
                // SAFETY: as above; suberror 1 means the emulation_failure layout.
                let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
                // SAFETY: the anonymous union has a single member.
                let bytes = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                let has_bytes =
                    ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0;
                let size = usize::from(bytes.insn_size);
                if has_bytes && ef.ndata >= 3 && size > 0 && size <= repair::decode::MAX_INSN_LEN {
                    insn = Some(bytes.insn_bytes[..size].to_vec());
                }
            }
            let n = (internal.ndata as usize).min(internal.data.len());
            (internal.suberror, insn, internal.data[..n].to_vec())
        };
        let describe = || {
            let name = match suberror {
                1 => "emulation failure",
                2 => "simultaneous exceptions",
                3 => "event delivery failure",
                4 => "unexpected exit reason",
                _ => "unknown",
            };
            let extra: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
            format!(
                "KVM internal error, suberror {suberror} ({name}), data [{}]",
                extra.join(", ")
            )
        };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Err((describe(), insn_from_kvm));
        }
        let Some(stats) = self.ctx.repair.clone() else {
            let reason = format!("{} (instruction repair is off)", describe());
            return Err((reason, insn_from_kvm));
        };
        let vcpu_err = |what: &str, e: kvm_ioctls::Error| (format!("{what}: {e}"), None);
        let mut regs = self
            .fd
            .get_regs()
            .map_err(|e| vcpu_err("KVM_GET_REGS", e))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| vcpu_err("KVM_GET_SREGS", e))?;
        let mut insn = insn_from_kvm
            .clone()
            .unwrap_or_else(|| repair::fetch_insn(&self.ctx.memory, &regs, &sregs));
        let original_regs = regs;
        let mut result = repair::repair(&insn, &mut regs, &sregs, &self.ctx.memory, &self.fd);
        if insn_from_kvm.is_some()
            && matches!(result, Err(RepairError::Decode(DecodeError::Truncated)))
        {
            // KVM may hand over fewer bytes than the instruction has: read them from memory.
            insn = repair::fetch_insn(&self.ctx.memory, &original_regs, &sregs);
            regs = original_regs;
            result = repair::repair(&insn, &mut regs, &sregs, &self.ctx.memory, &self.fd);
        }
        match result {
            Ok(done) => {
                self.fd
                    .set_regs(&regs)
                    .map_err(|e| vcpu_err("KVM_SET_REGS", e))?;
                if let Some(inj) = done.inject {
                    self.inject(inj, &sregs)
                        .map_err(|r| (r, Some(insn.clone())))?;
                }
                stats.record(done.kind);
                tracing::debug!(
                    vcpu = self.id,
                    kind = done.kind.name(),
                    "repaired instruction"
                );
                Ok(())
            }
            Err(e) => Err((format!("unrepairable emulation failure: {e}"), Some(insn))),
        }
    }

    fn inject(&self, inj: Injection, sregs: &kvm_bindings::kvm_sregs) -> Result<(), String> {
        let mut ev = self
            .fd
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        match inj {
            Injection::Exception { vector, error_code } => {
                ev.exception.injected = 1;
                ev.exception.pending = 0;
                ev.exception.nr = vector;
                ev.exception.has_error_code = u8::from(error_code.is_some());
                ev.exception.error_code = error_code.unwrap_or(0);
            }
            Injection::SoftInterrupt { vector } => {
                ev.interrupt.injected = 1;
                ev.interrupt.nr = vector;
                ev.interrupt.soft = 1;
            }
            Injection::PageFault {
                address,
                error_code,
            } => {
                let mut s = *sregs;
                s.cr2 = address;
                self.fd
                    .set_sregs(&s)
                    .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
                ev.exception.injected = 1;
                ev.exception.pending = 0;
                ev.exception.nr = 14;
                ev.exception.has_error_code = 1;
                ev.exception.error_code = error_code;
            }
        }
        // Leave NMI, SIPI, shadow and SMM state as they are.
        ev.flags = 0;
        self.fd
            .set_vcpu_events(&ev)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
    }

    fn fail(&mut self, reason: String, insn: Option<Vec<u8>>) {
        if self.ctx.control.failure_recorded() {
            return;
        }
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        let insn = match (insn, &regs, &sregs) {
            (Some(b), _, _) => b,
            (None, Some(r), Some(s)) => repair::fetch_insn(&self.ctx.memory, r, s),
            _ => Vec::new(),
        };
        self.ctx.control.fail(FailureReport {
            vcpu: self.id,
            reason,
            regs,
            sregs,
            insn,
        });
    }
}

/// Page size of the vCPU's kvm_run mapping.
const KVM_RUN_PAGE: usize = 4096;
/// End of the PIO data page (page 1 of the kvm_run mapping, `KVM_PIO_PAGE_OFFSET`), which
/// every x86 KVM maps.
const PIO_PAGE_END: usize = 2 * KVM_RUN_PAGE;
/// Largest MMIO access KVM hands to userspace in one exit (`kvm_run.mmio.data`).
const MAX_MMIO_LEN: usize = 8;

/// Where the data of a `KVM_EXIT_IO` lies in the kvm_run mapping: `count` accesses of `size`
/// bytes at `data_offset`. KVM only ever reports sizes 1, 2 and 4 and data within the PIO
/// page; anything else is refused rather than trusted.
fn pio_data_range(size: u8, count: u32, data_offset: u64) -> Result<Range<usize>, String> {
    let bad = || {
        format!("invalid port I/O exit (size {size}, count {count}, data offset {data_offset:#x})")
    };
    if !matches!(size, 1 | 2 | 4) || count == 0 {
        return Err(bad());
    }
    let start = usize::try_from(data_offset).map_err(|_| bad())?;
    let len = usize::from(size)
        .checked_mul(usize::try_from(count).map_err(|_| bad())?)
        .ok_or_else(bad)?;
    let end = start.checked_add(len).ok_or_else(bad)?;
    if start < std::mem::size_of::<kvm_bindings::kvm_run>() || end > PIO_PAGE_END {
        return Err(bad());
    }
    Ok(start..end)
}

/// Whether an MMIO exit's data length is one KVM can report (1 to 8 bytes). kvm-ioctls
/// already panics on more than 8 (caught by the run loop); zero would reach devices that
/// expect at least one byte.
fn mmio_len_valid(len: usize) -> bool {
    (1..=MAX_MMIO_LEN).contains(&len)
}

/// The failure for an MMIO exit whose length [`mmio_len_valid`] refuses.
fn invalid_mmio(access: &str, len: usize) -> Next {
    Next::Fail(format!("MMIO {access} exit with invalid length {len}"))
}

/// The message of a caught panic, if it has one.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

impl RunControl {
    fn failure_recorded(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin_threads(ctl: &Arc<RunControl>, n: usize) -> Vec<std::thread::JoinHandle<()>> {
        spin_threads_counting(ctl, n, Arc::default())
    }

    fn spin_threads_counting(
        ctl: &Arc<RunControl>,
        n: usize,
        ran: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let ctl = ctl.clone();
                let ran = ran.clone();
                std::thread::spawn(move || {
                    while !ctl.exit_requested() {
                        if ctl.pause_requested() {
                            // The fake vCPUs have no fd: count the tasks instead of running them.
                            ctl.park(|_task| {
                                ran.fetch_add(1, Ordering::SeqCst);
                            });
                        }
                        std::thread::yield_now();
                    }
                })
            })
            .collect()
    }

    #[test]
    fn test_run_on_parked_runs_the_task_once_on_every_parked_vcpu() {
        let ctl = Arc::new(RunControl::new().unwrap());
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads = spin_threads_counting(&ctl, 3, ran.clone());
        ctl.request_pause();
        ctl.wait_parked(3);
        let task: ParkedTask = Arc::new(|_, _| {});

        let first = ctl.run_on_parked(task.clone(), Duration::from_secs(5));
        let second = ctl.run_on_parked(task, Duration::from_secs(5));
        ctl.resume();
        ctl.request_exit();
        for t in threads {
            t.join().unwrap();
        }

        assert!(first && second);
        assert_eq!(ran.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn test_run_on_parked_refuses_when_not_paused() {
        let ctl = RunControl::new().unwrap();

        assert!(!ctl.run_on_parked(Arc::new(|_, _| {}), Duration::from_millis(10)));
    }

    #[test]
    fn test_run_control_pause_parks_all_then_resume_and_exit_release_them() {
        let ctl = Arc::new(RunControl::new().unwrap());
        let threads = spin_threads(&ctl, 2);

        ctl.request_pause();
        ctl.wait_parked(2);
        let parked = ctl.lock_pause().parked;
        ctl.resume();
        ctl.request_exit();
        for t in threads {
            t.join().unwrap();
        }

        assert_eq!(parked, 2);
        assert_eq!(ctl.lock_pause().parked, 0);
    }

    #[test]
    fn test_run_control_wait_parked_counts_exited_loops() {
        let ctl = Arc::new(RunControl::new().unwrap());
        let threads = spin_threads(&ctl, 1);
        ctl.loop_exited();

        ctl.request_pause();
        ctl.wait_parked(2);
        ctl.request_exit();
        for t in threads {
            t.join().unwrap();
        }

        assert_eq!(ctl.lock_pause().exited, 1);
    }

    #[test]
    fn test_run_control_wait_parked_timeout_gives_up_when_a_vcpu_never_parks() {
        let ctl = RunControl::new().unwrap();
        let mut kicks = 0;

        ctl.request_pause();
        let parked = ctl.wait_parked_timeout(1, Duration::from_millis(50), || kicks += 1);

        assert!(!parked);
        assert!(kicks >= 1);
    }

    #[test]
    fn test_run_control_first_failure_wins_and_signals_event() {
        let ctl = RunControl::new().unwrap();
        let report = |reason: &str| FailureReport {
            vcpu: 0,
            reason: reason.into(),
            regs: None,
            sregs: None,
            insn: Vec::new(),
        };

        ctl.fail(report("first"));
        ctl.fail(report("second"));

        assert_eq!(ctl.failure_event().read().unwrap(), 1);
        assert_eq!(ctl.take_failure().unwrap().reason, "first");
        assert!(ctl.take_failure().is_none());
    }
    #[test]
    fn test_pio_data_range_string_io_in_pio_page_is_accepted() {
        let range = pio_data_range(2, 3, KVM_RUN_PAGE as u64);

        assert_eq!(range, Ok(KVM_RUN_PAGE..KVM_RUN_PAGE + 6));
    }

    #[test]
    fn test_pio_data_range_full_page_is_accepted() {
        let range = pio_data_range(4, 1024, KVM_RUN_PAGE as u64);

        assert_eq!(range, Ok(KVM_RUN_PAGE..PIO_PAGE_END));
    }

    #[test]
    fn test_pio_data_range_bad_size_or_zero_count_is_error() {
        for (size, count) in [(0, 1), (3, 1), (8, 1), (255, 1), (1, 0)] {
            assert!(
                pio_data_range(size, count, KVM_RUN_PAGE as u64).is_err(),
                "size {size} count {count}"
            );
        }
    }

    #[test]
    fn test_pio_data_range_beyond_pio_page_is_error() {
        let too_many = pio_data_range(4, 1025, KVM_RUN_PAGE as u64);
        let huge_count = pio_data_range(4, u32::MAX, KVM_RUN_PAGE as u64);
        let late_offset = pio_data_range(1, 1, PIO_PAGE_END as u64);
        let wrapping_offset = pio_data_range(1, 2, u64::MAX);

        assert!(too_many.is_err());
        assert!(huge_count.is_err());
        assert!(late_offset.is_err());
        assert!(wrapping_offset.is_err());
    }

    #[test]
    fn test_pio_data_range_inside_kvm_run_struct_is_error() {
        let range = pio_data_range(1, 1, 0);

        assert!(range.is_err());
    }

    #[test]
    fn test_mmio_len_valid_only_1_to_8() {
        let valid: Vec<usize> = (0..=16).filter(|&n| mmio_len_valid(n)).collect();

        assert_eq!(valid, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn test_panic_text_reads_str_and_string_payloads() {
        let from_str = panic::catch_unwind(|| panic!("boom")).unwrap_err();
        let from_string = panic::catch_unwind(|| panic!("{}", 42)).unwrap_err();

        assert_eq!(panic_text(&*from_str), "boom");
        assert_eq!(panic_text(&*from_string), "42");
    }
}
