/*
 * The kernels of _passes.c for one instruction set. _passes.c includes this file once per
 * instruction set, with ISA (a name suffix), ISA_TARGET (a GCC target attribute string, or
 * none) and VBYTES (the vector width in bytes) defined; see _passes.c for what the kernels
 * compute and why they are laid out this way.
 */

#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)
#define NAME(name) PASTE(name, ISA)

#ifdef ISA_TARGET
#define ISA_ATTR __attribute__((target(ISA_TARGET)))
#else
#define ISA_ATTR
#endif

/* Vectors that may be loaded from and stored to any element-aligned address. */
typedef float NAME(vf) __attribute__((vector_size(VBYTES), aligned(4), may_alias));
typedef double NAME(vd) __attribute__((vector_size(VBYTES), aligned(8), may_alias));
/* As many floats as a vd has doubles: a float32 row piece converted to float64. */
typedef float NAME(vh) __attribute__((vector_size(VBYTES / 2), aligned(4), may_alias));

/* ---------------------------------------------------------------------------------------- */
/* project64 and combine64: rows read in their storage type, every product and sum in float64. */

/* Widening element by element: GCC 12 splits a widening __builtin_convertvector into halves,
   through the stack (4 instructions and 2 stores for one vcvtps2pd: the passes ran at half
   the memory speed), while a constructor compiles to the one instruction (vcvtps2pd,
   vpmovzxwd). LANES_D lists as many lanes as a vd has, LANES_F as many as a vf. */
#if VBYTES == 64
#define LANES_D(h) h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]
#define LANES_D_HI(h) h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]
#elif VBYTES == 32
#define LANES_D(h) h[0], h[1], h[2], h[3]
#define LANES_D_HI(h) h[4], h[5], h[6], h[7]
#else
#define LANES_D(h) h[0], h[1]
#define LANES_D_HI(h) h[2], h[3]
#endif
#define LANES_F(h) LANES_D(h), LANES_D_HI(h)

/* As many uint16 (and uint32) as a vf has floats: a piece of a 2-byte row, and it widened. */
typedef uint16_t NAME(vw) __attribute__((vector_size(VBYTES / 2), aligned(2), may_alias));
typedef uint32_t NAME(vu) __attribute__((vector_size(VBYTES), aligned(4), may_alias));

ISA_ATTR static inline __attribute__((always_inline)) NAME(vd) NAME(widen_f32)(NAME(vh) h)
{
    return (NAME(vd)){LANES_D(h)};
}

ISA_ATTR static inline __attribute__((always_inline)) NAME(vu) NAME(widen_u16)(NAME(vw) w)
{
    return (NAME(vu)){LANES_F(w)};
}

/* A vd of the float64 values of lanes float32 or float64 items at p. */
#define LOADV_F32(p) NAME(widen_f32)(*(const NAME(vh) *)(p))
#define LOADV_F64(p) (*(const NAME(vd) *)(p))
/* One item of each storage type as a double. */
#define LOAD1_F32(p) ((double)*(p))
#define LOAD1_F64(p) (*(p))
#define LOAD1_F16(p) half_to_double(*(p))
#define LOAD1_BF16(p) bf16_to_double(*(p))

/*
 * 2-byte rows go through a float32 buffer: a panel's rows, SUB64 columns at a time, are
 * converted to float32 (exactly: a bfloat16 is the top half of a float32's bits, and every
 * half is a float32) a whole register at a time, and the loops read the buffer as float32
 * rows, converting to float64 as they load. Converting a register of float32 to float64 is
 * half as fast as converting from memory on Zen 3 (vcvtps2pd): 2-byte rows converted in
 * registers ran at 5.5-7 G items/s in L2 (1.0x a float32 GEMV from memory), float32 rows at
 * 16, through the buffer at 10.5 (0.8x the GEMV from memory; AVX2, one core).
 * stage_<S> converts the columns j0 <= j < j1 (a multiple of VBYTES / 4 of them) of `rows`
 * rows at V to buf, SUB64 floats a row (_passes.c).
 */

/* One vf of 2-byte items at p widened to float32 at q: every staging of 2-byte rows. */
ISA_ATTR static inline __attribute__((always_inline)) void NAME(stage_bf16_vec)(const uint16_t *p,
                                                                               float *q)
{
    *(NAME(vf) *)q = (NAME(vf))(NAME(widen_u16)(*(const NAME(vw) *)p) << 16);
}

ISA_ATTR static inline __attribute__((always_inline)) void NAME(stage_f16_vec)(const uint16_t *p,
                                                                              float *q)
{
#if defined(ISA_F16C) && VBYTES == 64
    *(NAME(vf) *)q = (NAME(vf))_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(ISA_F16C) && VBYTES == 32
    *(NAME(vf) *)q = (NAME(vf))_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    for (int l = 0; l < VBYTES / 4; l++)
        q[l] = (float)half_to_double(p[l]);
#endif
}

ISA_ATTR static void NAME(stage_bf16)(const uint16_t *V, Py_ssize_t ld, Py_ssize_t rows,
                                      Py_ssize_t j0, Py_ssize_t j1, float *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        fetch_l1(V + r * ld + j0, 2 * AHEAD16, 2 * (j1 - j0));
        for (Py_ssize_t j = j0; j < j1; j += VBYTES / 4)
            NAME(stage_bf16_vec)(V + r * ld + j, buf + r * SUB64 + (j - j0));
    }
}

ISA_ATTR static void NAME(stage_f16)(const uint16_t *V, Py_ssize_t ld, Py_ssize_t rows,
                                     Py_ssize_t j0, Py_ssize_t j1, float *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        fetch_l1(V + r * ld + j0, 2 * AHEAD16, 2 * (j1 - j0));
        for (Py_ssize_t j = j0; j < j1; j += VBYTES / 4)
            NAME(stage_f16_vec)(V + r * ld + j, buf + r * SUB64 + (j - j0));
    }
}

/* Float32 rows are staged too where a tile's rows are read more than once (more vectors than
   one group of a panel's sums holds, or several dampings): rows a multiple of 4 KiB apart
   share one set of the L1 cache, whose ways the next lines, prefetched, take before the
   second read (eight dampings ran 2x slower so). Rows read once are not: the copy made two
   vectors 1.2x slower (AVX2 on a Zen 4 core: 16.8 against 14.1 ms at m = 64, d = 1e6). */
ISA_ATTR static void NAME(stage_f32)(const float *V, Py_ssize_t ld, Py_ssize_t rows,
                                     Py_ssize_t j0, Py_ssize_t j1, float *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t j = j0; j < j1; j += VBYTES / 4)
            *(NAME(vf) *)(buf + r * SUB64 + (j - j0)) = *(const NAME(vf) *)(V + r * ld + j);
}

/* Where the loops read rows i0 to i0 + rows - 1 (row r at src + r * sld, column j at
   j - joff), for the columns js <= j < jse: V itself (float64 rows, T = S), or (T = float) the
   buffer after staging where `staging` (always for 2-byte rows: there V's own rows are never
   read as float, a branch the compiler drops), else V's float32 rows. */
#define DIRECT(S, STG, rows)                                                                \
    const S *src = V + i0 * ld;                                                             \
    const Py_ssize_t sld = ld, joff = 0;
#define STAGED(S, STG, rows)                                                                \
    const float *src = (const float *)(const void *)(V + i0 * ld);                          \
    Py_ssize_t sld = ld, joff = 0;                                                          \
    if (staging) {                                                                          \
        NAME(STG)(V + i0 * ld, ld, (rows), js, jse, sbuf);                                  \
        src = sbuf;                                                                         \
        sld = SUB64;                                                                        \
        joff = js;                                                                          \
    }

/*
 * project64: Y[k m + i] = sum_j V[i ld + j] X[k ldx + j] over j0 <= j < j1, for k < kk <= 8,
 * i < m, every product and sum in float64 (X is float32 or float64, XT). The columns go in
 * chunks of CHUNK64 (the chunk of X, at most 8 x 32 KiB, stays in the core's cache for all
 * the row panels). A panel of R rows and NV vectors keeps R x NV vectors of sums in registers
 * while the columns go by, so one conversion of V's items serves NV vectors and one load of X
 * serves R rows; past NV vectors the panel's columns are read again, from cache. The sums
 * wait in sums[][] between groups of vectors and between the SUB64 columns of a staging.
 * They start from zero every RUN64 columns (a lane sums 128 terms) and are then added, lane
 * by lane, to the chunk's (folds[][]); a chunk's sums go to level 0 of lv (levels_carry,
 * _passes.c). A lane's running sum over a whole chunk leaned one way where the products have
 * one sign and size: two float32 gradients with a shared mean and x their mean were 53
 * (AVX-512), 120 (AVX2) and 225 (SSE2) eps(float64) of the terms' sum off at d = 2e5, 0.6
 * now. Runs of 32 terms cost eight vectors 5-10 % (the runs' additions); 128 ran as fast as
 * none. The order is fixed by j0 and j1: the result never depends on timing.
 */
#define CHUNK64 4096
#define RUN64 (128 * (VBYTES / 8))
/* Sums in registers: 8 of the 16 vector registers of SSE2/AVX2, 16 of AVX-512's 32. */
#define ACC64 (VBYTES == 64 ? 16 : 8)

/* Rows i0 to i0 + R - 1 (all of them: no test per row in the loop), vectors k0 to k0 + NV - 1,
   columns js <= j < jse. */
#define PROJECT64_PANEL(T, LOADT, LOADX, NV, R)                                             \
    do {                                                                                    \
        NAME(vd) acc[R][NV];                                                                \
        for (int r = 0; r < (R); r++)                                                       \
            for (int v = 0; v < (NV); v++)                                                  \
                acc[r][v] = sums[r][k0 + v];                                                \
        for (Py_ssize_t j = js; j < jse; j += lanes) {                                      \
            NAME(vd) xv[NV];                                                                \
            for (int v = 0; v < (NV); v++)                                                  \
                xv[v] = LOADX(X + (k0 + v) * ldx + j);                                      \
            for (int r = 0; r < (R); r++) {                                                 \
                const NAME(vd) g = LOADT(src + r * sld + (j - joff));                       \
                for (int v = 0; v < (NV); v++)                                              \
                    acc[r][v] += g * xv[v];                                                 \
            }                                                                               \
        }                                                                                   \
        for (int r = 0; r < (R); r++)                                                       \
            for (int v = 0; v < (NV); v++)                                                  \
                sums[r][k0 + v] = acc[r][v];                                                \
    } while (0)

/* The vectors in groups of at most NVMAX (<= 4) over the panel's columns js <= j < jse. */
#define PROJECT64_GROUPS(T, LOADT, LOADX, NVMAX, R)                                         \
    for (int k0 = 0; k0 < kk; k0 += (NVMAX)) {                                              \
        const int nv = kk - k0 < (NVMAX) ? kk - k0 : (NVMAX);                               \
        if (nv == 1 || (NVMAX) == 1)                                                        \
            PROJECT64_PANEL(T, LOADT, LOADX, 1, R);                                         \
        else if (nv == 2 || (NVMAX) < 3)                                                    \
            PROJECT64_PANEL(T, LOADT, LOADX, 2, R);                                         \
        else if (nv == 3)                                                                   \
            PROJECT64_PANEL(T, LOADT, LOADX, 3, R);                                         \
        else                                                                                \
            PROJECT64_PANEL(T, LOADT, LOADX, 4, R);                                         \
    }

