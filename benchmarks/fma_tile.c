/*
 * The compute ceiling of the damping sweep's second pass (combine64 with K rows) on one AVX2 core.
 *
 *   gcc -O2 -mavx2 -mfma benchmarks/fma_tile.c -o /tmp/fma_tile && /tmp/fma_tile
 *
 * Prints (best of 5, thread CPU time, so that a shared machine's other processes count less):
 *
 * - the core's float64 FMA peak: 12 independent chains of vfmadd231pd, in G vector FMAs a second
 *   (the floor of combine64 with K rows is m d K / 4 of them with 4 lanes);
 * - combine64's register tile (4 dampings x 3 vectors of sums, 16 ymm registers: 12 sums, 3
 *   rows' vectors converted from float32 as they load, one broadcast coefficient) over R rows
 *   whose items are all in L1, its 12 sums loaded before the rows and stored after them, as the
 *   kernel's panels of R rows do; in percent of the peak above. This is what the tile can reach
 *   with memory out of the way: the kernel at d = 1e6 runs below it.
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define CHAINS 12
#define PEAK_ITERS 100000000L

static __attribute__((noinline)) double peak(void)
{
    __m256d a[CHAINS];
    for (int i = 0; i < CHAINS; i++)
        a[i] = _mm256_set1_pd(1e-3 * i);
    const __m256d b = _mm256_set1_pd(0.999999), c = _mm256_set1_pd(1e-9);
    for (long i = 0; i < PEAK_ITERS; i++)
#pragma GCC unroll 12
        for (int k = 0; k < CHAINS; k++)
            a[k] = _mm256_fmadd_pd(a[k], b, c);
    double s = 0;
    for (int i = 0; i < CHAINS; i++)
        s += a[i][0];
    return s;
}

/* Rows of COLS float32 items (all in L1), coefficients 8 a row, sums of 8 dampings x COLS. */
#define COLS 96
#define MAXROWS 64
#define SUMLD (COLS + 8)
static float rows_f32[MAXROWS * COLS] __attribute__((aligned(64)));
static double coef[MAXROWS * 8] __attribute__((aligned(64)));
static double sums[8 * SUMLD] __attribute__((aligned(64)));

#define LOAD3(p) _mm256_loadu_pd(p), _mm256_loadu_pd((p) + 4), _mm256_loadu_pd((p) + 8)
#define STORE3(p, x, y, z)                                                                  \
    (_mm256_storeu_pd(p, x), _mm256_storeu_pd((p) + 4, y), _mm256_storeu_pd((p) + 8, z))
#define FMA3(c, s0, s1, s2)                                                                 \
    do {                                                                                    \
        const __m256d bc = _mm256_broadcast_sd(c);                                          \
        s0 = _mm256_fmadd_pd(bc, v0, s0);                                                   \
        s1 = _mm256_fmadd_pd(bc, v1, s1);                                                   \
        s2 = _mm256_fmadd_pd(bc, v2, s2);                                                   \
    } while (0)

/* One pass over the columns: tiles of 3 vectors x 4 dampings, two groups of dampings. */
static __attribute__((noinline)) void tiles(int nrows, long reps)
{
    for (long rep = 0; rep < reps; rep++)
        for (int j = 0; j < COLS; j += 12)
            for (int k0 = 0; k0 < 8; k0 += 4) {
                double *s = sums + k0 * SUMLD + j;
                __m256d a0 = _mm256_loadu_pd(s), a1 = _mm256_loadu_pd(s + 4),
                        a2 = _mm256_loadu_pd(s + 8);
                __m256d a3 = _mm256_loadu_pd(s + SUMLD), a4 = _mm256_loadu_pd(s + SUMLD + 4),
                        a5 = _mm256_loadu_pd(s + SUMLD + 8);
                __m256d a6 = _mm256_loadu_pd(s + 2 * SUMLD),
                        a7 = _mm256_loadu_pd(s + 2 * SUMLD + 4),
                        a8 = _mm256_loadu_pd(s + 2 * SUMLD + 8);
                __m256d a9 = _mm256_loadu_pd(s + 3 * SUMLD),
                        a10 = _mm256_loadu_pd(s + 3 * SUMLD + 4),
                        a11 = _mm256_loadu_pd(s + 3 * SUMLD + 8);
                const float *g = rows_f32 + j;
                const double *c = coef + k0;
                for (int r = 0; r < nrows; r++, g += COLS, c += 8) {
                    const __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(g));
                    const __m256d v1 = _mm256_cvtps_pd(_mm_loadu_ps(g + 4));
                    const __m256d v2 = _mm256_cvtps_pd(_mm_loadu_ps(g + 8));
                    FMA3(c, a0, a1, a2);
                    FMA3(c + 1, a3, a4, a5);
                    FMA3(c + 2, a6, a7, a8);
                    FMA3(c + 3, a9, a10, a11);
                }
                STORE3(s, a0, a1, a2);
                STORE3(s + SUMLD, a3, a4, a5);
                STORE3(s + 2 * SUMLD, a6, a7, a8);
                STORE3(s + 3 * SUMLD, a9, a10, a11);
            }
}

int main(void)
{
    for (int i = 0; i < MAXROWS * COLS; i++)
        rows_f32[i] = 1e-3f * (float)(i % 7);
    for (int i = 0; i < MAXROWS * 8; i++)
        coef[i] = 0.5;
    double best = 1e9, check = 0;
    for (int t = 0; t < 5; t++) {
        const double s = now();
        check += peak();
        const double e = now() - s;
        best = e < best ? e : best;
    }
    const double peak_rate = (double)CHAINS * PEAK_ITERS / best;
    printf("float64 FMA peak: %.2f G vector FMAs/s (4 lanes)\n", peak_rate / 1e9);
    const int heights[] = {8, 16, 32, 64};
    for (int h = 0; h < 4; h++) {
        const int nrows = heights[h];
        const long reps = 200000000L / ((long)nrows * COLS);
        best = 1e9;
        for (int t = 0; t < 5; t++) {
            const double s = now();
            tiles(nrows, reps);
            const double e = now() - s;
            best = e < best ? e : best;
        }
        const double fmas = (double)reps * nrows * COLS * 8 / 4;
        printf("4 x 3 tile, %2d rows a panel (sums loaded and stored per panel): %.0f %% of "
               "the peak\n",
               nrows, 100.0 * fmas / best / peak_rate);
    }
    return check + sums[0] > 1e300; /* keep the results live */
}
