// partial_sums: finish an (R, C) fp32 buffer of per-program partial sums (a weight or bias
// gradient) into its (C,) column sums in `dtype`, with the kernel that finishes every gradient
// reduction of these kernels (s2_column_sum, rms_norm.cu: fixed order, deterministic).
#include "common.h"
#include "kernels/rms_norm.h"

namespace {

at::Tensor partial_sums(const at::Tensor& part, at::ScalarType dtype) {
  const char* op = "partial_sums";
  s2b::check_tensor(part, op, "part");
  TORCH_CHECK_VALUE(part.dim() == 2, op, ": part must be a (rows, columns) tensor, got shape ", part.sizes());
  TORCH_CHECK_TYPE(part.scalar_type() == at::kFloat, op, ": part must be float32, got ", part.scalar_type());
  at::Tensor out = at::empty({part.size(1)}, part.options().dtype(dtype));
  const int dt = s2b::dtype_code(out, op, "dtype");
  S2_DEVICE_GUARD(part);
  s2b::check_status(s2_column_sum(dt, part.data_ptr<float>(), out.data_ptr(), part.size(0), part.size(1), s2b::stream()),
                    op);
  return out;
}

}  // namespace

S2_FRAGMENT(m) { m.def("partial_sums(Tensor part, ScalarType dtype) -> Tensor"); }

static void register_impls(torch::Library& m) { m.impl("partial_sums", &partial_sums); }

S2_REGISTER_IMPLS(register_impls)
