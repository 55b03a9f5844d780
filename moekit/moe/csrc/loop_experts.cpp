// The slice loop of moekit.moe.experts in C++: per expert gather -> GEMM -> activation -> GEMM ->
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
// Layout (computed in Python, see moekit.moe.native): meta[e] = (s, n, r, o): the expert's
// assignments are tok[s:s+n]; its GEMMs run on r >= n rows (bucketed row counts for oneDNN, rows past
// n are the next assignments' tokens and are never scattered); its rows of h start at o. Groups are
// laid out with a gap of max(r - n) between them, so one group's spill-over rows never reach the next
// group's. Pass B: blocks[b] = (start, m, r, e, h0): rows start..start+r of hidx / tok_b / w_b (h rows,
// tokens, routing weights), the first m of them expert e's assignments of the thread's tokens; h0 >= 0
// when those rows of h are h0..h0+r-1 (read in place, no gather).
#include <torch/extension.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define MOEKIT_AVX512 1
#include <immintrin.h>
#endif

using at::Tensor;

// A build with -DMOEKIT_LOOP_PROFILE (moekit.moe.native with MOEKIT_LOOP_PROFILE=1, a library of its
// own) times the loop's kinds of work, summed over threads: benchmarks/loop_profile.py prints them.
// Nested timers count in both (a transposed weight's packing is also inside its product's time).
#ifdef MOEKIT_LOOP_PROFILE
#include <chrono>
namespace loop_profile {
enum Op { kProduct, kPack, kGather, kScatter, kActivation, kForward, kBackward, kOps };
const char* const kNames[kOps] = {"products", "packing", "gathers", "scatters", "activation", "forward",
                                  "backward"};
std::atomic<int64_t> ns[kOps], calls[kOps];

struct Timer {
  Op op;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  explicit Timer(Op o) : op(o) {}
  ~Timer() {
    ns[op] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    ++calls[op];
  }
};
}  // namespace loop_profile
#define MOEKIT_PROFILE(op) loop_profile::Timer moekit_profile_timer_(loop_profile::op)
#else
#define MOEKIT_PROFILE(op)
#endif

namespace at::native {
// ATen's oneDNN matmul (ATen/native/mkldnn/Matmul.cpp; its header is not installed): result = alpha a b
// + beta result, written in place. Declared weak so that a torch built without it (or with another
// signature) still loads this library, with the pointer null: moekit then uses at::mm.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                                         float alpha);
}  // namespace at::native

#ifdef MOEKIT_AVX512
// SLEEF's 16-lane expf (1-ULP), as ATen's AVX-512 kernels call it; exported by libtorch_cpu on x86-64.
// Weak, like mkldnn_matmul: null where this torch does not export it (the gated SiLU then runs on ATen).
extern "C" __attribute__((weak, target("avx512f"))) __m512 Sleef_expf16_u10(__m512);
#endif

