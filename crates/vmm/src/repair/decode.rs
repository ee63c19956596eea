//! A deliberately small x86 decoder: just the instructions an emulating host's KVM gives up on
//! and the VMM knows how to finish (prefixes, ModRM, SIB, displacement).

/// The vCPU's execution mode, which decides default operand/address sizes and REX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode or 16-bit protected mode.
    Bits16,
    /// 32-bit protected mode (or compatibility mode).
    Bits32,
    /// 64-bit long mode.
    Bits64,
}

/// A segment register named by an override prefix or implied by the addressing form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// ES (0x26).
    Es,
    /// CS (0x2e).
    Cs,
    /// SS (0x36).
    Ss,
    /// DS (0x3e).
    Ds,
    /// FS (0x64).
    Fs,
    /// GS (0x65).
    Gs,
}

/// A decoded memory operand: `seg:[base + index*scale + disp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Base register number (0 = RAX … 15 = R15), if any.
    pub base: Option<u8>,
    /// Index register number and scale (1, 2, 4, 8), if any.
    pub index: Option<(u8, u8)>,
    /// Sign-extended displacement.
    pub disp: i64,
    /// RIP-relative: the displacement is added to the address of the next instruction.
    pub rip_relative: bool,
    /// Segment the address is relative to.
    pub segment: Segment,
    /// Address size in bytes (4 or 8).
    pub addr_size: u8,
}

/// The instructions the repair hook understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `int3` (0xCC): #BP.
    Int3,
    /// `int imm8` (0xCD ib).
    IntN(u8),
    /// `int1` / `icebp` (0xF1): #DB.
    Int1,
    /// `into` (0xCE): #OF if OF is set (not valid in 64-bit mode).
    Into,
    /// `fwait` (0x9B).
    Fwait,
    /// `cmpxchg16b m128` (REX.W 0F C7 /1).
    Cmpxchg16b(MemOperand),
    /// `ldmxcsr m32` (0F AE /2).
    Ldmxcsr(MemOperand),
    /// `stmxcsr m32` (0F AE /3).
    Stmxcsr(MemOperand),
    /// `xgetbv` (0F 01 D0).
    Xgetbv,
    /// `xsetbv` (0F 01 D1).
    Xsetbv,
    /// `clac` (0F 01 CA).
    Clac,
    /// `stac` (0F 01 CB).
    Stac,
    /// `iret` (0xCF) with an operand size of 4 (`iretd`) or 8 (`iretq`, REX.W).
    Iret(u8),
}

/// One decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Total length including prefixes.
    pub len: usize,
    /// What it does.
    pub op: Op,
    /// A LOCK prefix was present.
    pub lock: bool,
}

/// Why an instruction could not be decoded into something repairable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    #[error("Instruction truncated")]
    Truncated,
    /// More than 15 bytes.
    #[error("Instruction longer than 15 bytes")]
    TooLong,
    /// Valid x86 perhaps, but not one the repair hook handles.
    #[error("Unsupported instruction")]
    Unsupported,
    /// A memory-operand form the repair hook does not handle (16-bit addressing).
    #[error("Unsupported addressing form")]
    UnsupportedAddressing,
}

/// Maximum x86 instruction length.
pub const MAX_INSN_LEN: usize = 15;

#[derive(Default)]
struct Prefixes {
    opsize: bool,
    addrsize: bool,
    rep: bool,
    repne: bool,
    lock: bool,
    segment: Option<Segment>,
    rex: u8,
}

impl Prefixes {
    fn rex_w(&self) -> bool {
        self.rex & 8 != 0
    }
    fn rex_x(&self) -> u8 {
        (self.rex >> 1) & 1
    }
    fn rex_b(&self) -> u8 {
        self.rex & 1
    }
    fn any_simd(&self) -> bool {
        self.opsize || self.rep || self.repne
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= MAX_INSN_LEN {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }
    fn i8(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from(self.next()? as i8))
    }
    fn i32(&mut self) -> Result<i64, DecodeError> {
        let mut v = [0u8; 4];
        for b in &mut v {
            *b = self.next()?;
        }
        Ok(i64::from(i32::from_le_bytes(v)))
    }
}

