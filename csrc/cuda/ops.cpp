// Torch glue of the CUDA kernels: tensors in, CudaPairRowsParams out, kernels launched on torch's current stream,
// ops registered as torch.ops.metric_kernels.cuda_* (their fake implementations and autograd formula come from
// Python, metric_kernels/_fused.py, shared with the other fused backends). Stable ABI only (see ../op_glue.h), and no
// CUDA header: the current stream comes from the C shim, so this file also compiles against a CPU-only torch (the CI
// compile check does that).
//
// torch's global settings are not part of the stable ABI, so the two this glue follows arrive as arguments from
// Python (metric_kernels/_fused.py's CudaKernelRows): `allow_tf32`, torch's TF32 permission for matmuls, ends each
// op's arguments, and `deterministic` already includes torch's deterministic mode.
//
// emulated_ops.cpp compiles this file a second time with METRIC_KERNELS_HOST_EMULATION: the same glue over the kernels
// built for the host emulation (host_emulation.h), as the ops cuda_emulated_* on CPU tensors.
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../op_glue.h"
#include "../params.h"

#ifdef METRIC_KERNELS_HOST_EMULATION
#include "host_emulation.h"  // its work counters
// The emulated kernels' entry points are metric_kernels::cuda_emulated::* (CMakeLists.txt builds them so).
#define cuda cuda_emulated
#define METRIC_KERNELS_OPS_DISPATCH CPU
#else
#include <torch/csrc/stable/accelerator.h>
#define METRIC_KERNELS_OPS_DISPATCH CUDA
#endif
#include "launch.h"

namespace metric_kernels {
namespace {

using glue::ScalarType;
using glue::Tensor;

#ifdef METRIC_KERNELS_HOST_EMULATION
constexpr const char* kPrefix = "cuda_emulated";
constexpr const char* kDeviceName = "CPU";

bool on_device(const Tensor& t) { return t.is_cpu(); }

void* current_stream(const Tensor&) { return nullptr; }  // launches complete before they return

// CPU tensors need no device guard.
struct OnDeviceOf {
  explicit OnDeviceOf(const Tensor&) {}
};

// Outputs the kernels must write in full start as NaN (-1 for indices), so an element they miss shows.
Tensor uninitialized(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  Tensor out = torch::stable::new_empty(like, sizes, dtype);
  const bool indices = dtype == ScalarType::Long;
  return torch::stable::fill_(out, indices ? -1.0 : std::numeric_limits<double>::quiet_NaN());
}
#else
constexpr const char* kPrefix = "cuda";
constexpr const char* kDeviceName = "CUDA";

bool on_device(const Tensor& t) { return t.is_cuda(); }

void* current_stream(const Tensor& tensor) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(tensor.get_device_index(), &stream));
  return stream;
}

// Makes the tensor's GPU the current device for the call (allocations and launches).
struct OnDeviceOf {
  torch::stable::accelerator::DeviceGuard guard;
  explicit OnDeviceOf(const Tensor& t) : guard(t.get_device_index()) {}
};

Tensor uninitialized(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}
#endif

void check_launch(int code, const char* op) {
  STD_TORCH_CHECK(code == 0, "metric_kernels::", kPrefix, "_", op, ": CUDA error: ", cuda::error_string(code));
}

// fp32 tiles go to tensor cores in tf32 only where torch allows it for matmuls (torch.backends.cuda.matmul.allow_tf32,
// torch.set_float32_matmul_precision("high"/"medium")), which Python reads and passes as allow_tf32.
Operand operand_of(const Tensor& x, bool allow_tf32) {
  switch (x.scalar_type()) {
    case ScalarType::Half: return Operand::kFloat16;
    case ScalarType::BFloat16: return Operand::kBFloat16;
    case ScalarType::Double: return Operand::kFloat64;
    default: return allow_tf32 ? Operand::kTf32 : Operand::kFloat32;
  }
}

ScalarType accumulation_type(const Tensor& x) {
  return x.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

void check_cuda(const glue::Rows& rows) {
  const Tensor& x = rows.x;
  STD_TORCH_CHECK(on_device(x) && rows.y.device() == x.device() && rows.x_labels.device() == x.device() &&
                      rows.y_labels.device() == x.device(),
                  "metric_kernels ", kPrefix, " ops take ", kDeviceName, " tensors on one device");
  const auto dtype = x.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::Half ||
                      dtype == ScalarType::BFloat16,
                  "metric_kernels ", kPrefix, " ops take float32, float64, float16 or bfloat16 rows");
  STD_TORCH_CHECK(x.size(1) <= int64_t{65535} * 64, "D is limited to 65535 * 64 by the grid of the backward kernels");
}

// The rows' squared norms in the accumulation type, computed by a kernel from the rows as stored (no converted copy),
// where the kernels need them: the distances, batch-hard's selection and the normalisation they fold in. The same
// tensor twice when the references are the queries.
struct SquaredNorms {
  std::optional<Tensor> x_sq, y_sq;
};

// |row|^2 of each row of t (unit column stride) in the accumulation type.
Tensor squared_row_norms_of(const Tensor& t) {
  Tensor out = uninitialized(t, {t.size(0)}, accumulation_type(t));
  check_launch(cuda::squared_row_norms(operand_of(t, false), t.const_data_ptr(), t.size(0), t.size(1), t.stride(0),
                                       out.mutable_data_ptr(), current_stream(t)),
               "squared_row_norms");
  return out;
}

// The data of an optional tensor, nullptr for none (the params' optional buffers).
const void* data_or_null(const std::optional<Tensor>& t) { return t ? t->const_data_ptr() : nullptr; }

SquaredNorms squared_norms(const Tensor& x, const Tensor& y, bool same, bool needed) {
  if (!needed) return {};
  const Tensor x_sq = squared_row_norms_of(x);
  return {x_sq, same ? x_sq : squared_row_norms_of(y)};
}

CudaPairRowsParams make_params(const glue::Rows& rows, const SquaredNorms& norms, int64_t self_offset, int64_t kind,
                               int64_t pair_value, double a, double b, bool normalize, bool allow_tf32) {
  const auto& [x, y, x_labels, y_labels, same] = rows;
  return CudaPairRowsParams{x.const_data_ptr(), y.const_data_ptr(), x_labels.const_data_ptr<int64_t>(),
                            y_labels.const_data_ptr<int64_t>(), x.size(0), y.size(0), x.size(1), x.stride(0),
                            y.stride(0), self_offset, static_cast<int>(kind), a, b, operand_of(x, allow_tf32),
                            static_cast<int>(pair_value), data_or_null(norms.x_sq), data_or_null(norms.y_sq),
                            normalize};
}

// The rows arrive raw in their own dtype (16-bit rows reach the tensor cores as 16-bit operands); with `normalize`
// the kernels fold in the normalisation: no normalised or converted N x D copy is made.
Tensor lse_rows(const Tensor& x_in, const std::optional<Tensor>& y_in, const Tensor& x_labels_in,
                const Tensor& y_labels_in, int64_t self_offset, int64_t kind, int64_t pair_value, double a, double b,
                bool deterministic, bool normalize, bool allow_tf32) {
  glue::check_kind(kind, "lse_rows");
  glue::check_pair_value(pair_value, "lse_rows");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  const Tensor& x = rows.x;
  const OnDeviceOf on_device_of(x);
  const SquaredNorms norms = squared_norms(rows.x, rows.y, rows.same, normalize || glue::needs_norms(pair_value));
  Tensor stats = uninitialized(x, {kStatRows, x.size(0)}, accumulation_type(x));
  check_launch(cuda::lse_rows_forward(
                   make_params(rows, norms, self_offset, kind, pair_value, a, b, normalize, allow_tf32),
                   stats.mutable_data_ptr(), current_stream(x)),
               "lse_rows");
  return stats;
}

// Whether the atomic backward (the pair losses' dX + dY pass, the classifiers' dX + dW pass) serves rows of this
// operand and width: it exists (not fp64), D lies within one block's span (else the deterministic passes do no more
// products) and its shared memory within the device's.
bool atomic_pass_fits(Operand operand, int64_t d, int64_t shared_limit) {
  return cuda::supports_atomic_backward(operand) && d <= cuda::atomic_backward_span(operand) &&
         cuda::backward_shared_bytes(operand, true, d) <= shared_limit;
}

// The engine's backward passes (cuda::lse_rows_backward) for the kind's inputs in `backward` (pair, grad, stats; the
// triplet margin kind's slots, table and weights), which the caller's tensors keep alive: (dX, dY) in the rows'
// dtype; an unneeded gradient has 0 rows; without y (the references are the queries) dX holds the whole gradient.
// Deterministic unless asked otherwise (Python folds torch's deterministic mode into `deterministic`): then dY comes
// from the dX pass through atomics (one pass instead of two).
std::tuple<Tensor, Tensor> engine_backward(const char* op, const glue::Rows& rows, CudaPairRowsBackwardParams backward,
                                           bool deterministic, bool need_dx, bool need_dy) {
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const ScalarType acc = accumulation_type(x);
  if (same) need_dx = need_dx || need_dy, need_dy = false;
  const int64_t shared_limit = cuda::shared_bytes_per_block(x.get_device_index());
  // Atomics only where they save products: both gradients wanted (dY alone is one deterministic pass already) and D
  // within one atomic block's span (3 matmul-equivalents instead of 4).
  const Operand operand = backward.pair.operand;
  const bool atomic =
      !deterministic && need_dx && (need_dy || same) && atomic_pass_fits(operand, x.size(1), shared_limit);
  const int64_t shared_bytes = cuda::backward_shared_bytes(operand, atomic, x.size(1));
  STD_TORCH_CHECK(shared_bytes <= shared_limit, "metric_kernels::", kPrefix, "_", op, ": the ", x.scalar_type(),
                  " backward needs ", shared_bytes, " bytes of shared memory per block and this GPU allows ",
                  shared_limit, "; use float32 rows or backend='triton'");
  // The atomic pass adds into zeros; the deterministic passes write every element.
  const auto buffer = [&](int64_t count, bool zeroed) {
    const std::array<int64_t, 2> sizes{count, x.size(1)};
    return zeroed ? torch::stable::new_zeros(x, sizes, acc) : uninitialized(x, sizes, acc);
  };
  Tensor dx = buffer(need_dx ? x.size(0) : 0, atomic && same);
  Tensor dy = same ? dx : buffer(need_dy ? y.size(0) : 0, atomic);
  // fp16 operands: the power of two that keeps dS r_i r_j within fp16's range (params.h), written by the kernels
  std::optional<Tensor> gradient_scale;
  if (operand == Operand::kFloat16) gradient_scale = uninitialized(x, {1}, acc);
  // With no pairs (N, M or D zero) the gradients are zeros and no kernel runs.
  if (x.size(0) > 0 && y.size(0) > 0 && x.size(1) > 0 && (need_dx || need_dy)) {
    backward.dx = need_dx ? dx.mutable_data_ptr() : nullptr;
    backward.dy = need_dy || same ? dy.mutable_data_ptr() : nullptr;
    backward.accumulate_dy = same;
    backward.atomic = atomic;
    backward.gradient_scale = gradient_scale ? gradient_scale->mutable_data_ptr() : nullptr;
    check_launch(cuda::lse_rows_backward(backward, current_stream(x)), op);
  } else {
    torch::stable::zero_(dx), torch::stable::zero_(dy);
  }
  Tensor dy_out = same ? torch::stable::new_empty(x, {0, x.size(1)}) : torch::stable::to(dy, y.scalar_type());
  return {torch::stable::to(dx, x.scalar_type()), dy_out};
}

std::tuple<Tensor, Tensor> lse_rows_backward(const Tensor& grad_in, const Tensor& stats_in, const Tensor& x_in,
                                             const std::optional<Tensor>& y_in, const Tensor& x_labels_in,
                                             const Tensor& y_labels_in, int64_t self_offset, int64_t kind,
                                             int64_t pair_value, double a, double b, bool deterministic,
                                             bool need_dx, bool need_dy, bool normalize, bool allow_tf32) {
  glue::check_kind(kind, "lse_rows_backward");
  glue::check_pair_value(pair_value, "lse_rows_backward");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  glue::check_row_state(grad_in, stats_in, rows);
  const OnDeviceOf on_device_of(rows.x);
  const ScalarType acc = accumulation_type(rows.x);
  const Tensor grad = torch::stable::contiguous(torch::stable::to(grad_in, acc));
  const Tensor stats = torch::stable::contiguous(torch::stable::to(stats_in, acc));
  const SquaredNorms norms = squared_norms(rows.x, rows.y, rows.same, normalize || glue::needs_norms(pair_value));
  CudaPairRowsBackwardParams backward{};
  backward.pair = make_params(rows, norms, self_offset, kind, pair_value, a, b, normalize, allow_tf32);
  backward.grad = grad.const_data_ptr();
  backward.stats = stats.const_data_ptr();
  return engine_backward("lse_rows_backward", rows, backward, deterministic, need_dx, need_dy);
}

// One int64 entry per row of `count` (`name` of op `op`) on the rows' device, contiguous.
Tensor index_vector(const Tensor& t, const Tensor& x, int64_t count, const char* name, const char* op) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Long && t.dim() == 1 && t.size(0) == count &&
                      t.device() == x.device(),
                  op, ": ", name, " must be an int64 vector of ", count, " entries on the rows' device");
  return torch::stable::contiguous(t);
}

// max(slots), the positive table's width: one value read back to the host.
int64_t slot_count_of(const Tensor& slots) {
  if (slots.size(0) == 0) return 0;
  const Tensor largest = torch::stable::to(torch::stable::amax(slots, 0),
                                           torch::stable::Device(torch::headeronly::DeviceType::CPU));
  const int64_t width = *largest.const_data_ptr<int64_t>();
  STD_TORCH_CHECK(width >= 0, "triplet_margin_rows: slots must be positive_slots' counts, not negative");
  return width;
}

// (stats [2, N], table [N, K], weights [N, K]) in the accumulation type with K = max(slots) (metric_kernels/_fused.py):
// the rows raw in their own dtype, normalised inside with `normalize`, as for lse_rows. The kernels index the table
// with rank, and skip (rather than write past it) a rank outside it: unlike the CPU op, this one does not read the
// labels back to check that slots and rank are positive_slots'. The forward is deterministic whatever
// `deterministic` says (each block owns its anchors' rows).
std::tuple<Tensor, Tensor, Tensor> triplet_margin_rows(const Tensor& x_in, const std::optional<Tensor>& y_in,
                                                       const Tensor& x_labels_in, const Tensor& y_labels_in,
                                                       int64_t self_offset, int64_t pair_value, double margin,
                                                       bool smooth, const Tensor& slots_in, const Tensor& rank_in,
                                                       bool deterministic, bool normalize, bool allow_tf32) {
  constexpr const char* kOp = "triplet_margin_rows";
  glue::check_pair_value(pair_value, kOp);
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  const Tensor& x = rows.x;
  const OnDeviceOf on_device_of(x);
  const Tensor slots = index_vector(slots_in, x, x.size(0), "slots", kOp);
  const Tensor rank = index_vector(rank_in, x, rows.y.size(0), "rank", kOp);
  const int64_t width = slot_count_of(slots);
  const ScalarType acc = accumulation_type(x);
  Tensor stats = uninitialized(x, {2, x.size(0)}, acc);
  Tensor table = uninitialized(x, {x.size(0), width}, acc);
  Tensor weights = uninitialized(x, {x.size(0), width}, acc);
  const SquaredNorms norms = squared_norms(rows.x, rows.y, rows.same, normalize || glue::needs_norms(pair_value));
  check_launch(cuda::triplet_margin_forward(
                   make_params(rows, norms, self_offset, kTripletMargin, pair_value, margin, 0.0, normalize,
                               allow_tf32),
                   CudaTripletSlots{rank.const_data_ptr<int64_t>(), width, smooth}, stats.mutable_data_ptr(),
                   table.mutable_data_ptr(), weights.mutable_data_ptr(), current_stream(x)),
               kOp);
  return {stats, table, weights};
}

// (dX, dY) of sum_a grad[a] stats[0, a] by the engine's backward passes with the triplet margin kind's dS
// (engine_backward).
std::tuple<Tensor, Tensor> triplet_margin_rows_backward(const Tensor& grad_in, const Tensor& table_in,
                                                        const Tensor& weights_in, const Tensor& x_in,
                                                        const std::optional<Tensor>& y_in, const Tensor& x_labels_in,
                                                        const Tensor& y_labels_in, int64_t self_offset,
                                                        int64_t pair_value, bool smooth, const Tensor& rank_in,
                                                        bool deterministic, bool need_dx, bool need_dy,
                                                        bool normalize, bool allow_tf32) {
  constexpr const char* kOp = "triplet_margin_rows_backward";
  glue::check_pair_value(pair_value, kOp);
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  const Tensor& x = rows.x;
  const int64_t n = x.size(0);
  STD_TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == n && grad_in.device() == x.device(), kOp,
                  ": grad must be a vector of N = ", n, " entries on the rows' device");
  STD_TORCH_CHECK(table_in.dim() == 2 && table_in.size(0) == n && weights_in.dim() == 2 && weights_in.size(0) == n &&
                      weights_in.size(1) == table_in.size(1) && table_in.device() == x.device() &&
                      weights_in.device() == x.device(),
                  kOp, ": table and weights must be the forward's, N x K on the rows' device (N = ", n, ")");
  const OnDeviceOf on_device_of(x);
  const Tensor rank = index_vector(rank_in, x, rows.y.size(0), "rank", kOp);
  const ScalarType acc = accumulation_type(x);
  const Tensor grad = torch::stable::contiguous(torch::stable::to(grad_in, acc));
  const Tensor table = torch::stable::contiguous(torch::stable::to(table_in, acc));
  const Tensor weights = torch::stable::contiguous(torch::stable::to(weights_in, acc));
  const SquaredNorms norms = squared_norms(rows.x, rows.y, rows.same, normalize || glue::needs_norms(pair_value));
  CudaPairRowsBackwardParams backward{};
  backward.pair = make_params(rows, norms, self_offset, kTripletMargin, pair_value, 0.0, 0.0, normalize, allow_tf32);
  backward.grad = grad.const_data_ptr();
  backward.triplet = CudaTripletSlots{rank.const_data_ptr<int64_t>(), table.size(1), smooth};
  backward.table = table.const_data_ptr();
  backward.weights = weights.const_data_ptr();
  return engine_backward(kOp, rows, backward, deterministic, need_dx, need_dy);
}

Tensor batch_hard_select(const Tensor& x_in, const Tensor& y_in, const Tensor& x_labels_in, const Tensor& y_labels_in,
                         int64_t self_offset, bool normalize, bool allow_tf32) {
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  const Tensor& x = rows.x;
  const OnDeviceOf on_device_of(x);
  const SquaredNorms norms = squared_norms(rows.x, rows.y, rows.same, true);
  const CudaPairRowsParams params = make_params(rows, norms, self_offset, 0, 0, 0, 0, normalize, allow_tf32);
  Tensor choices = uninitialized(x, {cuda::batch_hard_choice_rows(params.operand), x.size(0)}, ScalarType::Long);
  check_launch(cuda::batch_hard_select(params, choices.mutable_data_ptr<int64_t>(), current_stream(x)),
               "batch_hard_select");
  return choices;
}

// Batch-hard's chosen triplets (triplet.cu): x, y (none: the references are the queries) and the chosen indices,
// checked. The Python layer passes indices in [0, M), and to the backward the coefficients g / d and the choosers
// sorted by reference (O(N) integers: metric_kernels/_fused.py).
struct TripletRows {
  Tensor x, y, positive, negative;
  bool same;
};

TripletRows triplet_rows(const Tensor& x_in, const std::optional<Tensor>& y_in, const Tensor& positive,
                         const Tensor& negative) {
  STD_TORCH_CHECK(x_in.dim() == 2, "x must be N x D");
  const bool same = !y_in.has_value();
  const Tensor x = glue::rows_contiguous(x_in);
  const Tensor y = same ? x : glue::rows_contiguous(*y_in);
  STD_TORCH_CHECK(y.dim() == 2 && y.size(1) == x.size(1) && y.scalar_type() == x.scalar_type(),
                  "y must be M x D, of x's D and dtype");
  for (const Tensor* chosen : {&positive, &negative})
    STD_TORCH_CHECK(chosen->scalar_type() == ScalarType::Long && chosen->dim() == 1 && chosen->size(0) == x.size(0),
                    "positive and negative must be int64, one per row of x");
  STD_TORCH_CHECK(on_device(x) && y.device() == x.device() && positive.device() == x.device() &&
                      negative.device() == x.device(),
                  "metric_kernels ", kPrefix, " ops take ", kDeviceName, " tensors on one device");
  const auto dtype = x.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::Half ||
                      dtype == ScalarType::BFloat16,
                  "metric_kernels ", kPrefix, " ops take float32, float64, float16 or bfloat16 rows");
  STD_TORCH_CHECK(x.size(0) == 0 || y.size(0) > 0, "the chosen references must exist: M = 0 with N > 0");
  return {x, y, torch::stable::contiguous(positive), torch::stable::contiguous(negative), same};
}

CudaTripletParams triplet_params(const TripletRows& rows, const SquaredNorms& norms, bool normalize) {
  return CudaTripletParams{rows.x.const_data_ptr(), rows.y.const_data_ptr(), data_or_null(norms.x_sq),
                           data_or_null(norms.y_sq), rows.positive.const_data_ptr<int64_t>(),
                           rows.negative.const_data_ptr<int64_t>(),
                           rows.x.size(0), rows.y.size(0), rows.x.size(1), rows.x.stride(0), rows.y.stride(0),
                           operand_of(rows.x, false), normalize};
}

// [2, N] in the accumulation type: ||u_i - v_positive(i)||, ||u_i - v_negative(i)|| (u = x r, v = y r when normalize).
Tensor triplet_distances(const Tensor& x, const std::optional<Tensor>& y, const Tensor& positive,
                         const Tensor& negative, bool normalize) {
  const TripletRows rows = triplet_rows(x, y, positive, negative);
  const OnDeviceOf on_device_of(rows.x);
  const SquaredNorms norms = squared_norms(rows.x, rows.y, rows.same, normalize && rows.x.size(0) > 0);
  Tensor out = uninitialized(rows.x, {2, rows.x.size(0)}, accumulation_type(rows.x));
  check_launch(cuda::triplet_distances(triplet_params(rows, norms, normalize), out.mutable_data_ptr(),
                                       current_stream(rows.x)),
               "triplet_distances");
  return out;
}

// (dX, dY) in the rows' dtype, written by the kernels directly; an unneeded gradient has 0 rows; without y dX holds the
// whole gradient. Deterministic.
std::tuple<Tensor, Tensor> triplet_distances_backward(const Tensor& coefficients_in, const Tensor& x,
                                                      const std::optional<Tensor>& y, const Tensor& positive,
                                                      const Tensor& negative, const Tensor& order_in,
                                                      const Tensor& offsets_in, bool normalize, bool need_dx,
                                                      bool need_dy) {
  const TripletRows rows = triplet_rows(x, y, positive, negative);
  const int64_t n = rows.x.size(0), m = rows.y.size(0), d = rows.x.size(1);
  STD_TORCH_CHECK(coefficients_in.dim() == 2 && coefficients_in.size(0) == 2 && coefficients_in.size(1) == n,
                  "coefficients must be 2 x N");
  STD_TORCH_CHECK(order_in.scalar_type() == ScalarType::Long && order_in.dim() == 1 && order_in.size(0) == 2 * n,
                  "order must be int64, 2 N entries");
  STD_TORCH_CHECK(offsets_in.scalar_type() == ScalarType::Long && offsets_in.dim() == 1 &&
                      offsets_in.size(0) == m + 1,
                  "offsets must be int64, M + 1 entries");
  STD_TORCH_CHECK(coefficients_in.device() == rows.x.device() && order_in.device() == rows.x.device() &&
                      offsets_in.device() == rows.x.device(),
                  "coefficients, order and offsets must be on the rows' device");
  const OnDeviceOf on_device_of(rows.x);
  const Tensor coefficients = torch::stable::contiguous(torch::stable::to(coefficients_in, accumulation_type(rows.x)));
  const Tensor order = torch::stable::contiguous(order_in), offsets = torch::stable::contiguous(offsets_in);
  if (rows.same) need_dx = need_dx || need_dy, need_dy = false;
  Tensor dx = uninitialized(rows.x, {need_dx ? n : 0, d}, rows.x.scalar_type());
  Tensor dy = uninitialized(rows.y, {need_dy ? m : 0, d}, rows.y.scalar_type());
  if (n > 0 && m > 0 && d > 0 && (need_dx || need_dy)) {
    const SquaredNorms norms = squared_norms(rows.x, rows.y, rows.same, normalize);
    const CudaTripletBackwardParams backward{triplet_params(rows, norms, normalize),
                                             coefficients.const_data_ptr(),
                                             order.const_data_ptr<int64_t>(),
                                             offsets.const_data_ptr<int64_t>(),
                                             need_dx ? dx.mutable_data_ptr() : nullptr,
                                             need_dy ? dy.mutable_data_ptr() : nullptr,
                                             rows.same};
    check_launch(cuda::triplet_distances_backward(backward, current_stream(rows.x)), "triplet_distances_backward");
  } else {
    torch::stable::zero_(dx), torch::stable::zero_(dy);
  }
  return {dx, dy};
}

// The margin-softmax ops' tensors on the device, and the kernels' parameters over them with the inverse-norm buffers
// (N + J entries in the accumulation type) in `inverse`.
glue::ClassifierRows classifier_rows_on_device(const Tensor& x, const Tensor& weight, const Tensor& labels,
                                               int64_t sub_centers) {
  const glue::ClassifierRows rows = glue::prepare_classifier_rows(x, weight, labels, sub_centers);
  STD_TORCH_CHECK(on_device(rows.x) && rows.weight.device() == rows.x.device() &&
                      rows.labels.device() == rows.x.device(),
                  "metric_kernels ", kPrefix, " ops take ", kDeviceName, " tensors on one device");
  const auto dtype = rows.x.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::Half ||
                      dtype == ScalarType::BFloat16,
                  "metric_kernels ", kPrefix, " ops take float32, float64, float16 or bfloat16 rows");
  STD_TORCH_CHECK(sub_centers <= 64, "sub_centers is limited to 64 (a class's columns within one 64-column tile)");
  STD_TORCH_CHECK(rows.x.size(1) <= int64_t{65535} * 64, "D is limited to 65535 * 64 by the backward's grid");
  return rows;
}

