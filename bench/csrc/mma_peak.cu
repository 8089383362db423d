// The tensor cores' issue rate through mma.sync on this GPU (bench/bench_mma_peak.py): each warp runs ITERS
// rounds of CHAINS independent MMAs on register operands only (no memory traffic in the loop), so the time is
// the MMA pipe's throughput.  The W4A16 ("w4a16-mma") and W4A8 ("w4a8-mma") kernels issue exactly these two
// instructions; cuBLAS and Triton reach Hopper's full rate through wgmma, which they do not use.
#include <cstdint>

#define CHAINS 8

extern "C" __global__ void mma_f16_f32(const uint32_t* seed, float* out, int iters) {
    uint32_t a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = seed[(threadIdx.x + i) & 31];
    for (int i = 0; i < 2; ++i) b[i] = seed[(threadIdx.x + 4 + i) & 31];
    float c[CHAINS][4] = {};
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int j = 0; j < CHAINS; ++j)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                         "{%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(c[j][0]), "+f"(c[j][1]), "+f"(c[j][2]), "+f"(c[j][3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    float s = 0.f;
    for (int j = 0; j < CHAINS; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

extern "C" __global__ void mma_s8_s32(const uint32_t* seed, int* out, int iters) {
    uint32_t a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = seed[(threadIdx.x + i) & 31];
    for (int i = 0; i < 2; ++i) b[i] = seed[(threadIdx.x + 4 + i) & 31];
    int c[CHAINS][4] = {};
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int j = 0; j < CHAINS; ++j)
            asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                         "{%8,%9}, {%0,%1,%2,%3};"
                         : "+r"(c[j][0]), "+r"(c[j][1]), "+r"(c[j][2]), "+r"(c[j][3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    int s = 0;
    for (int j = 0; j < CHAINS; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
