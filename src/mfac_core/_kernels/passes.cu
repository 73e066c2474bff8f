// The exact passes of the pass engine over the stored gradients G: the GPU form of
// mfac_core/_fused/_passes.c (project64, combine64), with the same semantics.
//
//   project64:  P[b][k][i] = sum_j G[i][b size + j] X[b][k][j]                       (float64)
//   combine64:  Y[b][k][j] = a[k] X[b][k][j] + sum_i C[b][k][i] G[i][b size + j]     (float64,
//                                                                        rounded once to Y's type)
//
// for `count` consecutive column blocks b of `size` columns each (count = 1: one column range),
// i < m, j < size and k < kk <= MFAC_PASS_MAX_K vectors (project64) or rows of C (combine64) per
// launch, so that one read of G serves them all; the launcher passes G from its first column on,
// so column b size + j is the block's column j. G is row-major, ldg items from one row to the next,
// in its storage type: float32, float64, or the 16 bits of an IEEE float16 or a bfloat16. Every
// item is widened to float64 exactly as it is loaded (mfac_widen), every product and sum is a
// float64 FMA, and combine64 sums the m terms first and adds a[k] X last, as _passes.c does. Sums
// run in an order fixed by the shapes alone (no atomics): results are the same bits at every run.
//
// project64, in two launches (the second only when a block's columns are split into slices):
//   project64_<S>_<X>  one block per (column block b, slice s of its columns, tile of rows):
//     its 256 threads are `groups` row groups of `lanes` = 256 / groups threads; a group owns R
//     consecutive rows (R = min(8, 32 / NK), NK = kk rounded up to 1, 2, 4 or 8: R x NK sums in
//     registers), and lane t walks the columns t, t + lanes, ... of the slice: it loads NK items
//     of X and R items of G per column (a warp reads consecutive columns: coalesced), R x NK FMAs.
//     So X is loaded once per R rows, and the groups of a block share its loads through L1. The
//     lanes' sums are then added in shared memory, in a fixed order (chains of 8 lanes, then the
//     chains in order), and written to P, or to `partial` (one entry per slice).
//   project64_sum  adds the slices' partial sums of each entry of P: spans of 32 slices, each
//     from zero in slice order, then the spans' sums in order.
// The launcher picks `groups` (the fewest, up to 8, that cover m), and the slices: as many as
// make about PASS_TARGET_BLOCKS blocks (_plan.py), each lane keeping PASS_MIN_LANE_COLUMNS (64)
// columns or more, so the grid does not grow with the number of columns past that.
//
// combine64_<S>_<X>_<Y>, in one launch: thread t of block `tile` owns the U columns
// tile * 256 U + t + 256 u (u < U = min(8, 32 / NK)) of the blocks laid end to end, and walks the
// m rows, loading U items of G per row (coalesced) and NK items of C (the same for every thread
// of a block whose columns lie in one column block, as they all do when count = 1: loaded once,
// used for U columns). The sums stay in registers; a[k] X is added and the result rounded at the
// end. No shared memory, no barrier.
#include "common.cu"

// Vectors (project64) or rows of C (combine64) per launch: one read of G serves them all.
#define MFAC_PASS_MAX_K 8
// float64 sums per thread (64 of the 128 registers that __launch_bounds__ leaves); R x NK in
// project64, NK x U in combine64.
#define MFAC_PASS_ACC 32
// project64's rows per row group at most (R), and row groups per block at most.
#define MFAC_PASS_ROWS 8
#define MFAC_PASS_GROUPS 8
// combine64's columns per thread at most (U).
#define MFAC_PASS_COLS 8
// project64's reduction: the lanes' sums of MFAC_PASS_SLOTS accumulators at a time (a 16 KB
// buffer), first in chains of MFAC_PASS_CHUNK lanes, one chain per thread.
#define MFAC_PASS_SLOTS 8
#define MFAC_PASS_CHUNK 8

