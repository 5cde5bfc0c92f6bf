// Torch bindings of the RMSNorm kernels (csrc/kernels/rms_norm.cu): allocate outputs, check
// arguments, launch on the current stream. Semantics: sapiens2/ops/rms_norm.py.
#include "common.h"
#include "kernels/rms_norm.h"

namespace {

struct Rows {
  int64_t rows, cols;
};

Rows rows_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got ", x.sizes());
  const int64_t cols = x.size(-1);
  return {cols == 0 ? 0 : x.numel() / cols, cols};
}

void check_param(const at::Tensor& p, const at::Tensor& x, int64_t cols, const char* op, const char* name) {
  s2b::check_tensor(p, op, name);
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == cols, op, ": ", name, " must have shape (", cols, "), got ",
                    p.sizes());
  TORCH_CHECK_TYPE(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name,
                   " must have x's dtype (", x.scalar_type(), ") or float32, got ", p.scalar_type());
}

void check_width(int64_t cols, const at::Tensor& x, const char* op) {
  // Rows whose width is a multiple of 16 bytes of elements take the vectorised kernels.
  const int vec = x.scalar_type() == at::kFloat ? 4 : 8;
  const int64_t widest = s2_rms_norm_max_width(s2b::dtype_code(x, op, "x"), cols % vec == 0 ? 1 : 0);
  TORCH_CHECK_VALUE(cols <= widest, op, ": rows of ", cols, " elements exceed the CUDA kernel's limit of ", widest,
                    " for ", x.scalar_type(), " (use the triton backend for wider rows)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_impl(const at::Tensor& x,
                                                                     const c10::optional<at::Tensor>& residual,
                                                                     const c10::optional<at::Tensor>& x_scale,
                                                                     const at::Tensor& weight, double eps,
                                                                     const char* op) {
  s2b::check_tensor(x, op, "x");
  const int dt = s2b::dtype_code(x, op, "x");
  const Rows r = rows_of(x, op);
  check_width(r.cols, x, op);
  check_param(weight, x, r.cols, op, "weight");
  if (residual) {
    s2b::check_tensor(*residual, op, "residual");
    s2b::check_same_dtype(x, *residual, op, "x", "residual");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                      residual->sizes());
  }
  if (x_scale) {
    check_param(*x_scale, x, r.cols, op, "x_scale");
    TORCH_CHECK_TYPE(x_scale->scalar_type() == weight.scalar_type(), op, ": x_scale and weight must share a dtype");
  }
  S2_DEVICE_GUARD(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor h = residual ? at::empty_like(x) : at::Tensor();
  std::vector<int64_t> stat_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  s2b::check_status(s2_rms_norm_fwd(dt, s2b::dtype_code(weight, op, "weight"), x.data_ptr(),
                                    s2b::ptr_or_null(residual), s2b::ptr_or_null(x_scale), weight.data_ptr(),
                                    y.data_ptr(), residual ? h.data_ptr() : nullptr, rstd.data_ptr<float>(), r.rows,
                                    r.cols, float(eps), s2b::row_programs(r.rows), s2b::stream()),
                    op);
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto [y, h, rstd] = add_rms_norm_fwd_impl(x, c10::nullopt, c10::nullopt, weight, eps, "rms_norm_fwd");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                const c10::optional<at::Tensor>& x_scale,
                                                                const at::Tensor& weight, double eps) {
  return add_rms_norm_fwd_impl(x, residual, x_scale, weight, eps, "add_rms_norm_fwd");
}

// Returns (dres, dx, dweight, dx_scale); without a residual dx is the gradient and dres is empty,
// without x_scale dx and dx_scale are empty (dx == dres).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dh, const c10::optional<at::Tensor>& x,
    const at::Tensor& h, const c10::optional<at::Tensor>& x_scale, const at::Tensor& weight,
    const at::Tensor& rstd, bool residual, const char* op) {
  s2b::check_tensor(h, op, residual ? "h" : "x");
  s2b::check_tensor(dy, op, "dy");
  s2b::check_same_dtype(h, dy, op, residual ? "h" : "x", "dy");
  TORCH_CHECK_VALUE(dy.sizes() == h.sizes(), op, ": dy must have shape ", h.sizes(), ", got ", dy.sizes());
  const int dt = s2b::dtype_code(h, op, "x");
  const Rows r = rows_of(h, op);
  check_width(r.cols, h, op);
  check_param(weight, h, r.cols, op, "weight");
  s2b::check_tensor(rstd, op, "rstd");
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat, op, ": rstd must be float32, got ", rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.numel() == r.rows, op, ": rstd must hold one value per row (", r.rows, "), got ",
                    rstd.numel());
  for (const auto* t : {&dh, &x}) {
    if (t->has_value()) {
      s2b::check_tensor(**t, op, t == &dh ? "dh" : "x");
      s2b::check_same_dtype(h, **t, op, "h", t == &dh ? "dh" : "x");
      TORCH_CHECK_VALUE((*t)->sizes() == h.sizes(), op, ": ", t == &dh ? "dh" : "x", " must have shape ", h.sizes());
    }
  }
  if (x_scale) {
    check_param(*x_scale, h, r.cols, op, "x_scale");
    TORCH_CHECK_VALUE(x.has_value(), op, ": x_scale needs x");
  }
  S2_DEVICE_GUARD(h);
  const int programs = s2b::row_programs(r.rows);
  auto f32 = h.options().dtype(at::kFloat);
  at::Tensor dw_part = at::empty({programs, r.cols}, f32);
  at::Tensor ds_part = x_scale ? at::empty({programs, r.cols}, f32) : at::Tensor();
  at::Tensor dres = residual ? at::empty_like(h) : at::Tensor();
  at::Tensor dx = (!residual || x_scale) ? at::empty_like(h) : at::Tensor();
  const int pdt = s2b::dtype_code(weight, op, "weight");
  s2b::check_status(s2_rms_norm_bwd(dt, pdt, dy.data_ptr(), s2b::ptr_or_null(dh), s2b::ptr_or_null(x), h.data_ptr(),
                                    s2b::ptr_or_null(x_scale), weight.data_ptr(), rstd.data_ptr<float>(),
                                    dx.defined() ? dx.data_ptr() : nullptr, residual ? dres.data_ptr() : nullptr,
                                    dw_part.data_ptr<float>(), x_scale ? ds_part.data_ptr<float>() : nullptr, r.rows,
                                    r.cols, programs, s2b::stream()),
                    op);
  at::Tensor dw = at::empty_like(weight);
  s2b::check_status(s2_column_sum(pdt, dw_part.data_ptr<float>(), dw.data_ptr(), programs, r.cols, s2b::stream()), op);
  at::Tensor ds;
  if (x_scale) {
    ds = at::empty_like(*x_scale);
    s2b::check_status(s2_column_sum(s2b::dtype_code(*x_scale, op, "x_scale"), ds_part.data_ptr<float>(),
                                    ds.data_ptr(), programs, r.cols, s2b::stream()),
                      op);
  }
  // Absent outputs are distinct empty tensors (outputs of a custom op may not alias each other).
  auto empty = [&] { return h.new_empty({0}); };
  return {residual ? dres : empty(), dx.defined() ? dx : empty(), dw, ds.defined() ? ds : empty()};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  auto [dres, dx, dw, ds] = bwd_impl(dy, c10::nullopt, c10::nullopt, x, c10::nullopt, weight, rstd, false,
                                     "rms_norm_bwd");
  return {dx, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_rms_norm_bwd(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dh, const at::Tensor& x, const at::Tensor& h,
    const c10::optional<at::Tensor>& x_scale, const at::Tensor& weight, const at::Tensor& rstd) {
  return bwd_impl(dy, dh, x, h, x_scale, weight, rstd, true, "add_rms_norm_bwd");
}

}  // namespace

S2_FRAGMENT(m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? x_scale, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("add_rms_norm_bwd(Tensor dy, Tensor? dh, Tensor x, Tensor h, Tensor? x_scale, Tensor weight, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor)");
}

static void register_impls(torch::Library& m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("add_rms_norm_bwd", &add_rms_norm_bwd);
}

S2_REGISTER_IMPLS(register_impls)
