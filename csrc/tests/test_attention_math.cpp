// Host tests of csrc/include/madtp/attention_math.h, the per-tile math of the varlen attention kernels.
// Besides the single functions, a host re-implementation of both kernels built from them (same work list,
// same tile order, same online-softmax steps, fp32 like the kernels) is checked against a straightforward
// float64 softmax attention (outputs, LSE, statistics) over many ragged shapes: empty and 1-long sequences, block boundaries, causal
// with Lk < Lq (fully masked rows), Lk == Lq and Lk > Lq, and score magnitudes from tiny to ~1e4.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "madtp/attention_math.h"
#include "check.h"

namespace {

using madtp::key_end;
using madtp::key_visible;
using madtp::num_blocks;
using madtp::query_begin;
using madtp::tile_bound;
using madtp::tile_sequence;

constexpr float kInf = std::numeric_limits<float>::infinity();
// The kernels' tile sizes (attention_kernels.cuh: kBlockM = kBlockN = 64).
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;

void test_scalar_functions() {
  // A row that has seen only masked scores keeps max -inf, sum 0, and yields no NaN anywhere.
  float m = -kInf;
  CHECK(madtp::online_softmax_update(m, -kInf) == 0.0f);
  CHECK(m == -kInf);
  CHECK(madtp::softmax_prob(-kInf, m) == 0.0f);
  CHECK(madtp::softmax_inv_sum(0.0f) == 0.0f);
  CHECK(madtp::softmax_lse(-kInf, 0.0f) == kInf);
  CHECK(std::isnan(madtp::softmax_lse(3.0f, std::nanf(""))));  // a NaN score's row stays NaN
  CHECK(std::isnan(madtp::softmax_lse(std::nanf(""), 2.0f)));
  CHECK(madtp::stats_prob(-kInf, kInf, true) == 0.0f);
  CHECK(madtp::stats_prob(3.0f, kInf, true) == 0.0f);
  CHECK(madtp::stats_prob(std::numeric_limits<float>::quiet_NaN(), 1.0f, false) == 0.0f);
  // First visible score: the factor is 0 (nothing to rescale), the max becomes the score.
  CHECK(madtp::online_softmax_update(m, 5.0f) == 0.0f);
  CHECK(m == 5.0f);
  CHECK(madtp::softmax_prob(5.0f, m) == 1.0f);
  // A larger max rescales by exp2 of the difference; a smaller one leaves everything as is.
  CHECK(madtp::online_softmax_update(m, 7.0f) == 0.25f);
  CHECK(m == 7.0f);
  CHECK(madtp::online_softmax_update(m, -kInf) == 1.0f);
  CHECK(madtp::online_softmax_update(m, 1.0f) == 1.0f);
  CHECK(m == 7.0f);
  CHECK(std::fabs(madtp::softmax_lse(7.0f, 4.0f) - 9.0f * madtp::kLn2) <= 1e-6f);
  // The statistics pass inverts it: probability 1/4 for a score equal to the running max.
  CHECK(std::fabs(madtp::stats_prob(7.0f, madtp::softmax_lse(7.0f, 4.0f), true) - 0.25f) <= 1e-6f);
  // headmax: query 0 never counts; otherwise exactly the visible pairs. The max over heads keeps a NaN from
  // either side (fmaxf would drop it), and starts from 0 (probabilities are >= 0).
  CHECK(!madtp::headmax_counted(0, 0, 4, 4, false) && madtp::headmax_counted(1, 3, 4, 4, false));
  CHECK(!madtp::headmax_counted(1, 3, 4, 4, true) && madtp::headmax_counted(3, 3, 4, 4, true));
  CHECK(!madtp::headmax_counted(4, 0, 4, 4, false) && !madtp::headmax_counted(1, 4, 4, 4, false));
  CHECK(madtp::nan_max(0.25f, 0.5f) == 0.5f && madtp::nan_max(0.5f, 0.25f) == 0.5f);
  CHECK(std::isnan(madtp::nan_max(std::nanf(""), 0.5f)) && std::isnan(madtp::nan_max(0.5f, std::nanf(""))));
  CHECK(madtp::mask_score(2.0f, false) == -kInf);
  CHECK(madtp::mask_score(2.0f, true) == 2.0f);
  // Visible non-finite v terms: p > 0 keeps the value, p = 0 or NaN gives NaN (0 * inf); hidden ones add 0.
  CHECK(madtp::pv_nonfinite_term(0.5f, kInf, true) == kInf && madtp::pv_nonfinite_term(0.5f, -kInf, true) == -kInf);
  CHECK(std::isnan(madtp::pv_nonfinite_term(0.0f, kInf, true)) && std::isnan(madtp::pv_nonfinite_term(0.5f, NAN, true)));
  CHECK(madtp::pv_nonfinite_term(0.0f, NAN, false) == 0.0f && madtp::pv_nonfinite_term(0.5f, 3.0f, true) == 0.0f);
  CHECK(madtp::pv_operand(NAN) == 0.0f && madtp::pv_operand(-kInf) == 0.0f && madtp::pv_operand(2.0f) == 2.0f);
  // Query block 0 against key block 0 of a 100 x 100 causal sequence hides keys; key block 0 of queries 64.. not.
  CHECK(madtp::tile_hides_keys(0, 0, kBlockN, 100, 100, true) && !madtp::tile_hides_keys(64, 0, kBlockN, 100, 100, true));
  CHECK(!madtp::tile_hides_keys(0, 0, kBlockN, 100, 100, false));
}

void test_mask_and_ranges() {
  // Bottom-right alignment: with lq = 2, lk = 4, query 0 sees keys 0..2 and query 1 sees all four.
  CHECK(key_visible(0, 2, 2, 4, true) && !key_visible(0, 3, 2, 4, true) && key_visible(1, 3, 2, 4, true));
  // lq = 4, lk = 2: queries 0 and 1 see nothing, query 2 sees key 0.
  CHECK(!key_visible(1, 0, 4, 2, true) && key_visible(2, 0, 4, 2, true) && !key_visible(2, 1, 4, 2, true));
  // Padding rows and columns are never visible.
  CHECK(!key_visible(3, 0, 3, 5, false) && !key_visible(0, 5, 3, 5, false) && key_visible(2, 4, 3, 5, false));
  // key_end / query_begin are the exact bounds of visibility, brute-forced.
  const int64_t lens[] = {0, 1, 2, 17, 63, 64, 65, 100, 130};
  for (const bool causal : {false, true}) {
    for (const int64_t lq : lens) {
      for (const int64_t lk : lens) {
        for (int64_t m0 = 0; m0 < lq; m0 += kBlockM) {
          const int64_t m_end = std::min(lq, m0 + kBlockM);
          int64_t last = -1;
          for (int64_t i = m0; i < m_end; ++i)
            for (int64_t j = 0; j < lk; ++j)
              if (key_visible(i, j, lq, lk, causal)) last = std::max(last, j);
          CHECK(key_end(m_end, lq, lk, causal) == last + 1);
        }
        for (int64_t n0 = 0; n0 < lk; n0 += kBlockN) {
          int64_t first = lq;
          for (int64_t i = lq - 1; i >= 0; --i)
            for (int64_t j = n0; j < std::min(lk, n0 + kBlockN); ++j)
              if (key_visible(i, j, lq, lk, causal)) first = i;
          // query_begin may be early only when no query at all sees the block.
          CHECK(query_begin(n0, lq, lk, causal) == first || (first == lq && query_begin(n0, lq, lk, causal) <= lq));
        }
      }
    }
  }
}

// The work list of build_tiles_kernel: offsets = exclusive scan of num_blocks, tile t -> (sequence, block).
struct Tile {
  int64_t seq, block;
};

std::vector<Tile> build_tiles(const std::vector<int64_t>& cu, int64_t block) {
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  std::vector<int64_t> offsets(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) offsets[b + 1] = offsets[b] + num_blocks(cu[b + 1] - cu[b], block);
  std::vector<Tile> tiles;
  for (int64_t t = 0; t < offsets[batch]; ++t) {
    const int64_t b = tile_sequence(offsets, batch, t);
    tiles.push_back({b, t - offsets[b]});
  }
  return tiles;
}

void test_work_list(std::mt19937& rng) {
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t batch = std::uniform_int_distribution<int64_t>(0, 40)(rng);
    std::vector<int64_t> cu(batch + 1, 0);
    int64_t max_len = 0;
    for (int64_t b = 0; b < batch; ++b) {
      // Many empty and short sequences, some long ones: the skew the flattened list exists for.
      const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
      const int64_t len = kind < 3 ? 0 : kind < 8 ? std::uniform_int_distribution<int64_t>(1, 70)(rng)
                                                  : std::uniform_int_distribution<int64_t>(100, 3000)(rng);
      cu[b + 1] = cu[b] + len;
      max_len = std::max(max_len, len);
    }
    for (const int64_t block : {kBlockM, int64_t{16}}) {
      const std::vector<Tile> tiles = build_tiles(cu, block);
      CHECK(static_cast<int64_t>(tiles.size()) <= tile_bound(cu[batch], batch, max_len, block));
      // Every row of every sequence is covered by exactly one tile, in sequence order.
      std::vector<int> covered(cu[batch], 0);
      for (const Tile& tile : tiles) {
        CHECK(tile.seq >= 0 && tile.seq < batch);
        const int64_t len = cu[tile.seq + 1] - cu[tile.seq];
        CHECK(tile.block * block < len);
        for (int64_t r = tile.block * block; r < std::min(len, (tile.block + 1) * block); ++r) ++covered[cu[tile.seq] + r];
      }
      for (const int c : covered) CHECK(c == 1);
    }
  }
}

