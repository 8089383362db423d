// W4A16 on the tensor cores for 1..128 tokens: 4-bit weights in the MMA's own fragment order, dequantized in
// registers with two bit operations a pair of weights, multiplied by mma.sync m16n8k16 with the weight as the
// 16-row operand and the few tokens as the 8-column one (y^T = W x^T), float32 accumulation. Three bodies, the
// tuning picks per shape and token count (w4_mma.py): "k" (a block's warps split K, inputs from L1/L2), "x" (warps
// take different rows and share an input slice in shared memory), "p" (every operand staged by cp.async, stages
// ahead: below).
//
// Layout (ptqlab/kernels/w4_mma.py: pack_int4_mma): the weight W [N, K] is cut into tiles of 16 rows x 64 columns,
// stored tile after tile, [N/16][K/64][32 lanes][4 words]: a warp reads one tile as one coalesced 512-byte load
// (a uint4 a lane), and lane (g = lane/4, t = lane%4) gets exactly the A fragments of its 4 MMA steps s = 0..3.
// Within a tile, step s and thread t own the columns k = 16t + 4s + u (u = 0..3): the MMA sums over k, so any
// bijection of a tile's 64 columns onto the 4 steps x 16 fragment positions is correct as long as the input x
// uses the same one, and this one makes a thread's 16 inputs of a tile contiguous (two 16-byte loads).
// The 8 codes of word s of lane (g, t), for rows g and g + 8 of the tile and k0 = 16t + 4s:
//   nibble 0: W[g][k0]    1: W[g+8][k0]    2: W[g][k0+2]    3: W[g+8][k0+2]
//   nibble 4: W[g][k0+1]  5: W[g+8][k0+1]  6: W[g][k0+3]    7: W[g+8][k0+3]
// so that (q & 0x000f000f) | 0x64006400 is the fp16 pair (1024 + nibble 0, 1024 + nibble 4) = the first A register
// (row g, fragment columns 2t, 2t+1), and the 0x00f0 / >> 8 variants give the other three registers.
//
// The dequantized weight, (code - zero) * scale, is computed in fp16 as the exact difference times the fp16 scale
// (one rounding): bit for bit the fake-quant fp16 weight. Scales and zero points: fp16 [G, N], GROUP_CHUNKS tiles
// of 64 columns a group (a group is a multiple of 64 columns, or the whole row).
//
// One block: R consecutive row tiles (16R output channels) and one of S shares of K (gridDim.y = S), its warps
// splitting that share; each warp keeps D = 4/R tiles of weight in flight per row tile (a register ring), reads
// its tokens' inputs straight from global memory (L1/L2: they are small; R row tiles share each input load), and
// the warps' partial sums meet in shared memory. With S = 1 the block adds the bias and writes the output; with
// S > 1 each block adds its sums to a float32 workspace and the last block of the row tiles (a ticket counter)
// reads them back, zeroing the workspace and the ticket for the next call, and writes the output: one launch.
//
// LoRC (the "k" body's LORC variants, rank <= 32): y += (x V^T) U^T in the same launch. t = x V^T [rank, M] is
// computed once per call, not per block, by P extra blocks in front of the grid (blockIdx.x < P, blockIdx.y = 0:
// the lowest block indices, so the first dispatched, and they never wait on anything; P = lorc_blocks(), one
// 64-column tile of K a warp), V [rank, K] (row-major fp16) being one or two 16-row A operands (its fragment for
// step s is two 16-byte loads of rows g, g + 8 at the columns the weight's own fragment uses, so V needs no layout
// of its own); they add their float32 sums to a global t (TW) and count themselves in TC[0]. Each block that
// writes outputs waits for TC[0] = P (long done by then: it has streamed its weight meanwhile), reads t, and adds
// U[n, :] . t as it writes; the last of them (TC[1]) zeroes t and both counters for the next call. Measured
// before (H200, session 34): every block computing t for its own rows re-read V from L2 N / 16R times and cost
// 20-60% a linear; the first blocks computing t before their own weight delayed them and cost 10-40%.

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;  // (a & b) | c in one instruction
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// one word (8 codes) -> the 4 A registers of one MMA step; zlo/zhi: 1024 + zero of row g / 64 + zero of row g + 8
// (negated), slo/shi: the scales of rows g / g + 8
__device__ __forceinline__ void dequant(uint32_t q, __half2 zlo, __half2 zhi, __half2 slo, __half2 shi,
                                        uint32_t a[4]) {
  const __half2 sixteenth = __float2half2_rn(0.0625f);
  const uint32_t lo = and_or(q, 0x000f000fu, 0x64006400u);   // 1024 + code, rows g
  const uint32_t hi = and_or(q, 0x00f000f0u, 0x64006400u);   // 1024 + 16 code, rows g + 8
  const uint32_t lo2 = and_or(q >> 8, 0x000f000fu, 0x64006400u);
  const uint32_t hi2 = and_or(q >> 8, 0x00f000f0u, 0x64006400u);
  a[0] = h2u(__hmul2(__hsub2(u2h(lo), zlo), slo));                 // (code - zero) exact, then one rounding
  a[1] = h2u(__hmul2(__hfma2(u2h(hi), sixteenth, zhi), shi));      // 64 + code - (64 + zero), exact
  a[2] = h2u(__hmul2(__hsub2(u2h(lo2), zlo), slo));
  a[3] = h2u(__hmul2(__hfma2(u2h(hi2), sixteenth, zhi), shi));
}

__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Post-scaling (the "p" body up to POST_SCALE_MAX_NT token tiles; session 38): the MMAs take the exact
// differences code - zero (fp16 small integers), each k-tile's float32 sums of a row tile start from zero
// (mma_from_zero), and the row's scale multiplies them once a k-tile (post_scale: 4 FMAs a token tile), instead
// of a mul.f16x2 on every weight pair: 4 of the 13 instructions of a word's dequantization, at 1..16 tokens the
// bulk of the kernel's instructions. The result is x . ((code - zero) * scale) with the fp16 scale and float32
// sums, without the fp16 rounding of each weight (w4_mma.py: post_scaled). From 4 token tiles on, the 4 FMAs a
// token tile and k-tile would cost as much as the multiplies saved: those keep dequant().
constexpr int POST_SCALE_MAX_NT = 2;

// one word -> the 4 A registers as exact fp16 code - zero (dequant() without its scale multiplies)
__device__ __forceinline__ void dequant_codes(uint32_t q, __half2 zlo, __half2 zhi, uint32_t a[4]) {
  const __half2 sixteenth = __float2half2_rn(0.0625f);
  const uint32_t lo = and_or(q, 0x000f000fu, 0x64006400u);
  const uint32_t hi = and_or(q, 0x00f000f0u, 0x64006400u);
  const uint32_t lo2 = and_or(q >> 8, 0x000f000fu, 0x64006400u);
  const uint32_t hi2 = and_or(q >> 8, 0x00f000f0u, 0x64006400u);
  a[0] = h2u(__hsub2(u2h(lo), zlo));
  a[1] = h2u(__hfma2(u2h(hi), sixteenth, zhi));
  a[2] = h2u(__hsub2(u2h(lo2), zlo));
  a[3] = h2u(__hfma2(u2h(hi2), sixteenth, zhi));
}

