//! The UART as a port-I/O bus device.

use std::io::{self, Write};
use std::sync::Arc;

use vm_device::{BusDevice, LegacyIrq};
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::SerialMetrics;
use super::state::SerialState;
use crate::error::DeviceError;
use crate::irq::IrqLine;

/// Number of I/O ports a UART decodes (insert it on the PIO bus with this length).
pub const SERIAL_PORT_LEN: u64 = 8;
/// Capacity of the receive FIFO (vm-superio's, fixed).
pub const SERIAL_FIFO_SIZE: usize = 64;

/// Where the guest's output goes: stdout, a log file or a [`super::ConsoleWriter`].
type Sink = Box<dyn Write + Send>;
type Inner = vm_superio::Serial<IrqLine, Arc<EventHooks>, Sink>;

/// vm-superio's callbacks: count traffic and wake the host input thread when the guest has
/// drained the receive FIFO.
struct EventHooks {
    metrics: Arc<SerialMetrics>,
    input_space: EventFd,
}

impl SerialEvents for EventHooks {
    fn buffer_read(&self) {
        self.metrics.rx_reads.inc();
    }

    fn out_byte(&self) {
        self.metrics.tx_bytes.inc();
    }

    fn tx_lost_byte(&self) {
        self.metrics.tx_lost_bytes.inc();
    }

    fn in_buffer_empty(&self) {
        // Failure means the counter is saturated: a wake-up is already pending.
        let _ = self.input_space.write(1);
    }
}

/// A 16550A UART (COM1) on the port-I/O bus.
///
/// Output bytes are written to the sink synchronously on the vCPU thread, so the sink must not
/// block for long: pass a [`super::ConsoleWriter`] (bounded buffer drained by a thread; output is
/// dropped and counted when the reader stalls) rather than a raw pipe. Losing console output is
/// preferred to hanging a vCPU.
pub struct Serial {
    inner: Inner,
    irq: IrqLine,
    hooks: Arc<EventHooks>,
    metrics: Arc<SerialMetrics>,
}

impl Serial {
    /// A UART in its power-on state that raises `irq` and writes guest output to `out`.
    pub fn new(irq: LegacyIrq, out: Box<dyn Write + Send>) -> Result<Self, DeviceError> {
        let irq = IrqLine::new(irq);
        let metrics = Arc::new(SerialMetrics::default());
        let hooks = Arc::new(EventHooks {
            metrics: metrics.clone(),
            input_space: EventFd::new(EFD_NONBLOCK)?,
        });
        let inner = vm_superio::Serial::with_events(irq.clone(), hooks.clone(), out);
        Ok(Self {
            inner,
            irq,
            hooks,
            metrics,
        })
    }

    /// The counters of this UART (keep the `Arc` to report them without locking the device).
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// The GSI this UART interrupts on.
    pub fn gsi(&self) -> u32 {
        self.irq.gsi()
    }

    /// An eventfd signalled each time the guest empties the receive FIFO: the host input thread
    /// waits on it after [`Serial::enqueue_input`] took fewer bytes than offered.
    pub fn input_space_event(&self) -> io::Result<EventFd> {
        self.hooks.input_space.try_clone()
    }

    /// Free room in the receive FIFO, in bytes.
    pub fn input_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Queue host input (the VMM's stdin thread). Takes as many bytes as fit in the receive FIFO
    /// and returns how many were taken; the caller keeps the rest and retries once
    /// [`Serial::input_space_event`] fires. Returns 0 when the FIFO is full or the guest put the
    /// UART in loopback mode (then host input is not wired to the receiver).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        let taken = self.inner.enqueue_raw_bytes(bytes).unwrap_or(0);
        if taken == 0 {
            self.metrics.rx_fifo_full.inc();
        }
        self.metrics.rx_bytes.add(taken as u64);
        taken
    }

    /// Like [`Serial::enqueue_input`] but discards (and counts) what does not fit, for callers
    /// that cannot hold input back.
    pub fn enqueue_input_lossy(&mut self, bytes: &[u8]) -> usize {
        let taken = self.enqueue_input(bytes);
        let dropped = bytes.len().saturating_sub(taken);
        self.metrics.rx_dropped_bytes.add(dropped as u64);
        taken
    }

