/* virtio-blk requests served in C, in the vCPU's run loop (csrc/fastpath.h).
 *
 * A guest driver kicks a virtio-mmio queue by writing the queue index to QueueNotify: an MMIO exit.
 * pykvm/virtio/blk.py serves it in Python: the descriptor walk, the request header, preadv/pwritev
 * straight into guest RAM, the used ring, the interrupt. That Python costs ~60-140 us a kick, more
 * than the I/O itself for requests up to a few hundred KiB. This file does the same for the common
 * requests - reads, writes and flushes in the shape every driver builds (VIRTIO 1.2 5.2.6: a
 * 16-byte device-readable header, the data, a one-byte device-writable status) - and hands
 * everything else to Python, which stays the reference.
 *
 * How the two agree (tests/test_virtio_blk_fast.py holds C + Python to Python alone, byte for byte,
 * on generated request streams, hostile ones included):
 *
 *   - The loop below is VirtioBlk.process_queue's, step for step: pop a head as VirtQueue.pop_head
 *     does, decide "plain read or write?" exactly as VirtioBlk._plain_rw does, merge adjacent plain
 *     requests of one direction into one preadv or pwritev within the same limits, finish a run
 *     before anything else, serve a flush (or any other write) as VirtioBlk._serve would when
 *     nothing is wrong with it, and so a read, write or flush whose descriptors are in an
 *     indirect table (Linux's requests are).
 *   - Anything C does not do itself - a request with a mistake in it (every error is the Python
 *     model's to count and answer), GET_ID, DISCARD, an I/O error - ends C's
 *     part: the available index goes back to the first request C has not finished (the start of a
 *     pending run of reads, or this request), and Python's process_queue carries on from there.
 *     Up to that point C has done exactly what Python would have; from there Python does it.
 *   - The queue's indices (last_avail, next_used), the transport's InterruptStatus and the
 *     interrupt line's level live in this struct, and the Python objects read and write them here
 *     (pykvm/devices/shared.py): one copy, so a fallback, a snapshot or a register read sees the
 *     truth. The ring addresses and the disk are copied in when Python arms the path (after it has
 *     served a kick itself and the queue is healthy); any guest write to the device's registers
 *     other than QueueNotify and InterruptACK disarms it, since it may change what was copied.
 *
 * All guest memory goes through pykvm_mem_locate (csrc/guest_mem.h), and every guest value is read
 * once into a local before it is checked and used. Constants come from the kernel's headers.
 */
#ifndef PYKVM_VIRTIO_BLK_FAST_H
#define PYKVM_VIRTIO_BLK_FAST_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>
#include <linux/kvm.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_ring.h>

#include "guest_mem.h"

#define PYKVM_VBLK_SECTOR 512
#define PYKVM_VBLK_MAX_IOV 1024          /* requests in one run of merged reads, at most */
#define PYKVM_VBLK_IOV_SCRATCH 2048      /* a full run's buffers and the next request's */

/* What pykvm_vblk_notify() leaves for Python, in `need` (bits). */
#define PYKVM_VBLK_NEED_PYTHON 1         /* serve the queue from last_avail (a fallback) */
#define PYKVM_VBLK_NEED_IRQ 2            /* raise VIRTIO_MMIO_INT_VRING: the line is not an eventfd */

