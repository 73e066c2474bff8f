/*
 * Ways to widen 2-byte rows (bfloat16, float16) to float64 in combine64's one-row pass,
 * on one AVX2 core: acc[j] += c[r] * G[r, j] over panels of 8 rows, float64 sums.
 *
 *   gcc -O3 -mavx2 -mfma -mf16c benchmarks/widen_tile.c -o /tmp/widen_tile && /tmp/widen_tile
 *
 * G is m = 64 rows of d = 2^20 bfloat16 items (128 MiB: from memory), and again 8 rows of 8192
 * (in L1/L2), in chunks of 4096 columns whose sums stay in a 32 KiB buffer, panel after panel,
 * as the kernel goes. Prints G items a second (best of 7, thread CPU time) for:
 *
 * - stage u4: the panel's rows, 64 columns at a time, widened to a float32 buffer (vpmovzxwd,
 *   vpslld), then tiles of 4 vectors of sums read it converting as they load (vcvtps2pd from
 *   memory): combine64_one's 2-byte path before the pipelined one;
 * - stage u8: the same with 8 vectors of sums (8 FMA chains);
 * - pipelined u8: as stage u8, the next 64 columns staged inside the tiles (double buffer):
 *   combine64_one's 2-byte path now (_passes_impl.h, COMBINE64_ONE_STAGED);
 * - f16 stage u4: float16 rows staged by F16C (vcvtph2ps), 4 vectors;
 * - bits u4 / u8: no float conversion at all: a bfloat16's bits, sign-extended to 64 bits
 *   (vpmovsxwq), shifted left by 45 and bits 60-62 cleared, are a float64 of the value times
 *   2^-896, normal and subnormal bfloat16 alike (coefficients scaled by 2^896 make the
 *   products exact); but infinities and NaNs become finite numbers;
 * - bits+check u8: the same with the check that would keep it exact for any G (a running
 *   unsigned maximum of the items' bits doubled, one per 16 items: an infinity or NaN
 *   reaches 0xff00);
 * - in-register u8: 8 items widened to float32 in a register and converted from it (two
 *   vcvtps2pd of a register's halves);
 * - tile only: stage u4's tiles over a buffer staged once (the conversions and FMAs alone);
 * - read only: the 8 rows' items loaded and added as integers (the memory ceiling).
 *
 * Every variant's sums are checked against stage u4's, bit for bit (the bit variants with
 * the coefficients times 2^896: their products are the same numbers).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define R 8      /* rows in a panel */
#define SUB 64   /* columns of one staging */
#define CH 4096  /* columns of one chunk (the sums' buffer) */
#define TGT __attribute__((target("avx2,fma,f16c"), noinline))

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

typedef void (*fn)(const uint16_t *G, long ld, const double *c, double *acc, float *buf);

#define STAGE8(q, p)                                                                            \
    _mm256_store_si256((__m256i *)(q),                                                          \
                       _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))

#define TILES(U, buf)                                                                           \
    for (int j = 0; j < SUB; j += 4 * (U)) {                                                    \
        __m256d a[U];                                                                           \
        for (int u = 0; u < (U); u++)                                                           \
            a[u] = _mm256_loadu_pd(acc + js + j + 4 * u);                                       \
        for (int r = 0; r < R; r++) {                                                           \
            const __m256d cc = _mm256_broadcast_sd(c + 8 * r);                                  \
            for (int u = 0; u < (U); u++)                                                       \
                a[u] = _mm256_fmadd_pd(cc, _mm256_cvtps_pd(_mm_load_ps(buf + r * SUB + j + 4 * u)), a[u]); \
        }                                                                                       \
        for (int u = 0; u < (U); u++)                                                           \
            _mm256_storeu_pd(acc + js + j + 4 * u, a[u]);                                       \
    }

#define STAGED(NAME, U)                                                                         \
    TGT static void NAME(const uint16_t *G, long ld, const double *c, double *acc, float *buf)  \
    {                                                                                           \
        for (long js = 0; js < CH; js += SUB) {                                                 \
            for (int r = 0; r < R; r++)                                                         \
                for (int j = 0; j < SUB; j += 8)                                                \
                    STAGE8(buf + r * SUB + j, G + r * ld + js + j);                             \
            TILES(U, buf)                                                                       \
        }                                                                                       \
    }
STAGED(stage_u4, 4)
STAGED(stage_u8, 8)