struct Problem {
  std::vector<int64_t> cu_q, cu_k;
  int64_t d = 0;
  float scale = 0.0f;
  bool causal = false;
  std::vector<float> q, k, v;  // [T, d] rows, one head (the kernels run heads independently)
};

struct Result {
  std::vector<double> out, received, cls, lse;
};

// fp32 tiled attention driven by the header's functions, in the kernels' order: forward tiles from the work
// list, key blocks of kBlockN, the online-softmax update per block; then the statistics tiles over key blocks,
// query blocks from query_begin, probabilities from the forward's LSE.
Result tiled_attention(const Problem& pb) {
  const int64_t batch = static_cast<int64_t>(pb.cu_q.size()) - 1, d = pb.d;
  const int64_t tq = pb.cu_q[batch], tk = pb.cu_k[batch];
  const float scale_log2 = pb.scale * madtp::kLog2e;
  Result res;
  res.out.assign(tq * d, std::nan(""));  // every row must be written
  res.received.assign(tk, std::nan(""));
  res.cls.assign(tk, std::nan(""));
  res.lse.assign(tq, std::nan(""));
  const auto score = [&](int64_t qi, int64_t kj) {
    float s = 0.0f;
    for (int64_t c = 0; c < d; ++c) s += pb.q[qi * d + c] * pb.k[kj * d + c];
    return s * scale_log2;
  };

  for (const Tile& tile : build_tiles(pb.cu_q, kBlockM)) {
    const int64_t q0 = pb.cu_q[tile.seq], lq = pb.cu_q[tile.seq + 1] - q0;
    const int64_t k0 = pb.cu_k[tile.seq], lk = pb.cu_k[tile.seq + 1] - k0;
    const int64_t m0 = tile.block * kBlockM, m_end = std::min(lq, m0 + kBlockM);
    const int64_t n_end = key_end(m_end, lq, lk, pb.causal);
    for (int64_t i = m0; i < m_end; ++i) {
      float row_max = -kInf, row_sum = 0.0f;
      std::vector<float> acc(d, 0.0f);
      for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
        const bool need_mask = pb.causal || n0 + kBlockN > lk;
        float s[kBlockN];
        float tile_max = -kInf;
        for (int64_t c = 0; c < kBlockN; ++c) {
          const int64_t j = n0 + c;
          s[c] = j < lk ? score(q0 + i, k0 + j) : 0.0f;  // the kernel's zero-filled padding keys
          if (need_mask) s[c] = madtp::mask_score(s[c], key_visible(i, j, lq, lk, pb.causal));
          tile_max = std::max(tile_max, s[c]);
        }
        const float alpha = madtp::online_softmax_update(row_max, tile_max);
        row_sum *= alpha;
        for (float& a : acc) a *= alpha;
        // The kernel's P V runs over every real key of the tile, hidden ones included (p = 0); a tile that
        // hides keys takes the finite part of v and adds the visible non-finite terms apart.
        const bool diagonal = madtp::tile_hides_keys(m0, n0, kBlockN, lq, lk, pb.causal);
        for (int64_t c = 0; c < kBlockN; ++c) {
          const float p = madtp::softmax_prob(s[c], row_max);
          row_sum += p;
          if (n0 + c < lk) {
            const bool visible = key_visible(i, n0 + c, lq, lk, pb.causal);
            for (int64_t e = 0; e < d; ++e) {
              const float x = pb.v[(k0 + n0 + c) * d + e];
              acc[e] += diagonal ? p * madtp::pv_operand(x) + madtp::pv_nonfinite_term(p, x, visible) : p * x;
            }
          }
        }
      }
      const float inv = madtp::softmax_inv_sum(row_sum);
      for (int64_t e = 0; e < d; ++e) res.out[(q0 + i) * d + e] = acc[e] * inv;
      res.lse[q0 + i] = madtp::softmax_lse(row_max, row_sum);
    }
  }

  for (const Tile& tile : build_tiles(pb.cu_k, kBlockN)) {
    const int64_t q0 = pb.cu_q[tile.seq], lq = pb.cu_q[tile.seq + 1] - q0;
    const int64_t k0 = pb.cu_k[tile.seq], lk = pb.cu_k[tile.seq + 1] - k0;
    const int64_t n0 = tile.block * kBlockN, n_end = std::min(lk, n0 + kBlockN);
    for (int64_t j = n0; j < n_end; ++j) {
      float received = 0.0f, cls = 0.0f;
      for (int64_t mb = query_begin(n0, lq, lk, pb.causal) / kBlockM; mb < num_blocks(lq, kBlockM); ++mb) {
        for (int64_t i = mb * kBlockM; i < std::min(lq, (mb + 1) * kBlockM); ++i) {
          const float p = madtp::stats_prob(score(q0 + i, k0 + j), static_cast<float>(res.lse[q0 + i]), key_visible(i, j, lq, lk, pb.causal));
          received += p;
          if (i == 0) cls = p;
        }
      }
      res.received[k0 + j] = received;
      res.cls[k0 + j] = cls;
    }
  }
  return res;
}

