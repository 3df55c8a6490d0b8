// The experts' feed-forward networks, h -> intermediate -> h, on the rows routed to each, float32, AVX-512. Built on
// first import of switch_hf by expert_kernel.py; `sorted_mm` (modeling_switch.py) runs its experts on these ops where
// they are registered, and on torch.mm elsewhere.
//
// switch_hf::expert_feed_forward, the forward:
//
//   output[i] = down[e] @ act(up[e] @ input[rows[i]] + up_bias[e]) + down_bias[e]    for sorted position i of expert e
//
// or, for top-1 routing, the combine as well: result[rows[i]] = gate[i] * output[i], in the input's row order.
// switch_hf::expert_feed_forward_with_inner, the forward of training, also returns the inner activations and the
// activation's derivatives there, which the backward reads. switch_hf::expert_matmul and
// switch_hf::expert_outer_products run the backward's input-gradient and weight-gradient products per expert, on
// row-major register tiles (row_major_product) for experts of up to kMaxRowsForProductKernel rows and on BLAS above;
// expert_matmul scales its results by the derivatives, which takes the gradient through the activation.
//
// Why not one BLAS call per expert: each call first packs its whole weight operand, which a 4,096-row dense layer
// amortises and an expert's 32-128 rows do not; a weight that comes from memory (every expert's, every step) is read
// by that packing with no arithmetic to overlap; and the (rows, intermediate) activations go to memory and back
// between the two products. Here each thread takes tiles of 128 rows of one expert (a short rest joins the last one)
// and runs the whole network on each: the rows are gathered and transposed into a cache-resident buffer, each product
// reads its weight as stored while prefetching the next block of weight rows, the bias and the activation are applied
// to the first product's results in registers, and the second product reads them from cache. docs/benchmarks.md has
// the measurements.
//
// Layout: the tile's rows lie along the vector lanes (16 rows of one feature per vector), "transposed": a product
// keeps up to 4 row vectors x 6 weight rows of results in registers, needs one broadcast weight value per weight row
// and step of k, and stores whole vectors of one output feature. A tile's last few rows (m % 16, up to 10) would
// leave most of one more vector's lanes idle; they run as rows instead, the features along the lanes, each result a
// sum across one vector, on each block of weight rows while it is in L1 for the transposed rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

constexpr int kRowsPerVector = 16;
constexpr int kMaxVectors = 4;  // a register tile covers up to 64 rows
constexpr int kWeightRows = 6;  // weight rows per register tile: 4 x 6 accumulators + 4 row vectors + 1 broadcast
constexpr int64_t kTileRows = 128;  // rows per work item
constexpr int64_t kMaxTailRows = 10;  // a tile's last m % 16 rows run as rows if at most this many (each costs about
                                      // 1.5 lanes there), else in one more, partly empty, row vector
constexpr int64_t kMaxRowsPerExpertToSplit = 256;  // see split_experts_between_threads
// The backward's products (see row_major_product): a register tile covers kProductRows rows x kProductColumns columns
// of the result, and experts of at most kMaxRowsForProductKernel rows run there, larger ones on BLAS.
constexpr int kProductRows = 6, kProductVectors = 4, kProductColumns = kProductVectors * kRowsPerVector;
constexpr int64_t kMaxRowsForProductKernel = 512;
constexpr int64_t kMergedRestRows = 32;  // a work item has at most kTileRows + kMergedRestRows - 1 rows, whose
                                         // buffers (1.5 MB at h 384, intermediate 1,536) fit in L2

enum class Activation { kIdentity, kGelu, kRelu };

Activation parse_activation(const std::string& name, const char* op = "expert_feed_forward") {
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(name == "identity", op, ": activation must be one of 'gelu', 'relu', 'identity', got '", name, "'");
  return Activation::kIdentity;
}

// exp(y) for y <= 0: 2^n exp(r), n = round(y / ln 2), |r| <= ln 2 / 2, exp(r) by its Taylor series to degree 6
// (relative error under 2e-7 there); ln 2 is split in two so that the reduction is exact (Cody and Waite).
inline __m512 exp_nonpositive(__m512 y) {
  y = _mm512_max_ps(y, _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 series = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 720), r, _mm512_set1_ps(1.f / 120));
  series = _mm512_fmadd_ps(series, r, _mm512_set1_ps(1.f / 24));
  series = _mm512_fmadd_ps(series, r, _mm512_set1_ps(1.f / 6));
  series = _mm512_fmadd_ps(series, r, _mm512_set1_ps(0.5f));
  series = _mm512_fmadd_ps(series, r, _mm512_set1_ps(1.f));
  series = _mm512_fmadd_ps(series, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(series, n);
}

// The standard normal's Phi(x) = (1 + erf(x / sqrt 2)) / 2, with erfc(z) for z >= 0 by Abramowitz and Stegun 7.1.26
// (absolute error under 1.5e-7), and its density phi(x) = exp(-x^2 / 2) / sqrt(2 pi): the exact GELU is x Phi(x), as
// torch's default GELU (not its tanh approximation), and its derivative Phi(x) + x phi(x).
inline void normal_cdf_and_density(__m512 x, __m512& cdf, __m512& density) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __m512 one = _mm512_set1_ps(1.f);
  // t = 1 / d, d = 1 + 0.3275911 z >= 1: a 14-bit reciprocal and one Newton step (error under 1e-8 relative), not a
  // division, whose throughput is one per 10 cycles on the port the products' FMAs use too.
  const __m512 d = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, one);
  const __m512 estimate = _mm512_rcp14_ps(d);
  const __m512 t = _mm512_mul_ps(estimate, _mm512_fnmadd_ps(d, estimate, _mm512_set1_ps(2.f)));
  __m512 series = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  series = _mm512_fmadd_ps(series, t, _mm512_set1_ps(1.421413741f));
  series = _mm512_fmadd_ps(series, t, _mm512_set1_ps(-0.284496736f));
  series = _mm512_fmadd_ps(series, t, _mm512_set1_ps(0.254829592f));
  const __m512 exp_minus_z_squared = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(series, t),
                                         _mm512_mul_ps(exp_minus_z_squared, _mm512_set1_ps(0.5f)));
  // Phi(x) = 1 - erfc(|x| / sqrt 2) / 2 for x >= 0, erfc(|x| / sqrt 2) / 2 for x < 0.
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, half_erfc), half_erfc);
  density = _mm512_mul_ps(exp_minus_z_squared, _mm512_set1_ps(0.39894228040143268f));
}

inline __m512 gelu(__m512 x) {
  __m512 cdf, density;
  normal_cdf_and_density(x, cdf, density);
  return _mm512_mul_ps(x, cdf);  // the same operations as activate_with_derivative's: training and inference agree
}

inline __m512 activate(Activation activation, __m512 x) {
  switch (activation) {
    case Activation::kGelu: return gelu(x);
    case Activation::kRelu: return _mm512_max_ps(x, _mm512_setzero_ps());
    default: return x;
  }
}

