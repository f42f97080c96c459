/* The C run loop: the hottest port-I/O exits handled without a trip through the interpreter.
 *
 * A VM exit to userspace costs the VMM one KVM_RUN round trip (about 1-2 us on VT-x hardware, ~7 us on
 * KVM-PVM hosts) plus whatever the VMM does with it. pykvm's Python path (typed exit, bus dispatch, a
 * device model) adds a couple of microseconds to every exit. During a Linux boot most exits are a
 * handful of trivial register accesses: the serial console's "is the transmitter empty?" poll and its
 * data write (two exits per character printed), POST codes and I/O delays on port 0x80, debug-console
 * output. This loop answers those in C and returns to Python for anything else. (The i8042 status
 * poll, another candidate, only spins when the controller is absent; pykvm always has one. PIT reads
 * are answered by KVM's in-kernel PIT.) A virtio-blk device's QueueNotify, an MMIO exit, is served
 * here too when the request stream is the common kind (virtio_blk_fast.h).
 *
 * Who owns the state: the Python device models do. Each fast-path device has a small register block
 * in this struct; when the fast path is on, the Python model keeps those registers *here* (its
 * attributes read and write this memory through cffi), so the model and the C loop never disagree.
 * The C side only acts when the model's state makes an access free of side effects (for the UART:
 * interrupts off, DLAB clear, not in loopback) and otherwise leaves the exit to the model.
 *
 * Output the C side produces (console bytes) collects in a buffer that Python drains: the loop
 * returns PYKVM_FAST_FLUSH when a line ends or the buffer is full, and Python drains it before it
 * handles any other exit, so output order is kept.
 */
#ifndef PYKVM_FASTPATH_H
#define PYKVM_FASTPATH_H

#include <stdint.h>
#include <string.h>
#include <linux/kvm.h>

#define PYKVM_FAST_FLUSH (-100000)      /* "drain the output buffers, then call again" */
#define PYKVM_FAST_VBLK (-100001)       /* "C served a virtio-blk kick; finish it (vblk->need)" */
#define PYKVM_FAST_OUT_SIZE 1024

/* 16550A UART registers the C side reads (pykvm/devices/serial.py owns their meaning). */
struct pykvm_fast_uart {
    uint16_t base;          /* I/O port of register 0 (0x3f8 for COM1); 0 = not handled in C */
    uint8_t ier, lcr, mcr, lsr;
    uint64_t bytes_out;     /* THR writes handled in C */
};

struct pykvm_fast {
    uint8_t enabled;
    struct pykvm_fast_uart uart;
    /* POST code port (0x80): remembers the last value written, counts writes. */
    uint16_t post_port;
    uint8_t post_last;
    uint64_t post_writes;
    /* Debug console (0xe9): bytes go to the debug output buffer. Reads return 0xe9 (Bochs). */
    uint16_t debug_port;
    /* Output waiting for Python: UART transmit and debug console, kept apart. */
    uint32_t uart_out_len;
    uint32_t debug_out_len;
    uint8_t uart_out[PYKVM_FAST_OUT_SIZE];
    uint8_t debug_out[PYKVM_FAST_OUT_SIZE];
    uint64_t handled;       /* exits answered in C */
    struct pykvm_vblk *vblk;   /* a virtio-blk device served in C (virtio_blk_fast.h), or NULL */
};

#endif

#include "virtio_blk_fast.h"

/* ---- the loop ---- */

#define UART_LCR_DLAB 0x80
#define UART_MCR_LOOP 0x10
#define UART_LSR_ERRORS 0x1e       /* OE PE FE BI: reading LSR clears them: the model's business */
#define UART_THR 0
#define UART_LSR 5

enum { FAST_NO = 0, FAST_DONE = 1, FAST_DONE_FLUSH = 2 };

static int pykvm_fast_append(uint8_t *buf, uint32_t *len, uint8_t byte)
{
    buf[(*len)++] = byte;
    return (byte == '\n' || *len == PYKVM_FAST_OUT_SIZE) ? FAST_DONE_FLUSH : FAST_DONE;
}