// c = A B (float32 sums from zero: the first MMA of a post-scaled k-tile)
__device__ __forceinline__ void mma_from_zero(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};"
      : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

// acc += scale * part for a C fragment (rows g: c0, c1; rows g + 8: c2, c3)
__device__ __forceinline__ void post_scale(float acc[4], const float part[4], float slo, float shi) {
  acc[0] = fmaf(slo, part[0], acc[0]);
  acc[1] = fmaf(slo, part[1], acc[1]);
  acc[2] = fmaf(shi, part[2], acc[2]);
  acc[3] = fmaf(shi, part[3], acc[3]);
}

// the scales (and zero points) of group grp for rows g, g + 8 of R row tiles from tile0, as dequant() takes them
template <int R, bool SYM>
__device__ __forceinline__ void group_params(const __half* __restrict__ S, const __half* __restrict__ Z, int grp,
                                             int tile0, int g, int N, __half2 slo[R], __half2 shi[R],
                                             __half2 zlo[R], __half2 zhi[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min((tile0 + r) * 16 + g, N - 9);
    slo[r] = __half2half2(S[(size_t)grp * N + row]);
    shi[r] = __half2half2(S[(size_t)grp * N + row + 8]);
    if (SYM) {
      zlo[r] = __float2half2_rn(1032.f);
      zhi[r] = __float2half2_rn(-72.f);
    } else {
      const __half zl = Z[(size_t)grp * N + row], zh = Z[(size_t)grp * N + row + 8];
      zlo[r] = __half2half2(__hadd(zl, __float2half(1024.f)));
      zhi[r] = __half2half2(__hneg(__hadd(zh, __float2half(64.f))));
    }
  }
}

template <int R, int NT>
__device__ __forceinline__ void zero_acc(float acc[R][NT][4]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][j][i] = 0.f;
}

// LoRC: the block's rows of U [N, rank] (rank <= 32) into shared memory as fp16 pairs, zeros past rank and N
// (staged while the first weight tiles are in flight, so its latency hides behind theirs). A row is 17 words
// (16 pairs + 1): a warp's 32 consecutive rows then fall in 32 different banks (at 16 words, 2 rows a bank; with
// the t-blocks' shared sums this took 1.4-7.2 us off a linear at 16 tokens, H200, session 34 calls 4 -> 5)
constexpr int US_ROW = 17;
template <int R>
__device__ __forceinline__ void lorc_stage_u(const __half* __restrict__ U, int rank, int row0, int N,
                                             __half2 (*us)[US_ROW]) {
  const __half zero = __float2half(0.f);
  for (int i = threadIdx.x; i < 16 * R * 16; i += blockDim.x) {
    const int row = i >> 4, p = i & 15, n = row0 + row;
    const __half lo = (2 * p < rank && n < N) ? U[(size_t)n * rank + 2 * p] : zero;
    const __half hi = (2 * p + 1 < rank && n < N) ? U[(size_t)n * rank + 2 * p + 1] : zero;
    us[row][p] = __halves2half2(lo, hi);
  }
}

// U[n, :] . t[:, m] for LoRC's t = x V^T (tr: rank rows, zeros past rank; u: U's row n as pairs)
template <int NT>
__device__ __forceinline__ float lorc_dot(const __half2* u, const float (*tr)[8 * NT], int rank, int m) {
  float v = 0.f;
#pragma unroll
  for (int p = 0; p < 16; ++p) {
    if (2 * p >= rank) break;
    const float2 w = __half22float2(u[p]);
    v = fmaf(w.x, tr[2 * p][m], fmaf(w.y, tr[2 * p + 1][m], v));
  }
  return v;
}

constexpr int LORC_BLOCKS = 64;  // at most this many blocks compute t

// the extra blocks that compute LoRC's t: one 64-column tile of K a warp, at most LORC_BLOCKS (w4_mma.py: the same)
__device__ __forceinline__ int lorc_blocks(int K) {
  const int warps = blockDim.x >> 5;
  return min(LORC_BLOCKS, ((K >> 6) + warps - 1) / warps);
}

// LoRC's t-block idx < P: its warps' tiles of K (tile = warp + warps * (idx + P i)) of t = x V^T, summed in
// shared memory and added to TW [32][8 NT] (float32), then the block's ticket in TC[0]
template <int NT>
__device__ __noinline__ void lorc_share(const __half* __restrict__ X, const __half* __restrict__ V, int rank,
                                        int M, int K, int idx, int P, float* __restrict__ TW, int* __restrict__ TC) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, chunks = K >> 6;
  const int first = idx * warps + warp, step = P * warps;
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
  __shared__ float part[32][8 * NT];  // the block's warps meet here: one global atomic per value a block
  for (int i = threadIdx.x; i < 32 * 8 * NT; i += blockDim.x) part[i / (8 * NT)][i % (8 * NT)] = 0.f;
  __syncthreads();
  if (first < chunks) {
    float acc[2][NT][4];
    zero_acc<2, NT>(acc);
    const int tiles = rank > 16 ? 2 : 1;
    for (int c = first; c < chunks; c += step)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // as the weight's loop: columns 64c + 16t + 8h .. + 7, steps 2h, 2h + 1
        uint4 x[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j)
          x[j] = 8 * j + g < M
                     ? __ldg(reinterpret_cast<const uint4*>(X + (size_t)(8 * j + g) * K + (size_t)c * 64 + 16 * t + 8 * h))
                     : zero4;
#pragma unroll
        for (int rt = 0; rt < 2; ++rt) {
          if (rt >= tiles) break;
          const int r0 = 16 * rt + g, r1 = r0 + 8;  // V's A fragments: rows g / g + 8 of the rank tile
          const size_t col = (size_t)c * 64 + 16 * t + 8 * h;
          const uint4 v0 = r0 < rank ? __ldg(reinterpret_cast<const uint4*>(V + (size_t)r0 * K + col)) : zero4;
          const uint4 v1 = r1 < rank ? __ldg(reinterpret_cast<const uint4*>(V + (size_t)r1 * K + col)) : zero4;
          const uint32_t a0[4] = {v0.x, v1.x, v0.y, v1.y}, a1[4] = {v0.z, v1.z, v0.w, v1.w};
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            mma(acc[rt][j], a0, x[j].x, x[j].y);
            mma(acc[rt][j], a1, x[j].z, x[j].w);
          }
        }
      }
#pragma unroll
    for (int rt = 0; rt < 2; ++rt)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // C fragment: rank row 16 rt + g (+ 8), tokens 8j + 2t (+ 1)
          const int q = 16 * rt + g + (i >> 1) * 8, m = 8 * j + 2 * t + (i & 1);
          if (q < rank && m < M) atomicAdd(&part[q][m], acc[rt][j][i]);
        }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * 8 * NT; i += blockDim.x) {
    const int q = i / (8 * NT), m = i % (8 * NT);
    if (q < rank && m < M) atomicAdd(&TW[i], part[q][m]);
  }
  __threadfence();  // this block's sums are visible before its ticket is
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&TC[0], 1);
}