// activate(activation, x), and the activation's derivative at x into `derivative`: for GELU, Phi(x) + x phi(x), from
// the one evaluation of Phi and phi that the activation needs anyway.
inline __m512 activate_with_derivative(Activation activation, __m512 x, __m512& derivative) {
  switch (activation) {
    case Activation::kGelu: {
      __m512 cdf, density;
      normal_cdf_and_density(x, cdf, density);
      derivative = _mm512_fmadd_ps(x, density, cdf);
      return _mm512_mul_ps(x, cdf);
    }
    case Activation::kRelu:
      derivative = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(1.f));
      return activate(activation, x);
    default:
      derivative = _mm512_set1_ps(1.f);
      return x;
  }
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= kRowsPerVector ? (__mmask16)0xFFFF : (count > 0 ? (__mmask16)((1u << count) - 1) : (__mmask16)0);
}

// One product, out = activation(input @ weight.T + bias) for weight (N, K), contiguous, on two sets of rows:
// - m rows in transposed form, input_t (K, m) -> out_t (N, m), both with row stride `stride` (>= m), m a multiple of
//   16 unless it is the whole tile;
// - `tail_rows` (at most kMaxTailRows) more, as rows: tail_input[r] (K,) -> tail_out (tail_rows, N), row-major.
struct Product {
  const float* input_t;
  const float* weight;
  const float* bias;  // (N,) or null
  float* out_t;
  int64_t stride, m, K, N;
  Activation activation;
  int64_t tail_rows;
  const float* const* tail_input;
  float* tail_out;
};

// out_t[n0 + j, m0 + r] for j < NB and r < rows, MV row vectors (the lanes beyond `rows` are masked). While it
// multiplies, it prefetches `next_block` (the weight rows multiplied after these, or null) one cache line per row
// every 16 steps of k: the pace at which it consumes its own.
template <int MV, int NB>
void register_tile(const Product& p, int64_t m0, int64_t rows, int64_t n0, const float* next_block, int next_rows) {
  __mmask16 masks[MV];
  for (int v = 0; v < MV; ++v) masks[v] = first_lanes(rows - kRowsPerVector * v);

  __m512 acc[NB * MV];
#pragma GCC unroll 64
  for (int j = 0; j < NB; ++j) {
    const __m512 start = _mm512_set1_ps(p.bias ? p.bias[n0 + j] : 0.f);
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) acc[j * MV + v] = start;
  }

  // Local copies: the compiler then keeps them in registers across the loop instead of re-reading `p`.
  const int64_t K = p.K, stride = p.stride;
  const float* __restrict block = p.weight + n0 * K;
  const float* __restrict input_t = p.input_t + m0;
  for (int64_t k0 = 0; k0 < K; k0 += kRowsPerVector) {
    for (int j = 0; j < next_rows; ++j) _mm_prefetch((const char*)(next_block + j * K + k0), _MM_HINT_T0);
    const int64_t k_end = std::min<int64_t>(K, k0 + kRowsPerVector);
#pragma GCC unroll 4
    for (int64_t k = k0; k < k_end; ++k) {
      const float* __restrict features_of_k = input_t + k * stride;
      __m512 features[MV];
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) features[v] = _mm512_maskz_loadu_ps(masks[v], features_of_k + kRowsPerVector * v);
#pragma GCC unroll 64
      for (int j = 0; j < NB; ++j) {
        const __m512 w = _mm512_set1_ps(block[j * K + k]);
#pragma GCC unroll 8
        for (int v = 0; v < MV; ++v) acc[j * MV + v] = _mm512_fmadd_ps(w, features[v], acc[j * MV + v]);
      }
    }
  }

#pragma GCC unroll 64
  for (int j = 0; j < NB; ++j) {
    float* out_row = p.out_t + (n0 + j) * p.stride + m0;
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) {
      _mm512_mask_storeu_ps(out_row + kRowsPerVector * v, masks[v], activate(p.activation, acc[j * MV + v]));
    }
  }
}

// As many row vectors as `rows` needs: an unused lane costs as much as a used one.
template <int NB>
void register_tile_for(const Product& p, int64_t m0, int64_t rows, int64_t n0, const float* next_block,
                       int next_rows) {
  switch ((rows + kRowsPerVector - 1) / kRowsPerVector) {
    case 4: register_tile<4, NB>(p, m0, rows, n0, next_block, next_rows); break;
    case 3: register_tile<3, NB>(p, m0, rows, n0, next_block, next_rows); break;
    case 2: register_tile<2, NB>(p, m0, rows, n0, next_block, next_rows); break;
    default: register_tile<1, NB>(p, m0, rows, n0, next_block, next_rows);
  }
}

// The horizontal sums of C vectors (C = 8 or 16): lane i of the result is the sum of v[i]'s lanes. Pairwise, as in a
// transpose: 30 shuffles and 15 adds for 16 sums, where one reduction per vector would take 64 and 64.
template <int C>
__attribute__((always_inline)) inline __m512 sum_lanes_of_each(const __m512* v) {
  static_assert(C == 8 || C == 16, "sums of 8 or 16 vectors");
  __m512 pairs[C / 2], quads[C / 4], halves[2];
  for (int i = 0; i < C / 2; ++i) {  // in each 128-bit lane: v[2i]'s two partial sums and v[2i + 1]'s, interleaved
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < C / 4; ++i) {  // in each 128-bit lane: one partial sum of each of v[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < C / 8; ++i) {  // 128-bit lanes 0 + 1 and 2 + 3 of quads[2i], then of quads[2i + 1]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  }
  if (C == 8) halves[1] = halves[0];  // lanes 8-15 then repeat lanes 0-7
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

// tail_out[r0 + r, n0 + j] = input row r0 + r . weight row n0 + j, for r < R and j < NB, the rows laid out as rows:
// the features along the lanes, one accumulator per (row, weight row), summed across its lanes at the end. For a
// tile's last rows, fewer than a row vector holds: transposed, they would cost a whole vector's 16 lanes. Bias and
// activation come after, in `finish_tail`, on whole rows.
template <int R, int NB>
void tail_tile(const Product& p, int64_t r0, int64_t n0) {
  // Summed in groups of 16 accumulators, the last of 8 where no more remain: room for them all, the rest zero.
  constexpr int kCount = R * NB, kRoom = kCount <= 8 ? 8 : (kCount <= 16 ? 16 : 24);
  static_assert(kCount <= 24, "a tail tile has at most 24 accumulators");
  __m512 acc[kRoom];
#pragma GCC unroll 64
  for (int i = 0; i < kRoom; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t K = p.K;
  const float* __restrict block = p.weight + n0 * K;
  const float* __restrict rows[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) rows[r] = p.tail_input[r0 + r];
  const int64_t whole_steps_end = K - K % kRowsPerVector;
  const __mmask16 last_step_lanes = first_lanes(K - whole_steps_end);
  for (int64_t k = 0; k < K; k += kRowsPerVector) {
    const __mmask16 valid = k < whole_steps_end ? (__mmask16)0xFFFF : last_step_lanes;
    __m512 features[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) features[r] = _mm512_maskz_loadu_ps(valid, rows[r] + k);
#pragma GCC unroll 64
    for (int j = 0; j < NB; ++j) {
      const __m512 w = _mm512_maskz_loadu_ps(valid, block + j * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r * NB + j] = _mm512_fmadd_ps(features[r], w, acc[r * NB + j]);
    }
  }

  // sums[g] lane i = accumulator 16 g + i. Copied by constant indices: `acc` itself must not have its address taken,
  // or it stops living in registers.
  __m512 sums[2], group[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) group[i] = i < kRoom ? acc[i] : _mm512_setzero_ps();
  sums[0] = kRoom == 8 ? sum_lanes_of_each<8>(group) : sum_lanes_of_each<16>(group);
  if constexpr (kRoom == 24) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) group[i] = acc[16 + i];
    sums[1] = sum_lanes_of_each<8>(group);
  }
  // Row r's accumulators r NB .. r NB + NB go out in one masked store per group they lie in, at an address shifted so
  // that each lane lands on its weight row.
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int group = (r * NB) / 16; group <= (r * NB + NB - 1) / 16; ++group) {
      const int lane_begin = std::max(r * NB - 16 * group, 0), lane_end = std::min(r * NB + NB - 16 * group, 16);
      const __mmask16 lanes = (__mmask16)(((1u << lane_end) - 1) & ~((1u << lane_begin) - 1));
      _mm512_mask_storeu_ps(p.tail_out + (r0 + r) * p.N + n0 - (r * NB - 16 * group), lanes, sums[group]);
    }
  }
}