// The storage types of G: the item as stored, and its value as a float64.
//
// A float32, float16 or bfloat16 is widened by moving its bits below the sign up to where a
// float64's mantissa bits start: that is a float64 with the same digits and an exponent 1023 -
// bias too small, for normal and subnormal values alike (a subnormal item becomes a subnormal
// float64, whose value is its mantissa times the same power of two). Times 2^(1023 - bias), exact,
// it is the item's value. Infinities and NaNs (all exponent bits set) get the float64's all-ones
// exponent and keep their mantissa. So a load costs integer work and one float64 multiply, not a
// conversion instruction: those to and from 64-bit types run at 16 per clock and SM on sm_80 and
// sm_90, against 32 and 64 float64 FMAs.
template <int EXP, int MANT>
__device__ __forceinline__ double mfac_widen(unsigned int bits, double scale)
{
    const unsigned int body = bits & ((1u << (EXP + MANT)) - 1u);
    const unsigned long long sign = (unsigned long long)(bits >> (EXP + MANT)) << 63;
    const unsigned long long moved = (unsigned long long)body << (52 - MANT);
    if (body >= (((1u << EXP) - 1u) << MANT))
        return __longlong_as_double((long long)(sign | 0x7ff0000000000000ull |
                                                (moved & 0x000fffffffffffffull)));
    return __longlong_as_double((long long)(sign | moved)) * scale;
}

struct mfac_f32 {
    typedef float item;
    static __device__ __forceinline__ double value(float v)
    {
        return mfac_widen<8, 23>(__float_as_uint(v), 0x1p896);
    }
};
struct mfac_f64 {
    typedef double item;
    static __device__ __forceinline__ double value(double v) { return v; }
};
struct mfac_f16 {
    typedef unsigned short item;
    static __device__ __forceinline__ double value(unsigned short v)
    {
        return mfac_widen<5, 10>(v, 0x1p1008);
    }
};
struct mfac_bf16 {
    typedef unsigned short item;
    static __device__ __forceinline__ double value(unsigned short v)
    {
        return mfac_widen<8, 7>(v, 0x1p896);
    }
};

// X's items as float64: float32 widened as G's are (project64 loads NK of them per R items of G).
__device__ __forceinline__ double mfac_to_double(float v) { return mfac_f32::value(v); }
__device__ __forceinline__ double mfac_to_double(double v) { return v; }

// Rows per row group (project64) and columns per thread (combine64) for NK vectors.
template <int NK>
struct mfac_pass_shape {
    static constexpr int rows =
        NK * MFAC_PASS_ROWS <= MFAC_PASS_ACC ? MFAC_PASS_ROWS : MFAC_PASS_ACC / NK;
    static constexpr int cols =
        NK * MFAC_PASS_COLS <= MFAC_PASS_ACC ? MFAC_PASS_COLS : MFAC_PASS_ACC / NK;
};

// Rows (combine64) or columns (project64) per iteration of the main loop: two for few vectors
// and items of 4 bytes or less, so that each thread has more loads in flight; one where the
// sums and loaded items would not fit the registers with two.
template <typename St, int NK>
struct mfac_pass_unroll {
    static constexpr int value = NK <= 2 && sizeof(typename St::item) <= 4 ? 2 : 1;
};