struct pykvm_vblk {
    uint8_t armed;                       /* Python says the copied state below is current */
    uint64_t mmio_base, mmio_size;       /* the transport's register page */
    /* The queue, copied in by Python when it arms the path. */
    uint32_t qsize;
    uint64_t desc_addr, avail_addr, used_addr;
    /* Shared with the Python objects: their own storage while bound. */
    uint16_t last_avail, next_used;      /* VirtQueue */
    uint32_t interrupt_status;           /* VirtioMmio */
    uint8_t irq_level;                   /* the IrqLine's level */
    int irqfd;                           /* KVM_IRQFD eventfd of the line, or -1 */
    /* The disk, copied in when armed. */
    int fd;
    uint64_t capacity;                   /* sectors */
    uint8_t readonly;                    /* VirtioBlk.readonly: writes are refused (by Python) */
    uint8_t indirect;                    /* VIRTIO_F_INDIRECT_DESC negotiated (VirtQueue.indirect) */
    uint8_t flush_syncs;                 /* DiskImage.flush fsyncs (not a read-only image) */
    uint64_t max_request;                /* VirtioBlk.MAX_REQUEST_BYTES */
    uint64_t merge_max_bytes;            /* VirtioBlk.MERGE_MAX_BYTES */
    uint32_t merge_max_buffers;          /* VirtioBlk.MERGE_MAX_BUFFERS */
    struct pykvm_guest_mem mem;
    /* Counters. */
    uint64_t requests, reads, writes, flushes, kicks, fallbacks, interrupts;
    uint32_t need;                       /* PYKVM_VBLK_NEED_* after the last kick */
    /* The polling thread (virtio_blk_poll.h): its window, and what it did. */
    uint32_t poll_us;                    /* 0: no polling; kicks only */
    uint8_t poll_yields;                 /* a window ends when the thread loses its core */
    uint64_t polled, poll_windows, poll_preempted;
    /* cffi: end of what Python sees (csrc/build_ffi.py); the rest is C's own. */
    /* The polling thread's state; the vCPU it kicks when Python must take over. */
    uint32_t owner;                      /* whoever serves the queue holds it (0: free) */
    uint32_t kick_pending;               /* a kick came while the poller held the queue */
    uint32_t poll_open, poll_stop, poll_quit, poll_seq;
    pthread_t poller, vcpu_thread;
    struct kvm_run *vcpu_run;
    int kick_signal;
    uint8_t poller_running, vcpu_thread_set;
    uint64_t backoff_ns, backoff_until;  /* no window before backoff_until (CLOCK_MONOTONIC) */
    /* Scratch for one run of merged reads. */
    uint32_t run_n, run_iov;
    uint16_t run_head[PYKVM_VBLK_MAX_IOV];
    uint32_t run_len[PYKVM_VBLK_MAX_IOV];
    uint8_t *run_status[PYKVM_VBLK_MAX_IOV];
    struct iovec iov[PYKVM_VBLK_IOV_SCRATCH];
};

static inline uint16_t vblk_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* VirtQueue.pop_head: the next head, -1 if none, -2 for what Python must see (a ring outside RAM,
 * an index jump, a head outside the table: it counts them). last_avail moves only on success. */
static int vblk_pop(struct pykvm_vblk *b)
{
    uint32_t size = b->qsize;
    uint8_t *avail = pykvm_mem_locate(&b->mem, b->avail_addr, 6 + 2 * (uint64_t)size);
    if (!avail)
        return -2;
    uint16_t last = b->last_avail;
    uint16_t pending = (uint16_t)(vblk_u16(avail + 2) - last);
    if (pending == 0)
        return -1;
    if (pending > size)
        return -2;
    uint16_t head = vblk_u16(avail + 4 + 2 * (last % size));
    if (head >= size)
        return -2;
    b->last_avail = (uint16_t)(last + 1);
    return head;
}

static inline void vblk_desc(const uint8_t *table, uint32_t i, struct vring_desc *d)
{
    memcpy(d, table + sizeof(*d) * (uint64_t)i, sizeof(*d));
}

/* VirtioBlk._plain_rw. 1: a plain read or write (*write says which), its buffers appended to the
 * run's iovecs from b->run_iov (not yet counted), *offset, *n and *status set; 0: not one; -1: one
 * that C cannot finish exactly as Python would (its status byte is not in RAM, or the scratch is
 * full). */
