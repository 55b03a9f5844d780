// The slice loop of moekit.moe.experts in C++: per expert gather -> GEMM -> activation -> GEMM ->
// weighted scatter, and its backward. The Python loop (_LoopExperts) is the same algorithm, step for
// step, except that here the backward recomputes the activation from h instead of keeping it; the
// tests compare the two and both against moekit.moe.reference.
//
// Why C++: at E64-E128 an expert's GEMMs take ~0.1-0.3 ms on a CPU, and the ~20 other ops around them
// (each a Python call and a fork/join of the intra-op threads) cost as much again. Here the experts are
// split into contiguous groups of about equal rows, one group per thread, and every op inside runs
// single-threaded: no Python, no per-op fork/join. Each thread scatters into its own [T, D] partial
// sum; the partials are added in group order, so the result is deterministic for a given grouping.
//
// Layout (computed in Python, see moekit.moe.native): meta[e] = (s, n, r, o): the expert's
// assignments are tok[s:s+n]; its GEMMs run on r >= n rows (bucketed row counts for oneDNN, rows past
// n are the next assignments' tokens and are never scattered); its rows of h start at o.
// Groups are laid out with a gap of max(r - n) between them, so one group's spill-over rows never
// reach the next group's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <string>
#include <vector>

using at::Tensor;

namespace {

enum class Act { Silu, Gelu, Relu };

struct Activation {
  Act kind;
  bool gated;
};

Activation parse_activation(const std::string& name) {
  if (name == "swiglu") return {Act::Silu, true};
  if (name == "geglu") return {Act::Gelu, true};
  if (name == "gelu") return {Act::Gelu, false};
  if (name == "relu") return {Act::Relu, false};
  TORCH_CHECK(false, "moekit loop_experts: unknown activation '", name, "'");
}

void act_forward(Act kind, const Tensor& h, Tensor& out) {
  switch (kind) {
    case Act::Silu: at::silu_out(out, h); break;
    case Act::Gelu: at::gelu_out(out, h, "none"); break;
    case Act::Relu: at::clamp_min_out(out, h, 0); break;
  }
}

void act_backward(Act kind, const Tensor& grad, const Tensor& h, Tensor& out) {
  switch (kind) {
    case Act::Silu: at::silu_backward_out(out, grad, h); break;
    case Act::Gelu: at::gelu_backward_out(out, grad, h, "none"); break;
    case Act::Relu: at::threshold_backward_out(out, grad, h, 0); break;
  }
}

const int64_t kRowDim[] = {0};
const at::IntArrayRef kRows(kRowDim);

struct Slice {
  int64_t s, n, r, o;
};

// The layout, checked against the tensors it indexes (slice() would clamp a bad bound silently).
std::vector<Slice> read_meta(const Tensor& meta, const Tensor& w_in, int64_t tok_rows, int64_t h_rows) {
  TORCH_CHECK(meta.dim() == 2 && meta.size(1) == 4 && meta.scalar_type() == at::kLong && meta.is_contiguous(),
              "moekit loop_experts: meta must be a contiguous int64 [E, 4] tensor");
  TORCH_CHECK(meta.size(0) == w_in.size(0), "moekit loop_experts: meta has ", meta.size(0), " experts, w_in ",
              w_in.size(0));
  const int64_t* p = meta.data_ptr<int64_t>();
  std::vector<Slice> out(meta.size(0));
  for (size_t e = 0; e < out.size(); ++e) {
    out[e] = {p[4 * e], p[4 * e + 1], p[4 * e + 2], p[4 * e + 3]};
    const auto& x = out[e];
    TORCH_CHECK(x.s >= 0 && x.n >= 0 && x.n <= x.r && x.s + x.r <= tok_rows && x.o >= 0 && x.o + x.r <= h_rows,
                "moekit loop_experts: expert ", e, " has (s, n, r, o) = (", x.s, ", ", x.n, ", ", x.r, ", ", x.o,
                ") outside ", tok_rows, " token rows / ", h_rows, " h rows");
  }
  return out;
}

int64_t max_rows(const std::vector<Slice>& sl) {
  int64_t m = 0;
  for (const auto& x : sl) m = std::max(m, x.r);
  return m;
}

// Runs body(group) for every group: on the intra-op threads, one group each, when there are several;
// on the calling thread (intra-op parallel ops inside) when there is one.
template <typename Body>
void for_each_group(int64_t groups, const Body& body) {
  if (groups == 1) {
    body(0);
    return;
  }
  at::ThreadLocalState state;  // grad mode and the like, for the worker threads
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t g = begin; g < end; ++g) body(g);
  });
}

