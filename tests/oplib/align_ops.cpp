// A tiny CPU op library for the tests of `--impl op:` (built at test time).
//
// difftest_oplib::align        plain align (docs/SPEC.md, align dialect), correct
// difftest_oplib::align_faulty the same with an off-by-one range check: routes to the
//                              last expert are dropped
// difftest_oplib::two_args     a schema that matches no dialect
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

int64_t route_expert(const at::Tensor& topk, int64_t i) {
  if (topk.scalar_type() == at::kLong) return topk.const_data_ptr<int64_t>()[i];
  return topk.const_data_ptr<int32_t>()[i];
}

void align_impl(const at::Tensor& topk_ids_in, int64_t num_experts, int64_t block_size,
                at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                at::Tensor& num_tokens_post_pad,
                const std::optional<at::Tensor>& expert_map_in, bool drop_last_expert) {
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  at::Tensor topk_ids = topk_ids_in.contiguous();
  const int64_t numel = topk_ids.numel();
  const int64_t last = drop_last_expert ? num_experts - 1 : num_experts;
  std::vector<int64_t> expert(numel, -1);
  for (int64_t i = 0; i < numel; ++i) {
    int64_t g = route_expert(topk_ids, i);
    if (g < 0 || g >= last) continue;
    if (expert_map_in.has_value()) {
      at::Tensor map = expert_map_in->contiguous();
      g = route_expert(map, g);
      if (g < 0 || g >= num_experts) continue;
    }
    expert[i] = g;
  }
  std::vector<int64_t> count(num_experts, 0), offset(num_experts, 0);
  for (int64_t e : expert) if (e >= 0) ++count[e];
  int64_t total = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    offset[e] = total;
    total += (count[e] + block_size - 1) / block_size * block_size;
  }
  const int64_t padded = sorted_token_ids.numel();
  const int64_t blocks = expert_ids.numel();
  TORCH_CHECK(total <= padded, "max_num_tokens_padded too small");
  int32_t* srt = sorted_token_ids.mutable_data_ptr<int32_t>();
  int32_t* eid = expert_ids.mutable_data_ptr<int32_t>();
  for (int64_t p = 0; p < padded; ++p) srt[p] = static_cast<int32_t>(numel);
  std::vector<int64_t> next(offset);
  for (int64_t i = 0; i < numel; ++i)
    if (expert[i] >= 0) srt[next[expert[i]]++] = static_cast<int32_t>(i);
  int64_t b = 0;
  for (int64_t e = 0; e < num_experts; ++e)
    for (int64_t k = 0; k < (count[e] + block_size - 1) / block_size; ++k) eid[b++] = e;
  for (; b < blocks; ++b) eid[b] = -1;
  num_tokens_post_pad.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(total);
}

void align(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size,
           at::Tensor& sorted_token_ids, at::Tensor& expert_ids, at::Tensor& num_tokens_post_pad,
           const std::optional<at::Tensor>& expert_map) {
  align_impl(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
             num_tokens_post_pad, expert_map, false);
}

void align_faulty(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size,
                  at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                  at::Tensor& num_tokens_post_pad, const std::optional<at::Tensor>& expert_map) {
  align_impl(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
             num_tokens_post_pad, expert_map, true);
}

void two_args(const at::Tensor& topk_ids, at::Tensor& out) {}

}  // namespace

#define ALIGN_SCHEMA(NAME)                                                                   \
  NAME "(Tensor topk_ids, int num_experts, int block_size, Tensor(a!) sorted_token_ids, "    \
       "Tensor(b!) expert_ids, Tensor(c!) num_tokens_post_pad, Tensor? expert_map) -> ()"

TORCH_LIBRARY(difftest_oplib, m) {
  m.def(ALIGN_SCHEMA("align"));
  m.def(ALIGN_SCHEMA("align_faulty"));
  m.def("two_args(Tensor topk_ids, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(difftest_oplib, CPU, m) {
  m.impl("align", &align);
  m.impl("align_faulty", &align_faulty);
  m.impl("two_args", &two_args);
}
