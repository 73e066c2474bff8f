// O(k^2) replacement of one row and column of C = U^T U (U upper triangular, k x k): the GPU
// form of mfac_core/_cholesky.py::replace, with the same semantics.
//
// Deleting row and column p leaves V^T V + u u^T for the trailing block, with V = U[p+1:, p+1:]
// and u = U[p, p+1:]. With q = V^{-T} u and s_j = 1 + sum_{i<j} q_i^2 (Gill, Golub, Murray and
// Saunders 1974), its upper factor is K V with K upper triangular and known in closed form:
//
//   (K V)[j, :] = diag_j V[j, :] + beta_j sum_{i>j} q_i V[i, :],
//   diag_j = sqrt(s_{j+1} / s_j),  beta_j = q_j / sqrt(s_{j+1} s_j).
//
// So the launcher runs: trsm (q = V^{-T} u, one right-hand side), replace_prep (the prefix sums
// s, one block), replace_update (one thread per column of the new factor: a running suffix sum
// down the column, no barrier), trsm (the appended column, col = out[:n, :n]^{-T} b) and
// replace_finish (pivot c - col.col, its check and the last column).
//
// Row 0, the one the sliding window always edits, needs one triangular walk, not two: there
// out[:n, :n] = K V, so col = (K V)^{-T} b = K^{-T} (V^{-T} b), and V^{-T} u and V^{-T} b are
// the two right-hand sides of one trsm (replace_gather stacks them, replace_prep2 reads q from
// the result); K^{-T} costs O(n) (replace_column), K^T being diagonal plus the rank-one-like
// lower part beta_j q_i.
#include "common.cu"

// diag and beta of the closed-form factor from q (length nv), by one block: each thread sums a
// contiguous piece of q^2, thread 0 scans the 256 partial sums, each thread finishes its piece.
// q is read with stride qs; with qout, it is also written there contiguously.
template <typename T>
__device__ __forceinline__ void replace_prep(const T* q, mfac_index qs, T* qout, T* diag, T* beta,
                                             int nv)
{
    __shared__ T sPart[MFAC_THREADS];
    const int tid = threadIdx.x;
    const int per = (nv + MFAC_THREADS - 1) / MFAC_THREADS;
    const int lo = mfac_min(nv, tid * per), hi = mfac_min(nv, lo + per);
    T part = T(0);
    for (int i = lo; i < hi; ++i) part += q[i * qs] * q[i * qs];
    sPart[tid] = part;
    __syncthreads();
    if (tid == 0) {
        T s = T(1);
        for (int u = 0; u < MFAC_THREADS; ++u) {
            const T p = sPart[u];
            sPart[u] = s;
            s += p;
        }
    }
    __syncthreads();
    T s = sPart[tid];
    for (int i = lo; i < hi; ++i) {
        const T qi = q[i * qs];
        const T s1 = s + qi * qi;
        diag[i] = mfac_sqrt(s1 / s);
        beta[i] = qi / mfac_sqrt(s1 * s);
        if (qout) qout[i] = qi;
        s = s1;
    }
}

// Row 0: rhs (n x 2, row-major) = [u, b] with u = U[0, 1:], for one trsm with V = U[1:, 1:].
template <typename T>
__device__ __forceinline__ void replace_gather(const T* __restrict__ U, const T* __restrict__ b,
                                               T* __restrict__ rhs, int k)
{
    const int i = blockIdx.x * MFAC_THREADS + threadIdx.x;
    if (i < k - 1) {
        rhs[2 * (mfac_index)i] = U[1 + i];
        rhs[2 * (mfac_index)i + 1] = b[i];
    }
}

// Row 0: col = K^{-T} w for w = V^{-T} b (the second column of qw), by one thread in O(n):
// K^T[i][i] = diag_i and K^T[i][j] = beta_j q_i (j < i), so
// col_i = (w_i - q_i sum_{j<i} beta_j col_j) / diag_i.
template <typename T>
__device__ __forceinline__ void replace_column(const T* __restrict__ qw, const T* __restrict__ q,
                                               const T* __restrict__ diag,
                                               const T* __restrict__ beta, T* __restrict__ col,
                                               int n)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    T acc = T(0);
    for (int i = 0; i < n; ++i) {
        const T z = (qw[2 * (mfac_index)i + 1] - q[i] * acc) / diag[i];
        col[i] = z;
        acc += beta[i] * z;
    }
}