// project64's first launch for NK = 1, 2, 4 or 8 >= kk (see the top of the file). sRed and sPart
// are the kernel's, not this function's: each NK would otherwise get shared memory of its own.
template <typename St, typename TX, int NK>
__device__ __forceinline__ void project64_tile(
    const typename St::item* __restrict__ G, mfac_index ldg, int m, const TX* __restrict__ X,
    mfac_index xb, mfac_index xk, int kk, mfac_index size, int slices, mfac_index width,
    int groups, int row_tiles, double* __restrict__ out, mfac_index ob, mfac_index os,
    mfac_index ok, double (*sRed)[MFAC_THREADS],
    double (*sPart)[MFAC_THREADS / MFAC_PASS_CHUNK])
{
    constexpr int R = mfac_pass_shape<NK>::rows;
    constexpr int SUMS = R * NK;
    constexpr int UNROLL = mfac_pass_unroll<St, NK>::value;
    static_assert(SUMS % MFAC_PASS_SLOTS == 0, "the reduction goes MFAC_PASS_SLOTS sums at a time");

    const int tid = threadIdx.x;
    const int lanes = MFAC_THREADS / groups;
    const int gy = tid / lanes, tx = tid % lanes;
    // Blocks in the order (column block, slice, row tile): the row tiles of a slice run side by
    // side and read the same columns of X, mostly from L2.
    const int per_block = slices * row_tiles;
    const mfac_index b = blockIdx.x / per_block;
    const int s = (int)(blockIdx.x % per_block) / row_tiles;
    const int rt = (int)(blockIdx.x % per_block) % row_tiles;
    const int tile0 = rt * groups * R;  // the tile's first row
    const mfac_index lo = s * width;
    const mfac_index hi = lo + width < size ? lo + width : size;
    const TX* x = X + b * xb;

    // The group's rows; rows past m load nothing (the whole warp agrees: no divergence).
    const typename St::item* row[R];
    bool live[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = tile0 + gy * R + r;
        live[r] = i < m;
        row[r] = G + b * size + (mfac_index)(live[r] ? i : 0) * ldg;
    }
    double acc[R][NK];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < NK; ++k) acc[r][k] = 0.0;

#pragma unroll UNROLL
    for (mfac_index j = lo + tx; j < hi; j += lanes) {
        double xv[NK], gv[R];
#pragma unroll
        for (int k = 0; k < NK; ++k) xv[k] = k < kk ? mfac_to_double(x[k * xk + j]) : 0.0;
#pragma unroll
        for (int r = 0; r < R; ++r) gv[r] = live[r] ? St::value(row[r][j]) : 0.0;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int k = 0; k < NK; ++k) acc[r][k] = fma(gv[r], xv[k], acc[r][k]);
    }

    // The sum over the lanes of each accumulator, MFAC_PASS_SLOTS accumulators per round. Level
    // 1: thread t adds the 8 consecutive entries 8 (t % 32) .. of slot t / 32, i.e. 8 lanes of one
    // group (lanes is a multiple of 8); level 2: one thread per (slot, group) adds its lanes / 8
    // chains in order. The next round's first barrier keeps its writes after this round's reads.
    const int chains = lanes / MFAC_PASS_CHUNK;
#pragma unroll
    for (int r0 = 0; r0 < SUMS; r0 += MFAC_PASS_SLOTS) {
#pragma unroll
        for (int q = 0; q < MFAC_PASS_SLOTS; ++q) sRed[q][tid] = acc[(r0 + q) / NK][(r0 + q) % NK];
        __syncthreads();
        {
            constexpr int per_slot = MFAC_THREADS / MFAC_PASS_CHUNK;
            const int q = tid / per_slot, e = tid % per_slot;
            double sum = sRed[q][e * MFAC_PASS_CHUNK];
#pragma unroll
            for (int l = 1; l < MFAC_PASS_CHUNK; ++l) sum += sRed[q][e * MFAC_PASS_CHUNK + l];
            sPart[q][e] = sum;
        }
        __syncthreads();
        if (tid < MFAC_PASS_SLOTS * groups) {
            const int q = tid / groups, g = tid % groups;
            double sum = sPart[q][g * chains];
            for (int c = 1; c < chains; ++c) sum += sPart[q][g * chains + c];
            const int r = (r0 + q) / NK, k = (r0 + q) % NK;
            const int i = tile0 + g * R + r;
            if (i < m && k < kk) out[b * ob + s * os + k * ok + i] = sum;
        }
    }
}

