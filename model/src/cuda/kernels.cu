// Tandem's CUDA kernels: everything a forward pass does on the device
// besides the dense projections (cuBLAS). Compiled at run time by NVRTC;
// the tests also compile this file with a C++ compiler against `emu.h`,
// which runs each CUDA thread as a fiber on the CPU.
//
// Conventions:
// - every entry point is `extern "C"` and takes only pointers, `int`,
//   `long long` and `float`, so the host checks each launch's arguments
//   against the signatures parsed from this file;
// - the residual stream and every GEMM output are f32; GEMM inputs are
//   `bf16` or f32 as the weights are (`*_bf16` flags);
// - KV pools keep the CPU's block-major layout
//   `[block][layer][K=0 | V=1][kv_head][slot][head_dim]`, in f32, f16 or
//   bf16 (`kv_dtype` 0, 1, 2); element offsets are 64-bit;
// - no CUDA header is included: the half-precision conversions are our own.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define TANDEM_NEG_INF (__uint_as_float(0xff800000u))

// Dynamically sized shared memory (the emulator defines its own).
#ifndef DYNAMIC_SMEM
#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

// ---------------------------------------------------------------- numbers

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even, NaN kept a NaN (as the `half` crate does).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x3ffu;
    if (exp == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (man << 13));
    }
    if (exp == 0) {
        // Zero or subnormal: man * 2^-24.
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, as the `half` crate's `f16::from_f32`.
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 exp = (x >> 23) & 0xffu;
    u32 man = x & 0x7fffffu;
    if (exp == 0xffu) {
        return (u16)(sign | 0x7c00u | (man ? (0x200u | (man >> 13)) : 0u));
    }
    int e = (int)exp - 127 + 15;
    if (e >= 0x1f) {
        return (u16)(sign | 0x7c00u);
    }
    if (e <= 0) {
        if (14 - e > 24) {
            return (u16)sign;
        }
        man |= 0x800000u;
        u32 shift = (u32)(14 - e);
        u32 half_man = man >> shift;
        u32 round_bit = 1u << (shift - 1);
        if ((man & round_bit) && ((man & (3u * round_bit - 1u)) != 0u)) {
            half_man += 1;
        }
        return (u16)(sign | half_man);
    }
    u32 half_exp = (u32)e << 10;
    u32 half_man = man >> 13;
    u32 round_bit = 0x1000u;
    if ((man & round_bit) && ((man & (3u * round_bit - 1u)) != 0u)) {
        return (u16)((sign | half_exp | half_man) + 1u);
    }
    return (u16)(sign | half_exp | half_man);
}

// One element of a KV pool or weight table as f32.
__device__ __forceinline__ float load_elem(const void* p, int dtype, i64 i) {
    if (dtype == 0) {
        return ((const float*)p)[i];
    } else if (dtype == 1) {
        return f16_to_f32(((const u16*)p)[i]);
    }
    return bf16_to_f32(((const u16*)p)[i]);
}

__device__ __forceinline__ void store_elem(void* p, int dtype, i64 i, float v) {
    if (dtype == 0) {
        ((float*)p)[i] = v;
    } else if (dtype == 1) {
        ((u16*)p)[i] = f32_to_f16(v);
    } else {
        ((u16*)p)[i] = f32_to_bf16(v);
    }
}

// An activation written for the next GEMM: bf16 or f32.
__device__ __forceinline__ void store_act(void* p, int bf16, i64 i, float v) {
    if (bf16) {
        ((u16*)p)[i] = f32_to_bf16(v);
    } else {
        ((float*)p)[i] = v;
    }
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 33 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float s = lane < warps ? scratch[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) {
            scratch[32] = s;
        }
    }
    __syncthreads();
    return scratch[32];
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float s = lane < warps ? scratch[lane] : TANDEM_NEG_INF;
        s = warp_max(s);
        if (lane == 0) {
            scratch[32] = s;
        }
    }
    __syncthreads();
    return scratch[32];
}