namespace {

// Whether oneDNN's fp32 matmul runs here: a torch built without oneDNN keeps a stub that throws, and
// ATen's fp32 path checks the CPU (AVX-512 or AVX-NE-CONVERT on x86), so one small product, once,
// decides; torch.backends.mkldnn.enabled = False turns it off.
bool have_onednn() {
  static const bool runs = [] {
    if (&at::native::mkldnn_matmul == nullptr || !at::hasMKLDNN()) return false;
    try {
      auto a = at::ones({2, 3}), b = at::ones({3, 2}), out = at::zeros({2, 2});
      at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
      return out.eq(3).all().item<bool>();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return runs && at::globalContext().userEnabledMkldnn();
}

// out = a b, or out += a b. With `onednn`, fp32 products run on oneDNN's GEMM rather than the BLAS's
// (PyTorch sends fp32 to MKL, whose fp32 GEMM ran 1.5-2.3x slower than oneDNN's on this AMD CPU:
// MKL takes its AVX2 kernels on non-Intel CPUs; see moekit.nn.gemm).
bool on_onednn(bool onednn, const Tensor& out, const Tensor& a, const Tensor& b) {
  return onednn && have_onednn() && a.scalar_type() == at::kFloat && out.is_contiguous() && a.numel() > 0 &&
         b.numel() > 0;
}

void gemm(Tensor out, const Tensor& a, const Tensor& b, bool onednn, bool accumulate = false) {
  if (on_onednn(onednn, out, a, b)) at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  else if (accumulate) out.addmm_(a, b);
  else at::mm_out(out, a, b);
}

// ---- The loop's own fp32 GEMM (AVX-512), for the small experts' products inside the expert groups ----
// Why: at E64-E128 every product is small ([~256, 512] x [512, 176] and the like) and there are ~1000 a
// step. ATen's oneDNN matmul spends ~10 us a call before any arithmetic (creating the primitive
// descriptor, even when the primitive is cached), builds a kernel per new row count (hence the
// bucketed rows, ~5% extra work), and on these shapes reached 170-254 GFLOP/s single-threaded; this
// kernel, a plain register-tiled loop over B's rows with A broadcast, reached 213-270 on the same
// shapes (E64's and E128's six products, `single_thread` of benchmarks/gemm_backends.py, one run) and
// has no per-call cost.
// C[M, N] (+)= A[M, K] B[K, N]: A(i, k) = a[i a_rs + k a_cs] (any strides: a transposed view needs no
// copy), B's rows contiguous (a transposed B is first packed by pack_transposed), C's rows contiguous.
// Each C tile of up to 12 rows by up to 64 columns sums over k in order, in registers (fp32 FMA).
#ifdef MOEKIT_AVX512
template <int MR, int NV>
__attribute__((target("avx512f"))) void gemm_tile(int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                                                  const float* b, int64_t ldb, float* c, int64_t ldc,
                                                  __mmask16 last, bool accumulate) {
  __m512 acc[MR][NV];
  // (fully unrolled, so that acc stays in registers)
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, bk + 16 * v) : _mm512_loadu_ps(bk + 16 * v);
    const float* ak = a + k * a_cs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ak[i * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* ci = c + i * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      const __m512 r = accumulate ? _mm512_add_ps(acc[i][v], _mm512_maskz_loadu_ps(m, ci)) : acc[i][v];
      _mm512_mask_storeu_ps(ci, m, r);
    }
}

// Rows per tile for NV vectors of columns: 24 accumulators (6 x 4, 8 x 3, 12 x 2), the rest of the 32
// registers for B's vectors and A's broadcast.
constexpr int tile_rows(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : nv == 2 ? 12 : 6; }

template <int NV, int MR = tile_rows(NV)>
void gemm_tile_rows(int mr, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                    float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  if constexpr (MR > 1) {
    if (mr < MR) return gemm_tile_rows<NV, MR - 1>(mr, K, a, a_rs, a_cs, b, ldb, c, ldc, last, accumulate);
  }
  gemm_tile<MR, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, last, accumulate);
}

// Column panels of at most 4 vectors, as even as they come (88 columns: 48 + 40, not 64 + 24), each
// swept by tiles of tile_rows(NV) rows (B's panel, K x 16 NV, stays in L2 while they pass over it).
template <int NV>
void gemm_panel(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  constexpr int MR = tile_rows(NV);
  for (int64_t m0 = 0; m0 < M; m0 += MR)
    gemm_tile_rows<NV>(static_cast<int>(std::min<int64_t>(MR, M - m0)), K, a + m0 * a_rs, a_rs, a_cs, b, ldb,
                       c + m0 * ldc, ldc, last, accumulate);
}

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t vectors = (N + 15) / 16, panels = (vectors + 3) / 4;
  int64_t n0 = 0;
  for (int64_t p = 0; p < panels; ++p) {
    const int nv = static_cast<int>((vectors - n0 / 16 + (panels - p) - 1) / (panels - p));  // of the rest
    const int64_t width = std::min<int64_t>(16 * nv, N - n0), tail = width - 16 * (nv - 1);
    const __mmask16 last = tail == 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
    switch (nv) {
      case 1: gemm_panel<1>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
      case 2: gemm_panel<2>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
      case 3: gemm_panel<3>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
      default: gemm_panel<4>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
    }
    n0 += width;
  }
}

// dst[0:16, 0:16] (row stride ldd) = the transpose of src[0:16, 0:16] (row stride lds): unpacks of
// pairs of rows, then of pairs of pairs, then two rounds of 128-bit lane shuffles.
__attribute__((target("avx512f"))) void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

