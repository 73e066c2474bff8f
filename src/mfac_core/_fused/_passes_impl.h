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

/*
 * One kernel body per element type T with vector type VT of LANES elements:
 *   Y[k, j] = a[k] x[j] + sum_i Ct[8 i + k] V[i ld + j],  k < kk, j0 <= j < j1,
 * accumulated in T: the m terms are summed first (their partial sums wait in Y between row
 * panels) and a[k] x[j] is added once, after the last panel, as a BLAS product followed by
 * the addition would do. (Starting from a[k] x[j] would round every partial sum at the size
 * of x / damp, which in a sweep is much larger than the sum: about sqrt(m) eps worse.)
 * Ct and a hold 8 dampings (zero-padded past kk).
 */
#define APPLY_BODY(T, VT, LANES)                                                            \
    const Py_ssize_t tile = TILE_VECS * (LANES);                                            \
    const Py_ssize_t chunk = CHUNK_BYTES / (Py_ssize_t)sizeof(T);                           \
    for (Py_ssize_t jc = j0; jc < j1; jc += chunk) {                                        \
        const Py_ssize_t je = jc + chunk < j1 ? jc + chunk : j1;                            \
        const Py_ssize_t jt = jc + ((je - jc) / tile) * tile;                               \
        for (Py_ssize_t i0 = 0; i0 < m; i0 += PANEL_ROWS) {                                 \
            const Py_ssize_t i1 = i0 + PANEL_ROWS < m ? i0 + PANEL_ROWS : m;                \
            for (Py_ssize_t j = jc; j < jt; j += tile) {                                    \
                VT acc[8][TILE_VECS];                                                       \
                for (int k = 0; k < 8; k++)                                                 \
                    for (int u = 0; u < TILE_VECS; u++)                                     \
                        acc[k][u] = i0 > 0 && k < kk                                        \
                                        ? *(const VT *)(Y + k * ldy + j + u * (LANES))      \
                                        : (VT){0};                                          \
                for (Py_ssize_t i = i0; i < i1; i++) {                                      \
                    const T *row = V + i * ld + j;                                          \
                    VT v[TILE_VECS];                                                        \
                    for (int u = 0; u < TILE_VECS; u++)                                     \
                        v[u] = *(const VT *)(row + u * (LANES));                            \
                    for (int k = 0; k < 8; k++) {                                           \
                        const T c = Ct[8 * i + k];                                          \
                        for (int u = 0; u < TILE_VECS; u++)                                 \
                            acc[k][u] += c * v[u];                                          \
                    }                                                                       \
                }                                                                           \
                for (int k = 0; k < kk; k++)                                                \
                    for (int u = 0; u < TILE_VECS; u++) {                                   \
                        if (i1 == m)                                                        \
                            acc[k][u] += a[k] * *(const VT *)(x + j + u * (LANES));         \
                        *(VT *)(Y + k * ldy + j + u * (LANES)) = acc[k][u];                 \
                    }                                                                       \
            }                                                                               \
        }                                                                                   \
        for (Py_ssize_t j = jt; j < je; j++)                                                \
            for (int k = 0; k < kk; k++) {                                                  \
                T s = 0;                                                                    \
                for (Py_ssize_t i = 0; i < m; i++)                                          \
                    s += Ct[8 * i + k] * V[i * ld + j];                                     \
                Y[k * ldy + j] = s + a[k] * x[j];                                           \
            }                                                                               \
    }

ISA_ATTR static void NAME(apply_f32)(const float *V, Py_ssize_t ld, Py_ssize_t m,
                                     const float *Ct, int kk, const float *a, const float *x,
                                     float *Y, Py_ssize_t ldy, Py_ssize_t j0, Py_ssize_t j1)
{
    APPLY_BODY(float, NAME(vf), VBYTES / 4)
}

ISA_ATTR static void NAME(apply_f64)(const double *V, Py_ssize_t ld, Py_ssize_t m,
                                     const double *Ct, int kk, const double *a, const double *x,
                                     double *Y, Py_ssize_t ldy, Py_ssize_t j0, Py_ssize_t j1)
{
    APPLY_BODY(double, NAME(vd), VBYTES / 8)
}

