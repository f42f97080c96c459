/* realmode_loop.S - a 64 KiB BIOS image: the exit storm in 16-bit real mode, for every VMM.
 *
 * Loaded at 0xF0000-0xFFFFF (QEMU maps -bios images there, as a PC's flash is mapped), it starts
 * at the reset vector F000:FFF0, writes the byte in AL to port 0xE9 (the debug console) N times,
 * N being the blob's first dword (patched in by bench/exit_cost.py and bench/floor.c), then
 * writes 0 to port 0xF4 (QEMU's isa-debug-exit, pykvm's ExitPort) and halts.
 * Built with: gcc -c, ld -Ttext=0, objcopy -O binary. */
    .code16
    .text
    .globl _start
_start:
count:
    .long 1000
start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    movl count, %ecx
    movw $0xe9, %dx
    movb $'.', %al
    testl %ecx, %ecx
    jz done
1:  outb %al, %dx
    decl %ecx
    jnz 1b
done:
    movw $0xf4, %dx
    xorl %eax, %eax
    outl %eax, %dx
2:  hlt
    jmp 2b

    .org 0xfff0                 /* the reset vector: CS base 0xffff0000, IP 0xfff0 */
    ljmp $0xf000, $start
    .org 0x10000
