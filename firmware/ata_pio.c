/* ata_pio: an ATA PIO driver at CPL3 for the primary IDE channel (0x1f0-0x1f7, 0x3f6), polling.
 *
 * What a BIOS or an old-style disk driver does (ATA/ATAPI-7 volume 2, the PIO data-in, data-out and
 * non-data protocols; Linux's libata-sff.c for the polling rules):
 *   - device control (0x3f6) = nIEN: no INTRQ, we poll the status register instead
 *   - before a command: wait for BSY = 0 (and DRDY), write the task file (features, count,
 *     LBA low/mid/high, device = LBA | DEV | LBA 27:24), then the command (0x1f7)
 *   - data-in (IDENTIFY, READ SECTORS): per sector wait BSY = 0, expect DRQ (ERR: stop), 256 words
 *     from the data register (one `rep insw`, which pykvm sees as a single string-I/O exit)
 *   - data-out (WRITE SECTORS): per sector wait BSY = 0 and DRQ, 256 words out; after the last,
 *     wait BSY = 0 and expect DRQ = 0, ERR = 0
 *   - 48-bit (...EXT) commands: each task-file register is a two-byte FIFO, written high-order
 *     byte first (count 15:8, LBA 31:24, 39:32, 47:40), then the low-order bytes; reading with the
 *     device control's HOB bit set returns the high-order bytes
 *
 * Steps, one report line each ("ata_pio: ok <what>" or "ata_pio: FAIL <what>"): IDENTIFY (model,
 * serial, LBA28 and LBA48 sector counts, the word-255 checksum, the LBA48 and FLUSH CACHE EXT
 * feature bits); WRITE SECTORS of the guest's pattern at arg[0] (arg[1] sectors), FLUSH CACHE, READ
 * SECTORS back; READ SECTORS of the host's pattern at arg[2] (arg[3] sectors); if arg[5] != 0,
 * WRITE SECTORS EXT / FLUSH CACHE EXT / READ SECTORS EXT at the 48-bit LBA arg[4] (arg[5] sectors);
 * a READ SECTORS EXT (and, if the disk is small enough, a READ SECTORS) at the first LBA past the
 * end, which must end with ERR, IDNF or ABRT in the error register, DRQ clear, and the failing LBA
 * in the task file. The exit status is the number of failures. arg[6], if nonzero, is the sector
 * count IDENTIFY must report. Patterns: guest (s * 7 + i * 13 + 0x5a) & 0xff, host
 * ((s * 31 + i) ^ 0xa5) & 0xff, s the LBA, i the byte (the same as firmware/virtio_blk.c).
 */
#include "fw.h"

#define ATA_BASE 0x1f0
#define ATA_DATA (ATA_BASE + 0)
#define ATA_ERROR (ATA_BASE + 1)
#define ATA_FEATURES (ATA_BASE + 1)
#define ATA_COUNT (ATA_BASE + 2)
#define ATA_LBA_LOW (ATA_BASE + 3)
#define ATA_LBA_MID (ATA_BASE + 4)
#define ATA_LBA_HIGH (ATA_BASE + 5)
#define ATA_DEVICE (ATA_BASE + 6)
#define ATA_STATUS (ATA_BASE + 7)
#define ATA_COMMAND (ATA_BASE + 7)
#define ATA_CTL 0x3f6 /* read: alternate status; write: device control */

#define ST_BSY 0x80
#define ST_DRDY 0x40
#define ST_DF 0x20
#define ST_DRQ 0x08
#define ST_ERR 0x01
#define ER_IDNF 0x10
#define ER_ABRT 0x04
#define CTL_NIEN 0x02
#define CTL_HOB 0x80
#define DEV_LBA 0x40

#define CMD_READ_SECTORS 0x20
#define CMD_READ_SECTORS_EXT 0x24
#define CMD_WRITE_SECTORS 0x30
#define CMD_WRITE_SECTORS_EXT 0x34
#define CMD_FLUSH_CACHE 0xe7
#define CMD_FLUSH_CACHE_EXT 0xea
#define CMD_IDENTIFY 0xec

