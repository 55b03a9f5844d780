// The slice loop of moekit.moe.backends.loop in C++: per expert gather -> GEMM -> activation -> GEMM ->
// weighted scatter, and its backward. The Python loop (_LoopExperts) is the same algorithm, except
// that here the backward recomputes the activation from h instead of keeping it, and that the fused
// fp32 SwiGLU folds the routing weight into the activation (w a W_out^T rather than w (a W_out^T));
// the tests compare the two and both against moekit.moe.reference.
//
// Why C++: at E64-E128 an expert's GEMMs take ~0.1-0.3 ms on a CPU, and the ~20 other ops around them
// (each a Python call and a fork/join of the intra-op threads) cost as much again. Here every op runs
// single-threaded inside one of the intra-op threads: no Python, no per-op fork/join.
//
// With one group (large experts) everything runs expert by expert on the calling thread, each op on
// all threads. With G groups the work is split twice, so that no two threads ever add into the same
// row and no [T, D] partial sum per thread is needed:
//   pass A, one contiguous group of experts per thread: the work that needs all of an expert's rows
//     (the first projection; in backward every weight gradient, and dL/dh, written over h);
//   pass B, one range of tokens per thread: for every expert, the rows of its tokens in that range
//     (the down projection and the scatter into out; in backward dL/dh W_in and the scatter into dL/dx).
// Each token's sum runs over its experts in expert order, as in the Python loop, whatever G is.
//
// Layout (computed in Python, see moekit.cpu.loop): meta[e] = (s, n, r, o): the expert's
// assignments are tok[s:s+n]; its GEMMs run on r >= n rows (bucketed row counts for oneDNN, rows past
// n are the next assignments' tokens and are never scattered); its rows of h start at o. Groups are
// laid out with a gap of max(r - n) between them, so one group's spill-over rows never reach the next
// group's. Pass B: blocks[b] = (start, m, r, e, h0): rows start..start+r of hidx / tok_b / w_b (h rows,
// tokens, routing weights), the first m of them expert e's assignments of the thread's tokens; h0 >= 0
// when those rows of h are h0..h0+r-1 (read in place, no gather).

