// Flash-attention forward for sm_80+: mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate), ldmatrix,
// cp.async double overlap (V(j) streams in during Q·K(j)^T, K(j+1) during softmax and P·V(j)).
// Torch-free; included by the per-head-dim .cu files, which instantiate the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace attnsel::cuda::detail {

// Device-side arguments: strides in elements (the last dim is contiguous, checked by refusal()).
struct FwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  std::int64_t q_sb, q_sh, q_ss;
  std::int64_t k_sb, k_sh, k_ss;
  std::int64_t v_sb, v_sh, v_ss;
  std::int64_t o_sb, o_sh, o_ss;
  int group;  // heads_q / heads_kv
  int seq_q, seq_kv;
  int head_dim;      // the real head size; kernels are built for the next size up (64/128/256) and zero-pad
  int kv_cols;       // Hopper kernels: columns of K/V rows (head_dim, or the padded size when K/V were repacked)
  float scale_log2;  // log2(e) x the factor on a score: scale without a mask, 1 with one (scores pre-scaled)
  float scale;       // q·k multiplier, applied before the mask is added (masked kernels only)
  float* lse;        // [B, Hq, Sq] natural-log log-sum-exp, contiguous; null = not wanted
  // Mask (masked kernels only), [B, Hq, Sq, Sk] by element strides (0 = broadcast); mask_sq == 0 means one row of
  // keys per (batch, head): the key-padding fast path loads one value per key column.
  const void* mask;
  std::int64_t mask_sb, mask_sh, mask_sq, mask_sk;
  bool mask_f32;  // additive masks: float32 (else q's dtype)
  // Hopper kernels built to store O through the copy engine (flash_fwd_wg_sm90a.cuh, TMA_O) store it from
  // registers instead: no tensor map could be made for O, or variant 25 asked.
  bool o_from_registers;
};

// Mask modes, a template parameter of every kernel so the unmasked path is unchanged.
enum : int { kNoMask = 0, kBoolMask = 1, kAddMask = 2 };

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// One (batch, head)'s view of the mask. at(row, col) is the value added to the pre-scaled score:
// bool masks give 0 (attend) or -inf; additive masks their value. row and col must lie inside the sequences.
template <typename T, int MM>
struct MaskView {
  const char* base = nullptr;
  std::int64_t sq = 0, sk = 0;
  bool f32 = false;
  __device__ __forceinline__ MaskView(const FwdArgs& a, int b, int h) {
    if (MM == kNoMask) return;
    const int esize = MM == kBoolMask ? 1 : (a.mask_f32 ? 4 : 2);
    base = static_cast<const char*>(a.mask) + (b * a.mask_sb + h * a.mask_sh) * esize;
    sq = a.mask_sq;
    sk = a.mask_sk;
    f32 = a.mask_f32;
  }
  __device__ __forceinline__ bool key_padding() const { return sq == 0; }
  // Bool masks: the bytes of one query row (index them with col * sk).
  __device__ __forceinline__ const unsigned char* row_bytes(int row) const {
    return reinterpret_cast<const unsigned char*>(base) + row * sq;
  }
  // Bool masks: whether key col is attended by query row.
  __device__ __forceinline__ bool keep(int row, int col) const {
    return __ldg(reinterpret_cast<const unsigned char*>(base) + (row * sq + col * sk)) != 0;
  }
  __device__ __forceinline__ float at(int row, int col) const {
    const std::int64_t i = row * sq + col * sk;
    if (MM == kBoolMask) return __ldg(reinterpret_cast<const unsigned char*>(base) + i) ? 0.f : -INFINITY;
    if (f32) return __ldg(reinterpret_cast<const float*>(base) + i);
    const unsigned short raw = __ldg(reinterpret_cast<const unsigned short*>(base) + i);
    return to_float(*reinterpret_cast<const T*>(&raw));
  }
  // Score of key col for query row after causal / sequence-end / mask: raw s scaled and masked (-inf = no key).
  template <bool CAUSAL>
  __device__ __forceinline__ float apply(float s, float scale, int row, int col, int seq_q, int seq_kv) const {
    if (col >= seq_kv || (CAUSAL && col > row)) return -INFINITY;
    return fmaf(s, scale, at(min(row, seq_q - 1), col));
  }
};