/// Decode the instruction at the start of `bytes` in `mode`.
pub fn decode(bytes: &[u8], mode: CpuMode) -> Result<Insn, DecodeError> {
    let mut c = Cursor { bytes, pos: 0 };
    let mut p = Prefixes::default();
    loop {
        let b = c.peek().ok_or(DecodeError::Truncated)?;
        match b {
            0x66 => p.opsize = true,
            0x67 => p.addrsize = true,
            0xf0 => p.lock = true,
            0xf2 => p.repne = true,
            0xf3 => p.rep = true,
            0x26 => p.segment = Some(Segment::Es),
            0x2e => p.segment = Some(Segment::Cs),
            0x36 => p.segment = Some(Segment::Ss),
            0x3e => p.segment = Some(Segment::Ds),
            0x64 => p.segment = Some(Segment::Fs),
            0x65 => p.segment = Some(Segment::Gs),
            _ => break,
        }
        // A REX prefix only counts right before the opcode.
        p.rex = 0;
        c.next()?;
    }
    if mode == CpuMode::Bits64 {
        if let Some(b @ 0x40..=0x4f) = c.peek() {
            p.rex = b;
            c.next()?;
        }
    }
    let opcode = c.next()?;
    let op = match opcode {
        0xcc => Op::Int3,
        0xcd => Op::IntN(c.next()?),
        0xf1 => Op::Int1,
        0xce if mode != CpuMode::Bits64 => Op::Into,
        0x9b => Op::Fwait,
        0xcf => match (mode, p.rex_w(), p.opsize) {
            (CpuMode::Bits64, true, _) => Op::Iret(8),
            (CpuMode::Bits32, _, false) => Op::Iret(4),
            _ => return Err(DecodeError::Unsupported),
        },
        0x0f => decode_0f(&mut c, &p, mode)?,
        _ => return Err(DecodeError::Unsupported),
    };
    Ok(Insn {
        len: c.pos,
        op,
        lock: p.lock,
    })
}

fn decode_0f(c: &mut Cursor<'_>, p: &Prefixes, mode: CpuMode) -> Result<Op, DecodeError> {
    let op2 = c.next()?;
    match op2 {
        0x01 => match c.next()? {
            0xd0 if !p.any_simd() => Ok(Op::Xgetbv),
            0xd1 if !p.any_simd() => Ok(Op::Xsetbv),
            0xca if !p.any_simd() => Ok(Op::Clac),
            0xcb if !p.any_simd() => Ok(Op::Stac),
            _ => Err(DecodeError::Unsupported),
        },
        0xc7 => {
            let modrm = c.next()?;
            let reg = (modrm >> 3) & 7;
            if reg != 1 || modrm >> 6 == 3 || !p.rex_w() || p.any_simd() {
                return Err(DecodeError::Unsupported);
            }
            Ok(Op::Cmpxchg16b(decode_mem(c, p, mode, modrm)?))
        }
        0xae => {
            let modrm = c.next()?;
            if modrm >> 6 == 3 || p.any_simd() {
                return Err(DecodeError::Unsupported);
            }
            match (modrm >> 3) & 7 {
                2 => Ok(Op::Ldmxcsr(decode_mem(c, p, mode, modrm)?)),
                3 => Ok(Op::Stmxcsr(decode_mem(c, p, mode, modrm)?)),
                _ => Err(DecodeError::Unsupported),
            }
        }
        _ => Err(DecodeError::Unsupported),
    }
}

