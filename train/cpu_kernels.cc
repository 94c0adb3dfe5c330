// CPU kernels for the SAE training step, called through the XLA FFI (see cpu_kernels.py).
//
// XLA's CPU runtime runs a TopK, a gather loop or a scatter on one thread. Each kernel here splits
// its rows over XLA's intra-op thread pool (ParallelFor):
// - TopK: bit for bit lax.top_k. Floats are ordered by the total order XLA's TopK uses (-NaN < -inf
//   < ... < -0.0 < +0.0 < ... < +inf < +NaN), equal values keep the lower index first, and values
//   are copied, never recomputed. Two vectorised passes per row (TopKRowWith).
// - WeightedRows, RowProducts, ScatterRows(Dot): the k-sparse products of sparse.py, k rows of a
//   [m, d] weight table read or accumulated per token.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Rank-2 operands.
using Matrix = ffi::Buffer<ffi::F32, 2>;
using IndexMatrix = ffi::Buffer<ffi::S32, 2>;
using MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;

namespace {

// The float's bits as an int32 whose signed order is the float total order above.
inline int32_t OrderKey(float f) {
  int32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 16;  // chunks per group of the first pass
constexpr int64_t kTile = 64;   // rows per tile of the transposed scatter: 256-byte runs per page it writes

// An entry's place in lax.top_k's order as one int64: the key above, then the lower index first.
// Distinct for distinct indices, so selecting by it is deterministic and needs no tie rule.
inline int64_t Rank(int32_t key, int64_t i) {
  const uint64_t high = static_cast<uint64_t>(static_cast<int64_t>(key)) << 32;
  return static_cast<int64_t>(high | (0xffffffffu - static_cast<uint32_t>(i)));
}

// Keys of 16 entries at a time: the lane-wise maxima over `chunks` consecutive groups of 16 entries
// (out[j] = max key of x[16 c + j]), and a bit mask of the entries >= bar. Portable versions, and
// AVX-512 ones chosen at run time.
inline void LaneMax(const float* x, int64_t chunks, int32_t* out) {
  for (int64_t j = 0; j < kLanes; ++j) out[j] = INT32_MIN;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < kLanes; ++j) out[j] = std::max(out[j], OrderKey(x[c * kLanes + j]));
}

inline uint32_t MaskAtLeast(const float* x, int32_t bar) {
  uint32_t mask = 0;
  for (int64_t j = 0; j < kLanes; ++j) mask |= static_cast<uint32_t>(OrderKey(x[j]) >= bar) << j;
  return mask;
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) inline __m512i OrderKey512(const float* x) {
  __m512i bits = _mm512_loadu_si512(x);
  return _mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(0x7fffffff)));
}

__attribute__((target("avx512f"))) inline void LaneMax512(const float* x, int64_t chunks, int32_t* out) {
  __m512i best = _mm512_set1_epi32(INT32_MIN);
  for (int64_t c = 0; c < chunks; ++c) best = _mm512_max_epi32(best, OrderKey512(x + c * kLanes));
  _mm512_storeu_si512(out, best);
}

__attribute__((target("avx512f"))) inline uint32_t MaskAtLeast512(const float* x, int32_t bar) {
  return _mm512_cmpge_epi32_mask(OrderKey512(x), _mm512_set1_epi32(bar));
}
#endif

// Scratch of one thread: the group maxima and the candidates of a row.
struct Scratch {
  explicit Scratch(int64_t n) : group_max(n / kLanes + kLanes + 1), candidates(n) {}
  std::vector<int32_t> group_max;
  std::vector<int64_t> candidates;
};