/* The chunk's rows i0 to i0 + R - 1: sums over the whole vectors' columns (staged SUB64 at a
   time, or a run in one go), each run's from zero and the runs' added lane by lane (folds;
   `runs`: more than one), then the last columns one by one, added to the level L. */
#define PROJECT64_ROWS(S, LOAD1, T, LOADT, LOADX, WHERE, STG, NVMAX, R)                     \
    do {                                                                                    \
        for (int r = 0; r < (R); r++)                                                       \
            for (int v = 0; v < kk; v++)                                                    \
                sums[r][v] = (NAME(vd)){0};                                                 \
        for (int r = 0; r < (R) && runs; r++)                                               \
            for (int v = 0; v < kk; v++)                                                    \
                folds[r][v] = (NAME(vd)){0};                                                \
        for (Py_ssize_t jr = jc; jr < jt; jr += RUN64) {                                    \
            const Py_ssize_t jre = jr + RUN64 < jt ? jr + RUN64 : jt;                       \
            for (int r = 0; r < (R) && jr > jc; r++) /* each run from zero */              \
                for (int v = 0; v < kk; v++)                                                \
                    sums[r][v] = (NAME(vd)){0};                                             \
            for (Py_ssize_t js = jr; js < jre; js += sub) {                                 \
                const Py_ssize_t jse = js + sub < jre ? js + sub : jre;                     \
                WHERE(S, STG, R)                                                            \
                PROJECT64_GROUPS(T, LOADT, LOADX, NVMAX, R)                                 \
            }                                                                               \
            if (runs)                                                                       \
                for (int r = 0; r < (R); r++)                                               \
                    for (int v = 0; v < kk; v++)                                            \
                        folds[r][v] += sums[r][v];                                          \
        }                                                                                   \
        NAME(vd)(*const tot)[8] = runs ? folds : sums;                                      \
        for (int r = 0; r < (R); r++)                                                       \
            for (int v = 0; v < kk; v++) {                                                  \
                double s = 0.0;                                                             \
                for (int l = 0; l < lanes; l++)                                             \
                    s += tot[r][v][l];                                                      \
                for (Py_ssize_t j = jt; j < je; j++)                                        \
                    s += LOAD1(V + (i0 + r) * ld + j) * (double)X[v * ldx + j];             \
                L[v * m + i0 + r] += s;                                                     \
            }                                                                               \
    } while (0)

/* One chunk's panels of R rows, then its last m % R rows one at a time (a test of the row
   count inside the loop, as project has, kept GCC from holding the row pointers in
   registers). */
#define PROJECT64_PANELS(S, LOAD1, T, LOADT, LOADX, WHERE, STG, NVMAX, R)                   \
    for (Py_ssize_t i0 = 0; i0 < m;) {                                                      \
        if (i0 + (R) <= m) {                                                                \
            PROJECT64_ROWS(S, LOAD1, T, LOADT, LOADX, WHERE, STG, NVMAX, R);                \
            i0 += (R);                                                                      \
        } else {                                                                            \
            PROJECT64_ROWS(S, LOAD1, T, LOADT, LOADX, WHERE, STG, NVMAX, 1);                \
            i0 += 1;                                                                        \
        }                                                                                   \
    }

/* One vector: 8 rows a panel (8 memory streams, as project's). Two vectors with AVX-512's 16
   registers of sums: 8 rows a panel too, so that a load of each vector's items serves 8 rows
   (m = 64, d = 1e6, one Zen 4 core: 8.8 against 10.7-11.3 ms with 4 rows from float16
   rows, 11.0 against 16.9 ms from float32 rows with the staging below). More: 4
   rows a panel, as many vectors at a time as leave 4 x NV sums in ACC64 registers. The vector
   loops end at a multiple of 2 lanes (a whole vf, as staging converts). */
#define PROJECT64_BODY(S, LOAD1, T, LOADT, WHERE, STG, WHEN, XT, LOADX)                     \
    const S *V = Vp;                                                                        \
    const XT *X = Xp;                                                                       \
    const int lanes = VBYTES / 8;                                                           \
    const int staging = (WHEN);                                                             \
    const Py_ssize_t sub = staging ? SUB64 : RUN64;                                         \
    NAME(vd) sums[8][8], folds[8][8];                                                       \
    int count[LEVELS] = {0};                                                                \
    for (Py_ssize_t i = 0; i < kk * m; i++)                                                 \
        Y[i] = 0.0;                                                                         \
    double *const L = levels_start(lv, kk * m, Y, j1 - j0 <= CHUNK64);                     \
    for (Py_ssize_t jc = j0; jc < j1; jc += CHUNK64) {                                      \
        const Py_ssize_t je = jc + CHUNK64 < j1 ? jc + CHUNK64 : j1;                        \
        const Py_ssize_t jt = jc + ((je - jc) / (2 * lanes)) * (2 * lanes);                 \
        /* Whether the chunk has more than one run (else its sums are the run's). */        \
        const int runs = jt - jc > RUN64;                                                   \
        if (kk == 1) {                                                                      \
            PROJECT64_PANELS(S, LOAD1, T, LOADT, LOADX, WHERE, STG, 1, 8)                   \
        } else if (kk == 2 && ACC64 == 16) {                                                \
            PROJECT64_PANELS(S, LOAD1, T, LOADT, LOADX, WHERE, STG, 2, 8)                   \
        } else {                                                                            \
            PROJECT64_PANELS(S, LOAD1, T, LOADT, LOADX, WHERE, STG, ACC64 / 4, 4)           \
        }                                                                                   \
        levels_carry(L, count, kk * m, Y, 0);                                               \
    }                                                                                       \
    levels_carry(L, count, kk * m, Y, 1);

#define PROJECT64_FN(SUFFIX, S, LOAD1, T, LOADT, WHERE, STG, WHEN, XSUFFIX, XT, LOADX)      \
    ISA_ATTR static void NAME(project64_##SUFFIX##_##XSUFFIX)(                              \
        const void *Vp, Py_ssize_t ld, Py_ssize_t m, const void *Xp, Py_ssize_t ldx, int kk, \
        double *Y, Py_ssize_t j0, Py_ssize_t j1, float *sbuf, double *lv)                   \
    {                                                                                       \
        (void)sbuf;                                                                         \
        PROJECT64_BODY(S, LOAD1, T, LOADT, WHERE, STG, WHEN, XT, LOADX)                     \
    }
#define PROJECT64_FNS(SUFFIX, S, LOAD1, T, LOADT, WHERE, STG, WHEN)                         \
    PROJECT64_FN(SUFFIX, S, LOAD1, T, LOADT, WHERE, STG, WHEN, x32, float, LOADV_F32)       \
    PROJECT64_FN(SUFFIX, S, LOAD1, T, LOADT, WHERE, STG, WHEN, x64, double, LOADV_F64)

PROJECT64_FNS(f32, float, LOAD1_F32, float, LOADV_F32, STAGED, stage_f32, kk > ACC64 / 4)
PROJECT64_FNS(f64, double, LOAD1_F64, double, LOADV_F64, DIRECT, -, 0)
PROJECT64_FNS(f16, uint16_t, LOAD1_F16, float, LOADV_F32, STAGED, stage_f16, 1)
PROJECT64_FNS(bf16, uint16_t, LOAD1_BF16, float, LOADV_F32, STAGED, stage_bf16, 1)

/*
 * combine64: Y[k ldy + j] = a[k] X[k ldx + j] + sum_i Ct[8 i + k] V[i ld + j], k < kk <= 8,
 * j0 <= j < j1, every product and sum in float64 and the result rounded once, to float32 or
 * float64 (out64). X is float32 or float64 (x64); ldx = 0 shares one x among the kk rows. The
 * m terms are summed first, in the order of i, and a[k] X[k, j] is added after the last row,
 * as a product followed by the addition would do (starting from it would round every partial
 * sum at its size, in a sweep much larger than the sum's). Every column's sum goes through
 * the same operations whatever j0 and j1 and whichever loop below takes it.
 *
 * One row of C (kk = 1, a product's second pass) is a pass at memory speed: combine64_one,
 * one FMA per item of V read (converted) from memory, four vectors of sums in registers.
 *
 * Several rows (a sweep's dampings) cost kk FMAs per item, which a core does slower than
 * memory delivers the items from kk = 4 or so (AVX2: 2 FMAs a cycle, 4 items each):
 * combine64_rows keeps the FMA units busy. A panel of C64_ROWS rows goes C64_SUB columns at a
 * time; for each tile of 3 vectors of columns and each group of C64_NKR dampings, NKR x 3
 * vectors of sums stay in registers while the panel's rows go by: per row 3 loads of the
 * rows' items (converted to float64 as they load) and NKR broadcast coefficients feed 3 NKR
 * FMAs (AVX2: 7 loads per 12 FMAs, within Zen 3's 3 loads a cycle). The groups of one tile
 * follow each other, so that the second reads the rows' pieces from L1. The rows are read in
 * place where their stride spreads them over the L1 cache's sets (c64_rows_spread), else
 * staged (copied side by side, 2-byte rows widened to float32); the next piece of rows is
 * fetched into the cache while the tiles compute. The sums wait in acc_buf (kk rows of C64_LD
 * doubles) between panels of a chunk of C64_CHUNK columns; a[k] X[k] is added at the chunk's
 * end. The earlier kernel (4 x 2 tiles over staged float32 rows, the eight dampings in two
 * passes over them, the panels' rows not fetched ahead) ran eight dampings at a third of the
 * FMA peak; this one at about two thirds (one core of a Zen 3).
 */
/* A tile's U vectors of sums: zero before the first panel, else from acc_buf. */
#define COMBINE64_SUMS_IN(acc, U)                                                           \
    for (int u = 0; u < (U); u++)                                                           \
        acc[u] = i0 == 0 ? (NAME(vd)){0} : *(const NAME(vd) *)(buf + u * lanes)

/* The sums after a panel: back to acc_buf, or after the last panel y = sums + a[0] x. */
#define COMBINE64_SUMS_OUT(acc, U, j)                                                       \
    for (int u = 0; u < (U); u++) {                                                         \
        const Py_ssize_t jj = (j) + u * lanes;                                              \
        if (!last)                                                                          \
            *(NAME(vd) *)(buf + u * lanes) = acc[u];                                        \
        else {                                                                              \
            const NAME(vd) xv = x64 ? LOADV_F64(xd + jj) : LOADV_F32(xf + jj);              \
            const NAME(vd) y = acc[u] + a[0] * xv;                                          \
            if (out64)                                                                      \
                *(NAME(vd) *)(yd + jj) = y;                                                 \
            else                                                                            \
                *(NAME(vh) *)(yf + jj) = __builtin_convertvector(y, NAME(vh));              \
        }                                                                                   \
    }

#define COMBINE64_TILE(T, LOADT, U)                                                         \
    do {                                                                                    \
        for (Py_ssize_t j = js; j < jse; j += (U) * lanes) {                                \
            double *buf = acc_buf + (j - jc);                                               \
            NAME(vd) acc[U];                                                                \
            COMBINE64_SUMS_IN(acc, U);                                                      \
            for (Py_ssize_t r = 0; r < rows; r++) {                                         \
                const T *row = src + r * sld + (j - joff);                                  \
                const double c = Ct[8 * (i0 + r)];                                          \
                for (int u = 0; u < (U); u++)                                               \
                    acc[u] += c * LOADT(row + u * lanes);                                   \
            }                                                                               \
            COMBINE64_SUMS_OUT(acc, U, j);                                                  \
        }                                                                                   \
    } while (0)

