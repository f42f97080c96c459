/* Guest-physical memory as C sees it: the same one door as pykvm/memory.py's GuestMemory.
 *
 * Guest RAM is a few regions of host memory, each mapped at a guest-physical address (one KVM
 * memory slot each; RAM is not contiguous across the PCI hole below 4 GiB). Every guest address C
 * code touches - a descriptor table, a request header, a data buffer - comes from the guest and is
 * trusted by nobody, so it goes through pykvm_mem_locate(), which does what GuestMemory._find does:
 * the whole range [gpa, gpa + size) must lie inside one region, or there is no pointer. It is
 * written so that no sum can wrap (gpa and size are 64-bit guest values; Python's integers cannot
 * overflow, C's can). tests/test_virtio_blk_fast.py holds it to GuestMemory on generated ranges.
 */
#ifndef PYKVM_GUEST_MEM_H
#define PYKVM_GUEST_MEM_H

#include <stdint.h>

#define PYKVM_MEM_REGIONS 8

struct pykvm_mem_region {
    uint64_t gpa;          /* first guest-physical address */
    uint64_t size;         /* bytes */
    uint8_t *host;         /* where the VMM sees the same bytes */
};

struct pykvm_guest_mem {
    uint32_t n;
    struct pykvm_mem_region r[PYKVM_MEM_REGIONS];
};

/* Host pointer to guest-physical [gpa, gpa + size), or NULL if no one region holds all of it. A
 * zero-length range is held by a region whose [start, end] includes gpa, as in Python. */
static uint8_t *pykvm_mem_locate(const struct pykvm_guest_mem *m, uint64_t gpa, uint64_t size)
{
    for (uint32_t i = 0; i < m->n && i < PYKVM_MEM_REGIONS; i++) {
        const struct pykvm_mem_region *r = &m->r[i];
        if (gpa >= r->gpa && size <= r->size && gpa - r->gpa <= r->size - size)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

#endif