template <typename St, typename TX>
__device__ __forceinline__ void project64(const typename St::item* G, mfac_index ldg, int m,
                                          const TX* X, mfac_index xb, mfac_index xk, int kk,
                                          mfac_index size, int slices, mfac_index width,
                                          int groups, int row_tiles, double* out, mfac_index ob,
                                          mfac_index os, mfac_index ok)
{
    static_assert(MFAC_PASS_SLOTS == MFAC_PASS_CHUNK,
                  "level 1 of the reduction gives each thread one chain");
    __shared__ double sRed[MFAC_PASS_SLOTS][MFAC_THREADS];
    __shared__ double sPart[MFAC_PASS_SLOTS][MFAC_THREADS / MFAC_PASS_CHUNK];
    // kk is the same for the whole grid: every thread of a block takes the same branch.
    if (kk <= 1)
        project64_tile<St, TX, 1>(G, ldg, m, X, xb, xk, kk, size, slices, width, groups,
                                  row_tiles, out, ob, os, ok, sRed, sPart);
    else if (kk <= 2)
        project64_tile<St, TX, 2>(G, ldg, m, X, xb, xk, kk, size, slices, width, groups,
                                  row_tiles, out, ob, os, ok, sRed, sPart);
    else if (kk <= 4)
        project64_tile<St, TX, 4>(G, ldg, m, X, xb, xk, kk, size, slices, width, groups,
                                  row_tiles, out, ob, os, ok, sRed, sPart);
    else
        project64_tile<St, TX, 8>(G, ldg, m, X, xb, xk, kk, size, slices, width, groups,
                                  row_tiles, out, ob, os, ok, sRed, sPart);
}

// The end of combine64 for one entry: the m terms summed, a[k] x is added (one FMA: the float64
// result is rounded once) and the result rounded to TY.
template <typename TX, typename TY>
__device__ __forceinline__ void combine64_store(double sum, double ak, const TX* X, TY* Y,
                                                mfac_index xo, mfac_index yo)
{
    Y[yo] = (TY)fma(ak, mfac_to_double(X[xo]), sum);
}

// combine64 on the U columns base + u MFAC_THREADS (u < live) of a tile whose columns all lie in
// column block b: a row's NK coefficients are loaded once for the U columns.
template <typename St, typename TX, typename TY, int NK>
__device__ __forceinline__ void combine64_tile(
    const typename St::item* __restrict__ G, mfac_index ldg, int m, const double* __restrict__ C,
    mfac_index cb, mfac_index ck, const double* __restrict__ a, const TX* __restrict__ X,
    mfac_index xb, mfac_index xk, int kk, mfac_index size, TY* __restrict__ Y, mfac_index yb,
    mfac_index yk, mfac_index base, int live, mfac_index b)
{
    constexpr int U = mfac_pass_shape<NK>::cols;
    constexpr int UNROLL = mfac_pass_unroll<St, NK>::value;
    const double* c = C + b * cb;
    double acc[NK][U];
#pragma unroll
    for (int k = 0; k < NK; ++k)
#pragma unroll
        for (int u = 0; u < U; ++u) acc[k][u] = 0.0;

#pragma unroll UNROLL
    for (int i = 0; i < m; ++i) {
        const typename St::item* g = G + i * ldg + base;
        double gv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) gv[u] = u < live ? St::value(g[u * MFAC_THREADS]) : 0.0;
#pragma unroll
        for (int k = 0; k < NK; ++k) {
            const double cv = k < kk ? c[k * ck + i] : 0.0;
#pragma unroll
            for (int u = 0; u < U; ++u) acc[k][u] = fma(cv, gv[u], acc[k][u]);
        }
    }

    const mfac_index j0 = base - b * size;  // the block's column of u = 0
#pragma unroll
    for (int k = 0; k < NK; ++k) {
        if (k >= kk) break;
        const double ak = a[k];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (u >= live) break;
            const mfac_index j = j0 + u * MFAC_THREADS;
            combine64_store(acc[k][u], ak, X, Y, b * xb + k * xk + j, b * yb + k * yk + j);
        }
    }
}

