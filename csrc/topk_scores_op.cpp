// torch binding of the top-k concrete scores (fake kernel: tcsm_kernels/ops/topk_scores.py):
//   tcsm::topk_scores_cpu  flat (N, V) teacher logits -> (indices, log_ratios, lse)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "storage_op.h"
#include "topk_scores.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_scores_cpu(const at::Tensor& teacher_logits,
                                                               const at::Tensor& target,
                                                               int64_t k, double temperature) {
  TORCH_CHECK(teacher_logits.dim() == 2 && teacher_logits.device().is_cpu(),
              "topk_scores: teacher_logits must be a CPU tensor of shape (N, V)");
  const int64_t rows = teacher_logits.size(0);
  const int64_t cols = teacher_logits.size(1);
  // Columns are packed into 32 bits of the ranking key.
  TORCH_CHECK(cols >= 1 && cols <= std::numeric_limits<int32_t>::max(),
              "topk_scores: teacher_logits must have 1 <= V < 2^31 columns, got ", cols);
  TORCH_CHECK(k >= 1 && k <= cols, "topk_scores: k must be in [1, V=", cols, "], got ", k);
  TORCH_CHECK(temperature > 0.0, "topk_scores: temperature must be > 0");
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong &&
                  target.dim() == 1 && target.size(0) == rows,
              "topk_scores: target must be a CPU int64 tensor of shape (", rows, ",)");

  const at::Tensor values = teacher_logits.stride(1) == 1 ? teacher_logits
                                                          : teacher_logits.contiguous();
  const at::Tensor target_c = target.contiguous();
  at::Tensor indices = at::empty({rows, k}, target.options());
  const auto float_options = teacher_logits.options().dtype(at::kFloat);
  at::Tensor log_ratios = at::empty({rows, k}, float_options);
  at::Tensor lse = at::empty({rows}, float_options);

  tcsm::TopkScoresArgs args{};
  args.logits = values.data_ptr();
  args.dtype = tcsm::storage_dtype(values, "topk_scores", "teacher_logits");
  args.rows = rows;
  args.cols = cols;
  args.row_stride = values.stride(0);
  args.target = target_c.data_ptr<int64_t>();
  args.k = k;
  args.temperature = temperature;
  args.indices = indices.data_ptr<int64_t>();
  args.log_ratios = log_ratios.data_ptr<float>();
  args.lse = lse.data_ptr<float>();
  tcsm::topk_scores(args);
  return {indices, log_ratios, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tcsm, m) {
  m.def("topk_scores_cpu(Tensor teacher_logits, Tensor target, int k, float temperature) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tcsm, CPU, m) { m.impl("topk_scores_cpu", &topk_scores_cpu); }