// The top k of one row x[0..n) -> values, index, in two passes. The entries are split into groups
// (lanes j, j + fold, ... of `kBlock` consecutive 16-entry chunks, so one vector max per chunk finds
// them; the last n % 16 entries are one more group). The k-th largest group maximum is a bar no entry of
// the top k is below, as k groups reach it; the second pass keeps the entries at or above it (about
// 2k on random rows), and the top k of those is the answer. With fewer than k groups there is no bar
// and every entry is a candidate.
template <void (*lane_max)(const float*, int64_t, int32_t*), uint32_t (*mask_at_least)(const float*, int32_t)>
inline void TopKRowWith(const float* x, int64_t n, int64_t k, Scratch& s, float* values, int32_t* index) {
  const int64_t full = n / kLanes;  // whole 16-entry chunks
  int32_t* group_max = s.group_max.data();
  int64_t groups = 0;
  // Fold each block's 16 lane maxima into `fold` groups, the fewest that leave about 2k groups in all:
  // a bar from fewer, larger groups keeps about as few candidates and is found faster.
  const int64_t blocks = (full + kBlock - 1) / kBlock;
  int64_t fold = 1;
  while (fold < kLanes && fold * blocks < 2 * k) fold *= 2;
  int32_t lanes[kLanes];
  for (int64_t c = 0; c < full; c += kBlock, groups += fold) {
    lane_max(x + c * kLanes, std::min(kBlock, full - c), lanes);
    for (int64_t j = 0; j < fold; ++j) {
      int32_t best = lanes[j];
      for (int64_t l = j + fold; l < kLanes; l += fold) best = std::max(best, lanes[l]);
      group_max[groups + j] = best;
    }
  }
  if (full * kLanes < n) {
    group_max[groups] = INT32_MIN;
    for (int64_t i = full * kLanes; i < n; ++i) group_max[groups] = std::max(group_max[groups], OrderKey(x[i]));
    ++groups;
  }
  int32_t bar = INT32_MIN;
  if (groups >= k) {
    std::nth_element(group_max, group_max + k - 1, group_max + groups, std::greater<int32_t>());
    bar = group_max[k - 1];
  }
  int64_t* cand = s.candidates.data();
  int64_t size = 0;
  for (int64_t g = 0; g < full; ++g) {
    for (uint32_t mask = mask_at_least(x + g * kLanes, bar); mask; mask &= mask - 1) {
      int64_t i = g * kLanes + __builtin_ctz(mask);
      cand[size++] = Rank(OrderKey(x[i]), i);
    }
  }
  for (int64_t i = full * kLanes; i < n; ++i) {
    if (OrderKey(x[i]) >= bar) cand[size++] = Rank(OrderKey(x[i]), i);
  }
  if (size > k) std::nth_element(cand, cand + k - 1, cand + size, std::greater<int64_t>());
  std::sort(cand, cand + k, std::greater<int64_t>());
  for (int64_t j = 0; j < k; ++j) {
    int32_t at = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(cand[j]));
    values[j] = x[at];
    index[j] = at;
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void TopKRow512(const float* x, int64_t n, int64_t k, Scratch& s,
                                                   float* values, int32_t* index) {
  TopKRowWith<LaneMax512, MaskAtLeast512>(x, n, k, s, values, index);
}
#endif

void TopKRow(const float* x, int64_t n, int64_t k, Scratch& s, float* values, int32_t* index) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return TopKRow512(x, n, k, s, values, index);
#endif
  TopKRowWith<LaneMax, MaskAtLeast>(x, n, k, s, values, index);
}

// Runs body(state, begin, end) over [0, count) in chunks of `grain` items, on the calling thread
// and on up to num_threads - 1 tasks of XLA's intra-op pool; each participant makes its own state.
// Chunks are taken from a shared counter, and the caller waits only for chunks under way: a task
// that starts after the last chunk was taken finds none and only drops its reference.
struct Work {
  std::atomic<int64_t> next{0};
  int64_t chunks = 0;
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

template <typename MakeState, typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t grain, MakeState make_state, Body body) {
  auto work = std::make_shared<Work>();
  work->chunks = (count + grain - 1) / grain;
  auto run = [=](Work& w) {
    int64_t finished = 0;
    auto state = make_state();
    for (int64_t c; (c = w.next.fetch_add(1)) < w.chunks; ++finished)
      body(state, c * grain, std::min(count, (c + 1) * grain));
    if (finished) {
      std::lock_guard<std::mutex> lock(w.mu);
      w.done += finished;
      if (w.done == w.chunks) w.cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work, run] { run(*work); });
  run(*work);
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done == work->chunks; });
}

