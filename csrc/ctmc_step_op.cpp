// torch bindings of the CTMC step (fake kernels: tcsm_kernels/ops/ctmc_step.py):
//   tcsm::ctmc_step_cpu        the fused step over flat (N, V) logits
//   tcsm::philox_row_words_cpu the step's Philox words per row, to test them against the
//                              Python definition (tcsm_kernels/philox.py)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "ctmc_step.h"
#include "philox.h"
#include "storage_op.h"

namespace {

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu(), "ctmc_step: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "ctmc_step: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "ctmc_step: ", name, " must have shape (",
              rows, ",), got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctmc_step_cpu(
    const at::Tensor& logits, const at::Tensor& x, const at::Tensor& jump,
    const std::optional<at::Tensor>& frozen, int64_t mask_id, double temperature, int64_t seed,
    int64_t offset) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(),
              "ctmc_step: logits must be a CPU tensor of shape (N, V)");
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  TORCH_CHECK(cols >= 1, "ctmc_step: logits must have V >= 1 columns");
  TORCH_CHECK(mask_id >= -1 && mask_id < cols && !(mask_id >= 0 && cols < 2),
              "ctmc_step: mask_id must be -1 or a column of V >= 2 columns, got ", mask_id);
  TORCH_CHECK(temperature > 0.0, "ctmc_step: temperature must be > 0");
  TORCH_CHECK(seed >= 0 && offset >= 0, "ctmc_step: seed and offset must be >= 0");
  check_rows(x, "x", at::kLong, rows);
  check_rows(jump, "jump", at::kDouble, rows);
  if (frozen.has_value()) check_rows(*frozen, "frozen", at::kBool, rows);

  const at::Tensor values = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor x_c = x.contiguous();
  const at::Tensor jump_c = jump.contiguous();
  const at::Tensor frozen_c = frozen.has_value() ? frozen->contiguous() : at::Tensor();
  at::Tensor x_next = at::empty({rows}, x.options());
  at::Tensor x1 = at::empty({rows}, x.options());
  const auto float_options = logits.options().dtype(at::kFloat);
  at::Tensor prob = at::empty({rows}, float_options);
  at::Tensor margin = at::empty({rows}, float_options);
  at::Tensor entropy = at::empty({rows}, float_options);

  tcsm::CtmcStepArgs args{};
  args.logits = values.data_ptr();
  args.dtype = tcsm::storage_dtype(values, "ctmc_step", "logits");
  args.rows = rows;
  args.cols = cols;
  args.row_stride = values.stride(0);
  args.x = x_c.data_ptr<int64_t>();
  args.jump = jump_c.data_ptr<double>();
  args.frozen = frozen_c.defined() ? frozen_c.data_ptr<bool>() : nullptr;
  args.mask_id = mask_id;
  args.temperature = temperature;
  args.seed = static_cast<uint64_t>(seed);
  args.offset = static_cast<uint64_t>(offset);
  args.x_next = x_next.data_ptr<int64_t>();
  args.x1 = x1.data_ptr<int64_t>();
  args.prob = prob.data_ptr<float>();
  args.margin = margin.data_ptr<float>();
  args.entropy = entropy.data_ptr<float>();
  tcsm::ctmc_step(args);
  return {x_next, x1, prob, margin, entropy};
}

at::Tensor philox_row_words_cpu(int64_t seed, int64_t offset, int64_t rows) {
  TORCH_CHECK(seed >= 0 && offset >= 0 && rows >= 0,
              "philox_row_words: seed, offset and rows must be >= 0");
  at::Tensor words = at::empty({rows, 4}, at::kLong);
  int64_t* out = words.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows; ++n) {
    const tcsm::PhiloxWords w = tcsm::philox_row_words(static_cast<uint64_t>(seed),
                                                       static_cast<uint64_t>(offset),
                                                       static_cast<uint64_t>(n));
    for (int k = 0; k < 4; ++k) out[4 * n + k] = w[k];
  }
  return words;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tcsm, m) {
  m.def(
      "ctmc_step_cpu(Tensor logits, Tensor x, Tensor jump, Tensor? frozen, int mask_id, "
      "float temperature, int seed, int offset) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("philox_row_words_cpu(int seed, int offset, int rows) -> Tensor", &philox_row_words_cpu);
}

TORCH_LIBRARY_IMPL(tcsm, CPU, m) { m.impl("ctmc_step_cpu", &ctmc_step_cpu); }
