// Block-wide exclusive prefix sum, one value per thread (warp shuffles, then
// one warp over the per-warp sums). 64-bit so that E * (B - 1) of padding
// cannot overflow an offset.
#pragma once

namespace moe {

constexpr int kScanScratch = 33;  // 32 warp prefixes + the block total

// Returns the sum of `value` over the threads before this one; `*total` gets the
// sum over the block. Every thread of the block must call it (it synchronises);
// `scratch` is kScanScratch elements of shared memory, free again on return.
template <int kThreads>
__device__ long long block_exclusive_scan(long long value, long long* scratch, long long* total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 1024 threads");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  long long inclusive = value;
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const long long below = __shfl_up_sync(0xffffffffu, inclusive, delta);
    if (lane >= delta) inclusive += below;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();

  if (warp == 0) {
    const long long warp_sum = lane < kWarps ? scratch[lane] : 0;
    long long warp_inclusive = warp_sum;
#pragma unroll
    for (int delta = 1; delta < 32; delta <<= 1) {
      const long long below = __shfl_up_sync(0xffffffffu, warp_inclusive, delta);
      if (lane >= delta) warp_inclusive += below;
    }
    if (lane < kWarps) scratch[lane] = warp_inclusive - warp_sum;
    if (lane == kWarps - 1) scratch[32] = warp_inclusive;
  }
  __syncthreads();

  const long long exclusive = scratch[warp] + inclusive - value;
  *total = scratch[32];
  __syncthreads();
  return exclusive;
}

}  // namespace moe
