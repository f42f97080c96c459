/* virtio_blk: a minimal virtio-mmio (version 2) block driver at CPL3, by polling.
 *
 * What Linux's virtio_mmio.c + virtio_blk.c do, cut to the bone (VIRTIO 1.2 sections 2.7 "Split
 * virtqueues", 3.1.1 "Driver requirements: device initialization", 4.2.2 "MMIO device register
 * layout", 5.2.6 "Device operation" of the block device):
 *
 *   1. probe: MagicValue "virt", Version 2, DeviceID 2 (block) at the base from arg[1]
 *   2. Status = 0 (reset), ACKNOWLEDGE, DRIVER; read DeviceFeatures (both halves); accept only
 *      VIRTIO_F_VERSION_1 (bit 32); FEATURES_OK, read it back (the device may refuse)
 *   3. queue 0: QueueSel, QueueNumMax, QueueNum = QSIZE, the descriptor table, the available
 *      ("driver") ring and the used ("device") ring addresses, QueueReady = 1; DRIVER_OK
 *   4. a request is a chain: header {le32 type, le32 reserved, le64 sector} (device-readable),
 *      the data in segments of at most arg[seg] bytes (readable for a write, writable for a read),
 *      one status byte (writable). Put its head in the available ring, bump avail->idx, write the
 *      queue index to QueueNotify, spin on used->idx.
 *
 * No interrupts: the available ring says VIRTQ_AVAIL_F_NO_INTERRUPT and the guest runs with IF=0.
 * The write to QueueNotify is an MMIO exit and pykvm serves the request before the vCPU resumes, so
 * the used ring is normally already updated when the `mov` returns; with KVM_IOEVENTFD the notify
 * does not exit at all and a VMM thread serves the queue while we spin, so we always poll. While
 * the device polls the available ring itself it sets VIRTQ_USED_F_NO_NOTIFY and we do not kick
 * (notify() below), as Linux's driver does not.
 * Guest-physical = virtual (the runtime identity-maps RAM and the MMIO hole), so buffer addresses go
 * into descriptors as they are.
 *
 * args:
 *   arg[0] mode: 0 self-check (default), 1 sequential-read benchmark
 *   arg[1] virtio-mmio base (default 0xd0000000, pykvm.x86.layout.VIRTIO_MMIO_BASE)
 * mode 0, self-check:
 *   arg[2] first sector the guest writes (default 64), arg[3] how many (default 24)
 *   arg[4] first sector the host prepared (default 8), arg[5] how many (default 16)
 *   The guest writes pattern_guest(sector, i) to its sectors in one request of several segments,
 *   then a FLUSH, reads them back (sector by sector and in one request) and compares; it reads the
 *   host's sectors and compares them with pattern_host(sector, i); it reads GET_ID; it reads one
 *   sector past the end (capacity from config space) and expects IOERR. Prints one line per check
 *   ("virtio_blk: ok <what>" / "virtio_blk: FAIL <what> ...") and exits with the number of failures.
 *   pattern_guest(s, i) = (s * 7 + i * 13 + 0x5a) & 0xff; pattern_host(s, i) = (s * 31 + i) & 0xff
 *   ^ 0xa5 (tests/test_firmware_devices.py computes both).
 * mode 1, benchmark:
 *   arg[2] bytes to transfer (default 1 MiB), arg[3] bytes per request (default 128 KiB, at most
 *   MAX_REQUEST), arg[4] segment size (default 64 KiB), arg[5] requests per notify (default 4,
 *   at most MAX_INFLIGHT, DEPTH x REQUEST at most POOL and DEPTH x (REQUEST / SEGMENT + 2)
 *   descriptors at most QSIZE), arg[6] marker port (default 0:
 *   none): the guest writes 1 there just before the first request and 2 after the last
 *   completes, so the VMM can time the transfer alone. arg[7] direction: 0 read (default), 1
 *   write, then one FLUSH (inside the marks: a write is only done when it is on stable storage,
 *   as the host's pwrite + fsync baseline is). Requests wrap around at the end of the disk. A
 *   write sends buffers filled with pattern_guest(sector, i) of the first pass (so the host can
 *   check what landed). arg[8], for a test (not the benchmark): 1 = at the end, wait until the
 *   device says it polls (VIRTQ_USED_F_NO_NOTIFY), then one GET_ID, which pykvm's C path must
 *   hand to its Python model (counted in E if it fails). Prints "virtio_blk: bench bytes=N
 *   cycles=C requests=R notifies=K errors=E checksum=S suppressed=U" (C from rdtsc); S is the
 *   sum of the first byte of every 4 KiB moved; K + U is the number of batches (and FLUSH and
 *   GET_ID), U those made while the device said it polls (no kick). */
