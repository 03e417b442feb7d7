// The kernels' storage dtype of a tensor, for the torch bindings (*_op.cpp).
#pragma once
#include <ATen/ATen.h>

#include "storage.h"

namespace tcsm {

// Rejects dtypes other than float32, bfloat16 and float16 with
// "<op_name>: <arg_name> must be float32, bfloat16 or float16, got <dtype>".
inline StorageDtype storage_dtype(const at::Tensor& t, const char* op_name,
                                  const char* arg_name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return StorageDtype::kFloat32;
    case at::kBFloat16:
      return StorageDtype::kBFloat16;
    case at::kHalf:
      return StorageDtype::kFloat16;
    default:
      TORCH_CHECK(false, op_name, ": ", arg_name, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

}  // namespace tcsm