// Every tail row against weight rows n0 .. n0 + NB, in tiles of as few rows as 4 x NB accumulators allow, spread
// evenly (5 rows: 3 + 2, not 4 + 1, whose tile of 1 x 6 accumulators cannot keep both FMA units busy).
template <int NB>
void tail_tiles(const Product& p, int64_t n0) {
  const int64_t num_tiles = (p.tail_rows + 3) / 4;
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int64_t r0 = p.tail_rows * tile / num_tiles, r1 = p.tail_rows * (tile + 1) / num_tiles;
    switch (r1 - r0) {
      case 4: tail_tile<4, NB>(p, r0, n0); break;
      case 3: tail_tile<3, NB>(p, r0, n0); break;
      case 2: tail_tile<2, NB>(p, r0, n0); break;
      default: tail_tile<1, NB>(p, r0, n0);
    }
  }
}

// The tail rows' bias and activation, once their sums are all in: tail_out[r] = activation(tail_out[r] + bias).
void finish_tail(const Product& p) {
  for (int64_t r = 0; r < p.tail_rows; ++r) {
    float* row = p.tail_out + r * p.N;
    for (int64_t n = 0; n < p.N; n += kRowsPerVector) {
      const __mmask16 valid = first_lanes(p.N - n);
      __m512 values = _mm512_maskz_loadu_ps(valid, row + n);
      if (p.bias) values = _mm512_add_ps(values, _mm512_maskz_loadu_ps(valid, p.bias + n));
      _mm512_mask_storeu_ps(row + n, valid, activate(p.activation, values));
    }
  }
}

// The whole product on the calling thread: each block of weight rows against every row, so that the block stays in
// L1 while all the row tiles (the tail's too) use it and the weight is read from memory once.
void multiply(const Product& p) {
  // The rows' vectors spread evenly over as few register tiles as hold them (5 vectors: 3 + 2, not 4 + 1): a tile of
  // one vector has 6 accumulators, too few to keep both FMA units busy (about 1% at 32 experts, none elsewhere).
  const int64_t num_vectors = (p.m + kRowsPerVector - 1) / kRowsPerVector;
  const int64_t num_tiles = (num_vectors + kMaxVectors - 1) / kMaxVectors;
  const auto first_row = [&](int64_t tile) { return kRowsPerVector * (num_vectors * tile / num_tiles); };
  for (int64_t n0 = 0; n0 < p.N; n0 += kWeightRows) {
    if (n0 + kWeightRows > p.N) {  // the last few weight rows, when N is not a multiple of kWeightRows
      for (int64_t n = n0; n < p.N; ++n) {
        for (int64_t tile = 0; tile < num_tiles; ++tile) {
          const int64_t m0 = first_row(tile);
          register_tile_for<1>(p, m0, std::min(p.m, first_row(tile + 1)) - m0, n, nullptr, 0);
        }
        tail_tiles<1>(p, n);
      }
      break;
    }
    const int next_rows = (int)std::clamp<int64_t>(p.N - n0 - kWeightRows, 0, kWeightRows);
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const int64_t m0 = first_row(tile);
      const bool prefetches = tile == 0 && next_rows > 0;
      register_tile_for<kWeightRows>(p, m0, std::min(p.m, first_row(tile + 1)) - m0, n0,
                                     prefetches ? p.weight + (n0 + kWeightRows) * p.K : nullptr,
                                     prefetches ? next_rows : 0);
    }
    tail_tiles<kWeightRows>(p, n0);
  }
  finish_tail(p);
}

