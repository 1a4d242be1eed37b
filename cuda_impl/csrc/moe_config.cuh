// Limits, launch shapes, status codes and fault switches of the MoE align kernels.
//
// cuda_impl/cuda.py mirrors the three public limits and checks them against
// moe_align_limits() when it loads the library, so the two cannot drift apart.
#pragma once

#include <cstdint>

// Fault switches (SPEC §10). A build turns on at most one, with -D<NAME>=1;
// cuda_impl/_variants.py maps fault names to these defines. Each switch flips
// exactly the step its real bug lives in; everything else is shared code.
#ifndef MOE_FAULT_GRID_SKIPS_LAST_SLOT
#define MOE_FAULT_GRID_SKIPS_LAST_SLOT 0
#endif
#ifndef MOE_FAULT_SORT_IGNORES_DISABLED
#define MOE_FAULT_SORT_IGNORES_DISABLED 0
#endif
#ifndef MOE_FAULT_NO_SLOT_UPPER_GUARD
#define MOE_FAULT_NO_SLOT_UPPER_GUARD 0
#endif
#ifndef MOE_FAULT_NEGATIVE_EXPERT_KEPT
#define MOE_FAULT_NEGATIVE_EXPERT_KEPT 0
#endif
#ifndef MOE_FAULT_INACTIVE_BLOCKS_ZERO
#define MOE_FAULT_INACTIVE_BLOCKS_ZERO 0
#endif
#ifndef MOE_FAULT_UNEVEN_EP_TRUNCATES
#define MOE_FAULT_UNEVEN_EP_TRUNCATES 0
#endif
#ifndef MOE_FAULT_ODD_BLOCK_RESETS_COUNT
#define MOE_FAULT_ODD_BLOCK_RESETS_COUNT 0
#endif
#ifndef MOE_FAULT_VECTOR_TAIL_OVERRUN
#define MOE_FAULT_VECTOR_TAIL_OVERRUN 0
#endif
#ifndef MOE_FAULT_ZERO_GRID_LAUNCH
#define MOE_FAULT_ZERO_GRID_LAUNCH 0
#endif

#if (MOE_FAULT_GRID_SKIPS_LAST_SLOT + MOE_FAULT_SORT_IGNORES_DISABLED +             \
     MOE_FAULT_NO_SLOT_UPPER_GUARD + MOE_FAULT_NEGATIVE_EXPERT_KEPT +                \
     MOE_FAULT_INACTIVE_BLOCKS_ZERO + MOE_FAULT_UNEVEN_EP_TRUNCATES +                \
     MOE_FAULT_ODD_BLOCK_RESETS_COUNT + MOE_FAULT_VECTOR_TAIL_OVERRUN +              \
     MOE_FAULT_ZERO_GRID_LAUNCH) > 1
#error "at most one MOE_FAULT_* switch per build"
#endif

namespace moe {

constexpr bool kFaultGridSkipsLastSlot = MOE_FAULT_GRID_SKIPS_LAST_SLOT != 0;
constexpr bool kFaultSortIgnoresDisabled = MOE_FAULT_SORT_IGNORES_DISABLED != 0;
constexpr bool kFaultNoSlotUpperGuard = MOE_FAULT_NO_SLOT_UPPER_GUARD != 0;
constexpr bool kFaultNegativeExpertKept = MOE_FAULT_NEGATIVE_EXPERT_KEPT != 0;
constexpr bool kFaultInactiveBlocksZero = MOE_FAULT_INACTIVE_BLOCKS_ZERO != 0;
constexpr bool kFaultUnevenEpTruncates = MOE_FAULT_UNEVEN_EP_TRUNCATES != 0;
constexpr bool kFaultOddBlockResetsCount = MOE_FAULT_ODD_BLOCK_RESETS_COUNT != 0;
constexpr bool kFaultVectorTailOverrun = MOE_FAULT_VECTOR_TAIL_OVERRUN != 0;
constexpr bool kFaultZeroGridLaunch = MOE_FAULT_ZERO_GRID_LAUNCH != 0;

constexpr const char* kFaultName = kFaultGridSkipsLastSlot     ? "grid-skips-last-slot"
                                   : kFaultSortIgnoresDisabled ? "sort-ignores-disabled"
                                   : kFaultNoSlotUpperGuard    ? "no-slot-upper-guard"
                                   : kFaultNegativeExpertKept  ? "negative-expert-kept"
                                   : kFaultInactiveBlocksZero  ? "inactive-blocks-zero"
                                   : kFaultUnevenEpTruncates   ? "uneven-ep-truncates"
                                   : kFaultOddBlockResetsCount ? "odd-block-resets-count"
                                   : kFaultVectorTailOverrun   ? "vector-tail-overrun"
                                   : kFaultZeroGridLaunch      ? "zero-grid-launch"
                                                               : "";

// Path switch: a batch takes the small path (one kernel, per-slot histograms
// in shared memory) iff N <= kSmallPathMaxRoutes and E <= kSmallPathMaxExperts;
// N = 1023/1024 and E = 64/65 sit on either side of it.
constexpr int kSmallPathMaxRoutes = 1023;
constexpr int kSmallPathMaxExperts = 64;
// The large path scans one expert per thread of a 1024-thread block.
constexpr int kMaxExperts = 1024;

constexpr int kSmallBlockThreads = 256;  // >= kSmallPathMaxExperts: one expert per thread in the scan
constexpr int kScanThreads = kMaxExperts;
constexpr int kRouteBlockThreads = 256;  // count and scatter kernels (grid-stride over routes)
constexpr int kMaxRouteBlocks = 1024;    // grid cap: huge batches loop instead of growing the grid
constexpr int kFillPositionsPerBlock = 8192;
constexpr int kMaxFillBlocks = 64;       // pad-fill blocks per slot on the large path
constexpr int64_t kMaxSlotEntries = 1 << 16;
constexpr long long kVectorInts = 4;     // ints per 16-byte store (the vector-tail-overrun fault)

// Option bits of moe_align_launch (SGLang's plain align; other modes pass kOptPad).
constexpr int kOptPad = 1;            // pad_sorted_token_ids: write the pad value
constexpr int kOptIgnoreInvalid = 2;  // ignore_invalid_expert: drop the -1 routes

// Status codes of the extern "C" entry points: 0 success, > 0 a cudaError_t,
// < 0 an argument outside the kernels' limits (Python raises ValueError).
enum Status : int {
  kOk = 0,
  kErrMode = -1,
  kErrNumExperts = -2,
  kErrBlockSize = -3,
  kErrShape = -4,
  kErrMaxLoras = -5,
  kErrPadding = -6,
  kErrWorkspace = -7,
  kErrTooManyRoutes = -8,
  kErrEpArgs = -9,
  kErrNullPointer = -10,
};

}  // namespace moe