// combine64 on column `col` alone, in whichever column block it lies: for the tiles that straddle
// blocks (block-wise groups). Column by column, so that each column keeps only NK sums and
// coefficient pointer; each item of G is still read once, and a warp's reads stay coalesced.
template <typename St, typename TX, typename TY, int NK>
__device__ __forceinline__ void combine64_column(
    const typename St::item* __restrict__ G, mfac_index ldg, int m, const double* __restrict__ C,
    mfac_index cb, mfac_index ck, const double* __restrict__ a, const TX* __restrict__ X,
    mfac_index xb, mfac_index xk, int kk, mfac_index size, TY* __restrict__ Y, mfac_index yb,
    mfac_index yk, mfac_index col)
{
    const mfac_index b = col / size, j = col - b * size;
    const double* c = C + b * cb;
    const typename St::item* g = G + col;
    double acc[NK];
#pragma unroll
    for (int k = 0; k < NK; ++k) acc[k] = 0.0;
#pragma unroll 4
    for (int i = 0; i < m; ++i) {
        const double gv = St::value(g[i * ldg]);
#pragma unroll
        for (int k = 0; k < NK; ++k) acc[k] = fma(k < kk ? c[k * ck + i] : 0.0, gv, acc[k]);
    }
#pragma unroll
    for (int k = 0; k < NK; ++k) {
        if (k >= kk) break;
        combine64_store(acc[k], a[k], X, Y, b * xb + k * xk + j, b * yb + k * yk + j);
    }
}

// combine64 for NK = 1, 2, 4 or 8 >= kk: block `tile` owns the columns tile * 256 U + t +
// 256 u (thread t, u < U) of the blocks laid end to end.
template <typename St, typename TX, typename TY, int NK>
__device__ __forceinline__ void combine64_nk(const typename St::item* G, mfac_index ldg, int m,
                                             const double* C, mfac_index cb, mfac_index ck,
                                             const double* a, const TX* X, mfac_index xb,
                                             mfac_index xk, int kk, mfac_index size,
                                             mfac_index total, TY* Y, mfac_index yb,
                                             mfac_index yk)
{
    constexpr int U = mfac_pass_shape<NK>::cols;
    const mfac_index first = (mfac_index)blockIdx.x * (MFAC_THREADS * U);
    const mfac_index end = first + MFAC_THREADS * U < total ? first + MFAC_THREADS * U : total;
    const mfac_index base = first + threadIdx.x;
    const mfac_index left = total - base;  // this thread's columns: base + u 256, u < live
    const int live = left <= 0 ? 0
                     : left >= (mfac_index)U * MFAC_THREADS
                         ? U
                         : (int)((left + MFAC_THREADS - 1) / MFAC_THREADS);
    const mfac_index b = first / size;
    if (b == (end - 1) / size) {  // the same for the whole block
        combine64_tile<St, TX, TY, NK>(G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, Y, yb, yk,
                                       base, live, b);
    } else {
        for (int u = 0; u < live; ++u)
            combine64_column<St, TX, TY, NK>(G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, Y, yb,
                                             yk, base + u * MFAC_THREADS);
    }
}

template <typename St, typename TX, typename TY>
__device__ __forceinline__ void combine64(const typename St::item* G, mfac_index ldg, int m,
                                          const double* C, mfac_index cb, mfac_index ck,
                                          const double* a, const TX* X, mfac_index xb,
                                          mfac_index xk, int kk, mfac_index size,
                                          mfac_index total, TY* Y, mfac_index yb, mfac_index yk)
{
    if (kk <= 1)
        combine64_nk<St, TX, TY, 1>(G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, total, Y, yb,
                                    yk);
    else if (kk <= 2)
        combine64_nk<St, TX, TY, 2>(G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, total, Y, yb,
                                    yk);
    else if (kk <= 4)
        combine64_nk<St, TX, TY, 4>(G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, total, Y, yb,
                                    yk);
    else
        combine64_nk<St, TX, TY, 8>(G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, total, Y, yb,
                                    yk);
}

// project64's second launch: P[b][q] = sum_s partial[b][s][q], q < per (= kk m); one thread
// per entry of P. The slices go in spans of MFAC_SLICE_SPAN, each summed from zero in slice
// order, then the spans' sums in order (the C extension's levels, _passes.c levels_carry): up to
// PASS_TARGET_BLOCKS slices' sums of one sign and size (a vector near the gradients' span) added
// one after the other round the same way at each step.
#define MFAC_SLICE_SPAN 32
extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
project64_sum(const double* __restrict__ partial, int slices, long long per, long long total,
              double* __restrict__ P, long long pb)
{
    const mfac_index e = (mfac_index)blockIdx.x * MFAC_THREADS + threadIdx.x;
    if (e >= total) return;
    const mfac_index b = e / per, q = e % per;
    const double* p = partial + b * slices * per + q;
    double sum = 0.0, span = 0.0;
    for (int s = 0; s < slices; ++s) {
        span += p[s * per];
        if (s % MFAC_SLICE_SPAN == MFAC_SLICE_SPAN - 1) {
            sum += span;
            span = 0.0;
        }
    }
    P[b * pb + q] = sum + span;
}

