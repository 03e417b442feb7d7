// torch bindings of shard_rows.h as tcsm::shard_row_stats_cpu and tcsm::shard_row_grad_cpu
// (fake kernels and callers: tcsm_kernels/distributed/fused.py). Checks what the kernels rely on
// for memory safety and hands them raw pointers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "shard_rows.h"
#include "storage_op.h"

namespace {

at::Tensor as_rows(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

struct Held {  // tensors whose pointers the problem holds
  at::Tensor logits, teacher, column_weight, excluded;
};

tcsm::ShardRows problem_of(const at::Tensor& logits, const std::optional<at::Tensor>& teacher,
                           const std::optional<at::Tensor>& column_weight,
                           const std::optional<at::Tensor>& excluded, int64_t mask_col,
                           double temperature, double softcap, double max_log_ratio,
                           const char* op, Held& held) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), op, ": logits must be (N, W) on CPU");
  tcsm::ShardRows p{};
  p.storage = tcsm::storage_dtype(logits, op, "logits");
  p.rows = logits.size(0);
  p.cols = logits.size(1);
  held.logits = as_rows(logits);
  p.logits = held.logits.data_ptr();
  p.logits_row_stride = held.logits.stride(0);
  if (teacher.has_value()) {
    TORCH_CHECK(teacher->sizes() == logits.sizes() && teacher->scalar_type() == logits.scalar_type()
                    && teacher->device().is_cpu(),
                op, ": teacher_logits must have the shape, dtype and device of logits");
    held.teacher = as_rows(*teacher);
    p.teacher = held.teacher.data_ptr();
    p.teacher_row_stride = held.teacher.stride(0);
  }
  if (column_weight.has_value()) {
    TORCH_CHECK(!teacher.has_value(), op, ": column_weight is for the no-teacher statistics");
    TORCH_CHECK(column_weight->dim() == 1 && column_weight->size(0) == p.cols &&
                    column_weight->scalar_type() == at::kFloat && column_weight->device().is_cpu(),
                op, ": column_weight must be (W,) float32 on CPU");
    held.column_weight = column_weight->contiguous();
    p.column_weight = held.column_weight.data_ptr<float>();
  }
  if (excluded.has_value()) {
    TORCH_CHECK(excluded->dim() == 2 && excluded->size(0) == p.rows &&
                    excluded->scalar_type() == at::kLong && excluded->device().is_cpu(),
                op, ": excluded must be (N, K) int64 on CPU");
    held.excluded = excluded->contiguous();
    p.excluded = held.excluded.data_ptr<int64_t>();
    p.topk = held.excluded.size(1);
  }
  TORCH_CHECK(mask_col >= -1 && mask_col < std::max<int64_t>(p.cols, 1), op, ": mask_col ",
              mask_col, " outside [-1, W)");
  p.mask_col = mask_col;
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be > 0");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be >= 0 (0: off)");
  p.temperature = static_cast<float>(temperature);
  p.softcap = static_cast<float>(softcap);
  TORCH_CHECK(max_log_ratio > 0, op, ": max_log_ratio must be > 0");
  p.max_log_ratio = static_cast<float>(max_log_ratio);
  p.threads = at::get_num_threads();
  return p;
}

at::Tensor shard_row_stats_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& teacher,
                               const std::optional<at::Tensor>& column_weight,
                               const std::optional<at::Tensor>& excluded, int64_t mask_col,
                               double temperature, double softcap) {
  Held held;
  const tcsm::ShardRows p = problem_of(logits, teacher, column_weight, excluded, mask_col,
                                       temperature, softcap, 1.0, "shard_row_stats_cpu", held);
  at::Tensor out = at::empty({p.rows, tcsm::kShardStats}, logits.options().dtype(at::kFloat));
  if (p.rows > 0) tcsm::shard_row_stats(p, out.data_ptr<float>());
  return out;
}

const float* row_vector(const at::Tensor& t, int64_t rows, const char* name, at::Tensor& held) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == at::kFloat &&
                  t.device().is_cpu(),
              "shard_row_grad_cpu: ", name, " must be (N,) float32 on CPU");
  held = t.contiguous();
  return held.data_ptr<float>();
}