/* The columns past the last whole pair of vectors, one at a time (both paths). */
#define COMBINE64_LAST_COLUMNS(LOAD1)                                                       \
    for (Py_ssize_t j = jt; j < je; j++)                                                    \
        for (int k = 0; k < kk; k++) {                                                      \
            double s = 0.0;                                                                 \
            for (Py_ssize_t i = 0; i < m; i++)                                              \
                s += Ct[8 * i + k] * LOAD1(V + i * ld + j);                                 \
            const double xj = x64 ? xd[k * ldx + j] : (double)xf[k * ldx + j];              \
            const double y = s + a[k] * xj;                                                 \
            if (out64)                                                                      \
                yd[k * ldy + j] = y;                                                        \
            else                                                                            \
                yf[k * ldy + j] = (float)y;                                                 \
        }

/* Sums in registers: 4 vectors (one FMA chain each), the panels' rows read from V (float32,
   float64) or from their float32 staging (2-byte). The vector loops end at a multiple of 4
   lanes (a whole tile). */
#define COMBINE64_ONE_BODY(S, LOAD1, T, LOADT, WHERE, STG, WHEN)                            \
    COMBINE64_ONE_##WHERE(S, LOAD1, T, LOADT, WHERE, STG, WHEN)
#define COMBINE64_ONE_DIRECT(S, LOAD1, T, LOADT, WHERE, STG, WHEN)                          \
    const S *V = Vp;                                                                        \
    const int lanes = VBYTES / 8;                                                           \
    const int staging = (WHEN);                                                             \
    const Py_ssize_t sub = staging ? SUB64 : COMBINE_CHUNK;                                 \
    const Py_ssize_t gran = 4 * lanes;                                                      \
    for (Py_ssize_t jc = j0; jc < j1; jc += COMBINE_CHUNK) {                                \
        const Py_ssize_t je = jc + COMBINE_CHUNK < j1 ? jc + COMBINE_CHUNK : j1;            \
        const Py_ssize_t jt = jc + ((je - jc) / gran) * gran;                               \
        for (Py_ssize_t i0 = 0; i0 < m; i0 += PANEL_ROWS) {                                 \
            const Py_ssize_t rows = i0 + PANEL_ROWS < m ? PANEL_ROWS : m - i0;              \
            const int last = i0 + rows == m;                                                \
            for (Py_ssize_t js = jc; js < jt; js += sub) {                                  \
                const Py_ssize_t jse = js + sub < jt ? js + sub : jt;                       \
                WHERE(S, STG, rows)                                                         \
                COMBINE64_TILE(T, LOADT, 4);                                                \
            }                                                                               \
        }                                                                                   \
        COMBINE64_LAST_COLUMNS(LOAD1)                                                       \
    }

/*
 * combine64_one over 2-byte rows: the staging of a panel's next SUB64 columns runs inside the
 * tiles of the current ones (double buffer; the first piece of each panel is staged before its
 * tiles), a piece of each row at each of the tile's rows, so that the rows' loads from memory
 * go out while the FMAs run, instead of in a loop of their own that waits for them; and tiles of
 * C1_U16 vectors (8 FMA chains: 4 chains left the FMA units idle for their latency). The sums
 * are those of COMBINE64_ONE_DIRECT, term for term: each column's sum starts from acc_buf (zero
 * in the first panel) and takes the rows in order. One core of a Zen 3 (AVX2, d = 1e6, m = 64,
 * alternated in one process): 7.9-8.7 ms against 8.8-9.0 ms for staging then tiles of 4
 * vectors. Widening bfloat16 without a float conversion (its bits, shifted, are a float64 of its
 * value times 2^-896) ran slower than this, as did converting in registers
 * (benchmarks/widen_tile.c).
 */
#define C1_U16 8
_Static_assert(SUB64 % (C1_U16 * VBYTES / 8) == 0, "SUB64 must be a multiple of the tile");
#define COMBINE64_ONE_STAGED(S, LOAD1, T, LOADT, WHERE, STG, WHEN)                          \
    const S *V = Vp;                                                                        \
    const int lanes = VBYTES / 8;                                                           \
    const Py_ssize_t gran = C1_U16 * lanes;                                                 \
    float *const bufs[2] = {sbuf, sbuf + PANEL_ROWS * SUB64};                               \
    for (Py_ssize_t jc = j0; jc < j1; jc += COMBINE_CHUNK) {                                \
        const Py_ssize_t je = jc + COMBINE_CHUNK < j1 ? jc + COMBINE_CHUNK : j1;            \
        const Py_ssize_t jt = jc + ((je - jc) / gran) * gran;                               \
        for (Py_ssize_t i0 = 0; i0 < m && jc < jt; i0 += PANEL_ROWS) {                      \
            const Py_ssize_t rows = i0 + PANEL_ROWS < m ? PANEL_ROWS : m - i0;              \
            const int last = i0 + rows == m;                                                \
            NAME(STG)(V + i0 * ld, ld, rows, jc, jc + SUB64 < jt ? jc + SUB64 : jt, bufs[0]); \
            int cur = 0;                                                                    \
            for (Py_ssize_t js = jc; js < jt; js += SUB64, cur ^= 1) {                      \
                const Py_ssize_t jse = js + SUB64 < jt ? js + SUB64 : jt;                   \
                const Py_ssize_t nw = (jse + SUB64 < jt ? jse + SUB64 : jt) - jse;          \
                const float *const src = bufs[cur];                                         \
                float *const nbuf = bufs[cur ^ 1];                                          \
                for (Py_ssize_t j = js; j < jse; j += gran) {                               \
                    double *buf = acc_buf + (j - jc);                                       \
                    const int stage_next = j - js < nw;                                     \
                    const S *vn = V + i0 * ld + jse + (j - js);                             \
                    float *qn = nbuf + (j - js);                                            \
                    NAME(vd) acc[C1_U16];                                                   \
                    COMBINE64_SUMS_IN(acc, C1_U16);                                         \
                    for (Py_ssize_t r = 0; r < rows; r++) {                                 \
                        if (stage_next) {                                                   \
                            fetch_l1(vn + r * ld, 2 * AHEAD16, 2 * C1_U16 * lanes);          \
                            for (int q = 0; q < C1_U16 * lanes; q += VBYTES / 4)            \
                                NAME(STG##_vec)(vn + r * ld + q, qn + r * SUB64 + q);       \
                        }                                                                   \
                        const float *row = src + r * SUB64 + (j - js);                      \
                        const double c = Ct[8 * (i0 + r)];                                  \
                        for (int u = 0; u < C1_U16; u++)                                    \
                            acc[u] += c * LOADV_F32(row + u * lanes);                       \
                    }                                                                       \
                    COMBINE64_SUMS_OUT(acc, C1_U16, j);                                     \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        COMBINE64_LAST_COLUMNS(LOAD1)                                                       \
    }

/* Dampings in one register tile: C64_NKR x 3 vectors of sums, 12 of the 16 registers of SSE2
   and AVX2 (3 more hold the rows' vectors, one a broadcast coefficient), 24 of AVX-512's 32. */
#define C64_NKR (VBYTES == 64 ? 8 : 4)

/*
 * Staging for combine64_rows: columns 0 <= j < w (a multiple of VBYTES / 4) of `rows` rows at V
 * (row r at V + r ld), C64_SUB items a row, to buf: float32 for float32 and 2-byte rows (the
 * tiles convert to float64 as they load, which costs the FMA units nothing: a 4 x 3 tile of
 * FMAs with its 3 loads converting ran at the FMA peak, AVX2 on Zen 3), float64 for float64
 * rows.
 */
ISA_ATTR static void NAME(stage64_f32)(const float *V, Py_ssize_t ld, Py_ssize_t rows,
                                       Py_ssize_t w, float *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t j = 0; j < w; j += VBYTES / 4) {
            *(NAME(vf) *)(buf + r * C64_SUB + j) = *(const NAME(vf) *)(V + r * ld + j);
        }
}

ISA_ATTR static void NAME(stage64_f64)(const double *V, Py_ssize_t ld, Py_ssize_t rows,
                                       Py_ssize_t w, double *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t j = 0; j < w; j += VBYTES / 8) {
            *(NAME(vd) *)(buf + r * C64_SUB + j) = *(const NAME(vd) *)(V + r * ld + j);
        }
}

ISA_ATTR static void NAME(stage64_bf16)(const uint16_t *V, Py_ssize_t ld, Py_ssize_t rows,
                                        Py_ssize_t w, float *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t j = 0; j < w; j += VBYTES / 4)
            NAME(stage_bf16_vec)(V + r * ld + j, buf + r * C64_SUB + j);
}

ISA_ATTR static void NAME(stage64_f16)(const uint16_t *V, Py_ssize_t ld, Py_ssize_t rows,
                                       Py_ssize_t w, float *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t j = 0; j < w; j += VBYTES / 4)
            NAME(stage_f16_vec)(V + r * ld + j, buf + r * C64_SUB + j);
}

/* One tile: dampings k0 to k0 + NKR - 1, U vectors of columns from the panel's column jj (the
   chunk's column js - jc + jj), over the panel's rows. Its sums start from acc_buf, or from zero
   in the first panel (ain: zeros and ald = 0, or acc_buf and C64_LD), and go back to acc_buf.
   No branch on the sums: GCC kept the sums of a tile with branches (first panel, last panel)
   on the stack, a store and a load of each around the rows' loop. */
#define C64_TILE(T, LOADT, NKR, U)                                                          \
    do {                                                                                    \
        double *ab = acc_buf + (js - jc) + jj + k0 * C64_LD;                                \
        const double *ai = ain + ((js - jc) + jj + k0 * C64_LD) * (ald != 0);               \
        NAME(vd) acc[NKR][U];                                                               \
        for (int k = 0; k < (NKR); k++)                                                     \
            for (int u = 0; u < (U); u++)                                                   \
                acc[k][u] = *(const NAME(vd) *)(ai + k * ald + u * lanes);                  \
        const T *g = src + jj;                                                              \
        const double *c = Ct + 8 * i0 + k0;                                                 \
        for (Py_ssize_t r = 0; r < rows; r++, g += sld, c += 8) {                           \
            NAME(vd) v[U];                                                                  \
            for (int u = 0; u < (U); u++)                                                   \
                v[u] = LOADT(g + u * lanes);                                                \
            for (int k = 0; k < (NKR); k++)                                                 \
                for (int u = 0; u < (U); u++)                                               \
                    acc[k][u] += c[k] * v[u];                                               \
        }                                                                                   \
        for (int k = 0; k < (NKR); k++)                                                     \
            for (int u = 0; u < (U); u++)                                                   \
                *(NAME(vd) *)(ab + k * C64_LD + u * lanes) = acc[k][u];                     \
    } while (0)

/* Before each tile, its share of the next staging's rows (nrows rows of nw items at Vn, row r
   at Vn + r ld) is fetched into the cache: spread over the tiles, the fetches keep few misses in
   flight at a time, and the tiles' FMAs leave them time to arrive. Without them the staging
   waited for memory, half the time of eight dampings: the panels' rows, 16 short runs, were not
   fetched ahead by the hardware. Rows that the tiles read in place go into L2 only
   (prefetcht1) where they are float64 or where one group of dampings reads them: the tiles'
   loads then wait on L2, which the out-of-order core covers, and a piece of float64 rows
   (12 KiB) and the next one fetched into L1 evicted each other and the sums (eight dampings
   over float64 rows took 1.6x as long, two 1.9x; two to four over float32 rows 1.07-1.1x).
   Where a second group reads the float32 rows again (more than NKR dampings), and where the
   rows are staged (copied from the cache), L1 is the faster (AVX2, six and eight dampings
   over float32 rows: 1.02-1.1x; eight over 2-byte rows: 1.2x). One Zen 4 core, m = 64,
   benchmarks/results/combine_prefetch-cpu-zen4-2026-12-06.txt. */
