// C API of the CPU emulation build, for the tests (ctypes): which buffers to account, the bytes
// each kernel read and wrote in them, the schedule order, and the last launch error.
#include "cuda_emu.h"
#include "kernels/c_api.h"

extern "C" {

// Forget every tracked buffer and the last error.
S2_API void s2emu_reset(void) {
  emu::accounting().buffers.clear();
  emu::accounting().untracked_reads = emu::accounting().untracked_writes = 0;
  emu::last_error().clear();
}

// Account accesses to [ptr, ptr + bytes); returns the buffer's index.
S2_API int s2emu_track(const void* ptr, uint64_t bytes) {
  emu::Tracked t;
  t.begin = reinterpret_cast<uintptr_t>(ptr);
  t.end = t.begin + bytes;
  t.reads.assign(bytes, 0);
  t.writes.assign(bytes, 0);
  emu::accounting().buffers.push_back(std::move(t));
  return int(emu::accounting().buffers.size() - 1);
}

// For buffer i: total bytes read / written, and the least and most times any byte was read /
// written (min_* = 0 means some byte was never touched).
S2_API void s2emu_stats(int i, uint64_t* read_bytes, uint64_t* write_bytes, uint32_t* min_reads, uint32_t* max_reads,
                 uint32_t* min_writes, uint32_t* max_writes) {
  const emu::Tracked& t = emu::accounting().buffers.at(size_t(i));
  *read_bytes = t.read_bytes;
  *write_bytes = t.write_bytes;
  uint32_t lo_r = 0xffffffffu, hi_r = 0, lo_w = 0xffffffffu, hi_w = 0;
  for (size_t b = 0; b < t.reads.size(); ++b) {
    lo_r = t.reads[b] < lo_r ? t.reads[b] : lo_r;
    hi_r = t.reads[b] > hi_r ? t.reads[b] : hi_r;
    lo_w = t.writes[b] < lo_w ? t.writes[b] : lo_w;
    hi_w = t.writes[b] > hi_w ? t.writes[b] : hi_w;
  }
  *min_reads = t.reads.empty() ? 0 : lo_r;
  *max_reads = hi_r;
  *min_writes = t.writes.empty() ? 0 : lo_w;
  *max_writes = hi_w;
}

// Bytes accessed outside every tracked buffer (a test tracks all its buffers, so this must be 0).
S2_API void s2emu_untracked(uint64_t* reads, uint64_t* writes) {
  *reads = emu::accounting().untracked_reads;
  *writes = emu::accounting().untracked_writes;
}

// 1: resume the threads of a block in reverse order (a result that changes with the order means a
// missing barrier). Ignored by the host-thread build.
S2_API void s2emu_set_reverse(int reverse) {
#ifndef SAPIENS2_EMU_THREADS
  emu::reverse_schedule() = reverse != 0;
#else
  (void)reverse;
#endif
}

S2_API const char* s2emu_last_error(void) { return emu::last_error().c_str(); }

// The launch log (tests of the ops' launch plans): start clears it and records every launch until
// stop; then for launch i its kernel name and its merged [lo, hi) ranges of distinct bytes read
// (write = 0) or written (write = 1), copied as lo, hi pairs into `out` (up to `capacity` pairs;
// the return value is the number of ranges, so a caller can size the buffer and ask again).
S2_API void s2emu_log_start(void) {
  emu::LaunchLog& lg = emu::launch_log();
  lg.launches.clear();
  lg.running_reads.clear();
  lg.running_writes.clear();
  lg.on = true;
}

S2_API void s2emu_log_stop(void) { emu::launch_log().on = false; }

S2_API int s2emu_log_size(void) { return int(emu::launch_log().launches.size()); }

S2_API const char* s2emu_log_kernel(int i) { return emu::launch_log().launches.at(size_t(i)).kernel.c_str(); }

S2_API int s2emu_log_ranges(int i, int write, uint64_t* out, int capacity) {
  const emu::LaunchRecord& r = emu::launch_log().launches.at(size_t(i));
  const auto& v = write ? r.writes : r.reads;
  for (int j = 0; j < int(v.size()) && j < capacity; ++j) {
    out[2 * j] = v[size_t(j)].first;
    out[2 * j + 1] = v[size_t(j)].second;
  }
  return int(v.size());
}

}  // extern "C"