// Thread cc writes column cc of out (k x k, row-major), from U, with row/column p deleted,
// the trailing block updated, and the last row and column set to those of the identity (the
// appended column is solved for next). Threads of a warp walk the same row at the same time,
// so each row access is coalesced. U's strict lower triangle is never read.
template <typename T>
__device__ __forceinline__ void replace_update(const T* __restrict__ U, T* __restrict__ out,
                                               const T* __restrict__ q,
                                               const T* __restrict__ diag,
                                               const T* __restrict__ beta, int k, int p)
{
    const int n = k - 1;
    const int cc = blockIdx.x * MFAC_THREADS + threadIdx.x;
    const bool live = cc < k;
    const mfac_index ld = k;

    // Rows above p: copied, columns after p shifted left by one; the last column is zero.
    for (int r = 0; r < p; ++r) {
        if (live) {
            T v = T(0);
            if (cc < p) v = U[r * ld + cc];
            else if (cc < n) v = U[r * ld + cc + 1];
            out[r * ld + cc] = v;
        }
    }

    // Rows p..cc of a column p <= cc < n: row j = r - p of K V, for column l = cc - p of V,
    // from the bottom (j = l) up with the running sum tail = sum_{l >= i > j} q_i V[i][l].
    const int l = cc - p;
    const bool updated = live && cc >= p && cc < n;
    const int top = mfac_min(n - 1, (int)(blockIdx.x * MFAC_THREADS) + MFAC_THREADS - 1) - p;
    T tail = T(0);
    for (int j = top; j >= 0; --j) {
        if (updated && j <= l) {
            const T v = U[(p + 1 + j) * ld + cc + 1];
            out[(p + j) * ld + cc] = diag[j] * v + beta[j] * tail;
            tail += q[j] * v;
        }
    }

    // Below the diagonal: zero; the last row and column are those of the identity.
    for (int r = p; r < k; ++r) {
        if (live && (cc < p || r > cc)) out[r * ld + cc] = T(0);
        if (live && cc == n) out[r * ld + cc] = r == n ? T(1) : T(0);
    }
}

// The appended pivot c - col.col (one block, tree reduction); status = {pivot, failed}.
// Accepted only if pivot > rtol |c| (NaN fails), as in _cholesky.replace; then the last column
// becomes [col; sqrt(pivot)]. On failure out keeps the identity's last column.
template <typename T>
__device__ __forceinline__ void replace_finish(T* out, const T* col, T c, T rtol, T* status,
                                               int k)
{
    __shared__ T sSum[MFAC_THREADS];
    const int n = k - 1, tid = threadIdx.x;
    T part = T(0);
    for (int i = tid; i < n; i += MFAC_THREADS) part += col[i] * col[i];
    sSum[tid] = part;
    __syncthreads();
    for (int w = MFAC_THREADS / 2; w > 0; w /= 2) {
        if (tid < w) sSum[tid] += sSum[tid + w];
        __syncthreads();
    }
    const T pivot = c - sSum[0];
    const bool ok = pivot > rtol * mfac_abs(c);
    if (tid == 0) {
        status[0] = pivot;
        status[1] = ok ? T(0) : T(1);
    }
    if (!ok) return;
    for (int i = tid; i < n; i += MFAC_THREADS) out[i * (mfac_index)k + n] = col[i];
    if (tid == 0) out[n * (mfac_index)k + n] = mfac_sqrt(pivot);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_prep_f64(const double* q, double* diag, double* beta, int nv)
{
    replace_prep<double>(q, 1, nullptr, diag, beta, nv);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_prep2_f64(const double* qw, double* q, double* diag, double* beta, int nv)
{
    replace_prep<double>(qw, 2, q, diag, beta, nv);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_gather_f64(const double* U, const double* b, double* rhs, int k)
{
    replace_gather<double>(U, b, rhs, k);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_column_f64(const double* qw, const double* q, const double* diag, const double* beta, double* col, int n)
{
    replace_column<double>(qw, q, diag, beta, col, n);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_prep_f32(const float* q, float* diag, float* beta, int nv)
{
    replace_prep<float>(q, 1, nullptr, diag, beta, nv);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_prep2_f32(const float* qw, float* q, float* diag, float* beta, int nv)
{
    replace_prep<float>(qw, 2, q, diag, beta, nv);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_gather_f32(const float* U, const float* b, float* rhs, int k)
{
    replace_gather<float>(U, b, rhs, k);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_column_f32(const float* qw, const float* q, const float* diag, const float* beta, float* col, int n)
{
    replace_column<float>(qw, q, diag, beta, col, n);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_update_f64(const double* U, double* out, const double* q, const double* diag,
                   const double* beta, int k, int p)
{
    replace_update<double>(U, out, q, diag, beta, k, p);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_update_f32(const float* U, float* out, const float* q, const float* diag,
                   const float* beta, int k, int p)
{
    replace_update<float>(U, out, q, diag, beta, k, p);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_finish_f64(double* out, const double* col, double c, double rtol, double* status, int k)
{
    replace_finish<double>(out, col, c, rtol, status, k);
}

extern "C" __global__ void __launch_bounds__(MFAC_THREADS, MFAC_MIN_BLOCKS)
replace_finish_f32(float* out, const float* col, float c, float rtol, float* status, int k)
{
    replace_finish<float>(out, col, c, rtol, status, k);
}
