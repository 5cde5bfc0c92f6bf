// CPU emulation of the small subset of CUDA that the kernels in csrc/kernels use, so that the same
// kernel sources run (and are compared with float64 references) on a machine without a GPU.
//
// Model:
//   * the threads of a block are cooperative fibers (ucontext) on one OS thread, or, with
//     -DSAPIENS2_EMU_THREADS, real host threads (build that variant with -fsanitize=thread to find
//     shared-memory races: a missing __syncthreads becomes a reported data race);
//   * blocks run one after another, so `__shared__` variables are plain statics (one copy, reused
//     by every block, uninitialised in spirit exactly as on a GPU);
//   * __syncthreads is a block barrier; a barrier that not every thread reaches is reported as a
//     deadlock instead of hanging (both builds);
//   * warp shuffles and ballots exchange values through a per-warp slot array and a warp barrier;
//     only full-warp masks are supported (every kernel here keeps whole warps converged);
//   * every global-memory access goes through gload/gstore (csrc/kernels/device_common.cuh), which
//     count the bytes read and written per tracked buffer, byte by byte, so tests can assert that
//     each input is read once and each output written once; an access straddling the end of a
//     tracked buffer is reported as out of bounds. The counters (and atomicAdd) use relaxed
//     atomics, never a lock, so that they add no synchronisation ThreadSanitizer could mistake
//     for a barrier;
//   * optionally (s2emu_log_start, for the launch-plan tests) a launch log: each launch's kernel
//     name and the distinct byte ranges it read and wrote, whatever the buffers (the torch
//     bindings' inputs, outputs and scratch alike). Only that mode takes a lock per access.
//
// Self-tests: csrc/tests/test_emulator.cpp (CTest, and tests/cuda/test_emulator.py).
//
// Limits (documented in csrc/README.md): no tensor cores (mma/wgmma), no TMA, no async copies, no
// clusters, no cooperative groups, no atomics beyond atomicAdd on float, no partial-warp masks,
// blockDim a multiple of 32. Kernels that need those stay in Triton.
#pragma once

#ifndef SAPIENS2_EMU
#error "cuda_emu.h is for the CPU emulation build only (define SAPIENS2_EMU)"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef SAPIENS2_EMU_THREADS
#include <condition_variable>
#include <mutex>
#include <thread>
#else
#include <ucontext.h>
#endif

// ------------------------------------------------------------------------------------------------
// Qualifiers and launch geometry

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef void* cudaStream_t;
typedef int cudaError_t;
static constexpr cudaError_t cudaSuccess = 0;
static constexpr int warpSize = 32;

namespace emu {

struct ThreadState {
  dim3 thread_idx;
  unsigned linear = 0;
};

struct LaunchState {
  dim3 grid, block, block_idx;
  unsigned nthreads = 0;
  std::vector<unsigned char> dynamic_smem;
};

inline LaunchState& launch_state() {
  static LaunchState s;
  return s;
}

#ifdef SAPIENS2_EMU_THREADS
inline ThreadState*& current_thread() {
  thread_local ThreadState* t = nullptr;
  return t;
}
#else
// volatile: the scheduler changes it while a fiber sits in swapcontext; without it the compiler
// may prove the (non-escaping) static unchanged across that call and keep a stale threadIdx.
inline ThreadState* volatile& current_thread() {
  static ThreadState* volatile t = nullptr;
  return t;
}
#endif

}  // namespace emu

#define threadIdx (::emu::current_thread()->thread_idx)
#define blockIdx (::emu::launch_state().block_idx)
#define blockDim (::emu::launch_state().block)
#define gridDim (::emu::launch_state().grid)

// ------------------------------------------------------------------------------------------------
// Global-memory accounting