    /// The guest-visible state, for snapshots.
    pub fn save(&self) -> SerialState {
        self.inner.state().into()
    }

    /// Replace the registers and receive FIFO with a saved state, keeping the interrupt line and
    /// output sink. A pending interrupt in the state is re-raised.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), DeviceError> {
        if state.in_buffer.len() > SERIAL_FIFO_SIZE {
            return Err(DeviceError::invalid_state(
                "serial",
                format!(
                    "receive FIFO holds {} bytes, more than {SERIAL_FIFO_SIZE}",
                    state.in_buffer.len()
                ),
            ));
        }
        let placeholder: Sink = Box::new(io::sink());
        let placeholder =
            vm_superio::Serial::with_events(self.irq.clone(), self.hooks.clone(), placeholder);
        let old = std::mem::replace(&mut self.inner, placeholder);
        let out = old.into_writer();
        let mut regs: vm_superio::SerialState = state.into();
        // Only the low four IER bits exist; a guest write could never set the others.
        regs.interrupt_enable &= 0x0f;
        match vm_superio::Serial::from_state(&regs, self.irq.clone(), self.hooks.clone(), out) {
            Ok(inner) => {
                self.inner = inner;
                Ok(())
            }
            // Unreachable after the length check (the trigger is infallible), but the sink is
            // gone with the error: say so rather than pretend.
            Err(e) => Err(DeviceError::invalid_state("serial", format!("{e:?}"))),
        }
    }

    /// One register access at `offset` (0..8), or `None` if outside the UART.
    fn register(offset: u64) -> Option<u8> {
        u8::try_from(offset)
            .ok()
            .filter(|o| u64::from(*o) < SERIAL_PORT_LEN)
    }
}

