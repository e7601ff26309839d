// Shared helpers for the sm_90a kernels: wgmma fences, shared-memory descriptors, 128-byte-swizzled tiles.
#pragma once

#include "flash_fwd_sm80.cuh"
#include "wgmma_ops_sm90a.cuh"

namespace attnsel::cuda::detail::sm90c {

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Generic-proxy smem writes (cp.async, st.shared) must be fenced before the async proxy (wgmma) reads them.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the async wgmma window.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// row_bytes: the swizzle span, 128 / 64 / 32 bytes (layout types 1 / 2 / 3).
__device__ __forceinline__ std::uint64_t make_desc(std::uint32_t saddr, std::uint32_t lbo, std::uint32_t sbo,
                                                   int row_bytes = 128) {
  const std::uint64_t layout = row_bytes == 128 ? 1 : row_bytes == 64 ? 2 : 3;
  return static_cast<std::uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>(lbo >> 4) << 16) |
         (static_cast<std::uint64_t>(sbo >> 4) << 32) | (layout << 62);
}

// Byte offset of (row, col) in a [cols/64][ROWS][64] swizzled tile; col a multiple of 8.
template <int ROWS>
__device__ __forceinline__ std::uint32_t sw128(int row, int col) {
  return (col >> 6) * (ROWS * 128) + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) + (col & 7) * 2;
}

struct OffSw128 {
  template <int ROWS, int COLS>
  static __device__ __forceinline__ std::uint32_t at(int r, int col) { return sw128<ROWS>(r, col); }
};

template <int ROWS, int COLS, int NT, typename T>
__device__ __forceinline__ void load_tile_sw128(std::uint32_t s, const T* g, std::int64_t stride, int row0,
                                                int n_rows, int tid) {
  load_rows<ROWS, COLS, NT, OffSw128>(s, g, stride, row0, n_rows, COLS, tid);
}

}  // namespace attnsel::cuda::detail::sm90c

namespace attnsel::cuda::detail {
// Stream-ordered scratch memory from a pool that keeps it (flash_fwd_d512_sm90a.cu); free with cudaFreeAsync.
cudaError_t workspace_alloc(void** ptr, std::size_t bytes, cudaStream_t stream);

// A cudaLaunchKernelEx configuration with one launch attribute (a programmatic dependent launch, a cluster shape).
// cfg points into the object, so it is neither copied nor moved.
struct LaunchWith {
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg{};
  LaunchWith(const cudaLaunchAttribute& attribute, dim3 grid, int threads, std::size_t smem, cudaStream_t stream)
      : attr(attribute) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  LaunchWith(const LaunchWith&) = delete;
  LaunchWith& operator=(const LaunchWith&) = delete;
};
}  // namespace attnsel::cuda::detail

// ---- mbarrier / bulk tensor copy (TMA) / register reallocation ----------------------
namespace attnsel::cuda::detail::sm90c {

__device__ __forceinline__ void mbar_init(std::uint32_t bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the initialised barriers visible to the copy engine before any thread uses them.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase with this parity has completed (a fresh barrier counts parity 1 as completed).
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// One box of a 4-D tensor map into shared memory; completion is counted in bytes on `bar`.
__device__ __forceinline__ void tma_load_4d(std::uint32_t dst, const void* tmap, std::uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// One box from shared memory to a 4-D tensor map (rows and columns past the tensor's end are not written), in the
// thread's current bulk group; the source must have been fenced for the async proxy (fence_async_smem).
__device__ __forceinline__ void tma_store_4d(const void* tmap, std::uint32_t src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
                   reinterpret_cast<std::uint64_t>(tmap)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk groups have read their shared-memory sources (the buffer may be rewritten).
__device__ __forceinline__ void bulk_wait_read0() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Waits until this thread's bulk groups have completed (their writes are done).
__device__ __forceinline__ void bulk_wait0() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void tma_prefetch_desc(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(tmap)) : "memory");
}
template <int N>
__device__ __forceinline__ void regs_dealloc() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void regs_alloc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

}  // namespace attnsel::cuda::detail::sm90c