/*
 * D[k, j] = a[k] + sum_i Ht[8 i + k] V[i ld + j]^2,  k < kk, j0 <= j < j1, in float64 whatever
 * V's type (the sum cancels: for F^{-1} it is 1/damp minus nearly as much); the partial sums
 * of a chunk live in acc_buf (8 x DIAG_CHUNK doubles) between row panels. LOAD_VD(p) loads
 * a vd of float64 values from p.
 */
#define DIAG_BODY(T, OUTV, LOAD_VD, STORE_OUT)                                              \
    const Py_ssize_t lanes = VBYTES / 8;                                                    \
    const Py_ssize_t tile = TILE_VECS * lanes;                                              \
    for (Py_ssize_t jc = j0; jc < j1; jc += DIAG_CHUNK) {                                   \
        const Py_ssize_t je = jc + DIAG_CHUNK < j1 ? jc + DIAG_CHUNK : j1;                  \
        const Py_ssize_t jt = jc + ((je - jc) / tile) * tile;                               \
        for (Py_ssize_t i0 = 0; i0 < m; i0 += PANEL_ROWS) {                                 \
            const Py_ssize_t i1 = i0 + PANEL_ROWS < m ? i0 + PANEL_ROWS : m;                \
            const int last = i1 == m;                                                       \
            for (Py_ssize_t j = jc; j < jt; j += tile) {                                    \
                NAME(vd) acc[8][TILE_VECS];                                                 \
                double *buf = acc_buf + (j - jc);                                           \
                for (int k = 0; k < 8; k++)                                                 \
                    for (int u = 0; u < TILE_VECS; u++)                                     \
                        acc[k][u] = i0 == 0 ? (NAME(vd)){0}                                 \
                                            : *(const NAME(vd) *)(buf + k * DIAG_CHUNK      \
                                                                  + u * lanes);             \
                for (Py_ssize_t i = i0; i < i1; i++) {                                      \
                    const T *row = V + i * ld + j;                                          \
                    NAME(vd) s[TILE_VECS];                                                  \
                    for (int u = 0; u < TILE_VECS; u++) {                                   \
                        const NAME(vd) v = LOAD_VD(row + u * lanes);                        \
                        s[u] = v * v;                                                       \
                    }                                                                       \
                    for (int k = 0; k < 8; k++) {                                           \
                        const double h = Ht[8 * i + k];                                     \
                        for (int u = 0; u < TILE_VECS; u++)                                 \
                            acc[k][u] += h * s[u];                                          \
                    }                                                                       \
                }                                                                           \
                for (int k = 0; k < 8; k++)                                                 \
                    for (int u = 0; u < TILE_VECS; u++) {                                   \
                        if (!last)                                                          \
                            *(NAME(vd) *)(buf + k * DIAG_CHUNK + u * lanes) = acc[k][u];    \
                        else if (k < kk)                                                    \
                            STORE_OUT(D + k * ldd + j + u * lanes, a[k] + acc[k][u]);       \
                    }                                                                       \
            }                                                                               \
        }                                                                                   \
        for (Py_ssize_t j = jt; j < je; j++)                                                \
            for (int k = 0; k < kk; k++) {                                                  \
                double s = 0.0;                                                             \
                for (Py_ssize_t i = 0; i < m; i++) {                                        \
                    const double v = (double)V[i * ld + j];                                 \
                    s += Ht[8 * i + k] * (v * v);                                           \
                }                                                                           \
                D[k * ldd + j] = (T)(a[k] + s);                                             \
            }                                                                               \
    }

#define LOAD_F32_AS_VD(p) __builtin_convertvector(*(const NAME(vh) *)(p), NAME(vd))
#define STORE_VD_AS_F32(p, val) (*(NAME(vh) *)(p) = __builtin_convertvector((val), NAME(vh)))
#define LOAD_F64_AS_VD(p) (*(const NAME(vd) *)(p))
#define STORE_VD_AS_F64(p, val) (*(NAME(vd) *)(p) = (val))

ISA_ATTR static void NAME(diag_f32)(const float *V, Py_ssize_t ld, Py_ssize_t m,
                                    const double *Ht, int kk, const double *a, float *D,
                                    Py_ssize_t ldd, Py_ssize_t j0, Py_ssize_t j1, double *acc_buf)
{
    DIAG_BODY(float, NAME(vh), LOAD_F32_AS_VD, STORE_VD_AS_F32)
}

