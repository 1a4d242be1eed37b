// MoE block-alignment kernels: plain align (SPEC §3), LoRA-aware align in the
// vLLM (§4) and SGLang (§5) conventions, SGLang's plain align (docs/SPEC.md,
// sglang-align: E + 1 buckets, bucket 0 the -1 routes) and the EP remap (§6,
// ep_remap.cuh).
//
// Plain CUDA C++ with an extern "C" host API taking raw device pointers, so
// cuda_impl/cuda.py can bind it with ctypes. Every entry point returns a
// status: 0, a cudaError_t (> 0) or a moe::Status (< 0, argument outside the
// kernels' limits).
//
// One "slot entry" is one element of lora_ids (plain align: a single entry,
// slot 0, every route). Two paths, chosen per call by uses_small_path():
//
//  small  small_align_kernel, grid (entries, 2). Both blocks of an entry count
//         its routes into a shared-memory histogram and scan it; block y=0
//         (sorter) then writes num_tokens_post_pad and scatters the routes,
//         block y=1 (filler) writes the pad values and expert_ids. The two
//         blocks write disjoint positions, so no ordering between them is needed.
//  large  setup_entries_kernel (which entries write which rows), count_kernel
//         (global atomics, grid-stride), offsets_fill_kernel (grid (entries,
//         1 + F): y=0 scans one expert per thread and publishes the offsets and
//         the total, y>=1 redo the scan and fill pads and expert_ids), then
//         scatter_kernel (grid-stride, atomic cursor per expert).
//
// Order inside an expert segment comes from atomics: unspecified (STABLE = False).
#include <cuda_runtime.h>

#include <cstdint>

#include "block_scan.cuh"
#include "ep_remap.cuh"
#include "moe_config.cuh"