namespace emu {

struct Tracked {
  uintptr_t begin = 0, end = 0;
  std::vector<uint16_t> reads, writes;  // per byte, saturating
  uint64_t read_bytes = 0, write_bytes = 0;
};

struct Accounting {
  std::vector<Tracked> buffers;  // only changed between launches
  uint64_t untracked_reads = 0, untracked_writes = 0;
};

inline Accounting& accounting() {
  static Accounting a;
  return a;
}

// Counters are updated with relaxed atomics, not under a lock: in the host-thread build a mutex
// would order every pair of global accesses for ThreadSanitizer and hide real shared-memory races.
inline void relaxed_add(uint64_t& c, uint64_t v) { __atomic_fetch_add(&c, v, __ATOMIC_RELAXED); }
inline void saturating_inc(uint16_t& c) {
  uint16_t old = __atomic_load_n(&c, __ATOMIC_RELAXED);
  while (old != 0xffff &&
         !__atomic_compare_exchange_n(&c, &old, uint16_t(old + 1), true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// The launch log: off unless a test turned it on; `running` collects the accesses of the launch in
// progress, which end_launch() turns into merged [lo, hi) ranges of distinct bytes.
struct LaunchRecord {
  std::string kernel;
  std::vector<std::pair<uintptr_t, uintptr_t>> reads, writes;
};

struct LaunchLog {
  bool on = false;
  std::vector<LaunchRecord> launches;
  std::vector<std::pair<uintptr_t, uintptr_t>> running_reads, running_writes;
  std::mutex m;
};

inline LaunchLog& launch_log() {
  static LaunchLog l;
  return l;
}

inline std::vector<std::pair<uintptr_t, uintptr_t>> merge_ranges(std::vector<std::pair<uintptr_t, uintptr_t>> v) {
  std::sort(v.begin(), v.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> out;
  for (const auto& r : v) {
    if (!out.empty() && r.first <= out.back().second)
      out.back().second = r.second > out.back().second ? r.second : out.back().second;
    else
      out.push_back(r);
  }
  return out;
}

// A launch's name as written at the launch site: "(rms_norm_fwd_kernel<T, NV, VEC>)" -> "rms_norm_fwd_kernel".
inline std::string kernel_name(const char* spelled) {
  std::string s(spelled);
  size_t b = s.find_first_not_of("( ");
  size_t e = s.find_first_of("<)", b);
  s = s.substr(b, e == std::string::npos ? std::string::npos : e - b);
  size_t ns = s.rfind("::");
  return ns == std::string::npos ? s : s.substr(ns + 2);
}

inline void end_launch(const char* name) {
  LaunchLog& lg = launch_log();
  if (!lg.on) return;
  LaunchRecord r;
  r.kernel = kernel_name(name);
  r.reads = merge_ranges(std::move(lg.running_reads));
  r.writes = merge_ranges(std::move(lg.running_writes));
  lg.running_reads.clear();
  lg.running_writes.clear();
  lg.launches.push_back(std::move(r));
}

inline void count(const void* p, size_t bytes, bool write) {
  Accounting& a = accounting();
  uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  LaunchLog& lg = launch_log();
  if (lg.on) {
    std::lock_guard<std::mutex> g(lg.m);
    (write ? lg.running_writes : lg.running_reads).emplace_back(lo, lo + bytes);
  }
  for (Tracked& t : a.buffers) {
    if (lo >= t.begin && lo + bytes <= t.end) {
      auto& per_byte = write ? t.writes : t.reads;
      for (size_t i = 0; i < bytes; ++i) saturating_inc(per_byte[lo - t.begin + i]);
      relaxed_add(write ? t.write_bytes : t.read_bytes, bytes);
      return;
    }
    if (lo < t.end && lo + bytes > t.begin)
      throw std::runtime_error("emu: access straddles the end of a tracked buffer (out of bounds)");
  }
  relaxed_add(write ? a.untracked_writes : a.untracked_reads, bytes);
}

}  // namespace emu

// ------------------------------------------------------------------------------------------------
// Threads of a block: barriers and the scheduler

namespace emu {

[[noreturn]] inline void fail(const std::string& msg) { throw std::runtime_error("emu: " + msg); }

#ifdef SAPIENS2_EMU_THREADS

// A reusable barrier over `n` host threads (mutex + condition variable, which ThreadSanitizer
// understands as synchronisation). Threads that leave the kernel (return or throw) are counted:
// once every thread still running waits here while others have left, the barrier can never
// complete, and every waiter fails with a deadlock error instead of hanging.
struct Barrier {
  std::mutex mu;
  std::condition_variable cv;
  unsigned n = 0, arrived = 0, exited = 0;
  uint64_t generation = 0;
  bool broken = false;
  const char* what = "__syncthreads";

  void reset(unsigned n_) {
    n = n_;
    arrived = exited = 0;
    broken = false;
  }
  [[noreturn]] void deadlock() {
    throw std::runtime_error(std::string("emu: deadlock: some threads wait at ") + what +
                             " while others have left the kernel (divergent barrier or shuffle)");
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    if (broken) deadlock();
    uint64_t gen = generation;
    if (++arrived == n) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    if (arrived + exited == n) {
      broken = true;
      cv.notify_all();
      deadlock();
    }
    cv.wait(lock, [&] { return generation != gen || broken; });
    if (generation == gen) deadlock();
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mu);
    ++exited;
    if (arrived > 0 && arrived + exited == n) {
      broken = true;
      cv.notify_all();
    }
  }
};

struct Block {
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> slots[2];  // shuffle exchange, double-buffered by warp-barrier parity
  std::vector<unsigned> parity;    // per thread
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}

inline void syncthreads() { block()->block_barrier.wait(); }
inline void warp_barrier(unsigned warp) { block()->warp_barriers[warp].wait(); }

template <class Kernel>
void run_grid(const Kernel& body) {
  LaunchState& L = launch_state();
  Block b;
  b.warp_barriers = std::vector<Barrier>(L.nthreads / 32);
  for (auto& w : b.warp_barriers) w.what = "a warp shuffle / __syncwarp";
  b.slots[0].assign(L.nthreads, 0);
  b.slots[1].assign(L.nthreads, 0);
  b.parity.assign(L.nthreads, 0);
  block() = &b;
  for (unsigned bz = 0; bz < L.grid.z; ++bz)
    for (unsigned by = 0; by < L.grid.y; ++by)
      for (unsigned bx = 0; bx < L.grid.x; ++bx) {
        L.block_idx = dim3(bx, by, bz);
        b.block_barrier.reset(L.nthreads);
        for (auto& w : b.warp_barriers) w.reset(32);
        std::fill(b.parity.begin(), b.parity.end(), 0u);
        std::vector<std::thread> threads;
        std::vector<ThreadState> states(L.nthreads);
        std::exception_ptr error;  // the first failure (later ones are its consequences)
        std::mutex error_mu;
        for (unsigned t = 0; t < L.nthreads; ++t) {
          states[t].linear = t;
          states[t].thread_idx = dim3(t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y));
        }
        for (unsigned t = 0; t < L.nthreads; ++t) {
          threads.emplace_back([&, t] {
            current_thread() = &states[t];
            try {
              body();
            } catch (...) {
              std::lock_guard<std::mutex> lock(error_mu);
              if (!error) error = std::current_exception();
            }
            b.warp_barriers[t / 32].leave();
            b.block_barrier.leave();
          });
        }
        for (auto& th : threads) th.join();
        if (error) {
          block() = nullptr;
          std::rethrow_exception(error);
        }
      }
  block() = nullptr;
}

#else  // cooperative fibers

enum class Wait : uint8_t { none, block, warp, done };

struct Fiber {
  ucontext_t ctx;
  ThreadState state;
  Wait wait = Wait::none;
  uint64_t generation = 0;  // generation of the barrier it waits on
  char* stack = nullptr;
};

// Fiber stacks, kept from launch to launch: allocated once (uninitialised, so only the pages a
// thread touches are ever mapped) instead of 256 KiB zeroed per thread and launch.
constexpr size_t kFiberStack = 256 * 1024;
inline char* fiber_stack(unsigned i) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while (pool.size() <= i) pool.emplace_back(new char[kFiberStack]);
  return pool[i].get();
}

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* running = nullptr;
  unsigned block_arrived = 0;
  volatile uint64_t block_generation = 0;  // volatile: advanced by other fibers during a yield
  std::vector<unsigned> warp_arrived;
  std::vector<uint64_t> warp_generation;
  std::vector<uint64_t> slots[2];
  std::vector<unsigned> parity;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  bool reverse = false;  // resume threads in reverse order (shakes out missing barriers)
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}

inline bool& reverse_schedule() {
  static bool r = false;
  return r;
}

inline void yield() {
  Block* b = block();
  swapcontext(&b->running->ctx, &b->scheduler);
}

inline void syncthreads() {
  Block* b = block();
  Fiber* f = b->running;
  uint64_t gen = b->block_generation;
  if (++b->block_arrived == b->fibers.size()) {
    b->block_arrived = 0;
    ++b->block_generation;
    return;
  }
  f->wait = Wait::block;
  f->generation = gen;
  while (b->block_generation == gen) yield();
  f->wait = Wait::none;
}

inline void warp_barrier(unsigned warp) {
  Block* b = block();
  Fiber* f = b->running;
  uint64_t gen = b->warp_generation[warp];
  if (++b->warp_arrived[warp] == 32) {
    b->warp_arrived[warp] = 0;
    ++b->warp_generation[warp];
    return;
  }
  f->wait = Wait::warp;
  f->generation = gen;
  while (static_cast<volatile uint64_t*>(b->warp_generation.data())[warp] == gen) yield();
  f->wait = Wait::none;
}

inline void fiber_entry() {
  Block* b = block();
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  b->running->wait = Wait::done;
  swapcontext(&b->running->ctx, &b->scheduler);
}

template <class Kernel>
void run_grid(const Kernel& kernel_body) {
  LaunchState& L = launch_state();
  const std::function<void()> body = kernel_body;
  Block b;
  b.body = &body;
  b.reverse = reverse_schedule();
  b.fibers.resize(L.nthreads);
  b.warp_arrived.assign(L.nthreads / 32, 0);
  b.warp_generation.assign(L.nthreads / 32, 0);
  b.slots[0].assign(L.nthreads, 0);
  b.slots[1].assign(L.nthreads, 0);
  b.parity.assign(L.nthreads, 0);
  for (unsigned t = 0; t < L.nthreads; ++t) {
    b.fibers[t].state.linear = t;
    b.fibers[t].state.thread_idx = dim3(t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y));
    b.fibers[t].stack = fiber_stack(t);
  }
  block() = &b;
  for (unsigned bz = 0; bz < L.grid.z; ++bz)
    for (unsigned by = 0; by < L.grid.y; ++by)
      for (unsigned bx = 0; bx < L.grid.x; ++bx) {
        L.block_idx = dim3(bx, by, bz);
        for (Fiber& f : b.fibers) {
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kFiberStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
          f.wait = Wait::none;
        }
        b.block_arrived = 0;
        std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0u);
        unsigned done = 0;
        while (done < L.nthreads) {
          bool progressed = false;
          for (unsigned i = 0; i < L.nthreads; ++i) {
            Fiber& f = b.fibers[b.reverse ? L.nthreads - 1 - i : i];
            if (f.wait == Wait::done) continue;
            // A waiting fiber only runs once its barrier has moved on.
            if (f.wait == Wait::block && b.block_generation == f.generation) continue;
            if (f.wait == Wait::warp && b.warp_generation[f.state.linear / 32] == f.generation) continue;
            b.running = &f;
            current_thread() = &f.state;
            swapcontext(&b.scheduler, &f.ctx);
            progressed = true;
            if (f.wait == Wait::done) ++done;
            if (b.error) break;
          }
          if (b.error) break;
          if (!progressed && done < L.nthreads) {
            block() = nullptr;
            fail("deadlock: some threads wait at a barrier that others never reach (divergent __syncthreads "
                 "or shuffle)");
          }
        }
        if (b.error) {
          block() = nullptr;
          std::rethrow_exception(b.error);
        }
        if (b.block_arrived != 0) {
          block() = nullptr;
          fail("a block finished with threads still waiting at __syncthreads");
        }
      }
  block() = nullptr;
}