// LoRC in a block that writes outputs: wait for the P shares of t (computed by blocks that never wait, so this
// ends; a bound turns a broken invariant into an error rather than a hang), then t into shared memory
template <int NT>
__device__ __noinline__ void lorc_wait(const float* __restrict__ TW, int* __restrict__ TC, int P,
                                          float (*tr)[8 * NT]) {
  if (threadIdx.x == 0) {
    long long spins = 0;
    while (*reinterpret_cast<volatile int*>(&TC[0]) < P) {
      __nanosleep(64);
      if (++spins > (1ll << 26)) __trap();
    }
    __threadfence();
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * 8 * NT; i += blockDim.x) tr[i / (8 * NT)][i % (8 * NT)] = __ldcg(&TW[i]);
  __syncthreads();
}

// LoRC, after a writer block's outputs: the last writer zeroes t and the counters for the next call (every other
// writer has read t by then: it counts itself in TC[1] only after)
template <int NT>
__device__ __noinline__ void lorc_done(float* __restrict__ TW, int* __restrict__ TC, int writers) {
  __shared__ bool final_writer;
  if (threadIdx.x == 0) final_writer = atomicAdd(&TC[1], 1) == writers - 1;
  __syncthreads();
  if (!final_writer) return;
  for (int i = threadIdx.x; i < 32 * 8 * NT; i += blockDim.x) TW[i] = 0.f;
  if (threadIdx.x == 0) {
    TC[0] = 0;
    TC[1] = 0;
  }
}

// NT: n8 token tiles (M <= 8 NT); R: row tiles per block; SYM: zero point 8 everywhere (Z unused); LORC: add
// (x V^T) U^T for V [rank, K], U [N, rank], rank <= 32, through t's workspace TW [32 * 8 NT] and counters TC [2],
// both zero between calls (else V, U, rank, TW, TC unused)
template <int NT, int R, bool SYM, bool LORC>
__device__ __forceinline__ void w4_mma_body(const __half* __restrict__ X, const uint4* __restrict__ P,
                                            const __half* __restrict__ S, const __half* __restrict__ Z,
                                            const __half* __restrict__ B, __half* __restrict__ Y,
                                            float* __restrict__ WS, int* __restrict__ CNT, int M, int N, int K,
                                            int group_chunks, const __half* __restrict__ V,
                                            const __half* __restrict__ U, int rank, float* __restrict__ TW,
                                            int* __restrict__ TC) {
  constexpr int D = R >= 4 ? 1 : 4 / R;  // weight tiles in flight per row tile and warp (the register ring)
  __shared__ float red[16 * R][8 * NT];
  __shared__ float tred[LORC ? 32 : 1][8 * NT];  // LoRC: t = x V^T, [rank][token]
  __shared__ __half2 us[LORC ? 16 * R : 1][US_ROW];  // LoRC: U's rows of this block
  __shared__ bool last;
  // LoRC: the first P blocks of row 0 compute t, the others of those columns have nothing to do
  const int lorc_p = LORC ? lorc_blocks(K) : 0;
  if (LORC && (int)blockIdx.x < lorc_p) {
    if (blockIdx.y == 0) lorc_share<NT>(X, V, rank, M, K, blockIdx.x, lorc_p, TW, TC);
    return;
  }
  const int bx = blockIdx.x - lorc_p, writers = gridDim.x - lorc_p;  // this block's row tiles; their blocks
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles_n = N >> 4, chunks = K >> 6;
  const int tile0 = bx * R;
  const int parts = warps * gridDim.y, part = blockIdx.y * warps + warp;
  const int per = (chunks + parts - 1) / parts;
  const int c0 = min(part * per, chunks), c1 = min(c0 + per, chunks);

  for (int i = threadIdx.x; i < 16 * R * 8 * NT; i += blockDim.x) red[i / (8 * NT)][i % (8 * NT)] = 0.f;

  float acc[R][NT][4];
  zero_acc<R, NT>(acc);

  // the inputs this lane feeds to the MMA: token 8j + g, columns 16t .. 16t + 15 of each 64-column tile
  const __half* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    xok[j] = 8 * j + g < M;
    xrow[j] = X + (size_t)(xok[j] ? 8 * j + g : 0) * K + 16 * t;
  }

  uint4 ring[D][R];
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int d = 0; d < D; ++d)
#pragma unroll
    for (int r = 0; r < R; ++r)
      ring[d][r] = (c0 + d < c1 && tile0 + r < tiles_n)
                       ? __ldcs(P + ((size_t)(tile0 + r) * chunks + c0 + d) * 32 + lane) : zero4;
  if (LORC) lorc_stage_u<R>(U, rank, tile0 * 16, N, us);  // (read after the __syncthreads below the loop)

  for (int cb = c0; cb < c1; cb += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int c = cb + d;
      uint4 w[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[r] = ring[d][r];
        // the weight is read once: streaming loads (evict first), keeping L1/L2 for the inputs
        ring[d][r] = (c + D < c1 && tile0 + r < tiles_n)
                         ? __ldcs(P + ((size_t)(tile0 + r) * chunks + c + D) * 32 + lane) : zero4;
      }
      if (c >= c1) break;
      // scales (and zero points) of this tile's group for rows g, g + 8 of each row tile
      const int grp = c / group_chunks;
      __half2 slo[R], shi[R], zlo[R], zhi[R];
      group_params<R, SYM>(S, Z, grp, tile0, g, N, slo, shi, zlo, zhi);
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // columns 16t + 8h .. + 7: steps 2h, 2h + 1
        uint4 x[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j)
          x[j] = xok[j] ? __ldg(reinterpret_cast<const uint4*>(xrow[j] + (size_t)c * 64 + 8 * h)) : zero4;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          uint32_t a0[4], a1[4];
          dequant(h ? w[r].z : w[r].x, zlo[r], zhi[r], slo[r], shi[r], a0);
          dequant(h ? w[r].w : w[r].y, zlo[r], zhi[r], slo[r], shi[r], a1);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            mma(acc[r][j], a0, x[j].x, x[j].y);  // step 2h: columns 16t + 8h + 0..3
            mma(acc[r][j], a1, x[j].z, x[j].w);  // step 2h + 1: + 4..7
          }
        }
      }
    }
  }

  __syncthreads();  // red is zeroed
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j) {  // C fragment: rows g / g + 8, tokens 8j + 2t, 8j + 2t + 1
      atomicAdd(&red[16 * r + g][8 * j + 2 * t], acc[r][j][0]);
      atomicAdd(&red[16 * r + g][8 * j + 2 * t + 1], acc[r][j][1]);
      atomicAdd(&red[16 * r + g + 8][8 * j + 2 * t], acc[r][j][2]);
      atomicAdd(&red[16 * r + g + 8][8 * j + 2 * t + 1], acc[r][j][3]);
    }
  __syncthreads();
  const int rows = 16 * R, outs = min(rows * M, rows * 8 * NT);
  if (gridDim.y > 1) {  // split K: the workspace, then the last block of these row tiles finishes
    for (int i = threadIdx.x; i < outs; i += blockDim.x) {
      const int m = i / rows, row = i % rows, n = tile0 * 16 + row;
      if (n < N) atomicAdd(&WS[(size_t)m * N + n], red[row][m]);
    }
    __threadfence();  // this block's sums are visible before its ticket is
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&CNT[bx], 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
  }
  if (LORC) lorc_wait<NT>(TW, TC, lorc_p, tred);  // (a writer: the block itself, or the last K share's)
  for (int i = threadIdx.x; i < outs; i += blockDim.x) {
    const int m = i / rows, row = i % rows, n = tile0 * 16 + row;
    if (n < N) {
      // split K: the total, read and zeroed in one atomic (the next call finds the workspace zero)
      float v = gridDim.y > 1 ? atomicExch(&WS[(size_t)m * N + n], 0.f) : red[row][m];
      if (LORC) v += lorc_dot<NT>(us[row], tred, rank, m);
      if (B != nullptr) v += __half2float(B[n]);
      Y[(size_t)m * N + n] = __float2half_rn(v);
    }
  }
  if (gridDim.y > 1 && threadIdx.x == 0) CNT[bx] = 0;
  if (LORC) lorc_done<NT>(TW, TC, writers);  // (one writer per column of row-tile blocks)
}