// One [T, D] sum per group (the first is the result), added in group order.
std::vector<Tensor> partial_sums(const Tensor& like, int64_t groups) {
  std::vector<Tensor> out;
  for (int64_t g = 0; g < groups; ++g) out.push_back(at::zeros_like(like));
  return out;
}

Tensor reduce_partials(std::vector<Tensor>& partials) {
  for (size_t g = 1; g < partials.size(); ++g) partials[0].add_(partials[g]);
  return partials[0];
}

// a = act(gate) * up (gated, with act(gate) left in act_e) or act(h).
void activate(const Activation& act, const Tensor& h_e, Tensor& a_e, Tensor& act_e) {
  if (!act.gated) {
    act_forward(act.kind, h_e, a_e);
    return;
  }
  const int64_t F = a_e.size(1);
  act_forward(act.kind, h_e.slice(1, 0, F), act_e);
  at::mul_out(a_e, act_e, h_e.slice(1, F, 2 * F));
}

}  // namespace

// Returns (out, h). The activation a is not kept: the backward recomputes it from h (two elementwise
// ops per expert) rather than hold [N, F] between the passes.
std::vector<Tensor> loop_experts_forward(const Tensor& x, const Tensor& tok, const Tensor& w, const Tensor& w_in,
                                         const Tensor& w_out, const c10::optional<Tensor>& b_in,
                                         const c10::optional<Tensor>& b_out, const Tensor& meta,
                                         const std::vector<int64_t>& bounds, const std::string& act_name,
                                         int64_t h_rows) {
  const auto act = parse_activation(act_name);
  const auto sl = read_meta(meta, w_in, tok.size(0), h_rows);
  const int64_t D = x.size(1), H = w_in.size(1), F = w_out.size(2), groups = bounds.size() - 1;
  TORCH_CHECK(groups >= 1 && bounds.front() == 0 && bounds.back() == w_in.size(0),
              "moekit loop_experts: group bounds must run from 0 to the expert count");
  auto h = x.new_empty({h_rows, H});
  auto outs = partial_sums(x, groups);
  const int64_t m = max_rows(sl);
  for_each_group(groups, [&](int64_t g) {
    auto x_buf = x.new_empty({m, D}), y_buf = x.new_empty({m, D}), a_buf = x.new_empty({m, F}),
         act_buf = x.new_empty({m, F});
    for (int64_t e = bounds[g]; e < bounds[g + 1]; ++e) {
      const auto [s, n, r, o] = sl[e];
      if (n == 0) continue;
      auto tok_r = tok.slice(0, s, s + r), tok_n = tok.slice(0, s, s + n);
      // 1. Gather the expert's tokens and run its first projection on its rows of h.
      auto x_e = x_buf.slice(0, 0, r);
      at::index_select_out(x_e, x, 0, tok_r);
      auto h_e = h.slice(0, o, o + r);
      if (b_in) at::addmm_out(h_e, (*b_in)[e], x_e, w_in[e].t());
      else at::mm_out(h_e, x_e, w_in[e].t());
      // 2. Activation, then the down projection of the unweighted activation.
      auto a_e = a_buf.slice(0, 0, r), act_e = act_buf.slice(0, 0, r);
      activate(act, h_e, a_e, act_e);
      auto y_e = y_buf.slice(0, 0, r);
      at::mm_out(y_e, a_e, w_out[e].t());
      // 3. Weight and scatter back into this thread's partial sum.
      auto y_n = y_e.slice(0, 0, n);
      auto w_e = w.slice(0, s, s + n);
      y_n.mul_(w_e.unsqueeze(1));
      if (b_out) y_n.addr_(w_e, (*b_out)[e]);
      outs[g].index_add_(0, tok_n, y_n);
    }
  });
  return {reduce_partials(outs), h};
}