#include "moekit_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace moekit {
namespace {

// out = bias + a b, bias broadcast over the rows (at::addmm's rounding: one, after the sum).
void gemm_bias(Tensor out, const Tensor& bias, const Tensor& a, const Tensor& b, const Gemm& mm) {
  if (!mm.own_takes(out, a, b) && !on_onednn(mm.onednn, out, a, b)) {
    at::addmm_out(out, bias, a, b);
    return;
  }
  out.copy_(bias.expand_as(out));
  mm(out, a, b, true);
}

enum class Act { Silu, Gelu, Relu };

struct Activation {
  Act kind;
  bool gated;
  bool fused = false;  // the fused fp32 SwiGLU runs (see fused_swiglu; set by read_layout)
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

bool fused_swiglu(const Activation& act, at::ScalarType dtype) {
  return act.gated && act.kind == Act::Silu && dtype == at::kFloat && have_fused_swiglu();
}

const int64_t kRowDim[] = {0};
const at::IntArrayRef kRows(kRowDim);

struct Slice {
  int64_t s, n, r, o;
};

struct Block {
  int64_t start, m, r, e, h0;
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

// a = act(gate) * up (gated, with act(gate) left in act_e) or act(h). NOTE: the gate is a column
// slice of h, and ATen's unary kernels (silu, gelu and their backwards) ran ~6x slower on such a
// strided input than on a contiguous one (silu over [32768, 176]: 8.3 ms strided, 1.3 ms contiguous,
// single-threaded here), against 1.5 ms for the copy: so the gate is copied first, into act_e or into
// gate_c when given (the backward keeps it there for act'(gate)). The fused SwiGLU also multiplies each
// row by its routing weight (w_r: r rows), F wide here rather than D wide in the down projection's
// output; the other activations leave that to the caller.
void activate(const Activation& act, const Tensor& h_e, Tensor& a_e, Tensor& act_e, const Tensor& w_r,
              const c10::optional<Tensor>& gate_c = c10::nullopt) {
  MOEKIT_PROFILE(kActivation);
  if (!act.gated) {
    act_forward(act.kind, h_e, a_e);
    return;
  }
  if (act.fused) {  // act_e and gate_c are not needed then: the backward is fused too
    swiglu(h_e, a_e, &w_r);
    return;
  }
  const int64_t F = a_e.size(1);
  if (gate_c) {
    gate_c->copy_(h_e.slice(1, 0, F));
    act_forward(act.kind, *gate_c, act_e);
  } else {
    act_e.copy_(h_e.slice(1, 0, F));
    act_forward(act.kind, act_e, act_e);
  }
  at::mul_out(a_e, act_e, h_e.slice(1, F, 2 * F));
}

// Rows of a [T, D] tensor in index order are random reads from memory (x, the output gradient, the
// output's rows added into): each row's cache lines are asked for kAheadRows rows before they are used.
// out[i] = src[idx[i]] (ATen's index_select along rows), the rows ahead prefetched.
void gather_rows(Tensor out, const Tensor& src, const Tensor& idx) {
  MOEKIT_PROFILE(kGather);
  TORCH_CHECK(out.is_contiguous() && src.dim() == 2 && src.stride(1) == 1 && idx.is_contiguous() &&
                  idx.scalar_type() == at::kLong && out.size(0) == idx.size(0) && out.size(1) == src.size(1) &&
                  out.scalar_type() == src.scalar_type(),
              "moekit loop_experts: gather_rows needs contiguous rows of one dtype and int64 indices");
  const int64_t m = idx.size(0), T = src.size(0);
  const size_t bytes = src.size(1) * src.element_size(), ld = src.stride(0) * src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t* t = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < T, "moekit loop_experts: row ", t[i], " out of range for ", T, " rows");
    const int64_t next = i + kAheadRows < m ? t[i + kAheadRows] : -1;
    if (next >= 0 && next < T) prefetch_row(s + next * ld, bytes, false);
    std::memcpy(o + i * bytes, s + t[i] * ld, bytes);
  }
}

// into[tok[i]] += rows[i], one row at a time. NOTE: pass B's threads add into disjoint rows of one
// tensor, which at::index_add_ does not always allow: on bf16 / fp16 with narrow rows (8 wide here)
// it adds through an fp32 copy of all of `into` and writes every row back (3.6 ms for one row into
// [1M, 8], 3 us in fp32), undoing the other thread's work. Each sum is rounded to the dtype once per
// added row, as index_add_ does (a token appears at most once per block).
void scatter_rows(Tensor& into, const Tensor& tok, const Tensor& rows) {
  MOEKIT_PROFILE(kScatter);
  TORCH_CHECK(into.is_contiguous() && rows.stride(1) == 1 && tok.is_contiguous() && rows.size(1) == into.size(1) &&
                  tok.size(0) == rows.size(0) && rows.scalar_type() == into.scalar_type(),
              "moekit loop_experts: scatter_rows needs contiguous rows of one dtype");
  const int64_t m = rows.size(0), D = rows.size(1), stride = rows.stride(0), T = into.size(0);
  const int64_t* t = tok.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, into.scalar_type(), "moekit_scatter_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* dst = into.data_ptr<scalar_t>();
    const scalar_t* src = rows.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m; ++i) {
      TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < T, "moekit loop_experts: token ", t[i], " out of range for ", T,
                        " rows");
      const int64_t next = i + kAheadRows < m ? t[i + kAheadRows] : -1;
      if (next >= 0 && next < T) prefetch_row(dst + next * D, D * sizeof(scalar_t), true);
      scalar_t* __restrict__ d = dst + t[i] * D;
      const scalar_t* __restrict__ x = src + i * stride;
      for (int64_t j = 0; j < D; ++j) d[j] = static_cast<scalar_t>(static_cast<acc_t>(d[j]) + static_cast<acc_t>(x[j]));
    }
  });
}

