// Torch bindings of the window-attention / CLS-pooling kernels (csrc/kernels/window_attention.cu):
// check arguments, allocate the (contiguous) outputs, launch on the current stream. Semantics:
// sapiens2/ops/window_attention.py and, for the packed ops (window_attention_qkv_bwd,
// cls_pool_kv_bwd: q/k/v packed as (B, rows, 3, heads, D), gradients returned packed, written
// slot by slot by the kernel through its output strides), sapiens2/ops/window_attention_packed.py.
//
// Inputs shaped (B, rows, heads, D) are read through their batch and row strides: any tensor whose
// heads and head dim are contiguous (stride(-1) == 1, stride(-2) == D) is taken as it is, e.g. q, k,
// v as views of one fused (B, L, 3*heads*D) projection output, without a copy. Other layouts are
// refused here (the Python adapter makes those contiguous first).
#include "common.h"
#include "kernels/window_attention.h"

#include <string>

namespace {

struct Rows {
  const void* p;
  int64_t sb, st;
};

const Rows kNone{nullptr, 0, 0};

void check_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(s2b::on_kernel_device(t), op, ": ", name, " must be a ", S2_DEVICE_NAME,
                    " tensor, got one on ", t.device(), " (the sapiens2 CUDA kernels run on GPU tensors only)");
}

// A (B, rows, heads, D) input of the reference tensor's dtype and the given shape, read in place.
Rows rows_of(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape, const char* op, const char* name,
             const char* like_name) {
  check_device(t, op, name);
  s2b::check_same_dtype(like, t, op, like_name, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  const int64_t H = t.size(2), D = t.size(3);
  TORCH_CHECK_VALUE((D <= 1 || t.stride(3) == 1) && (H <= 1 || t.stride(2) == D), op, ": ", name,
                    " must have contiguous heads and head dim (stride(-1) == 1 and stride(-2) == head_dim; the "
                    "batch and row strides are free), got strides ",
                    t.strides());
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

Rows opt_rows(const c10::optional<at::Tensor>& t, const at::Tensor& like, at::IntArrayRef shape, const char* op,
              const char* name, const char* like_name) {
  return t.has_value() ? rows_of(*t, like, shape, op, name, like_name) : kNone;
}

// A (B, rows, heads, D) output (a new contiguous tensor, or a slot of a packed one).
struct Out {
  void* p;
  int64_t sb, st;
};

const Out kNoOut{nullptr, 0, 0};

Out out_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

struct Geo {
  int64_t B, L, H, D, nW;
  int layout;
};

// Shapes, layout and the kernels' range (head dim, window size, shared memory), with messages that
// name what is wrong.
Geo geometry(const at::Tensor& x, const char* xname, int64_t grid_h, int64_t grid_w, int64_t window,
             c10::string_view layout, bool has_prefix, int kernel, const char* op) {
  check_device(x, op, xname);
  s2b::dtype_code(x, op, xname);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", xname, " must be (batch, tokens, heads, head_dim), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(layout == "grid" || layout == "windows", op, ": layout must be 'grid' or 'windows', got '",
                    std::string(layout), "'");
  TORCH_CHECK_VALUE(window >= 1, op, ": window must be positive, got ", window);
  TORCH_CHECK_VALUE(grid_h >= 0 && grid_w >= 0 && grid_h % window == 0 && grid_w % window == 0, op, ": grid (",
                    grid_h, ", ", grid_w, ") must be divisible by the window ", window);
  Geo g{x.size(0), x.size(1), x.size(2), x.size(3), 0, layout == "grid" ? 0 : 1};
  if (g.layout == 0) {
    TORCH_CHECK_VALUE(g.L == grid_h * grid_w, op, ": the grid layout needs ", grid_h, "*", grid_w, "=",
                      grid_h * grid_w, " tokens, got ", g.L);
    g.nW = (grid_h / window) * (grid_w / window);
  } else {
    TORCH_CHECK_VALUE(g.L % (window * window) == 0, op, ": the windows layout needs a multiple of window*window=",
                      window * window, " tokens, got ", g.L);
    g.nW = g.L / (window * window);
  }
  TORCH_CHECK_VALUE(g.D % 4 == 0 && g.D >= 4 && g.D <= 256, op, ": head dim ", g.D,
                    " is not supported by the CUDA window-attention kernels (a multiple of 4 from 4 to 256)");
  TORCH_CHECK_VALUE(g.H >= 1, op, ": need at least one head, got ", g.H);
  const int64_t rows = window * window + (has_prefix ? 1 : 0);
  TORCH_CHECK_VALUE(window <= 8 && rows <= 65, op, ": window ", window, " has ", rows,
                    " rows per window; the CUDA kernels take at most 65 (windows up to 8x8)");
  const int64_t need = s2_window_attention_smem_bytes(kernel, window, has_prefix ? 1 : 0, g.D);
  S2_DEVICE_GUARD(x);  // the limit of x's device, not of whichever device is current
  const int64_t limit = s2_window_attention_smem_limit();
  TORCH_CHECK_VALUE(need > 0 && need <= limit, op, ": window ", window, " with head dim ", g.D, " needs ", need,
                    " bytes of shared memory per block, more than this device's ", limit);
  TORCH_CHECK_VALUE(g.L < (int64_t(1) << 31) && g.B * g.nW * g.H < (int64_t(1) << 31), op,
                    ": more than 2^31 tokens or window-heads");
  return g;
}

at::Tensor checked_mask(const c10::optional<at::Tensor>& mask, const Geo& g, const char* op) {
  if (!mask.has_value()) return at::Tensor();
  s2b::check_tensor(*mask, op, "token_mask");
  TORCH_CHECK_VALUE(g.layout == 0, op, ": token_mask is only supported with layout='grid'");
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": token_mask must be bool, got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == g.B && mask->size(1) == g.L, op,
                    ": token_mask must have shape (", g.B, ", ", g.L, "), got ", mask->sizes());
  return *mask;
}

const uint8_t* mask_ptr(const at::Tensor& m) {
  return m.defined() ? static_cast<const uint8_t*>(m.data_ptr()) : nullptr;
}

void check_lse(const at::Tensor& lse, int64_t rows, int64_t heads, int64_t cols, const char* op) {
  s2b::check_tensor(lse, op, "lse");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == rows && lse.size(1) == heads && lse.size(2) == cols, op,
                    ": lse must have shape (", rows, ", ", heads, ", ", cols, "), got ", lse.sizes());
}