std::vector<c10::optional<Tensor>> loop_experts_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& tok, const Tensor& w, const Tensor& w_in,
    const Tensor& w_out, const c10::optional<Tensor>& b_in, const c10::optional<Tensor>& b_out, const Tensor& h,
    const Tensor& meta, const std::vector<int64_t>& bounds, const std::string& act_name, bool need_x,
    int64_t num_assignments) {
  const auto act = parse_activation(act_name);
  const auto sl = read_meta(meta, w_in, tok.size(0), h.size(0));
  const int64_t D = x.size(1), H = w_in.size(1), F = w_out.size(2), groups = bounds.size() - 1;
  TORCH_CHECK(groups >= 1 && bounds.front() == 0 && bounds.back() == w_in.size(0),
              "moekit loop_experts: group bounds must run from 0 to the expert count");
  // Every expert's slice is written below (idle experts zeroed by their own thread), so the page faults
  // of these fresh buffers are taken in parallel.
  auto grad_w_in = at::empty_like(w_in), grad_w_out = at::empty_like(w_out);
  c10::optional<Tensor> grad_b_in, grad_b_out;
  if (b_in) grad_b_in = at::empty_like(*b_in);
  if (b_out) grad_b_out = at::empty_like(*b_out);
  auto grad_w = w.new_zeros({num_assignments});
  std::vector<Tensor> grad_xs = need_x ? partial_sums(x, groups) : std::vector<Tensor>{};
  const int64_t m = max_rows(sl);
  for_each_group(groups, [&](int64_t g) {
    auto g_buf = x.new_empty({m, D}), x_buf = x.new_empty({m, D}), a_buf = x.new_empty({m, F}),
         act_buf = x.new_empty({m, F}), ga_buf = x.new_empty({m, F}), gh_buf = x.new_empty({m, H}),
         tmp_buf = x.new_empty({m, F});
    for (int64_t e = bounds[g]; e < bounds[g + 1]; ++e) {
      const auto [s, n, r, o] = sl[e];
      auto gw_in_e = grad_w_in[e], gw_out_e = grad_w_out[e];
      if (n == 0) {  // an expert with no token keeps a zero gradient
        gw_in_e.zero_();
        gw_out_e.zero_();
        if (grad_b_in) (*grad_b_in)[e].zero_();
        if (grad_b_out) (*grad_b_out)[e].zero_();
        continue;
      }
      auto tok_r = tok.slice(0, s, s + r), tok_n = tok.slice(0, s, s + n);
      auto h_e = h.slice(0, o, o + r);
      auto w_r = w.slice(0, s, s + r).unsqueeze(1);  // rows past n: the next assignments' (w is padded)
      auto a_e = a_buf.slice(0, 0, r), act_e = act_buf.slice(0, 0, r);
      activate(act, h_e, a_e, act_e);
      // 1. Down projection: y = w (a W_out^T + b_out). Bucketed rows get a zero cotangent.
      auto g_e = g_buf.slice(0, 0, r);
      at::index_select_out(g_e, grad_out, 0, tok_r);
      if (r > n) g_e.slice(0, n, r).zero_();
      auto grad_a = ga_buf.slice(0, 0, r);
      at::mm_out(grad_a, g_e, w_out[e]);  // dL/da before the routing weight
      // dL/dw = <dL/dy, a W_out^T + b_out> = <grad_a, a> + <g, b_out>
      auto grad_w_e = grad_w.slice(0, s, s + n);
      at::linalg_vecdot_out(grad_w_e, grad_a.slice(0, 0, n), a_e.slice(0, 0, n));
      if (b_out) grad_w_e.add_(at::mv(g_e.slice(0, 0, n), (*b_out)[e]));
      g_e.mul_(w_r);  // now dL/d(a W_out^T + b_out)
      at::mm_out(gw_out_e, g_e.t(), a_e);
      if (b_out) {
        auto gb = (*grad_b_out)[e];
        at::sum_out(gb, g_e, kRows);
      }
      grad_a.mul_(w_r);
      // 2. Activation.
      auto grad_h = gh_buf.slice(0, 0, r);
      if (act.gated) {
        auto gate = h_e.slice(1, 0, F), up = h_e.slice(1, F, H);
        auto tmp = tmp_buf.slice(0, 0, r), grad_gate = grad_h.slice(1, 0, F), grad_up = grad_h.slice(1, F, H);
        at::mul_out(tmp, grad_a, up);
        act_backward(act.kind, tmp, gate, grad_gate);
        at::mul_out(grad_up, act_e, grad_a);
      } else {
        act_backward(act.kind, grad_a, h_e, grad_h);
      }
      // 3. First projection: weight gradient, and the input gradient scattered back.
      auto x_e = x_buf.slice(0, 0, r);
      at::index_select_out(x_e, x, 0, tok_r);
      at::mm_out(gw_in_e, grad_h.t(), x_e);
      if (grad_b_in) {
        auto gb = (*grad_b_in)[e];
        at::sum_out(gb, grad_h, kRows);
      }
      if (need_x) {
        auto gx = x_e;  // the gathered input is spent: its buffer takes dL/dx
        at::mm_out(gx, grad_h, w_in[e]);
        grad_xs[g].index_add_(0, tok_n, gx.slice(0, 0, n));
      }
    }
  });
  c10::optional<Tensor> grad_x;
  if (need_x) grad_x = reduce_partials(grad_xs);
  return {grad_x, grad_w, grad_w_in, grad_w_out, grad_b_in, grad_b_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &loop_experts_forward, "the expert slice loop: (out, h)");
  m.def("backward", &loop_experts_backward,
        "its backward: (grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out)");
}
