// Triangular solves X = op(T)^{-1} B for stacks, and triangular inverses, in one launch.
//
// op(T) is T or T^T for a lower or upper triangular T: four cases that reduce to two flags,
//   MFAC_TRSM_FORWARD  op(T) is lower triangular (lower and not trans, or upper and trans):
//                      substitute from the first row down; otherwise from the last row up;
//   MFAC_TRSM_TRANS    op(T)[i][l] is stored at T[l][i].
// With MFAC_TRSM_IDENTITY, B is the identity (B is not read) and X = op(T)^{-1}; the columns
// c0.. of the inverse vanish on one side of the block that holds row c0, which is skipped.
//
// One block solves MFAC_TRSM_RHS columns of one matrix of the stack (blockIdx.x = matrix *
// chunks + chunk), walking the rows in blocks of 64: first the contributions of the rows
// solved so far (64 x 64 tiles of op(T) staged in shared memory, times the solved rows of X,
// read back from global memory), then the 64 x 64 diagonal block by substitution in shared
// memory, one barrier per row. Any m works (the last block of rows is ragged); the work of one
// block is m^2/2 multiply-adds per right-hand side, so many right-hand sides or a stack fill
// the GPU, and a single right-hand side costs one block's walk over the triangle.
//
// B and X may be the same array (in place): rows of B are read before the same rows of X are
// written. Strides: a matrix of the stack starts at matrix * st and row i at i * ld; a stride
// of 0 broadcasts one T over the stack.
#include "common.cu"

#define MFAC_TRSM_FORWARD 1
#define MFAC_TRSM_TRANS 2
#define MFAC_TRSM_IDENTITY 4
// Right-hand sides per block: the 256 threads are 64 rows x 4 groups, and a group takes
// every 4th of the 16 columns. 16 float64 columns add 8.7 KB of shared memory to the 33 KB
// tile, which stays under 48 KB.
#define MFAC_TRSM_RHS 16
#define MFAC_TRSM_GROUPS (MFAC_THREADS / MFAC_TILE)
#define MFAC_TRSM_COLS (MFAC_TRSM_RHS / MFAC_TRSM_GROUPS)

// Stage op(T)[i0 + i][l0 + l] for i < hi, l < hl into sT, zero elsewhere. The fastest index
// follows the stored rows, so a warp reads consecutive addresses in both orientations.
template <typename T>
__device__ __forceinline__ void trsm_stage(T (*sT)[MFAC_TILE + 1], const T* __restrict__ t,
                                           mfac_index ldt, bool trans, int i0, int hi, int l0,
                                           int hl)
{
    for (int e = threadIdx.x; e < MFAC_TILE * MFAC_TILE; e += MFAC_THREADS) {
        const int fast = e % MFAC_TILE, slow = e / MFAC_TILE;
        const int i = trans ? fast : slow, l = trans ? slow : fast;
        T v = T(0);
        if (i < hi && l < hl)
            v = trans ? t[(l0 + l) * ldt + i0 + i] : t[(i0 + i) * ldt + l0 + l];
        sT[i][l] = v;
    }
}

// Stage rows r0 + [0, h) and columns c0 + [0, nc) of a row-major matrix (leading dimension ld)
// into sX, zero elsewhere; with `identity`, the identity's entries instead of reading.
template <typename T>
__device__ __forceinline__ void trsm_stage_rhs(T (*sX)[MFAC_TRSM_RHS + 1], const T* x,
                                               mfac_index ld, int r0, int h, int c0, int nc,
                                               bool identity)
{
    for (int e = threadIdx.x; e < MFAC_TILE * MFAC_TRSM_RHS; e += MFAC_THREADS) {
        const int r = e / MFAC_TRSM_RHS, c = e % MFAC_TRSM_RHS;
        T v = T(0);
        if (r < h && c < nc) v = identity ? T(r0 + r == c0 + c ? 1 : 0) : x[(r0 + r) * ld + c0 + c];
        sX[r][c] = v;
    }
}

