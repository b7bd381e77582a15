// Per-row pieces of the output-error table refit (python/any4/refit.py, SPEC §2): one pass over
// each row's codes assembles its small normal-equation system, so that no [rows, L, K] one-hot
// matrix is ever formed.
//
// Row n's unknowns are theta = (lut[L], and with `zero` its group zeros [G]), G = ceil(K / group_size);
// its design matrix A [K, P], P = L + (zero ? G : 0), has A[k, codes[k]] = scale[k / group_size] and
// A[k, L + k / group_size] = 1. With H ~= diag(d) + U U^T (U [K, r]):
//   M    [P, P] = A^T (diag(d) + U U^T) A      (the refit's preconditioner)
//   grad [P]    = A^T hr                       (hr = H r of the row's residual: the exact gradient)
//   curv [P]    = A^T diag(diag_h) A's diagonal (the k-means curvature, for the ridge)
// all accumulated in double. Runs on the CPU thread pool (rows in parallel).
#pragma once

#include <cstdint>

namespace any4 {

// codes uint8 [n, K] (< L), scales float [n, ceil(K/group_size), 2] (scale, zero), hr float [n, K], U float
// [K, r], d and diag_h float [K]; outputs M [n, P, P], grad [n, P], curv [n, P] (double, row-major). Throws
// std::invalid_argument for bad sizes or a code >= L.
void refit_normal_rows(const uint8_t* codes, const float* scales, const float* hr, int64_t n, int64_t K,
                       int L, int64_t group_size, bool zero, const float* U, int r, const float* d,
                       const float* diag_h, double* M, double* grad, double* curv);

// The round's default step for every row: x [n, P] = -(M + diag(ridge))^{-1} grad with (M, grad,
// curv) as above and ridge = damp * curv + 1e-9 * mean(curv[:L]) + 1e-300, by a Cholesky
// factorisation in double (x = 0 for a row whose matrix is not positive definite in floating
// point). Same arguments as refit_normal_rows otherwise.
void refit_newton_rows(const uint8_t* codes, const float* scales, const float* hr, int64_t n, int64_t K,
                       int L, int64_t group_size, bool zero, const float* U, int r, const float* d,
                       const float* diag_h, double damp, double* x);

// Re-assigns every element to its nearest dequantized value and returns the residual:
//   deq[j] = fma(lut[row, j], scale[row, g], zero[row, g])   (float32, as the kernels compute it)
//   codes[row, k] <- the index of the lowest |deq[j] - w[row, k]| (ties: the old code where it is
//                    one of them; any4::reassign_codes, the quantizer's own re-assignment)
//   res[row, k]    = deq[codes[row, k]] - w[row, k]
// w float [n, K], lut float [n, L] (sorted ascending), scales float [n, ceil(K/group_size), 2],
// codes uint8 [n, K] in/out, res float [n, K]. Throws std::invalid_argument for bad sizes.
void refit_assign_rows(const float* w, const float* lut, const float* scales, int64_t n, int64_t K, int L,
                       int64_t group_size, uint8_t* codes, float* res);

}  // namespace any4
