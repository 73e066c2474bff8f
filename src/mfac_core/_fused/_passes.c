/*
 * The exact passes of mfac_core's pass engine (mfac_core._fused, mfac_core._engine):
 *
 *   project64: Y[k, i] = sum_j V[i, j] X[k, j], in float64              (up to 8 vectors)
 *   combine64: Y[k, j] = a[k] X[k, j] + sum_i C[k, i] V[i, j], in float64, rounded once
 *   rows_gram64: A = V V^T in float64 (the set-up's Gram, with no float64 copy of V; see there)
 *   cast16:    float32 <-> float16 with F16C (a 2-byte window's row writes; see there)
 *   store_row: a window's row write and its gradient's largest magnitude, one loop (see there)
 *   block_factors, block_inverses: dense blocks' Grams, Cholesky factors and their inverses
 *              (_blocks_impl.h; see there)
 *
 * for the columns j0 <= j < j1 of a column block of the row-major m x ld array V (the stored
 * gradients G). They read V in its storage type (float32, float64, IEEE float16 or bfloat16),
 * convert each item to float64 as it is loaded (exact for all four) and do every product and
 * sum in float64. V is read once per call, in place: the columns go in chunks, each chunk in
 * panels of rows (few concurrent memory streams, each a long run of one row), with the sums
 * of a tile of results in registers while a panel's rows go by; partial sums wait in a
 * float64 buffer that a chunk keeps in the core's cache. Up to 8 vectors (project64) or rows
 * of C (combine64) share one read of V.
 *
 * Reading float32 and summing in float64 costs a conversion per item, which a core does about
 * as fast as memory delivers the items: one vector's pass over float32 rows took 1.05x a
 * float32 GEMV's time (AVX2, one core of a Zen 3). Over 2-byte rows the conversions, not
 * memory, set the pace there: 0.75-0.85x the float32 GEMV, where memory alone would allow
 * 0.5x. Several vectors or dampings cost one float64 FMA per item of V each.
 *
 * One copy of the kernels per instruction set (_passes_impl.h), chosen at run time: AVX-512F,
 * AVX2 with FMA, and the baseline of the compiler's target. The caller splits the columns over
 * threads; every call releases the GIL. Arguments are checked here too (buffer sizes), so that
 * a wrong call is an exception, never an out-of-bounds access.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h> /* F16C's conversions (the x86 copies' target attributes enable them), MXCSR */
#endif

#ifndef PANEL_ROWS
#define PANEL_ROWS 8
#endif
/* The staging buffer of project64/combine64 holds 8 rows, and the dampings go 8 at a time. */
_Static_assert(PANEL_ROWS >= 1 && PANEL_ROWS <= 8, "PANEL_ROWS must be between 1 and 8");
/* Columns in one chunk of combine64 (a float64 buffer of 8 x 4096 partial sums). */
#define COMBINE_CHUNK 4096
/* Columns of a row in the float32 buffer through which project64 and combine64 read 2-byte
   rows: a multiple of every tile of their loops. Short, so that the conversion into the buffer
   and the loops over it overlap the rows' reads from memory: a pass over 2-byte rows took
   0.8x a float32 GEMV's time with 64 columns (and 32, and 128), 0.9-1.05x with 256 and
   1.4-1.6x with 512 (AVX2, one core of a Zen 3). */
#ifndef SUB64
#define SUB64 64
#endif
/* How many columns ahead of the piece it converts a staging of 2-byte rows fetches each row's
   items into L1 (prefetcht0), in project64 and in combine64 with one row of C. A panel's 8
   rows are 8 streams, each 8 KiB long in a chunk, and without the fetches the rows' reads
   and the conversions took turns rather than overlapping: one vector, m = 64, d = 1e6, one
   core of a Zen 4, bfloat16 rows 7.1 -> 6.2 ms (project64, AVX2) and 7.8 -> 7.1 ms
   (combine64), float16 7.7 -> 6.2 and 7.7 -> 6.8 ms; two vectors (the window's step)
   9.0 -> 8.6 ms. 128 and
   384-1024 columns ran 2-10 % slower than 256, fetches into L2 (prefetcht1) 10-15 %
   (benchmarks/results/stage_fetch-cpu-zen4-2026-12-07.txt). The passes now read 2-byte rows
   from memory as fast as from L3 (9-9.5 G items a second): the conversions and FMAs set the
   pace, and the rows' reads alone, fetched this way without the staging, reach 11 G. */
#ifndef AHEAD16
#define AHEAD16 256
#endif
/* Doubles from one damping's row to the next in combine64's buffer of partial sums: a chunk
   and one cache line, so that its 8 rows do not fall, 32 KiB apart, in one set of the L1
   cache (where the rows of V, often a multiple of 4 KiB apart, fall too). */
#define ACC_LD64 (COMBINE_CHUNK + 8)
/* combine64 with several rows of C (_passes_impl.h): panels of C64_ROWS rows, C64_SUB columns
   at a time (a multiple of every tile of 3 vectors and of the staging's vectors), in chunks of
   C64_SUBS x C64_SUB columns whose partial sums wait in a buffer of kk rows of C64_LD doubles
   (a cache line apart, as ACC_LD64). 16 rows and 96 columns ran eight dampings faster than
   8, 24 or 32 rows and 48 columns (one core of a Zen 3, d = 1e6): 16 rows in flight (fetched
   ahead) and the tiles' reloads of their sums, 2 per 16 FMAs. Chunks of 2 to 42 stagings ran
   alike. */
#ifndef C64_ROWS
#define C64_ROWS 16
#endif
#ifndef C64_SUB
#define C64_SUB 96
#endif
#ifndef C64_SUBS
#define C64_SUBS 42
#endif
#define C64_CHUNK (C64_SUBS * C64_SUB)

/* A Fortran-ordered V (the *t kernels of _passes_impl.h read the rows of its transpose): the
   columns of one transposed tile of project64t (a multiple of every vector loop's step), and
   of combine64t and widen64t, whose tiles' rows are a cache line longer (TLD64, for items of
   `size` bytes) so that a panel's rows do not share the L1 cache's sets; tiles of 64 rows of
   float32 stay in L1. T_AHEAD: how far ahead of a tile's piece its transpose fetches V's rows
   into L2 (T_LOC 2, prefetcht1). Read in 8 x 8 blocks, the rows of V^T are 8 strided streams
   that the hardware's prefetchers did not fetch ahead: the transpose of d = 1e6, m = 64
   float32 items took 3x a sequential read of them without the fetches, 1.0-1.5x with them
   (into L1 the fetches gained nothing; one core of a Zen 4, a busy machine). */
#define SUBT 64
#define TW64 64
#ifndef T_AHEAD
#define T_AHEAD 16384
#endif
#ifndef T_LOC
#define T_LOC 2
#endif
#define TLD64(size) (TW64 + 64 / (Py_ssize_t)(size))
/* Narrow dense blocks (block_factors, _blocks_impl.h's narrow_grams): a group's columns (at most
   NARROW_GW, TW64 for widen64t's tiles; a multiple of every instruction set's vectors of
   columns there; 128 or 256 were no faster), widened NARROW_ROWS rows at a time (80 doubles a
   row, 320 KiB: in L2), blocks of at most NARROW_MAX columns (each instruction set's limit is
   in its Kernels, narrow_max). */