namespace moe {
namespace {

enum Mode : int { kPlain = 0, kVllm = 1, kSglang = 2, kSglangAlign = 3 };

// One row, every route (no LoRA slots): plain align and SGLang's plain align.
__host__ __device__ inline bool single_row(int mode) {
  return mode == kPlain || mode == kSglangAlign;
}

// What the blocks of one slot entry write into the entry's row.
constexpr int kWritesCounts = 1;  // num_tokens_post_pad[slot] and the expert_ids row
constexpr int kWritesSorted = 2;  // the sorted_token_ids row: pad values and routes

constexpr int32_t kInactiveBlock = kFaultInactiveBlocksZero ? 0 : -1;  // the bug: 0, not -1

struct AlignParams {
  int mode;
  int options;           // kOpt* bits (kSglangAlign); kOptPad for the other modes
  const void* topk_ids;  // int32 or int64 [T, K], the kernel's template type
  long long num_routes;  // N = T * K, also the pad value
  long long topk;        // K (>= 1 whenever N > 0)
  int num_experts;       // E (kSglangAlign: E + 1 buckets)
  long long block_size;  // B
  const int32_t* expert_map;          // [E] or null
  const int32_t* token_lora_mapping;  // vLLM: [T]
  const int32_t* seg_indptr;          // SGLang: [R + 1], ascending
  const int32_t* req_to_lora;         // SGLang: [R]
  int num_requests;                   // R
  const int32_t* lora_ids;            // LoRA: the slot of each entry
  int num_entries;                    // entries of lora_ids the launch covers
  const int32_t* adapter_enabled;
  long long num_adapter_enabled;
  int max_loras;         // L (1 for plain align)
  long long row_len;     // P: row stride of sorted_token_ids
  long long row_blocks;  // M: row stride of expert_ids
  int32_t* sorted_token_ids;
  int32_t* expert_ids;
  int32_t* num_tokens_post_pad;
  // Large-path workspace.
  int32_t* counts;      // [num_lora_ids][E] routes per expert
  int32_t* cursors;     // [num_lora_ids][E] routes scattered so far
  long long* offsets;   // [num_lora_ids][E + 1] exclusive padded offsets, then the total
  int32_t* entry_flags; // [num_lora_ids] kWrites* of each entry
  int32_t* entry_of_slot;  // [L] the entry whose routes a slot's tokens count towards, or -1
};

struct Entry {
  int slot;
  int flags;
};

__host__ __device__ inline bool uses_small_path(long long num_routes, long long num_experts) {
  return num_routes <= kSmallPathMaxRoutes && num_experts <= kSmallPathMaxExperts;
}

__device__ inline long long round_up(long long value, long long multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

__device__ inline int slot_of_entry(const AlignParams& p, int entry) {
  return single_row(p.mode) ? 0 : p.lora_ids[entry];
}

// Which rows entry `entry` writes. A slot outside [0, L), a disabled slot and a
// repeated entry write nothing (the first occurrence of a slot owns its row).
__device__ Entry resolve_entry(const AlignParams& p, int entry) {
  if (single_row(p.mode)) return {0, kWritesCounts | kWritesSorted};
  const int slot = p.lora_ids[entry];
  // no-slot-upper-guard: the `slot < L` half of the guard is missing.
  if (slot < 0 || (!kFaultNoSlotUpperGuard && slot >= p.max_loras)) return {slot, 0};
  for (int earlier = 0; earlier < entry; ++earlier) {
    if (p.lora_ids[earlier] == slot) return {slot, 0};
  }
  // Only the unguarded build gets here with slot >= L: like the real bug it reads
  // adapter_enabled[slot] while that is inside the array; past it, it reads garbage,
  // which counts as enabled.
  const bool enabled = slot < p.num_adapter_enabled ? p.adapter_enabled[slot] != 0 : true;
  if (enabled) return {slot, kWritesCounts | kWritesSorted};
  // sort-ignores-disabled: the sorted_token_ids pass (pad fill and scatter) skips the check.
  return {slot, kFaultSortIgnoresDisabled ? kWritesSorted : 0};
}

// The adapter slot of token t; -1 for none.
__device__ int slot_of_token(const AlignParams& p, long long t) {
  if (p.mode == kVllm) return p.token_lora_mapping[t];
  if (p.mode == kSglang) {
    // The last request starting at or before t; a token before the first request
    // or past the last one's end has none.
    if (p.num_requests <= 0 || p.seg_indptr[0] > t) return -1;
    int lo = 0;
    int hi = p.num_requests;
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (p.seg_indptr[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo < p.num_requests ? p.req_to_lora[lo] : -1;
  }
  return 0;
}

// The effective expert of a route (SPEC §3 step 1); -1 when the route is dropped.
// SGLang's plain align: the bucket g + 1 (a -1 id: bucket 0, unless
// ignore_invalid_expert drops it); ids outside [-1, E) are dropped.
template <typename IdT>
__device__ int effective_expert(const AlignParams& p, long long route) {
  long long g = static_cast<long long>(static_cast<const IdT*>(p.topk_ids)[route]);
  if (p.mode == kSglangAlign) {
    if (kFaultNegativeExpertKept && g < -1) {
      g += p.num_experts;  // the bug: the id indexes the bucket table from its end
    } else if (!kFaultNegativeExpertKept && g < 0 && (p.options & kOptIgnoreInvalid)) {
      return -1;  // (the faulty build keeps -1 routes although asked to drop them)
    }
    const long long bucket = g + 1;
    return bucket < 0 || bucket >= p.num_experts ? -1 : static_cast<int>(bucket);
  }
  if (kFaultNegativeExpertKept && g < 0) {
    // The bug: only g < E is checked and g indexes the per-expert counters. In
    // the [rows][E] counter tables of the kernels this one stands for, index -1
    // is expert E - 1 of the row before; our tables are per slot, so the wrap
    // is spelled out (ids below -E would leave the table: still dropped).
    g += p.num_experts;
  }
  if (g < 0 || g >= p.num_experts) return -1;
  int e = static_cast<int>(g);
  if (p.expert_map != nullptr) {
    e = p.expert_map[e];
    if (e < 0 || e >= p.num_experts) return -1;
  }
  return e;
}

// The expert whose padded segment holds `pos`: the last e with offset[e] <= pos
// (empty segments share their successor's offset). Needs 0 <= pos < offset[E].
__device__ inline int segment_of(const long long* offset, int num_experts, long long pos) {
  int lo = 0;
  int hi = num_experts - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (offset[mid] <= pos) lo = mid; else hi = mid - 1;
  }
  return lo;
}

#if MOE_FAULT_ODD_BLOCK_RESETS_COUNT
constexpr unsigned kRaceDelayNs = 1000;
constexpr int kRaceDelaySteps = 40;

// A coin that differs from launch to launch (the global nanosecond timer mixed
// with this SM's cycle counter).
__device__ inline bool race_coin() {
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  const unsigned long long cycles = static_cast<unsigned long long>(clock64());
  return (((now >> 10) ^ (now >> 17) ^ (cycles >> 5)) & 1ull) != 0;
}
#endif

// The sorter publishes the slot's total. In the odd-block-resets-count build the
// write is held back ~40 us on about half the launches, standing in for the
// scheduling noise of a loaded GPU: then the filler's stray reset (below) lands
// first and the result is right; otherwise the reset lands last and wins.
__device__ inline void publish_total(const AlignParams& p, int slot, long long total) {
#if MOE_FAULT_ODD_BLOCK_RESETS_COUNT
  if (!single_row(p.mode) && race_coin()) {
    for (int step = 0; step < kRaceDelaySteps; ++step) __nanosleep(kRaceDelayNs);
  }
#endif
  p.num_tokens_post_pad[slot] = static_cast<int32_t>(total);
}

// odd-block-resets-count: a fill block with an odd blockIdx.y also zeroes the
// slot's total after its fill loop, unordered with the sorter's write of it.
__device__ inline void odd_block_resets_count(const AlignParams& p, int slot) {
  if (kFaultOddBlockResetsCount && !single_row(p.mode) && (blockIdx.y & 1u) != 0) {
    __syncthreads();
    if (threadIdx.x == 0) p.num_tokens_post_pad[slot] = 0;
  }
}

// The filler's share of a row, positions first, first + stride, ...: pad values in
// sorted_token_ids (segment tails and everything from the total on) and expert_ids.
// SGLang's plain align writes pad values only with kOptPad, and expert_ids only
// inside the segments (bucket b is expert b - 1); the rest keeps the caller's values.
__device__ void fill_row(const AlignParams& p, const Entry& entry, const long long* offset,
                         const int* count, long long first, long long stride) {
  const int num_experts = p.num_experts;
  const long long total = offset[num_experts];
  const bool sglang = p.mode == kSglangAlign;
  if ((entry.flags & kWritesSorted) && (p.options & kOptPad)) {
    int32_t* row = p.sorted_token_ids + static_cast<long long>(entry.slot) * p.row_len;
    const int32_t pad = static_cast<int32_t>(p.num_routes);
    // vector-tail-overrun: the fill runs over ceil(P / 4) whole vectors of 4 ints
    // (SGLang stores them 16 bytes at a time), 1-3 ints past the row when P % 4 != 0.
    const long long fill_end = kFaultVectorTailOverrun && sglang
                                   ? round_up(p.row_len, kVectorInts)
                                   : p.row_len;
    for (long long pos = first; pos < fill_end; pos += stride) {
      if (pos < total) {
        const int e = segment_of(offset, num_experts, pos);
        if (pos - offset[e] < count[e]) continue;  // a route's place: the sorter writes it
      }
      row[pos] = pad;
    }
  }
  if (entry.flags & kWritesCounts) {
    int32_t* row = p.expert_ids + static_cast<long long>(entry.slot) * p.row_blocks;
    for (long long block = first; block < p.row_blocks; block += stride) {
      const long long start = block * p.block_size;
      if (start < total) {
        row[block] = segment_of(offset, num_experts, start) - (sglang ? 1 : 0);
      } else if (!sglang) {
        row[block] = kInactiveBlock;
      }
    }
  }
}

__device__ inline void write_route(const AlignParams& p, int slot, long long pos, long long route) {
  // pos >= P only when P is too small for the data (a caller error): drop, never overrun.
  if (pos < p.row_len) {
    p.sorted_token_ids[static_cast<long long>(slot) * p.row_len + pos] =
        static_cast<int32_t>(route);
  }
}

// ---- small path ---------------------------------------------------------

template <typename IdT>
__global__ void __launch_bounds__(kSmallBlockThreads) small_align_kernel(AlignParams p) {
  __shared__ int s_expert[kSmallPathMaxRoutes];  // each route's expert in this slot, or -1
  __shared__ int s_count[kSmallPathMaxExperts];
  __shared__ int s_cursor[kSmallPathMaxExperts];
  __shared__ long long s_offset[kSmallPathMaxExperts + 1];
  __shared__ long long s_scan[kScanScratch];

  const Entry entry = resolve_entry(p, static_cast<int>(blockIdx.x));
  if (entry.flags == 0) return;
  const bool sorter = blockIdx.y == 0;
  const int num_experts = p.num_experts;

  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    s_count[e] = 0;
    s_cursor[e] = 0;
  }
  __syncthreads();
  for (long long route = threadIdx.x; route < p.num_routes; route += blockDim.x) {
    int e = -1;
    if (slot_of_token(p, route / p.topk) == entry.slot) e = effective_expert<IdT>(p, route);
    s_expert[route] = e;
    if (e >= 0) atomicAdd(&s_count[e], 1);
  }
  __syncthreads();

  const long long padded =
      threadIdx.x < num_experts ? round_up(s_count[threadIdx.x], p.block_size) : 0;
  long long total;
  const long long offset = block_exclusive_scan<kSmallBlockThreads>(padded, s_scan, &total);
  if (threadIdx.x < num_experts) s_offset[threadIdx.x] = offset;
  if (threadIdx.x == 0) s_offset[num_experts] = total;
  __syncthreads();

  if (sorter) {
    if (threadIdx.x == 0 && (entry.flags & kWritesCounts)) publish_total(p, entry.slot, total);
    if (entry.flags & kWritesSorted) {
      for (long long route = threadIdx.x; route < p.num_routes; route += blockDim.x) {
        const int e = s_expert[route];
        if (e >= 0) write_route(p, entry.slot, s_offset[e] + atomicAdd(&s_cursor[e], 1), route);
      }
    }
  } else {
    fill_row(p, entry, s_offset, s_count, threadIdx.x, blockDim.x);
    if (entry.flags & kWritesCounts) odd_block_resets_count(p, entry.slot);
  }
}

// ---- large path ---------------------------------------------------------

__global__ void setup_entries_kernel(AlignParams p) {
  for (int entry = threadIdx.x; entry < p.num_entries; entry += blockDim.x) {
    p.entry_flags[entry] = resolve_entry(p, entry).flags;
  }
  for (int slot = threadIdx.x; slot < p.max_loras; slot += blockDim.x) {
    int owner = -1;
    for (int entry = 0; entry < p.num_entries && owner < 0; ++entry) {
      if (slot_of_entry(p, entry) == slot) owner = entry;
    }
    const bool counts = owner >= 0 && (resolve_entry(p, owner).flags & kWritesSorted) != 0;
    p.entry_of_slot[slot] = counts ? owner : -1;
  }
}

__device__ inline int entry_of_route(const AlignParams& p, long long route) {
  const int slot = slot_of_token(p, route / p.topk);
  return slot >= 0 && slot < p.max_loras ? p.entry_of_slot[slot] : -1;
}

template <typename IdT>
__global__ void __launch_bounds__(kRouteBlockThreads) count_kernel(AlignParams p) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long route = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
       route < p.num_routes; route += stride) {
    const int entry = entry_of_route(p, route);
    if (entry < 0) continue;
    const int e = effective_expert<IdT>(p, route);
    if (e >= 0) atomicAdd(&p.counts[static_cast<long long>(entry) * p.num_experts + e], 1);
  }
}

__global__ void __launch_bounds__(kScanThreads) offsets_fill_kernel(AlignParams p) {
  __shared__ int s_count[kMaxExperts];
  __shared__ long long s_offset[kMaxExperts + 1];
  __shared__ long long s_scan[kScanScratch];

  const int entry_index = static_cast<int>(blockIdx.x);
  const Entry entry = {slot_of_entry(p, entry_index), p.entry_flags[entry_index]};
  if (entry.flags == 0) return;
  const int num_experts = p.num_experts;

  const int count = threadIdx.x < num_experts
                        ? p.counts[static_cast<long long>(entry_index) * num_experts + threadIdx.x]
                        : 0;
  if (threadIdx.x < num_experts) s_count[threadIdx.x] = count;
  long long total;
  const long long offset =
      block_exclusive_scan<kScanThreads>(round_up(count, p.block_size), s_scan, &total);
  if (threadIdx.x < num_experts) s_offset[threadIdx.x] = offset;
  if (threadIdx.x == 0) s_offset[num_experts] = total;
  __syncthreads();

  if (blockIdx.y == 0) {
    long long* published = p.offsets + static_cast<long long>(entry_index) * (num_experts + 1);
    for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) published[e] = s_offset[e];
    if (threadIdx.x == 0 && (entry.flags & kWritesCounts)) publish_total(p, entry.slot, total);
  } else {
    const long long fillers = gridDim.y - 1;
    fill_row(p, entry, s_offset, s_count,
             static_cast<long long>(blockIdx.y - 1) * blockDim.x + threadIdx.x,
             fillers * blockDim.x);
    if (entry.flags & kWritesCounts) odd_block_resets_count(p, entry.slot);
  }
}

