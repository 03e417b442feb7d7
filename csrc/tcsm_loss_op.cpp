// torch binding of tcsm_loss as tcsm::tcsm_loss_cpu. Validation, flattening, reductions, the
// fake kernel and autograd live in tcsm_kernels/ops/loss.py; this file checks what the kernel
// relies on for memory safety and hands it raw pointers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "storage_op.h"
#include "tcsm_loss.h"

namespace {

tcsm::Divergence parse_divergence(c10::string_view name) {
  if (name == "kl") return tcsm::Divergence::kKL;
  if (name == "is") return tcsm::Divergence::kIS;
  TORCH_CHECK(name == "gkl", "tcsm_loss_cpu: divergence must be kl, is or gkl, got ", name);
  return tcsm::Divergence::kGKL;
}

tcsm::Objective parse_objective(c10::string_view name) {
  if (name == "distrib") return tcsm::Objective::kDistrib;
  TORCH_CHECK(name == "score", "tcsm_loss_cpu: objective must be distrib or score, got ", name);
  return tcsm::Objective::kScore;
}

tcsm::Tail parse_tail(c10::string_view name) {
  if (name == "zero") return tcsm::Tail::kZero;
  if (name == "renormalize") return tcsm::Tail::kRenormalize;
  TORCH_CHECK(name == "ignore", "tcsm_loss_cpu: tail must be zero, ignore or renormalize, got ",
              name);
  return tcsm::Tail::kIgnore;
}

bool unit_column_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// (N, V) with unit column stride: the tensor itself when it already is, else a copy.
at::Tensor as_rows(const at::Tensor& t) { return unit_column_stride(t) ? t : t.contiguous(); }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "tcsm_loss_cpu: ", name, " must be a CPU tensor");
}

// The loss forms the student's LSE (for the z-loss and the returned lse) in every case but
// those invariant to a shift of the logits: score is, and the top-K score tail ignore.
bool forms_lse(const tcsm::LossProblem& problem, bool teacher) {
  if (problem.objective == tcsm::Objective::kDistrib || !teacher) return true;
  if (problem.divergence == tcsm::Divergence::kIS) return false;
  return problem.topk_indices == nullptr || problem.tail == tcsm::Tail::kZero;
}

