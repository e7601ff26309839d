// Standalone correctness harness for the CPU attention kernel (no torch needed).
// Seeded random sweep against a float64 reference, on every ISA path the machine supports; plus edge cases
// (seq 0/1, fully masked rows, NaN propagation) and a small timing mode.
//
//   ./build.sh && ./harness [cases=400] [seed=1]        sweep
//   ./harness bench B H Sq Sk D causal dtype(f32|bf16|f16) [reps]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <time.h>
#include <vector>

#include "../../csrc/kernels/cpu/attention_cpu.h"

using namespace attnsel::kernels;
using i64 = std::int64_t;

static std::uint16_t f2bf(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}
static float bf2f(std::uint16_t h) {
  std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static std::uint16_t f2h(float f) {
  _Float16 h = (_Float16)f;
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
static float h2f(std::uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return (float)h;
}

// A 4-d tensor stored as a raw byte buffer with element strides; values also kept as the exact float
// they represent in the stored dtype (for the reference).
struct T4 {
  ScalarType dt = ScalarType::F32;
  i64 shape[4] = {0, 0, 0, 0};
  i64 stride[4] = {0, 0, 0, 0};
  std::vector<unsigned char> buf;
  int esize() const { return dt == ScalarType::F32 ? 4 : 2; }
  i64 off(i64 a, i64 b, i64 c, i64 d) const { return a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3]; }
  float get(i64 a, i64 b, i64 c, i64 d) const {
    const i64 o = off(a, b, c, d);
    if (dt == ScalarType::F32) {
      float f;
      std::memcpy(&f, buf.data() + o * 4, 4);
      return f;
    }
    std::uint16_t h;
    std::memcpy(&h, buf.data() + o * 2, 2);
    return dt == ScalarType::BF16 ? bf2f(h) : h2f(h);
  }
  void set(i64 a, i64 b, i64 c, i64 d, float v) {
    const i64 o = off(a, b, c, d);
    if (dt == ScalarType::F32) {
      std::memcpy(buf.data() + o * 4, &v, 4);
    } else {
      std::uint16_t h = dt == ScalarType::BF16 ? f2bf(v) : f2h(v);
      std::memcpy(buf.data() + o * 2, &h, 2);
    }
  }
};

// layout: 0 = contiguous [B,H,S,D]; 1 = [B,S,H,D] permuted; 2 = contiguous with padded rows and dim stride 2;
// 3 = dim stride 1 but heads outermost ([H,B,S,D]).
static T4 make(ScalarType dt, i64 B, i64 H, i64 S, i64 D, int layout) {
  T4 t;
  t.dt = dt;
  t.shape[0] = B, t.shape[1] = H, t.shape[2] = S, t.shape[3] = D;
  i64 n;
  switch (layout) {
    case 1:
      t.stride[3] = 1, t.stride[1] = D, t.stride[2] = H * D, t.stride[0] = S * H * D;
      n = B * S * H * D;
      break;
    case 2:
      t.stride[3] = 2, t.stride[2] = 2 * D + 3, t.stride[1] = S * (2 * D + 3), t.stride[0] = H * S * (2 * D + 3);
      n = B * H * S * (2 * D + 3);
      break;
    case 3:
      t.stride[3] = 1, t.stride[2] = D, t.stride[0] = S * D, t.stride[1] = B * S * D;
      n = B * H * S * D;
      break;
    default:
      t.stride[3] = 1, t.stride[2] = D, t.stride[1] = S * D, t.stride[0] = H * S * D;
      n = B * H * S * D;
  }
  t.buf.assign(size_t(n + 1) * t.esize(), 0xFF);  // 0xFF bytes = NaN: untouched padding would poison results
  return t;
}

static void fill(T4& t, std::mt19937_64& rng, float amp) {
  std::normal_distribution<float> nd(0.f, amp);
  for (i64 a = 0; a < t.shape[0]; ++a)
    for (i64 b = 0; b < t.shape[1]; ++b)
      for (i64 c = 0; c < t.shape[2]; ++c)
        for (i64 d = 0; d < t.shape[3]; ++d) t.set(a, b, c, d, nd(rng));
}

static void thread_pool_for(i64 n, void* ctx, void (*fn)(void*, i64, i64)) {
  const int nt = 3;  // more chunks than cores on purpose: exercises chunk boundaries
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t) {
    const i64 b = n * t / nt, e = n * (t + 1) / nt;
    if (b < e) th.emplace_back([=] { fn(ctx, b, e); });
  }
  for (auto& x : th) x.join();
}

