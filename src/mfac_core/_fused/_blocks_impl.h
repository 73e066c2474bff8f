/*
 * The dense blocks' kernels of _passes.c for one instruction set (included once per instruction
 * set after _passes_impl.h, with ISA, ISA_TARGET and VBYTES defined as for it, whose NAME,
 * ISA_ATTR and vector types it uses and whose naming macros it undefines): a block's float64
 * Gram, its Cholesky factor and the factor's inverse, each on the calling thread alone. The
 * set-up of dense blocks (mfac_core._dense_blocks) runs one chunk of blocks per thread of its
 * own; LAPACK's calls at this size (128 x 128) each woke BLAS's threads, and Python threads each
 * calling a threaded BLAS oversubscribed the cores (see that module).
 *
 * Matrices are row-major; a block's factor L is lower triangular (row i holds L[i][0..i]), and
 * its inverse is written over it. Every sum is in float64.
 */

/* Doubles of a vector, and the Gram's register tile: GR rows by two vectors of columns (16 of
   the 32 AVX-512 registers hold sums; 8 of AVX2's 16). BLOCK_PAD (_passes.c) is a multiple of
   GR and of the tile's width. */
#define BV (VBYTES / 8)
#define GR (VBYTES == 64 ? 8 : 4)
#define GTW (2 * BV)
#define RGR (VBYTES == 32 ? 6 : GR)

/*
 * The upper triangle of W^T W (W: `rows` rows of p doubles) in A (row i at A + i p), in register
 * tiles of R rows by GTW columns, i0 and j0 < s (the tiles inside p; W's columns past s zero):
 * written where `first`, else added to A's. Tiles that reach below the diagonal are whole (their
 * lower part is not read). Each tile's sums start from zero and go to A once, after the rows:
 * a sum running from A's value over rows after rows rounds at A's size at every row, and for
 * products of one sign and size (float32 gradients with a shared mean) those roundings lean one
 * way, to an error growing with the rows summed rather than with their square root.
 */
ISA_ATTR static inline __attribute__((always_inline)) void
NAME(gram_tiles_r)(const double *W, Py_ssize_t rows, Py_ssize_t p, Py_ssize_t s, double *A,
                   int first, const int R)
{
    for (Py_ssize_t i0 = 0; i0 < s; i0 += R) {
        for (Py_ssize_t j0 = i0 / GTW * GTW; j0 < s; j0 += GTW) {
            NAME(vd) acc[8][2];
            for (int r = 0; r < R; r++)
                acc[r][0] = acc[r][1] = (NAME(vd)){0};
            const double *w = W;
            for (Py_ssize_t k = 0; k < rows; k++, w += p) {
                const NAME(vd) b0 = *(const NAME(vd) *)(w + j0);
                const NAME(vd) b1 = *(const NAME(vd) *)(w + j0 + BV);
                for (int r = 0; r < R; r++) {
                    const double a = w[i0 + r];
                    acc[r][0] += a * b0;
                    acc[r][1] += a * b1;
                }
            }
            for (int r = 0; r < R; r++) {
                NAME(vd) *a = (NAME(vd) *)(A + (i0 + r) * p + j0); /* a[1]: BV doubles on */
                if (!first) {
                    acc[r][0] += a[0];
                    acc[r][1] += a[1];
                }
                a[0] = acc[r][0];
                a[1] = acc[r][1];
            }
        }
    }
}

/* The rows' Gram of the set-up (rows_gram64, _passes_impl.h): its sums added to A's, in tiles
   of RGR rows. With AVX2, 6 rows (12 sums, 15 of the 16 registers): more multiply-adds in
   flight than the 8 of 4 rows, which one Zen 3 core ran at 0.75 of its peak (m = 128 and 256:
   1.13-1.19x BLAS's dsyrk with 4 rows, 0.89-0.91x with 6; m = 64 alike, 0.93x). */
ISA_ATTR static void NAME(gram_tiles)(const double *W, Py_ssize_t rows, Py_ssize_t p,
                                      Py_ssize_t s, double *A, int first)
{
    NAME(gram_tiles_r)(W, rows, p, s, A, first, RGR);
}

/* The upper triangle of W^T W (W: m rows of p doubles, p a multiple of BLOCK_PAD, the columns
   past the block's s zero) into A (p x p, row i at A + i p): a dense block's Gram. */
ISA_ATTR static void NAME(block_gram)(const double *W, Py_ssize_t m, Py_ssize_t p,
                                        Py_ssize_t s, double *A)
{
    NAME(gram_tiles_r)(W, m, p, s, A, 1, GR);
}