template <typename IdT>
__global__ void __launch_bounds__(kRouteBlockThreads) scatter_kernel(AlignParams p) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long route = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
       route < p.num_routes; route += stride) {
    const int entry = entry_of_route(p, route);
    if (entry < 0) continue;
    const int e = effective_expert<IdT>(p, route);
    if (e < 0) continue;
    const long long base = p.offsets[static_cast<long long>(entry) * (p.num_experts + 1) + e];
    const int rank = atomicAdd(&p.cursors[static_cast<long long>(entry) * p.num_experts + e], 1);
    write_route(p, slot_of_entry(p, entry), base + rank, route);
  }
}

// ---- host side ----------------------------------------------------------

struct WorkspaceLayout {
  size_t counts, cursors, offsets, entry_flags, entry_of_slot, bytes;
};

size_t align_up(size_t bytes) { return (bytes + 255) & ~static_cast<size_t>(255); }

WorkspaceLayout workspace_layout(long long num_entries, long long num_experts, long long max_loras) {
  WorkspaceLayout w{};
  size_t at = 0;
  w.counts = at;
  at = align_up(at + sizeof(int32_t) * num_entries * num_experts);
  w.cursors = at;
  at = align_up(at + sizeof(int32_t) * num_entries * num_experts);
  w.offsets = at;
  at = align_up(at + sizeof(long long) * num_entries * (num_experts + 1));
  w.entry_flags = at;
  at = align_up(at + sizeof(int32_t) * num_entries);
  w.entry_of_slot = at;
  at = align_up(at + sizeof(int32_t) * max_loras);
  w.bytes = at;
  return w;
}

