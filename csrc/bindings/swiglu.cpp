// Torch bindings of the SwiGLU kernels (csrc/kernels/swiglu.cu): check arguments, allocate outputs,
// launch on the current stream. Semantics: sapiens2/ops/swiglu.py. Tensors of any rank: the last
// dimension is the feature dimension, the others are flattened into rows.
#include "common.h"
#include "kernels/rms_norm.h"
#include "kernels/swiglu.h"

#include <limits>

namespace {

struct Rows {
  int64_t rows, F;
};

// x12 (..., 2F): checked, and its rows and F.
Rows check_x12(const at::Tensor& x12, const char* op) {
  s2b::check_tensor(x12, op, "x12");
  s2b::dtype_code(x12, op, "x12");
  TORCH_CHECK_VALUE(x12.dim() >= 1 && x12.size(-1) > 0 && x12.size(-1) % 2 == 0, op,
                    ": x12 must have an even, non-zero last dimension (a and b halves), got shape ", x12.sizes());
  const int64_t F = x12.size(-1) / 2;
  return {x12.numel() / (2 * F), F};
}

std::vector<int64_t> half_shape(const at::Tensor& x12) {
  std::vector<int64_t> shape(x12.sizes().begin(), x12.sizes().end());
  shape.back() /= 2;
  return shape;
}

// The incoming gradient (dy or ds): x12's dtype, shape (..., F).
void check_grad(const at::Tensor& g, const at::Tensor& x12, const char* op, const char* name) {
  s2b::check_tensor(g, op, name);
  s2b::check_same_dtype(x12, g, op, "x12", name);
  TORCH_CHECK_VALUE(g.sizes() == at::IntArrayRef(half_shape(x12)), op, ": ", name, " must have shape ",
                    at::IntArrayRef(half_shape(x12)), " (x12's with the last dimension halved), got ", g.sizes());
}

at::Tensor swiglu_fwd(const at::Tensor& x12) {
  const char* op = "swiglu_fwd";
  const Rows r = check_x12(x12, op);
  S2_DEVICE_GUARD(x12);
  at::Tensor y = at::empty(half_shape(x12), x12.options());
  s2b::check_status(s2_swiglu_fwd(s2b::dtype_code(x12, op, "x12"), x12.data_ptr(), y.data_ptr(), r.rows, r.F,
                                  s2b::stream()),
                    op);
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& dy, const at::Tensor& x12) {
  const char* op = "swiglu_bwd";
  const Rows r = check_x12(x12, op);
  check_grad(dy, x12, op, "dy");
  S2_DEVICE_GUARD(x12);
  at::Tensor dx12 = at::empty_like(x12);
  s2b::check_status(s2_swiglu_bwd(s2b::dtype_code(x12, op, "x12"), dy.data_ptr(), x12.data_ptr(), dx12.data_ptr(),
                                  r.rows, r.F, s2b::stream()),
                    op);
  return dx12;
}

// The backward pass with the w12 bias gradient (s written unless NULL): dx12 and the per-block fp32
// partial rows, reduced by s2_column_sum into db12 (2F,) in x12's dtype.
at::Tensor bias_pass(const at::Tensor& ds, const at::Tensor& x12, void* s, const at::Tensor& dx12, const Rows& r,
                     int dt, const char* op) {
  // Row blocks for the bias gradient: about 4 blocks per SM over all column tiles, so the fp32
  // partial rows stay few (the column sum reads programs x 2F floats).
  const int64_t tiles = std::max<int64_t>(1, s2_swiglu_column_tiles(dt, r.F));
  const int64_t blocks = s2b::row_programs(std::numeric_limits<int64_t>::max(), 4);
  const int programs = int(std::clamp<int64_t>((blocks + tiles - 1) / tiles, 1, std::max<int64_t>(r.rows, 1)));
  at::Tensor db_part = at::empty({programs, 2 * r.F}, x12.options().dtype(at::kFloat));
  s2b::check_status(s2_swiglu_recompute_bwd(dt, ds.data_ptr(), x12.data_ptr(), s, dx12.data_ptr(),
                                            db_part.data_ptr<float>(), r.rows, r.F, programs, s2b::stream()),
                    op);
  at::Tensor db = at::empty({2 * r.F}, x12.options());
  s2b::check_status(s2_column_sum(dt, db_part.data_ptr<float>(), db.data_ptr(), programs, 2 * r.F, s2b::stream()),
                    op);
  return db;
}

// -> (s, dx12, db12); db12 is (2F,) in x12's dtype when bias_grad, else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_recompute_bwd(const at::Tensor& ds, const at::Tensor& x12,
                                                                    bool bias_grad) {
  const char* op = "swiglu_recompute_bwd";
  const Rows r = check_x12(x12, op);
  check_grad(ds, x12, op, "ds");
  const int dt = s2b::dtype_code(x12, op, "x12");
  S2_DEVICE_GUARD(x12);
  at::Tensor s = at::empty(half_shape(x12), x12.options());
  at::Tensor dx12 = at::empty_like(x12);
  if (!bias_grad) {
    s2b::check_status(s2_swiglu_recompute_bwd(dt, ds.data_ptr(), x12.data_ptr(), s.data_ptr(), dx12.data_ptr(),
                                              nullptr, r.rows, r.F, 0, s2b::stream()),
                      op);
    return {s, dx12, x12.new_empty({0})};
  }
  return {s, dx12, bias_pass(ds, x12, s.data_ptr(), dx12, r, dt, op)};
}

// -> (dx12, db12): swiglu_recompute_bwd with the bias gradient, without writing s.
std::tuple<at::Tensor, at::Tensor> swiglu_bias_bwd(const at::Tensor& ds, const at::Tensor& x12) {
  const char* op = "swiglu_bias_bwd";
  const Rows r = check_x12(x12, op);
  check_grad(ds, x12, op, "ds");
  const int dt = s2b::dtype_code(x12, op, "x12");
  S2_DEVICE_GUARD(x12);
  at::Tensor dx12 = at::empty_like(x12);
  return {dx12, bias_pass(ds, x12, nullptr, dx12, r, dt, op)};
}

}  // namespace

S2_FRAGMENT(m) {
  m.def("swiglu_fwd(Tensor x12) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor x12) -> Tensor");
  m.def("swiglu_recompute_bwd(Tensor ds, Tensor x12, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("swiglu_bias_bwd(Tensor ds, Tensor x12) -> (Tensor, Tensor)");
}

static void register_impls(torch::Library& m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_recompute_bwd", &swiglu_recompute_bwd);
  m.impl("swiglu_bias_bwd", &swiglu_bias_bwd);
}

S2_REGISTER_IMPLS(register_impls)
