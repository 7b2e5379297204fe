// The emulator's runtime: a grid runs block after block on the calling OS
// thread; each CUDA thread of a block is a fiber that runs until it waits
// at a barrier or a warp shuffle, then the next one runs. A wait that no
// thread can ever leave (a barrier some threads skip) is reported as a
// deadlock instead of hanging. Fibers switch with a few instructions on
// x86-64 (ucontext elsewhere, whose switches are system calls).
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack
// pointer in *save, switches to the stack `to` and restores its registers.
extern "C" void tandem_emu_switch(void** save, void* to);
asm(R"(
.text
.globl tandem_emu_switch
.type tandem_emu_switch,@function
tandem_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size tandem_emu_switch, .-tandem_emu_switch
)");
#define TANDEM_FAST_SWITCH 1
#endif

namespace tandem_emu {

static const size_t STACK_BYTES = 256 * 1024;

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;
    emu_dim3 tid;
    int linear = 0;
    bool done = false;
    char* stack = nullptr;
};

struct Warp {
    unsigned gen = 0;
    int arrived = 0;
    int alive = 0;
    uint64_t slots[32];
    // What each lane asked for, read after the first barrier.
    int want[32];
    uint64_t got[32];
};

struct Block {
    emu_dim3 bidx, bdim, gdim;
    int nthreads = 0;
    int alive = 0;
    unsigned bar_gen = 0;
    int bar_arrived = 0;
    unsigned long progress = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<char> dyn;
    ucontext_t sched;
    void* sched_sp = nullptr;
    void (*kernel)(void**) = nullptr;
    void** args = nullptr;
};

static thread_local Block* g_block = nullptr;
static thread_local Fiber* g_fiber = nullptr;
static thread_local std::vector<char*> g_stacks;

const emu_dim3& thread_idx() { return g_fiber->tid; }
const emu_dim3& block_idx() { return g_block->bidx; }
const emu_dim3& block_dim() { return g_block->bdim; }
const emu_dim3& grid_dim() { return g_block->gdim; }
void* dyn_smem() { return g_block->dyn.data(); }
int lane() { return g_fiber->linear & 31; }

static void yield_to_scheduler() {
#ifdef TANDEM_FAST_SWITCH
    tandem_emu_switch(&g_fiber->sp, g_block->sched_sp);
#else
    swapcontext(&g_fiber->ctx, &g_block->sched);
#endif
}

void syncthreads() {
    Block* b = g_block;
    unsigned gen = b->bar_gen;
    b->bar_arrived++;
    b->progress++;
    if (b->bar_arrived == b->alive) {
        b->bar_arrived = 0;
        b->bar_gen++;
        return;
    }
    while (b->bar_gen == gen) {
        yield_to_scheduler();
    }
}

static void warp_barrier() {
    Warp& w = g_block->warps[g_fiber->linear >> 5];
    unsigned gen = w.gen;
    w.arrived++;
    g_block->progress++;
    if (w.arrived == w.alive) {
        w.arrived = 0;
        w.gen++;
        return;
    }
    while (w.gen == gen) {
        yield_to_scheduler();
    }
}

void syncwarp() { warp_barrier(); }

uint64_t warp_exchange(uint64_t v, int src) {
    Warp& w = g_block->warps[g_fiber->linear >> 5];
    int l = lane();
    w.slots[l] = v;
    warp_barrier();
    uint64_t r = w.slots[src & 31];
    warp_barrier();
    return r;
}

static void fiber_main() {
    g_block->kernel(g_block->args);
    Block* b = g_block;
    Fiber* f = g_fiber;
    f->done = true;
    b->alive--;
    b->progress++;
    // Exited threads no longer count at barriers (as on Volta and later).
    Warp& w = b->warps[f->linear >> 5];
    w.alive--;
    if (w.arrived > 0 && w.arrived == w.alive) {
        w.arrived = 0;
        w.gen++;
    }
    if (b->bar_arrived > 0 && b->bar_arrived == b->alive) {
        b->bar_arrived = 0;
        b->bar_gen++;
    }
}

#ifdef TANDEM_FAST_SWITCH
// A fiber's first frame: runs the kernel, then hands control back for good.
static void fiber_entry() {
    fiber_main();
    yield_to_scheduler();
    __builtin_trap();  // a finished fiber is never resumed
}
#endif

static char* stack_for(size_t i) {
    while (g_stacks.size() <= i) {
        void* p = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            return nullptr;
        }
        g_stacks.push_back((char*)p);
    }
    return g_stacks[i];
}

static int run_block(Block& b, std::string& err) {
    b.alive = b.nthreads;
    b.bar_gen = 0;
    b.bar_arrived = 0;
    b.progress = 0;
    for (size_t wi = 0; wi < b.warps.size(); wi++) {
        Warp& w = b.warps[wi];
        w.gen = 0;
        w.arrived = 0;
        w.alive = std::min(32, b.nthreads - (int)wi * 32);
    }
    for (int i = 0; i < b.nthreads; i++) {
        Fiber& f = b.fibers[i];
        f.linear = i;
        f.tid.x = i % b.bdim.x;
        f.tid.y = (i / b.bdim.x) % b.bdim.y;
        f.tid.z = i / (b.bdim.x * b.bdim.y);
        f.done = false;
        f.stack = stack_for(i);
        if (!f.stack) {
            err = "cannot map a fiber stack";
            return 1;
        }
#ifdef TANDEM_FAST_SWITCH
        // The entry address sits 16-byte aligned, so that after `ret` the
        // stack is aligned as a call would leave it; below it the six
        // registers tandem_emu_switch pops.
        uintptr_t top = ((uintptr_t)f.stack + STACK_BYTES) & ~(uintptr_t)15;
        void** slot = (void**)(top - 16);
        *slot = (void*)&fiber_entry;
        for (int r = 1; r <= 6; r++) {
            slot[-r] = nullptr;
        }
        f.sp = (void*)(slot - 6);
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &b.sched;
        makecontext(&f.ctx, fiber_main, 0);
#endif
    }
    while (b.alive > 0) {
        unsigned long before = b.progress;
        for (int i = 0; i < b.nthreads; i++) {
            Fiber& f = b.fibers[i];
            if (f.done) {
                continue;
            }
            g_fiber = &f;
#ifdef TANDEM_FAST_SWITCH
            tandem_emu_switch(&b.sched_sp, f.sp);
#else
            swapcontext(&b.sched, &f.ctx);
#endif
            g_fiber = nullptr;
        }
        if (b.alive > 0 && b.progress == before) {
            char buf[200];
            snprintf(buf, sizeof buf,
                     "deadlock in block (%u,%u,%u): %d of %d threads wait at a barrier or shuffle "
                     "that the others never reach",
                     b.bidx.x, b.bidx.y, b.bidx.z, b.alive, b.nthreads);
            err = buf;
            return 1;
        }
    }
    return 0;
}

}  // namespace tandem_emu

using namespace tandem_emu;

// Runs `kernel` over a grid; returns 0, or 1 with a message in `err`.
extern "C" int tandem_emu_run(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                              unsigned bz, unsigned smem, void (*kernel)(void**), void** args,
                              char* err, int err_len) {
    std::string e;
    int threads = (int)(bx * by * bz);
    if (threads <= 0 || threads > 1024) {
        e = "a block has between 1 and 1024 threads";
    } else if (smem > 227 * 1024) {
        e = "more dynamic shared memory than a block can have";
    } else {
        Block b;
        b.bdim = {bx, by, bz};
        b.gdim = {gx, gy, gz};
        b.nthreads = threads;
        b.fibers.resize(threads);
        b.warps.resize((threads + 31) / 32);
        b.dyn.assign(smem + 16, 0);
        b.kernel = kernel;
        b.args = args;
        Block* saved = g_block;
        g_block = &b;
        for (unsigned z = 0; z < gz && e.empty(); z++) {
            for (unsigned y = 0; y < gy && e.empty(); y++) {
                for (unsigned x = 0; x < gx && e.empty(); x++) {
                    b.bidx = {x, y, z};
                    // Shared memory starts each block with garbage on a GPU;
                    // a recognisable pattern makes reads before writes show.
                    std::fill(b.dyn.begin(), b.dyn.end(), (char)0x7f);
                    if (run_block(b, e) != 0) {
                        break;
                    }
                }
            }
        }
        g_block = saved;
    }
    if (e.empty()) {
        return 0;
    }
    snprintf(err, (size_t)err_len, "%s", e.c_str());
    return 1;
}