// Natural-log LSE of a finished row from its running max (in the kernel's score units) and sum.
__device__ __forceinline__ float row_lse(float m, float l, float scale_log2) {
  return l > 0.f ? (m * scale_log2 + __log2f(l)) * 0.69314718055994531f : -INFINITY;
}

// The four [S, D] matrices one (batch, head) block works on; K/V heads are shared by `group` query heads.
template <typename T>
struct HeadPtrs {
  const T *q, *k, *v;
  T* o;
  __device__ __forceinline__ HeadPtrs(const FwdArgs& a, int b, int h) {
    const int hk = h / a.group;
    q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
    k = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
    v = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
    o = static_cast<T*>(a.o) + b * a.o_sb + h * a.o_sh;
  }
};

// ---- PTX wrappers ----------------------------------------------------------------------------------
__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; pred false zero-fills the destination (rows past the sequence end).
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(std::uint32_t addr, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(std::uint32_t addr, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct MmaOp;
template <>
struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ std::uint32_t pack(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<std::uint32_t*>(&h);
  }
};
template <>
struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ std::uint32_t pack(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<std::uint32_t*>(&h);
  }
};

// Shared tiles are [rows][COLS] with the 16-byte chunk index XOR-swizzled by (row % 8), so the 8 rows
// an ldmatrix reads (and the rows cp.async writes) fall in distinct banks. col must be a multiple of 8.
template <int COLS>
__device__ __forceinline__ int swz(int row, int col) {
  static_assert(COLS % 64 == 0, "swizzle needs >= 8 chunks per row");
  return row * COLS + ((((col >> 3) ^ (row & 7))) << 3);
}

// Async-load rows [row0, row0 + ROWS) of a [n_rows, COLS] global matrix (row stride `stride`) into a shared
// tile whose byte offset of (row, col) is Off(row, col). Each thread keeps one 16-byte column chunk and walks
// rows, so the per-chunk address math is one add (keeps registers free in the hot loop).
// Columns at or past n_cols (the real head size, a multiple of 8) are zero-filled.
template <int ROWS, int COLS, int NT, typename Off, typename T>
__device__ __forceinline__ void load_rows(std::uint32_t s, const T* g, std::int64_t stride, int row0, int n_rows,
                                          int n_cols, int tid) {
  constexpr int CPR = COLS / 8;
  static_assert(NT % CPR == 0, "a thread must keep one column chunk");
  constexpr int RS = NT / CPR;
  const int c = tid % CPR, r0 = tid / CPR;
  const bool col_ok = c * 8 < n_cols;
  const T* src = g + (col_ok ? c * 8 : 0);
#pragma unroll
  for (int it = 0; it < (ROWS + RS - 1) / RS; ++it) {
    const int r = r0 + it * RS;
    if (ROWS % RS != 0 && r >= ROWS) break;  // last pass of a tile that does not split evenly
    const int gr = row0 + r;
    const bool p = col_ok && gr < n_rows;
    cp_async16(s + Off::template at<ROWS, COLS>(r, c * 8), src + static_cast<std::int64_t>(p ? gr : 0) * stride, p);
  }
}

struct OffSwz {  // matches swz<COLS>
  template <int ROWS, int COLS>
  static __device__ __forceinline__ std::uint32_t at(int r, int col) {
    return static_cast<std::uint32_t>(swz<COLS>(r, col)) * 2u;
  }
};