#include "fw.h"

int memcmp(const void *a, const void *b, unsigned long n); /* runtime.c */

#include "virtio_mmio.h" /* the register offsets, from <linux/virtio_mmio.h> */

#define MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_ID_BLOCK 2
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_FAILED 0x80
#define F_VERSION_1_HIGH 1 /* bit 32: bit 0 of the high half */

/* ---- the split virtqueue (2.7) ---- */
#define QSIZE 256
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};
struct virtq_avail {
    uint16_t flags, idx;
    uint16_t ring[QSIZE];
    uint16_t used_event;
};
struct virtq_used_elem {
    uint32_t id, len;
};
struct virtq_used {
    uint16_t flags, idx;
    struct virtq_used_elem ring[QSIZE];
    uint16_t avail_event;
};

/* ---- virtio-blk requests (5.2.6) ---- */
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define SECTOR 512

struct blk_req_hdr {
    uint32_t type, reserved;
    uint64_t sector;
};

/* Up to MAX_INFLIGHT requests of up to MAX_REQUEST bytes each, all their buffers in one POOL:
 * 8 x 1 MiB, or 64 x 4 KiB (small requests need a deep queue to amortise the notify exit). Each
 * request takes descs_per_req descriptors (header, data segments, status): 8 by default, fewer in
 * a benchmark whose requests need fewer, so that more fit in the ring. */
#define MAX_INFLIGHT 128
#define MAX_REQUEST (1u << 20)
#define POOL (8u << 20)
#define DESCS_PER_REQ 8
static unsigned descs_per_req = DESCS_PER_REQ;

static struct virtq_desc desc[QSIZE] __attribute__((aligned(4096)));
static struct virtq_avail avail __attribute__((aligned(4096)));
static struct virtq_used used __attribute__((aligned(4096)));
static struct blk_req_hdr hdrs[MAX_INFLIGHT];
static volatile uint8_t statuses[MAX_INFLIGHT];
static uint8_t pool[POOL] __attribute__((aligned(4096)));
#define BUFFER(k) (pool + (uint64_t)(k) * MAX_REQUEST) /* self-check: buffers 0-2, 1 MiB each */

static volatile uint8_t *mmio;
static uint16_t last_used;
static uint64_t notifies, suppressed;

static inline uint32_t rd(unsigned off) { return *(volatile uint32_t *)(mmio + off); }
static inline void wr(unsigned off, uint32_t v) { *(volatile uint32_t *)(mmio + off) = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return (uint64_t)hi << 32 | lo;
}

static int failures;
static void check(int ok, const char *what)
{
    if (ok)
        fw_printf("virtio_blk: ok %s\n", what);
    else {
        fw_printf("virtio_blk: FAIL %s\n", what);
        failures++;
    }
}