/* y[k] -= c x[k], k < n. */
ISA_ATTR static inline void NAME(block_axpy)(double *y, double c, const double *x, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (; k + BV <= n; k += BV)
        *(NAME(vd) *)(y + k) -= c * *(const NAME(vd) *)(x + k);
    for (; k < n; k++)
        y[k] -= c * x[k];
}

/*
 * Narrow blocks (s <= NARROW_MAX, _passes.c), a group of them at a time: W holds `rows` rows
 * (row k at W + k pw) of the group's ncols <= NARROW_GW columns, s to a block, and the columns
 * past them up to NARROW_GW + s - 1 are readable (their values do not matter). For each offset
 * d < s and column c < ncols, the sum over the rows of W[k][c] W[k][c + d] goes to (first) or is
 * added to Dg[d][c] (row d at Dg + d NARROW_GW): block b's Gram entry (i, i + d) is
 * Dg[d][b s + i] where i + d < s, and the lanes where c + d falls in the next block are not
 * used. A vector of columns takes s multiply-adds a row, where the register tile takes 2 GR
 * for every two vectors of columns of one block (128 a row at s = 1 with AVX-512, for one
 * useful); and the group's columns are widened together, a cache line of G read once where
 * each block read one for its s items (narrow blocks on tall G: a miss a row).
 */
ISA_ATTR static inline __attribute__((always_inline)) void
NAME(narrow_gram_s)(const double *W, Py_ssize_t rows, Py_ssize_t pw, Py_ssize_t ncols,
                    double *Dg, int first, const int S)
{
    /* Vectors of columns at a time: S NV sums and NV columns in registers (32 with AVX-512,
       16 otherwise; the multiply-adds read the shifted columns from L1), none spilled; NV BV
       divides NARROW_GW. */
    const int NV = S <= 2 ? 4 : S <= 4 ? (BV == 8 ? 4 : 2) : S <= 8 && BV == 8 ? 2 : 1;
    for (Py_ssize_t c = 0; c < ncols; c += NV * BV) {
        NAME(vd) acc[NARROW_MAX][4]; /* fixed sizes (no VLA): in registers once unrolled */
        for (int d = 0; d < S; d++)
            for (int v = 0; v < NV; v++)
                acc[d][v] = first ? (NAME(vd)){0}
                                  : *(const NAME(vd) *)(Dg + d * NARROW_GW + c + v * BV);
        const double *w = W + c;
        for (Py_ssize_t k = 0; k < rows; k++, w += pw) {
            NAME(vd) x[4];
            for (int v = 0; v < NV; v++)
                x[v] = *(const NAME(vd) *)(w + v * BV);
            for (int d = 0; d < S; d++)
                for (int v = 0; v < NV; v++)
                    acc[d][v] += x[v] * *(const NAME(vd) *)(w + v * BV + d);
        }
        for (int d = 0; d < S; d++)
            for (int v = 0; v < NV; v++)
                *(NAME(vd) *)(Dg + d * NARROW_GW + c + v * BV) = acc[d][v];
    }
}

/* narrow_gram_s for s (1 <= s <= NARROW_MAX), each s its own code (its sums in registers). */
ISA_ATTR static void NAME(narrow_grams)(const double *W, Py_ssize_t rows, Py_ssize_t pw,
                                         Py_ssize_t ncols, Py_ssize_t s, double *Dg, int first)
{
    switch (s) {
#define NARROW_CASE(S)                                                                       \
    case S:                                                                                  \
        NAME(narrow_gram_s)(W, rows, pw, ncols, Dg, first, S);                               \
        break;
        NARROW_CASE(1) NARROW_CASE(2) NARROW_CASE(3) NARROW_CASE(4) NARROW_CASE(5)
        NARROW_CASE(6) NARROW_CASE(7) NARROW_CASE(8) NARROW_CASE(9) NARROW_CASE(10)
        NARROW_CASE(11) NARROW_CASE(12) NARROW_CASE(13) NARROW_CASE(14) NARROW_CASE(15)
#undef NARROW_CASE
    default:
        break;
    }
}

/*
 * One block's factor from its Gram's upper triangle in A (p x p scratch, row i at A + i p,
 * overwritten): A = scale A, its diagonal to diag (s), then the Cholesky factor U = L^T of A +
 * damp I, right-looking (row j of U: pivot A[j][j] checked positive and finite, U[j][j] its
 * root, the rest of the row divided by it; then every later row i takes U[j][i] times row j
 * from its part right of the diagonal: contiguous rows, no sums across a vector), and L
 * written to out (s x s, row-major, zeros above the diagonal). Returns 0, or -1 where the
 * Gram's diagonal is not finite or a pivot is not positive (out then partly written).
 */