// dst [K, N] = src^T for src [N, K] with row stride lds: whole 16 x 16 blocks in registers, the edges
// element by element.
void pack_transposed(const float* src, int64_t N, int64_t K, int64_t lds, float* dst) {
  MOEKIT_PROFILE(kPack);
  const int64_t N16 = N - N % 16, K16 = K - K % 16;
  for (int64_t n0 = 0; n0 < N16; n0 += 16)
    for (int64_t k0 = 0; k0 < K16; k0 += 16) transpose16(src + n0 * lds + k0, lds, dst + k0 * N + n0, N);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = n < N16 ? K16 : 0; k < K; ++k) dst[k * N + n] = src[n * lds + k];
}
#endif

bool have_own_gemm() {
#ifdef MOEKIT_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// Whether own_gemm takes these operands: fp32, out's rows contiguous, b's rows contiguous or b a
// transposed view (other layouts, e.g. strided weights, go to the library GEMM).
bool own_gemm_takes(const Tensor& out, const Tensor& a, const Tensor& b) {
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
         out.stride(1) == 1 && (b.stride(1) == 1 || b.stride(0) == 1);
}

// out (+)= a b on the kernel above: own_gemm_takes(out, a, b); a any strides; a transposed b is packed
// into a buffer of the calling thread first (kept for the next call: at most one expert's weights).
void own_gemm(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
#ifdef MOEKIT_AVX512
  TORCH_CHECK(own_gemm_takes(out, a, b) && a.size(1) == b.size(0) && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(1),
              "moekit loop_experts: own_gemm needs fp32 [M, K] x [K, N] into rows of N, got ", a.sizes(), " x ",
              b.sizes(), " into ", out.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const float* bp = b.data_ptr<float>();
  int64_t ldb = b.stride(0);
  if (b.stride(1) != 1 && N > 1) {  // b = w.t() for a row-major w [N, K]
    thread_local std::vector<float> packed;
    packed.resize(static_cast<size_t>(K * N));
    pack_transposed(bp, N, K, b.stride(1), packed.data());
    bp = packed.data();
    ldb = N;
  }
  gemm_f32(M, N, K, a.data_ptr<float>(), a.stride(0), a.stride(1), bp, ldb, out.data_ptr<float>(), out.stride(0),
           accumulate);
#else
  TORCH_CHECK(false, "moekit loop_experts: no own GEMM on this CPU");
#endif
}

// The loop's products: on its own kernel (`own`: fp32 inside the expert groups, see
// moekit.moe.native.own_gemm) where it takes the operands, else on oneDNN (`onednn`) or ATen's mm.
struct Gemm {
  bool onednn = false, own = false;

  bool own_takes(const Tensor& out, const Tensor& a, const Tensor& b) const {
    return own && own_gemm_takes(out, a, b);
  }

  void operator()(Tensor out, const Tensor& a, const Tensor& b, bool accumulate = false) const {
    MOEKIT_PROFILE(kProduct);
    if (own_takes(out, a, b)) own_gemm(out, a, b, accumulate);
    else gemm(out, a, b, onednn, accumulate);
  }
};

// out = bias + a b, bias broadcast over the rows (at::addmm's rounding: one, after the sum).
void gemm_bias(Tensor out, const Tensor& bias, const Tensor& a, const Tensor& b, const Gemm& mm) {
  if (!mm.own_takes(out, a, b) && !on_onednn(mm.onednn, out, a, b)) {
    at::addmm_out(out, bias, a, b);
    return;
  }
  out.copy_(bias.expand_as(out));
  mm(out, a, b, true);
}

// Large step buffers (h, the weight gradients) come from a cache of freed blocks. NOTE: glibc maps
// every allocation above 32 MiB (its highest mmap threshold) fresh from the kernel and unmaps it on
// free, and the first write to each 4 KiB page then faults: a 46 MB fp32 buffer (E64's h, E64's and
// E128's grad_w_in) took ~17 ms single-threaded to fault in against ~1 ms to write, on every step.
// Smaller buffers come from glibc's heap, reused without faults, while a cached block holds memory
// the heap could lend to others (caching E128's 23 MB h put its step's peak 3% higher). So a block of
// min_bytes (32 MiB) or more, freed by its tensor, returns here and serves the next request it fits
// with at most 1/8 to spare; a request that finds no block frees the smaller ones it could not use.
// h, whose rows change a little with the routing, thus settles on a block of the largest size seen
// (a miss only at a new largest), and an h of an earlier, smaller batch does not linger. The bytes
// kept are bounded (MOEKIT_BLOCK_CACHE_MB, read once, default 2048; set_limit; 0 turns the cache
// off), the oldest block going first; release() hands them all back. The storages of its tensors are
// not resizable.
class BlockCache {
 public:
  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    size_t bytes = options.dtype().itemsize();
    for (int64_t s : sizes) {
      TORCH_CHECK(s >= 0, "moekit loop_experts: negative size ", s);
      bytes *= static_cast<size_t>(s);
    }
    if (bytes < min_bytes()) return at::empty(sizes, options);
    size_t cap = bytes;
    void* p = take(bytes, cap);
    if (p == nullptr) p = allocator()->raw_allocate(cap);
    try {
      return at::from_blob(
          p, sizes, [this, cap](void* q) { give(q, cap); }, options);
    } catch (...) {
      give(p, cap);
      throw;
    }
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t freed = bytes_;
    for (auto& [cap, block] : free_) allocator()->raw_deallocate(block.p);
    free_.clear();
    bytes_ = 0;
    return freed;
  }

  size_t bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

  size_t limit() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_;
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
    shrink(0);
  }

  size_t min_bytes() const { return min_bytes_.load(std::memory_order_relaxed); }  // (read every request)

  void set_min_bytes(size_t bytes) { min_bytes_.store(bytes, std::memory_order_relaxed); }

 private:
  struct Block {
    void* p;
    uint64_t age;
  };

  static c10::Allocator* allocator() { return c10::GetCPUAllocator(); }

  static size_t limit_from_env() {
    const char* mb = std::getenv("MOEKIT_BLOCK_CACHE_MB");
    if (mb == nullptr || *mb == '\0') return size_t{2048} << 20;
    char* end = nullptr;
    const long long v = std::strtoll(mb, &end, 10);
    TORCH_CHECK(*end == '\0' && v >= 0 && v < (1LL << 40),
                "MOEKIT_BLOCK_CACHE_MB must be a whole number of MiB >= 0, got '", mb, "'");
    return static_cast<size_t>(v) << 20;
  }

  void* take(size_t bytes, size_t& cap) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(bytes);  // the smallest block that fits
    if (it == free_.end() || it->first > bytes + bytes / 8) {
      // the blocks smaller than asked for, down to half of it: most likely an earlier, smaller h
      for (auto j = free_.lower_bound(bytes / 2); j != free_.end() && j->first < bytes;) {
        allocator()->raw_deallocate(j->second.p);
        bytes_ -= j->first;
        j = free_.erase(j);
      }
      return nullptr;
    }
    cap = it->first;
    void* p = it->second.p;
    bytes_ -= cap;
    free_.erase(it);
    return p;
  }

  void shrink(size_t room) {  // (locked) the oldest blocks go until `room` more bytes fit
    while (!free_.empty() && bytes_ + room > limit_) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second.age < oldest->second.age) oldest = it;
      allocator()->raw_deallocate(oldest->second.p);
      bytes_ -= oldest->first;
      free_.erase(oldest);
    }
  }

  void give(void* p, size_t cap) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cap > limit_) {
      allocator()->raw_deallocate(p);
      return;
    }
    shrink(cap);
    free_.emplace(cap, Block{p, clock_++});
    bytes_ += cap;
  }

  std::mutex mu_;
  std::multimap<size_t, Block> free_;  // by capacity
  size_t bytes_ = 0;
  size_t limit_ = limit_from_env();
  std::atomic<size_t> min_bytes_{size_t{32} << 20};
  uint64_t clock_ = 0;
};