// A block's r rows of h: in place when they are consecutive (h0 >= 0), else gathered into buf. In place,
// the r - m rows past the block's own are other rows of h, possibly never written (the gaps between
// groups): pass B computes on them row by row and never scatters or sums over them.
Tensor block_rows(const Tensor& h, const Tensor& hidx, const Block& blk, Tensor& buf) {
  if (blk.h0 >= 0) return h.slice(0, blk.h0, blk.h0 + blk.r);
  auto rows = buf.slice(0, 0, blk.r);
  gather_rows(rows, h, hidx.slice(0, blk.start, blk.start + blk.r));
  return rows;
}

// Buffers of the largest row count for the per-expert (or per-block) temporaries of one thread.
struct Buffers {
  Tensor a, act, y;
  Buffers(const Tensor& like, int64_t rows, int64_t F, int64_t D, bool fused_act)
      : a(like.new_empty({rows, F})), act(like.new_empty({fused_act ? 0 : rows, F})), y(like.new_empty({rows, D})) {}
};

// out[tok[i]] += w[i] * (act(h[i]) W_out^T + b_out) for the first m of r rows of h (w_r: r weights, the
// rows past m the next assignments'); `threaded`: inside one of the intra-op threads while the others add
// into other rows of out, so the rows are added one by one on it rather than by index_add_ on all threads.
void down_and_scatter(const Activation& act, const Tensor& h_r, const Tensor& w_out_e,
                      const c10::optional<Tensor>& b_out_e, const Tensor& w_r, const Tensor& tok_m, Tensor& out,
                      Buffers& buf, bool threaded, const Gemm& mm) {
  const int64_t r = h_r.size(0), m = tok_m.size(0);
  auto a = buf.a.slice(0, 0, r), act_r = buf.act.slice(0, 0, r);
  activate(act, h_r, a, act_r, w_r);
  auto y = buf.y.slice(0, 0, r);
  mm(y, a, w_out_e.t());  // weighted already when the activation is fused
  auto y_m = y.slice(0, 0, m), w_m = w_r.slice(0, 0, m);
  if (!act.fused) y_m.mul_(w_m.unsqueeze(1));
  if (b_out_e) y_m.addr_(w_m, *b_out_e);
  if (threaded) scatter_rows(out, tok_m, y_m);
  else {
    MOEKIT_PROFILE(kScatter);
    out.index_add_(0, tok_m, y_m);
  }
}

std::vector<Block> read_blocks(const c10::optional<Tensor>& blocks, int64_t rows, int64_t experts,
                               int64_t h_rows) {
  std::vector<Block> out;
  if (!blocks) return out;
  TORCH_CHECK(blocks->dim() == 2 && blocks->size(1) == 5 && blocks->scalar_type() == at::kLong &&
                  blocks->is_contiguous(),
              "moekit loop_experts: blocks must be a contiguous int64 [B, 5] tensor");
  const int64_t* p = blocks->data_ptr<int64_t>();
  for (int64_t b = 0; b < blocks->size(0); ++b) {
    Block x{p[5 * b], p[5 * b + 1], p[5 * b + 2], p[5 * b + 3], p[5 * b + 4]};
    TORCH_CHECK(x.start >= 0 && x.m >= 1 && x.m <= x.r && x.start + x.r <= rows && x.e >= 0 && x.e < experts &&
                    x.h0 >= -1 && x.h0 + x.r <= h_rows,
                "moekit loop_experts: block ", b, " has (start, m, r, e, h0) = (", x.start, ", ", x.m, ", ", x.r,
                ", ", x.e, ", ", x.h0, ") outside ", rows, " rows / ", experts, " experts / ", h_rows, " h rows");
    out.push_back(x);
  }
  return out;
}

struct TokenBlocks {  // pass B's rows: h rows, tokens and routing weights, and the blocks per thread
  Tensor hidx, tok, w;
  std::vector<Block> blocks;
  std::vector<int64_t> bounds;