// ---------------------------------------------------------------- embedding

// out[r, :] = table[ids[r], :] for r < rows. An id outside the vocabulary
// gives a zero row and raises `*bad` (the host checks ids before, so this
// only guards memory).
extern "C" __global__ void embed_rows(float* __restrict__ out, const void* __restrict__ table,
                                      int table_bf16, const int* __restrict__ ids, int rows,
                                      int hidden, int vocab, int* __restrict__ bad) {
    int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    int id = ids[r];
    bool ok = id >= 0 && id < vocab;
    if (!ok && threadIdx.x == 0) {
        *bad = 1;
    }
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float v = 0.0f;
        if (ok) {
            v = load_elem(table, table_bf16 ? 2 : 0, (i64)id * hidden + c);
        }
        out[(i64)r * hidden + c] = v;
    }
}

// ---------------------------------------------------------------- norms

// For each output row r: the source row is `row_idx[r]` (or r when
// `row_idx` is null). When `resid` is given, x[row] += resid[row] first
// (written back). Then out[r] = x[row] * w / sqrt(mean(x[row]^2) + eps),
// stored as bf16 or f32. One block per output row.
extern "C" __global__ void rms_norm(void* __restrict__ out, int out_bf16, float* __restrict__ x,
                                    const float* __restrict__ resid, const float* __restrict__ w,
                                    const int* __restrict__ row_idx, int rows, int cols, float eps) {
    __shared__ float scratch[33];
    int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    int src = row_idx ? row_idx[r] : r;
    float* xr = x + (i64)src * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = xr[c];
        if (resid) {
            v += resid[(i64)src * cols + c];
            xr[c] = v;
        }
        ss += v * v;
    }
    float total = block_sum(ss, scratch);
    float s = 1.0f / sqrtf(total / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        store_act(out, out_bf16, (i64)r * cols + c, xr[c] * (s * w[c]));
    }
}

// x += y over n elements.
extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ y, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 stride = (i64)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        x[i] += y[i];
    }
}

// ---------------------------------------------------------------- attention input

// After the QKV projection, for token `blockIdx.x`: adds the bias, applies
// the per-head Q/K norms (Qwen3) and RoPE at the token's position, writes
// Q to `q_out` ([tokens, n_q, hd], f32) and K, V into the token's slot of
// the paged pool. Each warp takes whole heads.
extern "C" __global__ void qkv_rope_store(
    float* __restrict__ q_out, const float* __restrict__ qkv, const float* __restrict__ bias,
    const float* __restrict__ q_norm, const float* __restrict__ k_norm,
    const float* __restrict__ inv_freq, const int* __restrict__ tok_pos,
    const int* __restrict__ tok_block, void* __restrict__ pool, int kv_dtype, int layer,
    int n_q, int n_kv, int hd, int block_size, i64 block_elems, int neox, float eps, int tokens) {
    __shared__ float head_buf[8][256];
    int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = blockDim.x >> 5;
    int width = (n_q + 2 * n_kv) * hd;
    int pos = tok_pos[t];
    i64 block = tok_block[t];
    int slot = pos % block_size;
    int half = hd / 2;
    float* buf = head_buf[warp];
    for (int head = warp; head < n_q + 2 * n_kv; head += warps) {
        const float* src = qkv + (i64)t * width + head * hd;
        bool is_q = head < n_q;
        bool is_k = !is_q && head < n_q + n_kv;
        for (int d = lane; d < hd; d += 32) {
            float v = src[d];
            if (bias) {
                v += bias[head * hd + d];
            }
            buf[d] = v;
        }
        __syncwarp();
        const float* norm = is_q ? q_norm : (is_k ? k_norm : (const float*)0);
        if (norm) {
            float ss = 0.0f;
            for (int d = lane; d < hd; d += 32) {
                ss += buf[d] * buf[d];
            }
            ss = warp_sum(ss);
            float s = 1.0f / sqrtf(ss / (float)hd + eps);
            __syncwarp();
            for (int d = lane; d < hd; d += 32) {
                buf[d] = buf[d] * (s * norm[d]);
            }
            __syncwarp();
        }
        if (is_q || is_k) {
            // Each lane rotates whole pairs, so reads and writes stay in its own pairs.
            for (int i = lane; i < half; i += 32) {
                int a = neox ? i : 2 * i;
                int b = neox ? i + half : 2 * i + 1;
                float sn, cs;
                sincosf((float)pos * inv_freq[i], &sn, &cs);
                float x0 = buf[a];
                float x1 = buf[b];
                buf[a] = x0 * cs - x1 * sn;
                buf[b] = x0 * sn + x1 * cs;
            }
            __syncwarp();
        }
        if (is_q) {
            for (int d = lane; d < hd; d += 32) {
                q_out[((i64)t * n_q + head) * hd + d] = buf[d];
            }
        } else {
            int kv = is_k ? 0 : 1;
            int kvh = is_k ? head - n_q : head - n_q - n_kv;
            i64 base = block * block_elems +
                       ((i64)((layer * 2 + kv) * n_kv + kvh) * block_size + slot) * hd;
            for (int d = lane; d < hd; d += 32) {
                store_elem(pool, kv_dtype, base + d, buf[d]);
            }
        }
        __syncwarp();
    }
}

