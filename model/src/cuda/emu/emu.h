// Runs Tandem's CUDA kernels on the CPU for the tests: included before
// `kernels.cu` by a C++ compiler, it maps CUDA's built-ins onto a fiber per
// CUDA thread (emu.cpp). Blocks run one after another on the calling OS
// thread; the threads of a block switch only at barriers and warp
// shuffles, so `__shared__` memory is a thread-local static.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

#define TANDEM_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local
#define DYNAMIC_SMEM(T, name) T* name = (T*)tandem_emu::dyn_smem()

using std::max;
using std::min;

struct emu_dim3 {
    unsigned x, y, z;
};

namespace tandem_emu {
const emu_dim3& thread_idx();
const emu_dim3& block_idx();
const emu_dim3& block_dim();
const emu_dim3& grid_dim();
void* dyn_smem();
void syncthreads();
void syncwarp();
// Every lane of the calling thread's warp offers `v`; returns the value
// lane `src(lane)` offered.
uint64_t warp_exchange(uint64_t v, int src);
int lane();
}  // namespace tandem_emu

#define threadIdx (tandem_emu::thread_idx())
#define blockIdx (tandem_emu::block_idx())
#define blockDim (tandem_emu::block_dim())
#define gridDim (tandem_emu::grid_dim())

inline void __syncthreads() { tandem_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { tandem_emu::syncwarp(); }

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline float __uint_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned v;
    std::memcpy(&v, &f, 4);
    return v;
}
inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, 4);
    return v;
}

template <class T>
inline T emu_exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    uint64_t got = tandem_emu::warp_exchange(bits, src);
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = tandem_emu::lane();
    int src = lane ^ mask;
    if (src / width != lane / width) {
        src = lane;
    }
    return emu_exchange(v, src);
}

template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
    int lane = tandem_emu::lane();
    return emu_exchange(v, (lane / width) * width + (src_lane % width));
}

template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = tandem_emu::lane();
    int src = lane - (int)delta;
    if (src < (lane / width) * width) {
        src = lane;
    }
    return emu_exchange(v, src);
}

template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = tandem_emu::lane();
    int src = lane + (int)delta;
    if (src >= (lane / width + 1) * width) {
        src = lane;
    }
    return emu_exchange(v, src);
}