#define NARROW_GW TW64
#define NARROW_ROWS 512
#define NARROW_MAX 15
#define C64_LD (C64_CHUNK + 8)

/* The sums' start in combine64's first panel: 3 vectors of zeros, read with no stride. */
static const double c64_zeros[3 * 8] __attribute__((aligned(64)));

/* Whether a panel's rows, `stride` bytes apart, spread over the sets of a 32 KiB, 8-way L1
   cache (64 sets of 64-byte lines) well enough to be read in place by combine64's tiles: at
   most 4 of their lines (2 a row, as a tile's piece may cross a line) in one set. Rows a
   multiple of 1 KiB apart crowd a few sets, and the second group of dampings found the rows'
   lines evicted (d = 2^20 float32 columns: 1.45x slower than through the staging). */
static int c64_rows_spread(Py_ssize_t stride)
{
    int count[64] = {0}, most = 0;
    for (Py_ssize_t r = 0; r < C64_ROWS; r++) {
        const size_t line = ((size_t)r * (size_t)stride) / 64;
        for (size_t l = line; l < line + 2; l++)
            if (++count[l % 64] > most)
                most = count[l % 64];
    }
    return most <= 4;
}

/* Fetch into L1 the `bytes` bytes `ahead` bytes past p. Prefetches never fault: past the end
   of an array they fetch what lies there, to no use and at no other cost (the address is
   formed as an integer, as it may lie past the array). */