// Items per chunk so that a chunk is ~64k floats of work: scheduling then costs nothing against it.
int64_t Grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_item));
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> index, int64_t k) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("jaxdit_topk: x must have a last axis");
  const int64_t n = dims.back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("jaxdit_topk: k must be in [1, n]");
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  const float* in = x.typed_data();
  float* out_values = values->typed_data();
  int32_t* out_index = index->typed_data();
  ParallelFor(pool, rows, Grain(n), [n] { return Scratch(n); }, [=](Scratch& scratch, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) TopKRow(in + r * n, n, k, scratch, out_values + r * k, out_index + r * k);
  });
  return ffi::Error::Success();
}

// --- k-sparse products with a weight table [m, d]: k rows per token ----------------------------------------
// One (token, slot) pair reads or writes one d-long row. Sums run over the slots in order, and the
// row updates of one table row in (slot, token) order, as the XLA loops of sparse.py do; products
// are not fused into additions (-ffp-contract=off), so every machine gets the same bits.

__attribute__((target_clones("avx512f", "avx2", "default")))
void AddScaled(float* acc, const float* row, float w, int64_t d) {
  for (int64_t t = 0; t < d; ++t) acc[t] += w * row[t];
}

// Summed in 16 interleaved partial sums, then pairwise: an order fixed here, not by the vector width,
// and one the compiler can vectorise without reassociating.
__attribute__((target_clones("avx512f", "avx2", "default")))
float Dot(const float* a, const float* b, int64_t d) {
  float part[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= d; t += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[t + l] * b[t + l];
  for (int64_t l = 0; t < d; ++t, ++l) part[l] += a[t] * b[t];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

// Runs token(b, rows) for every token b of index [B, k] over the thread pool, rows[j] being table row
// index[b, j]; refuses an index outside the table first.
template <typename Token>
ffi::Error ForEachToken(ffi::ThreadPool& pool, const char* name, Matrix& table, IndexMatrix& index, Token token) {
  const int64_t m = table.dimensions()[0], d = table.dimensions()[1];
  const int64_t batch = index.dimensions()[0], k = index.dimensions()[1];
  const int32_t* idx = index.typed_data();
  for (int64_t p = 0; p < batch * k; ++p)
    if (idx[p] < 0 || idx[p] >= m) return ffi::Error::InvalidArgument(std::string(name) + ": index out of range");
  const float* rows = table.typed_data();
  ParallelFor(pool, batch, Grain(k * d), [k] { return std::vector<const float*>(k); },
              [=](std::vector<const float*>& at, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < k; ++j) at[j] = rows + int64_t{idx[b * k + j]} * d;
      token(b, at.data());
    }
  });
  return ffi::Error::Success();
}

// out[b] = sum_j weight[b, j] * table[index[b, j]] -> [B, d]
ffi::Error WeightedRows(ffi::ThreadPool pool, Matrix table, IndexMatrix index, Matrix weight, MatrixResult out) {
  const int64_t d = table.dimensions()[1], k = index.dimensions()[1];
  const float* w = weight.typed_data();
  float* o = out->typed_data();
  return ForEachToken(pool, "jaxdit_weighted_rows", table, index, [=](int64_t b, const float* const* rows) {
    std::fill(o + b * d, o + (b + 1) * d, 0.0f);
    for (int64_t j = 0; j < k; ++j) AddScaled(o + b * d, rows[j], w[b * k + j], d);
  });
}

// out[b, j] = src[b] . table[index[b, j]] -> [B, k]
ffi::Error RowProducts(ffi::ThreadPool pool, Matrix table, IndexMatrix index, Matrix src, MatrixResult out) {
  const int64_t d = table.dimensions()[1], k = index.dimensions()[1];
  const float* x = src.typed_data();
  float* o = out->typed_data();
  return ForEachToken(pool, "jaxdit_row_products", table, index, [=](int64_t b, const float* const* rows) {
    for (int64_t j = 0; j < k; ++j) o[b * k + j] = Dot(x + b * d, rows[j], d);
  });
}

// out[i] = sum over (j, b) with index[b, j] = i of weight[b, j] * src[b] -> [m, d], or its transpose
// [d, m] with `transposed`; with a `table` [m, d], also dots[b, j] = src[b] . table[index[b, j]] (the
// decoder's backward pass needs both, and so reads each table row once, in order, instead of k random
// rows per token). The (slot, token) pairs are first bucketed by row (a stable counting sort, so each
// row still sums in (slot, token) order); then each output row is summed once, in cache, by whichever
// thread takes its chunk of rows. Transposed, rows are summed kTile at a time in a tile and written out
// as kTile-float runs of the [d, m] result, so no [m, d] array and no separate transpose.
ffi::Error Scatter(ffi::ThreadPool& pool, const char* name, IndexMatrix& index, Matrix& weight, Matrix& src,
                   int64_t m, bool transposed, float* o, const float* table, float* dots) {
  const int64_t d = src.dimensions()[1], batch = index.dimensions()[0], k = index.dimensions()[1];
  const int32_t* idx = index.typed_data();
  const float* w = weight.typed_data();
  const float* x = src.typed_data();
  std::vector<int64_t> start(m + 1, 0);
  for (int64_t p = 0; p < batch * k; ++p) {
    if (idx[p] < 0 || idx[p] >= m) return ffi::Error::InvalidArgument(std::string(name) + ": index out of range");
    ++start[idx[p] + 1];
  }
  for (int64_t i = 0; i < m; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int64_t> pairs(batch * k);  // b * k + j, grouped by row, (j, b) order within a row
  for (int64_t j = 0; j < k; ++j)
    for (int64_t b = 0; b < batch; ++b) pairs[fill[idx[b * k + j]]++] = b * k + j;
  const int64_t* row_start = start.data();
  const int64_t* row_pairs = pairs.data();
  auto sum_row = [=](int64_t i, float* row) {
    std::fill(row, row + d, 0.0f);
    for (int64_t p = row_start[i]; p < row_start[i + 1]; ++p) {
      const float* x_b = x + (row_pairs[p] / k) * d;
      AddScaled(row, x_b, w[row_pairs[p]], d);
      if (table) dots[row_pairs[p]] = Dot(x_b, table + i * d, d);
    }
  };
  const int64_t grain = kTile * Grain(kTile * d * std::max<int64_t>(1, batch * k / m));
  ParallelFor(pool, m, grain, [=] { return std::vector<float>(transposed ? kTile * d : 0); },
              [=](std::vector<float>& tile, int64_t begin, int64_t end) {
    if (!transposed) {
      for (int64_t i = begin; i < end; ++i) sum_row(i, o + i * d);
      return;
    }
    for (int64_t i0 = begin; i0 < end; i0 += kTile) {
      const int64_t rows = std::min(kTile, end - i0);
      for (int64_t r = 0; r < rows; ++r) sum_row(i0 + r, tile.data() + r * d);
      for (int64_t t = 0; t < d; ++t)
        for (int64_t r = 0; r < rows; ++r) o[t * m + i0 + r] = tile[r * d + t];
    }
  });
  return ffi::Error::Success();
}

ffi::Error ScatterRows(ffi::ThreadPool pool, IndexMatrix index, Matrix weight, Matrix src, MatrixResult out,
                       bool transposed) {
  return Scatter(pool, "jaxdit_scatter_rows", index, weight, src, out->dimensions()[transposed ? 1 : 0],
                 transposed, out->typed_data(), nullptr, nullptr);
}

// (scatter_rows of weight and src into [m, d], row_products of table with src): the decoder's backward.
ffi::Error ScatterRowsDot(ffi::ThreadPool pool, IndexMatrix index, Matrix weight, Matrix src, Matrix table,
                          MatrixResult out, MatrixResult dots) {
  if (table.dimensions()[0] != out->dimensions()[0] || table.dimensions()[1] != src.dimensions()[1])
    return ffi::Error::InvalidArgument("jaxdit_scatter_rows_dot: table must be [m, d]");
  return Scatter(pool, "jaxdit_scatter_rows_dot", index, weight, src, out->dimensions()[0], false,
                 out->typed_data(), table.typed_data(), dots->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxditTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));

// (table [m, d], index [B, k], [B, k or d]) -> [B, d or k]: the two gathers share one signature.
static auto BindGather() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Matrix>().Arg<IndexMatrix>().Arg<Matrix>().Ret<Matrix>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxditWeightedRows, WeightedRows, BindGather());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxditRowProducts, RowProducts, BindGather());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxditScatterRows, ScatterRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<IndexMatrix>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxditScatterRowsDot, ScatterRowsDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<IndexMatrix>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Ret<Matrix>());
