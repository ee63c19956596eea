//! A built-in minimal PVH guest (`--guest minimal`): a ~450-byte ELF64 whose 32-bit PVH entry
//! prints a banner and the ready marker on COM1 and then either powers off (non-empty kernel
//! command line) or halts forever (empty command line, for the memory scenario).
//!
//! It measures the VMM's own start-up floor: the test guest spends ~200 ms of emulated CPL0
//! set-up on our machines before its first byte, which hides the VMM's part. Power-off tries
//! every machine's S5 in turn: Ferrite (PM1a_CNT 0x604, SLP_TYP 5), QEMU q35/ICH9 (0x604,
//! SLP_TYP 0) and QEMU microvm (GED sleep control register at 0xfea0_0200, SLP_TYP 5).

use std::path::{Path, PathBuf};

/// Guest-physical load address of the whole file (headers included).
const LOAD_ADDR: u32 = 0x10_0000;
/// Offset of the code inside the file (and the load).
const CODE_OFFSET: usize = 0x100;
/// Offset of the Xen PVH note inside the file.
const NOTE_OFFSET: usize = 64 + 2 * 56;
/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const BANNER: &[u8] = b"\r\nFERRITE-BENCH MINIMAL PVH GUEST\r\n\0";
const READY: &[u8] = b"FERRITE-TESTGUEST READY\r\n\0";
const OFF: &[u8] = b"OK poweroff\r\n\0";

/// The 32-bit code followed by its strings, linked at `LOAD_ADDR + CODE_OFFSET`.
fn code() -> Vec<u8> {
    const PUTS_LEN: usize = 17;
    const CODE_LEN: usize = 91;
    let base = LOAD_ADDR as usize + CODE_OFFSET;
    let banner = base + CODE_LEN;
    let ready = banner + BANNER.len();
    let off = ready + READY.len();
    let puts = |out: &mut Vec<u8>, addr: usize| {
        out.push(0xbe); // mov $addr, %esi
        out.extend_from_slice(&(addr as u32).to_le_bytes());
        out.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov $0x3f8, %dx
        out.push(0xac); // 1: lodsb
        out.extend_from_slice(&[0x84, 0xc0]); // test %al, %al
        out.extend_from_slice(&[0x74, 0x03]); // jz 2f
        out.push(0xee); // out %al, %dx
        out.extend_from_slice(&[0xeb, 0xf8]); // jmp 1b; 2:
    };
    let idle = 87u8;
    let mut c = vec![0xfc]; // cld
    puts(&mut c, banner);
    puts(&mut c, ready);
    debug_assert_eq!(c.len(), 1 + 2 * PUTS_LEN);
    c.extend_from_slice(&[0x8b, 0x73, 0x18]); // mov 24(%ebx), %esi: start_info.cmdline_paddr
    c.extend_from_slice(&[0x85, 0xf6]); // test %esi, %esi
    c.extend_from_slice(&[0x74, idle - 42]); // jz idle
    c.extend_from_slice(&[0x80, 0x3e, 0x00]); // cmpb $0, (%esi)
    c.extend_from_slice(&[0x74, idle - 47]); // je idle
    puts(&mut c, off);
    c.extend_from_slice(&[0x66, 0xba, 0x04, 0x06]); // mov $0x604, %dx
    c.extend_from_slice(&[0x66, 0xb8, 0x00, 0x34]); // mov $0x3400, %ax: SLP_EN | SLP_TYP 5
    c.extend_from_slice(&[0x66, 0xef]); // out %ax, %dx
    c.extend_from_slice(&[0x66, 0xb8, 0x00, 0x20]); // mov $0x2000, %ax: SLP_EN | SLP_TYP 0
    c.extend_from_slice(&[0x66, 0xef]); // out %ax, %dx
    c.extend_from_slice(&[0xc6, 0x05, 0x00, 0x02, 0xa0, 0xfe, 0x34]); // movb $0x34, 0xfea00200
    debug_assert_eq!(c.len(), idle as usize);
    c.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfc]); // idle: cli; hlt; jmp idle
    debug_assert_eq!(c.len(), CODE_LEN);
    c.extend_from_slice(BANNER);
    c.extend_from_slice(READY);
    c.extend_from_slice(OFF);
    c
}

