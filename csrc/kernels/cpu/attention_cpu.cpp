// CPU attention dispatcher (baseline flags): picks the ISA path once, honours ATTNSEL_CPU_ISA.
#include "attention_cpu.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "attention_cpu_isa.h"

namespace attnsel::cpu {
namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kNumIsa = 4 };
constexpr std::string_view kIsaNames[kNumIsa] = {"scalar", "avx2", "avx512", "avx512_bf16"};
using Fn = void (*)(const AttentionParams&);
constexpr Fn kIsaFns[kNumIsa] = {detail::forward_scalar, detail::forward_avx2, detail::forward_avx512,
                                 detail::forward_avx512_bf16};

bool cpu_has(int isa) {
  switch (isa) {
    case kScalar: return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx512:
      return cpu_has(kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case kAvx512Bf16: return cpu_has(kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
}

int find_isa(std::string_view name) {
  for (int i = 0; i < kNumIsa; ++i)
    if (kIsaNames[i] == name) return i;
  return -1;
}

std::string supported_list() {
  std::string s;
  for (int i = 0; i < kNumIsa; ++i) {
    if (!cpu_has(i)) continue;
    if (!s.empty()) s += ", ";
    s += kIsaNames[i];
  }
  return s;
}

// Chosen path; -1 = not chosen yet. An invalid ATTNSEL_CPU_ISA leaves an error that every use reports
// until set_isa() picks a valid path.
std::atomic<int> g_isa{-1};
std::once_flag g_init;
std::string g_env_error;  // written once under g_init, read-only afterwards

void init_from_env() {
  int best = kScalar;
  for (int i = kNumIsa - 1; i > kScalar; --i) {
    if (cpu_has(i)) {
      best = i;
      break;
    }
  }
  int chosen = best;
  if (const char* env = std::getenv("ATTNSEL_CPU_ISA"); env != nullptr && *env != '\0') {
    const int forced = find_isa(env);
    if (forced < 0 || !cpu_has(forced)) {
      g_env_error = std::string("attnsel: ATTNSEL_CPU_ISA=") + env +
                    (forced < 0 ? " is not a known CPU path" : " is not supported by this CPU") +
                    "; supported here: " + supported_list() + " (known: scalar, avx2, avx512, avx512_bf16)";
      chosen = -2;
    } else {
      chosen = forced;
    }
  }
  int expected = -1;
  g_isa.compare_exchange_strong(expected, chosen);  // a set_isa() that ran first wins
}

int current_isa() {
  std::call_once(g_init, init_from_env);
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) throw std::runtime_error(g_env_error);
  return isa;
}

}  // namespace

void attention_forward(const AttentionParams& params) { kIsaFns[current_isa()](params); }

std::string_view active_isa() { return kIsaNames[current_isa()]; }

bool isa_supported(std::string_view isa) {
  const int i = find_isa(isa);
  return i >= 0 && cpu_has(i);
}

bool set_isa(std::string_view isa) {
  const int i = find_isa(isa);
  if (i < 0 || !cpu_has(i)) return false;
  std::call_once(g_init, init_from_env);
  g_isa.store(i, std::memory_order_relaxed);
  return true;
}

}  // namespace attnsel::cpu
