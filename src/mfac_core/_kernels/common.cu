// Definitions shared by the mfac_core kernels; every other .cu file of this folder includes it.
//
// The same text is compiled three ways:
//   * by NVRTC through cupy.RawModule: the launcher (_source.py) pastes this file in place of its
//     #include line, so CuPy's compile cache is keyed on the whole source;
//   * by nvcc in the tests (-cubin -Xptxas -v), to check registers and spills on sm_80/sm_90;
//   * by g++ with host/cuda_host.h, which runs the kernels on the CPU against NumPy.
// So this file and the kernels use no header, no warp intrinsics and no dynamic shared memory.
//
// Storage: row-major (C-contiguous) matrices, stacks of them one after another; every array
// argument is a pointer to its first entry plus leading dimensions and strides in elements.
#ifndef MFAC_COMMON_CU
#define MFAC_COMMON_CU

// Threads per block, for every kernel. They are seen as a 16 x 16 grid: on a 64 x 64 tile a
// thread owns the 4 x 4 entries (ty + 16 a, tx + 16 b), so the 16 threads of a half-warp touch
// 16 consecutive columns: distinct shared-memory banks, coalesced global accesses.
#define MFAC_THREADS 256
#define MFAC_SIDE 16
// Second argument of __launch_bounds__: at least two resident blocks per SM, i.e. at most 128
// registers per thread. The float64 tile loops want 60 to 110; with no minimum, ptxas' own
// occupancy target spilled a few bytes in some kernels (CUDA 13, sm_80 and sm_90).
#define MFAC_MIN_BLOCKS 2
// Edge of the diagonal blocks, panels and tiles. 64 keeps a float64 tile (plus one padding
// column against bank conflicts) at 33 KB, so two tiles' worth of shared memory stays under
// the 48 KB that a kernel gets without opting in.
#define MFAC_TILE 64
// Entries per thread along each axis of a tile (MFAC_TILE / MFAC_SIDE).
#define MFAC_PER 4

typedef long long mfac_index;

__device__ __forceinline__ double mfac_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float mfac_sqrt(float x) { return sqrtf(x); }
// 1 / sqrt(x): CUDA's rsqrt is accurate to 1 ulp in double and much shorter than a square root
// and a division; the host harness defines it as 1 / sqrt(x).
__device__ __forceinline__ double mfac_rsqrt(double x) { return rsqrt(x); }
__device__ __forceinline__ float mfac_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double mfac_abs(double x) { return fabs(x); }
__device__ __forceinline__ float mfac_abs(float x) { return fabsf(x); }
__device__ __forceinline__ int mfac_min(int a, int b) { return a < b ? a : b; }

#endif  // MFAC_COMMON_CU
