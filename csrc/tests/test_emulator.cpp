// Self-tests of the CPU emulation of CUDA (csrc/emu/cuda_emu.h): block barriers, thread and block
// indices, every warp shuffle (widths 1..32, checked against the PTX shfl.sync definition), ballot,
// __syncwarp, dynamic shared memory, the reverse schedule, per-byte global-memory accounting through
// the C API (csrc/emu/emu_capi.cpp), atomicAdd, and the failures the emulator must report instead of
// hanging or corrupting memory: a divergent __syncthreads or shuffle (deadlock), an access that
// straddles the end of a tracked buffer (out of bounds), bad launches.
//
// Build (CTest does this, so does tests/cuda/test_emulator.py):
//   g++ -std=c++17 -O1 -DSAPIENS2_EMU -Icsrc csrc/tests/test_emulator.cpp -o test_emulator
//   g++ -std=c++17 -O1 -DSAPIENS2_EMU -DSAPIENS2_EMU_THREADS -pthread -Icsrc ... (host-thread variant)
// Run: ./test_emulator [substring of test names]; exit status 0 when every check passes.
#include "kernels/device_common.cuh"

#include "emu/emu_capi.cpp"  // the emulator's C API, compiled into this test (and tested by it)

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

// ---- a tiny test framework ------------------------------------------------------------------------