ISA_ATTR static void NAME(diag_f64)(const double *V, Py_ssize_t ld, Py_ssize_t m,
                                    const double *Ht, int kk, const double *a, double *D,
                                    Py_ssize_t ldd, Py_ssize_t j0, Py_ssize_t j1, double *acc_buf)
{
    DIAG_BODY(double, NAME(vd), LOAD_F64_AS_VD, STORE_VD_AS_F64)
}

/*
 * y[i] = sum_j V[i ld + j] x[j] over j0 <= j < j1, for i < m: PANEL_ROWS rows at a time over a
 * chunk of columns, the chunk of x staying in cache for all the panels. Within a chunk the
 * sums run in T's vectors (as a BLAS GEMV's would, at the same speed); each chunk's sums are
 * added in float64, so float32 sums run over at most CHUNK_BYTES / 4 / (vector lanes) terms.
 */
#define PROJECT_BODY(T, VT, LANES)                                                          \
    const Py_ssize_t tile = TILE_VECS * (LANES);                                            \
    const Py_ssize_t chunk = CHUNK_BYTES / (Py_ssize_t)sizeof(T);                           \
    for (Py_ssize_t i = 0; i < m; i++)                                                      \
        y[i] = 0.0;                                                                         \
    for (Py_ssize_t jc = j0; jc < j1; jc += chunk) {                                        \
        const Py_ssize_t je = jc + chunk < j1 ? jc + chunk : j1;                            \
        const Py_ssize_t jt = jc + ((je - jc) / tile) * tile;                               \
        for (Py_ssize_t i0 = 0; i0 < m; i0 += PANEL_ROWS) {                                 \
            const int rows = i0 + PANEL_ROWS < m ? PANEL_ROWS : (int)(m - i0);              \
            VT acc[PANEL_ROWS][TILE_VECS];                                                  \
            for (int r = 0; r < PANEL_ROWS; r++)                                            \
                for (int u = 0; u < TILE_VECS; u++)                                         \
                    acc[r][u] = (VT){0};                                                    \
            for (Py_ssize_t j = jc; j < jt; j += tile) {                                    \
                VT xv[TILE_VECS];                                                           \
                for (int u = 0; u < TILE_VECS; u++)                                         \
                    xv[u] = *(const VT *)(x + j + u * (LANES));                             \
                for (int r = 0; r < PANEL_ROWS; r++)                                        \
                    if (r < rows)                                                           \
                        for (int u = 0; u < TILE_VECS; u++)                                 \
                            acc[r][u] += *(const VT *)(V + (i0 + r) * ld + j + u * (LANES)) \
                                         * xv[u];                                           \
            }                                                                               \
            for (int r = 0; r < rows; r++) {                                                \
                double s = 0.0;                                                             \
                for (int u = 0; u < TILE_VECS; u++)                                         \
                    for (int l = 0; l < (LANES); l++)                                       \
                        s += (double)acc[r][u][l];                                          \
                for (Py_ssize_t j = jt; j < je; j++)                                        \
                    s += (double)V[(i0 + r) * ld + j] * (double)x[j];                       \
                y[i0 + r] += s;                                                             \
            }                                                                               \
        }                                                                                   \
    }

ISA_ATTR static void NAME(project_f32)(const float *V, Py_ssize_t ld, Py_ssize_t m,
                                       const float *x, double *y, Py_ssize_t j0, Py_ssize_t j1)
{
    PROJECT_BODY(float, NAME(vf), VBYTES / 4)
}

ISA_ATTR static void NAME(project_f64)(const double *V, Py_ssize_t ld, Py_ssize_t m,
                                       const double *x, double *y, Py_ssize_t j0, Py_ssize_t j1)
{
    PROJECT_BODY(double, NAME(vd), VBYTES / 8)
}

#undef LOAD_F32_AS_VD
#undef STORE_VD_AS_F32
#undef LOAD_F64_AS_VD
#undef STORE_VD_AS_F64
#undef APPLY_BODY
#undef DIAG_BODY
#undef PROJECT_BODY
#undef ISA_ATTR
#undef NAME
#undef PASTE
#undef PASTE_
