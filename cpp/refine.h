// Least-squares refinement of a learned table and its group affine after k-means (the C++ half
// of python/any4/refine.py, whose docstring gives the method). Per row, `rounds` alternations of
// three closed-form steps on k-means' own weighted error
//     e = sum_k d_k (lut[c_k] * scale_g(k) + zero_g(k) - w_k)^2
// (each group's (scale, zero) by a 2 x 2 least squares; each table entry as a weighted mean;
// the codes re-assigned to the nearest value), then the table and affine rounded to `dtype`, the
// table sorted, the codes re-assigned once more, and the row kept only where e went down.
// d_k is k-means' sample weight divided by the range scale^2 of the input affine (chan[k] *
// scale^power, or elem[row, k], or 1).
#pragma once

#include <cstdint>

#include "common.h"

namespace any4 {

// w float32 [N, K]; codes uint8 [N, K], lut float32 [N, L] (sorted), scales float32
// [N, ceil(K/G), 2] are read and updated in place (rows that did not improve are left as they
// were). chan [K] or elem [N, K] may be null. Returns the number of rows that changed.
int64_t refine_rows(const float* w, int64_t N, int64_t K, int L, int64_t group_size, const float* chan,
                    int power, const float* elem, DType dtype, int rounds, uint8_t* codes, float* lut,
                    float* scales);

}  // namespace any4