static int pykvm_fast_uart(struct pykvm_fast *f, int out, uint16_t port, uint8_t *data)
{
    struct pykvm_fast_uart *u = &f->uart;
    if (!u->base || port < u->base || port >= u->base + 8)
        return FAST_NO;
    /* Only the polled-output state is side-effect free: no interrupts enabled (so no THRE
     * interrupt to latch), divisor latch closed, not in loopback. Linux's console write path
     * (serial8250_console_write) runs with IER = 0 exactly so that it can poll like this. */
    if (u->ier || (u->lcr & UART_LCR_DLAB) || (u->mcr & UART_MCR_LOOP))
        return FAST_NO;
    if (out && port - u->base == UART_THR) {
        if (f->uart_out_len >= PYKVM_FAST_OUT_SIZE)
            return FAST_NO;
        u->bytes_out++;
        return pykvm_fast_append(f->uart_out, &f->uart_out_len, *data);
    }
    if (!out && port - u->base == UART_LSR && !(u->lsr & UART_LSR_ERRORS)) {
        *data = u->lsr;
        return FAST_DONE;
    }
    return FAST_NO;
}

/* One port-I/O exit: can C answer it? */
static int pykvm_fast_io(struct pykvm_fast *f, struct kvm_run *run)
{
    if (run->io.size != 1 || run->io.count != 1)
        return FAST_NO;            /* string and wide I/O: the Python bus loops them */
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint16_t port = run->io.port;
    int out = run->io.direction == KVM_EXIT_IO_OUT;

    int r = pykvm_fast_uart(f, out, port, data);
    if (r != FAST_NO)
        return r;
    if (port == f->post_port && f->post_port) {
        if (out) {
            f->post_last = *data;
            f->post_writes++;
        } else {
            *data = f->post_last;
        }
        return FAST_DONE;
    }
    if (port == f->debug_port && f->debug_port) {
        if (!out) {
            *data = 0xe9;          /* Bochs: reading the port tells the guest it exists */
            return FAST_DONE;
        }
        if (f->debug_out_len >= PYKVM_FAST_OUT_SIZE)
            return FAST_NO;
        return pykvm_fast_append(f->debug_out, &f->debug_out_len, *data);
    }
    return FAST_NO;
}

static long pykvm_run_fast_loop(struct pykvm_vcpu *v)
{
    struct pykvm_fast *f = v->fast;
    struct kvm_run *run = v->run;
    for (;;) {
        long r = pykvm_run(v);
        if (!f || !f->enabled)
            return r;
        int done;
        if (r == KVM_EXIT_IO) {
            done = pykvm_fast_io(f, run);
        } else if (r == KVM_EXIT_MMIO && f->vblk) {
            int d = pykvm_vblk_mmio(f->vblk, run);
            if (d == 2) {
                f->handled++;
                return PYKVM_FAST_VBLK;
            }
            done = d ? FAST_DONE : FAST_NO;
        } else {
            return r;
        }
        if (done == FAST_NO)
            return r;
        f->handled++;
        if (done == FAST_DONE_FLUSH)
            return PYKVM_FAST_FLUSH;
    }
}

/* KVM_RUN until an exit C cannot answer (returns its exit reason, >= 0), output that Python must
 * drain (PYKVM_FAST_FLUSH), or an error (-errno; -EINTR when kicked). With a virtio-blk polling
 * thread (virtio_blk_poll.h): it may poll only while this loop runs, so its window is closed before
 * Python gets control; if it kicked the vCPU out because Python must serve the queue, that is
 * PYKVM_FAST_VBLK (vblk->need says what). */
static long pykvm_run_fast(struct pykvm_vcpu *v)
{
    struct pykvm_vblk *b = v->fast && v->fast->enabled ? v->fast->vblk : NULL;
    if (!b || !b->poller_running)
        return pykvm_run_fast_loop(v);
    b->vcpu_run = v->run;
    b->vcpu_thread = pthread_self();
    b->vcpu_thread_set = 1;
    long r = pykvm_run_fast_loop(v);
    pykvm_vblk_poll_close(b);
    /* No window is open now, so nothing will kick this thread: forget it (it may end). */
    b->vcpu_thread_set = 0;
    b->vcpu_run = NULL;
    if (b->need && r != PYKVM_FAST_VBLK) {
        if (r == -EINTR)
            return PYKVM_FAST_VBLK;
        /* Python has another exit to handle first: come back at once after it. */
        __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    }
    return r;
}
