// The tensor cores' issue rate through mma.sync on this GPU (bench/bench_mma_peak.py): each warp runs ITERS
// rounds of CHAINS independent MMAs on register operands only (no memory traffic in the loop), so the time is
// the MMA pipe's throughput.  The W4A16 ("w4a16-mma") and W4A8 ("w4a8-mma") kernels issue exactly these two
// instructions; cuBLAS and Triton reach Hopper's full rate through wgmma, which they do not use.
#include <cstdint>

#define CHAINS 8

struct F16 {  // m16n8k16, fp16 operands, float32 sums (the W4A16 kernel's)
  using Acc = float;
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct S8 {  // m16n8k32, int8 operands, int32 sums (the W4A8 kernel's)
  using Acc = int;
  static __device__ __forceinline__ void mma(int c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <class Op>
__device__ __forceinline__ void peak(const uint32_t* seed, typename Op::Acc* out, int iters) {
  uint32_t a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = seed[(threadIdx.x + i) & 31];
  for (int i = 0; i < 2; ++i) b[i] = seed[(threadIdx.x + 4 + i) & 31];
  typename Op::Acc c[CHAINS][4] = {};
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < CHAINS; ++j) Op::mma(c[j], a, b);
  }
  typename Op::Acc s = 0;  // (the sums are written: the MMAs cannot be dropped)
  for (int j = 0; j < CHAINS; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

extern "C" __global__ void mma_f16_f32(const uint32_t* seed, float* out, int iters) { peak<F16>(seed, out, iters); }
extern "C" __global__ void mma_s8_s32(const uint32_t* seed, int* out, int iters) { peak<S8>(seed, out, iters); }