#define C64_FETCH_NEXT()                                                                    \
    do {                                                                                    \
        for (; pf_row < nrows && pf_row * ntiles < (tile + 1) * nrows; pf_row++) {          \
            __typeof__(Vn) pv = Vn + pf_row * ld;                                             \
            if (pf_l2)                                                                      \
                for (Py_ssize_t jp = 0; jp < nw; jp += 64 / (Py_ssize_t)sizeof(*Vn))        \
                    __builtin_prefetch(pv + jp, 0, 2);                                      \
            else                                                                            \
                for (Py_ssize_t jp = 0; jp < nw; jp += 64 / (Py_ssize_t)sizeof(*Vn))        \
                    __builtin_prefetch(pv + jp, 0, 3);                                      \
        }                                                                                   \
        tile++;                                                                             \
    } while (0)

/* The tiles of the groups of dampings at one column position: all groups, NKR at a time. */
#define C64_GROUPS(T, LOADT, U)                                                             \
    for (int k0 = 0; k0 < kk; k0 += C64_NKR) {                                              \
        C64_FETCH_NEXT();                                                                   \
        switch (kk - k0 < C64_NKR ? kk - k0 : C64_NKR) {                                    \
        case 1: C64_TILE(T, LOADT, 1, U); break;                                            \
        case 2: C64_TILE(T, LOADT, 2, U); break;                                            \
        case 3: C64_TILE(T, LOADT, 3, U); break;                                            \
        C64_CASES_WIDE(T, LOADT, U)                                                         \
        default: C64_TILE(T, LOADT, C64_NKR, U); break;                                     \
        }                                                                                   \
    }

#if VBYTES == 64
#define C64_CASES_WIDE(T, LOADT, U)                                                         \
    case 4: C64_TILE(T, LOADT, 4, U); break;                                                \
    case 5: C64_TILE(T, LOADT, 5, U); break;                                                \
    case 6: C64_TILE(T, LOADT, 6, U); break;                                                \
    case 7: C64_TILE(T, LOADT, 7, U); break;
#else
#define C64_CASES_WIDE(T, LOADT, U)
#endif

/* A panel's tiles over its columns js <= j < js + w: tiles of 3 vectors, then of one. */
#define C64_PANEL(T, LOADT)                                                                 \
    do {                                                                                    \
        Py_ssize_t jj = 0;                                                                  \
        for (; jj + 3 * lanes <= w; jj += 3 * lanes)                                        \
            C64_GROUPS(T, LOADT, 3)                                                         \
        for (; jj < w; jj += lanes)                                                         \
            C64_GROUPS(T, LOADT, 1)                                                         \
    } while (0)

/* The chunk's columns jc <= j < jt: sums from zero over the panels, then a[k] X[k] added and
   the results rounded and stored. */
#define COMBINE64_ROWS_BODY(S, LOAD1, T, LOADT, STG, DIRECT)                                \
    const S *V = Vp;                                                                        \
    T *sbuf = (T *)(void *)sbuf_raw;                                                        \
    const int lanes = VBYTES / 8;                                                           \
    const Py_ssize_t gran = 2 * lanes;                                                      \
    const int direct = (DIRECT) && c64_rows_spread(ld * (Py_ssize_t)sizeof(S));             \
    const int pf_l2 = direct && (sizeof(S) == 8 || kk <= C64_NKR); /* C64_FETCH_NEXT */   \
    for (Py_ssize_t jc = j0; jc < j1; jc += C64_CHUNK) {                                    \
        const Py_ssize_t je = jc + C64_CHUNK < j1 ? jc + C64_CHUNK : j1;                    \
        const Py_ssize_t jt = jc + ((je - jc) / gran) * gran;                               \
        for (Py_ssize_t i0 = 0; i0 < m; i0 += C64_ROWS) {                                   \
            const Py_ssize_t rows = i0 + C64_ROWS < m ? C64_ROWS : m - i0;                  \
            const double *ain = i0 == 0 ? c64_zeros : acc_buf;                              \
            const Py_ssize_t ald = i0 == 0 ? 0 : C64_LD;                                    \
            for (Py_ssize_t js = jc; js < jt; js += C64_SUB) {                              \
                const Py_ssize_t w = js + C64_SUB < jt ? C64_SUB : jt - js;                 \
                const T *src = sbuf;                                                        \
                Py_ssize_t sld = C64_SUB;                                                   \
                if (direct) {                                                               \
                    src = (const T *)(const void *)(V + i0 * ld + js);                      \
                    sld = ld;                                                               \
                } else                                                                      \
                    NAME(STG)(V + i0 * ld + js, ld, rows, w, sbuf);                         \
                /* The next staging: this panel's next columns, the next panel, or the next \
                   chunk's first panel. */                                                  \
                Py_ssize_t ni0 = i0, njs = js + C64_SUB, njt = jt;                          \
                if (njs >= jt) {                                                            \
                    njs = jc;                                                               \
                    ni0 = i0 + C64_ROWS;                                                    \
                    if (ni0 >= m) {                                                         \
                        ni0 = 0;                                                            \
                        njs = jc + C64_CHUNK;                                               \
                        const Py_ssize_t nje = njs + C64_CHUNK < j1 ? njs + C64_CHUNK : j1; \
                        njt = njs < j1 ? njs + ((nje - njs) / gran) * gran : njs;           \
                    }                                                                       \
                }                                                                           \
                const Py_ssize_t nrows =                                                    \
                    njs < njt ? (ni0 + C64_ROWS < m ? C64_ROWS : m - ni0) : 0;              \
                const Py_ssize_t nw = njs + C64_SUB < njt ? C64_SUB : njt - njs;            \
                const S *Vn = V + ni0 * ld + njs;                                           \
                const Py_ssize_t ntiles = (kk + C64_NKR - 1) / C64_NKR                      \
                                          * (w / (3 * lanes) + w % (3 * lanes) / lanes);    \
                Py_ssize_t tile = 0, pf_row = 0;                                            \
                C64_PANEL(T, LOADT);                                                        \
            }                                                                               \
        }                                                                                   \
        for (int k = 0; k < kk; k++)                                                        \
            for (Py_ssize_t j = jc; j < jt; j += lanes) {                                   \
                const NAME(vd) xv = x64 ? LOADV_F64(xd + k * ldx + j)                       \
                                        : LOADV_F32(xf + k * ldx + j);                      \
                const NAME(vd) y = *(const NAME(vd) *)(acc_buf + k * C64_LD + (j - jc))     \
                                   + a[k] * xv;                                             \
                if (out64)                                                                  \
                    *(NAME(vd) *)(yd + k * ldy + j) = y;                                    \
                else                                                                        \
                    *(NAME(vh) *)(yf + k * ldy + j) = __builtin_convertvector(y, NAME(vh)); \
            }                                                                               \
        COMBINE64_LAST_COLUMNS(LOAD1)                                                       \
    }

#define COMBINE64_FN(SUFFIX, S, LOAD1, T, LOADT, WHERE, STG, WHEN, T64, LOADT64, STG64, DIRECT) \
    ISA_ATTR static void NAME(combine64_one_##SUFFIX)(                                      \
        const void *Vp, Py_ssize_t ld, Py_ssize_t m, const double *Ct, int kk,              \
        const double *a, const void *Xp, Py_ssize_t ldx, int x64, void *Yp, Py_ssize_t ldy, \
        int out64, Py_ssize_t j0, Py_ssize_t j1, double *acc_buf, float *sbuf)              \
    {                                                                                       \
        const double *xd = Xp;                                                              \
        const float *xf = Xp;                                                               \
        double *yd = Yp;                                                                    \
        float *yf = Yp;                                                                     \
        (void)sbuf;                                                                         \
        COMBINE64_ONE_BODY(S, LOAD1, T, LOADT, WHERE, STG, WHEN)                            \
    }                                                                                       \
    ISA_ATTR static void NAME(combine64_rows_##SUFFIX)(                                     \
        const void *Vp, Py_ssize_t ld, Py_ssize_t m, const double *Ct, int kk,              \
        const double *a, const void *Xp, Py_ssize_t ldx, int x64, void *Yp, Py_ssize_t ldy, \
        int out64, Py_ssize_t j0, Py_ssize_t j1, double *acc_buf, float *sbuf_raw)          \
    {                                                                                       \
        const double *xd = Xp;                                                              \
        const float *xf = Xp;                                                               \
        double *yd = Yp;                                                                    \
        float *yf = Yp;                                                                     \
        COMBINE64_ROWS_BODY(S, LOAD1, T64, LOADT64, STG64, DIRECT)                          \
    }                                                                                       \
    ISA_ATTR static void NAME(combine64_##SUFFIX)(                                          \
        const void *Vp, Py_ssize_t ld, Py_ssize_t m, const double *Ct, int kk,              \
        const double *a, const void *Xp, Py_ssize_t ldx, int x64, void *Yp, Py_ssize_t ldy, \
        int out64, Py_ssize_t j0, Py_ssize_t j1, double *acc_buf, float *sbuf)              \
    {                                                                                       \
        (kk == 1 ? NAME(combine64_one_##SUFFIX) : NAME(combine64_rows_##SUFFIX))(           \
            Vp, ld, m, Ct, kk, a, Xp, ldx, x64, Yp, ldy, out64, j0, j1, acc_buf, sbuf);     \
    }

COMBINE64_FN(f32, float, LOAD1_F32, float, LOADV_F32, DIRECT, -, 0, float, LOADV_F32,
             stage64_f32, 1)
COMBINE64_FN(f64, double, LOAD1_F64, double, LOADV_F64, DIRECT, -, 0, double, LOADV_F64,
             stage64_f64, 1)
COMBINE64_FN(f16, uint16_t, LOAD1_F16, float, LOADV_F32, STAGED, stage_f16, 1, float,
             LOADV_F32, stage64_f16, 0)
COMBINE64_FN(bf16, uint16_t, LOAD1_BF16, float, LOADV_F32, STAGED, stage_bf16, 1, float,
             LOADV_F32, stage64_bf16, 0)

/*
 * widen64: the columns j0 <= j < j1 of m rows of V (row i at V + i ld), as float64, to D (row i
 * at D + i ldd): the dense blocks' float64 rows (block_factors, _passes.c). Each item goes
 * through the loads of project64 and combine64 (float32 rows widened as loaded, 2-byte rows
 * through one vf of the staging's widening to float32, then widened as loaded), so the values
 * are theirs, which are exact.
 */
#define WIDEN64_FN(SUFFIX, S, LOAD1, VEC)                                                   \
    ISA_ATTR static void NAME(widen64_##SUFFIX)(const void *Vp, Py_ssize_t ld, Py_ssize_t m, \
                                                double *D, Py_ssize_t ldd, Py_ssize_t j0,   \
                                                Py_ssize_t j1)                              \
    {                                                                                       \
        const S *V = Vp;                                                                    \
        const Py_ssize_t nv = VBYTES / 4;                                                   \
        for (Py_ssize_t i = 0; i < m; i++) {                                                \
            const S *v = V + i * ld;                                                        \
            double *d = D + i * ldd;                                                        \
            Py_ssize_t j = j0;                                                              \
            for (; j + nv <= j1; j += nv)                                                   \
                VEC(v + j, d + j);                                                          \
            for (; j < j1; j++)                                                             \
                d[j] = LOAD1(v + j);                                                        \
        }                                                                                   \
    }

/* One vf of items at p as float64 at q (two vd). */
#define WIDEN64_VEC_F32(p, q)                                                               \
    do {                                                                                    \
        *(NAME(vd) *)(q) = LOADV_F32(p);                                                    \
        *(NAME(vd) *)((q) + VBYTES / 8) = LOADV_F32((p) + VBYTES / 8);                      \
    } while (0)
#define WIDEN64_VEC_F64(p, q)                                                               \
    do {                                                                                    \
        *(NAME(vd) *)(q) = LOADV_F64(p);                                                    \
        *(NAME(vd) *)((q) + VBYTES / 8) = LOADV_F64((p) + VBYTES / 8);                      \
    } while (0)
#define WIDEN64_VEC_STAGED(STAGE, p, q)                                                     \
    do {                                                                                    \
        float f_[VBYTES / 4] __attribute__((aligned(VBYTES)));                              \
        NAME(STAGE)(p, f_);                                                                 \
        WIDEN64_VEC_F32(f_, q);                                                             \
    } while (0)
#define WIDEN64_VEC_F16(p, q) WIDEN64_VEC_STAGED(stage_f16_vec, p, q)
#define WIDEN64_VEC_BF16(p, q) WIDEN64_VEC_STAGED(stage_bf16_vec, p, q)

WIDEN64_FN(f32, float, LOAD1_F32, WIDEN64_VEC_F32)
WIDEN64_FN(f64, double, LOAD1_F64, WIDEN64_VEC_F64)
WIDEN64_FN(f16, uint16_t, LOAD1_F16, WIDEN64_VEC_F16)
WIDEN64_FN(bf16, uint16_t, LOAD1_BF16, WIDEN64_VEC_BF16)

/* ---------------------------------------------------------------------------------------- */
/*
 * A Fortran-ordered G: the same passes over the rows of Gt = G^T (C-ordered, a row of m items
 * per column of G, row j at Vt + j ldt). A piece of Gt's rows (a block of G's columns, one run
 * of memory) is transposed, 8 x 8 items at a time in registers, into a row-major tile of m rows
 * that the loops above read as they read V's rows (2-byte items widened to float32 on the way,
 * exactly, as the staging widens them). G is read once, in its order, as one stream; the tile
 * stays in the core's cache. The sums are those of the C-ordered kernels, term for term, in the
 * same order (project64t, combine64t): the results are the same bits. One vector (kk = 1)
 * goes to project1t and combine1t instead, which read Gt's rows in place (below).
 */
typedef float NAME(t8f) __attribute__((vector_size(32), aligned(4), may_alias));
typedef double NAME(t8d) __attribute__((vector_size(64), aligned(8), may_alias));
typedef int32_t NAME(t8i) __attribute__((vector_size(32)));
typedef int64_t NAME(t8l) __attribute__((vector_size(64)));
typedef uint16_t NAME(t8w) __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t NAME(t8u) __attribute__((vector_size(32)));

/* *d = the eight items at p, as a t8f (float32 and 2-byte rows) or a t8d (float64 rows). The
   helpers write through a pointer: a 32-byte vector returned by value changes the ABI of the
   copy without AVX. */
#define T8_LOAD_F32(p, d) (*(d) = *(const NAME(t8f) *)(p))
#define T8_LOAD_F64(p, d) (*(d) = *(const NAME(t8d) *)(p))
#define T8_LOAD_BF16(p, d) NAME(t8_bf16)(p, d)
#define T8_LOAD_F16(p, d) NAME(t8_f16)(p, d)

ISA_ATTR static inline __attribute__((always_inline)) void NAME(t8_bf16)(const uint16_t *p,
                                                                        NAME(t8f) *d)
{
    const NAME(t8w) w = *(const NAME(t8w) *)p;
    const NAME(t8u) u = {w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]};
    *d = (NAME(t8f))(u << 16);
}