struct Case {
  ScalarType dt;
  i64 B, Hq, Hkv, Sq, Sk, D, Dv;
  bool causal;
  int mask;  // 0 none, 1 bool, 2 additive f32, 3 additive q-dtype
  int mask_bcast;  // bit0: batch broadcast, bit1: head broadcast, bit2: query broadcast
  int layout_q, layout_k, layout_v, layout_o;
  float scale;
};

struct Result {
  double max_err = 0, max_ref = 0;
  i64 n_bad = 0;
  bool nan_mismatch = false;
};

static std::string describe(const Case& c) {
  char s[256];
  const char* dn = c.dt == ScalarType::F32 ? "f32" : c.dt == ScalarType::BF16 ? "bf16" : "f16";
  std::snprintf(s, sizeof s, "%s B=%ld Hq=%ld Hkv=%ld Sq=%ld Sk=%ld D=%ld Dv=%ld causal=%d mask=%d bc=%d lay=%d%d%d%d scale=%g",
                dn, (long)c.B, (long)c.Hq, (long)c.Hkv, (long)c.Sq, (long)c.Sk, (long)c.D, (long)c.Dv, c.causal,
                c.mask, c.mask_bcast, c.layout_q, c.layout_k, c.layout_v, c.layout_o, c.scale);
  return s;
}

struct Problem {
  Case c;
  T4 q, k, v, out, mask;
  std::vector<std::uint8_t> bmask;
  i64 mstride[4] = {0, 0, 0, 0};
};

static Problem build(const Case& c, std::mt19937_64& rng) {
  Problem pr;
  pr.c = c;
  pr.q = make(c.dt, c.B, c.Hq, c.Sq, c.D, c.layout_q);
  pr.k = make(c.dt, c.B, c.Hkv, c.Sk, c.D, c.layout_k);
  pr.v = make(c.dt, c.B, c.Hkv, c.Sk, c.Dv, c.layout_v);
  pr.out = make(c.dt, c.B, c.Hq, c.Sq, c.Dv, c.layout_o);
  fill(pr.q, rng, 1.f);
  fill(pr.k, rng, 1.f);
  fill(pr.v, rng, 1.f);
  if (c.mask) {
    const i64 mb = (c.mask_bcast & 1) ? 1 : c.B, mh = (c.mask_bcast & 2) ? 1 : c.Hq, mq = (c.mask_bcast & 4) ? 1 : c.Sq;
    const i64 n = mb * mh * mq * c.Sk;
    pr.mstride[3] = 1;
    pr.mstride[2] = (c.mask_bcast & 4) ? 0 : c.Sk;
    pr.mstride[1] = (c.mask_bcast & 2) ? 0 : mq * c.Sk;
    pr.mstride[0] = (c.mask_bcast & 1) ? 0 : mh * mq * c.Sk;
    std::uniform_real_distribution<float> u(0.f, 1.f);
    if (c.mask == 1) {
      pr.bmask.resize(size_t(n) + 1);
      for (auto& x : pr.bmask) x = u(rng) < 0.7f;
      // Make some rows fully masked.
      if (mq > 2)
        for (i64 j = 0; j < c.Sk; ++j) pr.bmask[1 * c.Sk + j] = 0;
    } else {
      T4& m = pr.mask;
      m.dt = c.mask == 2 ? ScalarType::F32 : c.dt;
      m.buf.resize(size_t(n + 1) * m.esize());
      m.stride[0] = 0, m.stride[1] = 0, m.stride[2] = 0, m.stride[3] = 1;
      for (i64 i = 0; i < n; ++i) {
        const float r = u(rng);
        m.set(0, 0, 0, i, r < 0.2f ? -INFINITY : (r - 0.5f) * 4.f);
      }
      if (mq > 2)
        for (i64 j = 0; j < c.Sk; ++j) m.set(0, 0, 0, c.Sk + j, -INFINITY);
    }
  }
  return pr;
}

