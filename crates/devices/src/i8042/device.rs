//! The i8042 as a port-I/O bus device at 0x60 (data) and 0x64 (command/status).

use std::collections::VecDeque;
use std::sync::Arc;

use vm_device::{BusDevice, LegacyIrq, ShutdownKind, ShutdownSignal};

use super::metrics::I8042Metrics;
use super::state::I8042State;
use crate::error::DeviceError;
use crate::irq::IrqLine;

/// Length of the bus range starting at the data port (0x60..=0x64).
pub const I8042_PORT_LEN: u64 =
    (arch::layout::ports::I8042_COMMAND - arch::layout::ports::I8042_DATA) as u64 + 1;

/// Offset of the data port inside the range.
const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port inside the range.
const COMMAND_OFFSET: u64 =
    (arch::layout::ports::I8042_COMMAND - arch::layout::ports::I8042_DATA) as u64;

/// Most bytes queued for the guest (real hardware has one; keyboard replies need up to three).
const OUTPUT_CAPACITY: usize = 16;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_UNLOCKED: u8 = 0x10;

// Configuration byte bits.
const CFG_KBD_INT: u8 = 0x01;
const CFG_SYSTEM_FLAG: u8 = 0x04;
const CFG_KBD_DISABLED: u8 = 0x10;
const CFG_AUX_DISABLED: u8 = 0x20;
const CFG_TRANSLATE: u8 = 0x40;

/// Output port bit 0: the CPU reset line, active low.
const OUTP_RESET_LINE: u8 = 0x01;
/// Output port bit 1: the A20 gate.
const OUTP_A20: u8 = 0x02;

// Controller commands.
const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_FIRST: u8 = 0xf0;

// Replies.
const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// Interface test result "clock line stuck low": there is no mouse port.
const PORT_TEST_ABSENT: u8 = 0x01;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;

// Keyboard commands with special replies or a parameter byte.
const KBD_CMD_SET_LEDS: u8 = 0xed;
const KBD_CMD_ECHO: u8 = 0xee;
const KBD_CMD_SCANCODE_SET: u8 = 0xf0;
const KBD_CMD_IDENTIFY: u8 = 0xf2;
const KBD_CMD_TYPEMATIC: u8 = 0xf3;
const KBD_CMD_RESET: u8 = 0xff;
/// Identify reply of an MF2 keyboard (after the ACK).
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// The i8042 keyboard controller. No key input is generated; a keyboard is present and
/// acknowledges commands, the auxiliary (mouse) port is absent.
pub struct I8042 {
    config: u8,
    output_port: u8,
    pending_command: Option<u8>,
    pending_kbd_command: Option<u8>,
    output: VecDeque<u8>,
    last_write_was_command: bool,
    shutdown: ShutdownSignal,
    irq: Option<IrqLine>,
    metrics: Arc<I8042Metrics>,
}

impl I8042 {
    /// A controller that requests `ShutdownKind::Reset` on `shutdown` and raises `irq` (GSI 1)
    /// when a byte is ready, if given. Without an IRQ the guest must poll (Linux waits for
    /// keyboard replies by interrupt, so it then times out its keyboard probe, harmlessly).
    pub fn new(shutdown: ShutdownSignal, irq: Option<LegacyIrq>) -> Self {
        Self {
            config: CFG_KBD_INT | CFG_SYSTEM_FLAG | CFG_AUX_DISABLED | CFG_TRANSLATE,
            output_port: OUTP_RESET_LINE | OUTP_A20,
            pending_command: None,
            pending_kbd_command: None,
            output: VecDeque::new(),
            last_write_was_command: false,
            shutdown,
            irq: irq.map(IrqLine::new),
            metrics: Arc::new(I8042Metrics::default()),
        }
    }

    /// The counters of this controller.
    pub fn metrics(&self) -> Arc<I8042Metrics> {
        self.metrics.clone()
    }

    /// The guest-visible state, for snapshots.
    pub fn save(&self) -> I8042State {
        I8042State {
            config: self.config,
            output_port: self.output_port,
            pending_command: self.pending_command,
            pending_kbd_command: self.pending_kbd_command,
            output: self.output.iter().copied().collect(),
            last_write_was_command: self.last_write_was_command,
        }
    }