template <typename T>
__device__ __forceinline__ void trsm(const T* __restrict__ Tm, mfac_index ldt, mfac_index stt,
                                     const T* B, mfac_index ldb, mfac_index stb, T* X,
                                     mfac_index ldx, mfac_index stx, int m, int k, int chunks,
                                     int flags)
{
    __shared__ T sT[MFAC_TILE][MFAC_TILE + 1];
    __shared__ T sX[MFAC_TILE][MFAC_TRSM_RHS + 1];

    const bool forward = (flags & MFAC_TRSM_FORWARD) != 0;
    const bool trans = (flags & MFAC_TRSM_TRANS) != 0;
    const bool identity = (flags & MFAC_TRSM_IDENTITY) != 0;
    const int tid = threadIdx.x;
    const int ti = tid % MFAC_TILE;  // the row of a 64-row block that this thread updates,
    const int g = tid / MFAC_TILE;   // in the columns g, g + 4, g + 8, g + 12 of the chunk
    const mfac_index mat = blockIdx.x / chunks;
    const int c0 = (blockIdx.x % chunks) * MFAC_TRSM_RHS;
    const int nc = mfac_min(MFAC_TRSM_RHS, k - c0);
    const T* t = Tm + mat * stt;
    const T* rhs = B + mat * stb;
    T* x = X + mat * stx;

    // Blocks of rows [lo, hi], visited upwards (forward) or downwards.
    const int nblk = (m + MFAC_TILE - 1) / MFAC_TILE;
    int lo = 0, hi = nblk - 1;
    if (identity) {
        // MFAC_TRSM_RHS divides MFAC_TILE, so the chunk's columns lie in one block of rows;
        // op(T)^{-1} is zero above it (forward) or below it: write those zeros, skip the rows.
        const int first = c0 / MFAC_TILE;
        if (forward) lo = first;
        else hi = first;
        const int z0 = forward ? 0 : (hi + 1) * MFAC_TILE;
        const int z1 = forward ? lo * MFAC_TILE : m;
        for (mfac_index e = tid; e < (mfac_index)(z1 - z0) * MFAC_TRSM_RHS; e += MFAC_THREADS) {
            const int r = z0 + (int)(e / MFAC_TRSM_RHS), c = (int)(e % MFAC_TRSM_RHS);
            if (c < nc) x[r * ldx + c0 + c] = T(0);
        }
    }

    for (int s = 0; s <= hi - lo; ++s) {
        const int bi = forward ? lo + s : hi - s;
        const int i0 = bi * MFAC_TILE, h = mfac_min(MFAC_TILE, m - i0);

        // The right-hand side of this block of rows, through shared memory so that the global
        // reads are coalesced along the columns.
        __syncthreads();
        trsm_stage_rhs(sX, rhs, ldb, i0, h, c0, nc, identity);
        __syncthreads();
        T acc[MFAC_TRSM_COLS];
#pragma unroll
        for (int q = 0; q < MFAC_TRSM_COLS; ++q) acc[q] = sX[ti][g + MFAC_TRSM_GROUPS * q];

        // Subtract op(T)[rows of bi, rows of bk] X[rows of bk] for the blocks solved so far.
        for (int sk = 0; sk < s; ++sk) {
            const int bk = forward ? lo + sk : hi - sk;
            const int k0 = bk * MFAC_TILE, hk = mfac_min(MFAC_TILE, m - k0);
            __syncthreads();
            trsm_stage(sT, t, ldt, trans, i0, h, k0, hk);
            trsm_stage_rhs(sX, x, ldx, k0, hk, c0, nc, false);
            __syncthreads();
#pragma unroll 8
            for (int kk = 0; kk < MFAC_TILE; ++kk) {
                const T tv = sT[ti][kk];
#pragma unroll
                for (int q = 0; q < MFAC_TRSM_COLS; ++q)
                    acc[q] -= tv * sX[kk][g + MFAC_TRSM_GROUPS * q];
            }
        }

        // The diagonal block: substitution with one barrier per row. The thread that makes the
        // last update of the next row also divides it by its pivot, so every row read is final.
        __syncthreads();
        trsm_stage(sT, t, ldt, trans, i0, h, i0, h);
#pragma unroll
        for (int q = 0; q < MFAC_TRSM_COLS; ++q) sX[ti][g + MFAC_TRSM_GROUPS * q] = acc[q];
        __syncthreads();
        // With the identity, the rows before the chunk's first column (forward; after its last
        // column, backward) are zero in the first block visited: their steps change nothing.
        int skip = 0;
        if (identity && s == 0) skip = forward ? c0 - i0 : i0 + h - (c0 + nc);
        const int start = forward ? skip : h - 1 - skip;
        if (ti == start) {
#pragma unroll
            for (int q = 0; q < MFAC_TRSM_COLS; ++q)
                sX[ti][g + MFAC_TRSM_GROUPS * q] /= sT[ti][ti];
        }
        __syncthreads();
        for (int step = skip; step + 1 < h; ++step) {
            const int j = forward ? step : h - 1 - step;  // the row solved last
            const int next = forward ? j + 1 : j - 1;     // the row that becomes final now
            const bool pending = forward ? (ti > j && ti < h) : ti < j;
            if (pending) {
                // All reads first: the compiler cannot tell the writes to sX from its reads.
                const T tij = sT[ti][j], pivot = sT[ti][ti];
                T xj[MFAC_TRSM_COLS], cur[MFAC_TRSM_COLS];
#pragma unroll
                for (int q = 0; q < MFAC_TRSM_COLS; ++q) {
                    xj[q] = sX[j][g + MFAC_TRSM_GROUPS * q];
                    cur[q] = sX[ti][g + MFAC_TRSM_GROUPS * q];
                }
#pragma unroll
                for (int q = 0; q < MFAC_TRSM_COLS; ++q) {
                    T v = cur[q] - tij * xj[q];
                    if (ti == next) v /= pivot;
                    sX[ti][g + MFAC_TRSM_GROUPS * q] = v;
                }
            }
            __syncthreads();
        }
        for (int e = tid; e < MFAC_TILE * MFAC_TRSM_RHS; e += MFAC_THREADS) {
            const int r = e / MFAC_TRSM_RHS, c = e % MFAC_TRSM_RHS;
            if (r < h && c < nc) x[(i0 + r) * ldx + c0 + c] = sX[r][c];
        }
        // The next iteration starts with a barrier, after which these global writes are
        // visible to every thread of the block.
    }
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
trsm_f64(const double* T, long long ldt, long long stt, const double* B, long long ldb,
         long long stb, double* X, long long ldx, long long stx, int m, int k, int chunks,
         int flags)
{
    trsm<double>(T, ldt, stt, B, ldb, stb, X, ldx, stx, m, k, chunks, flags);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
trsm_f32(const float* T, long long ldt, long long stt, const float* B, long long ldb,
         long long stb, float* X, long long ldx, long long stx, int m, int k, int chunks,
         int flags)
{
    trsm<float>(T, ldt, stt, B, ldb, stb, X, ldx, stx, m, k, chunks, flags);
}