// ---------------------------------------------------------------- decode attention

// Split-KV attention for sequences with one new token each. Block
// (part, kv head, seq) covers keys [part * part_size, ...) of that
// sequence's context for the `group` query heads of the KV head, and
// writes its unnormalised output and (max, sum) for `attn_decode_reduce`.
// Parts past a sequence's context do nothing.
#define DECODE_MAX_GROUP 16
#define DECODE_MAX_HD 256
#define DECODE_PART 256

extern "C" __global__ void attn_decode_part(
    float* __restrict__ part_acc, float* __restrict__ part_ml, const float* __restrict__ q,
    const void* __restrict__ pool, int kv_dtype, const int* __restrict__ seq_tok,
    const int* __restrict__ seq_ctx, const int* __restrict__ tables,
    const int* __restrict__ table_off, int layer, int n_q, int n_kv, int hd, int block_size,
    i64 block_elems, float scale, int max_parts) {
    __shared__ float qs[DECODE_MAX_GROUP * DECODE_MAX_HD];
    __shared__ float sc[DECODE_MAX_GROUP * DECODE_PART];
    __shared__ float stat[DECODE_MAX_GROUP * 2];
    int part = blockIdx.x;
    int kvh = blockIdx.y;
    int s = blockIdx.z;
    int ctx = seq_ctx[s];
    int k0 = part * DECODE_PART;
    if (k0 >= ctx) {
        return;
    }
    int nk = min(DECODE_PART, ctx - k0);
    int group = n_q / n_kv;
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = blockDim.x >> 5;
    const float* qrow = q + ((i64)seq_tok[s] * n_q + kvh * group) * hd;
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
        qs[i] = qrow[i] * scale;
    }
    __syncthreads();
    const int* table = tables + table_off[s];
    i64 head_off_k = (i64)((layer * 2 + 0) * n_kv + kvh) * block_size * hd;
    i64 head_off_v = (i64)((layer * 2 + 1) * n_kv + kvh) * block_size * hd;
    // Scores: a warp per key, lanes across the head dimension.
    for (int j = warp; j < nk; j += warps) {
        int kp = k0 + j;
        i64 base = (i64)table[kp / block_size] * block_elems + head_off_k +
                   (i64)(kp % block_size) * hd;
        float kreg[DECODE_MAX_HD / 32];
        int nd = 0;
        for (int d = lane; d < hd; d += 32) {
            kreg[nd++] = load_elem(pool, kv_dtype, base + d);
        }
        for (int g = 0; g < group; g++) {
            float acc = 0.0f;
            int i = 0;
            for (int d = lane; d < hd; d += 32) {
                acc += qs[g * hd + d] * kreg[i++];
            }
            acc = warp_sum(acc);
            if (lane == 0) {
                sc[g * DECODE_PART + j] = acc;
            }
        }
    }
    __syncthreads();
    // Softmax statistics per query head: a warp per head.
    for (int g = warp; g < group; g += warps) {
        float m = TANDEM_NEG_INF;
        for (int j = lane; j < nk; j += 32) {
            m = fmaxf(m, sc[g * DECODE_PART + j]);
        }
        m = warp_max(m);
        float l = 0.0f;
        for (int j = lane; j < nk; j += 32) {
            float p = expf(sc[g * DECODE_PART + j] - m);
            sc[g * DECODE_PART + j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) {
            stat[2 * g] = m;
            stat[2 * g + 1] = l;
        }
    }
    __syncthreads();
    // Weighted values: a thread per (query head, dimension).
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
        int g = i / hd;
        int d = i % hd;
        float acc = 0.0f;
        for (int j = 0; j < nk; j++) {
            int kp = k0 + j;
            i64 base = (i64)table[kp / block_size] * block_elems + head_off_v +
                       (i64)(kp % block_size) * hd;
            acc += sc[g * DECODE_PART + j] * load_elem(pool, kv_dtype, base + d);
        }
        i64 row = ((i64)s * n_q + kvh * group + g) * max_parts + part;
        part_acc[row * hd + d] = acc;
        if (d == 0) {
            part_ml[row * 2] = stat[2 * g];
            part_ml[row * 2 + 1] = stat[2 * g + 1];
        }
    }
}