// The kernels, one per storage type S and type of X (and of Y), named as _plan.py names them.
// The parameters:
//   project64: G, ldg, m, X, xb, xk, kk, size, slices, width, groups, row_tiles, out, ob, os, ok
//              (out[b ob + s os + k ok + i]: P itself with os = 0 when slices = 1);
//   combine64: G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, total, Y, yb, yk
//              (C[b cb + k ck + i], X[b xb + k xk + j], xk = 0 for one x shared by the kk rows,
//              Y[b yb + k yk + j]; total = count size).
#define MFAC_PROJECT64(NAME, ST, TX)                                                           \
    extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS) NAME(          \
        const ST::item* G, long long ldg, int m, const TX* X, long long xb, long long xk,      \
        int kk, long long size, int slices, long long width, int groups, int row_tiles,        \
        double* out, long long ob, long long os, long long ok)                                 \
    {                                                                                          \
        project64<ST, TX>(G, ldg, m, X, xb, xk, kk, size, slices, width, groups, row_tiles,    \
                          out, ob, os, ok);                                                    \
    }

#define MFAC_COMBINE64(NAME, ST, TX, TY)                                                       \
    extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS) NAME(          \
        const ST::item* G, long long ldg, int m, const double* C, long long cb, long long ck,  \
        const double* a, const TX* X, long long xb, long long xk, int kk, long long size,      \
        long long total, TY* Y, long long yb, long long yk)                                    \
    {                                                                                          \
        combine64<ST, TX, TY>(G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, total, Y, yb, yk); \
    }

MFAC_PROJECT64(project64_f32_x32, mfac_f32, float)
MFAC_PROJECT64(project64_f32_x64, mfac_f32, double)
MFAC_PROJECT64(project64_f64_x32, mfac_f64, float)
MFAC_PROJECT64(project64_f64_x64, mfac_f64, double)
MFAC_PROJECT64(project64_f16_x32, mfac_f16, float)
MFAC_PROJECT64(project64_f16_x64, mfac_f16, double)
MFAC_PROJECT64(project64_bf16_x32, mfac_bf16, float)
MFAC_PROJECT64(project64_bf16_x64, mfac_bf16, double)

MFAC_COMBINE64(combine64_f32_x32_y32, mfac_f32, float, float)
MFAC_COMBINE64(combine64_f32_x32_y64, mfac_f32, float, double)
MFAC_COMBINE64(combine64_f32_x64_y32, mfac_f32, double, float)
MFAC_COMBINE64(combine64_f32_x64_y64, mfac_f32, double, double)
MFAC_COMBINE64(combine64_f64_x32_y32, mfac_f64, float, float)
MFAC_COMBINE64(combine64_f64_x32_y64, mfac_f64, float, double)
MFAC_COMBINE64(combine64_f64_x64_y32, mfac_f64, double, float)
MFAC_COMBINE64(combine64_f64_x64_y64, mfac_f64, double, double)
MFAC_COMBINE64(combine64_f16_x32_y32, mfac_f16, float, float)
MFAC_COMBINE64(combine64_f16_x32_y64, mfac_f16, float, double)
MFAC_COMBINE64(combine64_f16_x64_y32, mfac_f16, double, float)
MFAC_COMBINE64(combine64_f16_x64_y64, mfac_f16, double, double)
MFAC_COMBINE64(combine64_bf16_x32_y32, mfac_bf16, float, float)
MFAC_COMBINE64(combine64_bf16_x32_y64, mfac_bf16, float, double)
MFAC_COMBINE64(combine64_bf16_x64_y32, mfac_bf16, double, float)
MFAC_COMBINE64(combine64_bf16_x64_y64, mfac_bf16, double, double)
