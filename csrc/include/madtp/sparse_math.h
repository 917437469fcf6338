// Shape rules and plan-cache key of the cuSPARSELt 2:4 linear (csrc/sparse_gemm.cpp). Torch-free and
// CUDA-free so that plain g++ compiles it and csrc/tests/test_sparse_math.cpp checks it on the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <iterator>
#include <list>
#include <unordered_map>
#include <utility>

namespace madtp {

// cuSPARSELt's descriptor constraints (cusparseLtStructuredDescriptorInit / cusparseLtDenseDescriptorInit,
// "rows, cols, and ld must be a multiple of ..."): a structured matrix needs multiples of 16 for 16-bit
// values (32 for 8-bit, 8 for 32-bit), a dense one multiples of 8 for 16-bit (16 for 8-bit, 4 for
// 32-bit): 32 and 16 bytes. PyTorch pads by the same table (SparseSemiStructuredTensorCUSPARSELT,
// fp16/bf16: sparse 16 x 16, dense 8 x 8).
constexpr int64_t structured_multiple(int64_t element_bytes) { return 32 / element_bytes; }
constexpr int64_t dense_multiple(int64_t element_bytes) { return 16 / element_bytes; }

// Smallest multiple of `multiple` (> 0) that is >= n (>= 0).
constexpr int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// y [M, N] = x [M, K] W^T runs as D (N x M_pad) = A (N x K, 2:4) B (K x M_pad): the token count M is the
// only dense-only dimension, padded to the dense multiple. N and K are dimensions of the structured A.
constexpr int64_t padded_tokens(int64_t m, int64_t element_bytes) { return round_up(m, dense_multiple(element_bytes)); }

// The token count a problem is planned for: M rounded up to a bucket, so that ragged batches (a new token count
// per call after pruning) reuse a few plans instead of building one per count. Up to 64 tokens, the dense
// multiple (8 for 16-bit); past that, a multiple of 2^(floor(log2 M) - 3): 8 buckets per octave, so at most
// 12.5% padded rows (zeros, whose outputs are dropped) and O(log M) plans per weight shape.
constexpr int64_t token_bucket(int64_t m, int64_t element_bytes) {
  const int64_t dense = dense_multiple(element_bytes);
  if (m <= 64) return round_up(m, dense);
  int64_t octave = 64;  // largest power of two <= m
  while (octave <= m / 2) octave *= 2;
  const int64_t step = octave / 8 > dense ? octave / 8 : dense;
  return round_up(m, step);
}

constexpr bool valid_weight_shape(int64_t out_features, int64_t in_features, int64_t element_bytes) {
  return out_features > 0 && in_features > 0 && out_features % structured_multiple(element_bytes) == 0 &&
         in_features % structured_multiple(element_bytes) == 0;
}

// One cached cuSPARSELt problem: everything the descriptors, the algorithm and the plan depend on.
// dtype is the caller's scalar-type code (torch's c10::ScalarType), kept as an int so this stays torch-free.
struct PlanKey {
  int device;
  int dtype;
  int64_t m_padded;
  int64_t n;
  int64_t k;
  bool has_bias;

  friend bool operator==(const PlanKey& a, const PlanKey& b) {
    return a.device == b.device && a.dtype == b.dtype && a.m_padded == b.m_padded && a.n == b.n && a.k == b.k &&
           a.has_bias == b.has_bias;
  }
};

struct PlanKeyHash {
  std::size_t operator()(const PlanKey& key) const {
    std::size_t h = 0;
    // boost::hash_combine: order-sensitive, so (n, k) and (k, n) land apart.
    const auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    mix(std::hash<int>{}(key.device));
    mix(std::hash<int>{}(key.dtype));
    mix(std::hash<int64_t>{}(key.m_padded));
    mix(std::hash<int64_t>{}(key.n));
    mix(std::hash<int64_t>{}(key.k));
    mix(std::hash<bool>{}(key.has_bias));
    return h;
  }
};

// A map that holds at most `capacity` values and evicts the least recently used (found or inserted) one. Not
// thread-safe: the plan cache guards it with its mutex. Values never move (node-based), so a Value may hold
// pointers into itself (the cuSPARSELt descriptors an Entry's plans refer to).
template <typename Key, typename Value, typename Hash = std::hash<Key>>
class LruCache {
 public:
  explicit LruCache(std::size_t capacity) : capacity_(capacity > 0 ? capacity : 1) {}

  // The value of `key`, now the most recent, or nullptr.
  Value* find(const Key& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return &it->second->second;
  }

  // Inserts (or replaces) `key`, evicting the least recent entry when full; returns the stored value.
  Value& insert(const Key& key, Value value) {
    auto it = index_.find(key);
    if (it != index_.end()) {
      order_.erase(it->second);
      index_.erase(it);
    } else if (order_.size() >= capacity_) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
    order_.emplace_front(key, std::move(value));
    index_.emplace(key, order_.begin());
    return order_.front().second;
  }

  std::size_t size() const { return order_.size(); }
  std::size_t capacity() const { return capacity_; }
  // Most recent first.
  typename std::list<std::pair<Key, Value>>::const_iterator begin() const { return order_.begin(); }
  typename std::list<std::pair<Key, Value>>::const_iterator end() const { return order_.end(); }

 private:
  std::size_t capacity_;
  std::list<std::pair<Key, Value>> order_;
  std::unordered_map<Key, typename std::list<std::pair<Key, Value>>::iterator, Hash> index_;
};

}  // namespace madtp