namespace {

int g_checks = 0, g_failures = 0;

struct TestCase {
  const char* name;
  void (*fn)();
};

std::vector<TestCase>& registry() {
  static std::vector<TestCase> r;
  return r;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

void report_failure(const char* file, int line, const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

std::string show(const std::string& v) { return "\"" + v + "\""; }
template <class T>
std::string show(const T& v) {
  return std::to_string(v);
}
template <class A, class B>
std::string show_pair(const A& a, const B& b) {
  return " (" + show(a) + " vs " + show(b) + ")";
}

}  // namespace

#define TEST(name)                                   \
  static void name();                                \
  static Registrar registrar_##name(#name, name);    \
  static void name()

#define CHECK(cond)                                                   \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(cond)) report_failure(__FILE__, __LINE__, #cond);           \
  } while (0)

#define CHECK_EQ(a, b)                                                                 \
  do {                                                                                 \
    ++g_checks;                                                                        \
    const auto va_ = (a);                                                              \
    const auto vb_ = (b);                                                              \
    if (!(va_ == vb_)) report_failure(__FILE__, __LINE__, #a " == " #b + show_pair(va_, vb_)); \
  } while (0)

#define CHECK_CONTAINS(text, needle)                                                             \
  do {                                                                                           \
    ++g_checks;                                                                                  \
    const std::string t_ = (text);                                                               \
    if (t_.find(needle) == std::string::npos)                                                    \
      report_failure(__FILE__, __LINE__, std::string(#text " contains \"") + (needle) + "\" (got \"" + t_ + "\")"); \
  } while (0)

// Launch through the emulator exactly as the kernels' launchers do; returns "" or the error.
template <class... Params, class... Args>
static std::string run(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
  emu::last_error().clear();
  S2_LAUNCH(kernel, grid, block, smem, nullptr, args...);
  const int status = S2_LAUNCH_STATUS();
  std::string err = emu::last_error();
  emu::last_error().clear();
  if (status != 0 && err.empty()) err = "status " + std::to_string(status) + " without a message";
  if (status == 0 && !err.empty()) err = "status 0 but an error: " + err;
  return err;
}

#ifdef SAPIENS2_EMU_THREADS
static const bool kThreads = true;
#else
static const bool kThreads = false;
#endif

// The schedules to run order-sensitive tests in (the host-thread build has no fixed order).
static std::vector<int> orders() { return kThreads ? std::vector<int>{0} : std::vector<int>{0, 1}; }

// ---- kernels ----------------------------------------------------------------------------------------

__global__ void rotate_kernel(int* out, int rounds) {
  __shared__ int sh[1024];
  const unsigned n = blockDim.x, t = threadIdx.x;
  int v = int(t) + 1000 * int(blockIdx.x);
  for (int r = 0; r < rounds; ++r) {
    sh[t] = v;
    __syncthreads();
    v = sh[(t + 1) % n];
    __syncthreads();  // before the next round overwrites sh
  }
  out[blockIdx.x * n + t] = v;
}

__global__ void index_kernel(int* out) {
  const unsigned tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const unsigned bid = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned tid = (tz * blockDim.y + ty) * blockDim.x + tx;
  const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  out[bid * nthreads + tid] = int(tx | (ty << 6) | (tz << 9) | (blockIdx.x << 12) | (blockIdx.y << 16) | (blockIdx.z << 20));
}

enum Kind { kXor = 0, kDown = 1, kUp = 2, kIdx = 3 };

template <class T>
__global__ void shuffle_kernel(T* out, int kind, int arg, int width) {
  const unsigned t = threadIdx.x;
  T v = T(int(t % 32) * 10 + int(t / 32) * 1000);
  T r = v;
  switch (kind) {
    case kXor: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
    case kDown: r = __shfl_down_sync(0xffffffffu, v, unsigned(arg), width); break;
    case kUp: r = __shfl_up_sync(0xffffffffu, v, unsigned(arg), width); break;
    default: r = __shfl_sync(0xffffffffu, v, arg, width); break;
  }
  out[t] = r;
}

__global__ void ballot_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  out[threadIdx.x] = __ballot_sync(0xffffffffu, (lane + warp) % 3 == 0);
}

__global__ void syncwarp_kernel(int* out) {
  __shared__ int sh[64];
  const unsigned lane = threadIdx.x % 32, base = threadIdx.x - lane;
  sh[threadIdx.x] = int(threadIdx.x) * 7;
  __syncwarp();
  out[threadIdx.x] = sh[base + 31 - lane];
}

__global__ void block_sum_kernel(const float* x, float* out) {
  __shared__ float scratch[32];
  const float a = s2::block_sum(x[threadIdx.x], scratch);
  const float b = s2::block_sum(2.0f * x[threadIdx.x], scratch);  // twice in a row (scratch reuse)
  out[threadIdx.x] = a + b;
}

__global__ void dynamic_smem_kernel(float* out) {
  S2_DYNAMIC_SMEM(float, buf);
  const unsigned n = blockDim.x, t = threadIdx.x;
  buf[t] = float(t);
  buf[n + t] = float(100 * t);
  __syncthreads();
  out[t] = buf[n - 1 - t] + buf[n + (t + 1) % n];
}

__global__ void last_writer_kernel(int* out) {
  __shared__ int last;
  last = int(threadIdx.x);  // every thread writes, no barrier before: the schedule decides
  __syncthreads();
  out[threadIdx.x] = last;
}

__global__ void copy_kernel(const float* x, float* y, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) s2::gstore(y + i, 2.0f * s2::gload(x + i));
  if (i == 0) s2::gstore(y, s2::gload(x) + s2::gload(x));  // x[0] read twice more, y[0] written twice
}

__global__ void vec_copy_kernel(const float* x, float* y) {
  const int i = int(threadIdx.x) * 4;
  s2::gstore_vec<float, 4>(y + i, s2::gload_vec<float, 4>(x + i));
}

__global__ void vec_load_at_kernel(const float* x, float* y, int offset) {
  if (threadIdx.x == 0) {
    s2::Vec<float, 4> v = s2::gload_vec<float, 4>(x + offset);
    y[0] = v.v[0];
  }
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) __syncthreads();  // half the block never arrives
  out[threadIdx.x] = 1;
}

__global__ void divergent_shuffle_kernel(int* out) {
  int v = int(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half the warp
  out[threadIdx.x] = v;
}

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, int(threadIdx.x), 0); }

__global__ void bad_width_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1, 3); }

__global__ void atomic_kernel(float* acc) { atomicAdd(acc, 1.0f); }

// ---- tests --------------------------------------------------------------------------------------------

TEST(block_barrier_rotates_values_through_shared_memory) {
  for (int order : orders()) {
    s2emu_set_reverse(order);
    for (unsigned n : {32u, 64u, 256u}) {
      std::vector<int> out(3 * n, -1);
      CHECK_EQ(run(rotate_kernel, dim3(3), dim3(n), 0, out.data(), 5), std::string());
      for (unsigned b = 0; b < 3; ++b)
        for (unsigned t = 0; t < n; ++t) CHECK_EQ(out[b * n + t], int((t + 5) % n) + 1000 * int(b));
    }
  }
  s2emu_set_reverse(0);
}