// The end of the "x" and "p" bodies, where each warp owns its R row tiles from tile0 (no reduction across warps):
// with one K share, the outputs straight from the accumulators (+ bias); with several, the sums into the float32
// workspace and the last block of these rows (a ticket) writes them, zeroing the workspace and its ticket.
// The block's rows: 16 R warps from blockIdx.x's; last: the body's shared flag.
template <int NT, int R>
__device__ __forceinline__ void write_warp_rows(const float (&acc)[R][NT][4], const __half* __restrict__ B,
                                                __half* __restrict__ Y, float* __restrict__ WS,
                                                int* __restrict__ CNT, int M, int N, int tile0, bool& last) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, tiles_n = N >> 4;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n0 = (tile0 + r) * 16 + g;
    if (tile0 + r >= tiles_n) continue;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 8 * j + 2 * t + (i & 1), n = n0 + (i >> 1) * 8;
        if (m >= M) continue;
        if (gridDim.y > 1) {
          atomicAdd(&WS[(size_t)m * N + n], acc[r][j][i]);
        } else {
          float v = acc[r][j][i];
          if (B != nullptr) v += __half2float(B[n]);
          Y[(size_t)m * N + n] = __float2half_rn(v);
        }
      }
  }
  if (gridDim.y == 1) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&CNT[blockIdx.x], 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int rows = 16 * R * (blockDim.x >> 5), first = blockIdx.x * rows;
  for (int i = threadIdx.x; i < rows * M; i += blockDim.x) {
    const int m = i / rows, n = first + i % rows;
    if (n < N) {
      float v = atomicExch(&WS[(size_t)m * N + n], 0.f);
      if (B != nullptr) v += __half2float(B[n]);
      Y[(size_t)m * N + n] = __float2half_rn(v);
    }
  }
  if (threadIdx.x == 0) CNT[blockIdx.x] = 0;
}


// The many-token variant (16..128 tokens): at many tokens the inputs, not the weight, are most of the loads, and
// the body above reads them per warp from L1/L2 at the moment it needs them (one warp per scheduler at its
// register count: nothing hides that latency). Here a block's warps take different row tiles over the same share
// of K, so one 64-column slice of every token's input serves them all: the block stages it in shared memory
// (double-buffered, the next slice loaded into registers while the MMAs run on this one), and each warp reads
// its B fragments from there. Each warp owns its rows: no reduction across warps; K shares as above.
template <int NT, int R, bool SYM, bool LORC_UNUSED>
__device__ __forceinline__ void w4_mmax_body(const __half* __restrict__ X, const uint4* __restrict__ P,
                                             const __half* __restrict__ S, const __half* __restrict__ Z,
                                             const __half* __restrict__ B, __half* __restrict__ Y,
                                             float* __restrict__ WS, int* __restrict__ CNT, int M, int N, int K,
                                             int group_chunks, const __half*, const __half*, int, float*, int*) {
  constexpr int D = R >= 4 ? 1 : 4 / R;
  constexpr int XROW = 64 + 8;                     // halves a token row of the staged slice (+16 B: fewer conflicts)
  constexpr int PIECES = 8 * NT * 8;               // 16-byte pieces of a slice (8 NT tokens x 64 columns)
  __shared__ __align__(16) __half xs[2][8 * NT][XROW];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles_n = N >> 4, chunks = K >> 6;
  const int tile0 = (blockIdx.x * warps + warp) * R;  // this warp's first row tile
  const int per = (chunks + gridDim.y - 1) / gridDim.y;
  const int c0 = min((int)blockIdx.y * per, chunks), c1 = min(c0 + per, chunks);
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
  uint4 next[(PIECES + 127) / 128];  // the pieces this thread stages (blocks of 128 threads or more)

  auto fetch = [&](int c) {  // this thread's pieces of slice c into registers (tokens >= M: zeros)
#pragma unroll
    for (int i = 0; i < (PIECES + 127) / 128; ++i) {
      const int piece = threadIdx.x + i * blockDim.x, tok = piece >> 3;
      next[i] = (piece < PIECES && tok < M && c < c1)
                    ? __ldg(reinterpret_cast<const uint4*>(X + (size_t)tok * K + (size_t)c * 64 + (piece & 7) * 8))
                    : zero4;
    }
  };
  auto stage = [&](int buf) {
#pragma unroll
    for (int i = 0; i < (PIECES + 127) / 128; ++i) {
      const int piece = threadIdx.x + i * blockDim.x;
      if (piece < PIECES) *reinterpret_cast<uint4*>(&xs[buf][piece >> 3][(piece & 7) * 8]) = next[i];
    }
  };

  float acc[R][NT][4];
  zero_acc<R, NT>(acc);

  uint4 ring[D][R];
#pragma unroll
  for (int d = 0; d < D; ++d)
#pragma unroll
    for (int r = 0; r < R; ++r)
      ring[d][r] = (c0 + d < c1 && tile0 + r < tiles_n)
                       ? __ldcs(P + ((size_t)(tile0 + r) * chunks + c0 + d) * 32 + lane) : zero4;
  fetch(c0);
  stage(0);
  fetch(c0 + 1);
  __syncthreads();

  for (int cb = c0; cb < c1; cb += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int c = cb + d;
      if (c >= c1) break;  // (uniform across the block: the same K share)
      const int buf = (c - c0) & 1;
      uint4 w[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[r] = ring[d][r];
        ring[d][r] = (c + D < c1 && tile0 + r < tiles_n)
                         ? __ldcs(P + ((size_t)(tile0 + r) * chunks + c + D) * 32 + lane) : zero4;
      }
      const int grp = c / group_chunks;
      __half2 slo[R], shi[R], zlo[R], zhi[R];
      group_params<R, SYM>(S, Z, grp, tile0, g, N, slo, shi, zlo, zhi);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t a0[R][4], a1[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          dequant(h ? w[r].z : w[r].x, zlo[r], zhi[r], slo[r], shi[r], a0[r]);
          dequant(h ? w[r].w : w[r].y, zlo[r], zhi[r], slo[r], shi[r], a1[r]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4 x = *reinterpret_cast<const uint4*>(&xs[buf][8 * j + g][16 * t + 8 * h]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            mma(acc[r][j], a0[r], x.x, x.y);
            mma(acc[r][j], a1[r], x.z, x.w);
          }
        }
      }
      __syncthreads();  // every warp is done with the other buffer's last use
      stage(buf ^ 1);   // slice c + 1
      fetch(c + 2);
      __syncthreads();
    }
  }

  write_warp_rows<NT, R>(acc, B, Y, WS, CNT, M, N, tile0, last);
}


