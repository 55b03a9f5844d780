// The private libtorch symbols the extension uses. Each is a weak reference (see moekit_cpu.h): null
// when this torch does not export it, e.g. when a new release renamed it or changed its signature.
// moekit.cpu.build reads private_symbols() after loading and warns once for each one missing.
#include "moekit_cpu.h"

namespace moekit {
namespace {

struct PrivateSymbol {
  Symbol id;
  const char* name;  // as the warning names it
  bool found;
  std::atomic<bool> hidden{false};
};

PrivateSymbol* table(size_t& n) {
  static PrivateSymbol symbols[] = {
      {Symbol::kMkldnnMatmul,
       "at::native::mkldnn_matmul(const Tensor&, const Tensor&, const Tensor&, float, float)",
       &at::native::mkldnn_matmul != nullptr},
#ifdef MOEKIT_AVX512
      {Symbol::kSleefExpf16, "Sleef_expf16_u10", &Sleef_expf16_u10 != nullptr},
#endif
  };
  n = sizeof(symbols) / sizeof(symbols[0]);
  return symbols;
}

}  // namespace

bool symbol_usable(Symbol s) {
  size_t n = 0;
  PrivateSymbol* symbols = table(n);
  for (size_t i = 0; i < n; ++i)
    if (symbols[i].id == s) return symbols[i].found && !symbols[i].hidden.load(std::memory_order_relaxed);
  return false;  // not used by this build (SLEEF off x86-64)
}

std::vector<std::pair<std::string, bool>> private_symbols() {
  size_t n = 0;
  PrivateSymbol* symbols = table(n);
  std::vector<std::pair<std::string, bool>> out;
  for (size_t i = 0; i < n; ++i) out.emplace_back(symbols[i].name, symbol_usable(symbols[i].id));
  return out;
}

bool hide_symbol(const std::string& name) {
  size_t n = 0;
  PrivateSymbol* symbols = table(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string full = symbols[i].name;
    if (full == name || full.substr(0, full.find('(')) == name) {  // with or without the signature
      symbols[i].hidden = true;
      return true;
    }
  }
  return false;
}

}  // namespace moekit