static float mask_at(const Problem& pr, i64 b, i64 h, i64 i, i64 j, bool* attend) {
  const i64 o = b * pr.mstride[0] + h * pr.mstride[1] + i * pr.mstride[2] + j * pr.mstride[3];
  *attend = true;
  if (pr.c.mask == 1) {
    *attend = pr.bmask[o] != 0;
    return 0.f;
  }
  return pr.mask.get(0, 0, 0, o);
}

static AttentionParams params_of(Problem& pr, bool parallel) {
  AttentionParams p;
  const Case& c = pr.c;
  p.q = pr.q.buf.data(), p.k = pr.k.buf.data(), p.v = pr.v.buf.data(), p.out = pr.out.buf.data();
  p.dtype = c.dt;
  p.batch = c.B, p.heads_q = c.Hq, p.heads_kv = c.Hkv, p.seq_q = c.Sq, p.seq_kv = c.Sk, p.head_dim = c.D,
  p.head_dim_v = c.Dv;
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = pr.q.stride[i], p.k_stride[i] = pr.k.stride[i], p.v_stride[i] = pr.v.stride[i];
    p.out_stride[i] = pr.out.stride[i];
    p.mask_stride[i] = pr.mstride[i];
  }
  if (c.mask == 1) {
    p.mask_kind = MaskKind::Bool;
    p.mask = pr.bmask.data();
  } else if (c.mask >= 2) {
    p.mask_kind = MaskKind::Additive;
    p.mask = pr.mask.buf.data();
    p.mask_dtype = pr.mask.dt;
  }
  p.causal = c.causal;
  p.scale = c.scale;
  p.parallel_for = parallel ? thread_pool_for : nullptr;
  return p;
}