static inline __attribute__((always_inline)) void fetch_l1(const void *p, Py_ssize_t ahead,
                                                           Py_ssize_t bytes)
{
    const uintptr_t q = (uintptr_t)p + (uintptr_t)ahead;
    for (Py_ssize_t b = 0; b < bytes; b += 64)
        __builtin_prefetch((const void *)(q + (uintptr_t)b), 0, 3);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MFAC_X86 1
#include <cpuid.h> /* the vendor and family (avx512_halves) */
#endif

/* An IEEE half's value as a double, exactly (the copies without F16C, and the columns past the
   last whole vector). Its bits below the sign, shifted to a float32's place, are a float32 of
   the same digits with an exponent 112 too small (normal and subnormal halves alike): times
   2^112, in float64, the half's value. Infinities and NaNs (exponent 31) keep theirs. */
static inline double half_to_double(uint16_t h)
{
    const uint32_t em = h & 0x7fffu;
    const uint32_t bits = em >= 0x7c00u ? 0x7f800000u | (em & 0x3ffu) << 13 : em << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    const double d = em >= 0x7c00u ? (double)f : (double)f * 0x1p112;
    return h & 0x8000u ? -d : d;
}

/* A bfloat16's value as a double: its 16 bits are the top half of a float32's. */
static inline double bf16_to_double(uint16_t b)
{
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

/* Long sums in levels (project64's and rows_gram64's sums over the columns). Products of one
   sign and about one size (a squared norm; gradients with a shared mean, and a vector near
   their span) round the same way at every step of one running sum: its error grows with the
   count of terms, not with its square root. So the kernels sum runs of a few hundred terms
   from zero, add the runs' sums into level 0 of `lv` (LEVELS x n doubles, zero to begin with),
   and levels_carry adds each level into the next after LEVEL_SPAN additions, the last into
   Y: an entry's rounding grows with the runs' length and LEVEL_SPAN a level, as a blocked
   BLAS's does, up to 64 x 64 additions to level 0 before Y takes a sum (project64's chunks:
   2**24 columns, more than a thread's piece has; rows_gram64's: 2**20, past which Y's own
   running sum is short). At the end (flush) every level goes up, in order. The order
   depends on the count of additions alone, never on timing. */
#define LEVELS 2
#define LEVEL_SPAN 64
/* The run of project1t (_passes_impl.h), the shortest of the passes' runs: a range no longer
   than it is one run of every pass, and takes no levels (no buffer for them either). */
#define RUN1T 128
/* Where a pass's partial sums go: level 0 of lv (zeroed here), or Y itself where the range is
   one piece (`one`: a narrow block, one call each), the same bits (one sum added to zeros)
   without the levels' zeroing and carries, which cost blocks of 32 to 128 columns 3-14 %. The
   caller passes what this returned to levels_carry, which does nothing for Y. */
static double *levels_start(double *lv, Py_ssize_t n, double *Y, int one)
{
    if (one)
        return Y;
    memset(lv, 0, (size_t)(LEVELS * n) * sizeof(double));
    return lv;
}
static void levels_carry(double *lv, int *count, Py_ssize_t n, double *Y, int flush)
{
    if (lv == Y) /* a range of one piece (levels_start): its sums are in Y already */
        return;
    if (!flush)
        count[0]++;
    for (int l = 0; l < LEVELS; l++) {
        if (!flush && count[l] < LEVEL_SPAN)
            return;
        double *src = lv + l * n, *dst = l + 1 < LEVELS ? src + n : Y;
        for (Py_ssize_t i = 0; i < n; i++) {
            dst[i] += src[i];
            src[i] = 0.0;
        }
        count[l] = 0;
        if (l + 1 < LEVELS)
            count[l + 1]++;
    }
}

/* The x86 copies convert halves with F16C (vcvtph2ps), which every CPU with AVX2 or AVX-512F
   has; best_isa checks it too. */
#ifdef MFAC_X86
#define ISA avx512
#define ISA_TARGET "avx512f,f16c"
#define ISA_F16C 1
#define VBYTES 64
#include "_passes_impl.h"
#include "_blocks_impl.h"
#undef ISA
#undef ISA_TARGET
#undef ISA_F16C
#undef VBYTES

#define ISA avx2
#define ISA_TARGET "avx2,fma,f16c"
#define ISA_F16C 1
#define VBYTES 32
#include "_passes_impl.h"
#include "_blocks_impl.h"
#undef ISA
#undef ISA_TARGET
#undef ISA_F16C
#undef VBYTES
#endif

#define ISA base
#define VBYTES 16
#include "_passes_impl.h"
#include "_blocks_impl.h"
#undef ISA
#undef VBYTES

enum { ISA_AUTO = 0, ISA_BASE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

static int best_isa(void)
{
#ifdef MFAC_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c"))
        return ISA_BASE;
    if (__builtin_cpu_supports("avx512f"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return ISA_AVX2;
#endif
    return ISA_BASE;
}

/* Whether this CPU runs AVX-512 on 256-bit units, each 512-bit instruction as two halves: AMD's
   family 19h (Zen 4; Zen 3, the same family, has no AVX-512). There the 512-bit registers buy
   no FMAs, and the AVX2 kernels are the faster where FMAs, not memory, set the pace
   (mfac_core._fused chooses per call). */
static int avx512_halves(void)
{
#ifdef MFAC_X86
    unsigned a, b, c, d;
    if (best_isa() != ISA_AVX512 || !__get_cpuid(0, &a, &b, &c, &d))
        return 0;
    if (b != 0x68747541u || d != 0x69746e65u || c != 0x444d4163u) /* "Auth" "enti" "cAMD" */
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    unsigned family = (a >> 8) & 0xfu;
    if (family == 0xfu)
        family += (a >> 20) & 0xffu;
    return family == 0x19u;
#else
    return 0;
#endif
}

/* combine64's overflow flag, on this thread: cleared before a kernel (its state returned), then
   tested and put back as it was. On x86-64 every floating-point operation of the kernels is SSE
   or AVX, whose flags are MXCSR's (bit 3: overflow), read and written directly in a few cycles;
   glibc's fenv.h functions also store and load the x87 environment, which cost 0.15-0.35 us a
   call (a third of a kernel call over 2 x 64 items; one Zen 4 core). Elsewhere fenv.h's. The
   compiler moves neither an MXCSR access nor a libm call across the kernel's call. */
#if defined(__x86_64__)
#define MXCSR_OVERFLOW 0x8u
typedef unsigned int overflow_state;
static inline overflow_state overflow_clear(void)
{
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr & ~MXCSR_OVERFLOW);
    return csr;
}
static inline int overflow_test_restore(overflow_state saved)
{
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr((csr & ~MXCSR_OVERFLOW) | (saved & MXCSR_OVERFLOW));
    return (csr & MXCSR_OVERFLOW) != 0;
}
#else
#include <fenv.h>
typedef fexcept_t overflow_state;
static inline overflow_state overflow_clear(void)
{
    fexcept_t saved;
    fegetexceptflag(&saved, FE_OVERFLOW);
    feclearexcept(FE_OVERFLOW);
    return saved;
}
static inline int overflow_test_restore(overflow_state saved)
{
    const int overflow = fetestexcept(FE_OVERFLOW) != 0;
    fesetexceptflag(&saved, FE_OVERFLOW);
    return overflow;
}
#endif

/* The storage types of project64 and combine64 (their V), and their item sizes. */
enum { ST_F32 = 0, ST_F64 = 1, ST_F16 = 2, ST_BF16 = 3, ST_COUNT = 4 };
static const Py_ssize_t storage_size[ST_COUNT] = {4, 8, 2, 2};

typedef void (*project64_fn)(const void *, Py_ssize_t, Py_ssize_t, const void *, Py_ssize_t, int,
                             double *, Py_ssize_t, Py_ssize_t, float *, double *);
typedef void (*widen64_fn)(const void *, Py_ssize_t, Py_ssize_t, double *, Py_ssize_t,
                           Py_ssize_t, Py_ssize_t);
typedef void (*combine64_fn)(const void *, Py_ssize_t, Py_ssize_t, const double *, int,
                             const double *, const void *, Py_ssize_t, int, void *, Py_ssize_t,
                             int, Py_ssize_t, Py_ssize_t, double *, float *);
/* The kernels over a transposed V: their scratch (tiles, a row's sums) at the end. */
typedef void (*project64t_fn)(const void *, Py_ssize_t, Py_ssize_t, const void *, Py_ssize_t,
                              int, double *, Py_ssize_t, Py_ssize_t, void *, void *, double *);
typedef void (*widen64t_fn)(const void *, Py_ssize_t, Py_ssize_t, double *, Py_ssize_t,
                            Py_ssize_t, Py_ssize_t, void *);
typedef void (*combine64t_fn)(const void *, Py_ssize_t, Py_ssize_t, const double *, int,
                              const double *, const void *, Py_ssize_t, int, void *, Py_ssize_t,
                              int, Py_ssize_t, Py_ssize_t, double *, float *, void *);

/* One instruction set's kernels. */
/* The dense blocks' kernels of one instruction set (_blocks_impl.h). */
typedef void (*rows_gram64_fn)(const void *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               Py_ssize_t, Py_ssize_t, int, double *, double *, double *);
typedef int (*block_factor_fn)(const double *, Py_ssize_t, Py_ssize_t, Py_ssize_t, double, double,
                               double *, double *, double *);
typedef void (*block_inverse_fn)(double *, Py_ssize_t, double *);
typedef void (*narrow_grams_fn)(const double *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                double *, int);
typedef Py_ssize_t (*narrow_factors_fn)(const double *, Py_ssize_t, Py_ssize_t, double, double,
                                        double *, double *, double *);

typedef struct {
    /* By storage type (ST_*), then X's type (float32, float64). */
    project64_fn project64[ST_COUNT][2];
    combine64_fn combine64[ST_COUNT];
    widen64_fn widen64[ST_COUNT];
    /* The same over a Fortran-ordered V (the rows of its transpose). */
    project64t_fn project64t[ST_COUNT][2];
    combine64t_fn combine64t[ST_COUNT];
    widen64t_fn widen64t[ST_COUNT];
    /* The rows' float64 Gram over a column range (the set-up's; _passes_impl.h). */
    rows_gram64_fn rows_gram64[ST_COUNT];
    /* The dense blocks' Gram and factor, and the factor's inverse (_blocks_impl.h). */
    block_factor_fn block_factor;
    block_inverse_fn block_inverse;
    /* Narrow blocks' Grams, a group at a time, and their factors (_blocks_impl.h), for blocks
       of at most narrow_max columns (wider ones through block_factor). Per block on one Zen 4
       core (float32 G of 1024 and 8192 rows; benchmarks/RESULTS.md), the groups took
       0.06-0.93x the time of block_factor's tiles up to 15 columns with AVX-512 or AVX2 and
       1.13-1.40x at 16 (two tiles of 8 x 16, or six of 4 x 8, that waste nothing); without
       either, 0.12-0.62x up to 7, 0.81-1.11x at 8 (a whole tile of 4 x 4) and 0.66-1.11x at
       9-14. */
    narrow_grams_fn narrow_grams;
    narrow_factors_fn narrow_factors;
    Py_ssize_t narrow_max;
} Kernels;

#define KERNELS(I, NMAX)                                                                    \
    {{{project64_f32_x32_##I, project64_f32_x64_##I},                                       \
      {project64_f64_x32_##I, project64_f64_x64_##I},                                       \
      {project64_f16_x32_##I, project64_f16_x64_##I},                                       \
      {project64_bf16_x32_##I, project64_bf16_x64_##I}},                                    \
     {combine64_f32_##I, combine64_f64_##I, combine64_f16_##I, combine64_bf16_##I},         \
     {widen64_f32_##I, widen64_f64_##I, widen64_f16_##I, widen64_bf16_##I},                 \
     {{project64t_f32_x32_##I, project64t_f32_x64_##I},                                     \
      {project64t_f64_x32_##I, project64t_f64_x64_##I},                                     \
      {project64t_f16_x32_##I, project64t_f16_x64_##I},                                     \
      {project64t_bf16_x32_##I, project64t_bf16_x64_##I}},                                  \
     {combine64t_f32_##I, combine64t_f64_##I, combine64t_f16_##I, combine64t_bf16_##I},     \
     {widen64t_f32_##I, widen64t_f64_##I, widen64t_f16_##I, widen64t_bf16_##I},             \
     {rows_gram64_f32_##I, rows_gram64_f64_##I, rows_gram64_f16_##I, rows_gram64_bf16_##I}, \
     block_factor_##I,                                                                      \
     block_lower_inverse_##I,                                                               \
     narrow_grams_##I,                                                                      \
     narrow_factors_##I,                                                                    \
     NMAX}
static const Kernels kernels_base = KERNELS(base, 7);
#ifdef MFAC_X86
static const Kernels kernels_avx2 = KERNELS(avx2, NARROW_MAX);
static const Kernels kernels_avx512 = KERNELS(avx512, NARROW_MAX);
#endif

/* The kernels of the instruction set `isa` (ISA_AUTO: the best), or NULL with an exception. */
static const Kernels *pick_kernels(int isa)
{
    const int best = best_isa();
    if (isa == ISA_AUTO)
        isa = best;
    if (isa < ISA_BASE || isa > ISA_AVX512) {
        PyErr_Format(PyExc_ValueError,
                     "isa must be 0 (best), 1 (base), 2 (avx2) or 3 (avx512), got %d", isa);
        return NULL;
    }
    if (isa > best) {
        PyErr_Format(PyExc_ValueError, "isa %d is not supported by this CPU (best: %d)", isa, best);
        return NULL;
    }
#ifdef MFAC_X86
    if (isa == ISA_AVX512)
        return &kernels_avx512;
    if (isa == ISA_AVX2)
        return &kernels_avx2;
#endif
    return &kernels_base;
}

/* kk, the dampings of one call: 1 to 8. */
static int check_kk(Py_ssize_t kk)
{
    if (kk < 1 || kk > 8) {
        PyErr_Format(PyExc_ValueError, "kk must be 1 to 8, got %zd", kk);
        return -1;
    }
    return 0;
}

static PyObject *py_best_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(best_isa());
}

/* Whether project64, combine64 and rows_gram64 take a Fortran-ordered V (their `trans`): an
   extension built before they did has no such function. */
static PyObject *py_transposed(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    Py_RETURN_TRUE;
}

static PyObject *py_avx512_halves(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(avx512_halves());
}

/* The largest m: row indices times 8 (the coefficient layout) stay far from overflow. */
#define MAX_ROWS (1L << 28)

/* Checks that buffer b holds at least count1 * count2 items of `itemsize` bytes, with the
   product checked for overflow (a negative or wrapped count must not pass). */
static int check_len(const Py_buffer *b, Py_ssize_t count1, Py_ssize_t count2,
                     Py_ssize_t itemsize, const char *name)
{
    Py_ssize_t items, bytes;
    if (count1 < 0 || count2 < 0 || __builtin_mul_overflow(count1, count2, &items) ||
        __builtin_mul_overflow(items, itemsize, &bytes)) {
        PyErr_Format(PyExc_ValueError, "%s: size %zd x %zd out of range", name, count1, count2);
        return -1;
    }
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, %zd needed", name, b->len, bytes);
        return -1;
    }
    if ((uintptr_t)b->buf % (uintptr_t)itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s is not aligned to its %zd-byte items", name, itemsize);
        return -1;
    }
    return 0;
}

/* The shape arguments common to the passes: V is m rows of ld items, the block's columns
   start at col0 and are n wide; this call computes block columns j0 <= j < j1. */
static int check_shape(const Py_buffer *V, Py_ssize_t itemsize, Py_ssize_t m, Py_ssize_t ld,
                       Py_ssize_t col0, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1)
{
    Py_ssize_t rows_before, items;
    if (m < 1 || m > MAX_ROWS || ld < 1 || col0 < 0 || n < 0 || col0 > ld - n || j0 < 0 ||
        j0 > j1 || j1 > n || __builtin_mul_overflow(m - 1, ld, &rows_before) ||
        __builtin_add_overflow(rows_before, col0 + n, &items)) {
        PyErr_Format(PyExc_ValueError, "bad shape: m=%zd ld=%zd col0=%zd n=%zd j0=%zd j1=%zd", m,
                     ld, col0, n, j0, j1);
        return -1;
    }
    return check_len(V, items, 1, itemsize, "V");
}

/* check_shape for a Fortran-ordered V, passed as its transpose: ld rows of m items (row j is V's
   column j), of which the block's rows col0 <= j < col0 + n are read. */
static int check_shape_t(const Py_buffer *V, Py_ssize_t itemsize, Py_ssize_t m, Py_ssize_t ld,
                         Py_ssize_t col0, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1)
{
    Py_ssize_t items;
    if (m < 1 || m > MAX_ROWS || ld < 1 || col0 < 0 || n < 0 || col0 > ld - n || j0 < 0 ||
        j0 > j1 || j1 > n || __builtin_mul_overflow(col0 + n, m, &items)) {
        PyErr_Format(PyExc_ValueError, "bad shape: m=%zd ld=%zd col0=%zd n=%zd j0=%zd j1=%zd", m,
                     ld, col0, n, j0, j1);
        return -1;
    }
    return check_len(V, items, 1, itemsize, "V");
}

/* `count` x `each` bytes on a 64-byte boundary (the transposed kernels' tiles), or NULL with an
   exception (an overflowing size too); free *raw. */
static void *scratch(Py_ssize_t count, Py_ssize_t each, void **raw)
{
    Py_ssize_t bytes;
    *raw = NULL;
    if (__builtin_mul_overflow(count, each, &bytes) || bytes > PY_SSIZE_T_MAX - 64) {
        PyErr_NoMemory();
        return NULL;
    }
    *raw = malloc((size_t)bytes + 64);
    if (*raw == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    return (void *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
}

/* The staging buffer of project64 and combine64 (2 x 8 x SUB64 floats: combine64_one stages
   2-byte rows into one half while its tiles read the other; or C64_ROWS x C64_SUB doubles), on
   a 64-byte boundary, so that its rows' vectors do not straddle cache lines, or NULL with an
   exception; free *raw. */
#define STAGE_BYTES                                                                         \
    (sizeof(float) * 2 * 8 * SUB64 > sizeof(double) * C64_ROWS * C64_SUB                    \
         ? sizeof(float) * 2 * 8 * SUB64                                                    \
         : sizeof(double) * C64_ROWS * C64_SUB)
static float *stage_buffer(void **raw)
{
    *raw = malloc(STAGE_BYTES + 64);
    if (*raw == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    return (float *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
}

/* The storage type code of project64 and combine64, or -1 with an exception. */
static int check_storage(int storage)
{
    if (storage < 0 || storage >= ST_COUNT) {
        PyErr_Format(PyExc_ValueError,
                     "storage must be 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16), "
                     "got %d",
                     storage);
        return -1;
    }
    return storage;
}

/* project64(V, ld, col0, m, X, kk, x64, Y, n, j0, j1, isa, storage[, trans]): V's items are of the
   storage type `storage` (ST_*); X is kk x n, float64 if x64 else float32; Y is kk x m float64
   (this range's sums, overwritten). With `trans`, V is the transpose of a Fortran-ordered m x ld
   array (ld rows of m items), read by the *t kernels: the same bits for kk > 1, float64 sums in
   another order for kk = 1 (_passes_impl.h). */
static PyObject *py_project64(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer V, X, Y;
    Py_ssize_t ld, col0, m, kk, n, j0, j1;
    int isa, x64, storage, trans = 0;
    if (!PyArg_ParseTuple(args, "y*nnny*npw*nnnii|p", &V, &ld, &col0, &m, &X, &kk, &x64, &Y, &n,
                          &j0, &j1, &isa, &storage, &trans))
        return NULL;
    PyObject *result = NULL;
    void *raw = NULL, *raw_sums = NULL, *raw_lv = NULL;
    const Kernels *kern = pick_kernels(isa);
    if (kern == NULL || check_storage(storage) < 0 || check_kk(kk) < 0)
        goto done;
    const Py_ssize_t size = storage_size[storage];
    if ((trans ? check_shape_t : check_shape)(&V, size, m, ld, col0, n, j0, j1) < 0 ||
        check_len(&X, kk, n, x64 ? 8 : 4, "X") < 0 || check_len(&Y, kk, m, 8, "Y") < 0)
        goto done;
    /* The levels of the sums (levels_carry): LEVELS x kk x m doubles, where the range has
       more than one run (a narrow block's call, one of many, allocates none). */
    double *lv = NULL;
    if (j1 - j0 > RUN1T && (lv = scratch(LEVELS * kk, m * (Py_ssize_t)sizeof(double), &raw_lv)) == NULL)
        goto done;
    if (trans) {
        /* A tile of m x SUBT items (float64 at most), and m x 8 vectors of sums (64 bytes)
           for a run and as many for its chunk. */
        void *tile = scratch(m, SUBT * (Py_ssize_t)sizeof(double), &raw);
        void *sums = tile == NULL ? NULL : scratch(m, 2 * 8 * 64, &raw_sums);
        if (sums == NULL)
            goto done;
        const project64t_fn fn = kern->project64t[storage][x64];
        Py_BEGIN_ALLOW_THREADS
        fn((const char *)V.buf + col0 * m * size, m, m, X.buf, n, (int)kk, Y.buf, j0, j1, tile,
           sums, lv);
        Py_END_ALLOW_THREADS
    } else {
        float *sbuf = stage_buffer(&raw);
        if (sbuf == NULL)
            goto done;
        const project64_fn fn = kern->project64[storage][x64];
        Py_BEGIN_ALLOW_THREADS
        fn((const char *)V.buf + col0 * size, ld, m, X.buf, n, (int)kk, Y.buf, j0, j1, sbuf, lv);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    free(raw);
    free(raw_sums);
    free(raw_lv);
    PyBuffer_Release(&V);
    PyBuffer_Release(&X);
    PyBuffer_Release(&Y);
    return result;
}

/* combine64(V, ld, col0, m, Ct, kk, a, X, shared, x64, Y, out64, n, j0, j1, isa, storage[, trans]):
   with `trans`, V is transposed as for project64. V's
   items are of the storage type `storage`; Ct is m x 8 and a has 8 items, float64 (zero-padded
   past kk); X is kk x n (one row of n if `shared`), float64 if x64 else float32; Y is kk x n,
   float64 if out64 else float32.
   Returns whether the kernel raised the overflow flag: a float32 result whose float64 value is
   beyond float32's range (the conversion that stores it as infinity raises the flag, as IEEE
   754 asks), or a float64 sum beyond float64's. The flag costs nothing in the loops: it is
   cleared before the kernel and tested after it, on this thread, whose flags are its own (the
   caller's threads each make their own calls); the thread's overflow flag is then put back as
   it was (overflow_clear). The kernel is called through a pointer, so the compiler cannot move
   its stores past the test (GCC's default -ftrapping-math keeps the conversions too). */
static PyObject *py_combine64(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer V, Ct, a, X, Y;
    Py_ssize_t ld, col0, m, kk, n, j0, j1;
    int shared, x64, out64, isa, storage, trans = 0;
    if (!PyArg_ParseTuple(args, "y*nnny*ny*y*ppw*pnnnii|p", &V, &ld, &col0, &m, &Ct, &kk, &a, &X,
                          &shared, &x64, &Y, &out64, &n, &j0, &j1, &isa, &storage, &trans))
        return NULL;
    PyObject *result = NULL;
    double *buf = NULL;
    void *raw = NULL, *raw_tile = NULL;
    const Kernels *kern = pick_kernels(isa);
    if (kern == NULL || check_storage(storage) < 0 || check_kk(kk) < 0)
        goto done;
    const Py_ssize_t size = storage_size[storage];
    if ((trans ? check_shape_t : check_shape)(&V, size, m, ld, col0, n, j0, j1) < 0 ||
        check_len(&Ct, 8, m, 8, "Ct") < 0 ||
        check_len(&a, 8, 1, 8, "a") < 0 ||
        check_len(&X, shared ? 1 : kk, n, x64 ? 8 : 4, "X") < 0 ||
        check_len(&Y, kk, n, out64 ? 8 : 4, "Y") < 0)
        goto done;
    buf = malloc(sizeof(double) * (kk == 1 ? ACC_LD64 : kk * C64_LD));
    if (buf == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *sbuf = stage_buffer(&raw);
    if (sbuf == NULL)
        goto done;
    void *tile = NULL;
    if (trans && (tile = scratch(m, TLD64(sizeof(double)) * (Py_ssize_t)sizeof(double),
                                 &raw_tile)) == NULL)
        goto done;
    int overflow;
    Py_BEGIN_ALLOW_THREADS
    const overflow_state saved = overflow_clear();
    if (trans)
        kern->combine64t[storage]((const char *)V.buf + col0 * m * size, m, m, Ct.buf, (int)kk,
                                  a.buf, X.buf, shared ? 0 : n, x64, Y.buf, n, out64, j0, j1,
                                  buf, sbuf, tile);
    else
        kern->combine64[storage]((const char *)V.buf + col0 * size, ld, m, Ct.buf, (int)kk,
                                 a.buf, X.buf, shared ? 0 : n, x64, Y.buf, n, out64, j0, j1, buf,
                                 sbuf);
    overflow = overflow_test_restore(saved);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(overflow);
done:
    free(buf);
    free(raw);
    free(raw_tile);
    PyBuffer_Release(&V);
    PyBuffer_Release(&Ct);
    PyBuffer_Release(&a);
    PyBuffer_Release(&X);
    PyBuffer_Release(&Y);
    return result;
}

/* The rows' Gram tiles (gram_tiles, _blocks_impl.h): their rows of W hold mp doubles, m rounded
   up to every instruction set's tiles (rows: 4, 6 or 8; columns: 4, 8 or 16), and chunks of
   columns whose widened transpose (kc rows of mp doubles) is at most ROWS_GRAM_BYTES, 8 to
   ROWS_GRAM_KC columns. */
#ifndef ROWS_GRAM_BYTES
#define ROWS_GRAM_BYTES (128 * 1024)
#endif
#define ROWS_GRAM_KC 256

/* rows_gram64(V, ld, col0, m, A, j0, j1, isa, storage[, trans]) (trans: V transposed, as for
   project64): A (m x m float64, C-ordered) = the Gram V_b V_b^T of the columns j0 <= j < j1 of
   the m x (ld - col0) block of V (m rows of ld items of the storage type, the block's columns
   from col0), every product and sum in float64 (the products of float32 and 2-byte items are
   exact): one thread's share of the set-up's Gram, which the callers sum. Each entry sums its
   products over a chunk's columns in order, then the chunks' sums in levels (levels_carry):
   not BLAS's order, so the last bits of A are not dsyrk's. */
static PyObject *py_rows_gram64(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer V, A;
    Py_ssize_t ld, col0, m, j0, j1;
    int isa, storage, trans = 0;
    if (!PyArg_ParseTuple(args, "y*nnnw*nnii|p", &V, &ld, &col0, &m, &A, &j0, &j1, &isa,
                          &storage, &trans))
        return NULL;
    PyObject *result = NULL;
    void *raw = NULL, *raw_acc = NULL, *raw_span = NULL;
    const Kernels *kern = pick_kernels(isa);
    if (kern == NULL || check_storage(storage) < 0)
        goto done;
    const Py_ssize_t size = storage_size[storage];
    if ((trans ? check_shape_t : check_shape)(&V, size, m, ld, col0, ld - col0, j0, j1) < 0 ||
        check_len(&A, m, m, 8, "A") < 0)
        goto done;
    const Py_ssize_t m6 = (m + 5) / 6 * 6, by8 = (m6 + 7) / 8 * 8, by16 = (m + 15) / 16 * 16;
    const Py_ssize_t mp = by8 > by16 ? by8 : by16;
    Py_ssize_t kc = ROWS_GRAM_BYTES / (mp * (Py_ssize_t)sizeof(double)) / 8 * 8;
    kc = kc < 8 ? 8 : kc > ROWS_GRAM_KC ? ROWS_GRAM_KC : kc;
    double *W = scratch(kc, mp * (Py_ssize_t)sizeof(double), &raw);
    double *acc = W == NULL ? NULL : scratch(mp, mp * (Py_ssize_t)sizeof(double), &raw_acc);
    double *span =
        acc == NULL ? NULL : scratch(LEVELS * mp, mp * (Py_ssize_t)sizeof(double), &raw_span);
    if (span == NULL)
        goto done;
    const rows_gram64_fn fn = kern->rows_gram64[storage];
    const char *base = (const char *)V.buf + col0 * (trans ? m : 1) * size;
    double *out = A.buf;
    Py_BEGIN_ALLOW_THREADS
    memset(W, 0, (size_t)(kc * mp) * sizeof(double));
    memset(acc, 0, (size_t)(mp * mp) * sizeof(double));
    memset(span, 0, (size_t)(LEVELS * mp * mp) * sizeof(double));
    fn(base, trans ? m : ld, m, j0, j1, kc, mp, trans, W, span, acc);
    for (Py_ssize_t i = 0; i < m; i++)
        for (Py_ssize_t j = i; j < m; j++)
            out[i * m + j] = out[j * m + i] = acc[i * mp + j];
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(raw);
    free(raw_acc);
    free(raw_span);
    PyBuffer_Release(&V);
    PyBuffer_Release(&A);
    return result;
}

/* cast16(src, dst, n, narrow): n items between float32 and IEEE float16 (its uint16 bits) with
   F16C, rounding to nearest even (narrow) or exactly (widen), as NumPy's casts do for every
   value but signalling NaNs (F16C returns them quiet). NumPy converts one item at a time in
   software: 1.9 ms (widen) and 3.2 ms (narrow) for 1e6 items, against about 0.2 ms here (one
   core of a Zen 3). Returns False, converting nothing, where the CPU has no F16C. */
#ifdef MFAC_X86
__attribute__((target("avx,f16c"))) static void widen_f16c(const uint16_t *src, float *dst,
                                                            Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) static void narrow_f16c(const float *src, uint16_t *dst,
                                                             Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

static PyObject *py_cast16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer src, dst;
    Py_ssize_t n;
    int narrow;
    if (!PyArg_ParseTuple(args, "y*w*np", &src, &dst, &n, &narrow))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t from = narrow ? 4 : 2, to = narrow ? 2 : 4;
    if (check_len(&src, n, 1, from, "src") < 0 || check_len(&dst, n, 1, to, "dst") < 0)
        goto done;
    int done_here = 0;
#ifdef MFAC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
        Py_BEGIN_ALLOW_THREADS
        if (narrow)
            narrow_f16c(src.buf, dst.buf, n);
        else
            widen_f16c(src.buf, dst.buf, n);
        Py_END_ALLOW_THREADS
        done_here = 1;
    }
#endif
    result = PyBool_FromLong(done_here);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* store_row(src, dst, old, wide, copy, n, storage, isa): a window's row write in one loop over
   a float32 vector `src` of n items, chunk by chunk (each chunk in L1 for all of its uses):
   old = dst (the row as it was, for an undo), dst = src rounded to the row's storage (float32:
   copied; bfloat16: to nearest even, as PyTorch rounds, NaN to 0x7fc0; float16: with F16C, as
   NumPy and cast16 round), wide = dst widened to float32, copy = src; each of dst, old, wide
   and copy may be None. Returns max |src| as a float (NaN if src holds a NaN), from the items'
   bits with the sign cleared: for IEEE floats their order is the values' order, and every NaN
   is above infinity. A step's d-long work besides its passes (the gradient's checks, the
   undo copy, the row write, the rows of the first pass) then reads the gradient once, in this
   thread: PyTorch's own copies and reductions ran on its intra-op threads, which then spun on
   the cores that the passes' threads wanted. Returns None, doing nothing, for float16 where
   the CPU has no F16C (the caller then writes the row itself). */
#define STORE_CHUNK 2048

static inline uint16_t bf16_round(uint32_t bits)
{
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0u;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* One chunk of store_row, for the storage st (ST_F32, ST_BF16; -1: no dst), wide/copy optional.
   Returns the chunk's largest magnitude bits. Written once, compiled for each copy below. */
static inline __attribute__((always_inline)) uint32_t store_chunk(const uint32_t *src, void *dst,
                                                                   void *old, uint32_t *wide,
                                                                   uint32_t *copy, Py_ssize_t len,
                                                                   int st)
{
    uint32_t top = 0;
    if (len <= 0 || len > STORE_CHUNK)
        return 0;
    for (Py_ssize_t j = 0; j < len; j++) {
        const uint32_t a = src[j] & 0x7fffffffu;
        top = a > top ? a : top;
    }
    if (st == ST_F32) {
        if (old != NULL)
            memcpy(old, dst, (size_t)len * 4);
        memcpy(dst, src, (size_t)len * 4);
        if (wide != NULL)
            memcpy(wide, src, (size_t)len * 4);
    } else if (st == ST_BF16) {
        uint16_t *d16 = dst;
        if (old != NULL)
            memcpy(old, dst, (size_t)len * 2);
        for (Py_ssize_t j = 0; j < len; j++)
            d16[j] = bf16_round(src[j]);
        if (wide != NULL)
            for (Py_ssize_t j = 0; j < len; j++)
                wide[j] = (uint32_t)d16[j] << 16;
    }
    if (copy != NULL)
        memcpy(copy, src, (size_t)len * 4);
    return top;
}

#define STORE_ROW_LOOP(CHUNK_CALL)                                                          \
    uint32_t top = 0;                                                                       \
    for (Py_ssize_t j0 = 0; j0 < n; j0 += STORE_CHUNK) {                                    \
        const Py_ssize_t len = n - j0 < STORE_CHUNK ? n - j0 : STORE_CHUNK;                 \
        const uint32_t t = CHUNK_CALL;                                                      \
        top = t > top ? t : top;                                                            \
    }                                                                                       \
    return top;

static uint32_t store_row_base(const uint32_t *src, char *dst, char *old, uint32_t *wide,
                               uint32_t *copy, Py_ssize_t n, int st, Py_ssize_t size)
{
    STORE_ROW_LOOP(store_chunk(src + j0, dst ? dst + j0 * size : NULL,
                               old ? old + j0 * size : NULL, wide ? wide + j0 : NULL,
                               copy ? copy + j0 : NULL, len, st))
}

#ifdef MFAC_X86
__attribute__((target("avx2,fma,f16c"))) static uint32_t
store_row_avx2(const uint32_t *src, char *dst, char *old, uint32_t *wide, uint32_t *copy,
               Py_ssize_t n, int st, Py_ssize_t size)
{
    STORE_ROW_LOOP(store_chunk(src + j0, dst ? dst + j0 * size : NULL,
                               old ? old + j0 * size : NULL, wide ? wide + j0 : NULL,
                               copy ? copy + j0 : NULL, len, st))
}

/* float16 rows: the chunk's magnitudes and copies as above (st -1), the rounding with F16C. */
__attribute__((target("avx2,fma,f16c"))) static uint32_t
store_row_f16c(const uint32_t *src, char *dst, char *old, uint32_t *wide, uint32_t *copy,
               Py_ssize_t n)
{
    uint32_t top = 0;
    for (Py_ssize_t j0 = 0; j0 < n; j0 += STORE_CHUNK) {
        const Py_ssize_t len = n - j0 < STORE_CHUNK ? n - j0 : STORE_CHUNK;
        const uint32_t t = store_chunk(src + j0, NULL, NULL, NULL, copy ? copy + j0 : NULL, len,
                                       -1);
        top = t > top ? t : top;
        if (dst == NULL)
            continue;
        uint16_t *d16 = (uint16_t *)dst + j0;
        if (old != NULL)
            memcpy((uint16_t *)old + j0, d16, (size_t)len * 2);
        narrow_f16c((const float *)(src + j0), d16, len);
        if (wide != NULL)
            widen_f16c(d16, (float *)(wide + j0), len);
    }
    return top;
}
#endif

/* An optional writable buffer argument: None leaves b->buf NULL. */
static int optional_buffer(PyObject *obj, Py_buffer *b)
{
    if (obj == Py_None) {
        b->buf = NULL;
        b->obj = NULL;
        b->len = 0;
        return 0;
    }
    return PyObject_GetBuffer(obj, b, PyBUF_WRITABLE);
}

static PyObject *py_store_row(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer src;
    PyObject *objs[4];
    Py_buffer bufs[4] = {{0}}; /* dst, old, wide, copy */
    Py_ssize_t n;
    int storage, isa;
    if (!PyArg_ParseTuple(args, "y*OOOOnii", &src, &objs[0], &objs[1], &objs[2], &objs[3], &n,
                          &storage, &isa))
        return NULL;
    PyObject *result = NULL;
    int got = 0;
    for (; got < 4; got++)
        if (optional_buffer(objs[got], &bufs[got]) < 0)
            goto done;
    const int best = best_isa();
    if (isa == ISA_AUTO)
        isa = best;
    if (isa < ISA_BASE || isa > ISA_AVX512 || isa > best) {
        PyErr_Format(PyExc_ValueError, "isa %d is not one this CPU runs (best: %d)", isa, best);
        goto done;
    }
    if (storage != ST_F32 && storage != ST_F16 && storage != ST_BF16) {
        PyErr_Format(PyExc_ValueError,
                     "storage must be 0 (float32), 2 (float16) or 3 (bfloat16), got %d", storage);
        goto done;
    }
    const Py_ssize_t size = storage_size[storage];
    static const char *const names[4] = {"dst", "old", "wide", "copy"};
    if (check_len(&src, n, 1, 4, "src") < 0)
        goto done;
    for (int i = 0; i < 4; i++)
        if (bufs[i].buf != NULL && check_len(&bufs[i], n, 1, i < 2 ? size : 4, names[i]) < 0)
            goto done;
    if (bufs[1].buf != NULL && bufs[0].buf == NULL) {
        PyErr_SetString(PyExc_ValueError, "old needs dst");
        goto done;
    }
    char *dst = bufs[0].buf, *old = bufs[1].buf;
    uint32_t *wide = bufs[2].buf, *copy = bufs[3].buf;
    const uint32_t *s = src.buf;
    uint32_t top = 0;
    if (storage == ST_F16 && dst != NULL) {
#ifdef MFAC_X86
        if (isa >= ISA_AVX2) {
            Py_BEGIN_ALLOW_THREADS
            top = store_row_f16c(s, dst, old, wide, copy, n);
            Py_END_ALLOW_THREADS
            goto finished;
        }
#endif
        result = Py_NewRef(Py_None); /* no F16C in this copy: the caller writes the row */
        goto done;
    }
    {
        const int st = dst == NULL ? -1 : storage;
        Py_BEGIN_ALLOW_THREADS
#ifdef MFAC_X86
        if (isa >= ISA_AVX2)
            top = store_row_avx2(s, dst, old, wide, copy, n, st, size);
        else
#endif
            top = store_row_base(s, dst, old, wide, copy, n, st, size);
        Py_END_ALLOW_THREADS
    }
#ifdef MFAC_X86
finished:
#endif
    {
        float f;
        memcpy(&f, &top, sizeof f);
        result = PyFloat_FromDouble((double)f);
    }
done:
    PyBuffer_Release(&src);
    for (int i = 0; i < got; i++)
        if (bufs[i].obj != NULL)
            PyBuffer_Release(&bufs[i]);
    return result;
}

/* A block's columns padded to a multiple of this many (zeros): every instruction set's Gram
   tile (8 or 4 rows, 16, 8 or 4 columns) divides it. */
#define BLOCK_PAD 16
_Static_assert(BLOCK_PAD >= NARROW_MAX - 1, "narrow_grams reads s - 1 columns past a group's");

/* block_factors(V, ld, col0, m, s, count, D, diag, scale, damp, isa, storage[, trans]): for each
   block b < count of s columns from col0 (V as for project64), D[b] (s x s float64, row-major)
   = the lower Cholesky factor of damp I + scale V_b^T V_b, its upper part zero, and diag[b] (s)
   the diagonal of scale V_b^T V_b. Returns the number of blocks done: fewer than count where
   block `returned` has a Gram whose diagonal is not finite or a pivot that is not positive. */
static PyObject *py_block_factors(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer V, D, diag;
    Py_ssize_t ld, col0, m, s, count;
    double scale, damp;
    int isa, storage, trans = 0;
    if (!PyArg_ParseTuple(args, "y*nnnnnw*w*ddii|p", &V, &ld, &col0, &m, &s, &count, &D, &diag,
                          &scale, &damp, &isa, &storage, &trans))
        return NULL;
    PyObject *result = NULL;
    void *raw_w = NULL, *raw_a = NULL, *raw_t = NULL;
    const Kernels *kern = pick_kernels(isa);
    Py_ssize_t n, p = 0;
    if (kern == NULL || check_storage(storage) < 0)
        goto done;
    const Py_ssize_t size = storage_size[storage];
    if (s < 1 || s > m || count < 0 || __builtin_mul_overflow(s, count, &n)) {
        PyErr_Format(PyExc_ValueError, "bad blocks: m=%zd s=%zd count=%zd", m, s, count);
        goto done;
    }
    const int narrow = s <= kern->narrow_max;
    /* Narrow: a group's columns and the s - 1 after them (any values) a row; else one block's,
       padded with zeros. */
    p = narrow ? NARROW_GW + BLOCK_PAD : (s + BLOCK_PAD - 1) / BLOCK_PAD * BLOCK_PAD;
    const Py_ssize_t rows = narrow && m > NARROW_ROWS ? NARROW_ROWS : m;
    if ((trans ? check_shape_t : check_shape)(&V, size, m, ld, col0, n, 0, n) < 0 ||
        check_len(&D, n, s, 8, "D") < 0 || check_len(&diag, n, 1, 8, "diag") < 0)
        goto done;
    double *W = scratch(rows, p * (Py_ssize_t)sizeof(double), &raw_w);
    /* A: one block's Gram (p x p), or a narrow group's sums (s rows of NARROW_GW) and a block's
       Gram (s x s) after them. */
    double *A = W == NULL ? NULL
                          : scratch(narrow ? s * (NARROW_GW + s) : p * p,
                                    (Py_ssize_t)sizeof(double), &raw_a);
    void *tile = NULL;
    if (A != NULL && trans)
        tile = scratch(rows, TLD64(sizeof(double)) * (Py_ssize_t)sizeof(double), &raw_t);
    if (A == NULL || (trans && tile == NULL))
        goto done;
    Py_ssize_t b = 0;
    Py_BEGIN_ALLOW_THREADS
    memset(W, 0, (size_t)(rows * p) * sizeof(double)); /* the padding columns stay zero */
    if (narrow) {
        const Py_ssize_t per = NARROW_GW / s;
        for (; b < count; b += per) {
            const Py_ssize_t nb = count - b < per ? count - b : per, c0 = col0 + b * s;
            for (Py_ssize_t r0 = 0; r0 < m; r0 += rows) {
                const Py_ssize_t k = m - r0 < rows ? m - r0 : rows;
                if (trans)
                    kern->widen64t[storage]((const char *)V.buf + (c0 * m + r0) * size, m, k, W,
                                            p, 0, nb * s, tile);
                else
                    kern->widen64[storage]((const char *)V.buf + (r0 * ld + c0) * size, ld, k, W,
                                           p, 0, nb * s);
                kern->narrow_grams(W, k, p, nb * s, s, A, r0 == 0);
            }
            const Py_ssize_t done = kern->narrow_factors(A, s, nb, scale, damp, A + s * NARROW_GW,
                                                         (double *)D.buf + b * s * s,
                                                         (double *)diag.buf + b * s);
            if (done < nb) {
                b += done;
                break;
            }
        }
        if (b > count)
            b = count;
    } else {
        for (; b < count; b++) {
            const Py_ssize_t c0 = col0 + b * s;
            if (trans)
                kern->widen64t[storage]((const char *)V.buf + c0 * m * size, m, m, W, p, 0, s,
                                        tile);
            else
                kern->widen64[storage]((const char *)V.buf + c0 * size, ld, m, W, p, 0, s);
            if (kern->block_factor(W, m, p, s, scale, damp, A, (double *)D.buf + b * s * s,
                                   (double *)diag.buf + b * s) < 0)
                break;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(b);
done:
    free(raw_w);
    free(raw_a);
    free(raw_t);
    PyBuffer_Release(&V);
    PyBuffer_Release(&D);
    PyBuffer_Release(&diag);
    return result;
}

/* block_inverses(D, s, count, isa): each of the count lower triangular s x s float64 matrices of
   D (row-major, zeros above the diagonal, a nonzero diagonal) replaced by its inverse. */
static PyObject *py_block_inverses(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer D;
    Py_ssize_t s, count;
    int isa;
    if (!PyArg_ParseTuple(args, "w*nni", &D, &s, &count, &isa))
        return NULL;
    PyObject *result = NULL;
    void *raw = NULL;
    const Kernels *kern = pick_kernels(isa);
    Py_ssize_t n;
    if (kern == NULL)
        goto done;
    if (s < 1 || count < 0 || __builtin_mul_overflow(s, count, &n)) {
        PyErr_Format(PyExc_ValueError, "bad blocks: s=%zd count=%zd", s, count);
        goto done;
    }
    if (check_len(&D, n, s, 8, "D") < 0)
        goto done;
    double *acc = scratch(s, (Py_ssize_t)sizeof(double), &raw);
    if (acc == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < count; b++)
        kern->block_inverse((double *)D.buf + b * s * s, s, acc);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(raw);
    PyBuffer_Release(&D);
    return result;
}

static PyMethodDef methods[] = {
    {"best_isa", py_best_isa, METH_NOARGS, "The fastest instruction set this CPU runs (1-3)."},
    {"avx512_halves", py_avx512_halves, METH_NOARGS,
     "Whether this CPU runs AVX-512 as two 256-bit halves (AMD family 19h)."},
    {"transposed", py_transposed, METH_NOARGS,
     "Whether project64, combine64 and rows_gram64 read a Fortran-ordered V (trans)."},
    {"project64", py_project64, METH_VARARGS, "Y = X V^T over a column range, in float64."},
    {"combine64", py_combine64, METH_VARARGS,
     "Y = a X + C V over a column range, in float64, rounded once; whether it overflowed."},
    {"rows_gram64", py_rows_gram64, METH_VARARGS, "A = the float64 Gram of V's rows, over a column range."},
    {"cast16", py_cast16, METH_VARARGS,
     "float32 <-> float16 bits with F16C; False where the CPU has none."},
    {"store_row", py_store_row, METH_VARARGS,
     "A window's row write: undo copy, rounding, widened row, copy, max |src|; one loop."},
    {"block_factors", py_block_factors, METH_VARARGS,
     "Dense blocks' float64 Grams and Cholesky factors; the number of blocks done."},
    {"block_inverses", py_block_inverses, METH_VARARGS,
     "Dense blocks' lower triangular factors replaced by their inverses."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#ifdef Py_mod_gil
    /* The kernels keep no state: safe without the GIL (free-threaded CPython). */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_passes", "Fused passes over V (see _passes.c).", 0, methods, slots,
};

PyMODINIT_FUNC PyInit__passes(void)
{
    return PyModuleDef_Init(&module);
}
