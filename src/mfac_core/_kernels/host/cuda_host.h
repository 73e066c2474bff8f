// cuda_host.h: run the CUDA kernels of mfac_core/_kernels on the CPU, for tests.
//
// Include this header, then the .cu files verbatim; the kernels become plain C++ functions and
// cuda_host::launch(grid, block, body) runs `body` once per CUDA thread of every block.
//
// Model. Each CUDA thread of a block is a fiber (ucontext) with its own stack, so its local
// variables are private like registers; __shared__ variables are `static thread_local`, shared
// by the fibers of a block, which all run on one OS thread. __syncthreads() switches back to a
// scheduler, which resumes the next fiber; once every fiber of the block waits at the barrier,
// it releases them all. The order in which the fibers of a block run between two barriers is
// shuffled anew at every barrier (from a seed; seed 0 keeps thread order), so a missing
// barrier, i.e. a thread that reads a value another thread writes in the same phase, gives
// results that depend on the seed. Blocks are shared out among `workers` OS threads.
//
// Checked: a barrier reached by some threads of a block while others have exited (divergent
// __syncthreads) makes launch() return kBarrierDivergence. Not modelled: warps, warp-level
// intrinsics, atomics, dynamic shared memory, y and z dimensions (the kernels use none of them).
// Of CUDA's intrinsics, only the bit casts between floating-point and integer types are defined.
#ifndef MFAC_CUDA_HOST_H
#define MFAC_CUDA_HOST_H

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x, y, z;
};

namespace cuda_host {

enum : int { kOk = 0, kBarrierDivergence = 1 };
enum class State { ready, waiting, done };

// Fiber stacks: the kernels keep a few small arrays in locals; 256 KiB leaves ample room and
// costs only the pages touched.
constexpr std::size_t kStackBytes = 256 * 1024;

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    dim3 thread_idx;
    State state;
};

struct Worker {
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    dim3 block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
    const std::function<void()>* body = nullptr;
};

inline thread_local Worker* tls_worker = nullptr;

inline void fiber_entry()
{
    Worker* w = tls_worker;
    (*w->body)();
    w->current->state = State::done;
    // Returning resumes uc_link, the scheduler.
}

inline void syncthreads()
{
    Worker* w = tls_worker;
    w->current->state = State::waiting;
    // Every value in memory may have changed while other fibers ran.
    asm volatile("" ::: "memory");
    swapcontext(&w->current->context, &w->scheduler);
    asm volatile("" ::: "memory");
}

// A small deterministic generator for the shuffles (xorshift64*).
inline std::uint64_t next_random(std::uint64_t& s)
{
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ULL;
}

// Run the blocks handed out by `next` on the calling OS thread.
inline void run_blocks(unsigned grid, unsigned block, const std::function<void()>& body,
                       std::uint64_t seed, std::atomic<unsigned>& next, std::atomic<int>& error)
{
    Worker w;
    w.block_dim = {block, 1, 1};
    w.grid_dim = {grid, 1, 1};
    w.body = &body;
    w.fibers.resize(block);
    for (Fiber& f : w.fibers) f.stack.reset(new char[kStackBytes]);
    std::vector<unsigned> order(block);
    tls_worker = &w;
    for (unsigned bx; error.load() == kOk && (bx = next.fetch_add(1)) < grid;) {
        w.block_idx = {bx, 0, 0};
        for (unsigned t = 0; t < block; ++t) {
            Fiber& f = w.fibers[t];
            f.thread_idx = {t, 0, 0};
            f.state = State::ready;
            getcontext(&f.context);
            f.context.uc_stack.ss_sp = f.stack.get();
            f.context.uc_stack.ss_size = kStackBytes;
            f.context.uc_link = &w.scheduler;
            makecontext(&f.context, fiber_entry, 0);
            order[t] = t;
        }
        std::uint64_t rng = (seed ^ (0x9E3779B97F4A7C15ULL * (bx + 1))) | 1;
        for (;;) {
            if (seed != 0) {
                for (unsigned i = block - 1; i > 0; --i) {
                    const unsigned j = static_cast<unsigned>(next_random(rng) % (i + 1));
                    const unsigned tmp = order[i];
                    order[i] = order[j];
                    order[j] = tmp;
                }
            }
            for (unsigned t : order) {
                Fiber& f = w.fibers[t];
                if (f.state != State::ready) continue;
                w.current = &f;
                swapcontext(&w.scheduler, &f.context);
            }
            unsigned done = 0;
            for (const Fiber& f : w.fibers) done += f.state == State::done;
            if (done == block) break;
            if (done != 0) {  // some threads exited, the others wait at a barrier forever
                error.store(kBarrierDivergence);
                break;
            }
            for (Fiber& f : w.fibers) f.state = State::ready;
        }
    }
    tls_worker = nullptr;
}

// Run body() for every thread of a 1-D grid of 1-D blocks. Returns kOk or an error code.
inline int launch(unsigned grid, unsigned block, const std::function<void()>& body,
                  std::uint64_t seed, int workers)
{
    std::atomic<unsigned> next{0};
    std::atomic<int> error{kOk};
    const unsigned helpers = workers > 1 ? std::min<unsigned>(workers, grid) - 1 : 0;
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < helpers; ++i)
        pool.emplace_back([&] { run_blocks(grid, block, body, seed, next, error); });
    run_blocks(grid, block, body, seed, next, error);
    for (std::thread& t : pool) t.join();
    return error.load();
}

}  // namespace cuda_host

// The CUDA vocabulary the kernels use.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define threadIdx (::cuda_host::tls_worker->current->thread_idx)
#define blockIdx (::cuda_host::tls_worker->block_idx)
#define blockDim (::cuda_host::tls_worker->block_dim)
#define gridDim (::cuda_host::tls_worker->grid_dim)
inline void __syncthreads() { ::cuda_host::syncthreads(); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }

#endif  // MFAC_CUDA_HOST_H