impl BusDevice for Serial {
    /// Each byte of a wider access reads the next register, as an ISA bus splits it.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match Self::register(offset.saturating_add(i as u64)) {
                Some(reg) => self.inner.read(reg),
                None => {
                    self.metrics.invalid_accesses.inc();
                    0
                }
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            match Self::register(offset.saturating_add(i as u64)) {
                // A failed sink write is already counted as a lost byte by the event hooks.
                Some(reg) => {
                    if let Err(e) = self.inner.write(reg, *byte) {
                        tracing::trace!("Serial output lost: {e:?}");
                    }
                }
                None => self.metrics.invalid_accesses.inc(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    /// A sink the test can inspect.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink that always fails, like a closed pipe.
    struct BrokenSink;

    impl Write for BrokenSink {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn irq() -> (LegacyIrq, EventFd) {
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = event.try_clone().unwrap();
        (LegacyIrq { gsi: 4, event }, probe)
    }

    fn serial() -> (Serial, SharedBuf, EventFd) {
        let (irq, probe) = irq();
        let buf = SharedBuf::default();
        let serial = Serial::new(irq, Box::new(buf.clone())).unwrap();
        (serial, buf, probe)
    }

    fn read1(s: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        s.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn test_serial_thr_write_reaches_sink_and_raises_irq_when_enabled() {
        let (mut s, buf, probe) = serial();
        s.write(IER, &[0x02]); // THR-empty interrupt enable: raises at once.
        assert_eq!(probe.read().unwrap(), 1);
        read1(&mut s, IIR); // Acknowledge.

        s.write(DATA, b"h");
        s.write(DATA, b"i");

        assert_eq!(buf.0.lock().unwrap().as_slice(), b"hi");
        assert!(probe.read().unwrap() >= 1);
        assert_eq!(s.metrics().tx_bytes.get(), 2);
    }

    #[test]
    fn test_serial_thr_write_without_ier_raises_no_irq() {
        let (mut s, buf, probe) = serial();

        s.write(DATA, b"x");

        assert_eq!(buf.0.lock().unwrap().as_slice(), b"x");
        assert_eq!(probe.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn test_serial_input_is_read_by_guest_and_raises_rda_irq() {
        let (mut s, _buf, probe) = serial();
        s.write(IER, &[0x01]);

        let taken = s.enqueue_input(b"ok");

        assert_eq!(taken, 2);
        assert_eq!(probe.read().unwrap(), 1);
        assert_eq!(read1(&mut s, LSR) & 0x01, 0x01);
        assert_eq!(read1(&mut s, DATA), b'o');
        assert_eq!(read1(&mut s, DATA), b'k');
        assert_eq!(read1(&mut s, LSR) & 0x01, 0);
        assert_eq!(s.metrics().rx_bytes.get(), 2);
    }

    #[test]
    fn test_serial_input_full_fifo_applies_backpressure() {
        let (mut s, _buf, _probe) = serial();
        let space = s.input_space_event().unwrap();
        let input = [b'a'; SERIAL_FIFO_SIZE + 10];

        let first = s.enqueue_input(&input);
        let second = s.enqueue_input(&input[first..]);

        assert_eq!(first, SERIAL_FIFO_SIZE);
        assert_eq!(second, 0);
        assert_eq!(s.input_capacity(), 0);
        assert_eq!(s.metrics().rx_fifo_full.get(), 1);
        assert_eq!(space.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);

        for _ in 0..SERIAL_FIFO_SIZE {
            read1(&mut s, DATA);
        }

        assert!(space.read().unwrap() >= 1);
        assert_eq!(s.enqueue_input(&input[first..]), 10);
    }

    #[test]
    fn test_serial_lossy_input_counts_dropped_bytes() {
        let (mut s, _buf, _probe) = serial();

        let taken = s.enqueue_input_lossy(&[0u8; SERIAL_FIFO_SIZE + 3]);

        assert_eq!(taken, SERIAL_FIFO_SIZE);
        assert_eq!(s.metrics().rx_dropped_bytes.get(), 3);
    }

    #[test]
    fn test_serial_broken_sink_counts_lost_bytes_without_error() {
        let (irq, _probe) = irq();
        let mut s = Serial::new(irq, Box::new(BrokenSink)).unwrap();

        for byte in b"abc" {
            s.write(DATA, &[*byte]);
        }

        assert_eq!(s.metrics().tx_lost_bytes.get(), 3);
        assert_eq!(s.metrics().tx_bytes.get(), 0);
    }

    #[test]
    fn test_serial_odd_offsets_and_widths_do_not_panic() {
        let (mut s, _buf, _probe) = serial();
        let mut wide = [0xaau8; 16];

        s.read(u64::MAX, &mut wide[..4]);
        s.read(6, &mut wide);
        s.write(u64::MAX - 1, &[1, 2, 3]);
        s.write(7, &[0x55, 0x66]);
        s.read(0, &mut []);
        s.write(0, &[]);

        assert_eq!(wide[2..], [0u8; 14]);
        assert_eq!(read1(&mut s, SCR), 0x55);
        assert!(s.metrics().invalid_accesses.get() > 0);
    }

    #[test]
    fn test_serial_save_restore_round_trips_registers_and_fifo() {
        let (mut s, _buf, _probe) = serial();
        s.write(LCR, &[0x03]);
        s.write(MCR, &[0x0b]);
        s.write(SCR, &[0x42]);
        s.enqueue_input(b"xyz");
        let saved = s.save();
        let json = serde_json::to_string(&saved).unwrap();
        let (mut fresh, buf, _probe2) = serial();

        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();

        assert_eq!(fresh.save(), saved);
        assert_eq!(read1(&mut fresh, SCR), 0x42);
        assert_eq!(read1(&mut fresh, DATA), b'x');
        fresh.write(DATA, b"!");
        assert_eq!(buf.0.lock().unwrap().as_slice(), b"!");
    }

    #[test]
    fn test_serial_restore_oversized_fifo_is_refused() {
        let (mut s, _buf, _probe) = serial();
        let state = SerialState {
            in_buffer: vec![0; SERIAL_FIFO_SIZE + 1],
            ..SerialState::default()
        };

        let result = s.restore(&state);

        assert!(matches!(result, Err(DeviceError::InvalidState { .. })));
    }
}