#endif

inline std::string& last_error() {
  static std::string e;
  return e;
}

// Launch `kernel(args...)` over grid x block, blocks one after another; `name` (the kernel as
// spelled at the launch site) labels the launch in the launch log.
template <class... Params, class... Args>
void launch_named(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block_dim, size_t dynamic_smem,
                  Args... args) {
  struct LogOnExit {
    const char* name;
    ~LogOnExit() { end_launch(name); }
  } log_on_exit{name};
  LaunchState& L = launch_state();
  try {
    L.grid = grid;
    L.block = block_dim;
    L.nthreads = block_dim.x * block_dim.y * block_dim.z;
    if (L.nthreads == 0 || L.nthreads % 32 != 0 || L.nthreads > 1024)
      fail("blockDim must hold a multiple of 32 threads, at most 1024 (got " + std::to_string(L.nthreads) + ")");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    if (grid.y > 65535 || grid.z > 65535) fail("gridDim.y and gridDim.z must be at most 65535");
    if (dynamic_smem > 227 * 1024) fail("dynamic shared memory above the 227 KiB per block of sm_90");
    L.dynamic_smem.assign(dynamic_smem, 0);
    run_grid([&] { kernel(args...); });
  } catch (const std::exception& e) {
    // Launchers are extern "C" and never throw: the failure becomes their status code, and the
    // message stays here for s2emu_last_error().
    if (last_error().empty()) last_error() = e.what();
  }
}

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block_dim, size_t dynamic_smem, Args... args) {
  launch_named("kernel", kernel, grid, block_dim, dynamic_smem, args...);
}

