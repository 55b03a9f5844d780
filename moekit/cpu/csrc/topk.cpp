#include "moekit_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace moekit {
namespace {

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

}  // namespace

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

}  // namespace moekit
