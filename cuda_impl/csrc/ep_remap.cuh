// EP remap (SPEC §6): global topk_ids -> one rank's local expert ids, -1 where
// the rank does not own the expert. Included by moe_align.cu (one library).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moe_config.cuh"

namespace moe {

enum EpStrategy : int { kLinear = 0, kRoundRobin = 1 };

// The experts rank `rank` owns, in a form one route can be tested against.
struct EpOwnership {
  long long owned_below;  // round_robin: globals >= this belong to nobody (only under the fault)
  long long start;        // linear: first owned global id
  long long count;        // linear: number of owned experts
};

__host__ __device__ inline EpOwnership ep_ownership(long long num_global, long long ranks,
                                                    long long rank) {
  const long long base = num_global / ranks;
  long long rem = num_global % ranks;
  long long owned_below = num_global;
  if (kFaultUnevenEpTruncates) {
    // The bug: every rank gets G // R experts; the last G % R belong to nobody.
    rem = 0;
    owned_below = base * ranks;
  }
  const long long start = rank * base + (rank < rem ? rank : rem);
  const long long count = base + (rank < rem ? 1 : 0);
  return {owned_below, start, count};
}

template <typename InT, typename OutT>
__global__ void __launch_bounds__(kRouteBlockThreads)
    ep_remap_kernel(const InT* __restrict__ global_ids, OutT* __restrict__ local_ids,
                    long long numel, long long num_global, long long ranks, long long rank,
                    int strategy) {
  const EpOwnership own = ep_ownership(num_global, ranks, rank);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const long long g = static_cast<long long>(global_ids[i]);
    long long local = -1;
    if (g >= 0 && g < own.owned_below) {
      if (strategy == kLinear) {
        if (g >= own.start && g < own.start + own.count) local = g - own.start;
      } else if (g % ranks == rank) {
        local = g / ranks;
      }
    }
    local_ids[i] = static_cast<OutT>(local);
  }
}

template <typename InT, typename OutT>
void launch_ep_remap(const void* global_ids, void* local_ids, long long numel, long long num_global,
                     long long ranks, long long rank, int strategy, cudaStream_t stream) {
  long long blocks = (numel + kRouteBlockThreads - 1) / kRouteBlockThreads;
  if (blocks > kMaxRouteBlocks) blocks = kMaxRouteBlocks;
  ep_remap_kernel<InT, OutT><<<static_cast<unsigned>(blocks), kRouteBlockThreads, 0, stream>>>(
      static_cast<const InT*>(global_ids), static_cast<OutT*>(local_ids), numel, num_global, ranks,
      rank, strategy);
}

}  // namespace moe