// Straightforward float64 softmax attention with the reference semantics (madtp_kernels/reference).
Result reference_attention(const Problem& pb) {
  const int64_t batch = static_cast<int64_t>(pb.cu_q.size()) - 1, d = pb.d;
  Result res;
  res.out.assign(pb.cu_q[batch] * d, 0.0);
  res.received.assign(pb.cu_k[batch], 0.0);
  res.cls.assign(pb.cu_k[batch], 0.0);
  res.lse.assign(pb.cu_q[batch], std::numeric_limits<double>::infinity());
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q0 = pb.cu_q[b], lq = pb.cu_q[b + 1] - q0, k0 = pb.cu_k[b], lk = pb.cu_k[b + 1] - k0;
    for (int64_t i = 0; i < lq; ++i) {
      std::vector<double> s(lk, -std::numeric_limits<double>::infinity());
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < lk; ++j) {
        if (pb.causal && j > i + lk - lq) continue;
        double dot = 0.0;
        for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(pb.q[(q0 + i) * d + c]) * pb.k[(k0 + j) * d + c];
        s[j] = dot * pb.scale;
        mx = std::max(mx, s[j]);
      }
      if (mx == -std::numeric_limits<double>::infinity()) continue;  // no visible key: zeros, no stats
      double sum = 0.0;
      for (int64_t j = 0; j < lk; ++j) sum += std::exp(s[j] - mx);
      res.lse[q0 + i] = mx + std::log(sum);
      for (int64_t j = 0; j < lk; ++j) {
        if (pb.causal && j > i + lk - lq) continue;  // a hidden key is never read (its v may be NaN)
        const double p = std::exp(s[j] - mx) / sum;
        for (int64_t e = 0; e < d; ++e) res.out[(q0 + i) * d + e] += p * pb.v[(k0 + j) * d + e];
        res.received[k0 + j] += p;
        if (i == 0) res.cls[k0 + j] = p;
      }
    }
  }
  return res;
}