  int64_t max_rows(int64_t g) const {  // the largest GEMM of thread g's blocks
    int64_t rows = 0;
    for (int64_t b = bounds[g]; b < bounds[g + 1]; ++b) rows = std::max(rows, blocks[b].r);
    return rows;
  }
};

TokenBlocks read_token_blocks(const c10::optional<Tensor>& hidx, const c10::optional<Tensor>& tok_b,
                              const c10::optional<Tensor>& w_b, const c10::optional<Tensor>& blocks,
                              const std::vector<int64_t>& block_bounds, int64_t groups, int64_t experts,
                              int64_t h_rows) {
  TokenBlocks tb;
  if (groups == 1) return tb;
  TORCH_CHECK(hidx && tok_b && w_b && blocks, "moekit loop_experts: expert groups need the token blocks");
  tb.hidx = *hidx, tb.tok = *tok_b, tb.w = *w_b, tb.bounds = block_bounds;
  TORCH_CHECK(tb.tok.size(0) == tb.hidx.size(0) && tb.w.size(0) == tb.hidx.size(0),
              "moekit loop_experts: token block rows disagree");
  // (hidx values are bounds-checked by gather_rows where gathered; in-place blocks by read_blocks)
  tb.blocks = read_blocks(blocks, tb.hidx.size(0), experts, h_rows);
  TORCH_CHECK(static_cast<int64_t>(block_bounds.size()) == groups + 1 && block_bounds.front() == 0 &&
                  block_bounds.back() == static_cast<int64_t>(tb.blocks.size()),
              "moekit loop_experts: block bounds must run from 0 to the block count, one range per group");
  return tb;
}

// What forward and backward read and check alike.
struct Layout {
  Activation act;
  std::vector<Slice> slices;
  int64_t groups, D, H, F;
  TokenBlocks tb;
  Gemm mm;  // the own kernel only inside expert groups (moekit.moe.backends.chooser), where AVX-512 is
};

Layout read_layout(const Tensor& x, const Tensor& tok, const Tensor& w, const Tensor& w_in, const Tensor& w_out,
                   const Tensor& meta, const std::vector<int64_t>& bounds, const std::string& act_name, int64_t h_rows,
                   const c10::optional<Tensor>& hidx, const c10::optional<Tensor>& tok_b,
                   const c10::optional<Tensor>& w_b, const c10::optional<Tensor>& blocks,
                   const std::vector<int64_t>& block_bounds, bool onednn, bool own_gemm) {
  const int64_t groups = bounds.size() - 1;
  TORCH_CHECK(groups >= 1 && bounds.front() == 0 && bounds.back() == w_in.size(0),
              "moekit loop_experts: group bounds must run from 0 to the expert count");
  auto act = parse_activation(act_name);
  act.fused = fused_swiglu(act, x.scalar_type());  // (h, in x's dtype, is the loop's own contiguous buffer)
  // (the kernels below index h, the weights and the gradients by these widths through raw pointers)
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 3 && w_out.dim() == 3 && w_in.size(2) == x.size(1) &&
                  w_out.size(0) == w_in.size(0) && w_out.size(1) == x.size(1) &&
                  w_in.size(1) == (act.gated ? 2 : 1) * w_out.size(2) && w_in.scalar_type() == x.scalar_type() &&
                  w_out.scalar_type() == x.scalar_type(),
              "moekit loop_experts: x [T, D], w_in [E, H, D] and w_out [E, D, F] with H = ", act.gated ? "2F" : "F",
              " in x's dtype, got ", x.sizes(), ", ", w_in.sizes(), ", ", w_out.sizes());
  // (the fused SwiGLU reads the routing weights through a raw pointer, r rows from each slice's start)
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == tok.size(0) && w.scalar_type() == x.scalar_type() &&
                  (!w_b || (w_b->dim() == 1 && w_b->is_contiguous() && w_b->scalar_type() == x.scalar_type())),
              "moekit loop_experts: the routing weights must be contiguous vectors in x's dtype, one per token row");
  // (the own kernel takes fp32 operands only: Gemm sends the others to the library's)
  const Gemm mm{onednn, own_gemm && groups > 1 && have_own_gemm()};
  return {act, read_meta(meta, w_in, tok.size(0), h_rows), groups, x.size(1), w_in.size(1), w_out.size(2),
          read_token_blocks(hidx, tok_b, w_b, blocks, block_bounds, groups, w_in.size(0), h_rows), mm};
}

}  // namespace

