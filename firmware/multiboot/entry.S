/* entry.S - the multiboot header and the 32-bit entry of pykvm's multiboot test kernels.
 *
 * Multiboot Specification 0.6.96: the header (3.1.1) is three 32-bit words, 4-byte aligned in the
 * first 8 KiB of the file: magic 0x1BADB002, flags, checksum (magic + flags + checksum = 0).
 * Flags (3.1.2): bit 0 "align modules on 4 KiB", bit 1 "give me memory information", and - in the
 * AOUT_KLUDGE build only - bit 16 "the address fields below are valid" (3.1.3), which is how a
 * kernel that is not ELF (here: a flat binary made with objcopy -O binary) says where it goes.
 *
 * The boot loader enters _start in 32-bit protected mode, paging off, interrupts off, with
 * EAX = 0x2BADB002 and EBX = the physical address of the information block (3.2). There is no
 * stack (ESP is undefined): we set our own, call mb_main(eax, ebx), and write its return value
 * to isa-debug-exit (port 0xf4, 32 bits), which ends the VM with status (value << 1) | 1.
 */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003
#else
#define MB_FLAGS 0x00000003
#endif

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header          /* header_addr: where this header is in memory */
    .long _start_image       /* load_addr: the file's first byte goes here */
    .long _edata             /* load_end_addr: the end of what is in the file */
    .long _end               /* bss_end_addr: zeroed up to here */
    .long _start             /* entry_addr */
#endif

    .text
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
    pushl %ebx
    pushl %eax
    call mb_main
    movw $0xf4, %dx
    outl %eax, %dx
1:  hlt                      /* not reached when isa-debug-exit is there */
    jmp 1b

    .bss
    .align 16
    .space 8192
stack_top:
