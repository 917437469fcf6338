// 2:4 sparse linear through cuSPARSELt: y [M, N] = x [M, K] W^T + bias, W [N, K] 2:4 along K.
//
// Transposed formulation: D = A B with A = W (structured, N x K row-major), B = x^T (x's row-major [M, K]
// memory described as an M x K row-major matrix taken with opB = TRANSPOSE) and D = y^T (N x M column-major,
// which is y's row-major [M, N] memory). The weight is the structured operand whatever M is, so it is
// compressed once against an M-free descriptor (the *2 helpers), and the output needs no transpose copy.
//
// Per-call descriptor and plan creation is what made PyTorch's op 0.41x of dense, so everything but the
// matmul itself is cached: one handle per device, and per (device, dtype, M bucket, N, K, has_bias) the
// matrix descriptors, the algorithm config and the plans. M is bucketed (token_bucket: at most 12.5% padded
// rows), so ragged batches reuse plans, and the cache is an LRU of kMaxCachedShapes entries.
#include <cusparseLt.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <ostream>
#include <unordered_map>

#include "madtp/sparse_math.h"
#include "launch_checks.h"
#include "ops.h"

namespace madtp {
namespace {

constexpr int64_t kElementBytes = 2;  // fp16 / bf16, the only types these ops take
// The 16-byte pointer alignment cuSPARSELt asks of every operand ("only multiples of 16 are supported").
constexpr uint32_t kAlignment = 16;
// Plans bound to distinct bias pointers per cached shape (see Entry::plans); past this the shape's plans are
// rebuilt from scratch rather than grown without bound (e.g. a bias re-cast to fp16 at a new address per call).
constexpr size_t kMaxPlansPerShape = 64;
// Cached problems (device, dtype, M bucket, N, K, has_bias), least recently used evicted past this: a model of
// 4 linear shapes meets ~8 token buckets per octave of batch size, so 256 covers several models and batch sizes,
// while a stream of new shapes cannot grow host memory (~256 x 64 plans of a few KB at most) without bound.
constexpr size_t kMaxCachedShapes = 256;

// The problem a status refers to, printed only when a check fails (TORCH_CHECK builds its message lazily).
struct Shape {
  int64_t m;  // -1: no token dimension (compression)
  int64_t n;
  int64_t k;
  at::ScalarType dtype;
};

std::ostream& operator<<(std::ostream& os, const Shape& s) {
  if (s.m >= 0) os << "M=" << s.m << ", ";
  return os << "N=" << s.n << ", K=" << s.k << " (" << s.dtype << ")";
}

void check_lt(cusparseStatus_t status, const char* call, const Shape& shape) {
  TORCH_CHECK(status == CUSPARSE_STATUS_SUCCESS, call, " failed for ", shape, ": ", cusparseLtGetErrorString(status));
}

#define MADTP_LT_CHECK(shape, fn, ...) check_lt(fn(__VA_ARGS__), #fn, shape)

cudaDataType cuda_type(at::ScalarType dtype) { return dtype == at::kHalf ? CUDA_R_16F : CUDA_R_16BF; }

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlignment == 0; }

// One handle per device, created on first use under the caller's CUDAGuard (a handle is tied to the device
// current at cusparseLtInit). Never destroyed: cusparseLtDestroy at process exit could run after the CUDA
// context is torn down, and the OS reclaims the host memory anyway.
const cusparseLtHandle_t* handle_for(c10::DeviceIndex device, const Shape& shape) {
  struct Handles {
    std::mutex mutex;
    std::unordered_map<c10::DeviceIndex, std::unique_ptr<cusparseLtHandle_t>> by_device;
  };
  static auto* handles = new Handles();
  const std::lock_guard<std::mutex> lock(handles->mutex);
  auto& slot = handles->by_device[device];
  if (!slot) {
    auto handle = std::make_unique<cusparseLtHandle_t>();
    MADTP_LT_CHECK(shape, cusparseLtInit, handle.get());
    slot = std::move(handle);
  }
  return slot.get();
}

// W as cuSPARSELt's structured operand A: N x K row-major, 2:4 along K. M-free, so the compressed buffer
// serves every token count.
void init_weight_descriptor(const cusparseLtHandle_t* handle, cusparseLtMatDescriptor_t* desc, const Shape& shape) {
  MADTP_LT_CHECK(shape, cusparseLtStructuredDescriptorInit, handle, desc, shape.n, shape.k, shape.k, kAlignment,
                 cuda_type(shape.dtype), CUSPARSE_ORDER_ROW, CUSPARSELT_SPARSITY_50_PERCENT);
}

// A matmul descriptor, algorithm selection and plan bound to one bias pointer. Each owns its matmul
// descriptor and is never modified after init, so it is correct whether cusparseLtMatmulPlanInit copies the
// descriptor's bias pointer or keeps referring to the descriptor.
struct Plan {
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg;
  cusparseLtMatmulPlan_t plan;
  size_t workspace = 0;
  bool alg_ready = false;
  bool plan_ready = false;

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {  // statuses ignored: nothing to do about a failed destroy, and destructors must not throw
    if (plan_ready) cusparseLtMatmulPlanDestroy(&plan);
    if (alg_ready) cusparseLtMatmulAlgSelectionDestroy(&alg);
  }
};

// The cached state of one PlanKey. Matmul descriptors refer to a, b, c by address: an Entry never moves.
struct Entry {
  cusparseLtMatDescriptor_t a, b, c;
  int descriptors_ready = 0;  // a, b, c initialised in that order; destroyed in reverse
  size_t compressed_size = 0;
  bool searched = false;
  int alg_id = 0;  // the config every plan of this shape uses: the default, or the searched one once searched
  // Keyed by bias pointer (nullptr without bias): a plan carries its bias pointer, and the layers of a model
  // share a shape but not a bias. Steady state: one plan per (shape, layer), none created per call.
  std::unordered_map<const void*, std::unique_ptr<Plan>> plans;

  Entry() = default;
  Entry(const Entry&) = delete;
  Entry& operator=(const Entry&) = delete;
  ~Entry() {
    plans.clear();  // plans refer to the descriptors: they go first
    cusparseLtMatDescriptor_t* descriptors[] = {&a, &b, &c};
    for (int i = descriptors_ready - 1; i >= 0; --i) cusparseLtMatDescriptorDestroy(descriptors[i]);
  }
};

// Destroyed at exit, before libcusparseLt's own statics (loaded and constructed before this library). The
// plan and descriptor destroy calls take no handle and are host-side frees; the handles are never destroyed.
struct PlanCache {
  std::mutex mutex;
  LruCache<PlanKey, std::unique_ptr<Entry>, PlanKeyHash> entries{kMaxCachedShapes};
};

PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

bool search_enabled() {
  static const bool enabled = [] {
    const char* flag = std::getenv("MADTP_KERNELS_CUSPARSELT_SEARCH");
    return flag != nullptr && std::strcmp(flag, "1") == 0;
  }();
  return enabled;
}

std::unique_ptr<Entry> make_entry(const cusparseLtHandle_t* handle, const Shape& shape) {
  auto entry = std::make_unique<Entry>();
  const cudaDataType type = cuda_type(shape.dtype);
  init_weight_descriptor(handle, &entry->a, shape);
  entry->descriptors_ready = 1;
  // B: x as M_pad x K row-major (taken transposed); C = D: y^T as N x M_pad column-major.
  MADTP_LT_CHECK(shape, cusparseLtDenseDescriptorInit, handle, &entry->b, shape.m, shape.k, shape.k, kAlignment, type,
                 CUSPARSE_ORDER_ROW);
  entry->descriptors_ready = 2;
  MADTP_LT_CHECK(shape, cusparseLtDenseDescriptorInit, handle, &entry->c, shape.n, shape.m, shape.n, kAlignment, type,
                 CUSPARSE_ORDER_COL);
  entry->descriptors_ready = 3;
  size_t buffer_size = 0;
  MADTP_LT_CHECK(shape, cusparseLtSpMMACompressedSize2, handle, &entry->a, &entry->compressed_size, &buffer_size);
  return entry;
}

std::unique_ptr<Plan> make_plan(const cusparseLtHandle_t* handle, Entry& entry, void* bias, const Shape& shape) {
  auto plan = std::make_unique<Plan>();
  MADTP_LT_CHECK(shape, cusparseLtMatmulDescriptorInit, handle, &plan->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                 CUSPARSE_OPERATION_TRANSPOSE, &entry.a, &entry.b, &entry.c, &entry.c, CUSPARSE_COMPUTE_32F);
  if (bias != nullptr) {
    // Added per row of D (= per output feature); for fp16/bf16 C the bias has C's type.
    MADTP_LT_CHECK(shape, cusparseLtMatmulDescSetAttribute, handle, &plan->matmul, CUSPARSELT_MATMUL_BIAS_POINTER,
                   &bias, sizeof(bias));
  }
  MADTP_LT_CHECK(shape, cusparseLtMatmulAlgSelectionInit, handle, &plan->alg, &plan->matmul,
                 CUSPARSELT_MATMUL_ALG_DEFAULT);
  plan->alg_ready = true;
  if (entry.searched) {
    MADTP_LT_CHECK(shape, cusparseLtMatmulAlgSetAttribute, handle, &plan->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                   &entry.alg_id, sizeof(entry.alg_id));
  }
  MADTP_LT_CHECK(shape, cusparseLtMatmulPlanInit, handle, &plan->plan, &plan->matmul, &plan->alg);
  plan->plan_ready = true;
  MADTP_LT_CHECK(shape, cusparseLtMatmulGetWorkspace, handle, &plan->plan, &plan->workspace);
  return plan;
}

void check_weight_shape(int64_t out_features, int64_t in_features) {
  const int64_t multiple = structured_multiple(kElementBytes);
  TORCH_CHECK_VALUE(valid_weight_shape(out_features, in_features, kElementBytes),
                    "cuSPARSELt needs out_features and in_features to be positive multiples of ", multiple,
                    " for fp16/bf16, got out_features=", out_features, ", in_features=", in_features);
}

void check_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                   " must be float16 or bfloat16 for cuSPARSELt, got ", t.scalar_type());
}

}  // namespace

at::Tensor cusparselt_compress_cuda(const at::Tensor& weight) {
  check_cuda_operand(weight, "weight", weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  check_dtype(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be [out_features, in_features], got shape ", weight.sizes());
  check_weight_shape(weight.size(0), weight.size(1));
  TORCH_CHECK(aligned(weight), "weight's data must be 16-byte aligned (cuSPARSELt), got an offset view");
  const Shape shape{-1, weight.size(0), weight.size(1), weight.scalar_type()};
  const cusparseLtHandle_t* handle = handle_for(weight.get_device(), shape);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  cusparseLtMatDescriptor_t desc;
  init_weight_descriptor(handle, &desc, shape);
  // Destroy the descriptor on every exit path, including a failed check below.
  const std::unique_ptr<cusparseLtMatDescriptor_t, void (*)(cusparseLtMatDescriptor_t*)> owner(
      &desc, [](cusparseLtMatDescriptor_t* d) { cusparseLtMatDescriptorDestroy(d); });

  // Checked rather than trusted: compressing a weight that is not 2:4 silently drops values, and the
  // one device-to-host sync it costs is paid once per weight, when the module is built.
  at::Tensor invalid = at::empty({1}, weight.options().dtype(at::kInt));
  MADTP_LT_CHECK(shape, cusparseLtSpMMAPruneCheck2, handle, &desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                 weight.data_ptr(), invalid.data_ptr<int>(), stream);
  TORCH_CHECK_VALUE(invalid.item<int>() == 0, "weight [", shape.n, ", ", shape.k,
                    "] is not 2:4 sparse along in_features (some group of 4 consecutive inputs has more than 2 "
                    "non-zeros): prune it first");

  size_t compressed_size = 0, buffer_size = 0;
  MADTP_LT_CHECK(shape, cusparseLtSpMMACompressedSize2, handle, &desc, &compressed_size, &buffer_size);
  at::Tensor compressed = at::empty({static_cast<int64_t>(compressed_size)}, weight.options().dtype(at::kByte));
  // Stream-ordered caching allocator: freeing the scratch buffer on return is safe before the kernel has run.
  at::Tensor buffer = at::empty({static_cast<int64_t>(buffer_size)}, weight.options().dtype(at::kByte));
  MADTP_LT_CHECK(shape, cusparseLtSpMMACompress2, handle, &desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                 weight.data_ptr(), compressed.data_ptr(), buffer_size > 0 ? buffer.data_ptr() : nullptr, stream);
  return compressed;
}

at::Tensor cusparselt_linear_cuda(const at::Tensor& x, const at::Tensor& compressed, int64_t out_features,
                                  int64_t in_features, const std::optional<at::Tensor>& bias) {
  check_cuda_operand(x, "x", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda_operand(compressed, "compressed", x.device());
  check_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in_features, "x must be [M, in_features=", in_features,
                    "], got shape ", x.sizes());
  check_weight_shape(out_features, in_features);
  TORCH_CHECK_TYPE(compressed.scalar_type() == at::kByte, "compressed must be uint8 (from cusparselt_compress), got ",
                   compressed.scalar_type());
  TORCH_CHECK_VALUE(compressed.dim() == 1, "compressed must be 1-D (from cusparselt_compress), got shape ",
                    compressed.sizes());
  TORCH_CHECK(aligned(compressed), "compressed's data must be 16-byte aligned (cuSPARSELt), got an offset view");
  if (bias.has_value()) {
    check_cuda_operand(*bias, "bias", x.device());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "bias must be [out_features=", out_features,
                      "], got shape ", bias->sizes());
  }

  const int64_t m = x.size(0);
  if (m == 0) return at::empty({0, out_features}, x.options());
  const int64_t m_padded = token_bucket(m, kElementBytes);
  const Shape shape{m_padded, out_features, in_features, x.scalar_type()};

  // The plan is for M_pad rows (cuSPARSELt: a multiple of 8 rows and a 16-byte aligned B): copy x, with zero
  // rows below M, unless it already is so. The bucket costs this copy of x for most token counts; the copy is
  // one pass over x against the GEMM's N / 8 passes, and the plan build it avoids costs milliseconds.
  at::Tensor x_in = x;
  if (m_padded != m || !aligned(x)) {
    x_in = at::empty({m_padded, in_features}, x.options());
    x_in.narrow(0, 0, m).copy_(x);
    x_in.narrow(0, m, m_padded - m).zero_();
  }
  at::Tensor bias_in;
  if (bias.has_value()) bias_in = aligned(*bias) ? *bias : bias->clone();
  void* bias_ptr = bias_in.defined() ? bias_in.data_ptr() : nullptr;
  at::Tensor out = at::empty({m_padded, out_features}, x.options());

  const cusparseLtHandle_t* handle = handle_for(x.get_device(), shape);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStream_t streams[] = {stream};
  const float alpha = 1.0f, beta = 0.0f;
  const PlanKey key{x.get_device(), static_cast<int>(x.scalar_type()), m_padded, out_features, in_features,
                    bias_ptr != nullptr};

  // Held through the enqueue: a plan is only ever used, replaced or destroyed under the lock.
  PlanCache& cache = plan_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  std::unique_ptr<Entry>* cached = cache.entries.find(key);
  Entry& entry = cached != nullptr ? **cached : *cache.entries.insert(key, make_entry(handle, shape));
  TORCH_CHECK_VALUE(compressed.numel() == static_cast<int64_t>(entry.compressed_size), "compressed has ",
                    compressed.numel(), " bytes, but a compressed [", out_features, ", ", in_features, "] ",
                    x.scalar_type(), " weight has ", entry.compressed_size,
                    " (was it compressed for this shape and dtype?)");

  auto found = entry.plans.find(bias_ptr);
  if (found == entry.plans.end()) {
    if (entry.plans.size() >= kMaxPlansPerShape) entry.plans.clear();
    found = entry.plans.emplace(bias_ptr, make_plan(handle, entry, bias_ptr, shape)).first;
    Plan& plan = *found->second;
    if (search_enabled() && !entry.searched) {
      // One search per shape; its config then serves every plan of the shape (bias pointers included).
      at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace)}, x.options().dtype(at::kByte));
      MADTP_LT_CHECK(shape, cusparseLtMatmulSearch, handle, &plan.plan, &alpha, compressed.data_ptr(),
                     x_in.data_ptr(), &beta, out.data_ptr(), out.data_ptr(),
                     plan.workspace > 0 ? workspace.data_ptr() : nullptr, streams, 1);
      MADTP_LT_CHECK(shape, cusparseLtMatmulAlgGetAttribute, handle, &plan.alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                     &entry.alg_id, sizeof(entry.alg_id));
      MADTP_LT_CHECK(shape, cusparseLtMatmulGetWorkspace, handle, &plan.plan, &plan.workspace);
      entry.searched = true;
    }
  }
  const Plan& plan = *found->second;
  at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace)}, x.options().dtype(at::kByte));
  MADTP_LT_CHECK(shape, cusparseLtMatmul, handle, &plan.plan, &alpha, compressed.data_ptr(), x_in.data_ptr(), &beta,
                 out.data_ptr(), out.data_ptr(), plan.workspace > 0 ? workspace.data_ptr() : nullptr, streams, 1);
  // The first M rows of a row-major [M_pad, N] tensor: a contiguous view, no copy.
  return m_padded == m ? out : out.narrow(0, 0, m);
}

int64_t cusparselt_plan_cache_size() {
  PlanCache& cache = plan_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  int64_t plans = 0;
  for (const auto& item : cache.entries) plans += static_cast<int64_t>(item.second->plans.size());
  return plans;
}

}  // namespace madtp