unsigned route_blocks(long long num_routes, int mode) {
  long long blocks = (num_routes + kRouteBlockThreads - 1) / kRouteBlockThreads;
  // zero-grid-launch: plain align launches ceil(N / threads) blocks, 0 for N = 0.
  if (blocks < 1 && !(kFaultZeroGridLaunch && mode == kPlain)) blocks = 1;
  if (blocks > kMaxRouteBlocks) blocks = kMaxRouteBlocks;
  return static_cast<unsigned>(blocks);
}

unsigned fill_blocks(long long row_len, long long row_blocks) {
  const long long positions = row_len > row_blocks ? row_len : row_blocks;
  long long blocks = (positions + kFillPositionsPerBlock - 1) / kFillPositionsPerBlock;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxFillBlocks) blocks = kMaxFillBlocks;
  return static_cast<unsigned>(blocks);
}

template <typename IdT>
void launch_align(const AlignParams& p, bool small, unsigned entries, cudaStream_t stream) {
  if (small) {
    small_align_kernel<IdT><<<dim3(entries, 2), kSmallBlockThreads, 0, stream>>>(p);
    return;
  }
  setup_entries_kernel<<<1, kRouteBlockThreads, 0, stream>>>(p);
  count_kernel<IdT><<<route_blocks(p.num_routes, p.mode), kRouteBlockThreads, 0, stream>>>(p);
  offsets_fill_kernel<<<dim3(entries, 1 + fill_blocks(p.row_len, p.row_blocks)), kScanThreads, 0,
                        stream>>>(p);
  scatter_kernel<IdT><<<route_blocks(p.num_routes, p.mode), kRouteBlockThreads, 0, stream>>>(p);
}