TEST(thread_and_block_indices_in_three_dimensions) {
  const dim3 grid(2, 3, 2), block(32, 2, 2);
  std::vector<int> out(12 * 128, -1);
  CHECK_EQ(run(index_kernel, grid, block, 0, out.data()), std::string());
  for (unsigned bz = 0; bz < 2; ++bz)
    for (unsigned by = 0; by < 3; ++by)
      for (unsigned bx = 0; bx < 2; ++bx)
        for (unsigned tz = 0; tz < 2; ++tz)
          for (unsigned ty = 0; ty < 2; ++ty)
            for (unsigned tx = 0; tx < 32; ++tx) {
              const unsigned bid = (bz * 3 + by) * 2 + bx, tid = (tz * 2 + ty) * 32 + tx;
              CHECK_EQ(out[bid * 128 + tid], int(tx | (ty << 6) | (tz << 9) | (bx << 12) | (by << 16) | (bz << 20)));
            }
}

// The source lane of shfl.sync as the PTX ISA defines it (independent of the emulator's helpers):
// c = ((32 - width) << 8) | clamp, clamp = 0 for up and 31 otherwise.
static unsigned ptx_source(int kind, unsigned lane, unsigned b, unsigned width) {
  const unsigned seg = 32 - width, clamp = kind == kUp ? 0u : 31u;
  const int max_lane = int((lane & seg) | (clamp & ~seg & 31u)), min_lane = int(lane & seg);
  int j;
  bool ok;
  switch (kind) {
    case kUp: j = int(lane) - int(b); ok = j >= max_lane; break;
    case kDown: j = int(lane + b); ok = j <= max_lane; break;
    case kXor: j = int(lane ^ b); ok = j <= max_lane; break;
    default: j = min_lane | int(b & ~seg & 31u); ok = j <= max_lane; break;
  }
  return ok ? unsigned(j) : lane;
}

template <class T>
static void check_shuffles(const char* type) {
  const char* kinds[] = {"xor", "down", "up", "idx"};
  for (int kind = 0; kind < 4; ++kind)
    for (unsigned width : {32u, 16u, 8u, 4u, 2u, 1u})
      for (int arg : {0, 1, 2, 3, 5, 8, 16, 31}) {
        std::vector<T> out(64, T(-1));
        const std::string err = run(shuffle_kernel<T>, dim3(1), dim3(64), 0, out.data(), kind, arg, int(width));
        CHECK_EQ(err, std::string());
        int wrong = 0;
        for (unsigned t = 0; t < 64; ++t) {
          const unsigned src = ptx_source(kind, t % 32, unsigned(arg), width);
          const T want = T(int(src) * 10 + int(t / 32) * 1000);
          wrong += !(out[t] == want);
        }
        if (wrong) {
          report_failure(__FILE__, __LINE__, std::string(type) + " " + kinds[kind] + " arg " + std::to_string(arg) +
                                                 " width " + std::to_string(width) + ": " + std::to_string(wrong) +
                                                 " lanes differ from PTX shfl.sync");
        }
        ++g_checks;
      }
}

TEST(every_shuffle_kind_and_width_matches_ptx) {
  check_shuffles<int>("int");
  check_shuffles<float>("float");
  check_shuffles<double>("double");  // 8-byte values travel whole
  check_shuffles<int64_t>("int64");
}

TEST(ballot_and_syncwarp) {
  std::vector<unsigned> bal(96, 0);
  CHECK_EQ(run(ballot_kernel, dim3(1), dim3(96), 0, bal.data()), std::string());
  for (unsigned w = 0; w < 3; ++w) {
    unsigned want = 0;
    for (unsigned l = 0; l < 32; ++l) want |= unsigned((l + w) % 3 == 0) << l;
    for (unsigned l = 0; l < 32; ++l) CHECK_EQ(bal[w * 32 + l], want);
  }
  for (int order : orders()) {
    s2emu_set_reverse(order);
    std::vector<int> out(64, -1);
    CHECK_EQ(run(syncwarp_kernel, dim3(1), dim3(64), 0, out.data()), std::string());
    for (unsigned t = 0; t < 64; ++t) CHECK_EQ(out[t], int((t / 32) * 32 + 31 - t % 32) * 7);
  }
  s2emu_set_reverse(0);
}

TEST(block_sum_from_device_common) {
  for (int order : orders()) {
    s2emu_set_reverse(order);
    for (unsigned n : {32u, 96u, 1024u}) {
      std::vector<float> x(n), out(n, -1.0f);
      double want = 0;
      for (unsigned i = 0; i < n; ++i) want += (x[i] = float(int(i % 7) - 3));
      CHECK_EQ(run(block_sum_kernel, dim3(1), dim3(n), 0, x.data(), out.data()), std::string());
      for (unsigned i = 0; i < n; ++i) CHECK_EQ(out[i], float(3.0 * want));
    }
  }
  s2emu_set_reverse(0);
}