// Never destroyed: tensors holding its blocks may outlive the library's static destructors.
BlockCache& block_cache() {
  static auto* cache = new BlockCache();
  return *cache;
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

void check_scale(const c10::optional<Tensor>& scale, int64_t rows) {
  TORCH_CHECK(!scale || (scale->dim() == 1 && scale->size(0) == rows && scale->is_contiguous() &&
                         scale->scalar_type() == at::kFloat),
              "moekit swiglu: scale must be a contiguous fp32 vector of one weight per row");
}

// The gated SiLU (SwiGLU) fused, for fp32 on AVX-512: one pass over h instead of ATen's three
// (gate copy, silu, mul) forward and four backward, the same formulas as ATen's vectorized kernels
// (silu(g) = g / (1 + exp(-g)), sigmoid(g) = 1 / (1 + exp(-g)), SLEEF's expf). The sigmoid is
// recomputed in the backward from h, as the ATen path recomputes act(gate).
bool have_avx512_exp() {
#ifdef MOEKIT_AVX512
  static const bool ok = &Sleef_expf16_u10 != nullptr && __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

bool fused_swiglu(const Activation& act, at::ScalarType dtype) {
  return act.gated && act.kind == Act::Silu && dtype == at::kFloat && have_avx512_exp();
}

// NOTE: h streams from memory here (E64's is 46 MB), and with exp and a division per 16 lanes between
// its loads the hardware prefetcher fell behind: over [32768, 352] in 128-row blocks, cold, the fused
// kernel took 8.2 ms against ATen's 5.1 (a copy streams at full speed), 2.0 ms with the rows
// kAheadRows ahead prefetched (single-threaded, one-off). Gathers and scatters prefetch as far ahead.
constexpr int64_t kAheadRows = 4;

inline void prefetch_row(const void* row, size_t bytes, bool write) {
  const char* p = static_cast<const char*>(row);
  for (size_t b = 0; b < bytes; b += 64) {
    if (write) __builtin_prefetch(p + b, 1, 3);
    else __builtin_prefetch(p + b, 0, 3);
  }
}

#ifdef MOEKIT_AVX512
__attribute__((target("avx512f"))) inline __m512 exp_neg16(__m512 x) {  // exp(-x), the sign flipped as ATen's neg()
  return Sleef_expf16_u10(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))));
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// a[i] = silu(h[i, :F]) * h[i, F:2F] * scale[i] (scale: the routing weights, or null for 1) for rows i0..i1
__attribute__((target("avx512f"))) void swiglu_rows(const float* h, int64_t h_ld, const float* scale, float* a,
                                                    int64_t a_ld, int64_t F, int64_t i0, int64_t i1) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = i0; i < i1; ++i) {
    const float* g = h + i * h_ld;
    float* o = a + i * a_ld;
    if (i + kAheadRows < i1) prefetch_row(g + kAheadRows * h_ld, 2 * F * sizeof(float), false);
    const __m512 sv = _mm512_set1_ps(scale ? scale[i] : 1.f);
    for (int64_t j = 0; j < F; j += 16) {
      const __mmask16 m = lanes(F - j);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, g + F + j);
      const __m512 act = _mm512_div_ps(gv, _mm512_add_ps(one, exp_neg16(gv)));
      __m512 av = _mm512_mul_ps(act, uv);
      if (scale) av = _mm512_mul_ps(av, sv);
      _mm512_mask_storeu_ps(o + j, m, av);
    }
  }
}

// The backward of swiglu_rows for rows i0..i1, from dL/d(a·scale) = da: with a = silu(g) up and
// da' = da scale[i], dL/dgate = (da' up) sigmoid(g) (1 + g (1 - sigmoid(g))), dL/dup = silu(g) da';
// and for rows i < n_dot, dot[i] = <da[i], a[i]> (dL/dscale: the routing weight's gradient).
__attribute__((target("avx512f"))) void swiglu_backward_rows(const float* h, int64_t h_ld, const float* da,
                                                             int64_t da_ld, const float* scale, float* dot,
                                                             int64_t n_dot, float* gh, int64_t gh_ld, int64_t F,
                                                             int64_t i0, int64_t i1) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = i0; i < i1; ++i) {
    const float *g = h + i * h_ld, *d = da + i * da_ld;
    float* o = gh + i * gh_ld;
    if (i + kAheadRows < i1) prefetch_row(g + kAheadRows * h_ld, 2 * F * sizeof(float), false);
    const bool want_dot = dot != nullptr && i < n_dot;
    const __m512 sv = _mm512_set1_ps(scale ? scale[i] : 1.f);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < F; j += 16) {
      const __mmask16 m = lanes(F - j);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, g + F + j);
      __m512 dv = _mm512_maskz_loadu_ps(m, d + j);
      const __m512 denom = _mm512_add_ps(one, exp_neg16(gv));
      const __m512 sig = _mm512_div_ps(one, denom), act = _mm512_div_ps(gv, denom);
      if (want_dot) acc = _mm512_fmadd_ps(dv, _mm512_mul_ps(act, uv), acc);  // (masked lanes are 0)
      if (scale) dv = _mm512_mul_ps(dv, sv);
      const __m512 dsilu = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dv, uv), sig),
                                         _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, sig))));
      _mm512_mask_storeu_ps(o + j, m, dsilu);
      _mm512_mask_storeu_ps(o + F + j, m, _mm512_mul_ps(act, dv));
    }
    if (want_dot) dot[i] = _mm512_reduce_add_ps(acc);
  }
}
#endif

// Rows split over the intra-op threads when called outside a parallel region (one group), inline
// inside one (at::parallel_for does not nest).
template <typename Rows>
void for_rows(int64_t r, int64_t F, const Rows& rows) {
  at::parallel_for(0, r, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), rows);
}

const float* rows_of(const Tensor* t) { return t != nullptr ? t->data_ptr<float>() : nullptr; }

// (only called where fused_swiglu holds, on rows with unit column stride; scale: r contiguous fp32 or null)
void swiglu(const Tensor& h, Tensor& a, const Tensor* scale = nullptr) {
#ifdef MOEKIT_AVX512
  const int64_t F = a.size(1);
  for_rows(h.size(0), F, [&](int64_t i0, int64_t i1) {
    swiglu_rows(h.data_ptr<float>(), h.stride(0), rows_of(scale), a.data_ptr<float>(), a.stride(0), F, i0, i1);
  });
#else
  TORCH_CHECK(false, "moekit loop_experts: no fused SwiGLU on this CPU");
#endif
}

// dot: null, or n_dot contiguous fp32 to take <grad_a[i], a[i]> of the first n_dot rows
void swiglu_backward(const Tensor& h, const Tensor& grad_a, Tensor& grad_h, const Tensor* scale = nullptr,
                     Tensor* dot = nullptr) {
#ifdef MOEKIT_AVX512
  const int64_t F = grad_a.size(1);
  float* dot_p = dot != nullptr ? dot->data_ptr<float>() : nullptr;
  const int64_t n_dot = dot != nullptr ? dot->size(0) : 0;
  for_rows(h.size(0), F, [&](int64_t i0, int64_t i1) {
    swiglu_backward_rows(h.data_ptr<float>(), h.stride(0), grad_a.data_ptr<float>(), grad_a.stride(0),
                         rows_of(scale), dot_p, n_dot, grad_h.data_ptr<float>(), grad_h.stride(0), F, i0, i1);
  });
#else
  TORCH_CHECK(false, "moekit loop_experts: no fused SwiGLU on this CPU");
#endif
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
  Gemm mm;  // the own kernel only inside expert groups (moekit.moe.native.own_gemm), where AVX-512 is
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

// The indices of the k largest scores of each row, largest first, ties to the lower index (the order
// of moekit.moe.reference; torch.topk's among ties is its own), NaN above every number as in
// torch.topk. One pass per row keeping the k best in order (a row with a NaN is scanned again with
// the NaN-aware order).
template <typename scalar_t, bool kNan>
void top_of_row(const scalar_t* row, int64_t E, int64_t k, scalar_t* best, int64_t* idx, bool* saw_nan) {
  auto above = [](scalar_t v, scalar_t w) { return kNan ? v > w || (std::isnan(v) && !std::isnan(w)) : v > w; };
  bool nan = false;
  int64_t n = 0;  // kept so far, best[0] the largest
  for (int64_t e = 0; e < E; ++e) {
    const scalar_t v = row[e];
    nan |= v != v;
    if (n == k && !above(v, best[k - 1])) continue;  // (an equal value has a higher index: it stays below)
    int64_t j = n < k ? n++ : k - 1;
    for (; j > 0 && above(v, best[j - 1]); --j) {
      best[j] = best[j - 1];
      idx[j] = idx[j - 1];
    }
    best[j] = v;
    idx[j] = e;
  }
  *saw_nan = nan;
}

Tensor topk_indices(const Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() &&
                  (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble),
              "moekit topk: needs a contiguous fp32 / fp64 [T, E] tensor");
  const int64_t T = scores.size(0), E = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "moekit topk: k=", k, " outside 1..", E);
  auto out = at::empty({T, k}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "moekit_topk", [&] {
    const scalar_t* p = scores.data_ptr<scalar_t>();
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 8192 / E), [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> best(k);
      for (int64_t t = t0; t < t1; ++t) {
        bool nan = false;
        top_of_row<scalar_t, false>(p + t * E, E, k, best.data(), o + t * k, &nan);
        if (nan) top_of_row<scalar_t, true>(p + t * E, E, k, best.data(), o + t * k, &nan);
      }
    });
  });
  return out;
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
  auto h = block_cache().empty({h_rows, H}, x.options());
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
// recomputes it first (NativeLoopExperts.backward).
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
  auto grad_w_in = block_cache().empty(w_in.sizes(), w_in.options()),
       grad_w_out = block_cache().empty(w_out.sizes(), w_out.options());
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

// The loop and the GEMM run without the GIL (they touch no Python object): other Python threads go on.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MOEKIT_LOOP_PROFILE
  m.def(
      "profile",
      [] {
        std::map<std::string, std::pair<double, int64_t>> out;
        for (int op = 0; op < loop_profile::kOps; ++op)
          out[loop_profile::kNames[op]] = {loop_profile::ns[op] * 1e-9, loop_profile::calls[op].load()};
        return out;
      },
      "{kind of work: (seconds summed over threads, calls)} since the last profile_reset");
  m.def(
      "profile_reset",
      [] {
        for (int op = 0; op < loop_profile::kOps; ++op) loop_profile::ns[op] = loop_profile::calls[op] = 0;
      },
      "zeroes the profile");
#endif
  m.def("forward", &loop_experts_forward, "the expert slice loop: (out, h)", py::arg("x"), py::arg("tok"),
        py::arg("w"), py::arg("w_in"), py::arg("w_out"), py::arg("b_in"), py::arg("b_out"), py::arg("meta"),
        py::arg("bounds"), py::arg("act"), py::arg("h_rows"), py::arg("hidx") = py::none(),
        py::arg("tok_b") = py::none(), py::arg("w_b") = py::none(), py::arg("blocks") = py::none(),
        py::arg("block_bounds") = std::vector<int64_t>{}, py::arg("onednn") = false, py::arg("own_gemm") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &loop_experts_backward,
        "its backward: (grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out)", py::arg("grad_out"),
        py::arg("x"), py::arg("tok"), py::arg("w"), py::arg("w_in"), py::arg("w_out"), py::arg("b_in"),
        py::arg("b_out"), py::arg("h"), py::arg("meta"), py::arg("bounds"), py::arg("act"), py::arg("need_x"),
        py::arg("num_assignments"), py::arg("hidx") = py::none(), py::arg("tok_b") = py::none(),
        py::arg("w_b") = py::none(), py::arg("blocks") = py::none(),
        py::arg("block_bounds") = std::vector<int64_t>{}, py::arg("onednn") = false, py::arg("own_gemm") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "release_cache", [] { return block_cache().release(); }, "frees the cached blocks; returns their bytes");
  m.def(
      "cache_bytes", [] { return block_cache().bytes(); }, "bytes of freed blocks cached for reuse");
  m.def(
      "cache_limit", [] { return block_cache().limit(); }, "the most bytes of freed blocks kept");
  m.def(
      "set_cache_limit", [](size_t bytes) { block_cache().set_limit(bytes); },
      "bounds the bytes of freed blocks kept (0: none), freeing the oldest above it", py::arg("bytes"));
  m.def(
      "cache_min_bytes", [] { return block_cache().min_bytes(); }, "the smallest block the cache keeps");
  m.def(
      "set_cache_min_bytes", [](size_t bytes) { block_cache().set_min_bytes(bytes); },
      "the smallest block the cache keeps (smaller buffers come from the allocator)", py::arg("bytes"));
  m.def("have_fused_swiglu", &have_avx512_exp, "whether the fused fp32 SwiGLU runs here (AVX-512, SLEEF found)");
  m.def(
      "swiglu",
      [](const Tensor& h, const c10::optional<Tensor>& scale) {
        TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0 && h.stride(1) == 1 &&
                        fused_swiglu({Act::Silu, true}, h.scalar_type()),
                    "moekit swiglu: needs an fp32 [r, 2F] tensor, AVX-512 and SLEEF");
        check_scale(scale, h.size(0));
        auto a = h.new_empty({h.size(0), h.size(1) / 2});
        swiglu(h, a, scale ? &*scale : nullptr);
        return a;
      },
      "the fused kernel alone: silu(h[:, :F]) * h[:, F:] (* scale[:, None])", py::arg("h"),
      py::arg("scale") = py::none());
  m.def(
      "swiglu_backward",
      [](const Tensor& h, const Tensor& grad_a, const c10::optional<Tensor>& scale, int64_t n_dot) {
        TORCH_CHECK(h.dim() == 2 && h.stride(1) == 1 && fused_swiglu({Act::Silu, true}, h.scalar_type()) &&
                        grad_a.scalar_type() == at::kFloat && grad_a.stride(1) == 1 && grad_a.size(0) == h.size(0) &&
                        2 * grad_a.size(1) == h.size(1) && n_dot >= 0 && n_dot <= h.size(0),
                    "moekit swiglu_backward: needs fp32 h [r, 2F] and grad_a [r, F], 0 <= n_dot <= r, AVX-512 and "
                    "SLEEF");
        check_scale(scale, h.size(0));
        auto grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
        auto dot = h.new_empty({n_dot});
        swiglu_backward(h, grad_a, grad_h, scale ? &*scale : nullptr, &dot);
        return std::make_tuple(grad_h, dot);
      },
      "the fused backward alone: (dL/dh from dL/d(a * scale), <dL/d(a * scale), a> of the first n_dot rows)",
      py::arg("h"), py::arg("grad_a"), py::arg("scale") = py::none(), py::arg("n_dot") = 0);
  m.def("have_own_gemm", &have_own_gemm, "whether the loop's own fp32 GEMM runs here (AVX-512)");
  m.def(
      "own_mm",
      [](const Tensor& a, const Tensor& b, c10::optional<Tensor> out, bool accumulate) {
        TORCH_CHECK(have_own_gemm() && a.dim() == 2 && b.dim() == 2 && (!out || out->dim() == 2),
                    "moekit own_mm: needs AVX-512 and matrices");
        TORCH_CHECK(out || !accumulate, "moekit own_mm: accumulate needs out");
        if (!out) out = a.new_empty({a.size(0), b.size(1)});
        at::assert_no_overlap(*out, a);  // (a later column panel reads rows of a an earlier one wrote)
        at::assert_no_overlap(*out, b);
        own_gemm(*out, a, b, accumulate);
        return *out;
      },
      "a @ b on the loop's own fp32 kernel, single-threaded (a any strides; b's rows contiguous or b "
      "transposed), into out (out += a @ b with accumulate)",
      py::arg("a"), py::arg("b"), py::arg("out") = py::none(), py::arg("accumulate") = false,
      py::call_guard<py::gil_scoped_release>());
  m.def("topk", &topk_indices,
        "indices of the k largest of each row, largest first, ties to the lower index, NaN largest",
        py::arg("scores"), py::arg("k"), py::call_guard<py::gil_scoped_release>());
  m.def("have_onednn", &have_onednn, "whether ATen's oneDNN matmul was found in this torch");
  m.def(
      "mm_out",
      [](Tensor out, const Tensor& a, const Tensor& b, bool accumulate) { gemm(out, a, b, true, accumulate); },
      "out = a b (out += a b with accumulate): oneDNN for fp32 where found, else at::mm", py::arg("out"), py::arg("a"),
      py::arg("b"), py::arg("accumulate") = false, py::call_guard<py::gil_scoped_release>());
}
