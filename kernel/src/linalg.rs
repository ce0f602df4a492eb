//! Dense linear algebra on small matrices, for strategy scripts: products,
//! transposes, the thin QR decomposition and the truncated SVD.
//!
//! Federated LoRA algorithms work on the factors of each module's update
//! (FlexLoRA redistributes `Σ wᵢ BᵢAᵢ` by SVD, HetLoRA truncates ranks), so
//! these run on matrices of a few thousand elements per side at most, in
//! `f64`, row-major. The kernel links no BLAS; the decompositions are the
//! textbook ones (Householder QR, one-sided Jacobi SVD), accurate to a few
//! ulps of `f64` and more than fast enough for a module's factors. Apply the
//! SVD to a product of low-rank factors through QR first (see
//! `scripts/aggregators/flexlora.rhai`): the SVD of `B·A` is the SVD of the
//! small `R_B·R_Aᵀ`.

/// A row-major `rows × cols` matrix in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values, row by row.
    pub data: Vec<f64>,
}

impl Matrix {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The `n × n` identity.
    pub fn eye(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A matrix of `data` (row-major); `None` if the length does not fit.
    pub fn from_rows(rows: usize, cols: usize, data: Vec<f64>) -> Option<Self> {
        (rows.checked_mul(cols)? == data.len()).then_some(Self { rows, cols, data })
    }

    /// Element `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.cols + j] = v;
    }

    /// The transpose.
    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.set(j, i, self.at(i, j));
            }
        }
        t
    }

    /// `self · other`, or `None` when the inner dimensions differ.
    pub fn matmul(&self, other: &Self) -> Option<Self> {
        if self.cols != other.rows {
            return None;
        }
        let mut out = Self::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            let row = &self.data[i * self.cols..(i + 1) * self.cols];
            let dst = &mut out.data[i * other.cols..(i + 1) * other.cols];
            for (k, &a) in row.iter().enumerate() {
                if a == 0.0 {
                    continue;
                }
                let src = &other.data[k * other.cols..(k + 1) * other.cols];
                for (d, &b) in dst.iter_mut().zip(src) {
                    *d += a * b;
                }
            }
        }
        Some(out)
    }

    /// Columns `start..end`.
    pub fn columns(&self, start: usize, end: usize) -> Self {
        let mut out = Self::zeros(self.rows, end - start);
        for i in 0..self.rows {
            for j in start..end {
                out.set(i, j - start, self.at(i, j));
            }
        }
        out
    }

    /// Rows `start..end`.
    pub fn row_range(&self, start: usize, end: usize) -> Self {
        Self {
            rows: end - start,
            cols: self.cols,
            data: self.data[start * self.cols..end * self.cols].to_vec(),
        }
    }
}

/// The thin QR decomposition `A = Q·R` by Householder reflections: with
/// `k = min(rows, cols)`, `Q` is `rows × k` with orthonormal columns and `R`
/// is `k × cols`, upper triangular.
pub fn qr(a: &Matrix) -> (Matrix, Matrix) {
    let (m, n) = (a.rows, a.cols);
    let k = m.min(n);
    let mut r = a.clone();
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        // The reflector that zeroes column j below the diagonal.
        let mut v: Vec<f64> = (j..m).map(|i| r.at(i, j)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            reflectors.push(Vec::new());
            continue;
        }
        let alpha = if v[0] >= 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vnorm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if vnorm == 0.0 {
            reflectors.push(Vec::new());
            continue;
        }
        v.iter_mut().for_each(|x| *x /= vnorm);
        // R ← (I − 2vvᵀ) R on rows j.., columns j..
        for c in j..n {
            let dot: f64 = (j..m).map(|i| v[i - j] * r.at(i, c)).sum();
            for i in j..m {
                let value = r.at(i, c) - 2.0 * v[i - j] * dot;
                r.set(i, c, value);
            }
        }
        reflectors.push(v);
    }
    // Q = H₀ H₁ … H_{k−1} applied to the first k columns of the identity.
    let mut q = Matrix::zeros(m, k);
    for i in 0..k {
        q.set(i, i, 1.0);
    }
    for (j, v) in reflectors.iter().enumerate().rev() {
        if v.is_empty() {
            continue;
        }
        for c in 0..k {
            let dot: f64 = (j..m).map(|i| v[i - j] * q.at(i, c)).sum();
            for i in j..m {
                let value = q.at(i, c) - 2.0 * v[i - j] * dot;
                q.set(i, c, value);
            }
        }
    }
    let mut r_thin = r.row_range(0, k);
    // Exact zeros below the diagonal (rounding leaves tiny values there).
    for i in 0..k {
        for j in 0..i.min(n) {
            r_thin.set(i, j, 0.0);
        }
    }
    (q, r_thin)
}

/// A truncated singular value decomposition: `A ≈ U · diag(s) · Vᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    /// `rows × r`, orthonormal columns (for nonzero singular values).
    pub u: Matrix,
    /// The `r` largest singular values, descending.
    pub s: Vec<f64>,
    /// `cols × r`, orthonormal columns (for nonzero singular values).
    pub v: Matrix,
}

/// The SVD of `a` truncated to its `rank` largest singular values (all of
/// them when `rank` ≥ min(rows, cols)): the best rank-`rank` approximation
/// of `a` in the Frobenius and spectral norms (Eckart–Young). One-sided
/// Jacobi rotations (Hestenes), swept until every pair of columns is
/// orthogonal to working precision.
pub fn svd(a: &Matrix, rank: usize) -> Svd {
    if a.rows < a.cols {
        // Decompose the transpose, whose columns are fewer, and swap.
        let t = svd(&a.transpose(), rank);
        return Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        };
    }
    let (m, n) = (a.rows, a.cols);
    // Columns as contiguous vectors: W = A·V converges to U·diag(s).
    let mut w: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| a.at(i, j)).collect())
        .collect();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..n).map(|i| f64::from(u8::from(i == j))).collect())
        .collect();
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    let rotate = |cols: &mut [Vec<f64>], p: usize, q: usize, c: f64, s: f64| {
        let (left, right) = cols.split_at_mut(q);
        for (x, y) in left[p].iter_mut().zip(right[0].iter_mut()) {
            let (xp, yq) = (*x, *y);
            *x = c * xp - s * yq;
            *y = s * xp + c * yq;
        }
    };
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha = dot(&w[p], &w[p]);
                let beta = dot(&w[q], &w[q]);
                let gamma = dot(&w[p], &w[q]);
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut w, p, q, c, s);
                rotate(&mut v, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = w
        .iter()
        .enumerate()
        .map(|(j, col)| (dot(col, col).sqrt(), j))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let r = rank.min(n);
    let mut u = Matrix::zeros(m, r);
    let mut vt = Matrix::zeros(n, r);
    let mut s = Vec::with_capacity(r);
    for (k, &(sigma, j)) in order.iter().take(r).enumerate() {
        s.push(sigma);
        for (i, &x) in w[j].iter().enumerate() {
            u.set(i, k, if sigma > 0.0 { x / sigma } else { 0.0 });
        }
        for (i, &x) in v[j].iter().enumerate() {
            vt.set(i, k, x);
        }
    }
    Svd { u, s, v: vt }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Matrix::from_rows(rows, cols, data).unwrap()
    }

    fn close(a: &Matrix, b: &Matrix, tol: f64) -> bool {
        a.rows == b.rows
            && a.cols == b.cols
            && a.data
                .iter()
                .zip(&b.data)
                .all(|(x, y)| (x - y).abs() <= tol)
    }

    fn diag(s: &[f64]) -> Matrix {
        let mut d = Matrix::zeros(s.len(), s.len());
        for (i, &x) in s.iter().enumerate() {
            d.set(i, i, x);
        }
        d
    }

    fn orthonormal_columns(q: &Matrix) -> bool {
        close(
            &q.transpose().matmul(q).unwrap(),
            &Matrix::eye(q.cols),
            1e-12,
        )
    }

    #[test]
    fn products_and_transposes_match_hand_computation() {
        let a = Matrix::from_rows(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = Matrix::from_rows(3, 2, vec![7.0, 8.0, 9.0, 10.0, 11.0, 12.0]).unwrap();
        assert_eq!(a.matmul(&b).unwrap().data, [58.0, 64.0, 139.0, 154.0]);
        assert_eq!(a.transpose().data, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert!(a.matmul(&a).is_none());
        assert_eq!(a.columns(1, 3).data, [2.0, 3.0, 5.0, 6.0]);
    }

    #[test]
    fn qr_of_a_hand_example() {
        // [[3, 1], [4, 2]]: the first column has norm 5, so R₀₀ = ±5 and
        // |R₀₁| = (3·1 + 4·2)/5 = 2.2, |R₁₁| = |det| / 5 = 0.4.
        let a = Matrix::from_rows(2, 2, vec![3.0, 1.0, 4.0, 2.0]).unwrap();
        let (q, r) = qr(&a);
        assert!((r.at(0, 0).abs() - 5.0).abs() < 1e-12);
        assert!((r.at(0, 1).abs() - 2.2).abs() < 1e-12);
        assert!((r.at(1, 1).abs() - 0.4).abs() < 1e-12);
        assert_eq!(r.at(1, 0), 0.0);
        assert!(close(&q.matmul(&r).unwrap(), &a, 1e-12));
    }

    #[test]
    fn qr_reconstructs_tall_and_wide_matrices_with_orthonormal_q() {
        for (m, n, seed) in [(7, 3, 1), (3, 7, 2), (5, 5, 3), (1, 4, 4)] {
            let a = random(m, n, seed);
            let (q, r) = qr(&a);
            assert_eq!((q.rows, q.cols, r.rows, r.cols), (m, m.min(n), m.min(n), n));
            assert!(orthonormal_columns(&q), "{m}×{n}");
            assert!(close(&q.matmul(&r).unwrap(), &a, 1e-12), "{m}×{n}");
            for i in 0..r.rows {
                for j in 0..i.min(r.cols) {
                    assert_eq!(r.at(i, j), 0.0);
                }
            }
        }
    }

    #[test]
    fn svd_of_a_hand_example() {
        // [[3, 0], [4, 5]]: AᵀA = [[25, 20], [20, 25]], eigenvalues 45 and 5.
        let a = Matrix::from_rows(2, 2, vec![3.0, 0.0, 4.0, 5.0]).unwrap();
        let d = svd(&a, 2);
        assert!((d.s[0] - 45f64.sqrt()).abs() < 1e-12, "{:?}", d.s);
        assert!((d.s[1] - 5f64.sqrt()).abs() < 1e-12, "{:?}", d.s);
        let back =
            d.u.matmul(&diag(&d.s))
                .unwrap()
                .matmul(&d.v.transpose())
                .unwrap();
        assert!(close(&back, &a, 1e-12));
    }

    #[test]
    fn svd_reconstructs_and_truncation_is_the_best_low_rank_approximation() {
        for (m, n, seed) in [(9, 4, 5), (4, 9, 6), (6, 6, 7)] {
            let a = random(m, n, seed);
            let full = svd(&a, usize::MAX);
            assert!(orthonormal_columns(&full.u) && orthonormal_columns(&full.v));
            assert!(full.s.windows(2).all(|w| w[0] >= w[1]));
            let back = full
                .u
                .matmul(&diag(&full.s))
                .unwrap()
                .matmul(&full.v.transpose())
                .unwrap();
            assert!(close(&back, &a, 1e-12), "{m}×{n}");
            // Eckart–Young: the rank-2 truncation's error is √(Σ_{i>2} sᵢ²).
            let t = svd(&a, 2);
            let approx =
                t.u.matmul(&diag(&t.s))
                    .unwrap()
                    .matmul(&t.v.transpose())
                    .unwrap();
            let err: f64 = approx
                .data
                .iter()
                .zip(&a.data)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>()
                .sqrt();
            let want = full.s[2..].iter().map(|s| s * s).sum::<f64>().sqrt();
            assert!((err - want).abs() < 1e-10, "{err} vs {want}");
        }
    }

    #[test]
    fn svd_of_a_low_rank_matrix_has_zero_tail() {
        // A rank-2 matrix of 6×5: two nonzero singular values.
        let b = random(6, 2, 8);
        let c = random(2, 5, 9);
        let a = b.matmul(&c).unwrap();
        let d = svd(&a, 5);
        assert!(d.s[1] > 1e-3 && d.s[2] < 1e-12, "{:?}", d.s);
    }
}