TEST(dynamic_shared_memory) {
  for (int order : orders()) {
    s2emu_set_reverse(order);
    const unsigned n = 128;
    std::vector<float> out(n, -1.0f);
    CHECK_EQ(run(dynamic_smem_kernel, dim3(1), dim3(n), 2 * n * sizeof(float), out.data()), std::string());
    for (unsigned t = 0; t < n; ++t) CHECK_EQ(out[t], float(n - 1 - t) + float(100 * ((t + 1) % n)));
  }
  s2emu_set_reverse(0);
  std::vector<float> out(32);
  CHECK_CONTAINS(run(dynamic_smem_kernel, dim3(1), dim3(32), 228 * 1024, out.data()), "dynamic shared memory");
}

TEST(reverse_order_resumes_threads_last_to_first) {
  if (kThreads) return;  // host threads have no fixed order
  std::vector<int> out(64, -1);
  s2emu_set_reverse(0);
  CHECK_EQ(run(last_writer_kernel, dim3(1), dim3(64), 0, out.data()), std::string());
  CHECK_EQ(out[0], 63);  // forward: thread 63 writes last
  s2emu_set_reverse(1);
  CHECK_EQ(run(last_writer_kernel, dim3(1), dim3(64), 0, out.data()), std::string());
  CHECK_EQ(out[5], 0);  // reverse: thread 0 writes last
  s2emu_set_reverse(0);
}

TEST(global_memory_bytes_are_counted_per_byte) {
  const int n = 100;
  std::vector<float> x(128, 1.5f), y(128, 0.0f);
  s2emu_reset();
  const int ix = s2emu_track(x.data(), n * sizeof(float));
  const int iy = s2emu_track(y.data(), n * sizeof(float));
  CHECK_EQ(run(copy_kernel, dim3(2), dim3(64), 0, (const float*)x.data(), y.data(), n), std::string());
  uint64_t rb, wb;
  uint32_t lo_r, hi_r, lo_w, hi_w;
  s2emu_stats(ix, &rb, &wb, &lo_r, &hi_r, &lo_w, &hi_w);
  CHECK_EQ(rb, uint64_t(n * 4 + 8));  // every element once, x[0] twice more
  CHECK_EQ(wb, uint64_t(0));
  CHECK_EQ(lo_r, 1u);
  CHECK_EQ(hi_r, 3u);
  CHECK_EQ(hi_w, 0u);
  s2emu_stats(iy, &rb, &wb, &lo_r, &hi_r, &lo_w, &hi_w);
  CHECK_EQ(rb, uint64_t(0));
  CHECK_EQ(wb, uint64_t(n * 4 + 4));
  CHECK_EQ(lo_w, 1u);
  CHECK_EQ(hi_w, 2u);
  CHECK_EQ(y[1], 3.0f);
  uint64_t ur, uw;
  s2emu_untracked(&ur, &uw);
  CHECK_EQ(ur + uw, uint64_t(0));
  // 128-bit accesses count all 16 bytes; an untracked buffer's bytes are counted apart
  s2emu_reset();
  const int jx = s2emu_track(x.data(), 32 * 4 * sizeof(float));
  CHECK_EQ(run(vec_copy_kernel, dim3(1), dim3(32), 0, (const float*)x.data(), y.data()), std::string());
  s2emu_stats(jx, &rb, &wb, &lo_r, &hi_r, &lo_w, &hi_w);
  CHECK_EQ(rb, uint64_t(512));
  CHECK_EQ(lo_r, 1u);
  CHECK_EQ(hi_r, 1u);
  s2emu_untracked(&ur, &uw);
  CHECK_EQ(ur, uint64_t(0));
  CHECK_EQ(uw, uint64_t(512));
  s2emu_reset();
}