// Combines the parts of `attn_decode_part`: block (query head, seq), a
// thread per dimension. Writes the sequence's token row of `out`
// ([tokens, n_q * hd], bf16 or f32).
extern "C" __global__ void attn_decode_reduce(void* __restrict__ out, int out_bf16,
                                              const float* __restrict__ part_acc,
                                              const float* __restrict__ part_ml,
                                              const int* __restrict__ seq_tok,
                                              const int* __restrict__ seq_ctx, int n_q, int hd,
                                              int max_parts) {
    int h = blockIdx.x;
    int s = blockIdx.y;
    int parts = (seq_ctx[s] + DECODE_PART - 1) / DECODE_PART;
    i64 row0 = ((i64)s * n_q + h) * max_parts;
    float m = TANDEM_NEG_INF;
    for (int p = 0; p < parts; p++) {
        m = fmaxf(m, part_ml[(row0 + p) * 2]);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float l = 0.0f;
        float acc = 0.0f;
        for (int p = 0; p < parts; p++) {
            float f = expf(part_ml[(row0 + p) * 2] - m);
            l += part_ml[(row0 + p) * 2 + 1] * f;
            acc += part_acc[(row0 + p) * hd + d] * f;
        }
        store_act(out, out_bf16, ((i64)seq_tok[s] * n_q + h) * hd + d, acc / l);
    }
}

// ---------------------------------------------------------------- prefill attention

// Causal attention for spans of several new tokens (prefill chunks) over
// their cached prefix and themselves, flash-style: block (query tile,
// query head, span) keeps PREFILL_BQ query rows, streams the keys in tiles
// of 32 through shared memory and keeps a running softmax per row, so no
// score matrix is ever materialised. A warp owns PREFILL_BQ / 8 rows; in a
// key tile, lane j scores key j.
#define PREFILL_BQ 64
#define PREFILL_BK 32