template <int ROWS, int COLS, int NT, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, std::int64_t stride, int row0, int n_rows, int n_cols,
                                          int tid) {
  load_rows<ROWS, COLS, NT, OffSwz>(smem_u32(s), g, stride, row0, n_rows, n_cols, tid);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Number of key tiles block m0..m0+BR-1 must visit (causal: top-left aligned, key j <= query i).
template <int BR, int BC, bool CAUSAL>
__device__ __forceinline__ int key_tiles(int m0, int seq_kv) {
  int n = (seq_kv + BC - 1) / BC;
  if (CAUSAL) n = min(n, (m0 + BR - 1) / BC + 1);
  return n;
}

// =====================================================================================================
// Kernel A (head sizes up to 256, built for D = 64/128/256 and zero-padded up to it): each warp owns MT m16
// row tiles of the BR-row query block and the full head_dim of O in registers; P stays in registers
// (accumulator layout == A-operand layout).
// =====================================================================================================
template <typename T, int D, int BR, int BC, int NW, bool CAUSAL>
struct KernelA {
  static constexpr int NT = NW * 32;
  static constexpr int MT = BR / (16 * NW);
  static constexpr int NTS = BC / 8;  // n8 tiles of S
  static constexpr int NTO = D / 8;   // n8 tiles of O
  static constexpr int SMEM = (BR * D + 2 * BC * D) * 2;
  static_assert(MT >= 1 && MT * 16 * NW == BR, "BR must be a multiple of 16 * warps");
  static_assert(BC % 16 == 0 && D % 64 == 0, "tile shape");
};

template <typename T, int D, int BR, int BC, int NW, bool CAUSAL, int MM>
__global__ void __launch_bounds__(NW * 32) flash_fwd_a(const FwdArgs a) {
  using K = KernelA<T, D, BR, BC, NW, CAUSAL>;
  constexpr int NT = K::NT, MT = K::MT, NTS = K::NTS, NTO = K::NTO;
  using Op = MmaOp<T>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BR * D;
  T* sV = sK + BC * D;

  // Heaviest causal blocks first: they finish last otherwise.
  const int m_block = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const HeadPtrs<T> hp(a, b, h);
  const T *q = hp.q, *k = hp.k, *v = hp.v;
  T* o = hp.o;

  const int m0 = m_block * BR;
  const int n_tiles = key_tiles<BR, BC, CAUSAL>(m0, a.seq_kv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wrow = warp * MT * 16;

  const MaskView<T, MM> mask(a, b, h);
  load_tile<BR, D, NT>(sQ, q, a.q_ss, m0, a.seq_q, a.head_dim, tid);
  load_tile<BC, D, NT>(sK, k, a.k_ss, 0, a.seq_kv, a.head_dim, tid);
  cp_async_commit();

  float acc[MT][NTO][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTO; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  float m_i[MT][2], l_i[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) m_i[i][r] = -INFINITY, l_i[i][r] = 0.f;

  const float sl2 = a.scale_log2;

  for (int jt = 0; jt < n_tiles; ++jt) {
    const int n0 = jt * BC;
    cp_async_wait<0>();
    __syncthreads();  // K(jt) landed; every warp is done with V(jt-1)
    load_tile<BC, D, NT>(sV, v, a.v_ss, n0, a.seq_kv, a.head_dim, tid);
    cp_async_commit();

    float s[MT][NTS][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NTS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][j][e] = 0.f;

#pragma unroll 4
    for (int kk = 0; kk < D / 16; ++kk) {
      std::uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm_x4(smem_u32(sQ + swz<D>(wrow + mt * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)), qa[mt]);
#pragma unroll
      for (int n2 = 0; n2 < NTS / 2; ++n2) {
        std::uint32_t kb[4];
        ldsm_x4(smem_u32(sK + swz<D>(n2 * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 16 + ((lane >> 3) & 1) * 8)),
                kb);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Op::run(s[mt][2 * n2], qa[mt], kb[0], kb[1]);
          Op::run(s[mt][2 * n2 + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }

    if (MM != kNoMask) {  // every tile: scale, add the mask, cut at the sequence end / causal diagonal
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + wrow + mt * 16 + g + (e >> 1) * 8;
            const int col = n0 + nt * 8 + t * 2 + (e & 1);
            s[mt][nt][e] = mask.template apply<CAUSAL>(s[mt][nt][e], a.scale, row, col, a.seq_q, a.seq_kv);
          }
    } else if (n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0 + wrow)) {
      // Unmasked: only the tiles that cross the sequence end or the causal diagonal.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + wrow + mt * 16 + g + (e >> 1) * 8;
            const int col = n0 + nt * 8 + t * 2 + (e & 1);
            if (col >= a.seq_kv || (CAUSAL && col > row)) s[mt][nt][e] = -INFINITY;
          }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(jt) landed; every warp is done with K(jt)
    if (jt + 1 < n_tiles) load_tile<BC, D, NT>(sK, k, a.k_ss, n0 + BC, a.seq_kv, a.head_dim, tid);
    cp_async_commit();

    // Online softmax on this thread's two rows per m-tile (a row's 4 owners are one quad).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_i[mt][r];
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = quad_max(mx);
        const float ms = (mx == -INFINITY) ? 0.f : mx * sl2;  // fully masked so far: keep exp2 finite
        const float alpha = exp2f(m_i[mt][r] * sl2 - ms);
        m_i[mt][r] = mx;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) {
          const float p0 = exp2f(fmaf(s[mt][nt][2 * r], sl2, -ms));
          const float p1 = exp2f(fmaf(s[mt][nt][2 * r + 1], sl2, -ms));
          s[mt][nt][2 * r] = p0;
          s[mt][nt][2 * r + 1] = p1;
          rs += p0 + p1;
        }
        l_i[mt][r] = l_i[mt][r] * alpha + rs;  // per-thread partial; the quad is summed at the end
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          acc[mt][nt][2 * r] *= alpha;
          acc[mt][nt][2 * r + 1] *= alpha;
        }
      }

    // O += P · V(jt)
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      std::uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = Op::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = Op::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = Op::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = Op::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int n2 = 0; n2 < NTO / 2; ++n2) {
        std::uint32_t vb[4];
        ldsm_x4_t(smem_u32(sV + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, n2 * 16 + (lane >> 4) * 8)),
                  vb);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Op::run(acc[mt][2 * n2], pa[mt], vb[0], vb[1]);
          Op::run(acc[mt][2 * n2 + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  // Normalise and store (each quad writes 16 contiguous bytes of a row).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_i[mt][r]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = m0 + wrow + mt * 16 + g + r * 8;
      if (row < a.seq_q) {
        T* orow = o + static_cast<std::int64_t>(row) * a.o_ss;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt)
          if (nt * 8 < a.head_dim)  // padded columns are not stored
            *reinterpret_cast<std::uint32_t*>(orow + nt * 8 + t * 2) =
                Op::pack(acc[mt][nt][2 * r] * inv, acc[mt][nt][2 * r + 1] * inv);
        if (a.lse != nullptr && t == 0)
          a.lse[(static_cast<std::int64_t>(b) * gridDim.y + h) * a.seq_q + row] = row_lse(m_i[mt][r], l, sl2);
      }
    }
}

// =====================================================================================================
// Kernel B (head_dim 512): O[64 x 512] fp32 is too large for one warp's rows, so the 8 warps split it by
// columns (warp w owns O[:, 64w:64w+64]). S = Q·K^T is computed cooperatively (warp tile 32 x 16), the
// row max is combined through shared memory and P goes to shared memory for the P·V phase.
// =====================================================================================================
template <typename T, bool CAUSAL, int MM>
struct KernelB {
  static constexpr int D = 512, BR = 64, BC = 64, NW = 8, NT = 256;
  static constexpr int SMEM = (BR * D + 2 * BC * D + BR * BC) * 2 + (4 * BR + 2 * BR) * 4;
};

template <typename T, bool CAUSAL, int MM>
__global__ void __launch_bounds__(256, 1) flash_fwd_d512(const FwdArgs a) {
  using KB = KernelB<T, CAUSAL, MM>;
  constexpr int D = KB::D, BR = KB::BR, BC = KB::BC, NT = KB::NT;
  using Op = MmaOp<T>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BR * D;
  T* sV = sK + BC * D;
  T* sP = sV + BC * D;
  float* sRed = reinterpret_cast<float*>(sP + BR * BC);  // [4][BR]: per column-group row max, later row sums
  float* sM = sRed + 4 * BR;                              // [2][BR]: running row max, double-buffered by tile

  const int m_block = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const HeadPtrs<T> hp(a, b, h);
  const T *q = hp.q, *k = hp.k, *v = hp.v;
  T* o = hp.o;

  const int m0 = m_block * BR;
  const int n_tiles = key_tiles<BR, BC, CAUSAL>(m0, a.seq_kv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  // S-phase role: rows 32*rg.., key columns 16*cg..
  const int rg = warp >> 2, cg = warp & 3;
  // PV-phase role: O columns 64*warp..
  const int ocol = warp * 64;

  const MaskView<T, MM> mask(a, b, h);
  load_tile<BR, D, NT>(sQ, q, a.q_ss, m0, a.seq_q, D, tid);
  load_tile<BC, D, NT>(sK, k, a.k_ss, 0, a.seq_kv, D, tid);
  cp_async_commit();
  if (tid < 2 * BR) sM[tid] = -INFINITY;

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  float l_p[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // partial row sums over this warp's S columns
  const float sl2 = a.scale_log2;

  for (int jt = 0; jt < n_tiles; ++jt) {
    const int n0 = jt * BC;
    const int cur = jt & 1, prev = cur ^ 1;
    cp_async_wait<0>();
    __syncthreads();  // K(jt) landed; P·V(jt-1) done everywhere (sV, sP, sM free)
    load_tile<BC, D, NT>(sV, v, a.v_ss, n0, a.seq_kv, D, tid);
    cp_async_commit();

    float s[2][2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][j][e] = 0.f;
#pragma unroll 8
    for (int kk = 0; kk < D / 16; ++kk) {
      std::uint32_t qa[2][4], kb[4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldsm_x4(smem_u32(sQ + swz<D>(rg * 32 + mt * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)), qa[mt]);
      ldsm_x4(smem_u32(sK + swz<D>(cg * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 16 + ((lane >> 3) & 1) * 8)),
              kb);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        Op::run(s[mt][0], qa[mt], kb[0], kb[1]);
        Op::run(s[mt][1], qa[mt], kb[2], kb[3]);
      }
    }
    if (MM != kNoMask || n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0)) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + rg * 32 + mt * 16 + g + (e >> 1) * 8;
            const int col = n0 + cg * 16 + nt * 8 + t * 2 + (e & 1);
            if (MM != kNoMask)
              s[mt][nt][e] = mask.template apply<CAUSAL>(s[mt][nt][e], a.scale, row, col, a.seq_q, a.seq_kv);
            else if (col >= a.seq_kv || (CAUSAL && col > row))
              s[mt][nt][e] = -INFINITY;
          }
    }
    // Partial row max over this warp's 16 columns.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = fmaxf(fmaxf(s[mt][0][2 * r], s[mt][0][2 * r + 1]), fmaxf(s[mt][1][2 * r], s[mt][1][2 * r + 1]));
        mx = quad_max(mx);
        if (t == 0) sRed[cg * BR + rg * 32 + mt * 16 + g + r * 8] = mx;
      }

    cp_async_wait<0>();
    __syncthreads();  // V(jt) landed; partial maxima visible; K(jt) free
    if (jt + 1 < n_tiles) load_tile<BC, D, NT>(sK, k, a.k_ss, n0 + BC, a.seq_kv, D, tid);
    cp_async_commit();

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int lrow = rg * 32 + mt * 16 + g + r * 8;
        const float m_old = sM[prev * BR + lrow];
        const float mx = fmaxf(fmaxf(m_old, fmaxf(sRed[lrow], sRed[BR + lrow])),
                               fmaxf(sRed[2 * BR + lrow], sRed[3 * BR + lrow]));
        const float ms = (mx == -INFINITY) ? 0.f : mx * sl2;
        const float alpha = exp2f(m_old * sl2 - ms);
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const float p0 = exp2f(fmaf(s[mt][nt][2 * r], sl2, -ms));
          const float p1 = exp2f(fmaf(s[mt][nt][2 * r + 1], sl2, -ms));
          rs += p0 + p1;
          *reinterpret_cast<std::uint32_t*>(sP + swz<BC>(lrow, cg * 16 + nt * 8) + t * 2) = Op::pack(p0, p1);
        }
        l_p[mt][r] = l_p[mt][r] * alpha + rs;
        if (cg == 0 && t == 0) sM[cur * BR + lrow] = mx;
      }
    __syncthreads();  // P and the new row max visible

    // O[:, ocol:ocol+64] = alpha * O + P · V(jt)[:, ocol:ocol+64]
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int lrow = mt * 16 + g + r * 8;
        const float mn = sM[cur * BR + lrow];
        const float ms = (mn == -INFINITY) ? 0.f : mn * sl2;
        const float alpha = exp2f(sM[prev * BR + lrow] * sl2 - ms);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          acc[mt][nt][2 * r] *= alpha;
          acc[mt][nt][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      std::uint32_t pa[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        ldsm_x4(smem_u32(sP + swz<BC>(mt * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)), pa[mt]);
#pragma unroll
      for (int n2 = 0; n2 < 4; ++n2) {
        std::uint32_t vb[4];
        ldsm_x4_t(smem_u32(sV + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                       ocol + n2 * 16 + (lane >> 4) * 8)),
                  vb);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          Op::run(acc[mt][2 * n2], pa[mt], vb[0], vb[1]);
          Op::run(acc[mt][2 * n2 + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  // Row sums: quad, then across the 4 column-group warps through shared memory.
  __syncthreads();  // sRed reads of the last tile are done
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_p[mt][r]);
      if (t == 0) sRed[cg * BR + rg * 32 + mt * 16 + g + r * 8] = l;
    }
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int lrow = mt * 16 + g + r * 8;
      const float l = sRed[lrow] + sRed[BR + lrow] + sRed[2 * BR + lrow] + sRed[3 * BR + lrow];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = m0 + lrow;
      if (row < a.seq_q && a.lse != nullptr && warp == 0 && t == 0)
        a.lse[(static_cast<std::int64_t>(b) * gridDim.y + h) * a.seq_q + row] =
            row_lse(sM[((n_tiles - 1) & 1) * BR + lrow], l, sl2);
      if (row < a.seq_q) {
        T* orow = o + static_cast<std::int64_t>(row) * a.o_ss + ocol;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          *reinterpret_cast<std::uint32_t*>(orow + nt * 8 + t * 2) =
              Op::pack(acc[mt][nt][2 * r] * inv, acc[mt][nt][2 * r + 1] * inv);
      }
    }
}