// The pipelined variant (1..128 tokens; session 35): the "x" body above keeps one input slice and 4 / R weight
// tiles a warp ahead in registers, about 0.1-0.2 us of MMA work, against a global load latency of ~1 us under
// load: at 32-128 tokens it ran at 9-29% of the memory floor (H200, session 32), latency-bound, and its registers
// (150-230 a thread) left no room for a deeper ring. Here every operand of a k-tile (the block's input slice, each
// warp's own weight tiles, the block's rows' scales and zero points) is copied to shared memory by cp.async,
// STAGES k-tiles ahead, so the bytes in flight no longer cost registers; one __syncthreads a k-tile. As in "x", a
// block's warps take different row tiles (R each) over the same share of K, each owns its rows (no reduction
// across warps), K shares across blocks meet in the float32 workspace.
// Dynamic shared memory, per stage: the input slice [8 NT][XROW] halves, the weight [warps][R][32] uint4, the
// scales (and zero points) [16 R warps] halves each (w4_mma.py: pipe_shared_bytes, the same formula).
// Measured (H200, session 35, bench_marlin.py): the tuning takes it for most shapes at 1 and 32-128 tokens and for
// the large ones at 16: 1.3-3.1x cuBLAS FP16 at one token (the "k" body 1.3-2.6x), 0.7-0.96x at 64 (0.6-0.8x).
// What bounds it from 32 tokens on (Nsight Compute, 8192 -> 28672 at 64 tokens, R 2, 8 warps): 2 warps a
// scheduler (140 registers a thread, one block an SM), 0.39 instructions issued a cycle per scheduler, 5.5
// instructions an MMA (the dequantization ~2 of them, the copies and addresses ~1.5); neither the memory (34% of
// peak) nor the tensor cores are busy. Tried and not kept: 6 stages (no change), two k-tiles a barrier
// (results/w4_mma_pairs_variant_session35.patch: -7..+6%, no clear win). Session 38 (same H200, one run of
// bench_w4.py, 1 / 8 / 16 tokens on five shapes): the copies spread over the warps and the group counted (below)
// 1% faster in geometric mean; with post-scaling at 1-16 tokens as well 4.5% (one token: 6-11% on four shapes),
// decode at batch 1 370 -> 388 tokens/s.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  // plain cp.async.cg (no L2 cache hint: nvcc 13.0's ptxas drops createpolicy: IST-DASLab/marlin issue 44); a
  // false predicate copies nothing and zero-fills the 16 bytes
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }

constexpr int PIPE_XROW = 72;  // halves a token row of a staged slice: 64 + 8 (+16 B: rows g, g + 1 in other banks)
template <int NT>
__host__ __device__ constexpr int pipe_stages() { return NT >= 16 ? 3 : 4; }