#define SECTOR 512
#define MAX_SECTORS 64
#define POLL_LIMIT 1000000

static uint16_t identify_buf[256];
static uint8_t wbuf[MAX_SECTORS * SECTOR], rbuf[MAX_SECTORS * SECTOR];
static int failures;

static void check(int ok, const char *what)
{
    fw_printf("ata_pio: %s %s\n", ok ? "ok" : "FAIL", what);
    if (!ok)
        failures++;
}

static inline void insw(uint16_t port, void *buf, unsigned long words)
{
    __asm__ volatile("rep insw" : "+D"(buf), "+c"(words) : "d"(port) : "memory");
}
static inline void outsw(uint16_t port, const void *buf, unsigned long words)
{
    __asm__ volatile("rep outsw" : "+S"(buf), "+c"(words) : "d"(port) : "memory");
}

/* Wait for BSY to clear; returns the status, or 0xff after POLL_LIMIT reads (a hung device). */
static uint8_t wait_not_busy(void)
{
    (void)inb(ATA_CTL); /* the customary 400 ns: one alternate-status read before trusting status */
    for (long i = 0; i < POLL_LIMIT; i++) {
        uint8_t st = inb(ATA_STATUS);
        if (!(st & ST_BSY))
            return st;
    }
    fw_printf("ata_pio: device stayed busy\n");
    return 0xff;
}

/* Write the task file and the command. ext: 48-bit registers (HOB bytes first). */
static void command(uint8_t cmd, uint64_t lba, unsigned count, int ext)
{
    if (ext) {
        outb(ATA_COUNT, (uint8_t)(count >> 8));
        outb(ATA_LBA_LOW, (uint8_t)(lba >> 24));
        outb(ATA_LBA_MID, (uint8_t)(lba >> 32));
        outb(ATA_LBA_HIGH, (uint8_t)(lba >> 40));
        outb(ATA_COUNT, (uint8_t)count);
        outb(ATA_LBA_LOW, (uint8_t)lba);
        outb(ATA_LBA_MID, (uint8_t)(lba >> 8));
        outb(ATA_LBA_HIGH, (uint8_t)(lba >> 16));
        outb(ATA_DEVICE, DEV_LBA);
    } else {
        outb(ATA_COUNT, (uint8_t)count);
        outb(ATA_LBA_LOW, (uint8_t)lba);
        outb(ATA_LBA_MID, (uint8_t)(lba >> 8));
        outb(ATA_LBA_HIGH, (uint8_t)(lba >> 16));
        outb(ATA_DEVICE, (uint8_t)(DEV_LBA | ((lba >> 24) & 0x0f)));
    }
    outb(ATA_COMMAND, cmd);
}

/* The PIO data-in and data-out protocols (ATA8-ACS, "PIO data-in/out command protocol"): for each
 * sector, wait for BSY clear and DRQ set, then move 256 words through the data register; after
 * the last, DRQ must drop. `out` says which way. Returns 0, or the failing status | error << 8. */
static unsigned pio_transfer(uint16_t *buf, unsigned count, int out)
{
    for (unsigned s = 0; s < count; s++) {
        uint8_t st = wait_not_busy();
        if ((st & (ST_ERR | ST_DF)) || !(st & ST_DRQ))
            return st | (unsigned)inb(ATA_ERROR) << 8;
        if (out)
            outsw(ATA_DATA, buf + s * 256, 256);
        else
            insw(ATA_DATA, buf + s * 256, 256);
    }
    uint8_t st = wait_not_busy();
    if (st & (ST_ERR | ST_DF | ST_DRQ))
        return st | (unsigned)inb(ATA_ERROR) << 8;
    return 0;
}

static unsigned data_in(uint16_t *buf, unsigned count) { return pio_transfer(buf, count, 0); }