// fp32 against fp64: the error grows with the score magnitude (an fp32 score of magnitude |s| is off by
// ~|s| * 2^-24, and the probability by as much relatively), hence a tolerance scaled by the largest score.
bool close(const std::vector<double>& got, const std::vector<double>& want, double tol, const char* what,
           const char* shape) {
  for (size_t n = 0; n < want.size(); ++n) {
    if (got[n] == want[n]) continue;  // exact, including the +inf LSE of a query without keys
    if (std::isnan(got[n]) && std::isnan(want[n])) continue;
    if (!(std::fabs(got[n] - want[n]) <= tol * (1.0 + std::fabs(want[n])))) {  // also catches NaN
      std::fprintf(stderr, "%s [%s] element %zu: got %.9g, expected %.9g (tol %.3g)\n", what, shape, n, got[n],
                   want[n], tol);
      return false;
    }
  }
  return true;
}

void run_case(std::mt19937& rng, const std::vector<int64_t>& lq, const std::vector<int64_t>& lk, bool causal,
              float score_magnitude, float v_value = 0.0f) {
  Problem pb;
  pb.d = 32;
  pb.causal = causal;
  pb.cu_q.assign(1, 0);
  pb.cu_k.assign(1, 0);
  for (size_t b = 0; b < lq.size(); ++b) {
    pb.cu_q.push_back(pb.cu_q.back() + lq[b]);
    pb.cu_k.push_back(pb.cu_k.back() + lk[b]);
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto* buf : {&pb.q, &pb.k}) {
    const int64_t rows = buf == &pb.q ? pb.cu_q.back() : pb.cu_k.back();
    for (int64_t n = 0; n < rows * pb.d; ++n) buf->push_back(normal(rng));
  }
  for (int64_t n = 0; n < pb.cu_k.back() * pb.d; ++n) pb.v.push_back(normal(rng));
  if (v_value != 0.0f && !pb.v.empty()) {  // one non-finite v entry at a random key and dim
    pb.v[std::uniform_int_distribution<size_t>(0, pb.v.size() - 1)(rng)] = v_value;
  }
  // Scores q.k * scale have a standard deviation of ~score_magnitude.
  pb.scale = score_magnitude / std::sqrt(static_cast<float>(pb.d));

  const Result got = tiled_attention(pb);
  const Result want = reference_attention(pb);
  const double tol = 5e-7 * (1.0 + 8.0 * score_magnitude);
  char shape[160];
  std::snprintf(shape, sizeof shape, "B=%zu lq0=%lld lk0=%lld causal=%d magnitude=%g v=%g", lq.size(),
                static_cast<long long>(lq[0]), static_cast<long long>(lk[0]), causal ? 1 : 0, score_magnitude,
                v_value);
  if (!close(got.out, want.out, tol, "out", shape) || !close(got.received, want.received, tol * 4, "received", shape) ||
      !close(got.cls, want.cls, tol, "cls", shape) ||
      !close(got.lse, want.lse, tol * (1.0 + score_magnitude), "lse", shape)) {
    ++madtp_test::failures;
  }
}