TGT static void pipelined_u8(const uint16_t *G, long ld, const double *c, double *acc, float *buf)
{
    float *bufs[2] = {buf, buf + R * SUB};
    for (int r = 0; r < R; r++)
        for (int j = 0; j < SUB; j += 8)
            STAGE8(bufs[0] + r * SUB + j, G + r * ld + j);
    int cur = 0;
    for (long js = 0; js < CH; js += SUB, cur ^= 1) {
        const int more = js + SUB < CH;
        const float *b = bufs[cur];
        float *nb = bufs[cur ^ 1];
        for (int j = 0; j < SUB; j += 32) {
            __m256d a[8];
            for (int u = 0; u < 8; u++)
                a[u] = _mm256_loadu_pd(acc + js + j + 4 * u);
            for (int r = 0; r < R; r++) {
                if (more)
                    for (int q = 0; q < 32; q += 8)
                        STAGE8(nb + r * SUB + j + q, G + r * ld + js + SUB + j + q);
                const __m256d cc = _mm256_broadcast_sd(c + 8 * r);
                for (int u = 0; u < 8; u++)
                    a[u] = _mm256_fmadd_pd(cc, _mm256_cvtps_pd(_mm_load_ps(b + r * SUB + j + 4 * u)), a[u]);
            }
            for (int u = 0; u < 8; u++)
                _mm256_storeu_pd(acc + js + j + 4 * u, a[u]);
        }
    }
}

TGT static void f16_stage_u4(const uint16_t *G, long ld, const double *c, double *acc, float *buf)
{
    for (long js = 0; js < CH; js += SUB) {
        for (int r = 0; r < R; r++)
            for (int j = 0; j < SUB; j += 8)
                _mm256_store_ps(buf + r * SUB + j,
                                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(G + r * ld + js + j))));
        TILES(4, buf)
    }
}

/* A bfloat16's bits as a float64 of its value times 2^-896 (finite items only). */
#define BITS(p)                                                                                 \
    _mm256_castsi256_pd(_mm256_and_si256(                                                       \
        _mm256_slli_epi64(_mm256_cvtepi16_epi64(_mm_loadl_epi64((const __m128i *)(p))), 45), mask))

#define BITTRICK(NAME, U, CHECK)                                                                \
    TGT static void NAME(const uint16_t *G, long ld, const double *c, double *acc, float *buf)  \
    {                                                                                           \
        (void)buf;                                                                              \
        const __m256i mask = _mm256_set1_epi64x((long long)0x8fffffffffffffffULL);             \
        __m256i most = _mm256_setzero_si256();                                                  \
        for (long j = 0; j < CH; j += 4 * (U)) {                                                \
            __m256d a[U];                                                                       \
            for (int u = 0; u < (U); u++)                                                       \
                a[u] = _mm256_loadu_pd(acc + j + 4 * u);                                        \
            for (int r = 0; r < R; r++) {                                                       \
                if (CHECK)                                                                      \
                    for (int u = 0; u < (U); u += 4) {                                          \
                        const __m256i w = _mm256_loadu_si256((const __m256i *)(G + r * ld + j + 4 * u)); \
                        most = _mm256_max_epu16(most, _mm256_add_epi16(w, w));                  \
                    }                                                                           \
                const __m256d cc = _mm256_broadcast_sd(c + 8 * r);                              \
                for (int u = 0; u < (U); u++)                                                   \
                    a[u] = _mm256_fmadd_pd(cc, BITS(G + r * ld + j + 4 * u), a[u]);             \
            }                                                                                   \
            for (int u = 0; u < (U); u++)                                                       \
                _mm256_storeu_pd(acc + j + 4 * u, a[u]);                                        \
        }                                                                                       \
        if (CHECK && _mm256_movemask_epi8(_mm256_cmpeq_epi16(                                  \
                         _mm256_max_epu16(most, _mm256_set1_epi16((short)0xff00)), most)))      \
            acc[0] = NAN; /* an infinity or NaN: the caller would redo the panel */            \
    }
BITTRICK(bits_u4, 4, 0)
BITTRICK(bits_u8, 8, 0)
BITTRICK(bits_check_u8, 8, 1)

TGT static void in_register_u8(const uint16_t *G, long ld, const double *c, double *acc, float *buf)
{
    (void)buf;
    for (long j = 0; j < CH; j += 32) {
        __m256d a[8];
        for (int u = 0; u < 8; u++)
            a[u] = _mm256_loadu_pd(acc + j + 4 * u);
        for (int r = 0; r < R; r++) {
            const __m256d cc = _mm256_broadcast_sd(c + 8 * r);
            for (int u = 0; u < 8; u += 2) {
                const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(G + r * ld + j + 4 * u))), 16));
                a[u] = _mm256_fmadd_pd(cc, _mm256_cvtps_pd(_mm256_castps256_ps128(f)), a[u]);
                a[u + 1] = _mm256_fmadd_pd(cc, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)), a[u + 1]);
            }
        }
        for (int u = 0; u < 8; u++)
            _mm256_storeu_pd(acc + j + 4 * u, a[u]);
    }
}

TGT static void tile_only(const uint16_t *G, long ld, const double *c, double *acc, float *buf)
{
    (void)G;
    (void)ld;
    for (long js = 0; js < CH; js += SUB)
        TILES(4, buf)
}