// Returns (out, h). The activation a is not kept: the backward recomputes it from h (two elementwise
// ops per expert) rather than hold [N, F] between the passes.
std::vector<Tensor> loop_experts_forward(const Tensor& x, const Tensor& tok, const Tensor& w, const Tensor& w_in,
                                         const Tensor& w_out, const c10::optional<Tensor>& b_in,
                                         const c10::optional<Tensor>& b_out, const Tensor& meta,
                                         const std::vector<int64_t>& bounds, const std::string& act_name,
                                         int64_t h_rows, const c10::optional<Tensor>& hidx,
                                         const c10::optional<Tensor>& tok_b, const c10::optional<Tensor>& w_b,
                                         const c10::optional<Tensor>& blocks,
                                         const std::vector<int64_t>& block_bounds, bool onednn, bool own_gemm) {
  MOEKIT_PROFILE(kForward);
  const auto L = read_layout(x, tok, w, w_in, w_out, meta, bounds, act_name, h_rows, hidx, tok_b, w_b, blocks,
                             block_bounds, onednn, own_gemm);
  // (plain references, not a structured binding: lambdas may not capture those before C++20)
  const auto& act = L.act;
  const auto& sl = L.slices;
  const auto& tb = L.tb;
  const int64_t groups = L.groups, D = L.D, H = L.H, F = L.F;
  const auto& mm = L.mm;
  const bool fused = groups == 1;  // one thread of control: each expert's down projection right away
  auto h = block_cache::empty({h_rows, H}, x.options());
  auto out = at::zeros_like(x);
  const int64_t m = max_rows(sl);
  // Pass A: per expert, gather its tokens and run its first projection on its rows of h.
  for_each_group(groups, [&](int64_t g) {
    auto x_buf = x.new_empty({m, D});
    c10::optional<Buffers> buf;
    if (fused) buf.emplace(x, m, F, D, act.fused);
    for (int64_t e = bounds[g]; e < bounds[g + 1]; ++e) {
      const auto [s, n, r, o] = sl[e];
      if (n == 0) continue;
      auto x_e = x_buf.slice(0, 0, r);
      gather_rows(x_e, x, tok.slice(0, s, s + r));
      auto h_e = h.slice(0, o, o + r);
      if (b_in) gemm_bias(h_e, (*b_in)[e], x_e, w_in[e].t(), mm);
      else mm(h_e, x_e, w_in[e].t());
      if (fused)
        down_and_scatter(act, h_e, w_out[e], b_out ? c10::optional<Tensor>((*b_out)[e]) : c10::nullopt,
                         w.slice(0, s, s + r), tok.slice(0, s, s + n), out, *buf, false, mm);
    }
  });
  if (fused) return {out, h};
  // Pass B: per thread, its tokens' rows of every expert.
  for_each_group(groups, [&](int64_t g) {
    const int64_t rows = tb.max_rows(g);
    if (rows == 0) return;
    Buffers buf(x, rows, F, D, act.fused);
    auto h_buf = x.new_empty({rows, H});
    for (int64_t b = tb.bounds[g]; b < tb.bounds[g + 1]; ++b) {
      const Block& blk = tb.blocks[b];
      auto h_r = block_rows(h, tb.hidx, blk, h_buf);
      down_and_scatter(act, h_r, w_out[blk.e], b_out ? c10::optional<Tensor>((*b_out)[blk.e]) : c10::nullopt,
                       tb.w.slice(0, blk.start, blk.start + blk.r), tb.tok.slice(0, blk.start, blk.start + blk.m),
                       out, buf, true, mm);
    }
  });
  return {out, h};
}