template <int NT, int R, bool SYM, bool LORC_UNUSED>
__device__ __forceinline__ void w4_mmap_body(const __half* __restrict__ X, const uint4* __restrict__ P,
                                             const __half* __restrict__ S, const __half* __restrict__ Z,
                                             const __half* __restrict__ B, __half* __restrict__ Y,
                                             float* __restrict__ WS, int* __restrict__ CNT, int M, int N, int K,
                                             int group_chunks, const __half*, const __half*, int, float*, int*) {
  constexpr int STAGES = pipe_stages<NT>();
  constexpr bool POST = NT <= POST_SCALE_MAX_NT;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles_n = N >> 4, chunks = K >> 6;
  const int rows = 16 * R * warps, first = blockIdx.x * rows;  // the block's output rows
  const int tile0 = (blockIdx.x * warps + warp) * R;             // this warp's first row tile
  const int per = (chunks + gridDim.y - 1) / gridDim.y;
  const int c0 = min((int)blockIdx.y * per, chunks), c1 = min(c0 + per, chunks), tiles_k = c1 - c0;

  const int x_bytes = 8 * NT * PIPE_XROW * 2, w_bytes = warps * R * 512, s_bytes = rows * 2;
  const int stage_bytes = x_bytes + w_bytes + (SYM ? 1 : 2) * s_bytes;
  {  // the launch's dynamic shared memory must hold the stages (w4_mma.py computes the same): else an error
    uint32_t have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < (uint32_t)(STAGES * stage_bytes)) __trap();
  }
  auto xs = [&](int st) { return reinterpret_cast<__half*>(smem + st * stage_bytes); };
  auto wsm = [&](int st) { return reinterpret_cast<uint4*>(smem + st * stage_bytes + x_bytes); };
  auto ssm = [&](int st) { return reinterpret_cast<__half*>(smem + st * stage_bytes + x_bytes + w_bytes); };
  auto zsm = [&](int st) { return reinterpret_cast<__half*>(smem + st * stage_bytes + x_bytes + w_bytes + s_bytes); };

  // k-tile c's operands into stage st: the input pieces of the M tokens (16 B: 8 columns of a token; the rows of
  // tokens >= M are left as they are: each MMA output column is one token's, and those are never written), this
  // warp's weight tiles, the rows' scales (and zero points) of c's group, 8 rows a piece. Every k-tile ends at a
  // barrier, so the warp with the most copies sets the pace: the input pieces go from the last thread down, the
  // scales from the first up, and the group is counted along (load() takes c0, c0 + 1, ... in order), not divided
  // (session 38: the copies and the division were a third of the first warp's instructions a k-tile at 1 token).
  const int x_pieces = 8 * min(M, 8 * NT), s_pieces = (SYM ? 1 : 2) * (rows >> 3);
  int grp_next = c0 / group_chunks, in_grp_next = c0 % group_chunks;
  const uint4* wsrc[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    wsrc[r] = P + (size_t)(tile0 + r < tiles_n ? tile0 + r : 0) * chunks * 32 + lane;
  auto load = [&](int st, int c) {
    __half* x = xs(st);
    for (int i = blockDim.x - 1 - threadIdx.x; i < x_pieces; i += blockDim.x) {
      const int tok = i >> 3, piece = i & 7;
      cp_async16(x + tok * PIPE_XROW + piece * 8, X + (size_t)tok * K + (size_t)c * 64 + piece * 8, true);
    }
    uint4* w = wsm(st) + warp * R * 32;
#pragma unroll
    for (int r = 0; r < R; ++r) cp_async16(w + r * 32 + lane, wsrc[r] + (size_t)c * 32, tile0 + r < tiles_n);
    const int grp = grp_next, pieces = rows >> 3;
    if (++in_grp_next == group_chunks) {
      in_grp_next = 0;
      ++grp_next;
    }
    for (int i = threadIdx.x; i < s_pieces; i += blockDim.x) {
      const bool zero_point = i >= pieces;
      const int row = first + 8 * (zero_point ? i - pieces : i);
      const __half* src = zero_point ? Z : S;
      cp_async16((zero_point ? zsm(st) : ssm(st)) + (row - first), src + (size_t)grp * N + min(row, N - 8),
                 row < N);
    }
  };

  float acc[R][NT][4];
  zero_acc<R, NT>(acc);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < tiles_k) load(s, c0 + s);
    cp_async_commit();  // (an empty group past the share: the counts below stay uniform)
  }
  for (int i = 0; i < tiles_k; ++i) {
    cp_async_wait<STAGES - 2>();  // k-tile i is in (this thread's copies) ...
    __syncthreads();              // ... and everyone's; everyone is done with the stage loaded next
    if (i + STAGES - 1 < tiles_k) load((i + STAGES - 1) % STAGES, c0 + i + STAGES - 1);
    cp_async_commit();
    const int st = i % STAGES;
    const __half* x = xs(st);
    const uint4* w = wsm(st) + warp * R * 32;
    const __half* sc = ssm(st);
    const __half* zp = zsm(st);
    __half2 slo[R], shi[R], zlo[R], zhi[R];
    uint4 wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      wr[r] = w[r * 32 + lane];
      const int row = 16 * (warp * R + r) + g;  // within the block
      slo[r] = __half2half2(sc[row]);
      shi[r] = __half2half2(sc[row + 8]);
      if (SYM) {
        zlo[r] = __float2half2_rn(1032.f);
        zhi[r] = __float2half2_rn(-72.f);
      } else {
        zlo[r] = __half2half2(__hadd(zp[row], __float2half(1024.f)));
        zhi[r] = __half2half2(__hneg(__hadd(zp[row + 8], __float2half(64.f))));
      }
    }
    float part[R][NT][4];  // post-scaling: this k-tile's unscaled sums (unused without)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a0[R][4], a1[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (POST) {
          dequant_codes(h ? wr[r].z : wr[r].x, zlo[r], zhi[r], a0[r]);
          dequant_codes(h ? wr[r].w : wr[r].y, zlo[r], zhi[r], a1[r]);
        } else {
          dequant(h ? wr[r].z : wr[r].x, zlo[r], zhi[r], slo[r], shi[r], a0[r]);
          dequant(h ? wr[r].w : wr[r].y, zlo[r], zhi[r], slo[r], shi[r], a1[r]);
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint4 xv = *reinterpret_cast<const uint4*>(x + (8 * j + g) * PIPE_XROW + 16 * t + 8 * h);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (!POST) {
            mma(acc[r][j], a0[r], xv.x, xv.y);
            mma(acc[r][j], a1[r], xv.z, xv.w);
          } else {
            if (h == 0)
              mma_from_zero(part[r][j], a0[r], xv.x, xv.y);
            else
              mma(part[r][j], a0[r], xv.x, xv.y);
            mma(part[r][j], a1[r], xv.z, xv.w);
          }
        }
      }
    }
    if (POST) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j)
          post_scale(acc[r][j], part[r][j], __low2float(slo[r]), __low2float(shi[r]));
    }
  }
  cp_async_wait<0>();

  write_warp_rows<NT, R>(acc, B, Y, WS, CNT, M, N, tile0, last);
}


