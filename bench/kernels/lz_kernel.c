/* lz_kernel.c - an LZ77 compressor and decompressor: the "gzip" row of the 2007 benchmark.
 *
 * Compression is what gzip spends its time on: for every input position, hash the next 4 bytes,
 * walk a chain of earlier positions with the same hash (at most LZ_MAX_CHAIN of them, within a
 * 64 KiB window) for the longest match, and emit either a literal or an (offset, length) pair.
 * Like gzip's levels 1-3 ("fast") we take the first longest match greedily, and insert only a
 * match's first position into the hash chains; gzip then Huffman-codes the result, we use a
 * byte-aligned format instead (the one LZ4 uses), since entropy coding is a different,
 * cache-friendly workload and the match search is where the memory traffic is.
 *
 * Format: a sequence of
 *   token       1 byte: high nibble literal count, low nibble match length - 4 (15 = more follows)
 *   [lit ext]   while the previous byte was 255 (or the nibble 15): add the next byte
 *   literals    that many bytes
 *   offset      2 bytes little-endian, 1..65535 back from the current output position
 *   [match ext] as for literals
 * The last sequence has literals only (no offset): the stream ends after its literals.
 *
 * The input is text-like and deterministic: words from a made-up vocabulary, picked with a skew
 * (common words are common), with punctuation, line breaks and numbers - it compresses about 3:1,
 * as English text does under gzip's fast levels.
 *
 * Included by firmware/compress.c (guest) and bench/native_compress.c (host): see bench_kernel.h.
 */
#include "bench_kernel.h"

#define LZ_WINDOW (1u << 16)
#define LZ_HASH_BITS 15
#define LZ_MIN_MATCH 4
#define LZ_MAX_CHAIN 32
#define LZ_NONE 0xffffffffu

/* Work memory the compressor needs besides its input and output: head[] and prev[] chains. */
#define LZ_WORK_BYTES (((1u << LZ_HASH_BITS) + LZ_WINDOW) * 4u)

/* The largest output for n input bytes (all literals). */
static inline uint64_t lz_bound(uint64_t n) { return n + n / 255 + 16; }

typedef uint32_t lz_u32u __attribute__((aligned(1), may_alias));
typedef uint64_t lz_u64u __attribute__((aligned(1), may_alias));

static inline uint32_t lz_hash(const uint8_t *p)
{
    return (*(const lz_u32u *)p * 2654435761u) >> (32 - LZ_HASH_BITS);
}

static inline uint8_t *lz_put_length(uint8_t *op, uint64_t len)
{
    /* len >= 15 already stored as the nibble 15: the rest in 255-steps */
    len -= 15;
    while (len >= 255) {
        *op++ = 255;
        len -= 255;
    }
    *op++ = (uint8_t)len;
    return op;
}

static uint8_t *lz_put_sequence(uint8_t *op, const uint8_t *lit, uint64_t nlit, uint64_t off, uint64_t mlen)
{
    uint8_t *token = op++;
    uint8_t t = (uint8_t)((nlit < 15 ? nlit : 15) << 4);
    if (nlit >= 15)
        op = lz_put_length(op, nlit);
    for (uint64_t i = 0; i < nlit; i++)
        op[i] = lit[i];
    op += nlit;
    if (mlen) {
        uint64_t m = mlen - LZ_MIN_MATCH;
        t |= (uint8_t)(m < 15 ? m : 15);
        *op++ = (uint8_t)off;
        *op++ = (uint8_t)(off >> 8);
        if (m >= 15)
            op = lz_put_length(op, m);
    }
    *token = t;
    return op;
}

/* Compress in[0..n) into out (at least lz_bound(n) bytes); `work` is LZ_WORK_BYTES of scratch.
 * Returns the compressed size. */