TGT static void read_only(const uint16_t *G, long ld, const double *c, double *acc, float *buf)
{
    (void)c;
    (void)buf;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (long j = 0; j < CH; j += 32)
        for (int r = 0; r < R; r++) {
            s0 = _mm256_add_epi16(s0, _mm256_loadu_si256((const __m256i *)(G + r * ld + j)));
            s1 = _mm256_add_epi16(s1, _mm256_loadu_si256((const __m256i *)(G + r * ld + j + 16)));
        }
    _mm256_storeu_si256((__m256i *)acc, _mm256_add_epi16(s0, s1));
}

static const struct {
    const char *name;
    fn f;
    int check; /* 0: not checked; 1: sums equal stage u4's; 2: the same, with C times 2^896 */
    int f16;   /* reads G as float16 */
} variants[] = {
    {"stage u4 (before)", stage_u4, 1, 0},
    {"stage u8", stage_u8, 1, 0},
    {"pipelined u8 (now)", pipelined_u8, 1, 0},
    {"f16 stage u4 (F16C)", f16_stage_u4, 0, 1},
    {"bits u4", bits_u4, 2, 0},
    {"bits u8", bits_u8, 2, 0},
    {"bits+check u8", bits_check_u8, 2, 0},
    {"in-register u8", in_register_u8, 1, 0},
    {"tile only", tile_only, 0, 0},
    {"read only", read_only, 0, 0},
};
#define NV (int)(sizeof variants / sizeof variants[0])

/* One pass over m rows of n columns: chunks of CH columns, panels of R rows. */
static void pass(fn f, const uint16_t *G, long ld, long n, int m, const double *c, double *acc,
                 float *buf)
{
    for (long jc = 0; jc < n; jc += CH) {
        memset(acc, 0, sizeof(double) * CH);
        for (int p = 0; p < m; p += R)
            f(G + p * ld + jc, ld, c + 8 * p, acc, buf);
    }
}

static void run(long n, int m, int reps)
{
    const long ld = n + 64; /* + a margin: the pipelined variant stages past the chunk's end */
    uint16_t *G = aligned_alloc(64, sizeof(uint16_t) * (m * ld + 64));
    uint16_t *H = aligned_alloc(64, sizeof(uint16_t) * (m * ld + 64));
    double *c = aligned_alloc(64, sizeof(double) * 8 * m), *cs = aligned_alloc(64, sizeof(double) * 8 * m);
    double *acc = aligned_alloc(64, sizeof(double) * CH), *ref = aligned_alloc(64, sizeof(double) * CH);
    float *buf = aligned_alloc(64, sizeof(float) * 2 * R * SUB);
    srand(1);
    for (long i = 0; i < m * ld + 64; i++) {
        const float f = ((float)rand() / RAND_MAX - 0.5f) * ldexpf(1.0f, rand() % 40 - 20);
        uint32_t b;
        memcpy(&b, &f, 4);
        G[i] = (uint16_t)(b >> 16);
        H[i] = _cvtss_sh(f, 0);
    }
    for (int i = 0; i < 8 * m; i++) {
        c[i] = 1.0 / (i + 1);
        cs[i] = ldexp(c[i], 896);
    }
    /* Bit for bit: the last chunk's sums of each variant against stage u4's. */
    pass(stage_u4, G, ld, n, m, c, ref, buf);
    for (int v = 0; v < NV; v++) {
        if (!variants[v].check)
            continue;
        pass(variants[v].f, G, ld, n, m, variants[v].check == 2 ? cs : c, acc, buf);
        for (long j = 0; j < CH; j++)
            if (acc[j] != ref[j]) {
                printf("%s: sums differ at %ld\n", variants[v].name, j);
                exit(1);
            }
    }
    printf("m = %d rows of n = %ld columns (%.0f MiB of 2-byte items), G items a second:\n", m, n,
           2.0 * m * n / (1 << 20));
    double best[NV];
    for (int v = 0; v < NV; v++)
        best[v] = 1e30;
    for (int round = 0; round < 7; round++)
        for (int v = 0; v < NV; v++) {
            const double t = now();
            for (int k = 0; k < reps; k++)
                pass(variants[v].f, variants[v].f16 ? H : G, ld, n, m,
                     variants[v].check == 2 ? cs : c, acc, buf);
            const double dt = now() - t;
            if (dt < best[v])
                best[v] = dt;
        }
    for (int v = 0; v < NV; v++)
        printf("  %-22s %6.2f G\n", variants[v].name, (double)m * n * reps / best[v] / 1e9);
    free(G);
    free(H);
    free(c);
    free(cs);
    free(acc);
    free(ref);
    free(buf);
}

int main(void)
{
    run(1L << 20, 64, 3);
    run(8192, 8, 3000);
    return 0;
}