static unsigned data_out(const uint16_t *buf, unsigned count)
{
    return pio_transfer((uint16_t *)buf, count, 1);
}

static unsigned non_data(uint8_t cmd)
{
    outb(ATA_COMMAND, cmd);
    uint8_t st = wait_not_busy();
    if (st & (ST_ERR | ST_DF | ST_DRQ))
        return st | (unsigned)inb(ATA_ERROR) << 8;
    return 0;
}

/* IDENTIFY strings: two characters per word, the first in the high byte; trailing spaces cut. */
static void ata_string(char *out, unsigned first_word, unsigned words)
{
    unsigned n = 0;
    for (unsigned w = first_word; w < first_word + words; w++) {
        out[n++] = (char)(identify_buf[w] >> 8);
        out[n++] = (char)identify_buf[w];
    }
    while (n && out[n - 1] == ' ')
        n--;
    out[n] = 0;
}

static inline uint8_t pattern_guest(uint64_t s, unsigned i) { return (uint8_t)(s * 7 + i * 13 + 0x5a); }
static inline uint8_t pattern_host(uint64_t s, unsigned i) { return (uint8_t)((s * 31 + i) ^ 0xa5); }

static void fill_guest(uint64_t lba, unsigned count)
{
    for (unsigned s = 0; s < count; s++)
        for (unsigned i = 0; i < SECTOR; i++)
            wbuf[s * SECTOR + i] = pattern_guest(lba + s, i);
}

static int compare(const uint8_t *got, uint64_t lba, unsigned count, int host)
{
    for (unsigned s = 0; s < count; s++)
        for (unsigned i = 0; i < SECTOR; i++) {
            uint8_t want = host ? pattern_host(lba + s, i) : pattern_guest(lba + s, i);
            if (got[s * SECTOR + i] != want) {
                fw_printf("ata_pio: lba %lu byte %u is %x, expected %x\n", lba + s, i,
                          got[s * SECTOR + i], want);
                return 0;
            }
        }
    return 1;
}

static void write_read(uint64_t lba, unsigned count, int ext)
{
    const char *name = ext ? "EXT" : "LBA28";
    unsigned r;
    fill_guest(lba, count);
    wait_not_busy();
    command(ext ? CMD_WRITE_SECTORS_EXT : CMD_WRITE_SECTORS, lba, count, ext);
    r = data_out((const uint16_t *)wbuf, count);
    fw_printf("ata_pio: %s write %u sectors at lba %lu: %x\n", name, count, lba, r);
    check(r == 0, ext ? "write sectors ext" : "write sectors");
    r = non_data(ext ? CMD_FLUSH_CACHE_EXT : CMD_FLUSH_CACHE);
    check(r == 0, ext ? "flush cache ext" : "flush cache");
    for (unsigned i = 0; i < count * SECTOR; i++)
        rbuf[i] = 0;
    command(ext ? CMD_READ_SECTORS_EXT : CMD_READ_SECTORS, lba, count, ext);
    r = data_in((uint16_t *)rbuf, count);
    check(r == 0 && compare(rbuf, lba, count, 0), ext ? "read sectors ext" : "read sectors");
}

/* A read at `lba` past the end: ERR with IDNF (or ABRT), DRQ clear, the failing LBA reported. */
static void out_of_range(uint64_t lba, int ext)
{
    wait_not_busy();
    command(ext ? CMD_READ_SECTORS_EXT : CMD_READ_SECTORS, lba, 1, ext);
    uint8_t st = wait_not_busy(), err = inb(ATA_ERROR);
    uint64_t got = inb(ATA_LBA_LOW) | (uint64_t)inb(ATA_LBA_MID) << 8
                   | (uint64_t)inb(ATA_LBA_HIGH) << 16;
    if (ext) {
        outb(ATA_CTL, CTL_NIEN | CTL_HOB);
        got |= (uint64_t)inb(ATA_LBA_LOW) << 24 | (uint64_t)inb(ATA_LBA_MID) << 32
               | (uint64_t)inb(ATA_LBA_HIGH) << 40;
        outb(ATA_CTL, CTL_NIEN);
    } else {
        got |= (uint64_t)(inb(ATA_DEVICE) & 0x0f) << 24;
    }
    fw_printf("ata_pio: %s read at lba %lu: status %x error %x, task file lba %lu\n",
              ext ? "EXT" : "LBA28", lba, st, err, got);
    check((st & ST_ERR) && !(st & ST_DRQ) && (err & (ER_IDNF | ER_ABRT)) && got == lba,
          ext ? "read past the end ext fails" : "read past the end fails");
}