// float64 reference; fully masked rows are zeros.
static Result check(const Problem& pr) {
  const Case& c = pr.c;
  Result res;
  std::vector<double> s(size_t(c.Sk)), acc(size_t(c.Dv));
  const i64 g = c.Hq / c.Hkv;
  for (i64 b = 0; b < c.B; ++b)
    for (i64 h = 0; h < c.Hq; ++h)
      for (i64 i = 0; i < c.Sq; ++i) {
        double m = -INFINITY;
        for (i64 j = 0; j < c.Sk; ++j) {
          bool att = true;
          double x = 0;
          if (c.causal && j > i) att = false;
          if (att) {
            for (i64 d = 0; d < c.D; ++d) x += double(pr.q.get(b, h, i, d)) * pr.k.get(b, h / g, j, d);
            x *= c.scale;
            if (c.mask) {
              bool a2;
              const float mv = mask_at(pr, b, h, i, j, &a2);
              if (!a2) x = -INFINITY;
              else x += mv;
            }
          } else {
            x = -INFINITY;
          }
          s[j] = x;
          if (x > m) m = x;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        double l = 0;
        if (m != -INFINITY) {
          for (i64 j = 0; j < c.Sk; ++j) {
            if (s[j] == -INFINITY) continue;
            const double p = std::exp(s[j] - m);
            l += p;
            for (i64 d = 0; d < c.Dv; ++d) acc[d] += p * pr.v.get(b, h / g, j, d);
          }
        }
        for (i64 d = 0; d < c.Dv; ++d) {
          const double ref = l > 0 ? acc[d] / l : 0.0;
          const double got = pr.out.get(b, h, i, d);
          if (std::isnan(got)) {
            res.nan_mismatch = true;
            res.n_bad++;
            continue;
          }
          const double e = std::fabs(got - ref);
          if (e > res.max_err) res.max_err = e;
          if (std::fabs(ref) > res.max_ref) res.max_ref = std::fabs(ref);
        }
      }
  return res;
}

static double tol_of(ScalarType dt, i64 Sk) {
  // fp32: accumulation over Sk keys; 16-bit: rounding of the output (values are O(1)).
  if (dt == ScalarType::F32) return 2e-6 * std::sqrt(double(Sk) + 1) + 1e-6;
  if (dt == ScalarType::BF16) return 1.6e-2;
  return 2e-3;
}

namespace attnsel::cpu::detail {
void forward_emu16(const AttentionParams& p);  // emu_isa.cpp: the template with the AVX-512 geometry, portable
}

// "emu16" is not a real path: it runs the shared template with 16 portable lanes and AVX-512's block sizes.
static const char* kIsas[] = {"scalar", "avx2", "avx512", "avx512_bf16", "emu16"};
static bool isa_runs(const char* isa) { return std::string(isa) == "emu16" || attnsel::cpu::isa_supported(isa); }
static void select_isa(const char* isa) {
  if (std::string(isa) != "emu16") attnsel::cpu::set_isa(isa);
}
static void forward(const char* isa, const AttentionParams& p) {
  if (std::string(isa) == "emu16") attnsel::cpu::detail::forward_emu16(p);
  else attnsel::cpu::attention_forward(p);
}

static int run_sweep(int ncases, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const i64 dims[] = {1, 3, 7, 8, 16, 17, 31, 32, 48, 64, 72, 80, 96, 100, 128, 160, 256, 320, 512};
  int fails = 0, total = 0;
  for (int ci = 0; ci < ncases; ++ci) {
    Case c;
    const int dt = int(rng() % 3);
    c.dt = dt == 0 ? ScalarType::F32 : dt == 1 ? ScalarType::BF16 : ScalarType::F16;
    c.B = 1 + i64(rng() % 2);
    c.Hkv = 1 + i64(rng() % 2);
    c.Hq = c.Hkv * (1 + i64(rng() % 3));
    auto len = [&]() -> i64 {
      switch (rng() % 6) {
        case 0: return i64(rng() % 3);  // 0, 1, 2
        case 1: return 1 + i64(rng() % 20);
        case 2: return 90 + i64(rng() % 12);  // around BK
        case 3: return 60 + i64(rng() % 10);  // around BQ
        default: return 1 + i64(rng() % 300);
      }
    };
    c.Sq = len();
    c.Sk = len();
    c.D = dims[rng() % (sizeof dims / sizeof dims[0])];
    c.Dv = (rng() % 4 == 0) ? dims[rng() % (sizeof dims / sizeof dims[0])] : c.D;
    if (c.D * c.Sq * c.Sk * c.Hq * c.B > 6'000'000) c.Sk = 1 + c.Sk / 4;  // keep the double reference quick
    c.causal = rng() % 3 == 0;
    c.mask = int(rng() % 5);
    if (c.mask == 4) c.mask = 0;
    c.mask_bcast = int(rng() % 8);
    c.layout_q = int(rng() % 4), c.layout_k = int(rng() % 4), c.layout_v = int(rng() % 4), c.layout_o = int(rng() % 4);
    c.scale = (rng() % 2) ? 1.f / std::sqrt(float(c.D)) : 0.05f + float(rng() % 100) / 100.f;
    for (const char* isa : kIsas) {
      if (!isa_runs(isa)) continue;
      select_isa(isa);
      std::mt19937_64 r2(seed * 1000003 + ci);
      Problem pr = build(c, r2);
      AttentionParams p = params_of(pr, ci % 2 == 0);
      forward(isa, p);
      Result r = check(pr);
      // Score rounding grows with |scale * q.k| ~ scale*sqrt(D) for unit normal inputs.
      const double cond = std::max(1.0, double(c.scale) * std::sqrt(double(c.D)));
      const double tol = tol_of(c.dt, c.Sk) * (r.max_ref > 1 ? r.max_ref : 1) * (c.dt == ScalarType::F32 ? cond : 1.0);
      ++total;
      if (r.n_bad || r.max_err > tol) {
        ++fails;
        std::printf("FAIL [%s] case %d: %s  err=%.3g tol=%.3g nan=%ld\n", isa, ci, describe(c).c_str(), r.max_err, tol,
                    (long)r.n_bad);
      }
    }
  }
  std::printf("sweep: %d/%d runs passed\n", total - fails, total);
  return fails;
}

// Edge cases that the random sweep may miss: NaN propagation and explicit fully masked rows.
static int run_edges() {
  int fails = 0;
  for (const char* isa : kIsas) {
    if (!isa_runs(isa)) continue;
    select_isa(isa);
    for (int dt = 0; dt < 3; ++dt) {
      const ScalarType st = dt == 0 ? ScalarType::F32 : dt == 1 ? ScalarType::BF16 : ScalarType::F16;
      for (int causal = 0; causal < 2; ++causal) {
        // Two query heads sharing one kv head (GQA), so a NaN in k/v reaches both.
        Case c{st, 1, 2, 1, 40, 130, 64, 64, bool(causal), 0, 0, 0, 0, 0, 0, 0.125f};
        std::mt19937_64 rng(7);
        // NaN in q row 5 -> row 5 NaN only.
        {
          Problem pr = build(c, rng);
          pr.q.set(0, 1, 5, 3, NAN);  // query head 1 only
          AttentionParams p = params_of(pr, true);
          forward(isa, p);
          for (i64 i = 0; i < c.Sq; ++i) {
            const bool isn = std::isnan(pr.out.get(0, 1, i, 0));
            const bool ok = isn == (i == 5) && !std::isnan(pr.out.get(0, 0, i, 0));
            if (!ok) {
              std::printf("FAIL [%s] NaN-q dt=%d causal=%d row %ld nan=%d\n", isa, dt, causal, (long)i, isn);
              ++fails;
              break;
            }
          }
        }
        // NaN in k key 10 -> every row that sees key 10 is NaN (causal: rows >= 10).
        {
          Problem pr = build(c, rng);
          pr.k.set(0, 0, 10, 7, NAN);
          AttentionParams p = params_of(pr, true);
          forward(isa, p);
          for (i64 i = 0; i < c.Sq; ++i) {
            const bool want = !causal || i >= 10;
            if (std::isnan(pr.out.get(0, 0, i, 5)) != want || std::isnan(pr.out.get(0, 1, i, 5)) != want) {
              std::printf("FAIL [%s] NaN-k dt=%d causal=%d row %ld\n", isa, dt, causal, (long)i);
              ++fails;
              break;
            }
          }
        }
        // NaN in v key 3, dim 9 -> column 9 NaN in rows seeing key 3, other columns finite. Rows that do not
        // see key 3 may get NaN too (0 * NaN in the P·V tile, as in PyTorch's math path), so they are not checked.
        {
          Problem pr = build(c, rng);
          pr.v.set(0, 0, 3, 9, NAN);
          AttentionParams p = params_of(pr, true);
          forward(isa, p);
          for (i64 i = 0; i < c.Sq; ++i) {
            const bool want = !causal || i >= 3;
            if ((want && !std::isnan(pr.out.get(0, 1, i, 9))) || std::isnan(pr.out.get(0, 1, i, 8))) {
              std::printf("FAIL [%s] NaN-v dt=%d causal=%d row %ld\n", isa, dt, causal, (long)i);
              ++fails;
              break;
            }
          }
        }
        // All-false bool mask: zeros everywhere, no NaN.
        {
          Case c2 = c;
          c2.mask = 1;
          Problem pr = build(c2, rng);
          std::fill(pr.bmask.begin(), pr.bmask.end(), 0);
          AttentionParams p = params_of(pr, false);
          forward(isa, p);
          bool ok = true;
          for (i64 h = 0; h < 2; ++h)
            for (i64 i = 0; i < c.Sq; ++i)
              for (i64 d = 0; d < c.Dv; ++d) ok &= pr.out.get(0, h, i, d) == 0.f;
          if (!ok) {
            std::printf("FAIL [%s] all-masked dt=%d causal=%d\n", isa, dt, causal);
            ++fails;
          }
        }
      }
    }
  }
  std::printf("edges: %s\n", fails ? "FAILED" : "ok");
  return fails;
}

static int run_bench(int argc, char** argv) {
  Case c{};
  c.B = std::atoi(argv[2]);
  c.Hq = c.Hkv = std::atoi(argv[3]);
  c.Sq = std::atoi(argv[4]);
  c.Sk = std::atoi(argv[5]);
  c.D = c.Dv = std::atoi(argv[6]);
  c.causal = std::atoi(argv[7]);
  const std::string dn = argv[8];
  c.dt = dn == "bf16" ? ScalarType::BF16 : dn == "f16" ? ScalarType::F16 : ScalarType::F32;
  c.scale = 1.f / std::sqrt(float(c.D));
  const int reps = argc > 9 ? std::atoi(argv[9]) : 10;
  std::mt19937_64 rng(1);
  Problem pr = build(c, rng);
  AttentionParams p = params_of(pr, true);
  p.parallel_for = [](i64 n, void* ctx, void (*fn)(void*, i64, i64)) {
    std::thread t([=] { fn(ctx, 0, n / 2); });
    fn(ctx, n / 2, n);
    t.join();
  };
  const bool serial = std::getenv("SERIAL") != nullptr;  // one core: less exposed to other load on the machine
  if (serial) p.parallel_for = nullptr;
  attnsel::cpu::attention_forward(p);
  // A/B mode (tuning): ABVAR=name ABVALS="x y" alternates the env var between runs, one timing list per value.
  std::vector<std::string> vals;
  const char* abvar = std::getenv("ABVAR");
  if (abvar) {
    std::string all = std::getenv("ABVALS"), cur;
    for (char ch : all + " ") {
      if (ch == ' ') { if (!cur.empty()) vals.push_back(cur); cur.clear(); } else cur += ch;
    }
  }
  if (vals.empty()) vals.push_back("");
  std::vector<std::vector<double>> tss(vals.size());
  for (int r = 0; r < reps; ++r) {
    for (size_t vi = 0; vi < vals.size(); ++vi) {
      if (abvar) setenv(abvar, vals[vi].c_str(), 1);
      // SERIAL: thread CPU time, which does not count time the thread was descheduled (a busy shared machine).
      timespec c0, c1;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
      auto t0 = std::chrono::steady_clock::now();
      attnsel::cpu::attention_forward(p);
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      tss[vi].push_back(serial ? (c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec) : wall);
    }
  }
  for (size_t vi = 0; vi + 1 < vals.size(); ++vi) {
    auto ts = tss[vi];
    std::sort(ts.begin(), ts.end());
    const double fl = 4.0 * c.B * c.Hq * c.Sq * c.Sk * c.D * (c.causal ? 0.5 : 1.0);
    std::printf("  %s=%s: median %.1f GFLOP/s best %.1f\n", abvar, vals[vi].c_str(), fl / ts[ts.size() / 2] * 1e-9,
                fl / ts[0] * 1e-9);
  }
  std::vector<double> ts = tss.back();
  if (abvar) std::printf("  %s=%s:", abvar, vals.back().c_str());
  std::sort(ts.begin(), ts.end());
  const double t = ts[ts.size() / 2], tmin = ts[0];
  const double fl = 4.0 * c.B * c.Hq * c.Sq * c.Sk * c.D * (c.causal ? 0.5 : 1.0);
  std::printf("[%s] %s B=%ld H=%ld Sq=%ld Sk=%ld D=%ld causal=%d: median %.3f ms  %.1f GFLOP/s (best %.1f)\n",
              std::string(attnsel::cpu::active_isa()).c_str(), dn.c_str(), (long)c.B, (long)c.Hq, (long)c.Sq,
              (long)c.Sk, (long)c.D, c.causal, t * 1e3, fl / t * 1e-9, fl / tmin * 1e-9);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "bench") return run_bench(argc, argv);
  const int n = argc > 1 ? std::atoi(argv[1]) : 400;
  const std::uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  std::printf("active ISA by default: %s\n", std::string(attnsel::cpu::active_isa()).c_str());
  int f = run_edges();
  f += run_sweep(n, seed);
  return f ? 1 : 0;
}