    /// Load a saved state (validated: the output queue is bounded).
    pub fn restore(&mut self, state: &I8042State) -> Result<(), DeviceError> {
        if state.output.len() > OUTPUT_CAPACITY {
            return Err(DeviceError::invalid_state(
                "i8042",
                format!(
                    "{} queued bytes, more than {OUTPUT_CAPACITY}",
                    state.output.len()
                ),
            ));
        }
        self.config = state.config;
        self.output_port = state.output_port;
        self.pending_command = state.pending_command;
        self.pending_kbd_command = state.pending_kbd_command;
        self.output = state.output.iter().copied().collect();
        self.last_write_was_command = state.last_write_was_command;
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut status = SB_SYSTEM_FLAG | SB_KBD_UNLOCKED;
        if !self.output.is_empty() {
            status |= SB_OUT_FULL;
        }
        if self.last_write_was_command {
            status |= SB_LAST_WAS_COMMAND;
        }
        status
    }

    /// Queue bytes for the guest and interrupt if the keyboard interrupt is enabled.
    fn push_output(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.output.len() >= OUTPUT_CAPACITY {
                self.metrics.output_overflows.inc();
                continue;
            }
            self.output.push_back(byte);
        }
        self.maybe_interrupt();
    }

    fn maybe_interrupt(&self) {
        if !self.output.is_empty() && self.config & CFG_KBD_INT != 0 {
            if let Some(irq) = &self.irq {
                irq.trigger();
            }
        }
    }

    fn request_reset(&mut self) {
        self.metrics.reset_requests.inc();
        tracing::info!("i8042: guest pulsed the reset line");
        self.shutdown.request(ShutdownKind::Reset);
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        // Edge-triggered line: announce the next byte, if any.
        self.maybe_interrupt();
        byte
    }

    fn write_command(&mut self, command: u8) {
        self.last_write_was_command = true;
        self.pending_command = None;
        match command {
            CMD_READ_CONFIG => self.push_output(&[self.config]),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => self.pending_command = Some(command),
            CMD_DISABLE_AUX => self.config |= CFG_AUX_DISABLED,
            CMD_ENABLE_AUX => self.config &= !CFG_AUX_DISABLED,
            CMD_TEST_AUX => self.push_output(&[PORT_TEST_ABSENT]),
            CMD_SELF_TEST => self.push_output(&[SELF_TEST_OK]),
            CMD_TEST_KBD => self.push_output(&[PORT_TEST_OK]),
            CMD_DISABLE_KBD => self.config |= CFG_KBD_DISABLED,
            CMD_ENABLE_KBD => self.config &= !CFG_KBD_DISABLED,
            CMD_READ_OUTP => self.push_output(&[self.output_port]),
            // Pulse output lines for ~6 µs: bits 0-3 low select the lines; bit 0 is reset.
            CMD_PULSE_FIRST..=0xff => {
                if command & OUTP_RESET_LINE == 0 {
                    self.request_reset();
                }
            }
            _ => {
                self.metrics.unknown_commands.inc();
                tracing::debug!("i8042: unsupported command {command:#04x} ignored");
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_write_was_command = false;
        match self.pending_command.take() {
            Some(CMD_WRITE_CONFIG) => self.config = value,
            Some(CMD_WRITE_OUTP) => {
                self.output_port = value;
                if value & OUTP_RESET_LINE == 0 {
                    self.request_reset();
                }
            }
            Some(CMD_WRITE_KBD_OUT) => self.push_output(&[value]),
            // No mouse: bytes for or from the auxiliary port go nowhere.
            Some(_) => {}
            None => self.keyboard_command(value),
        }
    }

    /// A byte sent to the keyboard itself: acknowledge like an MF2 keyboard.
    fn keyboard_command(&mut self, value: u8) {
        if self.pending_kbd_command.take().is_some() {
            // Parameter of LED / scancode-set / typematic commands.
            self.push_output(&[KBD_ACK]);
            return;
        }
        match value {
            KBD_CMD_SET_LEDS | KBD_CMD_SCANCODE_SET | KBD_CMD_TYPEMATIC => {
                self.pending_kbd_command = Some(value);
                self.push_output(&[KBD_ACK]);
            }
            KBD_CMD_ECHO => self.push_output(&[KBD_ECHO]),
            KBD_CMD_IDENTIFY => self.push_output(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_CMD_RESET => self.push_output(&[KBD_ACK, KBD_SELF_TEST_OK]),
            _ => self.push_output(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    /// Byte-wide registers: a wider access reads the first port and fills the rest with 0.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        rest.fill(0);
        *first = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => {
                self.metrics.invalid_accesses.inc();
                0
            }
        };
    }

    /// Byte-wide registers: only the low byte of a wider write is used.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA_OFFSET => self.write_data(value),
            COMMAND_OFFSET => self.write_command(value),
            _ => self.metrics.invalid_accesses.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    fn device() -> (I8042, ShutdownSignal) {
        let shutdown = ShutdownSignal::new().unwrap();
        (I8042::new(shutdown.clone(), None), shutdown)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut data = [0xffu8; 1];
        dev.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn test_i8042_port_len_covers_data_and_command_ports() {
        assert_eq!(I8042_PORT_LEN, 5);
        assert_eq!(COMMAND_OFFSET, 4);
    }

    #[test]
    fn test_i8042_idle_status_has_system_flag_and_no_data() {
        let (mut dev, _) = device();

        let status = read(&mut dev, COMMAND_OFFSET);

        assert_eq!(status & SB_OUT_FULL, 0);
        assert_ne!(status & SB_SYSTEM_FLAG, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
    }

    #[test]
    fn test_i8042_command_fe_requests_reset() {
        let (mut dev, shutdown) = device();

        dev.write(COMMAND_OFFSET, &[0xfe]);

        assert_eq!(shutdown.requested(), Some(ShutdownKind::Reset));
        assert_eq!(dev.metrics().reset_requests.get(), 1);
    }

    #[test]
    fn test_i8042_pulse_without_reset_bit_does_not_reset() {
        let (mut dev, shutdown) = device();

        dev.write(COMMAND_OFFSET, &[0xff]);

        assert_eq!(shutdown.requested(), None);
    }

    #[test]
    fn test_i8042_write_output_port_data_is_accepted_and_read_back() {
        let (mut dev, shutdown) = device();

        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTP]);
        dev.write(DATA_OFFSET, &[0xdf]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_OUTP]);

        assert_eq!(read(&mut dev, DATA_OFFSET), 0xdf);
        assert_eq!(shutdown.requested(), None);
    }

    #[test]
    fn test_i8042_write_config_data_is_read_back_by_0x20() {
        let (mut dev, _) = device();

        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        dev.write(DATA_OFFSET, &[0x65]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);

        assert_ne!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x65);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
    }

    #[test]
    fn test_i8042_self_test_and_keyboard_reset_replies() {
        let (mut dev, _) = device();

        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        dev.write(DATA_OFFSET, &[KBD_CMD_RESET]);

        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_SELF_TEST_OK);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
    }

    #[test]
    fn test_i8042_keyboard_reply_raises_irq_when_enabled() {
        let shutdown = ShutdownSignal::new().unwrap();
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = event.try_clone().unwrap();
        let mut dev = I8042::new(shutdown, Some(LegacyIrq { gsi: 1, event }));

        dev.write(DATA_OFFSET, &[0xf4]);

        assert_eq!(probe.read().unwrap(), 1);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        assert_eq!(probe.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn test_i8042_output_queue_is_bounded() {
        let (mut dev, _) = device();

        for _ in 0..OUTPUT_CAPACITY + 5 {
            dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }

        assert_eq!(dev.save().output.len(), OUTPUT_CAPACITY);
        assert_eq!(dev.metrics().output_overflows.get(), 5);
    }

    #[test]
    fn test_i8042_odd_offsets_and_widths_do_not_panic() {
        let (mut dev, _) = device();
        let mut wide = [0xaau8; 8];

        for offset in [1, 2, 3, 5, u64::MAX] {
            dev.read(offset, &mut wide);
            dev.write(offset, &[0xfe, 0xfe]);
        }
        dev.read(COMMAND_OFFSET, &mut []);
        dev.write(COMMAND_OFFSET, &[]);
        dev.read(COMMAND_OFFSET, &mut wide);

        assert_eq!(wide[1..], [0u8; 7]);
        assert_eq!(dev.metrics().invalid_accesses.get(), 10);
    }

    #[test]
    fn test_i8042_save_restore_round_trips() {
        let (mut dev, _) = device();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(DATA_OFFSET, &[KBD_CMD_IDENTIFY]);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTP]);
        let saved = dev.save();
        let json = serde_json::to_string(&saved).unwrap();
        let (mut fresh, _) = device();

        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();

        assert_eq!(fresh.save(), saved);
        assert_eq!(read(&mut fresh, DATA_OFFSET), KBD_ACK);
    }

    #[test]
    fn test_i8042_restore_oversized_queue_is_refused() {
        let (mut dev, _) = device();
        let mut state = dev.save();
        state.output = vec![0; OUTPUT_CAPACITY + 1];

        assert!(dev.restore(&state).is_err());
    }
}