ISA_ATTR static inline __attribute__((always_inline)) void NAME(t8_f16)(const uint16_t *p,
                                                                       NAME(t8f) *d)
{
#if defined(ISA_F16C)
    *d = (NAME(t8f))_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    for (int l = 0; l < 8; l++)
        (*d)[l] = (float)half_to_double(p[l]);
#endif
}

/* o[q] = (r[0][q], ..., r[7][q]): an 8 x 8 transpose in three rounds of two-input shuffles
   (unpack, pairs, halves), constant masks that GCC turns into the ISA's shuffles. */
#define T8_TRANSPOSE(VT, MT, r, o)                                                          \
    do {                                                                                    \
        VT t_[8], s_[8];                                                                    \
        for (int q = 0; q < 8; q += 2) {                                                    \
            t_[q] = __builtin_shuffle(r[q], r[q + 1], (MT){0, 8, 1, 9, 4, 12, 5, 13});      \
            t_[q + 1] = __builtin_shuffle(r[q], r[q + 1], (MT){2, 10, 3, 11, 6, 14, 7, 15}); \
        }                                                                                   \
        for (int q = 0; q < 8; q += 4) {                                                    \
            s_[q] = __builtin_shuffle(t_[q], t_[q + 2], (MT){0, 1, 8, 9, 4, 5, 12, 13});    \
            s_[q + 1] = __builtin_shuffle(t_[q], t_[q + 2], (MT){2, 3, 10, 11, 6, 7, 14, 15}); \
            s_[q + 2] = __builtin_shuffle(t_[q + 1], t_[q + 3], (MT){0, 1, 8, 9, 4, 5, 12, 13}); \
            s_[q + 3] =                                                                     \
                __builtin_shuffle(t_[q + 1], t_[q + 3], (MT){2, 3, 10, 11, 6, 7, 14, 15});  \
        }                                                                                   \
        for (int q = 0; q < 4; q++) {                                                       \
            o[q] = __builtin_shuffle(s_[q], s_[q + 4], (MT){0, 1, 2, 3, 8, 9, 10, 11});     \
            o[q + 4] = __builtin_shuffle(s_[q], s_[q + 4], (MT){4, 5, 6, 7, 12, 13, 14, 15}); \
        }                                                                                   \
    } while (0)

/* o[q] = the q-th items of the eight rows at p (row r at p + r ld), loaded by LOAD8: one 8 x 8
   block transposed, for the transposes below and the rows' Gram (rows_gram64). */
#define T8_BLOCK(VT, MT, LOAD8, p, ld, o)                                                   \
    do {                                                                                    \
        VT r_[8];                                                                           \
        for (int q_ = 0; q_ < 8; q_++)                                                      \
            LOAD8((p) + q_ * (ld), &r_[q_]);                                                \
        T8_TRANSPOSE(VT, MT, r_, o);                                                        \
    } while (0)

/* tile[i ldtile + c] = Vt[c ldt + i] (as T, exactly) for i < m, c < w. */
#define TRANSPOSE_FN(SUFFIX, S, T, VT, MT, LOAD8, LOAD1)                                    \
    ISA_ATTR static void NAME(transpose_##SUFFIX)(const S *Vt, Py_ssize_t ldt, Py_ssize_t m, \
                                                  Py_ssize_t w, T *tile, Py_ssize_t ldtile) \
    {                                                                                       \
        Py_ssize_t c = 0;                                                                   \
        for (; c + 8 <= w; c += 8) {                                                        \
            const S *p = Vt + c * ldt;                                                      \
            /* The rows' bytes T_AHEAD further on (prefetches never fault). */              \
            const char *ahead = (const char *)(p + 8 * ldt) + T_AHEAD;                      \
            for (Py_ssize_t b = 0; b < 8 * ldt * (Py_ssize_t)sizeof(S); b += 64)            \
                __builtin_prefetch(ahead + b, 0, T_LOC);                                     \
            Py_ssize_t i = 0;                                                               \
            for (; i + 8 <= m; i += 8) {                                                    \
                VT o[8];                                                                    \
                T8_BLOCK(VT, MT, LOAD8, p + i, ldt, o);                                     \
                for (int q = 0; q < 8; q++)                                                 \
                    *(VT *)(tile + (i + q) * ldtile + c) = o[q];                            \
            }                                                                               \
            for (; i < m; i++)                                                              \
                for (int q = 0; q < 8; q++)                                                 \
                    tile[i * ldtile + c + q] = (T)LOAD1(p + q * ldt + i);                   \
        }                                                                                   \
        for (; c < w; c++)                                                                  \
            for (Py_ssize_t i = 0; i < m; i++)                                              \
                tile[i * ldtile + c] = (T)LOAD1(Vt + c * ldt + i);                          \
    }

TRANSPOSE_FN(f32, float, float, NAME(t8f), NAME(t8i), T8_LOAD_F32, LOAD1_F32)
TRANSPOSE_FN(f64, double, double, NAME(t8d), NAME(t8l), T8_LOAD_F64, LOAD1_F64)
TRANSPOSE_FN(f16, uint16_t, float, NAME(t8f), NAME(t8i), T8_LOAD_F16, LOAD1_F16)
TRANSPOSE_FN(bf16, uint16_t, float, NAME(t8f), NAME(t8i), T8_LOAD_BF16, LOAD1_BF16)

/*
 * rows_gram64: the float64 Gram of the m rows of V (row i at V + i ld) over the columns j0 <= j
 * < j1, its upper tiles added to A (mp x mp, row i at A + i mp; mp at least m rounded up to
 * the tiles' rows and to their columns: _passes.c). A chunk of kc columns at a time is
 * transposed and widened into W (kc rows of mp doubles, row k holding column js + k of every
 * row of V; its columns m to mp - 1 zero), then
 * gram_tiles (_blocks_impl.h) adds W^T W's register tiles, reading W from the core's cache.
 * No float64 copy of V is written to memory: a piece widened there and given to dsyrk cost
 * the set-up 20-25 % over the BLAS floor (benchmarks/RESULTS.md). While a chunk's eight rows
 * are transposed, their next chunk is fetched into L2 (the m rows are m streams, more than the
 * hardware's prefetchers follow). With `trans`, V is Fortran-ordered and passed as its
 * transpose (ld = m items a row, its row j V's column j): a chunk of W is its rows, widened.
 * Every item goes through the loads of the passes (exact conversions).
 *
 * The sums go in levels, as a blocked BLAS's do: each chunk's from zero (at most kc terms),
 * then the chunks' sums in levels of LEVEL_SPAN (levels_carry, _passes.c; Sp holds them) into
 * A. An entry's rounding then grows with kc and LEVEL_SPAN a level, not with the columns: one
 * running sum over the columns, whose roundings lean one way for products of one sign and size
 * (float32 gradients with a shared mean, and every diagonal entry), left an entry 15600
 * eps(float64) of its terms' sum off at d = 2e5 (now 21, dsyrk 37) and a float32 product 85
 * eps(float32) off at kappa = 1e6 (tests/test_setup_gram.py). The levels cost nothing
 * measurable (m = 64, d = 1e6: 118 ms).
 */
ISA_ATTR static void NAME(gram_tiles)(const double *W, Py_ssize_t rows, Py_ssize_t p,
                                      Py_ssize_t s, double *A, int first);

/* A chunk's tiles (w rows of W) into level 0 of Sp, and the levels on. A level is mp x mp:
   the tiles' rows run past m to a whole tile (zero sums), and entries outside the tiles stay
   zero. */