void test_tiled_attention(std::mt19937& rng) {
  const int64_t lens[] = {0, 1, 17, 64, 65, 100};
  const float magnitudes[] = {1e-3f, 1.0f, 30.0f, 1000.0f};
  // One sequence per shape: every (Lq, Lk) pair, causal with Lk < Lq, == and >, several magnitudes.
  for (const bool causal : {false, true}) {
    for (const int64_t lq : lens) {
      for (const int64_t lk : lens) {
        for (const float mag : magnitudes) run_case(rng, {lq}, {lk}, causal, mag);
      }
    }
  }
  // Ragged batches: random self and cross attention lengths, with empty sequences and one long one.
  for (int trial = 0; trial < 40; ++trial) {
    const int batch = std::uniform_int_distribution<int>(1, 6)(rng);
    std::vector<int64_t> lq, lk;
    for (int b = 0; b < batch; ++b) {
      const int64_t a = std::uniform_int_distribution<int64_t>(0, 40)(rng);
      lq.push_back(a);
      lk.push_back(trial % 2 ? a : std::uniform_int_distribution<int64_t>(0, 40)(rng));
    }
    lq[0] = 150 + trial;  // skew: one sequence several blocks long
    lk[0] = trial % 2 ? lq[0] : 130;
    run_case(rng, lq, lk, trial % 4 >= 2, trial % 3 == 0 ? 20.0f : 1.0f);
  }
}

// A NaN / +inf / -inf in v reaches exactly the queries that see its key: with causal masking not the earlier
// queries of its own key block (the diagonal tiles), in self and cross attention.
void test_nonfinite_v(std::mt19937& rng) {
  const float values[] = {std::numeric_limits<float>::quiet_NaN(), kInf, -kInf};
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t lq = std::uniform_int_distribution<int64_t>(1, 150)(rng);
    const int64_t lk = trial % 2 ? lq : std::uniform_int_distribution<int64_t>(1, 150)(rng);
    run_case(rng, {lq}, {lk}, trial % 4 != 3, 1.0f, values[trial % 3]);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_scalar_functions();
  test_mask_and_ranges();
  test_work_list(rng);
  test_tiled_attention(rng);
  test_nonfinite_v(rng);
  return madtp_test::report("test_attention_math");
}
