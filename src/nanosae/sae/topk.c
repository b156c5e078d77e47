/* Row-wise top-k of a float32 matrix: for each row, the k largest values and their columns (unordered).
   A k-element min-heap per row; AVX2 compares 8 values at a time against the heap's minimum, so most of
   the row is passed over without a branch. When k is a large share of the row (AuxK's k_aux among the dead
   latents) most elements enter the heap, so a sampled threshold and a quickselect are used instead: O(cols)
   work whatever k is. Rows are split over OpenMP threads. Built by topk.py with
   `cc -O3 -mavx2 -fopenmp -shared`; torch.topk is used when that is not possible. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static void sift_down(float *v, int64_t *ix, int k, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && v[l] < v[m]) m = l;
        if (r < k && v[r] < v[m]) m = r;
        if (m == i) return;
        float tv = v[i]; v[i] = v[m]; v[m] = tv;
        int64_t ti = ix[i]; ix[i] = ix[m]; ix[m] = ti;
        i = m;
    }
}

static void replace_min(float *v, int64_t *ix, int k, float x, int64_t j) {
    v[0] = x; ix[0] = j;
    sift_down(v, ix, k, 0);
}

/* Reorder v[0..n) (and ix alongside) so that v[0..k) are the k largest: Hoare quickselect, median-of-3. */
static void select_largest(float *v, int64_t *ix, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2;
        float a = v[lo], b = v[mid], c = v[hi];
        float p = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > p) i++;
            while (v[j] < p) j--;
            if (i <= j) {
                float tv = v[i]; v[i] = v[j]; v[j] = tv;
                int64_t ti = ix[i]; ix[i] = ix[j]; ix[j] = ti;
                i++; j--;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else return;  /* v[j+1..i-1] all equal the pivot: the target is among them */
    }
}

/* Large k: a threshold from every 8th element (a little below where the k-th largest should fall), one
   branch-free pass keeping the elements at or above it, then quickselect among those few; when the threshold
   keeps fewer than k (an unlucky sample), quickselect over the whole row. */
static void topk_rows_select(const float *a, int64_t rows, int64_t cols, int64_t lda, int k, int threads,
                             float *out_v, int64_t *out_i) {
    #pragma omp parallel num_threads(threads)
    {
        float *v = malloc(cols * sizeof(float));
        int64_t *ix = malloc(cols * sizeof(int64_t));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *row = a + r * lda;
            int64_t m = cols / 8, q = (k * m) / cols, n = 0;
            q += q / 4 + 4;
            if (q < m) {
                for (int64_t j = 0; j < m; j++) v[j] = row[8 * j];
                select_largest(v, ix, m, q);
                float t = v[q - 1];
                for (int64_t j = 0; j < cols; j++) { v[n] = row[j]; ix[n] = j; n += row[j] >= t; }
            }
            if (n < k) {
                n = cols;
                for (int64_t j = 0; j < cols; j++) { v[j] = row[j]; ix[j] = j; }
            }
            select_largest(v, ix, n, k);
            for (int j = 0; j < k; j++) { out_v[r * k + j] = v[j]; out_i[r * k + j] = ix[j]; }
        }
        free(v);
        free(ix);
    }
}

void topk_rows(const float *a, int64_t rows, int64_t cols, int64_t lda, int k, int threads, float *out_v,
               int64_t *out_i) {
    if ((int64_t)k * 32 > cols) {
        topk_rows_select(a, rows, cols, lda, k, threads, out_v, out_i);
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = a + r * lda;
        float *v = out_v + r * k;  /* the heap lives in the output row */
        int64_t *ix = out_i + r * k;
        for (int j = 0; j < k; j++) { v[j] = row[j]; ix[j] = j; }
        for (int j = k / 2 - 1; j >= 0; j--) sift_down(v, ix, k, j);
        int64_t j = k;
        for (; j < cols && (j & 7); j++) if (row[j] > v[0]) replace_min(v, ix, k, row[j], j);
        for (; j + 8 <= cols; j += 8) {
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), _mm256_set1_ps(v[0]), _CMP_GT_OQ));
            while (mask) {
                int b = __builtin_ctz(mask);
                mask &= mask - 1;
                if (row[j + b] > v[0]) replace_min(v, ix, k, row[j + b], j + b);
            }
        }
        for (; j < cols; j++) if (row[j] > v[0]) replace_min(v, ix, k, row[j], j);
    }
}