ISA_ATTR static void NAME(rows_gram_chunk)(const double *W, Py_ssize_t w, Py_ssize_t mp,
                                           Py_ssize_t m, double *Sp, double *A, int *count)
{
    NAME(gram_tiles)(W, w, mp, m, Sp, count[0] == 0);
    levels_carry(Sp, count, mp * mp, A, 0);
}

#define ROWS_GRAM_FN(SUFFIX, S, VT, MT, LOAD8, LOAD1, WIDEN8, VEC)                          \
    ISA_ATTR static void NAME(rows_gram64_##SUFFIX)(                                        \
        const void *Vp, Py_ssize_t ld, Py_ssize_t m, Py_ssize_t j0, Py_ssize_t j1,          \
        Py_ssize_t kc, Py_ssize_t mp, int trans, double *W, double *Sp, double *A)          \
    {                                                                                       \
        const S *V = Vp;                                                                    \
        int count[LEVELS] = {0};                                                            \
        for (Py_ssize_t js = j0; js < j1; js += kc) {                                       \
            const Py_ssize_t w = js + kc < j1 ? kc : j1 - js;                               \
            if (trans) {                                                                    \
                for (Py_ssize_t k = 0; k < w; k++) {                                        \
                    const S *v = V + (js + k) * ld;                                         \
                    double *d = W + k * mp;                                                 \
                    Py_ssize_t i = 0;                                                       \
                    for (; i + VBYTES / 4 <= m; i += VBYTES / 4)                            \
                        VEC(v + i, d + i);                                                  \
                    for (; i < m; i++)                                                      \
                        d[i] = LOAD1(v + i);                                                \
                }                                                                           \
                NAME(rows_gram_chunk)(W, w, mp, m, Sp, A, count);                        \
                continue;                                                                   \
            }                                                                               \
            const Py_ssize_t next = j1 - (js + w) < kc ? j1 - (js + w) : kc;                \
            Py_ssize_t c = 0;                                                               \
            for (; c + 8 <= m; c += 8) {                                                    \
                const S *p = V + c * ld + js;                                               \
                for (int q = 0; q < 8; q++)                                                 \
                    for (Py_ssize_t b = 0; b < next * (Py_ssize_t)sizeof(S); b += 64)       \
                        __builtin_prefetch((const char *)(p + q * ld + w) + b, 0, 2);       \
                Py_ssize_t k = 0;                                                           \
                for (; k + 8 <= w; k += 8) {                                                \
                    VT o[8];                                                                \
                    T8_BLOCK(VT, MT, LOAD8, p + k, ld, o);                                  \
                    for (int q = 0; q < 8; q++)                                             \
                        WIDEN8(o[q], W + (k + q) * mp + c);                                 \
                }                                                                           \
                for (; k < w; k++)                                                          \
                    for (int q = 0; q < 8; q++)                                             \
                        W[k * mp + c + q] = LOAD1(p + q * ld + k);                          \
            }                                                                               \
            for (; c < m; c++)                                                              \
                for (Py_ssize_t k = 0; k < w; k++)                                          \
                    W[k * mp + c] = LOAD1(V + c * ld + js + k);                             \
            NAME(rows_gram_chunk)(W, w, mp, m, Sp, A, count);                            \
        }                                                                                   \
        levels_carry(Sp, count, mp * mp, A, 1);                                             \
    }

/* Eight float32 (or float64) items of a transposed row to eight doubles at q. */
#define WIDEN8_F32(o, q)                                                                    \
    (*(NAME(t8d) *)(q) =                                                                    \
         (NAME(t8d)){(o)[0], (o)[1], (o)[2], (o)[3], (o)[4], (o)[5], (o)[6], (o)[7]})
#define WIDEN8_F64(o, q) (*(NAME(t8d) *)(q) = (o))

ROWS_GRAM_FN(f32, float, NAME(t8f), NAME(t8i), T8_LOAD_F32, LOAD1_F32, WIDEN8_F32,
             WIDEN64_VEC_F32)
ROWS_GRAM_FN(f64, double, NAME(t8d), NAME(t8l), T8_LOAD_F64, LOAD1_F64, WIDEN8_F64,
             WIDEN64_VEC_F64)
ROWS_GRAM_FN(f16, uint16_t, NAME(t8f), NAME(t8i), T8_LOAD_F16, LOAD1_F16, WIDEN8_F32,
             WIDEN64_VEC_F16)
ROWS_GRAM_FN(bf16, uint16_t, NAME(t8f), NAME(t8i), T8_LOAD_BF16, LOAD1_BF16, WIDEN8_F32,
             WIDEN64_VEC_BF16)

/*
 * One vector (kk = 1, a product's two passes) over Gt in place, no tile: the transposes of the
 * kernels above did not overlap their arithmetic on one core (a product over a Fortran-ordered
 * float32 G, m = 64, d = 1e6: 1.8-1.9x the float32 two-pass floor, against 1.05x C-ordered;
 * 0.75-0.9x with these, one Zen 4 core). Gt's rows are read in order, one stream, as they lie
 * in memory. Every product and sum is in float64, the result rounded once; the sums go in
 * another order than the C-ordered kernels' (not their bits: float64 sums of the same terms).
 *
 * project1t: y_i = sum_j Gt[j, i] x_j as y += x_j Gt[j, :], row after row: up to 4 vf-wide
 * pieces of y (8 vd of sums) in registers, more in L1 (the sums loaded and stored at each row:
 * blocks of 4 pieces in registers, each block over a 16 KiB tile of rows re-read from L1, read
 * G's rows at half the speed of a GEMV at m = 256, float32, AVX-512: the first block's reads,
 * a few lines of each row, were not fetched ahead), and the last m % (2 lanes) items one by
 * one. Each item's sum runs over the columns of one run of RUN1T (from j0) in order, as many
 * terms as a lane of project64 sums in a run, and the runs' sums go to level 0 of lv
 * (levels_carry, _passes.c): the result depends on j0 and j1, never on the threads.
 *
 * Both serve m whose last m % (2 lanes) items, one by one, are at most an eighth of the others
 * (direct1t), and where items are left, whole vectors of 256 bytes a row (project1t_serves) or
 * 128 (combine1t_serves); else the tiles. Float32, AVX-512, one Zen 4 core, d = 1e6, against the tiles:
 * 1.5-1.9x faster at m = 64, 70, 72 and 80, 2.4x slower (combine1t 1.3x) at m = 24, 1.0-1.3x
 * slower at m = 13 (every item one by one).
 *
 * combine1t: y_j = a x_j + sum_i C_i Gt[j, i], 8 rows of Gt at a time, each row in turn
 * (memory order: the 8 rows' pieces interleaved in the loop over i took 1.2x a float32 GEMV^T's
 * time, in turn 0.9x) into two vd of sums, one per half of its vf-wide pieces, added; C's items are
 * loaded from a contiguous copy in L1. The last m % (2 lanes) items go one by one, the 8 rows'
 * lanes are added in a tree of shuffles (C1T_REDUCE) to 8 / lanes vd of the rows' sums, then
 * a x_j is added and the result rounded once. A row's sum never depends on the rows around it:
 * a last group of fewer than 8 rows repeats its last row (and x), so that it takes the same
 * operations (its overflow too), and stores only its own rows.
 */

/* Whether project1t and combine1t serve m items a row (see above). */
ISA_ATTR static inline int NAME(direct1t)(Py_ssize_t m)
{
    const Py_ssize_t last = m % (VBYTES / 4);
    return last * 8 <= m - last && m >= VBYTES / 4;
}

/* Whether project1t serves m items of `size` bytes a row, besides direct1t: its last items go in
   a second pass over the chunk's rows, a chain of dependent adds a row, which costs as much as
   a row of whole vectors below about 256 bytes. One Zen 4 core, d x m = 1.6e7 or 3.2e7, against
   the tiles: float32 m = 17, 18 1.7x (AVX-512) and 1.9x (AVX2) slower, m = 33-35 1.2-1.5x, AVX2
   m = 9 2.5x, 49 1.1x; bfloat16 (AVX2) m = 33-70 1.1-1.6x; faster from 256 bytes (float32
   m = 70, 100, 130: 0.6-0.7x; bfloat16 m = 130: 0.63x) and with no items left (m = 16-256). */
ISA_ATTR static inline int NAME(project1t_serves)(Py_ssize_t m, Py_ssize_t size)
{
    const Py_ssize_t last = m % (VBYTES / 4);
    return last == 0 || (m - last) * size >= 256;
}

/* Whether combine1t serves m items of `size` bytes a row, besides direct1t: its last items go
   one by one, 8 rows' worth a group (2-byte items each converted alone), which costs more than
   the tiles below about 128 bytes of whole vectors a row. One Zen 4 core, against the tiles:
   bfloat16 m = 17, 18 1.4x slower (AVX-512), m = 33-49 1.05-1.1x (AVX2, AVX-512); float32 and
   m = 66, 70 (bfloat16) within 0.8-1.05x. */
ISA_ATTR static inline int NAME(combine1t_serves)(Py_ssize_t m, Py_ssize_t size)
{
    const Py_ssize_t last = m % (VBYTES / 4);
    return last == 0 || (m - last) * size >= 128;
}

/* lo, hi: the float64 values of the VBYTES / 4 items at p (one vf of float32). */
#define LOAD2_F32(p, lo, hi)                                                                \
    do {                                                                                    \
        lo = LOADV_F32(p);                                                                  \
        hi = LOADV_F32((p) + VBYTES / 8);                                                   \
    } while (0)
#define LOAD2_F64(p, lo, hi)                                                                \
    do {                                                                                    \
        lo = LOADV_F64(p);                                                                  \
        hi = LOADV_F64((p) + VBYTES / 8);                                                   \
    } while (0)
#define LOAD2_STAGED(STAGE, p, lo, hi)                                                      \
    do {                                                                                    \
        float f_[VBYTES / 4] __attribute__((aligned(VBYTES)));                              \
        NAME(STAGE)(p, f_);                                                                 \
        lo = LOADV_F32(f_);                                                                 \
        hi = LOADV_F32(f_ + VBYTES / 8);                                                    \
    } while (0)
#define LOAD2_F16(p, lo, hi) LOAD2_STAGED(stage_f16_vec, p, lo, hi)
#define LOAD2_BF16(p, lo, hi) LOAD2_STAGED(stage_bf16_vec, p, lo, hi)

/* The first NP vf-wide pieces of the sums (NP <= 4: 8 vd, in registers) over the chunk's rows. */
#define PROJECT1T_BLOCK(LOAD2, NP)                                                          \
    do {                                                                                    \
        NAME(vd) acc[2 * (NP)];                                                             \
        for (int u = 0; u < 2 * (NP); u++)                                                  \
            acc[u] = (NAME(vd)){0};                                                         \
        const S *row = V + jc * ldt;                                                        \
        for (Py_ssize_t j = jc; j < je; j++, row += ldt) {                                  \
            const double xj = (double)X[j];                                                 \
            for (int p = 0; p < (NP); p++) {                                                \
                NAME(vd) lo, hi;                                                            \
                LOAD2(row + p * 2 * lanes, lo, hi);                                         \
                acc[2 * p] += xj * lo;                                                      \
                acc[2 * p + 1] += xj * hi;                                                  \
            }                                                                               \
        }                                                                                   \
        for (int u = 0; u < 2 * (NP); u++)                                                  \
            *(NAME(vd) *)(sums + u * lanes) = acc[u];                                       \
    } while (0)