// In-register transpose of a 16 x 16 block: block[i] holds row i on entry and column i on return.
inline void transpose_16x16(__m512 block[16]) {
  __m512 pairs[16], quads[16];
  for (int i = 0; i < 8; ++i) {  // within each 128-bit lane: element pairs of rows 2i and 2i + 1
    pairs[2 * i] = _mm512_unpacklo_ps(block[2 * i], block[2 * i + 1]);
    pairs[2 * i + 1] = _mm512_unpackhi_ps(block[2 * i], block[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // within each 128-bit lane: one column of rows 4i..4i + 3
    const __m512d a = _mm512_castps_pd(pairs[4 * i]), b = _mm512_castps_pd(pairs[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(pairs[4 * i + 2]), d = _mm512_castps_pd(pairs[4 * i + 3]);
    quads[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    quads[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    quads[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    quads[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // gather the four 128-bit pieces of each column
    const __m512 even01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0x88);
    const __m512 odd01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0xdd);
    const __m512 even23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0xdd);
    block[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);
    block[8 + c] = _mm512_shuffle_f32x4(even01, even23, 0xdd);
    block[4 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
    block[12 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0xdd);
  }
}

// columns (width, >= m), row stride `stride` <- the m rows input[row_index[i]] (width wide, contiguous).
void gather_columns(const float* input, const int64_t* row_index, int64_t m, int64_t width, float* columns,
                    int64_t stride) {
  __m512 block[16];
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerVector) {
    const int64_t rows = std::min<int64_t>(kRowsPerVector, m - r0);
    for (int64_t k0 = 0; k0 < width; k0 += kRowsPerVector) {
      const __mmask16 valid = first_lanes(width - k0);
      for (int i = 0; i < kRowsPerVector; ++i) {
        block[i] = i < rows ? _mm512_maskz_loadu_ps(valid, input + row_index[r0 + i] * width + k0)
                            : _mm512_setzero_ps();
      }
      transpose_16x16(block);
      for (int j = 0; j < kRowsPerVector && k0 + j < width; ++j) {
        _mm512_mask_storeu_ps(columns + (k0 + j) * stride + r0, first_lanes(rows), block[j]);
      }
    }
  }
}

// Features k0 .. k0 + count of a result's row i: to `rows_out + i * width`, or, with `destination`, to
// `rows_out + destination[i] * width` scaled by `scale[i]`.
inline void store_result(__m512 values, int64_t i, int64_t k0, int64_t count, int64_t width, float* rows_out,
                         const int64_t* destination, const float* scale) {
  const int64_t row = destination ? destination[i] : i;
  if (destination) values = _mm512_mul_ps(values, _mm512_set1_ps(scale[i]));
  _mm512_mask_storeu_ps(rows_out + row * width + k0, first_lanes(count), values);
}

// The m rows of a result <- columns (width, >= m), row stride `stride`, stored as `store_result` does.
void rows_from_columns(const float* columns, int64_t stride, int64_t m, int64_t width, float* rows_out,
                       const int64_t* destination, const float* scale) {
  __m512 block[16];
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerVector) {
    const int64_t rows = std::min<int64_t>(kRowsPerVector, m - r0);
    for (int64_t k0 = 0; k0 < width; k0 += kRowsPerVector) {
      const int64_t features = std::min<int64_t>(kRowsPerVector, width - k0);
      for (int j = 0; j < kRowsPerVector; ++j) {
        block[j] = j < features ? _mm512_maskz_loadu_ps(first_lanes(rows), columns + (k0 + j) * stride + r0)
                                : _mm512_setzero_ps();
      }
      transpose_16x16(block);
      for (int i = 0; i < rows; ++i) store_result(block[i], r0 + i, k0, features, width, rows_out, destination, scale);
    }
  }
}

// The same from the m rows of a result laid out as rows (m, width), contiguous.
void rows_from_rows(const float* rows, int64_t m, int64_t width, float* rows_out, const int64_t* destination,
                    const float* scale) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k0 = 0; k0 < width; k0 += kRowsPerVector) {
      const int64_t features = std::min<int64_t>(kRowsPerVector, width - k0);
      store_result(_mm512_maskz_loadu_ps(first_lanes(features), rows + i * width + k0), i, k0, features, width,
                   rows_out, destination, scale);
    }
  }
}

// Stores the first `count` lanes of `values` for a later pass (the backward): straight to memory where a whole aligned
// vector is stored, since nothing reads it before it would have left the cache anyway.
inline void store_for_later(float* destination, int64_t count, __m512 values) {
  if (count >= kRowsPerVector && reinterpret_cast<uintptr_t>(destination) % 64 == 0) {
    _mm512_stream_ps(destination, values);
  } else {
    _mm512_mask_storeu_ps(destination, first_lanes(count), values);
  }
}

// For the backward: applies the activation to a tile's first-product results in place (inner_t: width x m, row
// stride `stride`), and writes both the activations and their derivatives out as m rows of `width`.
void activate_and_export(float* inner_t, int64_t stride, int64_t m, int64_t width, Activation activation,
                         float* activation_rows, float* derivative_rows) {
  __m512 activated[16], derivative[16];
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerVector) {
    const int64_t rows = std::min<int64_t>(kRowsPerVector, m - r0);
    for (int64_t k0 = 0; k0 < width; k0 += kRowsPerVector) {
      const int64_t features = std::min<int64_t>(kRowsPerVector, width - k0);
      for (int j = 0; j < kRowsPerVector; ++j) {
        if (j < features) {
          float* column = inner_t + (k0 + j) * stride + r0;
          activated[j] =
              activate_with_derivative(activation, _mm512_maskz_loadu_ps(first_lanes(rows), column), derivative[j]);
          _mm512_mask_storeu_ps(column, first_lanes(rows), activated[j]);
        } else {
          activated[j] = derivative[j] = _mm512_setzero_ps();
        }
      }
      transpose_16x16(activated);
      transpose_16x16(derivative);
      for (int i = 0; i < rows; ++i) {
        store_for_later(activation_rows + (r0 + i) * width + k0, features, activated[i]);
        store_for_later(derivative_rows + (r0 + i) * width + k0, features, derivative[i]);
      }
    }
  }
}

// The same for a tile's tail rows, whose first-product results are laid out as rows (m, width), contiguous.
void activate_rows_and_export(float* inner, int64_t m, int64_t width, Activation activation, float* activation_rows,
                              float* derivative_rows) {
  for (int64_t i = 0; i < m * width; i += kRowsPerVector) {  // rows of whole vectors or not, all in one sweep
    const int64_t count = std::min<int64_t>(kRowsPerVector, m * width - i);
    __m512 derivative;
    const __m512 activated =
        activate_with_derivative(activation, _mm512_maskz_loadu_ps(first_lanes(count), inner + i), derivative);
    _mm512_mask_storeu_ps(inner + i, first_lanes(count), activated);
    store_for_later(activation_rows + i, count, activated);
    store_for_later(derivative_rows + i, count, derivative);
  }
}

void check_float_cpu_contiguous(const at::Tensor& tensor, const char* name, int64_t dim,
                                const char* op = "expert_feed_forward") {
  TORCH_CHECK(tensor.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Where each expert's rows begin among the sorted rows, and where the last expert's end: the (num_experts + 1) prefix
// sums of rows_per_expert, which must have one entry per expert, none negative.
std::vector<int64_t> expert_offsets(c10::IntArrayRef rows_per_expert, int64_t num_experts, const char* op) {
  TORCH_CHECK((int64_t)rows_per_expert.size() == num_experts, op, ": rows_per_expert must have ", num_experts,
              " entries, got ", rows_per_expert.size());
  std::vector<int64_t> offsets(num_experts + 1, 0);
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    TORCH_CHECK(rows_per_expert[expert] >= 0, op, ": rows_per_expert must not be negative, got ",
                rows_per_expert[expert]);
    offsets[expert + 1] = offsets[expert] + rows_per_expert[expert];
  }
  return offsets;
}

// Checks the arguments both feed-forward ops share, naming the one at fault; returns `expert_offsets`, whose last
// entry is the number of sorted rows.
std::vector<int64_t> check_experts_arguments(const at::Tensor& input, const at::Tensor& row_index,
                                             c10::IntArrayRef rows_per_expert, const at::Tensor& up,
                                             const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                                             const std::optional<at::Tensor>& down_bias) {
  check_float_cpu_contiguous(input, "input", 2);
  check_float_cpu_contiguous(up, "up", 3);
  check_float_cpu_contiguous(down, "down", 3);
  const int64_t num_experts = up.size(0), intermediate = up.size(1), hidden = up.size(2);
  TORCH_CHECK(input.size(1) == hidden, "expert_feed_forward: input must have ", hidden, " features (up is ",
              up.sizes(), "), got ", input.sizes());
  TORCH_CHECK(down.size(0) == num_experts && down.size(1) == hidden && down.size(2) == intermediate,
              "expert_feed_forward: down must be (", num_experts, ", ", hidden, ", ", intermediate, "), got ",
              down.sizes());
  if (up_bias.has_value()) {
    check_float_cpu_contiguous(*up_bias, "up_bias", 2);
    TORCH_CHECK(up_bias->size(0) == num_experts && up_bias->size(1) == intermediate,
                "expert_feed_forward: up_bias must be (", num_experts, ", ", intermediate, "), got ", up_bias->sizes());
  }
  if (down_bias.has_value()) {
    check_float_cpu_contiguous(*down_bias, "down_bias", 2);
    TORCH_CHECK(down_bias->size(0) == num_experts && down_bias->size(1) == hidden,
                "expert_feed_forward: down_bias must be (", num_experts, ", ", hidden, "), got ", down_bias->sizes());
  }
  std::vector<int64_t> offsets = expert_offsets(rows_per_expert, num_experts, "expert_feed_forward");
  TORCH_CHECK(row_index.dim() == 1 && row_index.scalar_type() == at::kLong && row_index.is_contiguous(),
              "expert_feed_forward: row_index must be a contiguous 1-D int64 tensor");
  const int64_t total_rows = offsets.back();
  TORCH_CHECK(row_index.size(0) == total_rows, "expert_feed_forward: row_index must have sum(rows_per_expert) = ",
              total_rows, " entries, got ", row_index.size(0));
  if (total_rows > 0) {
    const auto [lowest, highest] = at::aminmax(row_index);
    TORCH_CHECK(lowest.item<int64_t>() >= 0 && highest.item<int64_t>() < input.size(0),
                "expert_feed_forward: row_index must lie in [0, ", input.size(0), ")");
  }
  return offsets;
}

// Where the tiles' results go. `output` receives the sorted rows' outputs (n, h), or, with `gate`, the gated outputs
// at their input rows. With `activation` and `activation_derivative`, each (n, intermediate), the inner values the
// backward needs are written there too, in sorted order.
struct Destination {
  float* output;
  const float* gate;
  float* activation;
  float* activation_derivative;
};

// Runs the networks on the sorted rows, expert e's at positions first_position[e] .. first_position[e + 1].
void run_experts(const at::Tensor& input, const int64_t* row_index, const std::vector<int64_t>& first_position,
                 const at::Tensor& up, const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                 const std::optional<at::Tensor>& down_bias, Activation activation, const Destination& destination) {
  const int64_t num_experts = up.size(0), intermediate = up.size(1), hidden = up.size(2);
  const float* input_data = input.data_ptr<float>();
  const float* up_data = up.data_ptr<float>();
  const float* down_data = down.data_ptr<float>();
  const float* up_bias_data = up_bias.has_value() ? up_bias->data_ptr<float>() : nullptr;
  const float* down_bias_data = down_bias.has_value() ? down_bias->data_ptr<float>() : nullptr;
  const bool exports_inner = destination.activation != nullptr;
  const int64_t total_rows = first_position.back();

  // Each thread takes an equal share of the sorted rows, so that they all finish together however the experts are
  // loaded, and runs it in tiles of one expert's rows: every product runs on one thread, on buffers that stay in its
  // core's cache. Through at::parallel_for, on torch's own threads.
  const int64_t num_shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total_rows / kTileRows));
  at::parallel_for(0, num_shares, 1, [&](int64_t share_begin, int64_t share_end) {
    constexpr int64_t max_rows = kTileRows + kMergedRestRows - 1;
    std::vector<float> input_t(hidden * max_rows), inner_t(intermediate * max_rows), output_t(hidden * max_rows);
    std::vector<float> tail_inner(intermediate * kMaxTailRows), tail_output(hidden * kMaxTailRows);
    const float* tail_input[kMaxTailRows];
    const float* tail_inner_rows[kMaxTailRows];
    for (int64_t r = 0; r < kMaxTailRows; ++r) tail_inner_rows[r] = tail_inner.data() + r * intermediate;
    for (int64_t share = share_begin; share < share_end; ++share) {
      const int64_t begin = total_rows * share / num_shares, end = total_rows * (share + 1) / num_shares;
      for (int64_t expert = 0; expert < num_experts; ++expert) {
        const int64_t expert_begin = std::max(begin, first_position[expert]);
        const int64_t expert_end = std::min(end, first_position[expert + 1]);
        // Tiles of kTileRows rows, two whole register tiles each; a rest under kMergedRestRows joins the last full
        // tile rather than read the expert's weights once more for a few rows.
        for (int64_t position = expert_begin; position < expert_end;) {
          const int64_t remaining = expert_end - position;
          const int64_t m = remaining < kTileRows + kMergedRestRows ? remaining : kTileRows;
          // The rows beyond the last whole row vector run as rows, unless they nearly fill one.
          const int64_t tail = m % kRowsPerVector <= kMaxTailRows ? m % kRowsPerVector : 0;
          const int64_t lanes = m - tail;  // rows run transposed
          for (int64_t r = 0; r < tail; ++r) tail_input[r] = input_data + row_index[position + lanes + r] * hidden;

          gather_columns(input_data, row_index + position, lanes, hidden, input_t.data(), lanes);
          multiply(Product{input_t.data(), up_data + expert * intermediate * hidden,
                           up_bias_data ? up_bias_data + expert * intermediate : nullptr, inner_t.data(), lanes,
                           lanes, hidden, intermediate, exports_inner ? Activation::kIdentity : activation, tail,
                           tail_input, tail_inner.data()});
          if (exports_inner) {
            activate_and_export(inner_t.data(), lanes, lanes, intermediate, activation,
                                destination.activation + position * intermediate,
                                destination.activation_derivative + position * intermediate);
            activate_rows_and_export(tail_inner.data(), tail, intermediate, activation,
                                     destination.activation + (position + lanes) * intermediate,
                                     destination.activation_derivative + (position + lanes) * intermediate);
          }
          multiply(Product{inner_t.data(), down_data + expert * hidden * intermediate,
                           down_bias_data ? down_bias_data + expert * hidden : nullptr, output_t.data(), lanes, lanes,
                           intermediate, hidden, Activation::kIdentity, tail, tail_inner_rows, tail_output.data()});
          if (destination.gate) {
            rows_from_columns(output_t.data(), lanes, lanes, hidden, destination.output, row_index + position,
                              destination.gate + position);
            rows_from_rows(tail_output.data(), tail, hidden, destination.output, row_index + position + lanes,
                           destination.gate + position + lanes);
          } else {
            rows_from_columns(output_t.data(), lanes, lanes, hidden, destination.output + position * hidden, nullptr,
                              nullptr);
            rows_from_rows(tail_output.data(), tail, hidden, destination.output + (position + lanes) * hidden,
                           nullptr, nullptr);
          }
          position += m;
        }
      }
    }
    _mm_sfence();  // the non-temporal stores are done before anyone reads them
  });
}

// Returns the n sorted rows' outputs (n, h); with `gate` (n,), instead the (t, h) result in input order: input row
// row_index[i] gets gate[i] times its output, rows never routed get zero. Rows must then be distinct (top-1
// routing: each row runs once), so that no two writes meet.
at::Tensor expert_feed_forward(const at::Tensor& input, const at::Tensor& row_index, c10::IntArrayRef rows_per_expert,
                               const at::Tensor& up, const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                               const std::optional<at::Tensor>& down_bias, const std::string& activation_name,
                               const std::optional<at::Tensor>& gate) {
  const std::vector<int64_t> offsets =
      check_experts_arguments(input, row_index, rows_per_expert, up, up_bias, down, down_bias);
  const int64_t total_rows = offsets.back();
  const Activation activation = parse_activation(activation_name);
  const int64_t* row_index_data = row_index.data_ptr<int64_t>();
  if (gate.has_value()) {
    check_float_cpu_contiguous(*gate, "gate", 1);
    TORCH_CHECK(gate->size(0) == total_rows, "expert_feed_forward: gate must have ", total_rows,
                " entries (one per row), got ", gate->size(0));
    std::vector<bool> routed(input.size(0), false);
    for (int64_t i = 0; i < total_rows; ++i) {
      TORCH_CHECK(!routed[row_index_data[i]], "expert_feed_forward: with gate, row_index must not repeat a row (row ",
                  row_index_data[i], " appears twice); gate and sum top-k choices outside");
      routed[row_index_data[i]] = true;
    }
  }
  at::Tensor output = !gate.has_value()              ? at::empty({total_rows, input.size(1)}, input.options())
                      : total_rows == input.size(0) ? at::empty_like(input)  // every row written once
                                                    : at::zeros_like(input);
  run_experts(input, row_index_data, offsets, up, up_bias, down, down_bias, activation,
              Destination{output.data_ptr<float>(), gate.has_value() ? gate->data_ptr<float>() : nullptr, nullptr,
                          nullptr});
  return output;
}

