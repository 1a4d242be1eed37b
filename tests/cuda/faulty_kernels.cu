// Two deliberately faulty launches for tests/test_gpu_attribution.py, both left
// unchecked as careless host code leaves them. Built with the shared CUDA runtime
// (-cudart shared), so their launch errors are pending in the runtime torch uses.
#include <cstdint>

#include <cuda_runtime.h>

namespace {

__global__ void store_one(int32_t* base, long long offset, int32_t value) {
  base[offset] = value;
}

__global__ void fill(int32_t* out, int32_t value) { out[threadIdx.x] = value; }

}  // namespace

// One store of `value` at base[offset], wherever that is (a wild write when
// `offset` lies outside the buffer `base` points into).
extern "C" int store_at(int32_t* base, long long offset, int32_t value, void* stream) {
  store_one<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(base, offset, value);
  return 0;
}

// A launch with a zero-block grid: it never runs and leaves "invalid
// configuration argument" pending, unchecked.
extern "C" int launch_empty_grid(int32_t* out, void* stream) {
  fill<<<0, 32, 0, static_cast<cudaStream_t>(stream)>>>(out, 0);
  return 0;
}