template <int HPL>
__device__ void attn_prefill_impl(void* __restrict__ out, int out_bf16, const float* __restrict__ q,
                                  const void* __restrict__ pool, int kv_dtype,
                                  const int* __restrict__ span_tok, const int* __restrict__ span_pos,
                                  const int* __restrict__ span_n, const int* __restrict__ tables,
                                  const int* __restrict__ table_off, int layer, int n_q, int n_kv,
                                  int hd, int block_size, i64 block_elems, float scale) {
    DYNAMIC_SMEM(float, smem);
    const int ROWS = PREFILL_BQ / 8;
    int tile = blockIdx.x;
    int h = blockIdx.y;
    int s = blockIdx.z;
    int n = span_n[s];
    int q0 = tile * PREFILL_BQ;
    if (q0 >= n) {
        return;
    }
    int pos = span_pos[s];
    int tok0 = span_tok[s];
    int group = n_q / n_kv;
    int kvh = h / group;
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int stride = hd + 1;
    float* qs = smem;                              // [BQ][hd]
    float* ks = qs + PREFILL_BQ * hd;              // [BK][hd + 1]
    float* vs = ks + PREFILL_BK * stride;          // [BK][hd + 1]
    int rows_here = min(PREFILL_BQ, n - q0);
    for (int i = threadIdx.x; i < PREFILL_BQ * hd; i += blockDim.x) {
        int r = i / hd;
        int d = i % hd;
        qs[i] = r < rows_here ? q[((i64)(tok0 + q0 + r) * n_q + h) * hd + d] * scale : 0.0f;
    }
    float m[ROWS];
    float l[ROWS];
    float acc[ROWS][HPL];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        m[r] = TANDEM_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < HPL; c++) {
            acc[r][c] = 0.0f;
        }
    }
    const int* table = tables + table_off[s];
    i64 head_off_k = (i64)((layer * 2 + 0) * n_kv + kvh) * block_size * hd;
    i64 head_off_v = (i64)((layer * 2 + 1) * n_kv + kvh) * block_size * hd;
    // The last row of this tile sees keys up to its own position.
    int keys = pos + q0 + rows_here;
    for (int k0 = 0; k0 < keys; k0 += PREFILL_BK) {
        __syncthreads();
        for (int i = threadIdx.x; i < PREFILL_BK * hd; i += blockDim.x) {
            int j = i / hd;
            int d = i % hd;
            int kp = k0 + j;
            float kv_k = 0.0f;
            float kv_v = 0.0f;
            if (kp < keys) {
                i64 b = (i64)table[kp / block_size] * block_elems + (i64)(kp % block_size) * hd + d;
                kv_k = load_elem(pool, kv_dtype, b + head_off_k);
                kv_v = load_elem(pool, kv_dtype, b + head_off_v);
            }
            ks[j * stride + d] = kv_k;
            vs[j * stride + d] = kv_v;
        }
        __syncthreads();
        // Fully unrolled, so each row's state stays in registers.
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            int row = warp * ROWS + r;
            int qp = pos + q0 + row;
            // Warp-uniform: every lane of the warp takes the same branch.
            if (row < rows_here && k0 <= qp) {
                int kp = k0 + lane;
                float sc = TANDEM_NEG_INF;
                if (kp <= qp) {
                    float a = 0.0f;
                    const float* qr = qs + row * hd;
                    const float* kr = ks + lane * stride;
                    for (int d = 0; d < hd; d++) {
                        a += qr[d] * kr[d];
                    }
                    sc = a;
                }
                float mt = warp_max(sc);
                float m_new = fmaxf(m[r], mt);
                float p = kp <= qp ? expf(sc - m_new) : 0.0f;
                float corr = expf(m[r] - m_new);
                l[r] = l[r] * corr + warp_sum(p);
                m[r] = m_new;
#pragma unroll
                for (int c = 0; c < HPL; c++) {
                    acc[r][c] *= corr;
                }
                int last = min(PREFILL_BK, qp - k0 + 1);
                for (int j = 0; j < last; j++) {
                    float pj = __shfl_sync(0xffffffffu, p, j);
                    const float* vr = vs + j * stride;
#pragma unroll
                    for (int c = 0; c < HPL; c++) {
                        int d = lane + 32 * c;
                        if (d < hd) {
                            acc[r][c] += pj * vr[d];
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        int row = warp * ROWS + r;
        if (row >= rows_here) {
            continue;
        }
        i64 o = ((i64)(tok0 + q0 + row) * n_q + h) * hd;
#pragma unroll
        for (int c = 0; c < HPL; c++) {
            int d = lane + 32 * c;
            if (d < hd) {
                store_act(out, out_bf16, o + d, acc[r][c] / l[r]);
            }
        }
    }
}

// Head dimensions up to 64.
extern "C" __global__ void attn_prefill_2(
    void* __restrict__ out, int out_bf16, const float* __restrict__ q, const void* __restrict__ pool,
    int kv_dtype, const int* __restrict__ span_tok, const int* __restrict__ span_pos,
    const int* __restrict__ span_n, const int* __restrict__ tables, const int* __restrict__ table_off,
    int layer, int n_q, int n_kv, int hd, int block_size, i64 block_elems, float scale) {
    attn_prefill_impl<2>(out, out_bf16, q, pool, kv_dtype, span_tok, span_pos, span_n, tables,
                           table_off, layer, n_q, n_kv, hd, block_size, block_elems, scale);
}

// Head dimensions up to 128.
extern "C" __global__ void attn_prefill_4(
    void* __restrict__ out, int out_bf16, const float* __restrict__ q, const void* __restrict__ pool,
    int kv_dtype, const int* __restrict__ span_tok, const int* __restrict__ span_pos,
    const int* __restrict__ span_n, const int* __restrict__ tables, const int* __restrict__ table_off,
    int layer, int n_q, int n_kv, int hd, int block_size, i64 block_elems, float scale) {
    attn_prefill_impl<4>(out, out_bf16, q, pool, kv_dtype, span_tok, span_pos, span_n, tables,
                           table_off, layer, n_q, n_kv, hd, block_size, block_elems, scale);
}

// Head dimensions up to 256.
extern "C" __global__ void attn_prefill_8(
    void* __restrict__ out, int out_bf16, const float* __restrict__ q, const void* __restrict__ pool,
    int kv_dtype, const int* __restrict__ span_tok, const int* __restrict__ span_pos,
    const int* __restrict__ span_n, const int* __restrict__ tables, const int* __restrict__ table_off,
    int layer, int n_q, int n_kv, int hd, int block_size, i64 block_elems, float scale) {
    attn_prefill_impl<8>(out, out_bf16, q, pool, kv_dtype, span_tok, span_pos, span_n, tables,
                           table_off, layer, n_q, n_kv, hd, block_size, block_elems, scale);
}

// ---------------------------------------------------------------- MLP

// out[t, i] = silu(gu[t, i]) * gu[t, inter + i], bf16 or f32.
extern "C" __global__ void silu_mul(void* __restrict__ out, int out_bf16,
                                    const float* __restrict__ gu, int tokens, int inter) {
    i64 n = (i64)tokens * inter;
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 stride = (i64)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        i64 t = i / inter;
        i64 c = i % inter;
        float g = gu[t * 2 * inter + c];
        float u = gu[t * 2 * inter + inter + c];
        store_act(out, out_bf16, i, g / (1.0f + expf(-g)) * u);
    }
}

// ---------------------------------------------------------------- tensor parallel

// out = sum of the `n_src` buffers at `srcs` (device addresses), added in
// that order so that every rank computes the same bits.
extern "C" __global__ void sum_buffers(float* __restrict__ out, const u64* __restrict__ srcs,
                                       int n_src, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 stride = (i64)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        float acc = 0.0f;
        for (int r = 0; r < n_src; r++) {
            acc += ((const float*)srcs[r])[i];
        }
        out[i] = acc;
    }
}

// ---------------------------------------------------------------- sampling
//
// The host sampler's algorithm without a sort. At temperature t the
// candidates are the tokens in descending order of z = logit / t (ties by
// ascending index), cut to the top k, then to the shortest prefix whose
// probability reaches top_p; the token is where the cumulative probability
// of that order passes u * (the kept mass). Each cut is a key (the float's
// bits mapped to an order-preserving integer) found by bisection, 32
// passes over the row, plus how many of that key's ties stay (ties keep
// their lowest indices, as the host's sort does).

__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Count and probability mass (exp(z - zmax)) of the tokens whose key is >= k.
__device__ void at_least(const float* __restrict__ lr, int vocab, float t, float zmax, u32 k,
                         int need_mass, float* scratch, float* count, float* mass) {
    float c = 0.0f;
    float w = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float z = lr[i] / t;
        if (order_key(z) >= k) {
            c += 1.0f;
            if (need_mass) {
                w += expf(z - zmax);
            }
        }
    }
    *count = block_sum(c, scratch);
    *mass = need_mass ? block_sum(w, scratch) : 0.0f;
}

