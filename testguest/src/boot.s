# Ferrite test guest: PVH entry, long-mode switch, trap stubs and the AP trampoline.
#
# Everything here runs at CPL0 (or in 32-bit/real mode) and is emulated on our KVM,
# so it is kept short: no string instructions, no big loops except the page tables.

# ---------------------------------------------------------------------------
# PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen", 32-bit entry.
    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long _start32

# ---------------------------------------------------------------------------
    .section .text.boot, "ax"
    .code32
    .globl _start32
_start32:
    cli
    cld
    movl %ebx, pvh_info_ptr
    movl $kstack_top, %esp

    # PML4: entry 0 -> PDPT, the rest empty.
    movl $pml4, %edi
    xorl %eax, %eax
    movl $1024, %ecx
1:  movl %eax, (%edi)
    addl $4, %edi
    decl %ecx
    jnz 1b
    movl $pdpt, %eax
    orl $7, %eax
    movl %eax, pml4

    # 1 GiB pages if CPUID.80000001h:EDX[26] (pdpe1gb) is offered.
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 2f
    movl $0x80000001, %eax
    cpuid
    btl $26, %edx
    jnc 2f

    # PDPT[i] = i GiB | PS | U | W | P, for 512 GiB.
    movl $pdpt, %edi
    xorl %ecx, %ecx
3:  movl %ecx, %eax
    shll $30, %eax
    orl $0x87, %eax
    movl %eax, (%edi)
    movl %ecx, %eax
    shrl $2, %eax
    movl %eax, 4(%edi)
    addl $8, %edi
    incl %ecx
    cmpl $512, %ecx
    jb 3b
    movl $512, identity_gib
    jmp 4f

    # Fallback: 2 MiB pages for the first 4 GiB here; CPL3 extends the map to 512 GiB
    # natively (sys::extend_identity_map) before it touches anything above 4 GiB.
2:  movl $pdpt, %edi
    xorl %ecx, %ecx
5:  xorl %eax, %eax
    cmpl $4, %ecx
    jae 6f
    movl %ecx, %eax
    shll $12, %eax
    addl $pds, %eax
    orl $7, %eax
6:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $8, %edi
    incl %ecx
    cmpl $512, %ecx
    jb 5b
    movl $pds, %edi
    xorl %ecx, %ecx
7:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax
    movl %eax, (%edi)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, 4(%edi)
    addl $8, %edi
    incl %ecx
    cmpl $2048, %ecx
    jb 7b
    movl $4, identity_gib

4:  movl %cr4, %eax
    orl $0x20, %eax                 # PAE
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          # EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           # PG | PE
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x10, $long_entry

    .code64
long_entry:
    movw $0x18, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $kstack_top, %rsp
    call kernel_init
    lidt idt_ptr
    movw $0x40, %ax
    ltr %ax
    # Drop to CPL3 with interrupts off; CPL3 enables them through a service.
    pushq $0x2b
    pushq $ustack_top
    pushq $0x2
    pushq $0x33
    pushq $user_start
    iretq

# CPL3 from here: zero .bss natively, then run Rust.
user_start:
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    call user_main
8:  jmp 8b

# ---------------------------------------------------------------------------
# Trap stubs: 256 entries, 16 bytes apart, each pushes (error, vector).
    .p2align 4
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call trap_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

# Application processors land here in long mode: count, then park.
ap_long:
    lock incl ap_started(%rip)
9:  cli
    hlt
    jmp 9b

# ---------------------------------------------------------------------------
# AP trampoline, copied to AP_TRAMPOLINE (0x8000) by CPL3 code: real mode -> long mode.
    .section .rodata.trampoline, "a"
    .code16
    .globl ap_tramp_start
    .globl ap_tramp_end
ap_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdtr - ap_tramp_start
    movl $0x20, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80000011, %eax
    movl %eax, %cr0
    ljmpl $0x10, $ap_long
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
    .code64

# ---------------------------------------------------------------------------
    .section .data.boot, "aw"
    .p2align 4
    .globl gdt
gdt:
    .quad 0                         # 0x00 null
    .quad 0x00cf9a000000ffff        # 0x08 kernel CS32
    .quad 0x00af9a000000ffff        # 0x10 kernel CS64
    .quad 0x00cf92000000ffff        # 0x18 kernel DS
    .quad 0x00cffa000000ffff        # 0x20 user CS32 (0x23)
    .quad 0x00cff2000000ffff        # 0x28 user DS (0x2b)
    .quad 0x00affa000000ffff        # 0x30 user CS64 (0x33)
    .quad 0                         # 0x38 unused
    .quad 0x0000890000000067        # 0x40 TSS (base filled by kernel_init)
    .quad 0
gdt_end:
    .p2align 3
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_ptr:
    .word 4095
    .quad idt
    .p2align 4
    .globl tss
tss:
    .long 0
    .quad kstack_top                # RSP0
    .fill 90, 1, 0
    .word 104                       # I/O map base beyond the limit: no bitmap
    .p2align 3
    .globl pvh_info_ptr
pvh_info_ptr:
    .quad 0
    .globl identity_gib
identity_gib:
    .quad 0
    .globl ap_started
ap_started:
    .long 0
    .long 0

# ---------------------------------------------------------------------------
    .section .boot_bss, "aw", @nobits
    .p2align 12
    .globl pml4
pml4:
    .skip 4096
    .globl pdpt
pdpt:
    .skip 4096
    .globl idt
idt:
    .skip 4096
    .globl pds
pds:
    .skip 512 * 4096
    .p2align 4
    .skip 16384
    .globl kstack_top
kstack_top:
    .skip 262144
    .globl ustack_top
ustack_top:
