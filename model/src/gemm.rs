//! A bounds-checked front to the `gemm` crate's f32 matrix product.

/// How a matrix is laid out in its slice: element `(i, j)` is at
/// `i * row_stride + j * col_stride`.
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub row: usize,
    pub col: usize,
}

impl Strides {
    pub const fn row_major(cols: usize) -> Strides {
        Strides { row: cols, col: 1 }
    }
    pub const fn col_major(rows: usize) -> Strides {
        Strides { row: 1, col: rows }
    }
    fn last(&self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.row + (cols - 1) * self.col
    }
}

/// `c[m×n] = a[m×k] · b[k×n]`, `c` row-major. `parallel` lets gemm split the
/// work over the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    sa: Strides,
    b: &[f32],
    sb: Strides,
    c: &mut [f32],
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    assert!(
        sa.last(m, k) < a.len(),
        "lhs of {m}x{k} does not fit its slice"
    );
    assert!(
        sb.last(k, n) < b.len(),
        "rhs of {k}x{n} does not fit its slice"
    );
    assert!(
        m * n <= c.len(),
        "destination of {m}x{n} does not fit its slice"
    );
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every element gemm reads or writes
    // inside the three slices; `c` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            sa.col as isize,
            sa.row as isize,
            b.as_ptr(),
            sb.col as isize,
            sb.row as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
