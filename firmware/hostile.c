/* hostile: a guest that tries to make the VMM's memory grow, for the bounded-memory tests
 * (tests/test_hostile_guest.py). Each mode does one thing a misbehaving or malicious guest could do
 * for as long as it likes; the VMM must keep only a bounded amount of it.
 *
 * args:
 *   arg[0] mode:
 *     0 transmit flood through a virtio-console (virtio-mmio at arg[2], default 0xd0000000;
 *       arg[4] the device ID, default 3; 1 for a virtio-net, whose transmitq is queue 1 too):
 *       brings the device up (VIRTIO 1.2 3.1.1), then puts arg[1] bytes (default 64 MiB) of text
 *       on the transmitq (queue 1, 5.3.2 / 5.1.2) in chains of one arg[3]-byte buffer (default
 *       1 MiB), one notify each. It never posts a receive buffer. (A debug-port flood would take
 *       a VM exit per byte: KVM-PVM completes `rep outsb` one byte per exit.)
 *     1 unclaimed MMIO sweep: a byte read at each of arg[1] (default 65536) addresses from
 *       arg[2] (default 0xd8000000, in the MMIO hole where the firmware machine has nothing)
 *       every arg[3] bytes (default 8): one exit per address, each a new unclaimed address.
 *   Prints "hostile: done mode M" on the debug console and exits 0 (non-zero: set-up failed).
 */
#include "fw.h"

#include "virtio_mmio.h" /* the register offsets, from <linux/virtio_mmio.h> */
#define VIRTIO_ID_CONSOLE 3
#define STATUS_OK_ALL (1 | 2 | 8 | 4) /* ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK */
#define TXQ 1
#define QSIZE 8
#define MAX_CHUNK (1u << 20)

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct avail { uint16_t flags, idx; uint16_t ring[QSIZE]; uint16_t used_event; };
struct used { uint16_t flags, idx; struct { uint32_t id, len; } ring[QSIZE]; uint16_t avail_event; };

static struct desc desc[QSIZE] __attribute__((aligned(4096)));
static struct avail avail __attribute__((aligned(4096)));
static struct used used __attribute__((aligned(4096)));
static uint8_t chunk[MAX_CHUNK] __attribute__((aligned(4096)));
static volatile uint8_t *mmio;

static inline uint32_t rd(unsigned off) { return *(volatile uint32_t *)(mmio + off); }
static inline void wr(unsigned off, uint32_t v) { *(volatile uint32_t *)(mmio + off) = v; }
static inline void wr64(unsigned lo, const void *p)
{
    wr(lo, (uint32_t)(uint64_t)p);
    wr(lo + 4, (uint32_t)((uint64_t)p >> 32));
}

static int tx_flood(uint64_t total, uint64_t base, uint64_t size, uint64_t device_id)
{
    mmio = (volatile uint8_t *)base;
    if (rd(R_MAGIC) != 0x74726976 || rd(R_VERSION) != 2 || rd(R_DEVICE_ID) != device_id)
        return 0x10;
    if (size == 0 || size > MAX_CHUNK)
        return 0x11;
    wr(R_STATUS, 0);
    wr(R_STATUS, 1);
    wr(R_STATUS, 1 | 2);
    wr(R_DRIVER_FEATURES_SEL, 0);
    wr(R_DRIVER_FEATURES, 0);
    wr(R_DRIVER_FEATURES_SEL, 1);
    wr(R_DRIVER_FEATURES, 1); /* VIRTIO_F_VERSION_1, bit 32 */
    wr(R_STATUS, 1 | 2 | 8);
    if (!(rd(R_STATUS) & 8))
        return 0x12;
    wr(R_QUEUE_SEL, TXQ);
    if (rd(R_QUEUE_NUM_MAX) < QSIZE)
        return 0x13;
    avail.flags = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
    wr(R_QUEUE_NUM, QSIZE);
    wr64(R_QUEUE_DESC_LOW, desc);
    wr64(R_QUEUE_DRIVER_LOW, &avail);
    wr64(R_QUEUE_DEVICE_LOW, &used);
    wr(R_QUEUE_READY, 1);
    wr(R_STATUS, STATUS_OK_ALL);

    static const char line[] = "hostile guest console flood: this line repeats forever ....\n";
    for (uint64_t i = 0; i < size; i++)
        chunk[i] = (uint8_t)line[i % (sizeof(line) - 1)];
    for (uint64_t done = 0; done < total; done += size) {
        uint32_t n = (uint32_t)(total - done < size ? total - done : size);
        desc[0] = (struct desc){(uint64_t)chunk, n, 0, 0};
        avail.ring[avail.idx % QSIZE] = 0;
        __asm__ volatile("" ::: "memory");
        avail.idx++;
        __asm__ volatile("" ::: "memory");
        wr(R_QUEUE_NOTIFY, TXQ);
        while (*(volatile uint16_t *)&used.idx != avail.idx)
            __asm__ volatile("pause" ::: "memory");
    }
    return 0;
}

static uint64_t mmio_sweep(uint64_t count, uint64_t base, uint64_t stride)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < count; i++)
        sum += *(volatile uint8_t *)(base + i * stride);
    return sum;
}

int main(void)
{
    uint64_t mode = fw_arg(0, 0);
    if (mode == 0) {
        int r = tx_flood(fw_arg(1, 64 << 20), fw_arg(2, 0xd0000000), fw_arg(3, MAX_CHUNK),
                         fw_arg(4, VIRTIO_ID_CONSOLE));
        if (r)
            return r;
    } else if (mode == 1) {
        fw_printf("hostile: sum %lx\n", mmio_sweep(fw_arg(1, 65536), fw_arg(2, 0xd8000000),
                                                  fw_arg(3, 8)));
    } else {
        return 1;
    }
    fw_printf("hostile: done mode %lu\n", mode);
    return 0;
}