int layout_code(const Geo& g) { return g.layout; }

void check_prefix_set(bool q, bool k, bool v, const char* op) {
  TORCH_CHECK_VALUE(q == k && k == v, op, ": prefix_q, prefix_k and prefix_v must be given together");
}

void launch_bwd(const at::Tensor& q, const char* op, const Rows& rdo, const Rows& rdpo, const Rows& rq, const Rows& rk,
                const Rows& rv, const Rows& rpq, const Rows& rpk, const Rows& rpv, const at::Tensor& mask,
                const Rows& ro, const Rows& rpo, const at::Tensor& lse, const Out& dq, const Out& dk, const Out& dv,
                const Out& dpq, const Out& dpk, const Out& dpv, float* bias_partials, const Geo& g, int64_t grid_h,
                int64_t grid_w, int64_t window, double scale) {
  s2b::check_status(
      s2_window_attention_bwd(s2b::dtype_code(q, op, "q"), rdo.p, rdo.sb, rdo.st, rdpo.p, rdpo.sb, rdpo.st, rq.p,
                              rq.sb, rq.st, rk.p, rk.sb, rk.st, rv.p, rv.sb, rv.st, rpq.p, rpq.sb, rpq.st, rpk.p,
                              rpk.sb, rpk.st, rpv.p, rpv.sb, rpv.st, mask_ptr(mask), ro.p, ro.sb, ro.st, rpo.p,
                              rpo.sb, rpo.st, lse.data_ptr<float>(), dq.p, dq.sb, dq.st, dk.p, dk.sb, dk.st, dv.p,
                              dv.sb, dv.st, dpq.p, dpq.sb, dpq.st, dpk.p, dpk.sb, dpk.st, dpv.p, dpv.sb, dpv.st,
                              bias_partials, g.B, g.L, g.H, g.D, grid_h, grid_w, window, layout_code(g),
                              float(scale), s2b::stream()),
      op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& prefix_q,
    const c10::optional<at::Tensor>& prefix_k, const c10::optional<at::Tensor>& prefix_v,
    const c10::optional<at::Tensor>& token_mask, int64_t grid_h, int64_t grid_w, int64_t window,
    c10::string_view layout, double scale) {
  const char* op = "window_attention_fwd";
  const bool prefix = prefix_q.has_value();
  check_prefix_set(prefix, prefix_k.has_value(), prefix_v.has_value(), op);
  const Geo g = geometry(q, "q", grid_h, grid_w, window, layout, prefix, S2_WA_KERNEL_FWD, op);
  const std::vector<int64_t> tok{g.B, g.L, g.H, g.D}, pre{g.B, g.nW, g.H, g.D};
  const Rows rq = rows_of(q, q, tok, op, "q", "q"), rk = rows_of(k, q, tok, op, "k", "q"),
             rv = rows_of(v, q, tok, op, "v", "q");
  const Rows rpq = opt_rows(prefix_q, q, pre, op, "prefix_q", "q"), rpk = opt_rows(prefix_k, q, pre, op, "prefix_k", "q"),
             rpv = opt_rows(prefix_v, q, pre, op, "prefix_v", "q");
  const at::Tensor mask = checked_mask(token_mask, g, op);
  S2_DEVICE_GUARD(q);
  at::Tensor o = at::empty(tok, q.options());
  at::Tensor po = prefix ? at::empty(pre, q.options()) : q.new_empty({0});
  const int64_t S = window * window + (prefix ? 1 : 0);
  at::Tensor lse = at::empty({g.B * g.nW, g.H, S}, q.options().dtype(at::kFloat));
  s2b::check_status(
      s2_window_attention_fwd(s2b::dtype_code(q, op, "q"), rq.p, rq.sb, rq.st, rk.p, rk.sb, rk.st, rv.p, rv.sb,
                              rv.st, rpq.p, rpq.sb, rpq.st, rpk.p, rpk.sb, rpk.st, rpv.p, rpv.sb, rpv.st,
                              mask_ptr(mask), o.data_ptr(), prefix ? po.data_ptr() : nullptr,
                              lse.data_ptr<float>(), g.B, g.L, g.H, g.D, grid_h, grid_w, window, layout_code(g),
                              float(scale), s2b::stream()),
      op);
  return {o, po, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dprefix_o, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const c10::optional<at::Tensor>& prefix_q, const c10::optional<at::Tensor>& prefix_k,
    const c10::optional<at::Tensor>& prefix_v, const c10::optional<at::Tensor>& token_mask, const at::Tensor& o,
    const at::Tensor& prefix_o, const at::Tensor& lse, int64_t grid_h, int64_t grid_w, int64_t window,
    c10::string_view layout, double scale) {
  const char* op = "window_attention_bwd";
  const bool prefix = prefix_q.has_value();
  check_prefix_set(prefix, prefix_k.has_value(), prefix_v.has_value(), op);
  TORCH_CHECK_VALUE(prefix || !dprefix_o.has_value(), op, ": dprefix_o without a prefix");
  const Geo g = geometry(q, "q", grid_h, grid_w, window, layout, prefix, S2_WA_KERNEL_BWD, op);
  const std::vector<int64_t> tok{g.B, g.L, g.H, g.D}, pre{g.B, g.nW, g.H, g.D};
  const Rows rq = rows_of(q, q, tok, op, "q", "q"), rk = rows_of(k, q, tok, op, "k", "q"),
             rv = rows_of(v, q, tok, op, "v", "q"), rdo = rows_of(dout, q, tok, op, "dout", "q"),
             ro = rows_of(o, q, tok, op, "o", "q");
  const Rows rpq = opt_rows(prefix_q, q, pre, op, "prefix_q", "q"), rpk = opt_rows(prefix_k, q, pre, op, "prefix_k", "q"),
             rpv = opt_rows(prefix_v, q, pre, op, "prefix_v", "q"),
             rdpo = opt_rows(dprefix_o, q, pre, op, "dprefix_o", "q");
  const Rows rpo = (prefix && dprefix_o.has_value()) ? rows_of(prefix_o, q, pre, op, "prefix_o", "q") : kNone;
  const at::Tensor mask = checked_mask(token_mask, g, op);
  const int64_t S = window * window + (prefix ? 1 : 0);
  check_lse(lse, g.B * g.nW, g.H, S, op);
  S2_DEVICE_GUARD(q);
  at::Tensor dq = at::empty(tok, q.options()), dk = at::empty(tok, q.options()), dv = at::empty(tok, q.options());
  // Absent outputs are distinct empty tensors (outputs of a custom op may not alias each other).
  at::Tensor dpq = prefix ? at::empty(pre, q.options()) : q.new_empty({0});
  at::Tensor dpk = prefix ? at::empty(pre, q.options()) : q.new_empty({0});
  at::Tensor dpv = prefix ? at::empty(pre, q.options()) : q.new_empty({0});
  launch_bwd(q, op, rdo, rdpo, rq, rk, rv, rpq, rpk, rpv, mask, ro, rpo, lse, out_of(dq), out_of(dk), out_of(dv),
             prefix ? out_of(dpq) : kNoOut, prefix ? out_of(dpk) : kNoOut, prefix ? out_of(dpv) : kNoOut, nullptr, g,
             grid_h, grid_w, window, scale);
  return {dq, dk, dv, dpq, dpk, dpv};
}

// (B, rows, n, heads, D) packed tensor: its n slots as (B, rows, heads, D) inputs, read in place.
void check_packed(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  check_device(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 5 && t.size(2) == n, op, ": ", name, " must be (batch, rows, ", n,
                    ", heads, head_dim), got shape ", t.sizes());
}

// -> (dqkv, dprefix_qkv, bias_partials): dq, dk, dv written straight into the slots of one
// contiguous (B, L, 3, heads, D) dqkv (dpq, dpk, dpv into dprefix_qkv), and with bias_grad the
// fp32 (B*nW, 3, heads, D) per-window column sums of the three (empty tensors when absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_qkv_bwd(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dprefix_o, const at::Tensor& qkv,
    const c10::optional<at::Tensor>& prefix_qkv, const c10::optional<at::Tensor>& token_mask, const at::Tensor& o,
    const at::Tensor& prefix_o, const at::Tensor& lse, int64_t grid_h, int64_t grid_w, int64_t window,
    c10::string_view layout, double scale, bool bias_grad) {
  const char* op = "window_attention_qkv_bwd";
  check_packed(qkv, 3, op, "qkv");
  const bool prefix = prefix_qkv.has_value();
  if (prefix) check_packed(*prefix_qkv, 3, op, "prefix_qkv");
  TORCH_CHECK_VALUE(prefix || !dprefix_o.has_value(), op, ": dprefix_o without a prefix");
  const at::Tensor q = qkv.select(2, 0), k = qkv.select(2, 1), v = qkv.select(2, 2);
  const Geo g = geometry(q, "qkv", grid_h, grid_w, window, layout, prefix, S2_WA_KERNEL_BWD, op);
  const std::vector<int64_t> tok{g.B, g.L, g.H, g.D}, pre{g.B, g.nW, g.H, g.D};
  const Rows rq = rows_of(q, q, tok, op, "qkv", "qkv"), rk = rows_of(k, q, tok, op, "qkv", "qkv"),
             rv = rows_of(v, q, tok, op, "qkv", "qkv"), rdo = rows_of(dout, q, tok, op, "dout", "qkv"),
             ro = rows_of(o, q, tok, op, "o", "qkv");
  Rows rpq = kNone, rpk = kNone, rpv = kNone;
  if (prefix) {
    const at::Tensor& pqkv = *prefix_qkv;
    rpq = rows_of(pqkv.select(2, 0), q, pre, op, "prefix_qkv", "qkv");
    rpk = rows_of(pqkv.select(2, 1), q, pre, op, "prefix_qkv", "qkv");
    rpv = rows_of(pqkv.select(2, 2), q, pre, op, "prefix_qkv", "qkv");
  }
  const Rows rdpo = opt_rows(dprefix_o, q, pre, op, "dprefix_o", "qkv");
  const Rows rpo = (prefix && dprefix_o.has_value()) ? rows_of(prefix_o, q, pre, op, "prefix_o", "qkv") : kNone;
  const at::Tensor mask = checked_mask(token_mask, g, op);
  check_lse(lse, g.B * g.nW, g.H, window * window + (prefix ? 1 : 0), op);
  S2_DEVICE_GUARD(qkv);
  at::Tensor dqkv = at::empty({g.B, g.L, 3, g.H, g.D}, qkv.options());
  at::Tensor dpre = prefix ? at::empty({g.B, g.nW, 3, g.H, g.D}, qkv.options()) : qkv.new_empty({0});
  at::Tensor parts = at::empty(bias_grad ? std::vector<int64_t>{g.B * g.nW, 3, g.H, g.D} : std::vector<int64_t>{0},
                               qkv.options().dtype(at::kFloat));
  auto slot = [](const at::Tensor& t, int64_t i) { return out_of(t.select(2, i)); };
  launch_bwd(q, op, rdo, rdpo, rq, rk, rv, rpq, rpk, rpv, mask, ro, rpo, lse, slot(dqkv, 0), slot(dqkv, 1),
             slot(dqkv, 2), prefix ? slot(dpre, 0) : kNoOut, prefix ? slot(dpre, 1) : kNoOut,
             prefix ? slot(dpre, 2) : kNoOut, bias_grad ? parts.data_ptr<float>() : nullptr, g, grid_h, grid_w,
             window, scale);
  return {dqkv, dpre, parts};
}

std::tuple<at::Tensor, at::Tensor> cls_pool_fwd(const at::Tensor& cls_q, const at::Tensor& cls_k,
                                                const at::Tensor& cls_v, const at::Tensor& k, const at::Tensor& v,
                                                int64_t grid_h, int64_t grid_w, int64_t window,
                                                c10::string_view layout, double scale) {
  const char* op = "cls_pool_fwd";
  const Geo g = geometry(k, "k", grid_h, grid_w, window, layout, true, S2_WA_KERNEL_CLS_FWD, op);
  const std::vector<int64_t> tok{g.B, g.L, g.H, g.D}, pre{g.B, g.nW, g.H, g.D};
  const Rows rk = rows_of(k, k, tok, op, "k", "k"), rv = rows_of(v, k, tok, op, "v", "k");
  const Rows rcq = rows_of(cls_q, k, pre, op, "cls_q", "k"), rck = rows_of(cls_k, k, pre, op, "cls_k", "k"),
             rcv = rows_of(cls_v, k, pre, op, "cls_v", "k");
  S2_DEVICE_GUARD(k);
  at::Tensor o = at::empty(pre, k.options());
  at::Tensor lse = at::empty({g.B * g.nW, g.H, 1}, k.options().dtype(at::kFloat));
  s2b::check_status(s2_cls_pool_fwd(s2b::dtype_code(k, op, "k"), rcq.p, rcq.sb, rcq.st, rck.p, rck.sb, rck.st,
                                    rcv.p, rcv.sb, rcv.st, rk.p, rk.sb, rk.st, rv.p, rv.sb, rv.st, o.data_ptr(),
                                    lse.data_ptr<float>(), g.B, g.L, g.H, g.D, grid_h, grid_w, window,
                                    layout_code(g), float(scale), s2b::stream()),
                    op);
  return {o, lse};
}

void launch_cls_bwd(const at::Tensor& k, const char* op, const Rows& rdo, const Rows& rcq, const Rows& rck,
                    const Rows& rcv, const Rows& rk, const Rows& rv, const Rows& ro, const at::Tensor& lse,
                    const Out& dcq, const Out& dck, const Out& dcv, const Out& dk, const Out& dv, const Geo& g,
                    int64_t grid_h, int64_t grid_w, int64_t window, double scale) {
  s2b::check_status(s2_cls_pool_bwd(s2b::dtype_code(k, op, "k"), rdo.p, rdo.sb, rdo.st, rcq.p, rcq.sb, rcq.st,
                                    rck.p, rck.sb, rck.st, rcv.p, rcv.sb, rcv.st, rk.p, rk.sb, rk.st, rv.p, rv.sb,
                                    rv.st, ro.p, ro.sb, ro.st, lse.data_ptr<float>(), dcq.p, dcq.sb, dcq.st, dck.p,
                                    dck.sb, dck.st, dcv.p, dcv.sb, dcv.st, dk.p, dk.sb, dk.st, dv.p, dv.sb, dv.st,
                                    g.B, g.L, g.H, g.D, grid_h, grid_w, window, layout_code(g), float(scale),
                                    s2b::stream()),
                    op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cls_pool_bwd(
    const at::Tensor& dout, const at::Tensor& cls_q, const at::Tensor& cls_k, const at::Tensor& cls_v,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, int64_t grid_h,
    int64_t grid_w, int64_t window, c10::string_view layout, double scale) {
  const char* op = "cls_pool_bwd";
  const Geo g = geometry(k, "k", grid_h, grid_w, window, layout, true, S2_WA_KERNEL_CLS_BWD, op);
  const std::vector<int64_t> tok{g.B, g.L, g.H, g.D}, pre{g.B, g.nW, g.H, g.D};
  const Rows rk = rows_of(k, k, tok, op, "k", "k"), rv = rows_of(v, k, tok, op, "v", "k");
  const Rows rcq = rows_of(cls_q, k, pre, op, "cls_q", "k"), rck = rows_of(cls_k, k, pre, op, "cls_k", "k"),
             rcv = rows_of(cls_v, k, pre, op, "cls_v", "k"), rdo = rows_of(dout, k, pre, op, "dout", "k"),
             ro = rows_of(o, k, pre, op, "o", "k");
  check_lse(lse, g.B * g.nW, g.H, 1, op);
  S2_DEVICE_GUARD(k);
  at::Tensor dcq = at::empty(pre, k.options()), dck = at::empty(pre, k.options()), dcv = at::empty(pre, k.options());
  at::Tensor dk = at::empty(tok, k.options()), dv = at::empty(tok, k.options());
  launch_cls_bwd(k, op, rdo, rcq, rck, rcv, rk, rv, ro, lse, out_of(dcq), out_of(dck), out_of(dcv), out_of(dk),
                 out_of(dv), g, grid_h, grid_w, window, scale);
  return {dcq, dck, dcv, dk, dv};
}

// -> (dcls_qkv, dkv), packed like cls_qkv (B, nW, 3, heads, D) and kv (B, L, 2, heads, D), contiguous,
// written slot by slot by the kernel.
std::tuple<at::Tensor, at::Tensor> cls_pool_kv_bwd(const at::Tensor& dout, const at::Tensor& cls_qkv,
                                                   const at::Tensor& kv, const at::Tensor& o, const at::Tensor& lse,
                                                   int64_t grid_h, int64_t grid_w, int64_t window,
                                                   c10::string_view layout, double scale) {
  const char* op = "cls_pool_kv_bwd";
  check_packed(kv, 2, op, "kv");
  check_packed(cls_qkv, 3, op, "cls_qkv");
  const at::Tensor k = kv.select(2, 0), v = kv.select(2, 1);
  const Geo g = geometry(k, "kv", grid_h, grid_w, window, layout, true, S2_WA_KERNEL_CLS_BWD, op);
  const std::vector<int64_t> tok{g.B, g.L, g.H, g.D}, pre{g.B, g.nW, g.H, g.D};
  const Rows rk = rows_of(k, k, tok, op, "kv", "kv"), rv = rows_of(v, k, tok, op, "kv", "kv");
  const Rows rcq = rows_of(cls_qkv.select(2, 0), k, pre, op, "cls_qkv", "kv"),
             rck = rows_of(cls_qkv.select(2, 1), k, pre, op, "cls_qkv", "kv"),
             rcv = rows_of(cls_qkv.select(2, 2), k, pre, op, "cls_qkv", "kv"),
             rdo = rows_of(dout, k, pre, op, "dout", "kv"), ro = rows_of(o, k, pre, op, "o", "kv");
  check_lse(lse, g.B * g.nW, g.H, 1, op);
  S2_DEVICE_GUARD(kv);
  at::Tensor dcqkv = at::empty({g.B, g.nW, 3, g.H, g.D}, kv.options());
  at::Tensor dkv = at::empty({g.B, g.L, 2, g.H, g.D}, kv.options());
  auto slot = [](const at::Tensor& t, int64_t i) { return out_of(t.select(2, i)); };
  launch_cls_bwd(k, op, rdo, rcq, rck, rcv, rk, rv, ro, lse, slot(dcqkv, 0), slot(dcqkv, 1), slot(dcqkv, 2),
                 slot(dkv, 0), slot(dkv, 1), g, grid_h, grid_w, window, scale);
  return {dcqkv, dkv};
}

}  // namespace

S2_FRAGMENT(m) {
  m.def("window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_q, Tensor? prefix_k, Tensor? prefix_v, "
        "Tensor? token_mask, int grid_h, int grid_w, int window, str layout, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("window_attention_bwd(Tensor dout, Tensor? dprefix_o, Tensor q, Tensor k, Tensor v, Tensor? prefix_q, "
        "Tensor? prefix_k, Tensor? prefix_v, Tensor? token_mask, Tensor o, Tensor prefix_o, Tensor lse, int grid_h, "
        "int grid_w, int window, str layout, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cls_pool_fwd(Tensor cls_q, Tensor cls_k, Tensor cls_v, Tensor k, Tensor v, int grid_h, int grid_w, "
        "int window, str layout, float scale) -> (Tensor, Tensor)");
  m.def("cls_pool_bwd(Tensor dout, Tensor cls_q, Tensor cls_k, Tensor cls_v, Tensor k, Tensor v, Tensor o, "
        "Tensor lse, int grid_h, int grid_w, int window, str layout, float scale) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("window_attention_qkv_bwd(Tensor dout, Tensor? dprefix_o, Tensor qkv, Tensor? prefix_qkv, "
        "Tensor? token_mask, Tensor o, Tensor prefix_o, Tensor lse, int grid_h, int grid_w, int window, str layout, "
        "float scale, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("cls_pool_kv_bwd(Tensor dout, Tensor cls_qkv, Tensor kv, Tensor o, Tensor lse, int grid_h, int grid_w, "
        "int window, str layout, float scale) -> (Tensor, Tensor)");
}

static void register_impls(torch::Library& m) {
  m.impl("window_attention_fwd", &window_attention_fwd);
  m.impl("window_attention_bwd", &window_attention_bwd);
  m.impl("cls_pool_fwd", &cls_pool_fwd);
  m.impl("cls_pool_bwd", &cls_pool_bwd);
  m.impl("window_attention_qkv_bwd", &window_attention_qkv_bwd);
  m.impl("cls_pool_kv_bwd", &cls_pool_kv_bwd);
}

S2_REGISTER_IMPLS(register_impls)