#define PROJECT1T_FN(SUFFIX, ST, LOAD1, LOAD2, XSUFFIX, XT)                                 \
    ISA_ATTR static void NAME(project1t_##SUFFIX##_##XSUFFIX)(                              \
        const ST *V, Py_ssize_t ldt, Py_ssize_t m, const XT *X, double *Y, Py_ssize_t j0,   \
        Py_ssize_t j1, double *sums, double *lv)                                            \
    {                                                                                       \
        typedef ST S;                                                                       \
        const int lanes = VBYTES / 8;                                                       \
        const Py_ssize_t step = 2 * lanes, mv = m / step * step;                            \
        int count[LEVELS] = {0};                                                            \
        for (Py_ssize_t i = 0; i < m; i++)                                                  \
            Y[i] = 0.0;                                                                     \
        double *const L = levels_start(lv, m, Y, j1 - j0 <= RUN1T);                         \
        for (Py_ssize_t jc = j0; jc < j1; jc += RUN1T) {                                    \
            const Py_ssize_t je = jc + RUN1T < j1 ? jc + RUN1T : j1;                        \
            for (Py_ssize_t i = 0; i < m; i++)                                              \
                sums[i] = 0.0;                                                              \
            const Py_ssize_t np = mv / step;                                                \
            if (np > 4) {                                                                   \
                const S *row = V + jc * ldt;                                                \
                for (Py_ssize_t j = jc; j < je; j++, row += ldt) {                          \
                    const double xj = (double)X[j];                                         \
                    for (Py_ssize_t i = 0; i < mv; i += step) {                             \
                        NAME(vd) lo, hi;                                                    \
                        LOAD2(row + i, lo, hi);                                             \
                        *(NAME(vd) *)(sums + i) += xj * lo;                                 \
                        *(NAME(vd) *)(sums + i + lanes) += xj * hi;                         \
                    }                                                                       \
                }                                                                           \
            } else if (np == 4)                                                             \
                PROJECT1T_BLOCK(LOAD2, 4);                                                  \
            else if (np == 3)                                                               \
                PROJECT1T_BLOCK(LOAD2, 3);                                                  \
            else if (np == 2)                                                               \
                PROJECT1T_BLOCK(LOAD2, 2);                                                  \
            else if (np == 1)                                                               \
                PROJECT1T_BLOCK(LOAD2, 1);                                                  \
            for (Py_ssize_t j = jc; j < je && mv < m; j++) {                                \
                const double xj = (double)X[j];                                             \
                for (Py_ssize_t i = mv; i < m; i++)                                         \
                    sums[i] += LOAD1(V + j * ldt + i) * xj;                                 \
            }                                                                               \
            for (Py_ssize_t i = 0; i < m; i++)                                              \
                L[i] += sums[i];                                                            \
            levels_carry(L, count, m, Y, 0);                                                \
        }                                                                                   \
        levels_carry(L, count, m, Y, 1);                                                    \
    }
#define PROJECT1T_FNS(SUFFIX, S, LOAD1, LOAD2)                                              \
    PROJECT1T_FN(SUFFIX, S, LOAD1, LOAD2, x32, float)                                       \
    PROJECT1T_FN(SUFFIX, S, LOAD1, LOAD2, x64, double)

PROJECT1T_FNS(f32, float, LOAD1_F32, LOAD2_F32)
PROJECT1T_FNS(f64, double, LOAD1_F64, LOAD2_F64)
PROJECT1T_FNS(f16, uint16_t, LOAD1_F16, LOAD2_F16)
PROJECT1T_FNS(bf16, uint16_t, LOAD1_BF16, LOAD2_BF16)

/* Even and odd lanes of two vd side by side: their sum adds each vd's neighbouring lanes. */
typedef int64_t NAME(vl) __attribute__((vector_size(VBYTES)));
#if VBYTES == 64
#define C1T_EVENS {0, 2, 4, 6, 8, 10, 12, 14}
#define C1T_ODDS {1, 3, 5, 7, 9, 11, 13, 15}
#elif VBYTES == 32
#define C1T_EVENS {0, 2, 4, 6}
#define C1T_ODDS {1, 3, 5, 7}
#else
#define C1T_EVENS {0, 2}
#define C1T_ODDS {1, 3}
#endif
/* v[0..7] (one vd of sums per row) to v[0..8 / lanes - 1], the rows' sums in row order: each
   round adds neighbouring lanes of two vd, halving the vd (8 -> 4 -> 2 -> 1 with 8 lanes). */
#define C1T_REDUCE(v)                                                                       \
    do {                                                                                    \
        int cnt_ = 8;                                                                       \
        for (int w_ = lanes; w_ > 1; w_ /= 2, cnt_ /= 2)                                    \
            for (int q = 0; q < cnt_ / 2; q++)                                              \
                v[q] = __builtin_shuffle(v[2 * q], v[2 * q + 1], (NAME(vl))C1T_EVENS)       \
                       + __builtin_shuffle(v[2 * q], v[2 * q + 1], (NAME(vl))C1T_ODDS);     \
    } while (0)

/* The group of 8 rows from row j: nr of them (FULL: 8, known at compile time) stored. */
#define COMBINE1T_GROUP(LOAD1, LOAD2, FULL, NR)                                             \
    do {                                                                                    \
        const int nr = (NR);                                                                \
        const ST *rw[8];                                                                    \
        for (int r = 0; r < 8; r++)                                                         \
            rw[r] = V + (j + ((FULL) || r < nr ? r : nr - 1)) * ldt;                        \
        NAME(vd) v[8];                                                                      \
        for (int r = 0; r < 8; r++)                                                         \
            v[r] = (NAME(vd)){0};                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < 8; r++) {                               \
            NAME(vd) vhi = {0};                                                             \
            for (Py_ssize_t i = 0; i < mv; i += step) {                                     \
                NAME(vd) lo, hi;                                                            \
                LOAD2(rw[r] + i, lo, hi);                                                   \
                v[r] += lo * LOADV_F64(c1 + i);                                             \
                vhi += hi * LOADV_F64(c1 + i + lanes);                                      \
            }                                                                               \
            v[r] += vhi;                                                                    \
        }                                                                                   \
        C1T_REDUCE(v);                                                                      \
        if (mv < m) {                                                                       \
            double tail[8] __attribute__((aligned(64)));                                    \
            for (int r = 0; r < 8; r++) {                                                   \
                double t = 0.0;                                                             \
                for (Py_ssize_t i = mv; i < m; i++)                                         \
                    t += c1[i] * LOAD1(rw[r] + i);                                          \
                tail[r] = t;                                                                \
            }                                                                               \
            for (int q = 0; q < 8 / lanes; q++)                                             \
                v[q] += LOADV_F64(tail + q * lanes);                                        \
        }                                                                                   \
        /* x_j of the group's rows as float64 (exactly), the last row's again past nr. */   \
        double xl[8] __attribute__((aligned(64)));                                          \
        if (!(FULL))                                                                        \
            for (int r = 0; r < 8; r++) {                                                   \
                const Py_ssize_t jj = j + (r < nr ? r : nr - 1);                            \
                xl[r] = x64 ? xd[jj] : (double)xf[jj];                                      \
            }                                                                               \
        double yl[8] __attribute__((aligned(64)));                                          \
        float yh[8] __attribute__((aligned(32)));                                           \
        for (int q = 0; q < 8 / lanes; q++) {                                               \
            const Py_ssize_t jq = j + q * lanes;                                            \
            const NAME(vd) xv = !(FULL) ? LOADV_F64(xl + q * lanes)                         \
                                : x64   ? LOADV_F64(xd + jq)                                \
                                        : LOADV_F32(xf + jq);                               \
            const NAME(vd) y = v[q] + a0 * xv;                                              \
            if (out64)                                                                      \
                *(NAME(vd) *)((FULL) ? yd + jq : yl + q * lanes) = y;                       \
            else                                                                            \
                *(NAME(vh) *)((FULL) ? yf + jq : yh + q * lanes) =                          \
                    __builtin_convertvector(y, NAME(vh));                                   \
        }                                                                                   \
        for (int r = 0; r < ((FULL) ? 0 : nr); r++)                                         \
            if (out64)                                                                      \
                yd[j + r] = yl[r];                                                          \
            else                                                                            \
                yf[j + r] = yh[r];                                                          \
    } while (0)

#define COMBINE1T_FN(SUFFIX, ST_, LOAD1, LOAD2)                                             \
    ISA_ATTR static void NAME(combine1t_##SUFFIX)(                                          \
        const ST_ *V, Py_ssize_t ldt, Py_ssize_t m, const double *Ct, double a0,            \
        const void *Xp, int x64, void *Yp, int out64, Py_ssize_t j0, Py_ssize_t j1,         \
        double *c1)                                                                         \
    {                                                                                       \
        typedef ST_ ST;                                                                     \
        const int lanes = VBYTES / 8;                                                       \
        const Py_ssize_t step = 2 * lanes, mv = m / step * step;                            \
        const double *xd = Xp;                                                              \
        const float *xf = Xp;                                                               \
        double *yd = Yp;                                                                    \
        float *yf = Yp;                                                                     \
        for (Py_ssize_t i = 0; i < m; i++)                                                  \
            c1[i] = Ct[8 * i];                                                              \
        Py_ssize_t j = j0;                                                                  \
        for (; j + 8 <= j1; j += 8)                                                         \
            COMBINE1T_GROUP(LOAD1, LOAD2, 1, 8);                                            \
        if (j < j1)                                                                         \
            COMBINE1T_GROUP(LOAD1, LOAD2, 0, (int)(j1 - j));                                \
    }

COMBINE1T_FN(f32, float, LOAD1_F32, LOAD2_F32)
COMBINE1T_FN(f64, double, LOAD1_F64, LOAD2_F64)
COMBINE1T_FN(f16, uint16_t, LOAD1_F16, LOAD2_F16)
COMBINE1T_FN(bf16, uint16_t, LOAD1_BF16, LOAD2_BF16)
/*
 * project64t: project64 over Gt. The columns go in the chunks and runs of project64 (CHUNK64
 * from j0, RUN64 from the chunk's start), each run in tiles of SUBT columns, all m rows at
 * once; every row's vectors of sums wait in sums_raw (m x 8 vd) from tile to tile, and take
 * the same FMAs in the same order as in project64's registers (a row's sums depend on its own
 * items only, whatever its panel). At a run's end they are added to the chunk's (the next m x
 * 8 vd of sums_raw), and at the chunk's end added up lane by lane, the last columns one by
 * one, and added to level 0 of lv, as project64 does: the same bits.
 */
#define PROJECT64T_PANELS(T, LOADT, LOADX, NVMAX, R)                                        \
    for (Py_ssize_t i0 = 0; i0 < m;) {                                                      \
        NAME(vd)(*sums)[8] = all + i0;                                                      \
        const T *src = tile + i0 * sld;                                                     \
        if (i0 + (R) <= m) {                                                                \
            PROJECT64_GROUPS(T, LOADT, LOADX, NVMAX, R)                                     \
            i0 += (R);                                                                      \
        } else {                                                                            \
            PROJECT64_GROUPS(T, LOADT, LOADX, NVMAX, 1)                                     \
            i0 += 1;                                                                        \
        }                                                                                   \
    }