// The forward of training: the n sorted rows' outputs (n, h), and their inner activations and the activation's
// derivatives there (n, intermediate each), which the backward reads instead of recomputing them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_feed_forward_with_inner(
    const at::Tensor& input, const at::Tensor& row_index, c10::IntArrayRef rows_per_expert, const at::Tensor& up,
    const std::optional<at::Tensor>& up_bias, const at::Tensor& down, const std::optional<at::Tensor>& down_bias,
    const std::string& activation_name) {
  const std::vector<int64_t> offsets =
      check_experts_arguments(input, row_index, rows_per_expert, up, up_bias, down, down_bias);
  const int64_t total_rows = offsets.back();
  const Activation activation = parse_activation(activation_name);
  at::Tensor output = at::empty({total_rows, input.size(1)}, input.options());
  at::Tensor activated = at::empty({total_rows, up.size(1)}, input.options());
  at::Tensor activation_derivative = at::empty({total_rows, up.size(1)}, input.options());
  run_experts(input, row_index.data_ptr<int64_t>(), offsets, up, up_bias, down, down_bias, activation,
              Destination{output.data_ptr<float>(), nullptr, activated.data_ptr<float>(),
                          activation_derivative.data_ptr<float>()});
  return {output, activated, activation_derivative};
}

// Splits `num_items` work items between torch's threads in contiguous runs of about equal cost (first_cost: the
// running sum of their costs, num_items + 1 entries) and runs work(item_begin, item_end) on each run.
template <typename Work>
void split_between_threads(const std::vector<int64_t>& first_cost, const Work& work) {
  const int64_t num_items = (int64_t)first_cost.size() - 1, total_cost = first_cost.back();
  const int64_t num_shares = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(num_items, 1));
  // Share s takes the items whose cost starts in its equal part of the total.
  std::vector<int64_t> first_item(num_shares + 1, num_items);
  first_item[0] = 0;
  for (int64_t share = 1, item = 0; share < num_shares; ++share) {
    while (item < num_items && first_cost[item] < total_cost * share / num_shares) ++item;
    first_item[share] = item;
  }
  // Inside at::parallel_for, torch runs any product on the calling thread alone.
  at::parallel_for(0, num_shares, 1, [&](int64_t share_begin, int64_t share_end) {
    for (int64_t share = share_begin; share < share_end; ++share) work(first_item[share], first_item[share + 1]);
  });
}

// Runs multiply_experts(expert_begin, expert_end) over all experts, split between torch's threads by their rows
// (first_row: `expert_offsets`), each BLAS product inside on one thread. A BLAS call on the few rows of one expert gains
// little from a second thread (it mostly waits for its operands to arrive from memory or leave for it), while two
// threads on two experts stream two at once. Where one expert has more than a thread's share of the rows, or the
// experts average more than kMaxRowsPerExpertToSplit rows (8 experts of 512 rows: MKL's own threads on each product
// measured 0.10-0.15 x dense faster for the block's forward+backward), the experts run one after the other instead,
// each product on every thread.
template <typename MultiplyExperts>
void split_experts_between_threads(const std::vector<int64_t>& first_row, const MultiplyExperts& multiply_experts) {
  const int64_t num_experts = (int64_t)first_row.size() - 1, total_rows = first_row.back();
  int64_t most_rows = 0;
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    most_rows = std::max(most_rows, first_row[expert + 1] - first_row[expert]);
  }
  const int64_t num_shares = at::get_num_threads();
  if (num_shares == 1 || most_rows * num_shares > total_rows || total_rows > kMaxRowsPerExpertToSplit * num_experts) {
    multiply_experts(0, num_experts);
    return;
  }
  split_between_threads(first_row, multiply_experts);
}

void check_one_dtype_on_cpu(const at::Tensor& first, const at::Tensor& second, const char* op,
                            const char* first_name, const char* second_name) {
  TORCH_CHECK(first.scalar_type() == second.scalar_type(), op, ": ", first_name, " and ", second_name,
              " must have one dtype, got ", first.scalar_type(), " and ", second.scalar_type());
  TORCH_CHECK(first.device().is_cpu() && second.device().is_cpu(), op, ": ", first_name, " and ", second_name,
              " must be on the CPU");
}

// The backward's products, out = A @ B for one expert: A (M x K) read through two strides, so that it is either an
// expert's input rows (expert_matmul) or an expert's `left` rows read transposed (expert_outer_products); B (K x N)
// row-major. A register tile holds kProductRows rows x kProductColumns columns of the result and runs the whole of K:
// per step of k, kProductVectors loads of B's row, one broadcast of A per row, 24 FMAs. The tiles sweep B one block of
// kProductColumns columns at a time, every row tile of the expert on that block while it is in L2, and the first row
// tile prefetches the next block (or the next expert's first) into L2: at 128 experts of 32 rows, B is a weight
// arriving from memory. The results are written once, with non-temporal stores where whole aligned vectors allow:
// weight gradients (one expert's is 2.4 MB) are new memory nothing reads before the optimizer.
//
// Why not BLAS: a BLAS call per expert packs its operands for a product of 32-512 rows, and at a weight gradient's
// K of 32-128 rows the packing and its output writes cost more than the arithmetic. One thread, 4,096 tokens, h 384,
// intermediate 1,536, ms for BLAS -> these tiles (docs/benchmarks.md): weight gradients 79 -> 46 at 128 experts, 57 ->
// 46 at 32, 51 -> 47 at 8; input gradients 82 -> 54 and 80 -> 55 at 128 experts. Above kMaxRowsForProductKernel rows
// A and B no longer stay in cache between blocks, and BLAS is faster (a single expert of 4,096 rows: 128 against 51).
struct RowMajorProduct {
  const float* a;
  int64_t a_row_stride, a_k_stride;  // A[m, k] = a[m * a_row_stride + k * a_k_stride]
  const float* b;
  int64_t b_row_stride;  // B[k, n] = b[k * b_row_stride + n]
  float* out;
  int64_t out_row_stride;  // out[m, n] = out[m * out_row_stride + n]
  int64_t M, N, K;
  const float* next_b;  // the next expert's B, prefetched during the last block, or null
  const float* scale;  // where not null, each result is multiplied by scale[m, n], laid out as out
};

// out[m0 + r, n0 + c] for r < R and c < columns (at most kProductColumns): the whole sum over K. Prefetches `next`
// (the same rows of the next block of B, or null) into L2, one line per vector and step of k.
template <int R, bool kStream>
void product_tile(const RowMajorProduct& p, int64_t m0, int64_t n0, int64_t columns, const float* next) {
  __mmask16 masks[kProductVectors];
#pragma GCC unroll 8
  for (int v = 0; v < kProductVectors; ++v) masks[v] = first_lanes(columns - kRowsPerVector * v);
  __m512 acc[R * kProductVectors];
#pragma GCC unroll 64
  for (int j = 0; j < R * kProductVectors; ++j) acc[j] = _mm512_setzero_ps();

  // Local copies: the compiler then keeps them in registers across the loop instead of re-reading `p`.
  const int64_t K = p.K, a_row_stride = p.a_row_stride, a_k_stride = p.a_k_stride, b_row_stride = p.b_row_stride;
  const float* __restrict a = p.a + m0 * a_row_stride;
  const float* __restrict b = p.b + n0;
  for (int64_t k = 0; k < K; ++k) {
    if (next != nullptr) {
#pragma GCC unroll 8
      for (int v = 0; v < kProductVectors; ++v) {
        _mm_prefetch((const char*)(next + k * b_row_stride + kRowsPerVector * v), _MM_HINT_T1);
      }
    }
    __m512 b_of_k[kProductVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kProductVectors; ++v) {
      b_of_k[v] = _mm512_maskz_loadu_ps(masks[v], b + k * b_row_stride + kRowsPerVector * v);
    }
#pragma GCC unroll 64
    for (int r = 0; r < R; ++r) {
      const __m512 a_of_k = _mm512_set1_ps(a[r * a_row_stride + k * a_k_stride]);
#pragma GCC unroll 8
      for (int v = 0; v < kProductVectors; ++v) {
        acc[r * kProductVectors + v] = _mm512_fmadd_ps(a_of_k, b_of_k[v], acc[r * kProductVectors + v]);
      }
    }
  }

#pragma GCC unroll 64
  for (int r = 0; r < R; ++r) {
    float* out_row = p.out + (m0 + r) * p.out_row_stride + n0;
    const float* scale_row = p.scale != nullptr ? p.scale + (m0 + r) * p.out_row_stride + n0 : nullptr;
#pragma GCC unroll 8
    for (int v = 0; v < kProductVectors; ++v) {
      __m512 result = acc[r * kProductVectors + v];
      if (p.scale != nullptr) {
        result = _mm512_mul_ps(result, _mm512_maskz_loadu_ps(masks[v], scale_row + kRowsPerVector * v));
      }
      if (kStream) {
        _mm512_stream_ps(out_row + kRowsPerVector * v, result);
      } else {
        _mm512_mask_storeu_ps(out_row + kRowsPerVector * v, masks[v], result);
      }
    }
  }
}

// Every row of the product on columns [n0, n0 + kProductColumns), whole tiles first, then one tile of the last M % 6.
template <bool kStream>
void product_block(const RowMajorProduct& p, int64_t n0) {
  const int64_t columns = std::min<int64_t>(kProductColumns, p.N - n0);
  const float* next = n0 + kProductColumns < p.N ? p.b + n0 + kProductColumns : p.next_b;
  int64_t m0 = 0;
  for (; m0 + kProductRows <= p.M; m0 += kProductRows) {
    product_tile<kProductRows, kStream>(p, m0, n0, columns, m0 == 0 ? next : nullptr);
  }
  const float* rest_next = m0 == 0 ? next : nullptr;
  switch (p.M - m0) {
    case 5: product_tile<5, kStream>(p, m0, n0, columns, rest_next); break;
    case 4: product_tile<4, kStream>(p, m0, n0, columns, rest_next); break;
    case 3: product_tile<3, kStream>(p, m0, n0, columns, rest_next); break;
    case 2: product_tile<2, kStream>(p, m0, n0, columns, rest_next); break;
    case 1: product_tile<1, kStream>(p, m0, n0, columns, rest_next); break;
    default: break;
  }
}

// The product's blocks of columns [block_begin, block_end).
void row_major_product(const RowMajorProduct& p, int64_t block_begin, int64_t block_end) {
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t n0 = block * kProductColumns;
    // A partial block, or rows not 64-byte aligned, take masked stores.
    const bool whole_aligned_vectors = n0 + kProductColumns <= p.N && p.out_row_stride % kRowsPerVector == 0 &&
                                       reinterpret_cast<uintptr_t>(p.out + n0) % 64 == 0;
    whole_aligned_vectors ? product_block<true>(p, n0) : product_block<false>(p, n0);
  }
}

// Runs every expert's product. Where `on_tiles` (the operands are float32 rows), experts of 1 to
// kMaxRowsForProductKernel rows run on row_major_product(product_of(expert)), each expert's blocks of columns split
// between threads by rows (an expert of r rows costs about r per block), and every other expert then runs
// `on_blas(expert)` (BLAS), one after the other, each product on all threads. Otherwise every expert runs on_blas,
// split between threads by `split_experts_between_threads`.
template <typename ProductOf, typename OnBlas>
void run_expert_products(c10::IntArrayRef rows_per_expert, const std::vector<int64_t>& first_row, int64_t columns,
                         bool on_tiles, const ProductOf& product_of, const OnBlas& on_blas) {
  if (!on_tiles) {
    split_experts_between_threads(first_row, [&](int64_t expert_begin, int64_t expert_end) {
      for (int64_t expert = expert_begin; expert < expert_end; ++expert) on_blas(expert);
    });
    return;
  }
  const auto on_kernel = [&](int64_t expert) {
    return rows_per_expert[expert] > 0 && rows_per_expert[expert] <= kMaxRowsForProductKernel;
  };
  const int64_t num_experts = (int64_t)rows_per_expert.size();
  const int64_t blocks = (columns + kProductColumns - 1) / kProductColumns;
  std::vector<int64_t> item_expert, first_cost{0};  // one item per (expert, block)
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    if (!on_kernel(expert)) continue;
    for (int64_t block = 0; block < blocks; ++block) {
      item_expert.push_back(expert);
      first_cost.push_back(first_cost.back() + rows_per_expert[expert]);
    }
  }
  if (!item_expert.empty()) {
    split_between_threads(first_cost, [&](int64_t item_begin, int64_t item_end) {
      for (int64_t item = item_begin; item < item_end;) {
        const int64_t expert = item_expert[item];
        const int64_t block_begin = item % blocks;  // every kernel expert has all its blocks, in order
        const int64_t block_end = std::min(blocks, block_begin + (item_end - item));
        row_major_product(product_of(expert), block_begin, block_end);
        item += block_end - block_begin;
      }
      _mm_sfence();  // the non-temporal stores are done before anyone reads them
    });
  }
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    if (!on_kernel(expert)) on_blas(expert);
  }
}

// Whether `tensor` can feed row_major_product: float32, elements of a row adjacent.
bool rows_are_float_vectors(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kFloat && tensor.stride(-1) == 1;
}