/* Bring the device up (steps 1-3). Returns 0, or a nonzero exit status. */
static int init_device(uint64_t base, uint64_t *capacity)
{
    mmio = (volatile uint8_t *)base;
    uint32_t magic = rd(R_MAGIC), version = rd(R_VERSION), id = rd(R_DEVICE_ID);
    fw_printf("virtio_blk: at %lx magic %x version %u device %u\n", base, magic, version, id);
    if (magic != MMIO_MAGIC || version != 2 || id != VIRTIO_ID_BLOCK) {
        fw_printf("virtio_blk: FAIL probe: not a virtio-mmio v2 block device\n");
        return 0x10;
    }
    wr(R_STATUS, 0);
    wr(R_STATUS, S_ACKNOWLEDGE);
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(R_DEVICE_FEATURES_SEL, 0);
    uint32_t f_low = rd(R_DEVICE_FEATURES);
    wr(R_DEVICE_FEATURES_SEL, 1);
    uint32_t f_high = rd(R_DEVICE_FEATURES);
    fw_printf("virtio_blk: device features %x:%x\n", f_high, f_low);
    if (!(f_high & F_VERSION_1_HIGH)) {
        fw_printf("virtio_blk: FAIL features: no VIRTIO_F_VERSION_1\n");
        wr(R_STATUS, S_FAILED);
        return 0x11;
    }
    wr(R_DRIVER_FEATURES_SEL, 0);
    wr(R_DRIVER_FEATURES, 0);
    wr(R_DRIVER_FEATURES_SEL, 1);
    wr(R_DRIVER_FEATURES, F_VERSION_1_HIGH);
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(rd(R_STATUS) & S_FEATURES_OK)) {
        fw_printf("virtio_blk: FAIL features: FEATURES_OK did not stick\n");
        wr(R_STATUS, S_FAILED);
        return 0x12;
    }
    wr(R_QUEUE_SEL, 0);
    if (rd(R_QUEUE_READY)) {
        fw_printf("virtio_blk: FAIL queue 0 already live after reset\n");
        return 0x13;
    }
    uint32_t max = rd(R_QUEUE_NUM_MAX);
    if (max < QSIZE) {
        fw_printf("virtio_blk: FAIL queue 0 holds %u, need %u\n", max, QSIZE);
        return 0x14;
    }
    avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    wr(R_QUEUE_NUM, QSIZE);
    wr(R_QUEUE_DESC_LOW, (uint32_t)(uint64_t)desc);
    wr(R_QUEUE_DESC_HIGH, (uint32_t)((uint64_t)desc >> 32));
    wr(R_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)&avail);
    wr(R_QUEUE_DRIVER_HIGH, (uint32_t)((uint64_t)&avail >> 32));
    wr(R_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)&used);
    wr(R_QUEUE_DEVICE_HIGH, (uint32_t)((uint64_t)&used >> 32));
    wr(R_QUEUE_READY, 1);
    if (!rd(R_QUEUE_READY)) {
        fw_printf("virtio_blk: FAIL the device refused queue 0\n");
        return 0x15;
    }
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    uint32_t st = rd(R_STATUS);
    if (!(st & S_DRIVER_OK) || (st & 0x40 /* DEVICE_NEEDS_RESET */)) {
        fw_printf("virtio_blk: FAIL status %x after DRIVER_OK\n", st);
        return 0x16;
    }
    *capacity = (uint64_t)rd(R_CONFIG + 4) << 32 | rd(R_CONFIG);
    fw_printf("virtio_blk: ready, queue %u of %u, capacity %lu sectors\n", QSIZE, max, *capacity);
    return 0;
}

/* Build request `slot`'s chain in its own block of descriptors and make it available (no notify).
 * `len` bytes of data at `buf` (0 for FLUSH), cut into `seg`-byte descriptors. */
static void queue_request(unsigned slot, uint32_t type, uint64_t sector, void *buf, uint32_t len,
                          uint32_t seg)
{
    unsigned first = slot * descs_per_req, d = first;
    hdrs[slot] = (struct blk_req_hdr){type, 0, sector};
    statuses[slot] = 0xff;
    desc[d] = (struct virtq_desc){(uint64_t)&hdrs[slot], sizeof(hdrs[slot]), VIRTQ_DESC_F_NEXT,
                                  (uint16_t)(d + 1)};
    d++;
    uint16_t wflag = (type == T_OUT) ? 0 : VIRTQ_DESC_F_WRITE;
    for (uint32_t off = 0; off < len; off += seg) {
        uint32_t n = len - off < seg ? len - off : seg;
        desc[d] = (struct virtq_desc){(uint64_t)buf + off, n, (uint16_t)(VIRTQ_DESC_F_NEXT | wflag),
                                      (uint16_t)(d + 1)};
        d++;
    }
    desc[d] = (struct virtq_desc){(uint64_t)&statuses[slot], 1, VIRTQ_DESC_F_WRITE, 0};
    avail.ring[avail.idx % QSIZE] = (uint16_t)first;
    barrier(); /* x86 keeps stores in order; the compiler must too: ring entry before idx */
    avail.idx++;
}

/* Tell the device about new requests, unless it said it does not want to hear (VIRTIO 1.2 2.7.10:
 * VIRTQ_USED_F_NO_NOTIFY in the used ring's flags, set while the device polls the available ring;
 * Linux's virtqueue_kick_prepare does the same). The fence orders our store of avail.idx before our
 * load of used.flags: the device clears the flag, fences, then looks at avail.idx, so one of us
 * always sees the other's store (x86 may pass a load ahead of an earlier store: only a fence stops
 * it). */