CudaMarginSoftmaxParams classifier_params(const glue::ClassifierRows& rows, Tensor& inverse, int64_t sub_centers,
                                          double scale, bool normalize_x, bool normalize_w, double pool_scale,
                                          bool allow_tf32) {
  const int64_t n = rows.x.size(0);
  auto* base = static_cast<unsigned char*>(inverse.mutable_data_ptr());
  return CudaMarginSoftmaxParams{rows.x.const_data_ptr(), rows.weight.const_data_ptr(),
                                 rows.labels.const_data_ptr<int64_t>(), base,
                                 base + n * inverse.element_size(), n, rows.x.size(1), rows.classes, sub_centers,
                                 rows.x.stride(0), rows.weight.stride(0), scale, normalize_x, normalize_w,
                                 pool_scale, operand_of(rows.x, allow_tf32)};
}

Tensor margin_softmax_rows(const Tensor& x, const Tensor& weight, const Tensor& labels, int64_t sub_centers,
                           double scale, bool normalize_x, bool normalize_w, double pool_scale, bool deterministic,
                           bool allow_tf32) {
  const glue::ClassifierRows rows = classifier_rows_on_device(x, weight, labels, sub_centers);
  const OnDeviceOf on_device_of(rows.x);
  const ScalarType acc = accumulation_type(rows.x);
  Tensor inverse = uninitialized(rows.x, {rows.x.size(0) + rows.weight.size(1)}, acc);
  Tensor stats = uninitialized(rows.x, {2, rows.x.size(0)}, acc);
  check_launch(cuda::margin_softmax_forward(
                   classifier_params(rows, inverse, sub_centers, scale, normalize_x, normalize_w, pool_scale,
                                     allow_tf32),
                   stats.mutable_data_ptr(), current_stream(rows.x)),
               "margin_softmax_rows");
  return stats;
}

// (dX, dW) in the inputs' dtype; an unneeded gradient has 0 rows. Deterministic unless asked otherwise (Python folds
// torch's deterministic mode into `deterministic`): then dW comes from the dX pass through atomics (one pass instead
// of two) where both gradients are wanted and D fits one atomic block's span and shared memory.
std::tuple<Tensor, Tensor> margin_softmax_rows_backward(const Tensor& grad_in, const Tensor& stats_in,
                                                        const Tensor& x, const Tensor& weight, const Tensor& labels,
                                                        int64_t sub_centers, double scale, bool normalize_x,
                                                        bool normalize_w, double pool_scale, bool deterministic,
                                                        bool need_dx, bool need_dw, bool allow_tf32) {
  const glue::ClassifierRows rows = classifier_rows_on_device(x, weight, labels, sub_centers);
  const OnDeviceOf on_device_of(rows.x);
  const int64_t n = rows.x.size(0), d = rows.x.size(1), columns = rows.weight.size(1);
  STD_TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == 2 && grad_in.size(1) == n && stats_in.dim() == 2 &&
                      stats_in.size(0) == 2 && stats_in.size(1) == n,
                  "grad and stats must be 2 x N");
  const ScalarType acc = accumulation_type(rows.x);
  const Tensor grad = torch::stable::contiguous(torch::stable::to(grad_in, acc));
  const Tensor stats = torch::stable::contiguous(torch::stable::to(stats_in, acc));
  Tensor inverse = uninitialized(rows.x, {n + columns}, acc);
  const CudaMarginSoftmaxParams params =
      classifier_params(rows, inverse, sub_centers, scale, normalize_x, normalize_w, pool_scale, allow_tf32);
  const bool atomic = !deterministic && need_dx && need_dw &&
                      atomic_pass_fits(params.operand, d, cuda::shared_bytes_per_block(rows.x.get_device_index()));
  Tensor dx = uninitialized(rows.x, {need_dx ? n : 0, d}, acc);
  Tensor dw = uninitialized(rows.x, {need_dw ? d : 0, columns}, acc);
  if (n > 0 && d > 0 && rows.classes > 0 && (need_dx || need_dw)) {
    if (atomic) torch::stable::zero_(dw);
    const CudaMarginSoftmaxBackwardParams backward{params, grad.const_data_ptr(), stats.const_data_ptr(),
                                                   need_dx ? dx.mutable_data_ptr() : nullptr,
                                                   need_dw ? dw.mutable_data_ptr() : nullptr, atomic};
    check_launch(cuda::margin_softmax_backward(backward, current_stream(rows.x)), "margin_softmax_rows_backward");
  } else {
    torch::stable::zero_(dx), torch::stable::zero_(dw);
  }
  return {torch::stable::to(dx, rows.x.scalar_type()), torch::stable::to(dw, rows.weight.scalar_type())};
}

