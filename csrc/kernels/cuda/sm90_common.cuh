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

__device__ __forceinline__ std::uint64_t make_desc(std::uint32_t saddr, std::uint32_t lbo, std::uint32_t sbo) {
  return static_cast<std::uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>(lbo >> 4) << 16) |
         (static_cast<std::uint64_t>(sbo >> 4) << 32) | (1ull << 62);  // 128-byte swizzle
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
  load_rows<ROWS, COLS, NT, OffSw128>(s, g, stride, row0, n_rows, tid);
}

}  // namespace attnsel::cuda::detail::sm90c
