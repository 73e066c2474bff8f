// Blocked Cholesky factorisation A = L L^T of a stack of SPD n x n matrices, in place.
//
// Right-looking, by panels of MFAC_TILE columns; the launcher runs, for k0 = 0, 64, 128, ...:
//
//   chol_panel(k0)  factor the 64 x 64 diagonal block A11 = A[k0:k0+64, k0:k0+64] and solve
//                   the rows below it, L21 = A21 L11^{-T}; zero the panel's part of the upper
//                   triangle.
//   chol_syrk(k0)   (if rows remain below) the trailing update A22 -= L21 L21^T on the lower
//                   triangle of tiles, and one more block per matrix that moves L11 into place.
//
// so any n works (the last panel and tiles may be ragged) in 2 ceil(n / 64) - 1 launches, and a
// stack is one launch per step (blockIdx.x = matrix * blocks_per_matrix + block). For n <= 64,
// e.g. thousands of 64 x 64 blocks, the whole factorisation is one launch of chol_panel.
//
// Every block of chol_panel factors A11 itself, in shared memory, rather than waiting for another
// launch: 64 cheap steps instead of a third launch per panel. All blocks run the same
// instructions on the same data, so they hold bitwise the same L11. Since blocks of one launch
// run in any order, no block may overwrite A11 while others may still read it: when rows remain
// below (several blocks, a chol_syrk to follow), block 0 parks L11 transposed in the strict upper
// triangle of the diagonal block, which nobody reads, and its diagonal in `diag` (one row of
// MFAC_TILE per matrix); chol_syrk then moves it into place. The last panel has one block per
// matrix and writes L11 directly.
//
// Failure: info[matrix] = j + 1 (1-based, as LAPACK's potrf) for the first pivot j that is not
// > 0 (or is NaN); later launches skip that matrix, whose factor is then partial.
#include "common.cu"

// Rows below the diagonal block that one chol_panel block solves: one per row of the 16 x 16
// thread grid, so each thread holds 4 entries of its row.
#define MFAC_PANEL_ROWS MFAC_SIDE
// Panel columns staged in shared memory per step of chol_syrk: two 64 x 33 tiles (float64:
// 34 KB) stay under the 48 KB default limit.
#define MFAC_SYRK_DEPTH 32