// W4A8 with 4-bit weights (issue 20, target 3; session 37): the same packed weight (pack_int4_mma, the codes of a
// symmetric 4-bit grid, zero point 8, one float32 scale a row), int8 activations quantized per token by one pass
// before (act_quant.py), multiplied by mma.sync m16n8k32 s8 x s8 -> s32: half the MMAs of the fp16 path, and the
// unpack to int8 is two bit operations (and a shift) per 8 weights instead of the fp16 path's 12 instructions.
// The unpack: byte b of word s holds the codes of rows g (low nibble) and g + 8 (high nibble) at column
// k0 + (0, 2, 1, 3)[b] (the layout above), so (q & 0xf0f0f0f0) ^ 0x80808080 is 16 (code - 8) as four signed bytes
// of row g + 8, and the same of q << 4 those of row g: the m16n8k32 A registers a1 / a0 of that word's 4 columns,
// in the column order (0, 2, 1, 3). The B registers hold 4 consecutive k of one token (k = 4t .. 4t + 3 and
// 16 + 4t ..): one byte permutation (prmt 0x3120) of the token's 4 bytes at k0 .. k0 + 3 puts them in the
// weight's order. A thread's 16 input bytes of a 64-column tile (columns 16t .. 16t + 15) are one 16-byte
// shared-memory load; MMA step h takes words 2h (a0, a1; b0) and 2h + 1 (a2, a3; b1).
// The int32 sums are exact (|16 (code - 8)| <= 128, |x| <= 128: below 2^31 up to K = 131072); the epilogue
// scales each by its row's scale / 16 and its token's scale in float32 before the shared end (write_warp_rows).
__device__ __forceinline__ uint32_t and_xor(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;  // (a & b) ^ c in one instruction
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ void mma_s8(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// words 2h, 2h + 1 of a lane's tile -> the A registers of MMA step h: 16 (code - 8) as signed bytes
__device__ __forceinline__ void unpack_s8(uint32_t q0, uint32_t q1, uint32_t a[4]) {
  a[0] = and_xor(q0 << 4, 0xf0f0f0f0u, 0x80808080u);  // row g, the word's 4 columns
  a[1] = and_xor(q0, 0xf0f0f0f0u, 0x80808080u);       // row g + 8
  a[2] = and_xor(q1 << 4, 0xf0f0f0f0u, 0x80808080u);
  a[3] = and_xor(q1, 0xf0f0f0f0u, 0x80808080u);
}

// a token's 4 input bytes at columns k0 .. k0 + 3 in the weight's column order (0, 2, 1, 3)
__device__ __forceinline__ uint32_t weight_order(uint32_t x) { return __byte_perm(x, 0, 0x3120); }

constexpr int A8_XROW = 64;  // bytes a token row of a staged int8 slice (a quarter warp's 16-byte reads: 32 banks)
constexpr int A8_STAGES = 4;

// The "p" body for W4A8: X int8 [M, K] (row-major), XS float32 [M] (token scales), P the packed weight, WSC
// float32 [N] (row scales), B fp16 [N] or null, Y fp16 [M, N]; WS / CNT: the split-K workspace and tickets
template <int NT, int R>
__device__ __forceinline__ void w4a8_mmap_body(const int8_t* __restrict__ X, const float* __restrict__ XS,
                                               const uint4* __restrict__ P, const float* __restrict__ WSC,
                                               const __half* __restrict__ B, __half* __restrict__ Y,
                                               float* __restrict__ WS, int* __restrict__ CNT, int M, int N,
                                               int K) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles_n = N >> 4, chunks = K >> 6;
  const int tile0 = (blockIdx.x * warps + warp) * R;  // this warp's first row tile
  const int per = (chunks + gridDim.y - 1) / gridDim.y;
  const int c0 = min((int)blockIdx.y * per, chunks), c1 = min(c0 + per, chunks), tiles_k = c1 - c0;

  const int x_bytes = 8 * NT * A8_XROW, w_bytes = warps * R * 512, stage_bytes = x_bytes + w_bytes;
  {  // the launch's dynamic shared memory must hold the stages (w4a8_mma.py computes the same): else an error
    uint32_t have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < (uint32_t)(A8_STAGES * stage_bytes)) __trap();
  }
  auto xs = [&](int st) { return reinterpret_cast<int8_t*>(smem + st * stage_bytes); };
  auto wsm = [&](int st) { return reinterpret_cast<uint4*>(smem + st * stage_bytes + x_bytes); };

  // k-tile c's operands into stage st: the input pieces of the M tokens (16 B: 16 columns of a token; the rows
  // of tokens >= M are left as they are: their output columns are scaled by 0 and never written), from the last
  // thread down (the W4A16 "p" body's reason: no warp carries every copy before the k-tile's barrier), and this
  // warp's weight tiles
  const int x_pieces = 4 * min(M, 8 * NT);
  const uint4* wsrc[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    wsrc[r] = P + (size_t)(tile0 + r < tiles_n ? tile0 + r : 0) * chunks * 32 + lane;
  auto load = [&](int st, int c) {
    int8_t* x = xs(st);
    for (int i = blockDim.x - 1 - threadIdx.x; i < x_pieces; i += blockDim.x) {
      const int tok = i >> 2, piece = i & 3;
      cp_async16(x + tok * A8_XROW + piece * 16, X + (size_t)tok * K + (size_t)c * 64 + piece * 16, true);
    }
    uint4* w = wsm(st) + warp * R * 32;
#pragma unroll
    for (int r = 0; r < R; ++r) cp_async16(w + r * 32 + lane, wsrc[r] + (size_t)c * 32, tile0 + r < tiles_n);
  };

  int acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][j][i] = 0;

#pragma unroll
  for (int s = 0; s < A8_STAGES - 1; ++s) {
    if (s < tiles_k) load(s, c0 + s);
    cp_async_commit();  // (an empty group past the share: the counts below stay uniform)
  }
  for (int i = 0; i < tiles_k; ++i) {
    cp_async_wait<A8_STAGES - 2>();  // k-tile i is in (this thread's copies) ...
    __syncthreads();                 // ... and everyone's; everyone is done with the stage loaded next
    if (i + A8_STAGES - 1 < tiles_k) load((i + A8_STAGES - 1) % A8_STAGES, c0 + i + A8_STAGES - 1);
    cp_async_commit();
    const int st = i % A8_STAGES;
    const int8_t* x = xs(st);
    const uint4* w = wsm(st) + warp * R * 32;
    uint32_t a[R][2][4];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4 q = w[r * 32 + lane];
      unpack_s8(q.x, q.y, a[r][0]);
      unpack_s8(q.z, q.w, a[r][1]);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4 xv = *reinterpret_cast<const uint4*>(x + (8 * j + g) * A8_XROW + 16 * t);
      const uint32_t b0 = weight_order(xv.x), b1 = weight_order(xv.y), b2 = weight_order(xv.z),
                     b3 = weight_order(xv.w);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        mma_s8(acc[r][j], a[r][0], b0, b1);  // columns 16t + 0..7
        mma_s8(acc[r][j], a[r][1], b2, b3);  // 16t + 8..15
      }
    }
  }
  cp_async_wait<0>();

  float out[R][NT][4];  // C fragment: rows g / g + 8, tokens 8j + 2t, 8j + 2t + 1
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n0 = (tile0 + r) * 16 + g;
    const bool ok = tile0 + r < tiles_n;
    const float s0 = ok ? WSC[n0] * 0.0625f : 0.f, s1 = ok ? WSC[n0 + 8] * 0.0625f : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 8 * j + 2 * t + (i & 1);
        const float sx = m < M ? XS[m] : 0.f;
        out[r][j][i] = (float)acc[r][j][i] * (i >> 1 ? s1 : s0) * sx;
      }
  }
  write_warp_rows<NT, R>(out, B, Y, WS, CNT, M, N, tile0, last);
}

}  // namespace

// one exported kernel per (body, token tiles, row tiles, grid, LoRC): the names w4_mma.py launches, one signature
#define W4_KERNEL_B(PREFIX, BODY, NT, R, SYM, LORC, NAME, BOUNDS)                                                \
  extern "C" __global__ void BOUNDS PREFIX##_nt##NT##_r##R##_##NAME(                                              \
      const __half* X, const uint4* P, const __half* S, const __half* Z, const __half* B, __half* Y, float* WS,    \
      int* CNT, int M, int N, int K, int group_chunks, const __half* V, const __half* U, int rank, float* TW,     \
      int* TC) {                                                                                                   \
    BODY<NT, R, SYM, LORC>(X, P, S, Z, B, Y, WS, CNT, M, N, K, group_chunks, V, U, rank, TW, TC);                 \
  }
#define W4_KERNEL(PREFIX, BODY, NT, R, SYM, LORC, NAME) \
  W4_KERNEL_B(PREFIX, BODY, NT, R, SYM, LORC, NAME, __launch_bounds__(256))
#define W4_MMA(NT, R)                                                  \
  W4_KERNEL(w4_mma, w4_mma_body, NT, R, true, false, sym)              \
  W4_KERNEL(w4_mma, w4_mma_body, NT, R, false, false, asym)
#define W4_MMA_LORC(NT, R)                                             \
  W4_KERNEL(w4_mma, w4_mma_body, NT, R, true, true, sym_lorc)          \
  W4_KERNEL(w4_mma, w4_mma_body, NT, R, false, true, asym_lorc)
#define W4_MMAP(NT, R)                                                 \
  W4_KERNEL(w4_mmap, w4_mmap_body, NT, R, true, false, sym)            \
  W4_KERNEL(w4_mmap, w4_mmap_body, NT, R, false, false, asym)
// "p2": the same body, two blocks of 256 threads an SM (registers capped at 128; where "p" takes more)
#define W4_MMAP2(NT, R)                                                                         \
  W4_KERNEL_B(w4_mmap2, w4_mmap_body, NT, R, true, false, sym, __launch_bounds__(256, 2))     \
  W4_KERNEL_B(w4_mmap2, w4_mmap_body, NT, R, false, false, asym, __launch_bounds__(256, 2))
#define W4_MMAX(NT, R)                                                 \
  W4_KERNEL(w4_mmax, w4_mmax_body, NT, R, true, false, sym)            \
  W4_KERNEL(w4_mmax, w4_mmax_body, NT, R, false, false, asym)