static void notify(void)
{
    __asm__ volatile("mfence" ::: "memory");
    if (*(volatile uint16_t *)&used.flags & VIRTQ_USED_F_NO_NOTIFY) {
        suppressed++;
        return;
    }
    wr(R_QUEUE_NOTIFY, 0);
    notifies++;
}

/* Wait until the device has used everything made available. */
static void wait_all(void)
{
    while (*(volatile uint16_t *)&used.idx != avail.idx)
        __asm__ volatile("pause" ::: "memory");
    last_used = used.idx;
}

/* One request, synchronously; returns its status byte (0xff: the device never wrote it). */
static unsigned do_request(uint32_t type, uint64_t sector, void *buf, uint32_t len, uint32_t seg,
                           uint32_t *used_len)
{
    queue_request(0, type, sector, buf, len, seg);
    notify();
    wait_all();
    if (used_len)
        *used_len = used.ring[(uint16_t)(last_used - 1) % QSIZE].len;
    return statuses[0];
}

static inline uint8_t pattern_guest(uint64_t s, unsigned i) { return (uint8_t)(s * 7 + i * 13 + 0x5a); }
static inline uint8_t pattern_host(uint64_t s, unsigned i) { return (uint8_t)((s * 31 + i) ^ 0xa5); }

static int self_check(uint64_t capacity)
{
    uint64_t ws = fw_arg(2, 64), wn = fw_arg(3, 24), hs = fw_arg(4, 8), hn = fw_arg(5, 16);
    if (wn * SECTOR > MAX_REQUEST || hn * SECTOR > MAX_REQUEST) {
        fw_printf("virtio_blk: FAIL self-check ranges too large\n");
        return 0x20;
    }
    uint8_t *buf = BUFFER(0);
    uint32_t ulen;

    /* The host's sectors, in one request of 1 KiB segments. */
    unsigned st = do_request(T_IN, hs, buf, (uint32_t)(hn * SECTOR), 1024, &ulen);
    int same = st == BLK_S_OK && ulen == hn * SECTOR + 1;
    for (uint64_t s = 0; same && s < hn; s++)
        for (unsigned i = 0; i < SECTOR; i++)
            if (buf[s * SECTOR + i] != pattern_host(hs + s, i)) {
                fw_printf("virtio_blk: host sector %lu byte %u is %x, expected %x\n", hs + s, i,
                          buf[s * SECTOR + i], pattern_host(hs + s, i));
                same = 0;
                break;
            }
    fw_printf("virtio_blk: read %lu host sectors from %lu: status %u, used len %u\n", hn, hs, st,
              ulen);
    check(same, "read host sectors");

    /* Write the guest's pattern in one request of 512-byte segments, then FLUSH. */
    for (uint64_t s = 0; s < wn; s++)
        for (unsigned i = 0; i < SECTOR; i++)
            buf[s * SECTOR + i] = pattern_guest(ws + s, i);
    st = do_request(T_OUT, ws, buf, (uint32_t)(wn * SECTOR), 4 * SECTOR, &ulen);
    fw_printf("virtio_blk: wrote %lu sectors at %lu: status %u, used len %u\n", wn, ws, st, ulen);
    check(st == BLK_S_OK && ulen == 1, "write sectors");
    st = do_request(T_FLUSH, 0, 0, 0, SECTOR, &ulen);
    check(st == BLK_S_OK, "flush");

    /* Read them back: one sector per request, then all in one. */
    int back = 1;
    for (uint64_t s = 0; s < wn; s++) {
        uint8_t *one = BUFFER(1);
        for (unsigned i = 0; i < SECTOR; i++)
            one[i] = 0;
        st = do_request(T_IN, ws + s, one, SECTOR, SECTOR, 0);
        for (unsigned i = 0; st == BLK_S_OK && i < SECTOR; i++)
            if (one[i] != pattern_guest(ws + s, i)) {
                fw_printf("virtio_blk: sector %lu byte %u reads %x, wrote %x\n", ws + s, i, one[i],
                          pattern_guest(ws + s, i));
                back = 0;
                break;
            }
        if (st != BLK_S_OK)
            back = 0;
    }
    check(back, "read back sector by sector");
    uint8_t *all = BUFFER(2);
    st = do_request(T_IN, ws, all, (uint32_t)(wn * SECTOR), 4096, 0);
    check(st == BLK_S_OK && memcmp(all, buf, wn * SECTOR) == 0, "read back in one request");

    /* GET_ID: the serial, 20 bytes. */
    char id[21] = {0};
    st = do_request(T_GET_ID, 0, id, 20, 20, 0);
    fw_printf("virtio_blk: serial \"%s\"\n", id);
    check(st == BLK_S_OK && id[0], "get id");

    /* Past the end: the device must answer IOERR, not crash or read garbage. */
    st = do_request(T_IN, capacity, BUFFER(1), SECTOR, SECTOR, 0);
    fw_printf("virtio_blk: read at sector %lu (capacity): status %u\n", capacity, st);
    check(st == BLK_S_IOERR, "read past the end fails with IOERR");

    fw_printf("virtio_blk: %d failures, %lu notifies\n", failures, notifies);
    return failures;
}

