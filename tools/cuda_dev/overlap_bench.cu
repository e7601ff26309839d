// Can one warpgroup's wgmma run under another warpgroup's exp2 work (tensor pipe vs MUFU)? docs/cuda-kernels.md, "D=64:
// two or three consumers". Build and run on an sm_90a GPU from the repository root:
//   nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc -o /tmp/overlap \
//     tools/cuda_dev/overlap_bench.cu && /tmp/overlap
// Prints cycles per loop iteration of each warpgroup (132 CTAs of 2 warpgroups; shared memory holds garbage).
#include <cstdio>
#include "kernels/cuda/sm90_common.cuh"
using namespace attnsel::cuda::sm90;
using namespace attnsel::cuda::detail::sm90c;
// MODE bits per warpgroup: 1 = wgmma loop, 2 = exp loop, 3 = wgmma then exp of its result (serial, like a softmax)
template <int W0, int W1>
__global__ void __launch_bounds__(256, 1) k(float* out, int iters, long long* cyc) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const std::uint32_t base = (static_cast<std::uint32_t>(__cvta_generic_to_shared(smem)) + 1023) & ~1023u;
  const int wg = threadIdx.x / 128;
  const int mode = wg == 0 ? W0 : W1;
  float s[64], e[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) { s[i] = 0.f; e[i] = -0.01f * (i + threadIdx.x % 7); }
  const std::uint64_t dq = make_desc(base, 16, 8 * 128, 128), dk = make_desc(base + 16384, 16, 8 * 128, 128);
  __syncthreads();
  long long t0 = clock64();
  if (mode != 0) {
    for (int it = 0; it < iters; ++it) {
      if (mode & 1) {
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k16_bf16_t0(s, dq + (kk << 1), dk + (kk << 1), 1);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k16_bf16_t0(s, dq + (kk << 1), dk + 1024 + (kk << 1), 1);
        wg_commit();
        wg_wait0();
        fence_regs(s);
      }
      if (mode & 2) {
#pragma unroll
        for (int i = 0; i < 64; ++i) {
          const float x = (mode & 1) ? s[i] * 1e-30f : e[i];
          e[i] = exp2f(fmaf(x, 0.9f, -1.0f)) - 0.5f;
        }
      }
    }
  }
  long long t1 = clock64();
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc += s[i] + e[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
  if (threadIdx.x % 128 == 0) cyc[blockIdx.x * 2 + wg] = t1 - t0;
}
template <int W0, int W1>
void run(const char* name, float* o, long long* c, int iters) {
  auto kern = k<W0, W1>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  float ms = 0;
  for (int r = 0; r < 3; ++r) {
    cudaEventRecord(a);
    kern<<<132, 256, 64 * 1024>>>(o, iters, c);
    cudaEventRecord(b); cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
  }
  long long h[264]; cudaMemcpy(h, c, sizeof(h), cudaMemcpyDeviceToHost);
  printf("%-34s %8.3f ms  cycles/iter wg0 %7.1f wg1 %7.1f  %s\n", name, ms, double(h[0]) / iters, double(h[1]) / iters,
         cudaGetErrorString(cudaGetLastError()));
}
int main() {
  float* o; long long* c; cudaMalloc(&o, 132 * 256 * 4); cudaMalloc(&c, 264 * 8);
  const int it = 20000;
  run<1, 0>("wg0 wgmma", o, c, it);
  run<0, 2>("wg1 exp", o, c, it);
  run<1, 2>("wg0 wgmma + wg1 exp", o, c, it);
  run<1, 1>("both wgmma", o, c, it);
  run<2, 2>("both exp", o, c, it);
  run<3, 0>("wg0 wgmma->exp", o, c, it);
  run<3, 3>("both wgmma->exp (free running)", o, c, it);
}