template <typename T>
__device__ __forceinline__ void chol_panel(T* A, int n, int k0, int chunks, int* info,
                                           T* diag)
{
    __shared__ T sL[MFAC_TILE][MFAC_TILE + 1];       // the diagonal block, lower triangle
    __shared__ T sX[MFAC_PANEL_ROWS][MFAC_TILE + 1]; // this block's rows of the panel
    __shared__ T sR[MFAC_TILE];                      // 1 / sqrt(pivot), as in the loop
    __shared__ int sSkip;

    const int tid = threadIdx.x;
    const int tx = tid % MFAC_SIDE, ty = tid / MFAC_SIDE;
    const mfac_index mat = blockIdx.x / chunks;
    const int chunk = blockIdx.x % chunks;
    T* a = A + mat * n * (mfac_index)n;

    // An earlier panel of this matrix failed: nothing to do. Read once, so that the decision is
    // uniform across the block even while block 0 of this launch may be writing info[mat].
    if (tid == 0) sSkip = info[mat];
    __syncthreads();
    if (sSkip != 0) return;

    const int nb = mfac_min(MFAC_TILE, n - k0);
    for (int e = tid; e < MFAC_TILE * MFAC_TILE; e += MFAC_THREADS) {
        const int i = e / MFAC_TILE, l = e % MFAC_TILE;
        sL[i][l] = (i < nb && l <= i) ? a[(k0 + i) * (mfac_index)n + k0 + l] : T(0);
    }

    // Unblocked right-looking factorisation with one barrier per column: step j reads column j
    // and writes only columns > j. Column j is scaled by 1/sqrt(pivot) on the fly; it is stored
    // scaled after the loop (same expression, so the stored L equals the L used here). Each
    // step loads everything it reads before it writes: the compiler cannot tell the writes to
    // sL from the reads of sL, and would otherwise serialise every read-modify-write.
    int fail = -1;
    for (int j = 0; j < nb; ++j) {
        __syncthreads();
        const T d = sL[j][j];
        if (!(d > T(0))) {  // uniform: every thread reads the same pivot
            fail = j;
            break;
        }
        const T r = mfac_rsqrt(d);
        T ci[MFAC_PER], cl[MFAC_PER], cur[MFAC_PER][MFAC_PER];
#pragma unroll
        for (int u = 0; u < MFAC_PER; ++u) {
            ci[u] = sL[ty + MFAC_SIDE * u][j] * r;
            cl[u] = sL[tx + MFAC_SIDE * u][j] * r;
        }
#pragma unroll
        for (int u = 0; u < MFAC_PER; ++u)
#pragma unroll
            for (int v = 0; v < MFAC_PER; ++v) cur[u][v] = sL[ty + MFAC_SIDE * u][tx + MFAC_SIDE * v];
#pragma unroll
        for (int u = 0; u < MFAC_PER; ++u) {
            const int i = ty + MFAC_SIDE * u;
#pragma unroll
            for (int v = 0; v < MFAC_PER; ++v) {
                const int l = tx + MFAC_SIDE * v;
                if (l > j && l <= i && i < nb) sL[i][l] = cur[u][v] - ci[u] * cl[v];
            }
        }
    }
    __syncthreads();
    if (fail >= 0) {
        if (chunk == 0 && tid == 0) info[mat] = k0 + fail + 1;
        return;
    }
    for (int l = tid; l < nb; l += MFAC_THREADS) sR[l] = mfac_rsqrt(sL[l][l]);
    __syncthreads();
    for (int e = tid; e < MFAC_TILE * MFAC_TILE; e += MFAC_THREADS) {
        const int i = e / MFAC_TILE, l = e % MFAC_TILE;
        if (i < nb && l < i) sL[i][l] *= sR[l];
        else if (i < nb && l == i) sL[i][i] = mfac_sqrt(sL[i][i]);
    }
    __syncthreads();

    if (chunk == 0) {
        const bool park = k0 + nb < n;  // rows below: other blocks may be reading A11
        for (int e = tid; e < MFAC_TILE * MFAC_TILE; e += MFAC_THREADS) {
            const int i = e / MFAC_TILE, l = e % MFAC_TILE;
            if (i >= nb || l >= nb) continue;
            T* dst = &a[(k0 + i) * (mfac_index)n + k0 + l];
            if (park) {
                if (l > i) *dst = sL[l][i];  // L11 transposed, in the unread upper triangle
                else if (l == i) diag[mat * MFAC_TILE + i] = sL[i][i];
            } else {
                *dst = l <= i ? sL[i][l] : T(0);
            }
        }
    }

    const int r0 = k0 + nb + chunk * MFAC_PANEL_ROWS;  // first row of this block's chunk
    if (r0 >= n) return;                                 // uniform: no rows below (last panel)
    const int row = r0 + ty;

    // Solve x L11^T = a for each row: column-oriented substitution, one barrier per column. The
    // thread that makes the last update of entry j + 1 also divides it by its pivot, so at step
    // j every x_j that is read is final.
#pragma unroll
    for (int v = 0; v < MFAC_PER; ++v) {
        const int l = tx + MFAC_SIDE * v;
        T x = (row < n && l < nb) ? a[row * (mfac_index)n + k0 + l] : T(0);
        if (l == 0) x /= sL[0][0];
        sX[ty][l] = x;
    }
    __syncthreads();
    for (int j = 0; j + 1 < nb; ++j) {
        const T xj = sX[ty][j];
        T lv[MFAC_PER], xv[MFAC_PER], dv[MFAC_PER];  // all reads first, as above
#pragma unroll
        for (int v = 0; v < MFAC_PER; ++v) {
            const int l = tx + MFAC_SIDE * v;
            lv[v] = sL[l][j];
            dv[v] = sL[l][l];
            xv[v] = sX[ty][l];
        }
#pragma unroll
        for (int v = 0; v < MFAC_PER; ++v) {
            const int l = tx + MFAC_SIDE * v;
            if (l > j && l < nb) {
                T x = xv[v] - xj * lv[v];
                if (l == j + 1) x /= dv[v];
                sX[ty][l] = x;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int v = 0; v < MFAC_PER; ++v) {
        const int l = tx + MFAC_SIDE * v;
        if (row < n && l < nb) a[row * (mfac_index)n + k0 + l] = sX[ty][l];
    }
    // Zero the mirror entries in the upper triangle, A[k0 + l, row]; consecutive threads take
    // consecutive rows, i.e. consecutive addresses.
    for (int e = tid; e < MFAC_PANEL_ROWS * MFAC_TILE; e += MFAC_THREADS) {
        const int rr = e % MFAC_PANEL_ROWS, l = e / MFAC_PANEL_ROWS;
        if (r0 + rr < n && l < nb) a[(k0 + l) * (mfac_index)n + r0 + rr] = T(0);
    }
}

template <typename T>
__device__ __forceinline__ void chol_syrk(T* A, int n, int k0, int tiles, const int* info,
                                          const T* diag)
{
    __shared__ T sA[MFAC_TILE][MFAC_SYRK_DEPTH + 1];  // panel rows of the tile's rows
    __shared__ T sB[MFAC_TILE][MFAC_SYRK_DEPTH + 1];  // panel rows of the tile's columns

    const int tid = threadIdx.x;
    const int tx = tid % MFAC_SIDE, ty = tid / MFAC_SIDE;
    const mfac_index mat = blockIdx.x / (tiles + 1);
    const int t = blockIdx.x % (tiles + 1);
    if (info[mat] != 0) return;  // written by an earlier launch only: uniform
    T* a = A + mat * n * (mfac_index)n;

    if (t == tiles) {
        // The extra block: move the L11 that chol_panel parked into the lower triangle, zero
        // the upper one. Each thread reads and clears the parked entries it moves.
        for (int e = tid; e < MFAC_TILE * MFAC_TILE; e += MFAC_THREADS) {
            const int i = e / MFAC_TILE, l = e % MFAC_TILE;
            T* lower = &a[(k0 + i) * (mfac_index)n + k0 + l];
            T* upper = &a[(k0 + l) * (mfac_index)n + k0 + i];
            if (l < i) {
                *lower = *upper;
                *upper = T(0);
            } else if (l == i) {
                *lower = diag[mat * MFAC_TILE + i];
            }
        }
        return;
    }

    // Tile t of the lower triangle of tiles, numbered row by row: t = ti (ti + 1) / 2 + tj.
    // The floating-point guess is corrected exactly with integers.
    int ti = (int)((mfac_sqrt(8.0 * t + 1.0) - 1.0) / 2.0);
    while ((mfac_index)(ti + 1) * (ti + 2) / 2 <= t) ++ti;
    while ((mfac_index)ti * (ti + 1) / 2 > t) --ti;
    const int tj = t - (int)((mfac_index)ti * (ti + 1) / 2);

    const int k1 = k0 + MFAC_TILE;  // the trailing matrix starts here; the panel is full
    const int row0 = k1 + ti * MFAC_TILE, col0 = k1 + tj * MFAC_TILE;

    T acc[MFAC_PER][MFAC_PER];
#pragma unroll
    for (int u = 0; u < MFAC_PER; ++u)
#pragma unroll
        for (int v = 0; v < MFAC_PER; ++v) acc[u][v] = T(0);

    for (int kc = 0; kc < MFAC_TILE; kc += MFAC_SYRK_DEPTH) {
        // A warp loads 32 consecutive entries of one row: coalesced.
        for (int e = tid; e < MFAC_TILE * MFAC_SYRK_DEPTH; e += MFAC_THREADS) {
            const int r = e / MFAC_SYRK_DEPTH, kk = e % MFAC_SYRK_DEPTH;
            const int ra = row0 + r, rb = col0 + r;
            sA[r][kk] = ra < n ? a[ra * (mfac_index)n + k0 + kc + kk] : T(0);
            sB[r][kk] = rb < n ? a[rb * (mfac_index)n + k0 + kc + kk] : T(0);
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < MFAC_SYRK_DEPTH; ++kk) {
            T x[MFAC_PER], y[MFAC_PER];
#pragma unroll
            for (int u = 0; u < MFAC_PER; ++u) x[u] = sA[ty + MFAC_SIDE * u][kk];
#pragma unroll
            for (int v = 0; v < MFAC_PER; ++v) y[v] = sB[tx + MFAC_SIDE * v][kk];
#pragma unroll
            for (int u = 0; u < MFAC_PER; ++u)
#pragma unroll
                for (int v = 0; v < MFAC_PER; ++v) acc[u][v] += x[u] * y[v];
        }
        __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < MFAC_PER; ++u) {
        const int i = row0 + ty + MFAC_SIDE * u;
#pragma unroll
        for (int v = 0; v < MFAC_PER; ++v) {
            const int l = col0 + tx + MFAC_SIDE * v;
            if (i < n && l < n && (ti != tj || l <= i)) a[i * (mfac_index)n + l] -= acc[u][v];
        }
    }
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
chol_panel_f64(double* A, int n, int k0, int chunks, int* info, double* diag)
{
    chol_panel<double>(A, n, k0, chunks, info, diag);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
chol_panel_f32(float* A, int n, int k0, int chunks, int* info, float* diag)
{
    chol_panel<float>(A, n, k0, chunks, info, diag);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
chol_syrk_f64(double* A, int n, int k0, int tiles, const int* info, const double* diag)
{
    chol_syrk<double>(A, n, k0, tiles, info, diag);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
chol_syrk_f32(float* A, int n, int k0, int tiles, const int* info, const float* diag)
{
    chol_syrk<float>(A, n, k0, tiles, info, diag);
}
