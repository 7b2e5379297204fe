//! Copies into another process's memory with non-temporal stores.
//!
//! A stage writing KV into a decode rank's pool through a shared segment
//! does not read those bytes again, and the decode side reads them from its
//! own cache hierarchy; ordinary stores would first read each destination
//! line into the writer's cache and then evict the stage's own working set.
//! Streaming stores write whole lines straight to memory, as glibc's
//! `memcpy` does for copies above its non-temporal threshold (measured by
//! `tandem bench kv`: it is how `ucx_perftest`'s large puts run).

/// Copies `src` to `dst` with streaming stores where the platform has them.
/// Call [`fence`] before anyone else may read what was written.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes and not overlap `src`.
pub unsafe fn copy(dst: *mut u8, src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        x86::copy(dst, src)
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: forwarded from the caller.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len())
    }
}

/// Orders the streaming stores before whatever follows (a notice that the
/// bytes are there).
pub fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no operands; SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};

    /// Below this a streaming copy is not worth its fence.
    const SMALL: usize = 4096;

    pub(super) unsafe fn copy(dst: *mut u8, src: &[u8]) {
        let n = src.len();
        if n < SMALL {
            // SAFETY: forwarded from the caller.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
            return;
        }
        // Ordinary copy up to the first 16-byte boundary of `dst`.
        let head = (16 - (dst as usize % 16)) % 16;
        // SAFETY: `head < 16 <= n`, inside both buffers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head) };
        let mut off = head;
        // 64 bytes (a cache line) per step: four aligned streaming stores.
        while off + 64 <= n {
            // SAFETY: `off + 64 <= n`: the loads read inside `src`, the
            // stores write inside `dst`, 16-byte aligned from `head` on.
            unsafe {
                let s = src.as_ptr().add(off) as *const __m128i;
                let d = dst.add(off) as *mut __m128i;
                let a = _mm_loadu_si128(s);
                let b = _mm_loadu_si128(s.add(1));
                let c = _mm_loadu_si128(s.add(2));
                let e = _mm_loadu_si128(s.add(3));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            off += 64;
        }
        // SAFETY: the rest, inside both buffers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(off), dst.add(off), n - off) };
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// Any length at any alignment of either side copies exactly and
        /// touches nothing around the destination range.
        #[test]
        fn copies_exactly_what_it_is_given(
            len in 0usize..20_000,
            src_off in 0usize..64,
            dst_off in 0usize..64,
            seed in any::<u8>(),
        ) {
            let src: Vec<u8> = (0..len + 64).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let mut dst = vec![0xEEu8; len + 128];
            let s = &src[src_off..src_off + len];
            // SAFETY: `dst` has room for `len` bytes from `dst_off`.
            unsafe { super::copy(dst.as_mut_ptr().add(dst_off), s) };
            super::fence();
            prop_assert_eq!(&dst[dst_off..dst_off + len], s);
            prop_assert!(dst[..dst_off].iter().all(|&b| b == 0xEE));
            prop_assert!(dst[dst_off + len..].iter().all(|&b| b == 0xEE));
        }
    }
}