#ifdef METRIC_KERNELS_HOST_EMULATION
// The emulation's work counters (host_emulation.h, Work): int64 [dot FLOPs on 16-bit operands, on tf32, fp32 and fp64
// operands, atomic additions, exponentials, bytes of asynchronous copies] since the last reset; reset: zero them after
// reading.
Tensor work_counters(bool reset) {
  const std::array<int64_t, 1> size{host_emulation::kWorkKinds};
  Tensor out = torch::stable::empty(size, ScalarType::Long, std::nullopt,
                                    torch::stable::Device(torch::headeronly::DeviceType::CPU));
  auto* values = out.mutable_data_ptr<int64_t>();
  for (int kind = 0; kind < host_emulation::kWorkKinds; ++kind)
    values[kind] = static_cast<int64_t>(reset ? host_emulation::work_counters[kind].exchange(0)
                                              : host_emulation::work_counters[kind].load());
  return out;
}
#endif

}  // namespace
}  // namespace metric_kernels

// allow_tf32 defaults to IEEE fp32 products for direct callers of the ops, normalize to the losses' cosine
// similarity; the backends always pass both.
STABLE_TORCH_LIBRARY_FRAGMENT(metric_kernels, m) {
  metric_kernels::glue::define_fused_ops(m, metric_kernels::kPrefix, ", bool normalize=True, bool allow_tf32=False");
  metric_kernels::glue::define_margin_softmax_ops(m, metric_kernels::kPrefix, ", bool allow_tf32=False");
  metric_kernels::glue::define_triplet_margin_ops(m, metric_kernels::kPrefix,
                                                  ", bool normalize=True, bool allow_tf32=False");
  const std::string prefix = metric_kernels::kPrefix;
  m.def((prefix + "_triplet_distances(Tensor x, Tensor? y, Tensor positive, Tensor negative, bool normalize=True) "
                  "-> Tensor").c_str());
  m.def((prefix + "_triplet_distances_backward(Tensor coefficients, Tensor x, Tensor? y, Tensor positive, "
                  "Tensor negative, Tensor order, Tensor offsets, bool normalize, bool need_dx, bool need_dy) "
                  "-> (Tensor, Tensor)").c_str());
#ifdef METRIC_KERNELS_HOST_EMULATION
  m.def("cuda_emulated_work_counters(bool reset=False) -> Tensor");
#endif
}

STABLE_TORCH_LIBRARY_IMPL(metric_kernels, METRIC_KERNELS_OPS_DISPATCH, m) {
  const std::string prefix = metric_kernels::kPrefix;
  m.impl((prefix + "_lse_rows").c_str(), TORCH_BOX(&metric_kernels::lse_rows));
  m.impl((prefix + "_lse_rows_backward").c_str(), TORCH_BOX(&metric_kernels::lse_rows_backward));
  m.impl((prefix + "_batch_hard_select").c_str(), TORCH_BOX(&metric_kernels::batch_hard_select));
  m.impl((prefix + "_triplet_distances").c_str(), TORCH_BOX(&metric_kernels::triplet_distances));
  m.impl((prefix + "_triplet_distances_backward").c_str(), TORCH_BOX(&metric_kernels::triplet_distances_backward));
  m.impl((prefix + "_margin_softmax_rows").c_str(), TORCH_BOX(&metric_kernels::margin_softmax_rows));
  m.impl((prefix + "_margin_softmax_rows_backward").c_str(),
         TORCH_BOX(&metric_kernels::margin_softmax_rows_backward));
  m.impl((prefix + "_triplet_margin_rows").c_str(), TORCH_BOX(&metric_kernels::triplet_margin_rows));
  m.impl((prefix + "_triplet_margin_rows_backward").c_str(),
         TORCH_BOX(&metric_kernels::triplet_margin_rows_backward));
}

#ifdef METRIC_KERNELS_HOST_EMULATION
// No tensor argument to dispatch on: registered for every dispatch key.
STABLE_TORCH_LIBRARY_IMPL(metric_kernels, CompositeExplicitAutograd, m) {
  m.impl("cuda_emulated_work_counters", TORCH_BOX(&metric_kernels::work_counters));
}
#endif
