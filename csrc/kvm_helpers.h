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
#include <x86intrin.h>
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

/* What the C side keeps per vCPU, in one struct so that each call from Python converts a single
 * pointer argument: cffi checks the type of every pointer it is handed, ~40 ns apiece, and this
 * call is made on every exit. Accounting is kept here too, so the Python loop pays nothing for it:
 * time spent inside KVM_RUN (the guest running, or KVM working for it) and exits counted by
 * KVM_EXIT_* reason. Time is counted in TSC ticks: RDTSC costs ~15 ns where clock_gettime costs
 * ~50, and two are taken per exit; Python converts with the TSC rate KVM reports
 * (KVM_GET_TSC_KHZ). */
#define PYKVM_MAX_EXIT_REASON 64
struct pykvm_fast;
struct pykvm_vcpu {
    int fd;
    struct kvm_run *run;           /* the vCPU's mmap'ed kvm_run page */
    struct pykvm_fast *fast;       /* the fast path's registers (fastpath.h), or NULL */
    uint64_t ticks_in_run;
    uint64_t runs;
    uint64_t exits[PYKVM_MAX_EXIT_REASON];
};

static uint64_t pykvm_rdtsc(void)
{
    return __rdtsc();
}

/* KVM_RUN, returning the exit reason (>= 0) or -errno: saves the Python side one read of the
 * shared page on every exit. */
static long pykvm_run(struct pykvm_vcpu *v)
{
    uint64_t t0 = __rdtsc();
    long r = ioctl(v->fd, KVM_RUN, 0);
    int err = errno;
    v->ticks_in_run += __rdtsc() - t0;
    v->runs++;
    if (r < 0)
        return -err;
    uint32_t reason = v->run->exit_reason;
    if (reason < PYKVM_MAX_EXIT_REASON)
        v->exits[reason]++;
    return (long)reason;
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