ISA_ATTR static int NAME(block_cholesky)(double *A, Py_ssize_t p, Py_ssize_t s, double scale,
                                           double damp, double *out, double *diag)
{
    for (Py_ssize_t i = 0; i < s; i++) {
        double *a = A + i * p;
        for (Py_ssize_t j = i; j < s; j++)
            a[j] *= scale;
        diag[i] = a[i];
        if (!isfinite(a[i]))
            return -1;
        a[i] += damp;
    }
    for (Py_ssize_t j = 0; j < s; j++) {
        double *u = A + j * p;
        const double pivot = u[j];
        if (!(pivot > 0.0 && pivot <= DBL_MAX))
            return -1;
        u[j] = sqrt(pivot);
        const double inv = 1.0 / u[j];
        for (Py_ssize_t c = j + 1; c < s; c++)
            u[c] *= inv;
        for (Py_ssize_t i = j + 1; i < s; i++)
            NAME(block_axpy)(A + i * p + i, u[i], u + i, s - i);
    }
    for (Py_ssize_t i = 0; i < s; i++) {
        double *o = out + i * s;
        for (Py_ssize_t j = 0; j <= i; j++)
            o[j] = A[j * p + i];
        memset(o + i + 1, 0, (size_t)(s - i - 1) * sizeof(double));
    }
    return 0;
}

/* One block of W (m rows of p doubles, as block_gram): its Gram by block_gram into A (p x p
   scratch), then block_cholesky. */
ISA_ATTR static int NAME(block_factor)(const double *W, Py_ssize_t m, Py_ssize_t p,
                                         Py_ssize_t s, double scale, double damp, double *A,
                                         double *out, double *diag)
{
    NAME(block_gram)(W, m, p, s, A);
    return NAME(block_cholesky)(A, p, s, scale, damp, out, diag);
}

/* The factors of a group's nb narrow blocks from narrow_grams' Dg, block b's to D + b s s and
   its diagonal to diag + b s, each through block_cholesky on its upper triangle (Dg[j - i][b s
   + i] to A's row i, column j; A: s x s scratch). Returns nb, or the first block that failed. */
ISA_ATTR static Py_ssize_t NAME(narrow_factors)(const double *Dg, Py_ssize_t s, Py_ssize_t nb,
                                                 double scale, double damp, double *A,
                                                 double *D, double *diag)
{
    for (Py_ssize_t b = 0; b < nb; b++) {
        for (Py_ssize_t i = 0; i < s; i++)
            for (Py_ssize_t j = i; j < s; j++)
                A[i * s + j] = Dg[(j - i) * NARROW_GW + b * s + i];
        if (NAME(block_cholesky)(A, s, s, scale, damp, D + b * s * s, diag + b * s) < 0)
            return b;
    }
    return nb;
}

/*
 * L (s x s, lower, zeros above the diagonal) replaced by its inverse X, row by row: X[i][:i] =
 * -(L[i][:i] X[:i][:i]) / L[i][i], summed in acc (s doubles) as multiples of the rows of X
 * above, four at a time (their zeros past the diagonal make the lengths equal).
 */
ISA_ATTR static void NAME(block_lower_inverse)(double *L, Py_ssize_t s, double *acc)
{
    for (Py_ssize_t i = 0; i < s; i++) {
        double *row = L + i * s;
        memset(acc, 0, (size_t)s * sizeof(double));
        Py_ssize_t k = 0;
        for (; k + 4 <= i; k += 4) {
            const double c0 = row[k], c1 = row[k + 1], c2 = row[k + 2], c3 = row[k + 3];
            const double *x0 = L + k * s, *x1 = x0 + s, *x2 = x1 + s, *x3 = x2 + s;
            const Py_ssize_t n = k + 4;
            Py_ssize_t j = 0;
            for (; j + BV <= n; j += BV)
                *(NAME(vd) *)(acc + j) += c0 * *(const NAME(vd) *)(x0 + j) +
                                            c1 * *(const NAME(vd) *)(x1 + j) +
                                            c2 * *(const NAME(vd) *)(x2 + j) +
                                            c3 * *(const NAME(vd) *)(x3 + j);
            for (; j < n; j++)
                acc[j] += c0 * x0[j] + c1 * x1[j] + c2 * x2[j] + c3 * x3[j];
        }
        for (; k < i; k++) {
            const double c = row[k];
            const double *x = L + k * s;
            for (Py_ssize_t j = 0; j <= k; j++)
                acc[j] += c * x[j];
        }
        const double inv = 1.0 / row[i];
        for (Py_ssize_t j = 0; j < i; j++)
            row[j] = -acc[j] * inv;
        row[i] = inv;
    }
}

#undef BV
#undef GR
#undef GTW
#undef RGR
#undef ISA_ATTR
#undef NAME
#undef PASTE
#undef PASTE_