// The largest key K >= lo whose count (by_mass = 0) or mass (1) of keys
// >= K is >= target (strict = 0) or > target (strict = 1). `lo` itself
// must qualify.
__device__ u32 search_key(const float* __restrict__ lr, int vocab, float t, float zmax, u32 lo,
                          int by_mass, int strict, float target, float* scratch) {
    u32 hi = 0xffffffffu;
    while (lo < hi) {
        u32 mid = lo + (u32)(((u64)hi - (u64)lo + 1ull) / 2ull);
        float c, w;
        at_least(lr, vocab, t, zmax, mid, by_mass, scratch, &c, &w);
        float got = by_mass ? w : c;
        bool ok = strict ? got > target : got >= target;
        if (ok) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Ties of one key: how many tokens have it, the mass of one, and the count
// and mass strictly above it.
struct Ties {
    float n;
    float each;
    float above_count;
    float above_mass;
};

__device__ Ties ties_at(const float* __restrict__ lr, int vocab, float t, float zmax, u32 key,
                        float* scratch) {
    float c_ge, w_ge;
    float c_gt = 0.0f;
    float w_gt = 0.0f;
    at_least(lr, vocab, t, zmax, key, 1, scratch, &c_ge, &w_ge);
    if (key != 0xffffffffu) {
        at_least(lr, vocab, t, zmax, key + 1, 1, scratch, &c_gt, &w_gt);
    }
    Ties r;
    r.n = c_ge - c_gt;
    r.each = r.n > 0.0f ? (w_ge - w_gt) / r.n : 0.0f;
    r.above_count = c_gt;
    r.above_mass = w_gt;
    return r;
}

// Exclusive prefix sum over the block; `scratch` holds 33 ints.
__device__ int block_exclusive_scan(int v, int* scratch) {
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    int incl = v;
    for (int o = 1; o < 32; o <<= 1) {
        int n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) {
            incl += n;
        }
    }
    __syncthreads();
    if (lane == 31) {
        scratch[warp] = incl;
    }
    __syncthreads();
    if (warp == 0) {
        int w = lane < warps ? scratch[lane] : 0;
        int wi = w;
        for (int o = 1; o < 32; o <<= 1) {
            int n = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) {
                wi += n;
            }
        }
        if (lane < warps) {
            scratch[lane] = wi - w;
        }
    }
    __syncthreads();
    return scratch[warp] + incl - v;
}