at::Tensor shard_ratio_sums_cpu(const at::Tensor& logits, const at::Tensor& teacher,
                                const at::Tensor& delta, int64_t mask_col, double temperature,
                                double softcap, double max_log_ratio) {
  Held held;
  const tcsm::ShardRows p =
      problem_of(logits, teacher, std::nullopt, std::nullopt, mask_col, temperature, softcap,
                 max_log_ratio, "shard_ratio_sums_cpu", held);
  at::Tensor h_delta;
  TORCH_CHECK(delta.dim() == 1 && delta.size(0) == p.rows && delta.scalar_type() == at::kFloat &&
                  delta.device().is_cpu(),
              "shard_ratio_sums_cpu: delta must be (N,) float32 on CPU");
  h_delta = delta.contiguous();
  at::Tensor out = at::zeros({p.rows}, logits.options().dtype(at::kFloat));
  if (p.rows > 0 && p.cols > 0) {
    tcsm::shard_ratio_sums(p, h_delta.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

void shard_row_grad_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& teacher,
                        const std::optional<at::Tensor>& column_weight,
                        const std::optional<at::Tensor>& excluded, const at::Tensor& lse,
                        const at::Tensor& alpha, const at::Tensor& beta,
                        const std::optional<at::Tensor>& teacher_lse,
                        const std::optional<at::Tensor>& gamma,
                        const std::optional<at::Tensor>& rest_lse,
                        const std::optional<at::Tensor>& eta,
                        const std::optional<at::Tensor>& delta,
                        const std::optional<at::Tensor>& kappa, at::Tensor& grad,
                        int64_t mask_col, double temperature, double softcap,
                        double max_log_ratio) {
  Held held;
  const tcsm::ShardRows p = problem_of(logits, teacher, column_weight, excluded, mask_col,
                                       temperature, softcap, max_log_ratio,
                                       "shard_row_grad_cpu", held);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device().is_cpu() && (grad.size(1) <= 1 || grad.stride(1) == 1),
              "shard_row_grad_cpu: grad must have the shape and dtype of logits, unit column "
              "stride");
  TORCH_CHECK(teacher.has_value() == teacher_lse.has_value(),
              "shard_row_grad_cpu: teacher_lse goes with teacher_logits");
  TORCH_CHECK(gamma.has_value() == rest_lse.has_value() && gamma.has_value() == excluded.has_value(),
              "shard_row_grad_cpu: gamma, rest_lse and excluded go together");
  TORCH_CHECK(eta.has_value() == delta.has_value() && eta.has_value() == kappa.has_value() &&
                  (!eta.has_value() || teacher.has_value()),
              "shard_row_grad_cpu: eta, delta and kappa go together, with teacher_logits");
  at::Tensor h_lse, h_alpha, h_beta, h_teacher_lse, h_gamma, h_rest_lse, h_eta, h_delta, h_kappa;
  tcsm::RowCoefficients coef{};
  coef.lse = row_vector(lse, p.rows, "lse", h_lse);
  coef.alpha = row_vector(alpha, p.rows, "alpha", h_alpha);
  coef.beta = row_vector(beta, p.rows, "beta", h_beta);
  if (teacher_lse.has_value()) {
    coef.teacher_lse = row_vector(*teacher_lse, p.rows, "teacher_lse", h_teacher_lse);
  }
  if (gamma.has_value()) {
    coef.gamma = row_vector(*gamma, p.rows, "gamma", h_gamma);
    coef.rest_lse = row_vector(*rest_lse, p.rows, "rest_lse", h_rest_lse);
  }
  if (eta.has_value()) {
    coef.eta = row_vector(*eta, p.rows, "eta", h_eta);
    coef.delta = row_vector(*delta, p.rows, "delta", h_delta);
    coef.kappa = row_vector(*kappa, p.rows, "kappa", h_kappa);
  }
  if (p.rows > 0 && p.cols > 0) tcsm::shard_row_grad(p, coef, grad.data_ptr(), grad.stride(0));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tcsm, m) {
  m.def(
      "shard_row_stats_cpu(Tensor logits, Tensor? teacher_logits, Tensor? column_weight, "
      "Tensor? excluded, int mask_col, float temperature, float softcap) -> Tensor");
  m.def(
      "shard_row_grad_cpu(Tensor logits, Tensor? teacher_logits, Tensor? column_weight, "
      "Tensor? excluded, Tensor lse, Tensor alpha, Tensor beta, Tensor? teacher_lse, "
      "Tensor? gamma, Tensor? rest_lse, Tensor? eta, Tensor? delta, Tensor? kappa, "
      "Tensor(a!) grad, "
      "int mask_col, float temperature, float softcap, float max_log_ratio) -> ()");
  m.def(
      "shard_ratio_sums_cpu(Tensor logits, Tensor teacher_logits, Tensor delta, int mask_col, "
      "float temperature, float softcap, float max_log_ratio) -> Tensor");
}

TORCH_LIBRARY_IMPL(tcsm, CPU, m) {
  m.impl("shard_row_stats_cpu", &shard_row_stats_cpu);
  m.impl("shard_row_grad_cpu", &shard_row_grad_cpu);
  m.impl("shard_ratio_sums_cpu", &shard_ratio_sums_cpu);
}
