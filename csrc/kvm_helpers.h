/* Small C helpers for the cffi binding.
 *
 * ioctl(2) is variadic; these wrappers give cffi a fixed prototype and turn the C convention
 * (-1 and errno) into one return value: >= 0 on success, -errno on failure. cffi releases the GIL
 * around every call into this module, so a vCPU thread blocked in KVM_RUN never stalls Python.
 */
#ifndef PYKVM_KVM_HELPERS_H
#define PYKVM_KVM_HELPERS_H

#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

static long pykvm_ioctl(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static long pykvm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* Per-vCPU accounting kept in C, so the Python loop pays nothing for it: time spent inside
 * KVM_RUN (the guest running, or KVM working for it) and exits counted by KVM_EXIT_* reason. */
#define PYKVM_MAX_EXIT_REASON 64
struct pykvm_run_stats {
    uint64_t ns_in_run;
    uint64_t runs;
    uint64_t exits[PYKVM_MAX_EXIT_REASON];
};

static inline uint64_t pykvm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* KVM_RUN, returning the exit reason (>= 0) or -errno: saves the Python side one read of the
 * shared page on every exit. */
static long pykvm_run(int fd, struct kvm_run *run, struct pykvm_run_stats *st)
{
    uint64_t t0 = pykvm_now_ns();
    long r = ioctl(fd, KVM_RUN, 0);
    int err = errno;
    st->ns_in_run += pykvm_now_ns() - t0;
    st->runs++;
    if (r < 0)
        return -err;
    if (run->exit_reason < PYKVM_MAX_EXIT_REASON)
        st->exits[run->exit_reason]++;
    return (long)run->exit_reason;
}

#include "fastpath.h"

/* The vCPU's struct kvm_run lives in a page (or a few) that KVM shares with us: mmap the vCPU fd. */
static void *pykvm_mmap_vcpu(int fd, size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

static int pykvm_munmap(void *addr, size_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

#endif
