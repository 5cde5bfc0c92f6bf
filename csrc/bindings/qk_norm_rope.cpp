// Torch bindings of the QK-RMSNorm + 2D RoPE kernels (csrc/kernels/qk_norm_rope.cu): check
// arguments, allocate outputs, launch on the current stream. Semantics:
// sapiens2/ops/qk_norm_rope.py. sin / cos are fp32 (the adapter converts other dtypes; the RoPE is
// computed in fp32), absent for the norm only.
#include "common.h"
#include "kernels/qk_norm_rope.h"
#include "kernels/rms_norm.h"

#include <limits>

namespace {

struct Heads {
  int64_t B, N, Hq, Hk, D;
};

Heads check_heads(const at::Tensor& q, const at::Tensor& k, const char* op, const char* qn, const char* kn) {
  s2b::check_tensor(q, op, qn);
  s2b::check_tensor(k, op, kn);
  s2b::dtype_code(q, op, qn);
  s2b::check_same_dtype(q, k, op, qn, kn);
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": ", qn, " must be (B, N, heads, head_dim), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
                    ": ", kn, " must be (B=", q.size(0), ", N=", q.size(1), ", kv_heads, D=", q.size(3), ") to match ",
                    qn, ", got shape ", k.sizes());
  const int64_t D = q.size(3);
  TORCH_CHECK_VALUE(s2_qk_norm_rope_supports_head_dim(D), op, ": head_dim ", D,
                    " is not supported by the CUDA kernels (a multiple of 4 from 4 to 512)");
  return {q.size(0), q.size(1), q.size(2), k.size(2), D};
}

// Weights of any of the three dtypes (mixed precision keeps fp32 ones), one for both; returns its
// dtype code.
int check_weights(const at::Tensor& qw, const at::Tensor& kw, int64_t D, const char* op) {
  for (const auto& [w, name] : {std::pair{&qw, "q_weight"}, std::pair{&kw, "k_weight"}}) {
    s2b::check_tensor(*w, op, name);
    s2b::dtype_code(*w, op, name);
    TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == D, op, ": ", name, " must have shape (", D, "), got ",
                      w->sizes());
  }
  s2b::check_same_dtype(qw, kw, op, "q_weight", "k_weight");
  return s2b::dtype_code(qw, op, "q_weight");
}

// Returns whether the tables are per sample; (false) without tables.
bool check_tables(const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& cos, const Heads& h,
                  int64_t p, const char* op) {
  TORCH_CHECK_VALUE(sin.has_value() == cos.has_value(), op, ": sin and cos must be given together");
  if (!sin) return false;
  TORCH_CHECK_VALUE(p >= 0 && p <= h.N, op, ": num_prefix_tokens must be in [0, N=", h.N, "], got ", p);
  for (const auto& [t, name] : {std::pair{&*sin, "sin"}, std::pair{&*cos, "cos"}}) {
    s2b::check_tensor(*t, op, name);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32 (the RoPE runs in fp32), got ",
                     t->scalar_type());
    const bool shared = t->dim() == 2 && t->size(0) == h.N - p && t->size(1) == h.D;
    const bool per_sample = t->dim() == 3 && t->size(0) == h.B && t->size(1) == h.N - p && t->size(2) == h.D;
    TORCH_CHECK_VALUE(shared || per_sample, op, ": ", name, " must have shape (N - num_prefix_tokens, D) = (",
                      h.N - p, ", ", h.D, ") or per sample (", h.B, ", ", h.N - p, ", ", h.D, "), got ", t->sizes());
  }
  TORCH_CHECK_VALUE(sin->sizes() == cos->sizes(), op, ": sin ", sin->sizes(), " and cos ", cos->sizes(),
                    " must have one shape");
  return sin->dim() == 3;
}