static int bench(uint64_t capacity)
{
    uint64_t total = fw_arg(2, 1 << 20), req = fw_arg(3, 128 << 10), seg = fw_arg(4, 64 << 10);
    uint64_t depth = fw_arg(5, 4), port = fw_arg(6, 0), write = fw_arg(7, 0);
    uint64_t id_in_window = fw_arg(8, 0);
    if (req == 0 || req > MAX_REQUEST || req % SECTOR || seg == 0 || seg % SECTOR
        || (req + seg - 1) / seg + 2 > QSIZE || depth == 0 || depth > MAX_INFLIGHT
        || depth * ((req + seg - 1) / seg + 2) > QSIZE
        || depth * req > POOL || capacity < req / SECTOR || write > 1) {
        fw_printf("virtio_blk: FAIL bad benchmark parameters\n");
        return 0x30;
    }
    uint64_t sectors_per_req = req / SECTOR, sector = 0, done = 0, requests = 0, sum = 0;
    uint32_t type = write ? T_OUT : T_IN;
    descs_per_req = (unsigned)((req + seg - 1) / seg + 2);
    int errors = 0;
    if (write) /* what the first pass writes: the host checks it (tests/test_firmware_devices.py) */
        for (uint64_t k = 0; k < depth; k++)
            for (uint64_t i = 0; i < req; i++)
                pool[k * req + i] = pattern_guest(k * sectors_per_req + i / SECTOR, i % SECTOR);
    if (port)
        outb((uint16_t)port, 1);
    uint64_t t0 = rdtsc();
    while (done < total) {
        unsigned n = 0;
        for (; n < depth && done + (uint64_t)n * req < total; n++) {
            if (sector + sectors_per_req > capacity)
                sector = 0;
            queue_request(n, type, sector, pool + n * req, (uint32_t)req, (uint32_t)seg);
            sector += sectors_per_req;
        }
        notify();
        wait_all();
        for (unsigned k = 0; k < n; k++) {
            if (statuses[k] != BLK_S_OK)
                errors++;
            for (uint64_t off = 0; off < req; off += 4096)
                sum += pool[k * req + off];
        }
        done += (uint64_t)n * req;
        requests += n;
    }
    if (write && do_request(T_FLUSH, 0, 0, 0, SECTOR, 0) != BLK_S_OK)
        errors++;
    if (id_in_window) {
        /* A request only the device's slow path serves, made available while the device polls
         * (wait until it says so: no kick then). tests/test_firmware_devices.py checks it. */
        while (!(*(volatile uint16_t *)&used.flags & VIRTQ_USED_F_NO_NOTIFY))
            __asm__ volatile("pause" ::: "memory");
        char id[21] = {0};
        unsigned st = do_request(T_GET_ID, 0, id, 20, 20, 0);
        if (st != BLK_S_OK || !id[0])
            errors++;
    }
    uint64_t cycles = rdtsc() - t0;
    if (port)
        outb((uint16_t)port, 2);
    fw_printf("virtio_blk: bench bytes=%lu cycles=%lu requests=%lu notifies=%lu errors=%d "
              "checksum=%lu suppressed=%lu\n", done, cycles, requests, notifies, errors, sum,
              suppressed);
    return errors ? 0x31 : 0;
}

int main(void)
{
    uint64_t mode = fw_arg(0, 0), base = fw_arg(1, 0xd0000000), capacity = 0;
    int r = init_device(base, &capacity);
    if (r)
        return r;
    return mode == 1 ? bench(capacity) : self_check(capacity);
}