/// Decode the memory operand that follows `modrm` (mod != 3) with 32/64-bit addressing.
fn decode_mem(
    c: &mut Cursor<'_>,
    p: &Prefixes,
    mode: CpuMode,
    modrm: u8,
) -> Result<MemOperand, DecodeError> {
    let addr_size: u8 = match (mode, p.addrsize) {
        (CpuMode::Bits64, false) => 8,
        (CpuMode::Bits64, true) | (CpuMode::Bits32, false) | (CpuMode::Bits16, true) => 4,
        _ => return Err(DecodeError::UnsupportedAddressing),
    };
    let md = modrm >> 6;
    let rm = modrm & 7;
    let mut base = None;
    let mut index = None;
    let mut rip_relative = false;
    let mut disp = 0i64;
    if rm == 4 {
        let sib = c.next()?;
        let scale = 1u8 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | (p.rex_x() << 3);
        if idx != 4 {
            index = Some((idx, scale));
        }
        let b = sib & 7;
        if b == 5 && md == 0 {
            disp = c.i32()?;
        } else {
            base = Some(b | (p.rex_b() << 3));
        }
    } else if rm == 5 && md == 0 {
        disp = c.i32()?;
        rip_relative = mode == CpuMode::Bits64;
    } else {
        base = Some(rm | (p.rex_b() << 3));
    }
    match md {
        1 => disp = c.i8()?,
        2 => disp = c.i32()?,
        _ => {}
    }
    let segment = p.segment.unwrap_or(match base {
        Some(4) | Some(5) => Segment::Ss,
        _ => Segment::Ds,
    });
    Ok(MemOperand {
        base,
        index,
        disp,
        rip_relative,
        segment,
        addr_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d64(bytes: &[u8]) -> Result<Insn, DecodeError> {
        decode(bytes, CpuMode::Bits64)
    }

    #[test]
    fn test_decode_int3_is_one_byte() {
        let insn = d64(&[0xcc, 0x90]).unwrap();
        assert_eq!((insn.len, insn.op), (1, Op::Int3));
    }

    #[test]
    fn test_decode_int_n_carries_vector() {
        let insn = d64(&[0xcd, 0x80]).unwrap();
        assert_eq!((insn.len, insn.op), (2, Op::IntN(0x80)));
    }

    #[test]
    fn test_decode_into_is_invalid_in_64bit_mode() {
        assert_eq!(d64(&[0xce]), Err(DecodeError::Unsupported));
        assert_eq!(decode(&[0xce], CpuMode::Bits32).unwrap().op, Op::Into);
    }

    #[test]
    fn test_decode_fwait_and_xgetbv() {
        assert_eq!(d64(&[0x9b]).unwrap().op, Op::Fwait);
        let x = d64(&[0x0f, 0x01, 0xd0]).unwrap();
        assert_eq!((x.len, x.op), (3, Op::Xgetbv));
        assert_eq!(d64(&[0x0f, 0x01, 0xd1]).unwrap().op, Op::Xsetbv);
        assert_eq!(d64(&[0x0f, 0x01, 0xca]).unwrap().op, Op::Clac);
    }

    #[test]
    fn test_decode_lock_cmpxchg16b_with_base_register() {
        // lock cmpxchg16b [rdi]
        let insn = d64(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]).unwrap();
        assert_eq!(insn.len, 5);
        assert!(insn.lock);
        let Op::Cmpxchg16b(m) = insn.op else {
            panic!("wrong op {:?}", insn.op)
        };
        assert_eq!(m.base, Some(7));
        assert_eq!(m.index, None);
        assert_eq!(m.disp, 0);
        assert_eq!(m.addr_size, 8);
    }

    #[test]
    fn test_decode_cmpxchg16b_sib_with_rex_and_disp8() {
        // cmpxchg16b [r9 + r10*8 + 0x10]: REX.WXB = 0x4b, modrm mod=01 reg=1 rm=100, sib
        // scale=11 index=010 base=001, disp8 0x10
        let insn = d64(&[0x4b, 0x0f, 0xc7, 0x4c, 0xd1, 0x10]).unwrap();
        assert_eq!(insn.len, 6);
        let Op::Cmpxchg16b(m) = insn.op else {
            panic!("wrong op")
        };
        assert_eq!(m.base, Some(9));
        assert_eq!(m.index, Some((10, 8)));
        assert_eq!(m.disp, 0x10);
    }

    #[test]
    fn test_decode_cmpxchg16b_without_rex_w_is_unsupported() {
        assert_eq!(d64(&[0x0f, 0xc7, 0x0f]), Err(DecodeError::Unsupported));
    }

    #[test]
    fn test_decode_ldmxcsr_rip_relative_disp32() {
        // ldmxcsr [rip + 0x1234]
        let insn = d64(&[0x0f, 0xae, 0x15, 0x34, 0x12, 0, 0]).unwrap();
        assert_eq!(insn.len, 7);
        let Op::Ldmxcsr(m) = insn.op else {
            panic!("wrong op")
        };
        assert!(m.rip_relative);
        assert_eq!(m.base, None);
        assert_eq!(m.disp, 0x1234);
    }

    #[test]
    fn test_decode_stmxcsr_rsp_based_uses_ss_and_negative_disp() {
        // stmxcsr [rsp - 4]: modrm mod=01 reg=3 rm=100, sib 0x24 (no index, base rsp), disp8 -4
        let insn = d64(&[0x0f, 0xae, 0x5c, 0x24, 0xfc]).unwrap();
        let Op::Stmxcsr(m) = insn.op else {
            panic!("wrong op")
        };
        assert_eq!(m.base, Some(4));
        assert_eq!(m.index, None);
        assert_eq!(m.disp, -4);
        assert_eq!(m.segment, Segment::Ss);
    }

    #[test]
    fn test_decode_segment_override_and_sib_no_base() {
        // gs: ldmxcsr [rax*4 + 0x100]: 65 0f ae 14 85 00 01 00 00
        let insn = d64(&[0x65, 0x0f, 0xae, 0x14, 0x85, 0, 1, 0, 0]).unwrap();
        assert_eq!(insn.len, 9);
        let Op::Ldmxcsr(m) = insn.op else {
            panic!("wrong op")
        };
        assert_eq!(m.segment, Segment::Gs);
        assert_eq!(m.base, None);
        assert_eq!(m.index, Some((0, 4)));
        assert_eq!(m.disp, 0x100);
    }

    #[test]
    fn test_decode_32bit_mode_disp32_is_absolute_and_rex_is_inc() {
        let insn = decode(&[0x0f, 0xae, 0x15, 0, 0x10, 0, 0], CpuMode::Bits32).unwrap();
        let Op::Ldmxcsr(m) = insn.op else {
            panic!("wrong op")
        };
        assert!(!m.rip_relative);
        assert_eq!(m.addr_size, 4);
        // 0x48 is `dec eax` in 32-bit mode, not a REX prefix.
        assert_eq!(
            decode(&[0x48, 0x0f, 0xc7, 0x0f], CpuMode::Bits32),
            Err(DecodeError::Unsupported)
        );
    }

    #[test]
    fn test_decode_16bit_addressing_is_refused() {
        assert_eq!(
            decode(&[0x0f, 0xae, 0x17], CpuMode::Bits16),
            Err(DecodeError::UnsupportedAddressing)
        );
    }

    #[test]
    fn test_decode_iret_sizes() {
        assert_eq!(decode(&[0xcf], CpuMode::Bits32).unwrap().op, Op::Iret(4));
        assert_eq!(d64(&[0x48, 0xcf]).unwrap().op, Op::Iret(8));
        assert_eq!(d64(&[0xcf]), Err(DecodeError::Unsupported));
        assert_eq!(
            decode(&[0x66, 0xcf], CpuMode::Bits32),
            Err(DecodeError::Unsupported)
        );
    }

    #[test]
    fn test_decode_truncated_and_overlong_are_errors() {
        assert_eq!(d64(&[0xcd]), Err(DecodeError::Truncated));
        assert_eq!(d64(&[]), Err(DecodeError::Truncated));
        assert_eq!(d64(&[0x66; 16]), Err(DecodeError::TooLong));
        assert_eq!(d64(&[0x0f, 0x0b]), Err(DecodeError::Unsupported));
    }

    #[test]
    fn test_decode_address_size_override_in_64bit_mode_is_32bit() {
        let insn = d64(&[0x67, 0x0f, 0xae, 0x10]).unwrap();
        let Op::Ldmxcsr(m) = insn.op else {
            panic!("wrong op")
        };
        assert_eq!(m.addr_size, 4);
        assert_eq!(m.base, Some(0));
    }
}
