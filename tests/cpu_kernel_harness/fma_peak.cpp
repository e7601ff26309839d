// fp32 FMA throughput ceiling of this CPU (AVX2): the number the attention kernel's GFLOP/s is measured against.
//
//   g++ -O2 -mavx2 -mfma fma_peak.cpp -o build/fma_peak -pthread && build/fma_peak [threads=all]
//
// Each thread runs 12 independent chains of vfmadd231ps on registers only (inline asm: no memory traffic), enough chains to
// cover FMA latency x pipes on current x86 cores. Prints GFLOP/s per thread and in total (2 flops per lane).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

static constexpr long kIters = 200000000;

static double run(long iters) {
  const auto t0 = std::chrono::steady_clock::now();
  // ymm0..11: accumulators, ymm12/13: operands. Written in asm so the compiler cannot spill the chains to memory.
  asm volatile(
      "vxorps %%ymm0, %%ymm0, %%ymm0\n"
      "vmovaps %%ymm0, %%ymm1\n vmovaps %%ymm0, %%ymm2\n vmovaps %%ymm0, %%ymm3\n vmovaps %%ymm0, %%ymm4\n"
      "vmovaps %%ymm0, %%ymm5\n vmovaps %%ymm0, %%ymm6\n vmovaps %%ymm0, %%ymm7\n vmovaps %%ymm0, %%ymm8\n"
      "vmovaps %%ymm0, %%ymm9\n vmovaps %%ymm0, %%ymm10\n vmovaps %%ymm0, %%ymm11\n"
      "vmovaps %%ymm0, %%ymm12\n vmovaps %%ymm0, %%ymm13\n"
      "1:\n"
      "vfmadd231ps %%ymm12, %%ymm13, %%ymm0\n vfmadd231ps %%ymm12, %%ymm13, %%ymm1\n"
      "vfmadd231ps %%ymm12, %%ymm13, %%ymm2\n vfmadd231ps %%ymm12, %%ymm13, %%ymm3\n"
      "vfmadd231ps %%ymm12, %%ymm13, %%ymm4\n vfmadd231ps %%ymm12, %%ymm13, %%ymm5\n"
      "vfmadd231ps %%ymm12, %%ymm13, %%ymm6\n vfmadd231ps %%ymm12, %%ymm13, %%ymm7\n"
      "vfmadd231ps %%ymm12, %%ymm13, %%ymm8\n vfmadd231ps %%ymm12, %%ymm13, %%ymm9\n"
      "vfmadd231ps %%ymm12, %%ymm13, %%ymm10\n vfmadd231ps %%ymm12, %%ymm13, %%ymm11\n"
      "dec %0\n jnz 1b\n vzeroupper\n"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "cc");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 12.0 * 8 * 2 * kIters / s * 1e-9;
}

int main(int argc, char** argv) {
  const int nt = argc > 1 ? std::atoi(argv[1]) : int(std::thread::hardware_concurrency());
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<double> g(nt);
    std::vector<std::thread> th;
    for (int t = 0; t < nt; ++t) th.emplace_back([&, t] { g[t] = run(kIters); });
    for (auto& x : th) x.join();
    double tot = 0;
    for (double x : g) tot += x;
    std::printf("threads %d: per thread", nt);
    for (double x : g) std::printf(" %.1f", x);
    std::printf(" GFLOP/s, total %.1f GFLOP/s\n", tot);
  }
  return 0;
}