__attribute__((noinline)) static uint64_t lz_compress(const uint8_t *in, uint64_t n, uint8_t *out, void *work)
{
    uint32_t *head = work, *prev = head + (1u << LZ_HASH_BITS);
    uint8_t *op = out;
    uint64_t anchor = 0, i = 0;
    for (uint32_t h = 0; h < (1u << LZ_HASH_BITS); h++)
        head[h] = LZ_NONE;
    /* A match may run up to the last 8 bytes (the 8-byte compare reads ahead) */
    uint64_t limit = n > 12 ? n - 12 : 0;
    while (i < limit) {
        uint32_t h = lz_hash(in + i);
        uint32_t cand = head[h];
        uint64_t best = 0, best_off = 0;
        unsigned chain = LZ_MAX_CHAIN;
        while (cand != LZ_NONE && i - cand < LZ_WINDOW && chain--) {
            const uint8_t *p = in + i, *q = in + cand;
            if (q[best] == p[best] && *(const lz_u32u *)q == *(const lz_u32u *)p) {
                uint64_t len = 0, max = n - 8 - i;
                while (len < max) {
                    uint64_t x = *(const lz_u64u *)(p + len) ^ *(const lz_u64u *)(q + len);
                    if (x) {
                        len += (uint64_t)__builtin_ctzll(x) >> 3;
                        break;
                    }
                    len += 8;
                }
                if (len > max)
                    len = max;
                if (len > best) {
                    best = len;
                    best_off = i - cand;
                }
            }
            uint32_t next = prev[cand & (LZ_WINDOW - 1)];
            if (next == LZ_NONE || next >= cand)
                break;
            cand = next;
        }
        prev[i & (LZ_WINDOW - 1)] = head[h];
        head[h] = (uint32_t)i;
        if (best >= LZ_MIN_MATCH) {
            op = lz_put_sequence(op, in + anchor, i - anchor, best_off, best);
            i += best;
            anchor = i;
        } else {
            i++;
        }
    }
    return (uint64_t)(lz_put_sequence(op, in + anchor, n - anchor, 0, 0) - out);
}

static inline uint64_t lz_get_length(const uint8_t **ipp, const uint8_t *end, uint64_t len)
{
    const uint8_t *ip = *ipp;
    uint8_t b;
    do {
        if (ip >= end)
            return ~0ull;
        b = *ip++;
        len += b;
    } while (b == 255);
    *ipp = ip;
    return len;
}

/* Decompress in[0..n) into out (cap bytes). Returns the decompressed size, or ~0 for a malformed
 * stream (never writes outside out[0..cap)). */
__attribute__((noinline)) static uint64_t lz_decompress(const uint8_t *in, uint64_t n, uint8_t *out, uint64_t cap)
{
    const uint8_t *ip = in, *end = in + n;
    uint64_t o = 0;
    while (ip < end) {
        uint8_t t = *ip++;
        uint64_t nlit = t >> 4;
        if (nlit == 15 && (nlit = lz_get_length(&ip, end, nlit)) == ~0ull)
            return ~0ull;
        if (nlit > (uint64_t)(end - ip) || nlit > cap - o)
            return ~0ull;
        for (uint64_t k = 0; k < nlit; k++)
            out[o + k] = ip[k];
        ip += nlit;
        o += nlit;
        if (ip == end)
            break; /* the last sequence: literals only */
        if (end - ip < 2)
            return ~0ull;
        uint64_t off = ip[0] | (uint64_t)ip[1] << 8;
        ip += 2;
        uint64_t mlen = t & 15;
        if (mlen == 15 && (mlen = lz_get_length(&ip, end, mlen)) == ~0ull)
            return ~0ull;
        mlen += LZ_MIN_MATCH;
        if (off == 0 || off > o || mlen > cap - o)
            return ~0ull;
        uint8_t *d = out + o;
        const uint8_t *s = d - off;
        if (off >= 8) {
            uint64_t k = 0;
            for (; k + 8 <= mlen; k += 8)
                *(lz_u64u *)(d + k) = *(const lz_u64u *)(s + k);
            for (; k < mlen; k++)
                d[k] = s[k];
        } else {
            for (uint64_t k = 0; k < mlen; k++) /* overlapping: a repeating pattern */
                d[k] = s[k];
        }
        o += mlen;
    }
    return o;
}

