//! Vector math for the engine's element-wise steps: softmax and SwiGLU's
//! gate, with an exponential sixteen values at a time where AVX-512 is
//! built in, the standard library's elsewhere.

/// `x` becomes softmax(x), in place.
pub(crate) fn softmax(x: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        // SAFETY: AVX-512F is enabled at compile time.
        unsafe { vexp::softmax(x) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    {
        let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

/// `out[i] = silu(g[i]) * u[i]` (SwiGLU's gate), where silu(x) = x / (1 + e^-x).
pub(crate) fn silu_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
    assert!(out.len() == g.len() && g.len() == u.len());
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        // SAFETY: AVX-512F is enabled at compile time; the slices have one length.
        unsafe { vexp::silu_mul(out, g, u) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    for ((a, g), u) in out.iter_mut().zip(g).zip(u) {
        *a = g / (1.0 + (-g).exp()) * u;
    }
}

/// Sixteen values at a time, with a vector exponential.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod vexp {
    use std::arch::x86_64::*;

    /// The lanes of values `i..len` (up to 16).
    #[inline(always)]
    fn tail(len: usize, i: usize) -> __mmask16 {
        let n = (len - i).min(16);
        if n == 16 {
            0xFFFF
        } else {
            (1u16 << n) - 1
        }
    }

    /// e^x within 2 ulp of the correctly rounded value from e^-87 up
    /// (infinity past f32's range); below e^-87, 0 (what f32 can hold of
    /// those values is subnormal, nothing beside a softmax's maximum term,
    /// which is 1, or beside the 1 in SiLU's denominator).
    #[inline(always)]
    pub unsafe fn exp(x: __m512) -> __m512 {
        let floor = _mm512_set1_ps(-87.0);
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, floor);
        let x = _mm512_max_ps(x, floor);
        // x = n ln2 + r with |r| <= ln2 / 2; ln2 split in two so n ln2 is
        // exact to well beyond f32's precision.
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        // e^r by its Taylor series to r^7 / 7! (error below 2^-24 for |r| <= ln2 / 2).
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
    }

    pub unsafe fn softmax(x: &mut [f32]) {
        let len = x.len();
        let ptr = x.as_mut_ptr();
        let mask = |i| tail(len, i);
        // SAFETY (every access): lanes at i.. are masked to the slice's length.
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..len).step_by(16) {
            let k = mask(i);
            m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, ptr.add(i)));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut sum = _mm512_setzero_ps();
        for i in (0..len).step_by(16) {
            let k = mask(i);
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, ptr.add(i)), max));
            _mm512_mask_storeu_ps(ptr.add(i), k, e);
            sum = _mm512_mask_add_ps(sum, k, sum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in (0..len).step_by(16) {
            let k = mask(i);
            let v = _mm512_maskz_loadu_ps(k, ptr.add(i));
            _mm512_mask_storeu_ps(ptr.add(i), k, _mm512_mul_ps(v, inv));
        }
    }

    pub unsafe fn silu_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
        let len = out.len();
        let one = _mm512_set1_ps(1.0);
        for i in (0..len).step_by(16) {
            let k = tail(len, i);
            // SAFETY: lanes at i.. are masked to the slices' common length.
            let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(i));
            let uv = _mm512_maskz_loadu_ps(k, u.as_ptr().add(i));
            let den = _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
            _mm512_mask_storeu_ps(
                out.as_mut_ptr().add(i),
                k,
                _mm512_mul_ps(_mm512_div_ps(gv, den), uv),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    #[test]
    fn vector_exp_is_within_two_ulp() {
        use std::arch::x86_64::*;
        let mut worst = 0u32;
        let mut x = 0f32;
        while x > -87.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x - i as f32 * 1.37e-3);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F is enabled at compile time; both arrays hold 16 values.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), vexp::exp(_mm512_loadu_ps(xs.as_ptr()))) };
            for (g, x) in got.iter().zip(xs) {
                let want = if x < -87.0 {
                    0.0
                } else {
                    (x as f64).exp() as f32
                };
                let ulp = g.to_bits().abs_diff(want.to_bits());
                assert!(ulp <= 2, "e^{x}: {g} against {want}");
                worst = worst.max(ulp);
            }
            x -= 0.0173;
        }
        assert!(worst <= 2, "{worst} ulp");
        let mut v = vec![-1000.0f32, 0.0, -3.0];
        softmax(&mut v);
        assert_eq!(v[0], 0.0);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn silu_matches_its_definition() {
        let g: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 1.7).collect();
        let u: Vec<f32> = (0..37).map(|i| 0.5 + i as f32 * 0.1).collect();
        let mut out = vec![0f32; 37];
        silu_mul(&mut out, &g, &u);
        for i in 0..37 {
            let want = (g[i] as f64 / (1.0 + (-(g[i] as f64)).exp()) * u[i] as f64) as f32;
            assert!(
                (out[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{} vs {want}",
                out[i]
            );
        }
    }
}
