/* A thread that polls a virtio-blk queue for a short while after each batch, so that a guest
 * streaming I/O need not kick (the vhost busy-poll idea, drivers/vhost/net.c busyloop_timeout).
 *
 * Why: on KVM-PVM a kick from guest CPL3 is a ~30-50 us round trip through host user space
 * (measured: 50-57 us of KVM_RUN per kick of 4 x 1 MiB reads, against ~180 us for the preadv
 * itself), and the guest waits for all of it. A device may tell the driver not to kick: it sets
 * VRING_USED_F_NO_NOTIFY in the used ring's flags (VIRTIO 1.2 2.7.10), and a driver then only makes
 * its requests available and waits (Linux's virtqueue_kick_prepare honours it). Something must then
 * look at the available ring: this thread, on the host's other core, for at most `poll_us`
 * microseconds after the last batch it served. The guest's kick stays the way in: the run loop
 * serves a kick as before (csrc/virtio_blk_fast.h) and then opens a polling window.
 *
 * Who touches the queue when (one owner at a time: the `owner` word below):
 *   - the vCPU thread, in the C run loop, serves a kick holding the queue; after a kick that left
 *     nothing for Python it sets `poll_open` and wakes this thread (a futex);
 *   - this thread takes the queue, sets NO_NOTIFY, and serves whatever the guest makes available
 *     until the window ends: `poll_us` with nothing new, the vCPU thread asking (`poll_stop`), the
 *     path disarmed, or this thread finding it lost its core (a gap in its own clock: someone else
 *     needs the CPU, so stop taking it - vhost stops on need_resched() for the same reason);
 *   - it ends a window by clearing NO_NOTIFY, a full fence, and one more look at the available
 *     index: the driver publishes, fences, then reads the flag, so either it sees the flag clear and
 *     kicks, or we see its request (the store-load pairing of 2.7.10; x86 needs the fence for it);
 *   - a kick that comes while this thread holds the queue (the driver had not seen the flag yet)
 *     does not wait: it leaves `kick_pending`, which this thread reads after letting go;
 *   - before the run loop returns to Python for anything, it ends the window, waits for this
 *     thread to let go, and serves what was made available meanwhile (pykvm_vblk_poll_close):
 *     Python's device model never runs beside this thread.
 * What this thread cannot finish (a request Python must serve, an I/O error) ends the window and
 * kicks the vCPU out of KVM_RUN (immediate_exit and a signal, as pykvm.kvm.vcpu.Vcpu.kick does);
 * the run loop then hands the queue to Python (PYKVM_FAST_VBLK). Windows open only when the
 * interrupt line is a KVM irqfd, which this thread can raise itself.
 *
 * Measured (KVM-PVM, firmware/virtio_blk at CPL3, 1 MiB reads 4 per batch, bench/virtio_blk.py):
 * with the thread, 2-5 kicks for 64 batches, the rest served from the window; the guest's time
 * per batch goes from the preadv plus ~50 us of exit to the preadv plus its own few microseconds.
 * It needs a free core: on a loaded host the window starts late or is cut short, and the kicks
 * (served on the vCPU's own thread, as without it) carry the load again.
 *
 * The serving itself is pykvm_vblk_serve, the same code a kick runs, so the differential test's
 * guarantees (tests/test_virtio_blk_fast.py) hold for whichever thread runs it.
 */
#ifndef PYKVM_VIRTIO_BLK_POLL_H
#define PYKVM_VIRTIO_BLK_POLL_H

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <linux/futex.h>
#include <sys/resource.h>
#include <sys/syscall.h>

/* A gap this long between two looks at the ring means this thread was not running: a look takes
 * well under a microsecond. */
#define PYKVM_VBLK_PREEMPTED_NS 20000
/* After a window in which this thread lost its core (or found none free), no window for this
 * long, doubled each time in a row (up to the maximum), reset by a window that kept its core. */