static int vblk_plain_rw(struct pykvm_vblk *b, uint16_t head, int *write, uint64_t *offset,
                         uint64_t *n, uint8_t **status, uint32_t *nseg)
{
    uint32_t size = b->qsize;
    const uint8_t *table = pykvm_mem_locate(&b->mem, b->desc_addr, 16 * (uint64_t)size);
    if (!table)
        return 0;
    struct vring_desc d;
    vblk_desc(table, head, &d);
    if (d.flags != VRING_DESC_F_NEXT || d.len < sizeof(struct virtio_blk_outhdr))
        return 0;
    uint64_t haddr = d.addr;
    uint32_t hlen = d.len;
    uint16_t index = d.next;
    int data_flags = -1;       /* all data descriptors alike: WRITE|NEXT (a read) or NEXT (a write) */
    uint64_t total = 0, status_gpa = 0;
    uint32_t k = 0, first = b->run_iov;
    int found = 0, room = 1;
    for (uint32_t step = 0; step + 1 < size; step++) {
        if (index >= size)
            return 0;
        vblk_desc(table, index, &d);
        index = d.next;
        if (d.flags == data_flags
            || (data_flags < 0 && (d.flags == (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT)
                                   || d.flags == VRING_DESC_F_NEXT))) {
            data_flags = d.flags;
            /* Bounds are checked below, after the shape, as Python checks them (mem.views). */
            if (first + k < PYKVM_VBLK_IOV_SCRATCH) {
                b->iov[first + k].iov_base = (void *)(uintptr_t)d.addr;   /* a gpa, for now */
                b->iov[first + k].iov_len = d.len;
            } else {
                room = 0;
            }
            k++;
            total += d.len;
        } else if (d.flags == VRING_DESC_F_WRITE && d.len == 1 && k) {
            status_gpa = d.addr;
            found = 1;
            break;
        } else {
            return 0;
        }
    }
    if (!found)
        return 0;       /* longer than its table: the walk will call it a loop */
    if (total % PYKVM_VBLK_SECTOR || total > b->max_request)
        return 0;
    const uint8_t *hp = pykvm_mem_locate(&b->mem, haddr, sizeof(struct virtio_blk_outhdr));
    if (!hp)
        return 0;
    struct virtio_blk_outhdr hdr;
    memcpy(&hdr, hp, sizeof(hdr));
    uint64_t sectors = total / PYKVM_VBLK_SECTOR;
    int is_write = data_flags == VRING_DESC_F_NEXT;
    if (is_write) {
        /* A longer header descriptor would hold data: the long way's business. */
        if (hdr.type != VIRTIO_BLK_T_OUT || hlen != sizeof(struct virtio_blk_outhdr)
            || b->readonly)
            return 0;
    } else if (hdr.type != VIRTIO_BLK_T_IN) {
        return 0;
    }
    if (hdr.sector > b->capacity || sectors > b->capacity - hdr.sector)
        return 0;
    if (!room)
        return -1;
    for (uint32_t i = 0; i < k; i++) {
        struct iovec *v = &b->iov[first + i];
        uint8_t *p = pykvm_mem_locate(&b->mem, (uint64_t)(uintptr_t)v->iov_base, v->iov_len);
        if (!p)
            return 0;
        v->iov_base = p;
    }
    uint8_t *sp = pykvm_mem_locate(&b->mem, status_gpa, 1);
    if (!sp)
        return -1;      /* Python merges it, then counts the status it cannot write */
    *write = is_write;
    *offset = hdr.sector * PYKVM_VBLK_SECTOR;
    *n = total;
    *status = sp;
    *nseg = k;
    return 1;
}

/* VirtQueue.add_used. The used ring was found in RAM when the kick began. */
static void vblk_used(struct pykvm_vblk *b, uint8_t *used, uint16_t head, uint32_t len)
{
    uint32_t elem[2] = {head, len};
    memcpy(used + 4 + 8 * (uint64_t)(b->next_used % b->qsize), elem, sizeof(elem));
    b->next_used = (uint16_t)(b->next_used + 1);
    /* The entry before the index that publishes it: x86 keeps stores in order; the compiler must. */
    __asm__ volatile("" ::: "memory");
    memcpy(used + 2, &b->next_used, 2);
}