// The index of the `j`-th (0-based, ascending index) token whose key is
// `key`, or -1. Each thread scans a contiguous range, so thread order is
// index order.
__device__ int nth_with_key(const float* __restrict__ lr, int vocab, float t, u32 key, int j,
                            int* iscratch, int* found) {
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int start = threadIdx.x * per;
    int end = min(start + per, vocab);
    int c = 0;
    for (int i = start; i < end; i++) {
        c += order_key(lr[i] / t) == key;
    }
    if (threadIdx.x == 0) {
        *found = -1;
    }
    int before = block_exclusive_scan(c, iscratch);
    if (before <= j && j < before + c) {
        int seen = before;
        for (int i = start; i < end; i++) {
            if (order_key(lr[i] / t) == key) {
                if (seen == j) {
                    *found = i;
                    break;
                }
                seen++;
            }
        }
    }
    __syncthreads();
    return *found;
}

// One row of logits per block (1024 threads): chooses a token as the host
// sampler does (greedy at temperature 0) with the uniform draw `u[row]`
// made by the host's seeded generator, and its log-probability under the
// untempered distribution. Writes `token[row]` and `logprob[row]`.
extern "C" __global__ void __launch_bounds__(1024) sample_rows(int* __restrict__ token, float* __restrict__ logprob,
                                       const float* __restrict__ logits, int vocab,
                                       const float* __restrict__ temperature,
                                       const int* __restrict__ top_k,
                                       const float* __restrict__ top_p,
                                       const float* __restrict__ u) {
    __shared__ float scratch[33];
    __shared__ int iscratch[33];
    __shared__ int found;
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    int row = blockIdx.x;
    const float* lr = logits + (i64)row * vocab;
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int warps = (blockDim.x + 31) >> 5;
    // Untempered maximum (lowest index among equals) and log-sum-exp.
    float bv = TANDEM_NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = lr[i];
        if (v > bv || (v == bv && i < bi)) {
            bv = v;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < warps; w++) {
            if (best_v[w] > best_v[0] || (best_v[w] == best_v[0] && best_i[w] < best_i[0])) {
                best_v[0] = best_v[w];
                best_i[0] = best_i[w];
            }
        }
    }
    __syncthreads();
    float lmax = best_v[0];
    int chosen = best_i[0];
    float se = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        se += expf(lr[i] - lmax);
    }
    float lse = lmax + logf(block_sum(se, scratch));
    float t = temperature[row];
    if (t != 0.0f) {
        float zmax = lmax / t;
        int k = top_k[row];
        bool cut_k = k > 0 && k < vocab;
        // Top-k: the k-th largest key, and how many of its ties stay.
        u32 floor_key = 0;
        if (cut_k) {
            floor_key = search_key(lr, vocab, t, zmax, 0, 0, 0, (float)k, scratch);
        }
        Ties fl = ties_at(lr, vocab, t, zmax, floor_key, scratch);
        float floor_keep = cut_k ? (float)k - fl.above_count : fl.n;
        float total = fl.above_mass + floor_keep * fl.each;
        // Top-p: the shortest prefix whose mass reaches p * total.
        u32 cut_key = floor_key;
        float cut_keep = floor_keep;
        float kept = total;
        float p = top_p[row];
        if (p < 1.0f) {
            float target = p * total;
            cut_key = search_key(lr, vocab, t, zmax, floor_key, 1, 0, target, scratch);
            Ties ct = cut_key == floor_key ? fl : ties_at(lr, vocab, t, zmax, cut_key, scratch);
            float avail = cut_key == floor_key ? floor_keep : ct.n;
            float j = ct.each > 0.0f ? ceilf((target - ct.above_mass) / ct.each) : avail;
            cut_keep = fminf(fmaxf(j, 1.0f), avail);
            kept = ct.above_mass + cut_keep * ct.each;
        }
        // The draw: the key where the descending cumulative mass passes r.
        float r = u[row] * kept;
        u32 key = search_key(lr, vocab, t, zmax, cut_key, 1, 1, r, scratch);
        Ties kt = key == cut_key ? ties_at(lr, vocab, t, zmax, cut_key, scratch)
                                 : ties_at(lr, vocab, t, zmax, key, scratch);
        float avail = key == cut_key ? cut_keep : kt.n;
        float jf = kt.each > 0.0f ? floorf((r - kt.above_mass) / kt.each) : 0.0f;
        int j = (int)fminf(fmaxf(jf, 0.0f), avail - 1.0f);
        int idx = nth_with_key(lr, vocab, t, key, j, iscratch, &found);
        if (idx >= 0) {
            chosen = idx;
        }
    }
    if (threadIdx.x == 0) {
        token[row] = chosen;
        logprob[row] = lr[chosen] - lse;
    }
}