#define PYKVM_VBLK_BACKOFF_NS 1000000u
#define PYKVM_VBLK_BACKOFF_MAX_NS 1000000000u

static inline uint64_t vblk_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Times the scheduler took this thread off its core to run something else (involuntary context
 * switches): the user-space view of vhost's need_resched(). */
static long vblk_preemptions(void)
{
    struct rusage u;
    return getrusage(RUSAGE_THREAD, &u) == 0 ? u.ru_nivcsw : 0;
}

static void vblk_futex_wait(uint32_t *addr, uint32_t seen)
{
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

static void vblk_futex_wake(uint32_t *addr)
{
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* The driver's available index, read as the other CPU writes it. */
static int vblk_avail_pending(struct pykvm_vblk *b)
{
    const uint8_t *avail = pykvm_mem_locate(&b->mem, b->avail_addr, 4);
    if (!avail)
        return 1;          /* let the serving code find out and tell Python */
    uint16_t idx;
    __atomic_load((const volatile uint16_t *)(avail + 2), &idx, __ATOMIC_ACQUIRE);
    return idx != b->last_avail;
}

/* struct virtq_used's flags (the ring was found in RAM by whoever calls this). */
static void vblk_used_flags(uint8_t *used, uint16_t flags)
{
    __atomic_store((volatile uint16_t *)used, &flags, __ATOMIC_RELEASE);
}

/* The queue's owner word: whoever holds it may serve the queue (0 free, 1 held). A plain word and
 * not a mutex, because a kick must never wait for it: a locked cmpxchg either takes it or says who
 * has it, and is a full barrier either way (the kick_pending pairing below relies on that). */
static inline int vblk_take(struct pykvm_vblk *b)
{
    uint32_t free_ = 0;
    return __atomic_compare_exchange_n(&b->owner, &free_, 1, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

static inline void vblk_release(struct pykvm_vblk *b)
{
    __atomic_store_n(&b->owner, 0, __ATOMIC_SEQ_CST);
}

/* Python must take the queue over: make the vCPU leave KVM_RUN (pykvm.kvm.vcpu.Vcpu.kick's two
 * steps: immediate_exit for a KVM_RUN not yet entered, the signal for one under way). */
static void vblk_kick_vcpu(struct pykvm_vblk *b)
{
    struct kvm_run *run = b->vcpu_run;
    if (!run)
        return;
    __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (b->vcpu_thread_set && !pthread_equal(b->vcpu_thread, pthread_self()))
        pthread_kill(b->vcpu_thread, b->kick_signal);
}

/* Serve on the poller's thread; 1 if Python must now take over (the vCPU has been kicked). */
static int vblk_poll_serve(struct pykvm_vblk *b)
{
    b->polled++;
    if (!pykvm_vblk_serve(b))
        return 0;
    vblk_kick_vcpu(b);
    return 1;
}

/* Is a core free for this thread? /proc/loadavg's fourth field counts the tasks running or
 * waiting to run right now (this thread and the vCPU's among them, proc(5)); more than there are
 * cores means polling would take a core from someone, or wait for one. */
static int vblk_core_free(void)
{
    static long cores;
    if (!cores)
        cores = sysconf(_SC_NPROCESSORS_ONLN);
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    char text[128];
    ssize_t n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n <= 0)
        return 1;
    text[n] = 0;
    const char *p = text;
    for (int field = 0; field < 3 && p; field++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return !p || strtol(p, NULL, 10) <= cores;
}

/* No window for a while: 1 ms, doubling while it keeps happening, up to 1 s. Short at first: a
 * kernel thread that ran for a moment must not leave a streaming guest kicking for long (a
 * 4 MiB batch takes ~0.2 ms); under steady load the doubling soon makes the tries rare. */
static void vblk_back_off(struct pykvm_vblk *b)
{
    b->poll_preempted++;
    b->backoff_ns = b->backoff_ns ? b->backoff_ns * 2 : PYKVM_VBLK_BACKOFF_NS;
    if (b->backoff_ns > PYKVM_VBLK_BACKOFF_MAX_NS)
        b->backoff_ns = PYKVM_VBLK_BACKOFF_MAX_NS;
    __atomic_store_n(&b->backoff_until, vblk_now_ns() + b->backoff_ns, __ATOMIC_RELEASE);
}

/* One window, the queue held. 1 if it ended by handing the queue to Python.
 * A window is only worth it with a core to itself: the guest stops kicking, so if another task
 * takes this thread's core the guest waits a whole time slice for it. So none opens when the host
 * has more runnable tasks than cores, a window ends when the kernel says it took our core
 * (involuntary context switches, getrusage(2)) and then none opens for a while; the kicks, served
 * on the vCPU's own thread, carry the load meanwhile. A gap in our clock with no such switch is
 * the hypervisor's (steal time): that ends the window, without the back-off. */
static int vblk_poll_window(struct pykvm_vblk *b)
{
    uint8_t *used = pykvm_mem_locate(&b->mem, b->used_addr, 6 + 8 * (uint64_t)b->qsize);
    if (!used)
        return 0;
    if (b->poll_yields && !vblk_core_free()) {
        vblk_back_off(b);
        return 0;
    }
    b->poll_windows++;
    vblk_used_flags(used, VRING_USED_F_NO_NOTIFY);
    uint64_t span = (uint64_t)b->poll_us * 1000u, last = vblk_now_ns(), deadline = last + span;
    long switches = vblk_preemptions();
    int lost_core = 0;
    for (;;) {
        if (__atomic_load_n(&b->poll_stop, __ATOMIC_ACQUIRE) || !b->armed)
            break;
        uint64_t now = vblk_now_ns();
        if (now - last > PYKVM_VBLK_PREEMPTED_NS && b->poll_yields) {
            lost_core = vblk_preemptions() != switches;
            break;
        }
        last = now;
        if (now > deadline)
            break;
        if (vblk_avail_pending(b)) {
            if (vblk_poll_serve(b)) {
                vblk_used_flags(used, 0);
                return 1;
            }
            /* Serving takes long enough (a preadv) to be preempted in: ask the kernel. */
            if (b->poll_yields && vblk_preemptions() != switches) {
                lost_core = 1;
                break;
            }
            last = vblk_now_ns();
            deadline = last + span;
        } else {
            __builtin_ia32_pause();
        }
    }
    if (lost_core)
        vblk_back_off(b);
    else
        b->backoff_ns = 0;
    vblk_used_flags(used, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (b->armed && vblk_avail_pending(b))
        return vblk_poll_serve(b);
    return 0;
}

static void *vblk_poller(void *arg)
{
    struct pykvm_vblk *b = arg;
    uint32_t seen = 0;
    for (;;) {
        if (__atomic_load_n(&b->poll_quit, __ATOMIC_ACQUIRE))
            return NULL;
        uint32_t seq = __atomic_load_n(&b->poll_seq, __ATOMIC_ACQUIRE);
        if (seq == seen && !__atomic_load_n(&b->kick_pending, __ATOMIC_SEQ_CST)) {
            vblk_futex_wait(&b->poll_seq, seen);
            continue;
        }
        seen = seq;
        if (!vblk_take(b)) {
            __builtin_ia32_pause();      /* the vCPU thread is serving a kick: not for long */
            continue;
        }
        /* Under the queue: a window the run loop asked for, or a kick that came while we held it
         * (after our last look at the ring, maybe: serve it, the guest is waiting). */
        int kicked = __atomic_exchange_n(&b->kick_pending, 0, __ATOMIC_SEQ_CST);
        int open = b->poll_open;
        b->poll_open = 0;
        if ((open || kicked) && !b->need && b->armed
            && !__atomic_load_n(&b->poll_stop, __ATOMIC_ACQUIRE)) {
            if (!(kicked && vblk_poll_serve(b)))
                vblk_poll_window(b);
        }
        vblk_release(b);
        /* kick_pending is read at the top again, after this release: a kick that found us holding
         * the queue stored it before its failed take, so we see it. */
    }
}

/* Start the thread (once); `poll_us` 0 never opens a window. `yields`: end a window when this
 * thread finds it lost its core (always, but in tests that play the driver from Python, whose
 * timing is nothing like a guest's). 0, or -errno. */
static int pykvm_vblk_poll_start(struct pykvm_vblk *b, uint32_t poll_us, int kick_signal,
                                 int yields)
{
    b->poll_us = poll_us;
    b->kick_signal = kick_signal;
    b->poll_yields = yields != 0;
    if (b->poller_running || !poll_us)
        return 0;
    int e = pthread_create(&b->poller, NULL, vblk_poller, b);
    if (e)
        return -e;
    b->poller_running = 1;
    return 0;
}

/* Stop the thread and wait for it (a window, if one is open, ends first). */
static void pykvm_vblk_poll_quit(struct pykvm_vblk *b)
{
    if (!b->poller_running)
        return;
    __atomic_store_n(&b->poll_stop, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&b->poll_quit, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&b->poll_seq, 1, __ATOMIC_RELEASE);
    vblk_futex_wake(&b->poll_seq);
    pthread_join(b->poller, NULL);
    b->poller_running = 0;
    b->poll_stop = b->poll_quit = 0;
}

/* What the run loop does before it returns to Python: end the poller's window, wait until it has
 * let go of the queue, and serve a kick that came while it held it. Python's model then has the
 * queue to itself: the poller serves nothing until the run loop opens a window again. */
static void pykvm_vblk_poll_close(struct pykvm_vblk *b)
{
    if (!b->poller_running)
        return;
    __atomic_store_n(&b->poll_stop, 1, __ATOMIC_SEQ_CST);
    /* The thread lets go within a batch; if it lost its core meanwhile, give it ours. */
    for (uint32_t spins = 1; !vblk_take(b); spins++) {
        if (spins % 1024 == 0)
            sched_yield();
        else
            __builtin_ia32_pause();
    }
    __atomic_store_n(&b->poll_stop, 0, __ATOMIC_SEQ_CST);
    b->poll_open = 0;
    /* A kick that found the poller holding the queue, or a request made available while the
     * window's flag told the driver not to kick: serve it now, before Python has the queue. */
    int kicked = __atomic_exchange_n(&b->kick_pending, 0, __ATOMIC_SEQ_CST);
    if (!b->need && b->armed && (kicked || vblk_avail_pending(b)))
        pykvm_vblk_serve(b);
    vblk_release(b);
}

/* A QueueNotify of queue 0 of an armed device. Without a poller: serve it. With one: if the poller
 * holds the queue, leave the kick to it (kick_pending) and return at once; else serve it here, and
 * if all went in C and the poller can finish batches alone (an irqfd line: it asks Python for
 * nothing), open a window. Returns b->need. */
static uint32_t pykvm_vblk_notify(struct pykvm_vblk *b)
{
    b->kicks++;
    if (!b->poller_running)
        return pykvm_vblk_serve(b);
    __atomic_store_n(&b->kick_pending, 1, __ATOMIC_SEQ_CST);
    if (!vblk_take(b))
        return 0;
    __atomic_store_n(&b->kick_pending, 0, __ATOMIC_SEQ_CST);
    uint32_t need = b->need;       /* what the poller left: Python goes first */
    if (!need) {
        need = pykvm_vblk_serve(b);
        uint64_t until = __atomic_load_n(&b->backoff_until, __ATOMIC_ACQUIRE);
        if (!need && b->poll_us && b->irqfd >= 0 && (!until || vblk_now_ns() >= until)) {
            b->poll_open = 1;
            __atomic_add_fetch(&b->poll_seq, 1, __ATOMIC_SEQ_CST);
            vblk_release(b);
            vblk_futex_wake(&b->poll_seq);
            return 0;
        }
    }
    vblk_release(b);
    return need;
}

#endif