/// The complete ELF64 file.
pub fn elf() -> Vec<u8> {
    let code = code();
    let file_len = CODE_OFFSET + code.len();
    let entry = u64::from(LOAD_ADDR) + CODE_OFFSET as u64;
    let mut f = Vec::with_capacity(file_len);
    // ELF header.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]); // ELF64, little endian, v1
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // PT_LOAD: the whole file at LOAD_ADDR, RWX.
    phdr(
        &mut f,
        1,
        7,
        0,
        u64::from(LOAD_ADDR),
        file_len as u64,
        0x1000,
    );
    // PT_NOTE: the Xen PVH entry note.
    let note_len = 12 + 4 + 8;
    phdr(
        &mut f,
        4,
        4,
        NOTE_OFFSET as u64,
        u64::from(LOAD_ADDR) + NOTE_OFFSET as u64,
        note_len,
        4,
    );
    f.extend_from_slice(&4u32.to_le_bytes()); // namesz
    f.extend_from_slice(&8u32.to_le_bytes()); // descsz
    f.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&entry.to_le_bytes());
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(&code);
    f
}

fn phdr(f: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, len: u64, align: u64) {
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&offset.to_le_bytes());
    f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    f.extend_from_slice(&len.to_le_bytes()); // p_filesz
    f.extend_from_slice(&len.to_le_bytes()); // p_memsz
    f.extend_from_slice(&align.to_le_bytes());
}

/// Write the guest to `dir` and return its path.
pub fn write_to(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(format!(
        "ferrite-bench-minimal-guest-{}.elf",
        std::process::id()
    ));
    std::fs::write(&path, elf())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `as --32` + `ld -Ttext=0x100100` + `objcopy -O binary` of the same program.
    const GNU_AS_CODE: [u8; 91] = [
        0xfc, 0xbe, 0x5b, 0x01, 0x10, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03,
        0xee, 0xeb, 0xf8, 0xbe, 0x7f, 0x01, 0x10, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0,
        0x74, 0x03, 0xee, 0xeb, 0xf8, 0x8b, 0x73, 0x18, 0x85, 0xf6, 0x74, 0x2d, 0x80, 0x3e, 0x00,
        0x74, 0x28, 0xbe, 0x99, 0x01, 0x10, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74,
        0x03, 0xee, 0xeb, 0xf8, 0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0x66,
        0xb8, 0x00, 0x20, 0x66, 0xef, 0xc6, 0x05, 0x00, 0x02, 0xa0, 0xfe, 0x34, 0xfa, 0xf4, 0xeb,
        0xfc,
    ];

    #[test]
    fn test_code_matches_gnu_as_output() {
        // Arrange
        let expected = GNU_AS_CODE;

        // Act
        let c = code();

        // Assert
        assert_eq!(&c[..91], &expected[..]);
        assert!(c.ends_with(b"OK poweroff\r\n\0"));
    }

    #[test]
    fn test_elf_header_entry_and_note() {
        // Arrange
        let entry = 0x10_0100u64.to_le_bytes();

        // Act
        let f = elf();

        // Assert
        assert_eq!(&f[..5], &[0x7f, b'E', b'L', b'F', 2]);
        assert_eq!(&f[24..32], &entry);
        assert_eq!(
            &f[NOTE_OFFSET + 8..NOTE_OFFSET + 16],
            &[18, 0, 0, 0, b'X', b'e', b'n', 0]
        );
        assert_eq!(&f[NOTE_OFFSET + 16..NOTE_OFFSET + 24], &entry);
        assert_eq!(f.len(), CODE_OFFSET + code().len());
    }
}