// With several groups and need_x, h is overwritten with dL/dh (pass A) for pass B to read: h is the
// autograd Function's own saved tensor, and a second backward through the same graph (retain_graph)
// recomputes it first (moekit.cpu.loop.NativeLoopExperts.backward).
std::vector<c10::optional<Tensor>> loop_experts_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& tok, const Tensor& w, const Tensor& w_in,
    const Tensor& w_out, const c10::optional<Tensor>& b_in, const c10::optional<Tensor>& b_out, const Tensor& h,
    const Tensor& meta, const std::vector<int64_t>& bounds, const std::string& act_name, bool need_x,
    int64_t num_assignments, const c10::optional<Tensor>& hidx, const c10::optional<Tensor>& tok_b,
    const c10::optional<Tensor>& w_b, const c10::optional<Tensor>& blocks,
    const std::vector<int64_t>& block_bounds, bool onednn, bool own_gemm) {
  MOEKIT_PROFILE(kBackward);
  const auto L = read_layout(x, tok, w, w_in, w_out, meta, bounds, act_name, h.size(0), hidx, tok_b, w_b, blocks,
                             block_bounds, onednn, own_gemm);
  // (plain references, not a structured binding: lambdas may not capture those before C++20)
  const auto& act = L.act;
  const auto& sl = L.slices;
  const auto& tb = L.tb;
  const int64_t groups = L.groups, D = L.D, H = L.H, F = L.F;
  const auto& mm = L.mm;
  const bool fused = groups == 1;
  // Every expert's slice is written below (idle experts zeroed by their own thread).
  auto grad_w_in = block_cache::empty(w_in.sizes(), w_in.options()),
       grad_w_out = block_cache::empty(w_out.sizes(), w_out.options());
  c10::optional<Tensor> grad_b_in, grad_b_out, grad_x;
  if (b_in) grad_b_in = at::empty_like(*b_in);
  if (b_out) grad_b_out = at::empty_like(*b_out);
  if (need_x) grad_x = at::zeros_like(x);
  auto grad_w = w.new_zeros({num_assignments});
  const int64_t m = max_rows(sl);
  // Pass A: per expert, every gradient that sums over all of its rows, and dL/dh.
  for_each_group(groups, [&](int64_t g) {
    const int64_t m_act = act.fused ? 0 : m;  // no act(gate), gate copy or product buffers then
    auto g_buf = x.new_empty({m, D}), x_buf = x.new_empty({m, D}), a_buf = x.new_empty({m, F}),
         act_buf = x.new_empty({m_act, F}), ga_buf = x.new_empty({m, F}), gh_buf = x.new_empty({m, H}),
         tmp_buf = x.new_empty({m_act, F}), gc_buf = x.new_empty({act.gated ? m_act : 0, F});
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
      auto w_r = w.slice(0, s, s + r);  // rows past n: the next assignments' (w is padded)
      auto a_e = a_buf.slice(0, 0, r), act_e = act_buf.slice(0, 0, r), gate_c = gc_buf.slice(0, 0, r);
      activate(act, h_e, a_e, act_e, w_r, gate_c);  // fused: a_e = w a
      // 1. Down projection: y = w (a W_out^T + b_out). Bucketed rows get a zero cotangent.
      auto g_e = g_buf.slice(0, 0, r);
      gather_rows(g_e, grad_out, tok_r);
      if (r > n) g_e.slice(0, n, r).zero_();
      auto grad_a = ga_buf.slice(0, 0, r);
      mm(grad_a, g_e, w_out[e]);  // dL/da before the routing weight
      // dL/dw = <dL/dy, a W_out^T + b_out> = <grad_a, a> + <g, b_out>; dL/dW_out = (w g)^T a = g^T (w a)
      auto grad_w_e = grad_w.slice(0, s, s + n);
      auto grad_h = gh_buf.slice(0, 0, r);
      if (act.fused) {
        mm(gw_out_e, g_e.t(), a_e);
        if (b_out) {
          auto gb = (*grad_b_out)[e];
          at::mv_out(gb, g_e.t(), w_r);
        }
        // 2. Activation, with <grad_a, a> and grad_a's routing weight on the way.
        MOEKIT_PROFILE(kActivation);
        swiglu_backward(h_e, grad_a, grad_h, &w_r, &grad_w_e);
        if (b_out) grad_w_e.add_(at::mv(g_e.slice(0, 0, n), (*b_out)[e]));
      } else {
        auto w_r1 = w_r.unsqueeze(1);
        at::linalg_vecdot_out(grad_w_e, grad_a.slice(0, 0, n), a_e.slice(0, 0, n));
        if (b_out) grad_w_e.add_(at::mv(g_e.slice(0, 0, n), (*b_out)[e]));
        g_e.mul_(w_r1);  // now dL/d(a W_out^T + b_out)
        mm(gw_out_e, g_e.t(), a_e);
        if (b_out) {
          auto gb = (*grad_b_out)[e];
          at::sum_out(gb, g_e, kRows);
        }
        grad_a.mul_(w_r1);
        // 2. Activation.
        MOEKIT_PROFILE(kActivation);
        if (act.gated) {
          auto up = h_e.slice(1, F, H);
          auto tmp = tmp_buf.slice(0, 0, r), grad_gate = grad_h.slice(1, 0, F), grad_up = grad_h.slice(1, F, H);
          at::mul_out(tmp, grad_a, up);
          act_backward(act.kind, tmp, gate_c, tmp);  // on contiguous tensors (see activate), in place
          grad_gate.copy_(tmp);
          at::mul_out(grad_up, act_e, grad_a);
        } else {
          act_backward(act.kind, grad_a, h_e, grad_h);
        }
      }
      // 3. First projection: the weight gradient; dL/dx here (one group) or in pass B.
      auto x_e = x_buf.slice(0, 0, r);
      gather_rows(x_e, x, tok_r);
      mm(gw_in_e, grad_h.t(), x_e);
      if (grad_b_in) {
        auto gb = (*grad_b_in)[e];
        at::sum_out(gb, grad_h, kRows);
      }
      if (need_x && fused) {
        auto gx = x_e;  // the gathered input is spent: its buffer takes dL/dx
        mm(gx, grad_h, w_in[e]);
        MOEKIT_PROFILE(kScatter);
        grad_x->index_add_(0, tok_n, gx.slice(0, 0, n));
      } else if (need_x) {
        // Only its own n rows (the next expert reads past them), and behind autograd's back: no
        // version bump, see NativeLoopExperts.backward.
        std::memcpy(h.slice(0, o, o + n).data_ptr(), grad_h.data_ptr(), n * H * h.element_size());
      }
    }
  });
  // Pass B: per thread, dL/dx of its tokens from every expert's rows of dL/dh.
  if (need_x && !fused) {
    for_each_group(groups, [&](int64_t g) {
      const int64_t rows = tb.max_rows(g);
      if (rows == 0) return;
      auto gh_buf = x.new_empty({rows, H}), gx_buf = x.new_empty({rows, D});
      for (int64_t b = tb.bounds[g]; b < tb.bounds[g + 1]; ++b) {
        const Block& blk = tb.blocks[b];
        auto gh = block_rows(h, tb.hidx, blk, gh_buf), gx = gx_buf.slice(0, 0, blk.r);
        mm(gx, gh, w_in[blk.e]);
        scatter_rows(*grad_x, tb.tok.slice(0, blk.start, blk.start + blk.m), gx.slice(0, 0, blk.m));
      }
    });
  }
  return {grad_x, grad_w, grad_w_in, grad_w_out, grad_b_in, grad_b_out};
}

}  // namespace moekit