/* preadv/pwritev of the whole iovec list at `offset`, resuming short transfers (DiskImage does the
 * same). 0, or -1 on an error or end of file. */
static int vblk_rw(int fd, struct iovec *iov, uint32_t cnt, uint64_t offset, uint64_t n, int write)
{
    uint64_t done = 0;
    while (done < n) {
        while (cnt && iov->iov_len == 0) {
            iov++;
            cnt--;
        }
        ssize_t got = write ? pwritev(fd, iov, (int)cnt, (off_t)(offset + done))
                            : preadv(fd, iov, (int)cnt, (off_t)(offset + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        done += (uint64_t)got;
        /* Drop what was transferred (the iovecs are scratch: changing them is fine). */
        uint64_t skip = (uint64_t)got;
        while (cnt && skip >= iov->iov_len) {
            skip -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt && skip) {
            iov->iov_base = (uint8_t *)iov->iov_base + skip;
            iov->iov_len -= skip;
        }
    }
    return 0;
}

/* VirtioBlk._finish_run: one preadv (or pwritev) for the run, then each request's status and used
 * entry (a write wrote nothing into the chain but its status). */
static int vblk_finish_run(struct pykvm_vblk *b, uint8_t *used, uint64_t offset, uint64_t n,
                           int write)
{
    if (!b->run_n)
        return 0;
    if (vblk_rw(b->fd, b->iov, b->run_iov, offset, n, write) < 0)
        return -1;
    for (uint32_t i = 0; i < b->run_n; i++) {
        *b->run_status[i] = VIRTIO_BLK_S_OK;
        vblk_used(b, used, b->run_head[i], write ? 1 : b->run_len[i] + 1);
    }
    b->requests += b->run_n;
    if (write)
        b->writes += b->run_n;
    else
        b->reads += b->run_n;
    b->run_n = b->run_iov = 0;
    return 0;
}

/* A request the long way (VirtQueue._walk, then VirtioBlk._serve), for the shapes drivers build
 * when nothing is wrong: a 16-byte header, the data, a one-byte status, in direct descriptors
 * (writes and flushes) or in an indirect table (reads too: Linux puts every request of more than
 * one buffer there once VIRTIO_F_INDIRECT_DESC is negotiated). -1 for anything else: Python
 * serves it, from this request. */
static int vblk_serve_chain(struct pykvm_vblk *b, uint8_t *used, uint16_t head)
{
    uint32_t size = b->qsize;
    const uint8_t *table = pykvm_mem_locate(&b->mem, b->desc_addr, 16 * (uint64_t)size);
    if (!table)
        return -1;
    struct vring_desc d;
    vblk_desc(table, head, &d);
    int indirect = 0;
    if (d.flags == VRING_DESC_F_INDIRECT) {
        /* VIRTIO 1.2 2.7.5.3: the head names a table of len / 16 descriptors, walked from 0. */
        if (!b->indirect || d.len == 0 || d.len % sizeof(d) || d.len / sizeof(d) > 32768)
            return -1;
        size = d.len / sizeof(d);
        table = pykvm_mem_locate(&b->mem, d.addr, d.len);
        if (!table)
            return -1;
        vblk_desc(table, 0, &d);
        indirect = 1;
    }
    if (d.flags != VRING_DESC_F_NEXT || d.len != sizeof(struct virtio_blk_outhdr))
        return -1;
    const uint8_t *hp = pykvm_mem_locate(&b->mem, d.addr, sizeof(struct virtio_blk_outhdr));
    if (!hp)
        return -1;
    struct virtio_blk_outhdr hdr;
    memcpy(&hdr, hp, sizeof(hdr));
    int in = hdr.type == VIRTIO_BLK_T_IN;
    if (!(hdr.type == VIRTIO_BLK_T_OUT || hdr.type == VIRTIO_BLK_T_FLUSH || (in && indirect)))
        return -1;
    uint16_t data_flags = in ? (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) : VRING_DESC_F_NEXT;
    uint16_t index = d.next;
    uint32_t k = 0;
    uint64_t total = 0;
    uint8_t *status = NULL;
    /* At most `size` descriptors in all (the walk's loop budget); the header was one. */
    for (uint32_t step = 1; step < size; step++) {
        if (index >= size)
            return -1;
        vblk_desc(table, index, &d);
        index = d.next;
        if (d.flags == data_flags && hdr.type != VIRTIO_BLK_T_FLUSH) {
            if (k == PYKVM_VBLK_IOV_SCRATCH)
                return -1;
            /* A zero-length buffer is skipped, unchecked, as DescChain._pieces skips it. */
            if (d.len) {
                uint8_t *p = pykvm_mem_locate(&b->mem, d.addr, d.len);
                if (!p)
                    return -1;
                b->iov[k].iov_base = p;
                b->iov[k].iov_len = d.len;
                k++;
            }
            total += d.len;
        } else if (d.flags == VRING_DESC_F_WRITE && d.len == 1) {
            status = pykvm_mem_locate(&b->mem, d.addr, 1);
            break;
        } else {
            return -1;
        }
    }
    if (!status)
        return -1;
    uint32_t written = 0;
    if (hdr.type == VIRTIO_BLK_T_FLUSH) {
        if (b->flush_syncs && fsync(b->fd) < 0)
            return -1;
        b->flushes++;
    } else {
        uint64_t sectors = total / PYKVM_VBLK_SECTOR;
        if ((!in && b->readonly) || total % PYKVM_VBLK_SECTOR || total > b->max_request
            || hdr.sector > b->capacity || sectors > b->capacity - hdr.sector)
            return -1;
        if (vblk_rw(b->fd, b->iov, k, hdr.sector * PYKVM_VBLK_SECTOR, total, !in) < 0)
            return -1;
        if (in) {
            written = (uint32_t)total;
            b->reads++;
        } else {
            b->writes++;
        }
    }
    *status = VIRTIO_BLK_S_OK;
    vblk_used(b, used, head, written + 1);
    b->requests++;
    return 0;
}

/* VirtioDevice.signal_used, for what C used: VirtioMmio._interrupt(VRING) when the driver has not
 * set VRING_AVAIL_F_NO_INTERRUPT. InterruptStatus != 0 means the line is already up (the Python
 * transport keeps that true); otherwise raise it: an eventfd write for a KVM_IRQFD line, Python
 * for any other. */
static void vblk_signal(struct pykvm_vblk *b)
{
    const uint8_t *avail = pykvm_mem_locate(&b->mem, b->avail_addr, 6 + 2 * (uint64_t)b->qsize);
    if (avail && (vblk_u16(avail) & VRING_AVAIL_F_NO_INTERRUPT))
        return;
    if (b->irqfd < 0) {
        b->need |= PYKVM_VBLK_NEED_IRQ;
        return;
    }
    b->interrupt_status |= VIRTIO_MMIO_INT_VRING;
    if (!b->irq_level) {
        uint64_t one = 1;
        if (write(b->irqfd, &one, sizeof(one)) != sizeof(one)) {
            b->need |= PYKVM_VBLK_NEED_IRQ;   /* let Python try, and fail loudly */
            return;
        }
        b->irq_level = 1;
        b->interrupts++;
    }
}

/* Serve queue 0 of an armed device: VirtioBlk.process_queue. Returns b->need. The caller holds
 * the queue: the vCPU thread for a kick (pykvm_vblk_notify), or the polling thread. */
static uint32_t pykvm_vblk_serve(struct pykvm_vblk *b)
{
    b->need = 0;
    uint16_t start_used = b->next_used, at = b->last_avail, run_first = at;
    uint64_t run_start = 0, run_end = 0;
    int run_write = 0;
    b->run_n = b->run_iov = 0;
    uint8_t *used = pykvm_mem_locate(&b->mem, b->used_addr, 6 + 8 * (uint64_t)b->qsize);
    if (!used || !b->qsize)
        goto fallback;
    for (;;) {
        at = b->last_avail;
        int head = vblk_pop(b);
        if (head == -1)
            break;
        if (head == -2)
            goto fallback;
        uint64_t offset, n;
        uint8_t *status;
        uint32_t nseg;
        int write;
        int plain = vblk_plain_rw(b, (uint16_t)head, &write, &offset, &n, &status, &nseg);
        if (plain == 1) {
            if (b->run_n && (write != run_write || offset != run_end
                             || b->run_iov + nseg > b->merge_max_buffers
                             || run_end - run_start + n > b->merge_max_bytes)) {
                /* Python finishes the run with this request already parsed (its buffers found),
                 * then starts a new run with it. Its iovecs follow the run's; the preadv leaves
                 * them alone: move them to the front afterwards. */
                uint32_t mine = b->run_iov;
                if (vblk_finish_run(b, used, run_start, run_end - run_start, run_write) < 0)
                    goto fallback;
                memmove(b->iov, &b->iov[mine], nseg * sizeof(struct iovec));
            }
            if (!b->run_n) {
                run_start = run_end = offset;
                run_first = at;
                run_write = write;
            }
            if (b->run_n == PYKVM_VBLK_MAX_IOV)
                goto fallback;
            b->run_head[b->run_n] = (uint16_t)head;
            b->run_len[b->run_n] = (uint32_t)n;
            b->run_status[b->run_n] = status;
            b->run_n++;
            b->run_iov += nseg;
            run_end += n;
            continue;
        }
        if (plain < 0)
            goto fallback;
        if (b->run_n && vblk_finish_run(b, used, run_start, run_end - run_start, run_write) < 0)
            goto fallback;
        run_first = at;
        if (vblk_serve_chain(b, used, (uint16_t)head) < 0)
            goto fallback;
    }
    if (b->run_n && vblk_finish_run(b, used, run_start, run_end - run_start, run_write) < 0)
        goto fallback;
    if (b->next_used != start_used)
        vblk_signal(b);
    return b->need;

fallback:
    /* Give Python everything from the first request C has not finished. */
    b->last_avail = b->run_n ? run_first : at;
    b->run_n = b->run_iov = 0;
    b->fallbacks++;
    if (b->next_used != start_used)
        vblk_signal(b);
    b->need |= PYKVM_VBLK_NEED_PYTHON;
    return b->need;
}

#include "virtio_blk_poll.h"    /* pykvm_vblk_notify: a kick, and the polling thread */

/* An MMIO exit: is it this device's, and can C take it? FAST_NO (0) leaves it to Python;
 * 1: done; 2: done, but Python has work (b->need). A guest write to any other register of the
 * device disarms: it may change the queue, the features or the status that arming copied. */
static int pykvm_vblk_mmio(struct pykvm_vblk *b, struct kvm_run *run)
{
    uint64_t addr = run->mmio.phys_addr;
    if (!run->mmio.is_write || addr < b->mmio_base || addr - b->mmio_base >= b->mmio_size)
        return 0;
    uint64_t off = addr - b->mmio_base;
    if (off == VIRTIO_MMIO_INTERRUPT_ACK)
        return 0;
    if (off != VIRTIO_MMIO_QUEUE_NOTIFY || run->mmio.len != 4 || !b->armed) {
        b->armed = 0;
        return 0;
    }
    uint32_t queue;
    memcpy(&queue, run->mmio.data, 4);
    if ((queue & 0xFFFF) != 0)
        return 0;          /* no such queue: Python counts it */
    return pykvm_vblk_notify(b) ? 2 : 1;
}

#endif
