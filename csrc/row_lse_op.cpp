// torch binding of row_lse as tcsm::row_lse_cpu (fake kernel: tcsm_kernels/ops/row_lse.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "row_lse.h"

namespace {

at::Tensor row_lse_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "row_lse: x must be (N, V)");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "row_lse: x must be float32");
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options());
  tcsm::row_lse(rows.data_ptr<float>(), rows.size(0), rows.size(1), rows.stride(0),
                out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tcsm, m) { m.def("row_lse_cpu(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(tcsm, CPU, m) { m.impl("row_lse_cpu", &row_lse_cpu); }