constexpr long long kInt32Max = 2147483647LL;

}  // namespace
}  // namespace moe

using namespace moe;

extern "C" {

// SMALL_PATH_MAX_ROUTES, SMALL_PATH_MAX_EXPERTS, MAX_EXPERTS into out[0..2].
void moe_align_limits(int64_t* out) {
  out[0] = kSmallPathMaxRoutes;
  out[1] = kSmallPathMaxExperts;
  out[2] = kMaxExperts;
}

// The fault this build switches on ("" for the correct build).
const char* moe_align_fault(void) { return kFaultName; }

int moe_align_uses_small_path(int64_t num_routes, int64_t num_experts) {
  return uses_small_path(num_routes, num_experts) ? 1 : 0;
}

// Bytes of device workspace moe_align_launch needs (0 on the small path).
int64_t moe_align_workspace_bytes(int64_t num_routes, int64_t num_experts, int64_t num_lora_ids,
                                  int64_t max_loras) {
  if (uses_small_path(num_routes, num_experts)) return 0;
  if (num_experts < 0 || num_experts > kMaxExperts || num_lora_ids < 0 ||
      num_lora_ids > kMaxSlotEntries || max_loras < 0 || max_loras > kMaxSlotEntries) {
    return 0;  // moe_align_launch rejects these sizes before touching the workspace
  }
  return static_cast<int64_t>(workspace_layout(num_lora_ids, num_experts, max_loras).bytes);
}

const char* moe_align_status_string(int status) {
  if (status > 0) return cudaGetErrorString(static_cast<cudaError_t>(status));
  switch (status) {
    case kOk: return "success";
    case kErrMode: return "unknown dialect mode";
    case kErrNumExperts: return "num_experts outside [1, MAX_EXPERTS]";
    case kErrBlockSize: return "block_size must be >= 1";
    case kErrShape: return "negative tensor size";
    case kErrMaxLoras: return "max_loras or lora_ids length outside the supported range";
    case kErrPadding: return "max_num_tokens_padded and max_num_m_blocks must be >= 0";
    case kErrWorkspace: return "workspace missing or too small";
    case kErrTooManyRoutes: return "more than 2**31 - 1 routes (the pad value is int32)";
    case kErrEpArgs: return "EP arguments outside their ranges";
    default: return "unknown status";
  }
}

// Align (mode 0), vLLM LoRA align (1), SGLang LoRA align (2) or SGLang's plain
// align (3, num_experts = E + 1 buckets; `options` kOpt* bits), enqueued on
// `stream`; outputs are written in place. Pointers not used by a mode may be
// null. Returns a status (see moe_config.cuh); a launch error is the
// cudaError_t of cudaGetLastError() (the zero-grid-launch build does not look).
int moe_align_launch(int mode, int options, const void* topk_ids, int ids_int64,
                     int64_t num_tokens,
                     int64_t topk, int64_t num_experts, int64_t block_size,
                     const int32_t* expert_map, const int32_t* token_lora_mapping,
                     const int32_t* seg_indptr, const int32_t* req_to_lora, int64_t num_requests,
                     const int32_t* lora_ids, int64_t num_lora_ids, const int32_t* adapter_enabled,
                     int64_t num_adapter_enabled, int64_t max_loras, int64_t max_num_tokens_padded,
                     int64_t max_num_m_blocks, int32_t* sorted_token_ids, int32_t* expert_ids,
                     int32_t* num_tokens_post_pad, void* workspace, int64_t workspace_bytes,
                     int device, void* stream) {
  if (mode != kPlain && mode != kVllm && mode != kSglang && mode != kSglangAlign) return kErrMode;
  if (num_experts < 1 || num_experts > kMaxExperts) return kErrNumExperts;
  if (block_size < 1) return kErrBlockSize;
  if (num_tokens < 0 || topk < 0 || num_requests < 0 || num_adapter_enabled < 0) return kErrShape;
  if (topk > 0 && num_tokens > kInt32Max / topk) return kErrTooManyRoutes;
  if (single_row(mode)) {
    max_loras = 1;
    num_lora_ids = 1;
  } else if (max_loras < 1 || max_loras > kMaxSlotEntries || num_lora_ids < 0 ||
             num_lora_ids > kMaxSlotEntries || num_requests > kInt32Max) {
    return kErrMaxLoras;
  }
  if (max_num_tokens_padded < 0 || max_num_m_blocks < 0) return kErrPadding;

  const long long num_routes = num_tokens * topk;
  const bool small = uses_small_path(num_routes, num_experts);
  const WorkspaceLayout layout = workspace_layout(num_lora_ids, num_experts, max_loras);
  if (!small && (workspace == nullptr || workspace_bytes < static_cast<int64_t>(layout.bytes))) {
    return kErrWorkspace;
  }

  long long entries = num_lora_ids;
  if (kFaultGridSkipsLastSlot && !single_row(mode) && entries > max_loras) {
    entries = max_loras;  // the bug: L blocks for the L + 1 entries of lora_ids
  }
  if (entries == 0) return kOk;

  (void)cudaGetLastError();  // a stale error of an earlier call is not this launch's
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  AlignParams p{};
  p.mode = mode;
  p.options = mode == kSglangAlign ? options : kOptPad;
  p.topk_ids = topk_ids;
  p.num_routes = num_routes;
  p.topk = topk > 0 ? topk : 1;
  p.num_experts = static_cast<int>(num_experts);
  p.block_size = block_size;
  p.expert_map = expert_map;
  p.token_lora_mapping = token_lora_mapping;
  p.seg_indptr = seg_indptr;
  p.req_to_lora = req_to_lora;
  p.num_requests = static_cast<int>(num_requests);
  p.lora_ids = lora_ids;
  p.num_entries = static_cast<int>(entries);
  p.adapter_enabled = adapter_enabled;
  p.num_adapter_enabled = num_adapter_enabled;
  p.max_loras = static_cast<int>(max_loras);
  p.row_len = max_num_tokens_padded;
  p.row_blocks = max_num_m_blocks;
  p.sorted_token_ids = sorted_token_ids;
  p.expert_ids = expert_ids;
  p.num_tokens_post_pad = num_tokens_post_pad;
  if (!small) {
    char* base = static_cast<char*>(workspace);
    p.counts = reinterpret_cast<int32_t*>(base + layout.counts);
    p.cursors = reinterpret_cast<int32_t*>(base + layout.cursors);
    p.offsets = reinterpret_cast<long long*>(base + layout.offsets);
    p.entry_flags = reinterpret_cast<int32_t*>(base + layout.entry_flags);
    p.entry_of_slot = reinterpret_cast<int32_t*>(base + layout.entry_of_slot);
    err = cudaMemsetAsync(base + layout.counts, 0, layout.offsets - layout.counts, s);
    if (err != cudaSuccess) return err;
  }

  const unsigned grid_entries = static_cast<unsigned>(entries);
  if (ids_int64) {
    launch_align<int64_t>(p, small, grid_entries, s);
  } else {
    launch_align<int32_t>(p, small, grid_entries, s);
  }
  // zero-grid-launch: the launches are not checked; their error stays pending.
  if (kFaultZeroGridLaunch && mode == kPlain) return kOk;
  return cudaGetLastError();
}

// EP remap: local_topk_ids[i] = the local id on `rank` of global expert
// topk_ids[i], or -1. strategy 0 = linear, 1 = round_robin.
int moe_ep_remap_launch(const void* topk_ids, int in_int64, void* local_topk_ids, int out_int64,
                        int64_t numel, int64_t num_global, int64_t ranks, int64_t rank,
                        int strategy, int device, void* stream) {
  if (numel < 0) return kErrShape;
  if (num_global < 1 || ranks < 1 || rank < 0 || rank >= ranks ||
      (strategy != kLinear && strategy != kRoundRobin)) {
    return kErrEpArgs;
  }
  if (numel == 0) return kOk;
  (void)cudaGetLastError();
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (in_int64) {
    if (out_int64) {
      launch_ep_remap<int64_t, int64_t>(topk_ids, local_topk_ids, numel, num_global, ranks, rank, strategy, s);
    } else {
      launch_ep_remap<int64_t, int32_t>(topk_ids, local_topk_ids, numel, num_global, ranks, rank, strategy, s);
    }
  } else if (out_int64) {
    launch_ep_remap<int32_t, int64_t>(topk_ids, local_topk_ids, numel, num_global, ranks, rank, strategy, s);
  } else {
    launch_ep_remap<int32_t, int32_t>(topk_ids, local_topk_ids, numel, num_global, ranks, rank, strategy, s);
  }
  return cudaGetLastError();
}

}  // extern "C"