// output[rows of expert e] = input[rows of expert e] @ weight[e], for `input` (n, in) sorted by expert and `weight`
// (e, in, out) of any dtype and strides: the input gradients of `sorted_mm`'s backward. With `scale` (n, out), each
// result is also multiplied by its entry: the experts' backward passes the inner activation's derivative, so that the
// gradient through `down` comes out as the gradient of the activation's input, without another pass over memory.
// float32 experts of up to kMaxRowsForProductKernel rows run on row_major_product; otherwise one BLAS product per
// expert, the experts split between threads (`split_experts_between_threads`).
at::Tensor expert_matmul(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef rows_per_expert,
                         const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 3, "expert_matmul: input must be 2-D and weight 3-D, got shapes ",
              input.sizes(), " and ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), "expert_matmul: weight must be (e, ", input.size(1), ", out), got ",
              weight.sizes());
  check_one_dtype_on_cpu(input, weight, "expert_matmul", "input", "weight");
  const int64_t num_experts = weight.size(0), in = weight.size(1), out = weight.size(2);
  const std::vector<int64_t> first_row = expert_offsets(rows_per_expert, num_experts, "expert_matmul");
  TORCH_CHECK(input.size(0) == first_row.back(), "expert_matmul: input must have sum(rows_per_expert) = ",
              first_row.back(), " rows, got ", input.size(0));
  if (scale.has_value()) {
    check_float_cpu_contiguous(*scale, "scale", 2, "expert_matmul");
    TORCH_CHECK(input.scalar_type() == at::kFloat, "expert_matmul: scale needs float32 input, got ",
                input.scalar_type());
    TORCH_CHECK(scale->size(0) == input.size(0) && scale->size(1) == out, "expert_matmul: scale must be (",
                input.size(0), ", ", out, "), got ", scale->sizes());
  }

  // Values only, like every op here: detached, a weight that requires gradients is not refused by mm's out= form.
  const at::Tensor input_values = input.detach(), weight_values = weight.detach();
  at::Tensor output = at::empty({input.size(0), out}, input.options());
  const auto product_on_blas = [&](int64_t expert) {
    if (rows_per_expert[expert] == 0) return;
    at::Tensor expert_output = output.narrow(0, first_row[expert], rows_per_expert[expert]);
    at::mm_out(expert_output, input_values.narrow(0, first_row[expert], rows_per_expert[expert]), weight_values[expert]);
    if (scale.has_value()) expert_output.mul_(scale->narrow(0, first_row[expert], rows_per_expert[expert]));
  };
  const auto weight_of = [&](int64_t expert) {
    return expert < num_experts ? weight_values.data_ptr<float>() + expert * weight_values.stride(0) : nullptr;
  };
  run_expert_products(
      rows_per_expert, first_row, out, rows_are_float_vectors(input_values) && rows_are_float_vectors(weight_values),
      [&](int64_t expert) {
        return RowMajorProduct{input_values.data_ptr<float>() + first_row[expert] * input_values.stride(0),
                               input_values.stride(0), 1, weight_of(expert), weight_values.stride(1),
                               output.data_ptr<float>() + first_row[expert] * out, out,
                               rows_per_expert[expert], out, in, weight_of(expert + 1),
                               scale.has_value() ? scale->data_ptr<float>() + first_row[expert] * out : nullptr};
      },
      product_on_blas);
  return output;
}

// output[e] = left[rows of expert e].T @ right[rows of expert e], (e, p, q), for `left` (n, p) and `right` (n, q)
// sorted by expert, of any dtype and strides: the weight gradients of `sorted_mm`'s backward. An expert without rows
// gets zeros. float32 experts of up to kMaxRowsForProductKernel rows run on row_major_product, reading `left`
// transposed; otherwise one BLAS product per expert, the experts split between threads.
at::Tensor expert_outer_products(const at::Tensor& left, const at::Tensor& right, c10::IntArrayRef rows_per_expert) {
  TORCH_CHECK(left.dim() == 2 && right.dim() == 2, "expert_outer_products: left and right must be 2-D, got shapes ",
              left.sizes(), " and ", right.sizes());
  check_one_dtype_on_cpu(left, right, "expert_outer_products", "left", "right");
  const int64_t num_experts = (int64_t)rows_per_expert.size();
  const std::vector<int64_t> first_row = expert_offsets(rows_per_expert, num_experts, "expert_outer_products");
  TORCH_CHECK(left.size(0) == first_row.back() && right.size(0) == first_row.back(),
              "expert_outer_products: left and right must have sum(rows_per_expert) = ", first_row.back(),
              " rows, got ", left.size(0), " and ", right.size(0));

  const at::Tensor left_values = left.detach(), right_values = right.detach();
  const int64_t p = left.size(1), q = right.size(1);
  at::Tensor output = at::empty({num_experts, p, q}, left.options());
  const auto product_on_blas = [&](int64_t expert) {
    at::Tensor expert_output = output[expert];
    if (rows_per_expert[expert] == 0) {
      expert_output.zero_();
      return;
    }
    at::mm_out(expert_output, left_values.narrow(0, first_row[expert], rows_per_expert[expert]).t(),
               right_values.narrow(0, first_row[expert], rows_per_expert[expert]));
  };
  const int64_t left_stride = left_values.stride(0), right_stride = right_values.stride(0);
  const auto right_of = [&](int64_t expert) {
    return expert < num_experts ? right_values.data_ptr<float>() + first_row[expert] * right_stride : nullptr;
  };
  run_expert_products(
      rows_per_expert, first_row, q, rows_are_float_vectors(left_values) && rows_are_float_vectors(right_values),
      [&](int64_t expert) {
        return RowMajorProduct{left_values.data_ptr<float>() + first_row[expert] * left_stride, 1, left_stride,
                               right_of(expert), right_stride, output.data_ptr<float>() + expert * p * q, q, p, q,
                               rows_per_expert[expert], right_of(expert + 1), nullptr};
      },
      product_on_blas);
  return output;
}

}  // namespace

TORCH_LIBRARY(switch_hf, library) {
  // The ops' autograd formulas and fake kernels are registered from Python, by expert_kernel.register_formulas.
  library.set_python_module("switch_hf.expert_kernel");
  library.def(
      "expert_feed_forward(Tensor input, Tensor row_index, int[] rows_per_expert, Tensor up, Tensor? up_bias, "
      "Tensor down, Tensor? down_bias, str activation, Tensor? gate=None) -> Tensor");
  library.def(
      "expert_feed_forward_with_inner(Tensor input, Tensor row_index, int[] rows_per_expert, Tensor up, "
      "Tensor? up_bias, Tensor down, Tensor? down_bias, str activation) -> (Tensor, Tensor, Tensor)");
  library.def(
      "expert_matmul(Tensor input, Tensor weight, int[] rows_per_expert, Tensor? scale=None) -> Tensor");
  library.def("expert_outer_products(Tensor left, Tensor right, int[] rows_per_expert) -> Tensor");
}

TORCH_LIBRARY_IMPL(switch_hf, CPU, library) {
  library.impl("expert_feed_forward", &expert_feed_forward);
  library.impl("expert_feed_forward_with_inner", &expert_feed_forward_with_inner);
  library.impl("expert_matmul", &expert_matmul);
  library.impl("expert_outer_products", &expert_outer_products);
}