// Raises a kernel's dynamic shared-memory limit once per device (one bit each; devices past 63 every call):
// cudaFuncSetAttribute on every call is host time that a small call's launch waits for. `bytes` is a constant of
// the kernel at every call site.
template <auto Kern>
cudaError_t allow_smem(int bytes) {
  static std::atomic<std::uint64_t> done{0};
  int dev = -1;
  const std::uint64_t bit = cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64 ? 1ull << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(Kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
  return e;
}

// ---- launchers -------------------------------------------------------------------------------------
template <typename T, int D, int BR, int BC, int NW, bool CAUSAL, int MM = kNoMask>
cudaError_t launch_a(const FwdArgs& a, int batch, int heads, cudaStream_t stream) {
  using K = KernelA<T, D, BR, BC, NW, CAUSAL>;
  constexpr auto kern = flash_fwd_a<T, D, BR, BC, NW, CAUSAL, MM>;
  if (K::SMEM > 48 * 1024) {
    cudaError_t e = allow_smem<kern>(K::SMEM);
    if (e != cudaSuccess) return e;
  }
  dim3 grid((a.seq_q + BR - 1) / BR, heads, batch);
  kern<<<grid, K::NT, K::SMEM, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, bool CAUSAL, int MM>
cudaError_t launch_d512(const FwdArgs& a, int batch, int heads, cudaStream_t stream) {
  using K = KernelB<T, CAUSAL, MM>;
  constexpr auto kern = flash_fwd_d512<T, CAUSAL, MM>;
  cudaError_t e = allow_smem<kern>(K::SMEM);
  if (e != cudaSuccess) return e;
  dim3 grid((a.seq_q + K::BR - 1) / K::BR, heads, batch);
  kern<<<grid, K::NT, K::SMEM, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace attnsel::cuda::detail