#define PROJECT64T_FN(SUFFIX, S, LOAD1, T, LOADT, XSUFFIX, XT, LOADX)                       \
    ISA_ATTR static void NAME(project64t_##SUFFIX##_##XSUFFIX)(                             \
        const void *Vp, Py_ssize_t ldt, Py_ssize_t m, const void *Xp, Py_ssize_t ldx, int kk, \
        double *Y, Py_ssize_t j0, Py_ssize_t j1, void *tile_raw, void *sums_raw, double *lv) \
    {                                                                                       \
        const S *V = Vp;                                                                    \
        const XT *X = Xp;                                                                   \
        if (kk == 1 && NAME(direct1t)(m) && NAME(project1t_serves)(m, sizeof(S))) {         \
            NAME(project1t_##SUFFIX##_##XSUFFIX)(V, ldt, m, X, Y, j0, j1, sums_raw, lv);    \
            return;                                                                         \
        }                                                                                   \
        const int lanes = VBYTES / 8;                                                       \
        T *tile = tile_raw;                                                                 \
        NAME(vd)(*all)[8] = sums_raw;                                                       \
        NAME(vd)(*folds)[8] = all + m;                                                      \
        const Py_ssize_t sld = SUBT;                                                        \
        int count[LEVELS] = {0};                                                            \
        for (Py_ssize_t i = 0; i < kk * m; i++)                                             \
            Y[i] = 0.0;                                                                     \
        double *const L = levels_start(lv, kk * m, Y, j1 - j0 <= CHUNK64);                 \
        for (Py_ssize_t jc = j0; jc < j1; jc += CHUNK64) {                                  \
            const Py_ssize_t je = jc + CHUNK64 < j1 ? jc + CHUNK64 : j1;                    \
            const Py_ssize_t jt = jc + ((je - jc) / (2 * lanes)) * (2 * lanes);             \
            const int runs = jt - jc > RUN64; /* else the chunk's sums are its run's */     \
            for (Py_ssize_t i = 0; i < m; i++)                                              \
                for (int v = 0; v < kk; v++)                                                \
                    all[i][v] = (NAME(vd)){0};                                              \
            for (Py_ssize_t i = 0; i < m && runs; i++)                                      \
                for (int v = 0; v < kk; v++)                                                \
                    folds[i][v] = (NAME(vd)){0};                                            \
            for (Py_ssize_t jr = jc; jr < jt; jr += RUN64) {                                \
                const Py_ssize_t jre = jr + RUN64 < jt ? jr + RUN64 : jt;                   \
                for (Py_ssize_t i = 0; i < m && jr > jc; i++) /* each run from zero */     \
                    for (int v = 0; v < kk; v++)                                            \
                        all[i][v] = (NAME(vd)){0};                                          \
                for (Py_ssize_t js = jr; js < jre; js += SUBT) {                            \
                    const Py_ssize_t jse = js + SUBT < jre ? js + SUBT : jre;               \
                    const Py_ssize_t joff = js;                                             \
                    NAME(transpose_##SUFFIX)(V + js * ldt, ldt, m, jse - js, tile, SUBT);   \
                    if (kk == 1) {                                                          \
                        PROJECT64T_PANELS(T, LOADT, LOADX, 1, 8)                            \
                    } else if (kk == 2 && ACC64 == 16) {                                    \
                        PROJECT64T_PANELS(T, LOADT, LOADX, 2, 8)                            \
                    } else {                                                                \
                        PROJECT64T_PANELS(T, LOADT, LOADX, ACC64 / 4, 4)                    \
                    }                                                                       \
                }                                                                           \
                for (Py_ssize_t i = 0; i < m && runs; i++)                                  \
                    for (int v = 0; v < kk; v++)                                            \
                        folds[i][v] += all[i][v];                                           \
            }                                                                               \
            NAME(vd)(*const tot)[8] = runs ? folds : all;                                   \
            for (Py_ssize_t i = 0; i < m; i++)                                              \
                for (int v = 0; v < kk; v++) {                                              \
                    double s = 0.0;                                                         \
                    for (int l = 0; l < lanes; l++)                                         \
                        s += tot[i][v][l];                                                  \
                    for (Py_ssize_t j = jt; j < je; j++)                                    \
                        s += LOAD1(V + j * ldt + i) * (double)X[v * ldx + j];               \
                    L[v * m + i] += s;                                                      \
                }                                                                           \
            levels_carry(L, count, kk * m, Y, 0);                                           \
        }                                                                                   \
        levels_carry(L, count, kk * m, Y, 1);                                               \
    }
#define PROJECT64T_FNS(SUFFIX, S, LOAD1, T, LOADT)                                          \
    PROJECT64T_FN(SUFFIX, S, LOAD1, T, LOADT, x32, float, LOADV_F32)                        \
    PROJECT64T_FN(SUFFIX, S, LOAD1, T, LOADT, x64, double, LOADV_F64)

PROJECT64T_FNS(f32, float, LOAD1_F32, float, LOADV_F32)
PROJECT64T_FNS(f64, double, LOAD1_F64, double, LOADV_F64)
PROJECT64T_FNS(f16, uint16_t, LOAD1_F16, float, LOADV_F32)
PROJECT64T_FNS(bf16, uint16_t, LOAD1_BF16, float, LOADV_F32)

/*
 * combine64t: combine64 over Gt, a tile of TW64 columns at a time, each tile through combine64's
 * kernels for float32 rows (float64 rows: float64's). Every column's sum is its own (the m
 * terms in the order of i from zero, a[k] x added last), the same whatever the columns around
 * it, and 2-byte items widened to float32 are what the staging gives those kernels: the
 * results are combine64's bits.
 */
#define COMBINE64T_FN(SUFFIX, S, T, INNER)                                                  \
    ISA_ATTR static void NAME(combine64t_##SUFFIX)(                                         \
        const void *Vp, Py_ssize_t ldt, Py_ssize_t m, const double *Ct, int kk,             \
        const double *a, const void *Xp, Py_ssize_t ldx, int x64, void *Yp, Py_ssize_t ldy, \
        int out64, Py_ssize_t j0, Py_ssize_t j1, double *acc_buf, float *sbuf, void *tile_raw) \
    {                                                                                       \
        const S *V = Vp;                                                                    \
        if (kk == 1 && NAME(direct1t)(m) && NAME(combine1t_serves)(m, sizeof(S))) {         \
            NAME(combine1t_##SUFFIX)(V, ldt, m, Ct, a[0], Xp, x64, Yp, out64, j0, j1,       \
                                     tile_raw);                                             \
            return;                                                                         \
        }                                                                                   \
        T *tile = tile_raw;                                                                 \
        const Py_ssize_t xs = x64 ? 8 : 4, ys = out64 ? 8 : 4, tld = TLD64(sizeof(T));      \
        for (Py_ssize_t js = j0; js < j1; js += TW64) {                                     \
            const Py_ssize_t w = js + TW64 < j1 ? TW64 : j1 - js;                           \
            NAME(transpose_##SUFFIX)(V + js * ldt, ldt, m, w, tile, tld);                   \
            NAME(INNER)(tile, tld, m, Ct, kk, a, (const char *)Xp + js * xs, ldx, x64,      \
                        (char *)Yp + js * ys, ldy, out64, 0, w, acc_buf, sbuf);             \
        }                                                                                   \
    }

COMBINE64T_FN(f32, float, float, combine64_f32)
COMBINE64T_FN(f64, double, double, combine64_f64)
COMBINE64T_FN(f16, uint16_t, float, combine64_f32)
COMBINE64T_FN(bf16, uint16_t, float, combine64_f32)

/* widen64t: widen64 over Gt (D row i at D + i ldd gets G's row i, columns j0 <= j < j1), a tile
   at a time: the values of widen64, the same bits. */
#define WIDEN64T_FN(SUFFIX, S, T)                                                           \
    ISA_ATTR static void NAME(widen64t_##SUFFIX)(const void *Vp, Py_ssize_t ldt, Py_ssize_t m, \
                                                 double *D, Py_ssize_t ldd, Py_ssize_t j0,  \
                                                 Py_ssize_t j1, void *tile_raw)             \
    {                                                                                       \
        const S *V = Vp;                                                                    \
        T *tile = tile_raw;                                                                 \
        const Py_ssize_t tld = TLD64(sizeof(T));                                            \
        for (Py_ssize_t js = j0; js < j1; js += TW64) {                                     \
            const Py_ssize_t w = js + TW64 < j1 ? TW64 : j1 - js;                           \
            NAME(transpose_##SUFFIX)(V + js * ldt, ldt, m, w, tile, tld);                   \
            for (Py_ssize_t i = 0; i < m; i++) {                                            \
                const T *t = tile + i * tld;                                                \
                double *d = D + i * ldd + js;                                               \
                for (Py_ssize_t c = 0; c < w; c++)                                          \
                    d[c] = (double)t[c];                                                    \
            }                                                                               \
        }                                                                                   \
    }

WIDEN64T_FN(f32, float, float)
WIDEN64T_FN(f64, double, double)
WIDEN64T_FN(f16, uint16_t, float)
WIDEN64T_FN(bf16, uint16_t, float)

#undef LANES_D
#undef LANES_D_HI
#undef LANES_F
#undef LOADV_F32
#undef LOADV_F64
#undef LOAD1_F32
#undef LOAD1_F64
#undef LOAD1_F16
#undef LOAD1_BF16
#undef DIRECT
#undef STAGED
#undef CHUNK64
#undef RUN64
#undef ACC64
#undef PROJECT64_PANEL
#undef PROJECT64_GROUPS
#undef PROJECT64_ROWS
#undef PROJECT64_PANELS
#undef PROJECT64_BODY
#undef PROJECT64_FN
#undef PROJECT64_FNS
#undef COMBINE64_TILE
#undef COMBINE64_SUMS_IN
#undef COMBINE64_SUMS_OUT
#undef COMBINE64_LAST_COLUMNS
#undef COMBINE64_ONE_BODY
#undef COMBINE64_ONE_DIRECT
#undef COMBINE64_ONE_STAGED
#undef C1_U16
#undef C64_NKR
#undef C64_TILE
#undef C64_FETCH_NEXT
#undef C64_GROUPS
#undef C64_PANEL
#undef C64_CASES_WIDE
#undef COMBINE64_ROWS_BODY
#undef COMBINE64_FN
#undef WIDEN64_FN
#undef WIDEN64_VEC_F32
#undef WIDEN64_VEC_F64
#undef WIDEN64_VEC_STAGED
#undef WIDEN64_VEC_F16
#undef WIDEN64_VEC_BF16
#undef T8_LOAD_F32
#undef T8_LOAD_F64
#undef T8_LOAD_BF16
#undef T8_LOAD_F16
#undef T8_TRANSPOSE
#undef T8_BLOCK
#undef TRANSPOSE_FN
#undef ROWS_GRAM_FN
#undef WIDEN8_F32
#undef WIDEN8_F64
#undef PROJECT64T_PANELS
#undef PROJECT64T_FN
#undef PROJECT64T_FNS
#undef COMBINE64T_FN
#undef LOAD2_F32
#undef LOAD2_F64
#undef LOAD2_STAGED
#undef LOAD2_F16
#undef LOAD2_BF16
#undef PROJECT1T_BLOCK
#undef PROJECT1T_FN
#undef PROJECT1T_FNS
#undef C1T_EVENS
#undef C1T_ODDS
#undef C1T_REDUCE
#undef COMBINE1T_GROUP
#undef COMBINE1T_FN
#undef WIDEN64T_FN
/* NAME, PASTE and ISA_ATTR stay defined for _blocks_impl.h, included next, which undefines them. */