/* Fill buf[0..n) with the deterministic text-like input. */
static void lz_make_input(uint8_t *buf, uint64_t n, uint64_t seed)
{
    enum { WORDS = 2048, MAXLEN = 12 };
    static uint8_t vocab[WORDS][MAXLEN];
    static uint8_t vlen[WORDS];
    uint64_t s = seed | 1;
    for (unsigned w = 0; w < WORDS; w++) {
        uint64_t r = bench_rand(&s);
        vlen[w] = (uint8_t)(2 + r % 9 + (w < 64 ? 0 : r % 2));
        for (unsigned k = 0; k < vlen[w]; k++)
            vocab[w][k] = (uint8_t)('a' + bench_rand(&s) % 26);
    }
    uint64_t i = 0, words_in_line = 0;
    while (i < n) {
        uint64_t r = bench_rand(&s);
        /* Skew: the word index is the smaller of two draws scaled down further - a rough Zipf. */
        uint64_t a = r % WORDS, b = (r >> 16) % WORDS, w = (a < b ? a : b);
        if ((r >> 32) % 4 == 0)
            w = w % 128;
        if ((r >> 40) % 50 == 0) { /* a number */
            uint64_t v = (r >> 44) % 100000;
            char d[8];
            int nd = 0;
            do {
                d[nd++] = (char)('0' + v % 10);
                v /= 10;
            } while (v);
            while (nd && i < n)
                buf[i++] = (uint8_t)d[--nd];
        } else {
            for (unsigned k = 0; k < vlen[w] && i < n; k++)
                buf[i++] = vocab[w][k];
        }
        if (i < n) {
            unsigned p = (unsigned)((r >> 50) % 16);
            buf[i++] = p == 0 ? '.' : p == 1 ? ',' : ' ';
        }
        if (++words_in_line >= 12 && i < n) {
            buf[i++] = '\n';
            words_in_line = 0;
        }
    }
}

struct lz_result {
    uint64_t in_bytes, out_bytes;
    uint64_t compress_best, decompress_best; /* fewest TSC ticks of one pass */
    uint64_t fingerprint;                    /* FNV-1a of the compressed stream */
    int ok;                                  /* the round trip gave back the input */
};

/* Memory layout in `base`: input n, compressed lz_bound(n), decompressed n, work. */
static uint64_t lz_memory_needed(uint64_t n) { return n + lz_bound(n) + n + LZ_WORK_BYTES + 64; }

static void lz_run(void *base, uint64_t n, unsigned reps, struct lz_result *r)
{
    uint8_t *in = base, *comp = in + n, *dec = comp + lz_bound(n);
    void *work = (void *)(((uintptr_t)(dec + n) + 63) & ~(uintptr_t)63);
    if (reps < 2)
        reps = 2;
    lz_make_input(in, n, 2007);
    for (uint64_t i = 0; i < n; i++)
        dec[i] = 0;
    r->in_bytes = n;
    r->compress_best = r->decompress_best = 0;
    r->ok = 1;
    for (unsigned rep = 0; rep < reps; rep++) {
        uint64_t t0 = bench_rdtsc();
        uint64_t m = lz_compress(in, n, comp, work);
        uint64_t t1 = bench_rdtsc();
        uint64_t d = lz_decompress(comp, m, dec, n);
        uint64_t t2 = bench_rdtsc();
        r->out_bytes = m;
        if (d != n)
            r->ok = 0;
        if (rep == 0)
            continue; /* warm-up */
        if (r->compress_best == 0 || t1 - t0 < r->compress_best)
            r->compress_best = t1 - t0;
        if (r->decompress_best == 0 || t2 - t1 < r->decompress_best)
            r->decompress_best = t2 - t1;
    }
    for (uint64_t i = 0; i < n && r->ok; i++)
        if (dec[i] != in[i])
            r->ok = 0;
    r->fingerprint = bench_fnv1a(comp, r->out_bytes);
}