TEST(divergent_syncthreads_is_reported_as_a_deadlock) {
  std::vector<int> out(64, 0);
  for (int order : orders()) {
    s2emu_set_reverse(order);
    CHECK_CONTAINS(run(divergent_barrier_kernel, dim3(2), dim3(64), 0, out.data()), "deadlock");
    CHECK_CONTAINS(run(divergent_shuffle_kernel, dim3(1), dim3(64), 0, out.data()), "deadlock");
  }
  s2emu_set_reverse(0);
  // the emulator is usable again afterwards
  std::vector<int> rot(64, -1);
  CHECK_EQ(run(rotate_kernel, dim3(1), dim3(64), 0, rot.data(), 1), std::string());
  CHECK_EQ(rot[63], 0);
}

TEST(access_straddling_a_tracked_buffer_is_out_of_bounds) {
  std::vector<float> mem(16, 0.0f), y(1, 0.0f);
  s2emu_reset();
  s2emu_track(mem.data(), 10 * sizeof(float));  // the tensor: 10 floats of a larger allocation
  const std::string err = run(vec_load_at_kernel, dim3(1), dim3(32), 0, (const float*)mem.data(), y.data(), 8);
  CHECK_CONTAINS(err, "out of bounds");
  CHECK_EQ(run(vec_load_at_kernel, dim3(1), dim3(32), 0, (const float*)mem.data(), y.data(), 4), std::string());
  // C API: a failing launcher's message is what s2emu_last_error returns
  emu::last_error() = "emu: example";
  CHECK_EQ(std::string(s2emu_last_error()), std::string("emu: example"));
  s2emu_reset();
  CHECK_EQ(std::string(s2emu_last_error()), std::string());
}

TEST(atomic_add_float) {
  float acc = 0.0f;
  s2emu_reset();
  const int i = s2emu_track(&acc, sizeof(float));
  CHECK_EQ(run(atomic_kernel, dim3(4), dim3(64), 0, &acc), std::string());
  CHECK_EQ(acc, 256.0f);
  uint64_t rb, wb;
  uint32_t lo_r, hi_r, lo_w, hi_w;
  s2emu_stats(i, &rb, &wb, &lo_r, &hi_r, &lo_w, &hi_w);
  CHECK_EQ(rb, uint64_t(256 * 4));
  CHECK_EQ(wb, uint64_t(256 * 4));
  s2emu_reset();
}

TEST(bad_launches_and_unsupported_features_are_errors) {
  std::vector<int> out(64, 0);
  CHECK_CONTAINS(run(rotate_kernel, dim3(1), dim3(48), 0, out.data(), 1), "multiple of 32");
  CHECK_CONTAINS(run(rotate_kernel, dim3(1), dim3(2048), 0, out.data(), 1), "at most 1024");
  CHECK_CONTAINS(run(rotate_kernel, dim3(1, 70000), dim3(32), 0, out.data(), 1), "65535");
  CHECK_CONTAINS(run(partial_mask_kernel, dim3(1), dim3(32), 0, out.data()), "full-warp masks");
  CHECK_CONTAINS(run(bad_width_kernel, dim3(1), dim3(32), 0, out.data()), "power of 2");
  CHECK_EQ(run(rotate_kernel, dim3(0), dim3(32), 0, out.data(), 1), std::string());  // empty grid: nothing runs
}

TEST(low_precision_conversions_round_to_nearest_even) {
  CHECK_EQ(__bfloat162float(__float2bfloat16(1.0f + 1.0f / 256)), 1.0f);              // tie -> even
  CHECK_EQ(__bfloat162float(__float2bfloat16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);  // tie -> even (up)
  CHECK(std::isnan(__bfloat162float(__float2bfloat16(NAN))));
  CHECK_EQ(__half2float(__float2half(65504.0f)), 65504.0f);
  CHECK_EQ(__half2float(__float2half(1.0f + 1.0f / 2048)), 1.0f);  // tie -> even
  CHECK(std::isinf(__half2float(__float2half(70000.0f))));
}

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int run_count = 0, failed_tests = 0;
  for (const TestCase& tc : registry()) {
    if (filter && !std::strstr(tc.name, filter)) continue;
    const int before = g_failures;
    std::printf("[ RUN      ] %s\n", tc.name);
    std::fflush(stdout);
    tc.fn();
    ++run_count;
    if (g_failures != before) ++failed_tests;
    std::printf("[ %s ] %s\n", g_failures == before ? "      OK" : "  FAILED", tc.name);
  }
  std::printf("%d tests (%s), %d checks, %d failed checks in %d tests\n", run_count,
              kThreads ? "host threads" : "fibers", g_checks, g_failures, failed_tests);
  return (g_failures == 0 && run_count > 0) ? 0 : 1;
}