W4_MMA(1, 1)
W4_MMA(1, 2)
W4_MMA(1, 4)
W4_MMA(2, 1)
W4_MMA(2, 2)
W4_MMA(2, 4)
W4_MMA(4, 1)
W4_MMA(4, 2)
W4_MMA(4, 4)
W4_MMA(8, 1)
W4_MMA(8, 2)
W4_MMA(8, 4)
W4_MMA(16, 1)  // (R = 2 spills at 255 registers)

// LoRC in the epilogue: the "k" body at 1..16 tokens (decoding); from 17 tokens on the wrapper adds (x V^T) U^T
W4_MMA_LORC(1, 1)
W4_MMA_LORC(1, 2)
W4_MMA_LORC(1, 4)
W4_MMA_LORC(2, 1)
W4_MMA_LORC(2, 2)
W4_MMA_LORC(2, 4)

// the pipelined body (cp.async, STAGES k-tiles ahead): tuned against the others at every token count
W4_MMAP(1, 1)
W4_MMAP(1, 2)
W4_MMAP(1, 4)
W4_MMAP(2, 1)
W4_MMAP(2, 2)
W4_MMAP(2, 4)
W4_MMAP(4, 1)
W4_MMAP(4, 2)
W4_MMAP(4, 4)
W4_MMAP(8, 1)
W4_MMAP(8, 2)
W4_MMAP(8, 4)
W4_MMAP(16, 1)
W4_MMAP(16, 2)
W4_MMAP2(8, 2)  // (H200, session 35: 6-10% off at 64 tokens on three of the five shapes, slower at 16)
W4_MMAP2(16, 1)

W4_MMAX(2, 1)
W4_MMAX(4, 1)
W4_MMAX(4, 2)
W4_MMAX(8, 1)
W4_MMAX(8, 2)
W4_MMAX(16, 1)

// The weight W [N, K] (fp16, row-major) from the same layout: one thread a lane of a tile, rows g and g + 8,
// 16 contiguous columns each (two 16-byte stores a row). For W4A16 at many tokens: unpack once, then cuBLAS.
extern "C" __global__ void __launch_bounds__(256) w4_mma_dequant(const uint4* P, const __half* S, const __half* Z,
                                                                 __half* W, int N, int K, int group_chunks) {
  const int chunks = K >> 6;
  const size_t lane_id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // over tiles x 32 lanes
  const size_t tile = lane_id >> 5;
  if (tile >= (size_t)(N >> 4) * chunks) return;
  const int lane = lane_id & 31, g = lane >> 2, t = lane & 3;
  const int tn = tile / chunks, c = tile % chunks, grp = c / group_chunks;
  const int r0 = tn * 16 + g, r1 = r0 + 8;
  const float s0 = __half2float(S[(size_t)grp * N + r0]), s1 = __half2float(S[(size_t)grp * N + r1]);
  const float z0 = Z ? __half2float(Z[(size_t)grp * N + r0]) : 8.f, z1 = Z ? __half2float(Z[(size_t)grp * N + r1]) : 8.f;
  const uint4 q4 = P[lane_id];
  const uint32_t words[4] = {q4.x, q4.y, q4.z, q4.w};
  __align__(16) __half out0[16], out1[16];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const uint32_t q = words[s];
    const int nib0[4] = {0, 4, 2, 6};  // row g, columns k0 + u
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      out0[4 * s + u] = __float2half_rn(((float)((q >> (4 * nib0[u])) & 15) - z0) * s0);
      out1[4 * s + u] = __float2half_rn(((float)((q >> (4 * (nib0[u] + 1))) & 15) - z1) * s1);
    }
  }
  uint4* w0 = reinterpret_cast<uint4*>(W + (size_t)r0 * K + (size_t)c * 64 + 16 * t);
  uint4* w1 = reinterpret_cast<uint4*>(W + (size_t)r1 * K + (size_t)c * 64 + 16 * t);
  w0[0] = reinterpret_cast<uint4*>(out0)[0];
  w0[1] = reinterpret_cast<uint4*>(out0)[1];
  w1[0] = reinterpret_cast<uint4*>(out1)[0];
  w1[1] = reinterpret_cast<uint4*>(out1)[1];
}

// W4A8 (above): the "p" body on int8 inputs, tuned per shape and token count (w4a8_mma.py)
#define W4A8_MMAP(NT, R)                                                                                         \
  extern "C" __global__ void __launch_bounds__(256) w4a8_mmap_nt##NT##_r##R(                                     \
      const int8_t* X, const float* XS, const uint4* P, const float* WSC, const __half* B, __half* Y, float* WS,  \
      int* CNT, int M, int N, int K) {                                                                           \
    w4a8_mmap_body<NT, R>(X, XS, P, WSC, B, Y, WS, CNT, M, N, K);                                                \
  }
W4A8_MMAP(1, 1)
W4A8_MMAP(1, 2)
W4A8_MMAP(1, 4)
W4A8_MMAP(2, 1)
W4A8_MMAP(2, 2)
W4A8_MMAP(2, 4)
W4A8_MMAP(4, 1)
W4A8_MMAP(4, 2)
W4A8_MMAP(4, 4)
W4A8_MMAP(8, 1)
W4A8_MMAP(8, 2)
W4A8_MMAP(8, 4)
W4A8_MMAP(16, 1)
W4A8_MMAP(16, 2)

// The int8 weight W8 [N, K] = code - 8 (row-major) from the same layout, for W4A8 at many tokens: unpack once,
// then torch._int_mm (one thread a lane of a tile, as w4_mma_dequant)
extern "C" __global__ void __launch_bounds__(256) w4a8_mma_unpack(const uint4* P, int8_t* W, int N, int K) {
  const int chunks = K >> 6;
  const size_t lane_id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t tile = lane_id >> 5;
  if (tile >= (size_t)(N >> 4) * chunks) return;
  const int lane = lane_id & 31, g = lane >> 2, t = lane & 3;
  const int tn = tile / chunks, c = tile % chunks;
  const uint4 q4 = P[lane_id];
  const uint32_t words[4] = {q4.x, q4.y, q4.z, q4.w};
  __align__(16) int8_t out0[16], out1[16];  // rows g, g + 8: 16 columns each
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int nib0[4] = {0, 4, 2, 6};  // row g, columns k0 + u
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      out0[4 * s + u] = (int8_t)((int)((words[s] >> (4 * nib0[u])) & 15) - 8);
      out1[4 * s + u] = (int8_t)((int)((words[s] >> (4 * (nib0[u] + 1))) & 15) - 8);
    }
  }
  *reinterpret_cast<uint4*>(W + (size_t)(tn * 16 + g) * K + (size_t)c * 64 + 16 * t) = *reinterpret_cast<uint4*>(out0);
  *reinterpret_cast<uint4*>(W + (size_t)(tn * 16 + g + 8) * K + (size_t)c * 64 + 16 * t) =
      *reinterpret_cast<uint4*>(out1);
}