int main(void)
{
    uint64_t ws = fw_arg(0, 16), wn = fw_arg(1, 8), hs = fw_arg(2, 2), hn = fw_arg(3, 4);
    uint64_t es = fw_arg(4, 0), en = fw_arg(5, 0), want_total = fw_arg(6, 0);
    if (wn > MAX_SECTORS || hn > MAX_SECTORS || en > MAX_SECTORS) {
        fw_printf("ata_pio: FAIL at most %u sectors per transfer\n", MAX_SECTORS);
        return 0x40;
    }

    outb(ATA_CTL, CTL_NIEN);          /* polling: no interrupts */
    outb(ATA_DEVICE, DEV_LBA);        /* the master */
    uint8_t st = wait_not_busy();
    fw_printf("ata_pio: status %x after selecting the master\n", st);
    if (st == 0 || st == 0xff || !(st & ST_DRDY)) {
        fw_printf("ata_pio: FAIL no drive on the primary channel\n");
        return 0x41;
    }

    /* IDENTIFY DEVICE */
    outb(ATA_COMMAND, CMD_IDENTIFY);
    unsigned r = data_in(identify_buf, 1);
    check(r == 0, "identify");
    char model[41], serial[21];
    ata_string(model, 27, 20);
    ata_string(serial, 10, 10);
    uint32_t lba28 = identify_buf[60] | (uint32_t)identify_buf[61] << 16;
    uint64_t lba48 = identify_buf[100] | (uint64_t)identify_buf[101] << 16
                     | (uint64_t)identify_buf[102] << 32 | (uint64_t)identify_buf[103] << 48;
    uint8_t sum = 0;
    for (unsigned i = 0; i < 256; i++)
        sum = (uint8_t)(sum + (identify_buf[i] & 0xff) + (identify_buf[i] >> 8));
    fw_printf("ata_pio: model \"%s\" serial \"%s\" lba28 %u lba48 %lu\n", model, serial, lba28,
              lba48);
    check((identify_buf[255] & 0xff) == 0xa5 && sum == 0, "identify checksum");
    check((identify_buf[83] & (1 << 10)) && (identify_buf[83] & (1 << 13))
              && (identify_buf[49] & (1 << 9)),
          "identify features (LBA, LBA48, FLUSH CACHE EXT)");
    check(lba28 == (lba48 < 0x0fffffff ? lba48 : 0x0fffffff), "identify lba28 count");
    if (want_total)
        check(lba48 == want_total, "identify sector count");

    if (wn)
        write_read(ws, (unsigned)wn, 0);
    if (hn) {
        wait_not_busy();
        command(CMD_READ_SECTORS, hs, (unsigned)hn, 0);
        r = data_in((uint16_t *)rbuf, (unsigned)hn);
        check(r == 0 && compare(rbuf, hs, (unsigned)hn, 1), "read host sectors");
    }
    if (en)
        write_read(es, (unsigned)en, 1);

    out_of_range(lba48, 1);
    if (lba48 < 0x0fffffff)
        out_of_range(lba48, 0);

    /* The drive is usable after the errors. */
    wait_not_busy();
    command(CMD_READ_SECTORS, 0, 1, 0);
    check(data_in((uint16_t *)rbuf, 1) == 0, "read after the errors");

    fw_printf("ata_pio: %d failures\n", failures);
    return failures;
}