const float* table_ptr(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

// Grid: `programs` blocks along the positions times `splits` along the samples, about `per_sm`
// blocks per SM in all. Samples are split only when there are too few positions to fill the GPU
// (a block reuses a shared table row for all of its samples).
struct Grid {
  int programs, splits;
};

Grid grid_for(const Heads& h, int per_sm) {
  const int64_t target = s2b::row_programs(std::numeric_limits<int64_t>::max(), per_sm);
  const int64_t splits = std::clamp<int64_t>((target + h.N - 1) / std::max<int64_t>(h.N, 1), 1,
                                             std::clamp<int64_t>(h.B, 1, 65535));
  const int64_t programs = std::clamp<int64_t>((target + splits - 1) / splits, 1, std::max<int64_t>(h.N, 1));
  return {int(programs), int(splits)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight, const at::Tensor& k_weight,
    const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& cos, int64_t num_prefix_tokens,
    double eps) {
  const char* op = "qk_norm_rope_fwd";
  const Heads h = check_heads(q, k, op, "q", "k");
  const int pdt = check_weights(q_weight, k_weight, h.D, op);
  const bool per_sample = check_tables(sin, cos, h, num_prefix_tokens, op);
  S2_DEVICE_GUARD(q);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor q_rstd = at::empty({h.B, h.N, h.Hq}, f32), k_rstd = at::empty({h.B, h.N, h.Hk}, f32);
  const Grid g = grid_for(h, 8);
  s2b::check_status(s2_qk_norm_rope_fwd(s2b::dtype_code(q, op, "q"), pdt, q.data_ptr(), k.data_ptr(),
                                        q_weight.data_ptr(), k_weight.data_ptr(), table_ptr(sin), table_ptr(cos),
                                        q_out.data_ptr(), k_out.data_ptr(), q_rstd.data_ptr<float>(),
                                        k_rstd.data_ptr<float>(), h.B, h.N, h.Hq, h.Hk, h.D, num_prefix_tokens,
                                        per_sample, float(eps), g.programs, g.splits, s2b::stream()),
                    op);
  return {q_out, k_out, q_rstd, k_rstd};
}

void check_rstd(const at::Tensor& rstd, const at::Tensor& x, const char* op, const char* name) {
  s2b::check_tensor(rstd, op, name);
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.numel() == x.numel() / x.size(3), op, ": ", name,
                    " must hold one value per head vector (B, N, heads) = ", x.sizes().slice(0, 3), ", got shape ",
                    rstd.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_bwd(
    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& cos,
    const at::Tensor& q_rstd, const at::Tensor& k_rstd, int64_t num_prefix_tokens) {
  const char* op = "qk_norm_rope_bwd";
  const Heads h = check_heads(q, k, op, "q", "k");
  for (const auto& [g, x, gn] : {std::tuple{&dq, &q, "dq"}, std::tuple{&dk, &k, "dk"}}) {
    s2b::check_tensor(*g, op, gn);
    s2b::check_same_dtype(q, *g, op, "q", gn);
    TORCH_CHECK_VALUE(g->sizes() == x->sizes(), op, ": ", gn, " must have shape ", x->sizes(), ", got ", g->sizes());
  }
  const int pdt = check_weights(q_weight, k_weight, h.D, op);
  const bool per_sample = check_tables(sin, cos, h, num_prefix_tokens, op);
  check_rstd(q_rstd, q, op, "q_rstd");
  check_rstd(k_rstd, k, op, "k_rstd");
  S2_DEVICE_GUARD(q);
  at::Tensor dq_in = at::empty_like(q), dk_in = at::empty_like(k);
  const Grid g = grid_for(h, 4);
  const int64_t parts = int64_t(g.programs) * g.splits;
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dqw_part = at::empty({parts, h.D}, f32), dkw_part = at::empty({parts, h.D}, f32);
  s2b::check_status(s2_qk_norm_rope_bwd(s2b::dtype_code(q, op, "q"), pdt, dq.data_ptr(), dk.data_ptr(), q.data_ptr(),
                                        k.data_ptr(), q_weight.data_ptr(), k_weight.data_ptr(), table_ptr(sin),
                                        table_ptr(cos), q_rstd.data_ptr<float>(), k_rstd.data_ptr<float>(),
                                        dq_in.data_ptr(), dk_in.data_ptr(), dqw_part.data_ptr<float>(),
                                        dkw_part.data_ptr<float>(), h.B, h.N, h.Hq, h.Hk, h.D, num_prefix_tokens,
                                        per_sample, g.programs, g.splits, s2b::stream()),
                    op);
  at::Tensor dqw = at::empty_like(q_weight), dkw = at::empty_like(k_weight);
  s2b::check_status(s2_column_sum(pdt, dqw_part.data_ptr<float>(), dqw.data_ptr(), parts, h.D, s2b::stream()), op);
  s2b::check_status(s2_column_sum(pdt, dkw_part.data_ptr<float>(), dkw.data_ptr(), parts, h.D, s2b::stream()), op);
  return {dq_in, dk_in, dqw, dkw};
}

}  // namespace

S2_FRAGMENT(m) {
  m.def("qk_norm_rope_fwd(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor? sin, Tensor? cos, "
        "int num_prefix_tokens, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("qk_norm_rope_bwd(Tensor dq, Tensor dk, Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor? sin, "
        "Tensor? cos, Tensor q_rstd, Tensor k_rstd, int num_prefix_tokens) -> (Tensor, Tensor, Tensor, Tensor)");
}

static void register_impls(torch::Library& m) {
  m.impl("qk_norm_rope_fwd", &qk_norm_rope_fwd);
  m.impl("qk_norm_rope_bwd", &qk_norm_rope_bwd);
}

S2_REGISTER_IMPLS(register_impls)