// kOk (0) when every launch since the last call succeeded, else kLaunchFailed (4).
inline int take_status() { return last_error().empty() ? 0 : 4; }

inline void* dynamic_smem() { return launch_state().dynamic_smem.data(); }

// ---- warp-level exchange ----------------------------------------------------------------------

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
}

template <class T>
T shuffle_from(T v, unsigned (*src_of)(unsigned lane, unsigned arg, unsigned width), unsigned arg,
               unsigned width) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  if (width == 0 || width > 32 || (width & (width - 1)) != 0)
    fail("shuffle width must be a power of 2 from 1 to 32 (got " + std::to_string(width) + ")");
  Block* b = block();
  unsigned me = current_thread()->linear;
  unsigned warp = me / 32, lane = me % 32;
  unsigned p = b->parity[me];
  b->parity[me] ^= 1u;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  b->slots[p][me] = raw;
  warp_barrier(warp);
  unsigned src = src_of(lane, arg, width);
  T out;
  uint64_t got = b->slots[p][warp * 32 + src];
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// Source lanes as PTX shfl.sync defines them for a segment of `width` lanes (CUDA's c operand
// ((32 - width) << 8) | 0x1f, or (32 - width) << 8 for up): out-of-range sources read their own
// value. xor may read from an *earlier* segment (PTX: j <= maxLane), never from a later one.
inline unsigned src_xor(unsigned lane, unsigned m, unsigned width) {
  unsigned s = lane ^ m;
  return (s / width <= lane / width) ? s : lane;
}
inline unsigned src_down(unsigned lane, unsigned d, unsigned width) {
  unsigned s = lane + d;
  return (s / width == lane / width && s < 32) ? s : lane;
}
inline unsigned src_up(unsigned lane, unsigned d, unsigned width) {
  return (lane % width >= d) ? lane - d : lane;
}
inline unsigned src_idx(unsigned lane, unsigned s, unsigned width) { return (lane / width) * width + s % width; }

}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::check_full_mask(mask);
  emu::warp_barrier(emu::current_thread()->linear / 32);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  emu::check_full_mask(mask);
  return emu::shuffle_from(v, emu::src_xor, unsigned(lane_mask), unsigned(width));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::check_full_mask(mask);
  return emu::shuffle_from(v, emu::src_down, delta, unsigned(width));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::check_full_mask(mask);
  return emu::shuffle_from(v, emu::src_up, delta, unsigned(width));
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  emu::check_full_mask(mask);
  return emu::shuffle_from(v, emu::src_idx, unsigned(src_lane), unsigned(width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::check_full_mask(mask);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) {
    // Each lane publishes its predicate; every lane ends up with all 32 of them.
    int p = __shfl_sync(mask, pred ? 1 : 0, int(l));
    bits |= unsigned(p != 0) << l;
  }
  return bits;
}

// ---- math intrinsics --------------------------------------------------------------------------

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// atomicAdd (float only): a relaxed compare-and-swap loop. Like the GPU's, it orders nothing else,
// so in the host-thread build ThreadSanitizer still sees races on other memory around it.
inline float atomicAdd(float* address, float value) {
  emu::count(address, sizeof(float), false);
  emu::count(address, sizeof(float), true);
  uint32_t* bits = reinterpret_cast<uint32_t*>(address);
  uint32_t old_bits = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    float old, sum;
    std::memcpy(&old, &old_bits, 4);
    sum = old + value;
    uint32_t new_bits;
    std::memcpy(&new_bits, &sum, 4);
    if (__atomic_compare_exchange_n(bits, &old_bits, new_bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
  }
}

// ---- low-precision types (storage + round-to-nearest-even conversion, as cuda_bf16/fp16) ------

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return float(v);
}
inline __half __float2half(float f) {
  _Float16 v = _Float16(f);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