std::tuple<at::Tensor, at::Tensor> tcsm_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_values,
    at::Tensor& grad, c10::string_view divergence, c10::string_view objective,
    c10::string_view tail, int64_t mask_id, double temperature, int64_t ignore_index,
    double max_log_ratio, double softcap, double lse_square_scale, double label_smoothing,
    bool return_lse) {
  TORCH_CHECK(logits.dim() == 2, "tcsm_loss_cpu: logits must be (N, V)");
  check_cpu(logits, "logits");
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  TORCH_CHECK(cols >= 1, "tcsm_loss_cpu: logits must have V >= 1 columns");
  tcsm::LossProblem problem{};
  problem.storage = tcsm::storage_dtype(logits, "tcsm_loss_cpu", "logits");
  problem.rows = rows;
  problem.cols = cols;
  problem.divergence = parse_divergence(divergence);
  problem.objective = parse_objective(objective);
  problem.tail = parse_tail(tail);
  TORCH_CHECK(mask_id >= -1 && mask_id < cols, "tcsm_loss_cpu: mask_id ", mask_id,
              " outside [-1, V)");
  TORCH_CHECK(mask_id < 0 || cols >= 2, "tcsm_loss_cpu: mask_id needs V >= 2");
  problem.mask_id = mask_id;
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "tcsm_loss_cpu: temperature must be finite and > 0");
  TORCH_CHECK(max_log_ratio > 0, "tcsm_loss_cpu: max_log_ratio must be > 0");
  problem.temperature = static_cast<float>(temperature);
  problem.max_log_ratio = static_cast<float>(max_log_ratio);
  problem.ignore_index = ignore_index;
  problem.threads = at::get_num_threads();

  const at::Tensor z = as_rows(logits);
  problem.logits = z.data_ptr();
  problem.logits_row_stride = z.stride(0);

  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong,
              "tcsm_loss_cpu: target must be (N,) int64");
  check_cpu(target, "target");
  const at::Tensor target_rows = target.contiguous();
  problem.target = target_rows.data_ptr<int64_t>();

  at::Tensor weight_rows;
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == rows &&
                    weight->scalar_type() == at::kFloat,
                "tcsm_loss_cpu: weight must be (N,) float32");
    check_cpu(*weight, "weight");
    weight_rows = weight->contiguous();
    problem.weight = weight_rows.data_ptr<float>();
  }

  TORCH_CHECK(!(teacher_logits.has_value() && topk_indices.has_value()),
              "tcsm_loss_cpu: pass at most one of teacher_logits and topk_indices");
  TORCH_CHECK(topk_indices.has_value() == topk_values.has_value(),
              "tcsm_loss_cpu: topk_indices and topk_values go together");
  at::Tensor teacher_rows;
  if (teacher_logits.has_value()) {
    TORCH_CHECK(teacher_logits->sizes() == logits.sizes() &&
                    teacher_logits->scalar_type() == logits.scalar_type(),
                "tcsm_loss_cpu: teacher_logits must have the shape and dtype of logits");
    check_cpu(*teacher_logits, "teacher_logits");
    TORCH_CHECK(problem.objective == tcsm::Objective::kDistrib ||
                    problem.divergence != tcsm::Divergence::kKL,
                "tcsm_loss_cpu: divergence kl has no score objective (docs/math.md 4.3)");
    teacher_rows = as_rows(*teacher_logits);
    problem.teacher_logits = teacher_rows.data_ptr();
    problem.teacher_row_stride = teacher_rows.stride(0);
  }
  at::Tensor index_rows, ratio_rows;
  if (topk_indices.has_value()) {
    TORCH_CHECK(topk_indices->dim() == 2 && topk_indices->size(0) == rows &&
                    topk_indices->scalar_type() == at::kLong,
                "tcsm_loss_cpu: topk_indices must be (N, K) int64");
    TORCH_CHECK(topk_values->sizes() == topk_indices->sizes() &&
                    topk_values->scalar_type() == at::kFloat,
                "tcsm_loss_cpu: topk_values must be (N, K) float32");
    check_cpu(*topk_indices, "topk_indices");
    check_cpu(*topk_values, "topk_values");
    const bool distrib = problem.objective == tcsm::Objective::kDistrib;
    TORCH_CHECK(distrib || problem.divergence != tcsm::Divergence::kKL,
                "tcsm_loss_cpu: divergence kl has no score objective for a top-K teacher");
    TORCH_CHECK(distrib ? problem.tail != tcsm::Tail::kIgnore
                        : problem.tail != tcsm::Tail::kRenormalize,
                "tcsm_loss_cpu: the top-K tails are zero/ignore (score), zero/renormalize "
                "(distrib)");
    TORCH_CHECK(problem.tail != tcsm::Tail::kRenormalize ||
                    problem.divergence == tcsm::Divergence::kKL,
                "tcsm_loss_cpu: tail renormalize is defined for kl only");
    index_rows = topk_indices->contiguous();
    ratio_rows = topk_values->contiguous();
    problem.topk_indices = index_rows.data_ptr<int64_t>();
    problem.topk_values = ratio_rows.data_ptr<float>();
    problem.topk = index_rows.size(1);
  }

  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "tcsm_loss_cpu: grad must have the shape and dtype of logits");
  check_cpu(grad, "grad");
  TORCH_CHECK(unit_column_stride(grad), "tcsm_loss_cpu: grad must have unit column stride");
  problem.grad = grad.data_ptr();
  problem.grad_row_stride = grad.stride(0);

  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0,
              "tcsm_loss_cpu: softcap must be finite and >= 0 (0: off)");
  TORCH_CHECK(std::isfinite(lse_square_scale) && lse_square_scale >= 0,
              "tcsm_loss_cpu: lse_square_scale must be finite and >= 0");
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "tcsm_loss_cpu: label_smoothing must lie in [0, 1]");
  problem.softcap = static_cast<float>(softcap);
  problem.lse_square_scale = static_cast<float>(lse_square_scale);
  problem.label_smoothing = static_cast<float>(label_smoothing);
  const bool teacher = problem.teacher_logits != nullptr || problem.topk_indices != nullptr;
  TORCH_CHECK(!(lse_square_scale > 0 || return_lse) || forms_lse(problem, teacher),
              "tcsm_loss_cpu: lse_square_scale and return_lse need a loss that forms the LSE");
  TORCH_CHECK(label_smoothing == 0 || (!teacher && problem.divergence == tcsm::Divergence::kKL),
              "tcsm_loss_cpu: label_smoothing is defined for the data target's kl only");
  at::Tensor class_weight_rows;
  if (class_weight.has_value()) {
    TORCH_CHECK(!teacher, "tcsm_loss_cpu: class_weight applies to the data target only");
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == cols &&
                    class_weight->scalar_type() == at::kFloat,
                "tcsm_loss_cpu: class_weight must be (V,) float32");
    check_cpu(*class_weight, "class_weight");
    class_weight_rows = class_weight->contiguous();
    problem.class_weight = class_weight_rows.data_ptr<float>();
  }

  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  problem.loss = loss.data_ptr<float>();
  at::Tensor lse = at::empty({return_lse ? rows : 0}, logits.options().dtype(at::kFloat));
  if (return_lse) problem.lse = lse.data_ptr<float>();
  if (rows > 0) tcsm::tcsm_loss(problem);
  return {loss, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tcsm, m) {
  m.def(
      "tcsm_loss_cpu(Tensor logits, Tensor target, Tensor? weight, Tensor? class_weight, "
      "Tensor? teacher_logits, Tensor? topk_indices, Tensor? topk_values, Tensor(a!) grad, "
      "str divergence, str objective, str tail, int mask_id, float temperature, "
      "int ignore_index, float max_log_ratio, float softcap, float lse_square_scale, "
      "float label_smoothing, bool return_lse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tcsm, CPU, m) { m.impl("tcsm_loss_cpu", &tcsm_loss_cpu); }
