// The only file that talks torch: checks tensors, allocates outputs, fills the argument structs of ops.h (as the
// CPU binding does: binding_args.h) and launches on the current stream. The Python wrapper
// (fit3d_hf/render/_wrapper.py) validates inputs with clear messages first; the checks here are a backstop.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "binding_args.h"
#include "constants.h"
#include "ops.h"
#include "sh_math.h"
#include "ssim.h"

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

// Argument errors (FIT3D_CHECK, binding_args.h) once crashed the interpreter on the lent H100/H200 (2026-12-06):
// its compiler linked a second, static copy of libstdc++ into the extension; rasterizer_cuda/build.py now links
// torch's shared one.
using fit3d::binding::message;
using fit3d::binding::tiles_along;

// Dtype, device, layout and shape of an argument. `shape` holds the expected sizes, -1 for "any"; `like` (when
// given) is the tensor whose device every argument of the op must share.
void check_tensor(const Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                  at::ScalarType dtype = at::kFloat, const Tensor* like = nullptr) {
    FIT3D_CHECK(t.is_cuda(), "fit3d rasterizer: ", name, " must be a CUDA tensor, got one on ", t.device());
    FIT3D_CHECK(like == nullptr || t.device() == like->device(), "fit3d rasterizer: ", name, " is on ", t.device(),
                " but the other arguments are on ", like->device());
    fit3d::binding::check_layout(t, "fit3d rasterizer", name, shape, dtype);
}

const float* optional_ptr(const OptTensor& t, const char* name, std::initializer_list<int64_t> shape,
                          const Tensor& like) {
    if (!t.has_value() || !t->defined()) return nullptr;
    check_tensor(*t, name, shape, at::kFloat, &like);
    return t->data_ptr<float>();
}

// The feature images' gradient, float32 or bfloat16, planar or channels-last (Stage I's decoder gives bfloat16
// channels-last): sets v_features or v_features_bf16 and the strides.
void set_feature_grad(const OptTensor& t, std::initializer_list<int64_t> shape, const Tensor& like,
                      fit3d::RasterizeArgs& a) {
    a.v_features_channel_stride = int64_t(a.width) * a.height;
    a.v_features_pixel_stride = 1;
    if (!t.has_value() || !t->defined()) return;
    const at::ScalarType dtype = t->scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
    if (t->dim() == 4 && !t->is_contiguous() && t->is_contiguous(at::MemoryFormat::ChannelsLast)) {
        check_tensor(t->permute({0, 2, 3, 1}), "v_features (channels-last)",
                     {shape.begin()[0], shape.begin()[2], shape.begin()[3], shape.begin()[1]}, dtype, &like);
        a.v_features_channel_stride = 1;
        a.v_features_pixel_stride = a.F;
    } else {
        check_tensor(*t, "v_features", shape, dtype, &like);
    }
    if (dtype == at::kBFloat16)
        a.v_features_bf16 = reinterpret_cast<const uint16_t*>(t->data_ptr());
    else
        a.v_features = t->data_ptr<float>();
}

// The launches put cameras on the grid's y dimension (at most 65535 blocks).
void check_cameras(int64_t B) {
    FIT3D_CHECK(B <= 65535, "fit3d rasterizer: ", B,
                " cameras in one call exceed the CUDA launch grid (65535); "
                "render them in batches of at most 65535");
}

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw std::runtime_error(message("fit3d rasterizer: ", what, " failed: ", cudaGetErrorString(err)));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// torch::zeros is an allocation plus a fill kernel behind the dispatcher and TensorIterator, several microseconds
// of host time each; one memset on the current stream does the same (host time per render is a target)
Tensor zeros_on_stream(at::IntArrayRef sizes, const at::TensorOptions& options) {
    Tensor t = torch::empty(sizes, options);
    if (t.nbytes() > 0) check_cuda(cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(), stream()), "cudaMemsetAsync");
    return t;
}

// Channel ranges [begin, end) of the launches: as few as the per-launch limit and the device's shared
// memory allow, of balanced widths; the first always holds rgb + depth.
size_t shared_memory_optin() {
    // asked once per device (a driver call per launch plan otherwise); 0 = not asked yet. Kept here rather than
    // read from torch's cached at::cuda::getDeviceProperties: its header (ATen/cuda/CUDAContext.h) needs the
    // cuSPARSE and cuBLAS headers, which a CUDA toolkit without those libraries (CI's) lacks
    static std::array<std::atomic<int>, 64> known = {};
    int device = 0, optin = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    if (device >= 0 && device < int(known.size()) && (optin = known[device].load()) > 0) return size_t(optin);
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    if (device >= 0 && device < int(known.size())) known[device].store(optin);
    return size_t(optin);
}

std::vector<std::pair<int, int>> plan_passes(int channels, int max_width, size_t (*shared_bytes)(int)) {
    const size_t optin = shared_memory_optin();
    while (max_width > 4 && shared_bytes(max_width) > size_t(optin)) max_width -= 4;
    FIT3D_CHECK(shared_bytes(std::min(max_width, channels)) <= size_t(optin), "fit3d rasterizer: the device offers ",
                optin, " bytes of shared memory per block, fewer than ", shared_bytes(std::min(max_width, channels)),
                " needed");
    const int n_passes = (channels + max_width - 1) / max_width;
    const int width = (channels + n_passes - 1) / n_passes;
    std::vector<std::pair<int, int>> passes;
    for (int begin = 0; begin < channels; begin += width) passes.emplace_back(begin, std::min(channels, begin + width));
    return passes;
}

// The backward's launches: the first takes colour, depth (channels 0-3) and a share of the F features, the others
// a share each; shares are equal, in whole 8-channel blocks of the tensor-core product, of at most
// BWD_MAX_PASS_FEATURES (fewer where the device has less shared memory).
std::vector<std::pair<int, int>> plan_bwd_passes(int features) {
    const size_t optin = shared_memory_optin();
    int width = fit3d::BWD_MAX_PASS_FEATURES;
    while (width > 8 && fit3d::rasterize_bwd_shared_bytes(4 + width, true) > optin) width -= 8;
    const size_t needed = fit3d::rasterize_bwd_shared_bytes(4 + std::min(width, features), true);
    FIT3D_CHECK(needed <= optin, "fit3d rasterizer: the device offers ", optin,
                " bytes of shared memory per block, fewer than ", needed, " needed");
    const int n_passes = std::max(1, (features + width - 1) / width);
    const int share = std::min(features, ((features + n_passes - 1) / n_passes + 7) / 8 * 8);
    std::vector<std::pair<int, int>> passes{{0, 4 + share}};
    for (int begin = 4 + share; begin < 4 + features; begin += share)
        passes.emplace_back(begin, std::min(4 + features, begin + share));
    return passes;
}

}  // namespace

// ---- project ------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> project_fwd(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                                       const Tensor& opacities, const Tensor& viewmats,
                                                       const Tensor& Ks, int64_t width, int64_t height,
                                                       double near_plane, double far_plane) {
    check_tensor(means, "means", {-1, 3});
    const int64_t N = means.size(0), B = viewmats.dim() == 3 ? viewmats.size(0) : -1;
    check_tensor(quats, "quats", {N, 4}, at::kFloat, &means);
    check_tensor(scales, "scales", {N, 3}, at::kFloat, &means);
    check_tensor(opacities, "opacities", {N}, at::kFloat, &means);
    check_tensor(viewmats, "world_to_camera", {B, 4, 4}, at::kFloat, &means);
    check_tensor(Ks, "K", {B, 3, 3}, at::kFloat, &means);
    FIT3D_CHECK(width > 0 && height > 0, "fit3d rasterizer: bad image size ", width, " x ", height);
    FIT3D_CHECK(near_plane > 0.0 && near_plane < far_plane, "fit3d rasterizer: need 0 < near_plane < far_plane, got ",
                near_plane, " and ", far_plane);
    const at::cuda::OptionalCUDAGuard guard(device_of(means));
    auto opts = means.options();
    Tensor means2d = torch::empty({B, N, 2}, opts), conics = torch::empty({B, N, 3}, opts);
    Tensor depths = torch::empty({B, N}, opts), radii = torch::empty({B, N}, opts.dtype(at::kInt));
    fit3d::ProjectArgs a = fit3d::binding::project_args(means, quats, scales, viewmats, Ks, width, height);
    fit3d::binding::set_project_outputs(a, opacities, near_plane, far_plane, means2d, conics, depths, radii);
    check_cuda(fit3d::launch_project_fwd(a, stream()), "project_fwd");
    return {means2d, conics, depths, radii};
}

std::tuple<Tensor, Tensor, Tensor> project_bwd(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                               const Tensor& viewmats, const Tensor& Ks, const Tensor& radii,
                                               int64_t width, int64_t height, const Tensor& v_means2d,
                                               const Tensor& v_conics, const Tensor& v_depths) {
    check_tensor(means, "means", {-1, 3});
    const int64_t N = means.size(0), B = viewmats.dim() == 3 ? viewmats.size(0) : -1;
    check_tensor(quats, "quats", {N, 4}, at::kFloat, &means);
    check_tensor(scales, "scales", {N, 3}, at::kFloat, &means);
    check_tensor(viewmats, "world_to_camera", {B, 4, 4}, at::kFloat, &means);
    check_tensor(Ks, "K", {B, 3, 3}, at::kFloat, &means);
    check_tensor(radii, "radii", {B, N}, at::kInt, &means);
    check_tensor(v_means2d, "v_means2d", {B, N, 2}, at::kFloat, &means);
    check_tensor(v_conics, "v_conics", {B, N, 3}, at::kFloat, &means);
    check_tensor(v_depths, "v_depths", {B, N}, at::kFloat, &means);
    const at::cuda::OptionalCUDAGuard guard(device_of(means));
    Tensor v_means = torch::empty_like(means), v_quats = torch::empty_like(quats);
    Tensor v_scales = torch::empty_like(scales);
    fit3d::ProjectArgs a = fit3d::binding::project_args(means, quats, scales, viewmats, Ks, width, height);
    fit3d::binding::set_project_gradients(a, radii, v_means2d, v_conics, v_depths, v_means, v_quats, v_scales);
    check_cuda(fit3d::launch_project_bwd(a, stream()), "project_bwd");
    return {v_means, v_quats, v_scales};
}

// ---- spherical harmonics ------------------------------------------------------------------------------
namespace {

// The coefficients as one [N, K, 3] tensor `sh_dc` (no `sh_rest`), or as 3DGS's two parameters, the DC terms
// [N, 1, 3] and the rest [N, K - 1, 3], read where they are (see ShArgs).
fit3d::ShArgs sh_args(const Tensor& sh_dc, const OptTensor& sh_rest, const Tensor& means, const Tensor& viewmats,
                      int64_t degree) {
    check_tensor(means, "means", {-1, 3});
    const bool split = sh_rest.has_value() && sh_rest->defined();
    check_tensor(sh_dc, split ? "sh_dc" : "sh", {means.size(0), split ? 1 : -1, 3}, at::kFloat, &means);
    if (split) check_tensor(*sh_rest, "sh_rest", {means.size(0), -1, 3}, at::kFloat, &means);
    check_tensor(viewmats, "world_to_camera", {-1, 4, 4}, at::kFloat, &means);
    const int K = int(split ? 1 + sh_rest->size(1) : sh_dc.size(1));
    FIT3D_CHECK(degree >= 0 && degree <= 3 && (degree + 1) * (degree + 1) <= K, "fit3d rasterizer: bad sh_degree ",
                degree, " for ", K, " coefficients");
    // the backward stages a block's coefficients in shared memory (sh_bwd.cu); degree 3 uses 16 of them
    FIT3D_CHECK(K <= 64, "fit3d rasterizer: sh must have at most 64 coefficients per channel, got ", K);
    return fit3d::binding::sh_args(sh_dc, split ? &*sh_rest : nullptr, means, viewmats, degree);
}

}  // namespace

Tensor sh_fwd(const Tensor& sh_dc, const OptTensor& sh_rest, const Tensor& means, const Tensor& viewmats,
              int64_t degree) {
    fit3d::ShArgs a = sh_args(sh_dc, sh_rest, means, viewmats, degree);
    const at::cuda::OptionalCUDAGuard guard(device_of(means));
    Tensor colors = torch::empty({a.B, a.N, 3}, means.options());
    a.colors = colors.data_ptr<float>();
    check_cuda(fit3d::launch_sh_fwd(a, stream()), "sh_fwd");
    return colors;
}

// Returns the gradients of the coefficients in their layout (v_sh, None, v_means for one tensor; v_dc, v_rest,
// v_means for two) and of the means.
std::tuple<Tensor, OptTensor, Tensor> sh_bwd(const Tensor& sh_dc, const OptTensor& sh_rest, const Tensor& means,
                                             const Tensor& viewmats, int64_t degree, const Tensor& v_colors) {
    fit3d::ShArgs a = sh_args(sh_dc, sh_rest, means, viewmats, degree);
    check_tensor(v_colors, "v_colors", {a.B, a.N, 3}, at::kFloat, &means);
    const at::cuda::OptionalCUDAGuard guard(device_of(means));
    Tensor v_dc = torch::empty_like(sh_dc), v_means = torch::empty_like(means);
    OptTensor v_rest;
    if (sh_rest.has_value() && sh_rest->defined()) v_rest = torch::empty_like(*sh_rest);
    fit3d::binding::set_sh_gradients(a, v_colors, v_dc, v_rest.has_value() ? &*v_rest : nullptr, v_means);
    check_cuda(fit3d::launch_sh_bwd(a, stream()), "sh_bwd");
    return {v_dc, v_rest, v_means};
}

// ---- isect_tiles --------------------------------------------------------------------------------------
namespace {

// Aligned slices of one byte buffer, so that the binning's dozen temporary arrays cost one allocation (the
// host time of a render is mostly allocations and launches): `reserve` each array, `allocate`, then `get`.
class Workspace {
public:
    size_t reserve(size_t bytes) {
        const size_t offset = size_;
        size_ += (bytes + 255) / 256 * 256;
        return offset;
    }
    void allocate(const at::TensorOptions& options) {
        buffer_ = torch::empty({int64_t(size_)}, options.dtype(at::kByte));
    }
    template <typename T>
    T* get(size_t offset) {
        return reinterpret_cast<T*>(buffer_.data_ptr<uint8_t>() + offset);
    }

private:
    size_t size_ = 0;
    Tensor buffer_;
};

// The pinned host slot that receives the pair count, one per device and thread: reused from call to call
// (a call reads it before it returns, see fit3d_hf/render/_binning.py) rather than allocated each time.
Tensor pinned_total(int device) {
    // never destroyed: freeing pinned memory at thread exit could run after CUDA has shut down
    thread_local auto* slots = new std::vector<Tensor>();
    if (int(slots->size()) <= device) slots->resize(device + 1);
    if (!(*slots)[device].defined())
        (*slots)[device] = torch::zeros({1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    return (*slots)[device];
}

// The event each isect_tiles call with a capacity records once its pair count is on its way to `total`, one per
// device and thread (wait_pair_count waits for it): the binning's last steps (emitting and sorting the pairs,
// ~0.3 ms at 1M Gaussians on an H100) then run while the host already goes on launching.
cudaEvent_t pair_count_event(int device) {
    thread_local auto* events = new std::vector<cudaEvent_t>();  // never destroyed, as pinned_total's slots
    if (int(events->size()) <= device) events->resize(device + 1, nullptr);
    cudaEvent_t& event = (*events)[device];
    if (event == nullptr) check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "pair count event");
    return event;
}

// 0, 1, ..., n - 1 as int32 on `device`, the values of the depth sort: made once per device and thread (and grown
// when a call needs more) rather than written at every call.
const int32_t* entry_ids(int device, int64_t n) {
    thread_local auto* cache = new std::vector<Tensor>();  // never destroyed, as pinned_total's slots
    if (int(cache->size()) <= device) cache->resize(device + 1);
    Tensor& ids = (*cache)[device];
    if (!ids.defined() || ids.numel() < n) {
        ids = torch::arange(std::max<int64_t>(n, 2 * (ids.defined() ? ids.numel() : 0)),
                            at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
        // complete before any stream reads it (a later call may run on another stream)
        check_cuda(cudaStreamSynchronize(stream()), "entry id sync");
    }
    return ids.data_ptr<int32_t>();
}

}  // namespace

// Returns (tile ranges, Gaussian ids, total): `total` is the number of (tile, Gaussian) pairs, a pinned CPU
// tensor (reused by the next call on this device and thread: read it before calling again). With
// capacity <= 0 the pair buffers are sized exactly, which needs the count on the host: a sync in the middle
// of the forward, during which the GPU idles while the host launches the rest. With a capacity the buffers
// have that many slots and nothing waits: the count is copied to `total` asynchronously, pairs past the
// capacity are dropped, and the caller must check `total <= capacity` once the count is on the host
// (wait_pair_count) and call again with a larger capacity if not. Unused slots sort last.
std::tuple<Tensor, Tensor, Tensor> isect_tiles(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                               const Tensor& depths, const Tensor& radii, int64_t width, int64_t height,
                                               int64_t capacity) {
    check_tensor(means2d, "means2d", {-1, -1, 2});
    const int64_t B = means2d.size(0), N = means2d.size(1);
    check_tensor(conics, "conics", {B, N, 3}, at::kFloat, &means2d);
    check_tensor(opacities, "opacities", {N}, at::kFloat, &means2d);
    check_tensor(depths, "depths", {B, N}, at::kFloat, &means2d);
    check_tensor(radii, "radii", {B, N}, at::kInt, &means2d);
    check_cameras(B);
    FIT3D_CHECK(width > 0 && height > 0 && width <= INT_MAX - fit3d::TILE_SIZE && height <= INT_MAX - fit3d::TILE_SIZE,
                "fit3d rasterizer: bad image size ", width, " x ", height);
    const at::cuda::OptionalCUDAGuard guard(device_of(means2d));
    const int tiles_x = tiles_along(width), tiles_y = tiles_along(height);
    // a pair's key is camera * tiles + tile, and B * tiles marks "no tile": all must fit 32 bits
    FIT3D_CHECK(B * int64_t(tiles_x) * tiles_y < int64_t(UINT32_MAX), "fit3d rasterizer: ", B, " cameras x ",
                int64_t(tiles_x) * tiles_y, " tiles of ", fit3d::TILE_SIZE,
                " px overflow the 32-bit tile keys; "
                "render fewer cameras per call or smaller images");
    FIT3D_CHECK(B * N < INT_MAX, "fit3d rasterizer: ", B, " cameras x ", N, " Gaussians exceed the int32 limit");
    FIT3D_CHECK(capacity < INT_MAX, "fit3d rasterizer: a capacity of ", capacity, " pairs exceeds the int32 limit");
    auto int_opts = means2d.options().dtype(at::kInt);
    Tensor total = pinned_total(means2d.get_device());
    const int64_t n_ranges = B * tiles_x * tiles_y * 2;
    if (B * N == 0) {
        total.zero_();
        return {zeros_on_stream({n_ranges / 2, 2}, int_opts), torch::empty({0}, int_opts), total};
    }
    const int64_t entries = B * N;
    const size_t e4 = sizeof(int32_t) * entries, e8 = sizeof(int64_t) * entries;
    const bool exact = capacity <= 0;
    fit3d::IsectArgs a = fit3d::binding::isect_args(means2d, conics, opacities, radii, width, height);
    const size_t key_bytes = fit3d::tile_key_bytes(a.B, tiles_x * tiles_y);

    // The temporaries are slices of one allocation, and the two outputs (tile ranges, then the Gaussian ids from
    // a 256-byte boundary) of another; with a capacity both are sized before anything runs, exactly sized pair
    // buffers take a second temporary allocation once the count is known.
    struct PairSlices {
        size_t keys, values, sorted, sort_temp, sort_bytes;
    };
    const auto reserve_pairs = [&](Workspace& work, int64_t slots) {
        PairSlices o = {};
        a.capacity = slots;
        check_cuda(fit3d::bin_pairs(a, nullptr, nullptr, nullptr, nullptr, o.sort_bytes, stream()),
                   "radix sort (size query)");
        o.keys = work.reserve(key_bytes * slots);
        o.values = work.reserve(sizeof(int32_t) * slots);
        o.sorted = work.reserve(key_bytes * slots);
        o.sort_temp = work.reserve(o.sort_bytes);
        return o;
    };
    const int64_t ids_offset = (n_ranges + 63) / 64 * 64;
    const auto allocate_outputs = [&](int64_t slots) {
        Tensor outputs = torch::empty({ids_offset + slots}, int_opts);  // tile_ranges writes every range
        return std::make_pair(outputs.narrow(0, 0, n_ranges).view({n_ranges / 2, 2}),
                              outputs.narrow(0, ids_offset, slots));
    };

    // 1. all (camera, Gaussian) entries in depth order; 2. tiles per entry; 3. offsets
    size_t depth_sort_bytes = 0, scan_bytes = 0;
    check_cuda(fit3d::sort_pairs(nullptr, depth_sort_bytes, nullptr, nullptr, nullptr, nullptr, entries, 32, stream()),
               "radix sort (size query)");
    check_cuda(fit3d::inclusive_sum(nullptr, scan_bytes, nullptr, nullptr, entries, stream()),
               "prefix sum (size query)");
    Workspace first;
    const size_t o_sorted_keys = first.reserve(e4), o_order = first.reserve(e4);
    const size_t o_sort_temp = first.reserve(depth_sort_bytes);
    const size_t o_counts = first.reserve(e8), o_ends = first.reserve(e8), o_scan_temp = first.reserve(scan_bytes);
    PairSlices pairs = {};
    if (!exact) pairs = reserve_pairs(first, capacity);
    first.allocate(means2d.options());
    Tensor ranges, sorted_values;
    if (!exact) std::tie(ranges, sorted_values) = allocate_outputs(capacity);
    // the depths' bits are the sort keys as they are; the values, entry ids 0..entries - 1, come from a cache
    check_cuda(fit3d::sort_pairs(first.get<void>(o_sort_temp), depth_sort_bytes,
                                 reinterpret_cast<const uint32_t*>(depths.data_ptr<float>()),
                                 first.get<uint32_t>(o_sorted_keys), entry_ids(means2d.get_device(), entries),
                                 first.get<int32_t>(o_order), entries, 32, stream()),
               "radix sort");
    a.depth_order = first.get<int32_t>(o_order);
    a.counts = first.get<int64_t>(o_counts);
    int64_t* ends = first.get<int64_t>(o_ends);
    check_cuda(fit3d::launch_isect_count(a, stream()), "isect_count");
    check_cuda(fit3d::inclusive_sum(first.get<void>(o_scan_temp), scan_bytes, a.counts, ends, entries, stream()),
               "prefix sum");
    check_cuda(cudaMemcpyAsync(total.data_ptr<int64_t>(), ends + entries - 1, sizeof(int64_t), cudaMemcpyDeviceToHost,
                               stream()),
               "pair count copy");
    if (!exact) check_cuda(cudaEventRecord(pair_count_event(means2d.get_device()), stream()), "pair count event");
    Workspace second;  // exactly sized pair buffers only
    Workspace* pair_work = &first;
    if (exact) {
        check_cuda(cudaStreamSynchronize(stream()), "pair count sync");  // host sync
        capacity = *total.data_ptr<int64_t>();
        FIT3D_CHECK(capacity < INT_MAX, "fit3d rasterizer: ", capacity,
                    " (Gaussian, tile) pairs exceed the int32 limit");
        std::tie(ranges, sorted_values) = allocate_outputs(capacity);
        if (capacity == 0) {  // no pairs: every range empty
            check_cuda(cudaMemsetAsync(ranges.data_ptr<int32_t>(), 0, ranges.nbytes(), stream()), "tile_ranges");
            return {ranges, sorted_values, total};
        }
        pairs = reserve_pairs(second, capacity);
        second.allocate(means2d.options());
        pair_work = &second;
    }

    // 4. (tile, Gaussian) pairs in depth order (slots past the count: "no tile"), 5. stable sort by tile,
    // 6. per-tile ranges
    a.ends = ends;
    a.capacity = capacity;
    a.keys = pair_work->get<void>(pairs.keys);
    a.values = pair_work->get<int32_t>(pairs.values);
    check_cuda(
        fit3d::bin_pairs(a, pair_work->get<void>(pairs.sorted), sorted_values.data_ptr<int32_t>(),
                         ranges.data_ptr<int32_t>(), pair_work->get<void>(pairs.sort_temp), pairs.sort_bytes, stream()),
        "binning");
    return {ranges, sorted_values, total};
}

// ---- rasterize ----------------------------------------------------------------------------------------
namespace {

fit3d::RasterizeArgs rasterize_args(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                    const Tensor& colors, const Tensor& depths, const Tensor& features,
                                    const OptTensor& background, const Tensor& tile_ranges, const Tensor& gaussian_ids,
                                    int64_t width, int64_t height) {
    check_tensor(means2d, "means2d", {-1, -1, 2});
    const int64_t B = means2d.size(0), N = means2d.size(1);
    check_tensor(conics, "conics", {B, N, 3}, at::kFloat, &means2d);
    check_tensor(opacities, "opacities", {N}, at::kFloat, &means2d);
    if (colors.dim() == 3)
        check_tensor(colors, "colors", {B, N, 3}, at::kFloat, &means2d);
    else
        check_tensor(colors, "colors", {N, 3}, at::kFloat, &means2d);
    check_tensor(depths, "depths", {B, N}, at::kFloat, &means2d);
    check_tensor(features, "features", {N, -1}, at::kFloat, &means2d);
    check_cameras(B);
    FIT3D_CHECK(width > 0 && height > 0, "fit3d rasterizer: bad image size ", width, " x ", height);
    check_tensor(tile_ranges, "tile_ranges", {B * tiles_along(width) * tiles_along(height), 2}, at::kInt, &means2d);
    check_tensor(gaussian_ids, "gaussian_ids", {-1}, at::kInt, &means2d);
    fit3d::RasterizeArgs a = fit3d::binding::rasterize_args(means2d, conics, opacities, colors, depths, features,
                                                            tile_ranges, gaussian_ids, width, height);
    a.background = optional_ptr(background, "background", {3}, means2d);
    return a;
}

}  // namespace

std::vector<Tensor> rasterize_fwd(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                  const Tensor& colors, const Tensor& depths, const Tensor& features,
                                  const OptTensor& background, const Tensor& tile_ranges, const Tensor& gaussian_ids,
                                  int64_t width, int64_t height, bool features_bf16) {
    const at::cuda::OptionalCUDAGuard guard(device_of(means2d));
    fit3d::RasterizeArgs a = rasterize_args(means2d, conics, opacities, colors, depths, features, background,
                                            tile_ranges, gaussian_ids, width, height);
    auto opts = means2d.options();
    const int64_t B = a.B, H = height, W = width;
    Tensor rgb = torch::empty({B, 3, H, W}, opts), depth = torch::empty({B, 1, H, W}, opts);
    // bfloat16 features channels-last: what Stage I's bf16 decoder convolves, without a converting copy
    Tensor feats = features_bf16 ? torch::empty({B, int64_t(a.F), H, W},
                                                opts.dtype(at::kBFloat16).memory_format(at::MemoryFormat::ChannelsLast))
                                 : torch::empty({B, int64_t(a.F), H, W}, opts);
    Tensor alpha = torch::empty({B, 1, H, W}, opts);
    // the backward's two per-pixel inputs share one allocation
    Tensor per_pixel = torch::empty({2, B, H, W}, opts);
    Tensor final_t = per_pixel[0], last_ids = per_pixel[1].view(at::kInt);
    fit3d::binding::set_rasterize_outputs(a, rgb, depth, alpha, final_t, last_ids);
    if (features_bf16)
        a.out_features_bf16 = reinterpret_cast<uint16_t*>(feats.data_ptr());
    else
        a.out_features = feats.data_ptr<float>();
    const auto passes = plan_passes(4 + a.F, fit3d::FWD_MAX_PASS_CHANNELS, fit3d::rasterize_fwd_shared_bytes);
    for (const auto& [begin, end] : passes) {
        a.channel_begin = begin;
        a.channel_count = end - begin;
        a.first_pass = begin == 0;
        check_cuda(fit3d::launch_rasterize_fwd(a, stream()), "rasterize_fwd");
    }
    return {rgb, depth, feats, alpha, final_t, last_ids};
}

std::vector<Tensor> rasterize_bwd(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                  const Tensor& colors, const Tensor& depths, const Tensor& features,
                                  const OptTensor& background, const Tensor& tile_ranges, const Tensor& gaussian_ids,
                                  const Tensor& final_t, const Tensor& last_ids, int64_t width, int64_t height,
                                  const OptTensor& v_rgb, const OptTensor& v_depth, const OptTensor& v_features,
                                  const OptTensor& v_alpha, bool feature_grad_to_geometry, bool alpha_clamp_grad,
                                  bool geometry_grad) {
    const at::cuda::OptionalCUDAGuard guard(device_of(means2d));
    fit3d::RasterizeArgs a = rasterize_args(means2d, conics, opacities, colors, depths, features, background,
                                            tile_ranges, gaussian_ids, width, height);
    const int64_t B = a.B, F = a.F, H = height, W = width;
    check_tensor(final_t, "final_t", {B, H, W}, at::kFloat, &means2d);
    check_tensor(last_ids, "last_ids", {B, H, W}, at::kInt, &means2d);
    a.final_t = final_t.data_ptr<float>();
    a.last_ids = last_ids.data_ptr<int32_t>();
    a.v_rgb = optional_ptr(v_rgb, "v_rgb", {B, 3, H, W}, means2d);
    a.v_depth = optional_ptr(v_depth, "v_depth", {B, 1, H, W}, means2d);
    set_feature_grad(v_features, {B, F, H, W}, means2d, a);
    a.v_alpha = optional_ptr(v_alpha, "v_alpha", {B, 1, H, W}, means2d);
    a.alpha_clamp_grad = alpha_clamp_grad;
    const auto zeros_like = [](const Tensor& t) { return zeros_on_stream(t.sizes(), t.options()); };
    Tensor v_means2d = zeros_like(means2d), v_conics = zeros_like(conics);
    Tensor v_opacities = zeros_like(opacities), v_colors = zeros_like(colors);
    Tensor v_depths = zeros_like(depths), v_feats = zeros_like(features);
    fit3d::binding::set_rasterize_gradients(a, v_means2d, v_conics, v_opacities, v_colors, v_depths, v_feats);
    // feature channels need a launch only when their image has a gradient
    const auto passes = plan_bwd_passes(a.v_features != nullptr || a.v_features_bf16 != nullptr ? a.F : 0);
    for (const auto& [begin, end] : passes) {
        a.channel_begin = begin;
        a.channel_count = end - begin;
        a.first_pass = begin == 0;
        // no channel routed: the kernel skips the alpha gradient and the geometry's sums (v_means2d, v_conics and
        // v_opacities stay zero), when no 2D mean, conic or opacity needs a gradient
        a.routed_count = !geometry_grad             ? 0
                         : feature_grad_to_geometry ? a.channel_count
                                                    : std::max(0, std::min(a.channel_count, 4 - begin));
        check_cuda(fit3d::launch_rasterize_bwd(a, stream()), "rasterize_bwd");
    }
    return {v_means2d, v_conics, v_opacities, v_colors, v_depths, v_feats};
}

// ---- feature_l1 ---------------------------------------------------------------------------------------
namespace {

fit3d::ScalarType scalar_type(const Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat:
            return fit3d::ScalarType::Float32;
        case at::kHalf:
            return fit3d::ScalarType::Float16;
        case at::kBFloat16:
            return fit3d::ScalarType::BFloat16;
        default:
            throw std::invalid_argument(
                message("fit3d feature loss: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type()));
    }
}

fit3d::FeatureL1Args feature_l1_args(const Tensor& decoded, const Tensor& target, const OptTensor& mask) {
    for (const auto& [t, name] : {std::pair{&decoded, "decoded"}, std::pair{&target, "target"}}) {
        FIT3D_CHECK(t->is_cuda() && t->dim() == 4, "fit3d feature loss: ", name, " must be a 4-d CUDA tensor");
        FIT3D_CHECK(t->is_contiguous(at::MemoryFormat::ChannelsLast), "fit3d feature loss: ", name,
                    " must be channels-last contiguous");
    }
    FIT3D_CHECK(target.size(0) == decoded.size(0) && target.size(1) == decoded.size(1), "fit3d feature loss: target ",
                target.sizes(), " must have the batch size and channels of decoded ", decoded.sizes());
    FIT3D_CHECK(target.device() == decoded.device(), "fit3d feature loss: target is on ", target.device(),
                " but decoded is on ", decoded.device());
    fit3d::FeatureL1Args a = {};
    fit3d::binding::set_feature_l1_sizes(a, decoded, target);
    a.decoded_type = scalar_type(decoded, "decoded");
    a.target_type = scalar_type(target, "target");
    a.decoded = decoded.data_ptr();
    a.target = target.data_ptr();
    if (mask.has_value() && mask->defined()) {
        FIT3D_CHECK(mask->device() == decoded.device() && mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                        mask->dim() == 4 && mask->size(0) == a.B && mask->size(1) == 1 && mask->size(2) == a.H &&
                        mask->size(3) == a.W,
                    "fit3d feature loss: mask must be a contiguous bool tensor of shape [", a.B, ", 1, ", a.H, ", ",
                    a.W, "] on ", decoded.device(), ", got ", mask->sizes(), " ", mask->scalar_type(), " on ",
                    mask->device());
        a.mask = mask->data_ptr<bool>();
    }
    return a;
}

// The forward's launch (with or without signs) and its loss.
Tensor feature_l1_loss(fit3d::FeatureL1Args& a, const Tensor& decoded) {
    // per-block sums, added up by torch: a fixed order, so the loss is the same on every run
    Tensor partials = torch::empty({fit3d::feature_l1_blocks(a)}, decoded.options().dtype(at::kFloat));
    a.partials = partials.data_ptr<float>();
    check_cuda(fit3d::launch_feature_l1(a, stream()), "feature_l1 forward");
    return partials.sum() * double(a.inv_count);
}

}  // namespace

Tensor feature_l1_fwd(const Tensor& decoded, const Tensor& target, const OptTensor& mask) {
    const at::cuda::OptionalCUDAGuard guard(device_of(decoded));
    fit3d::FeatureL1Args a = feature_l1_args(decoded, target, mask);
    return feature_l1_loss(a, decoded);
}

// The forward that also keeps the signs of decoded - up(target), 2 bits per value (an int16 per 8 channels), for
// feature_l1_bwd_from_signs: the backward then reads 1/8 of the decoded map's bytes instead of the map and the
// target. Returns (loss, signs); signs is None where the 8-channel kernel does not apply (use feature_l1_bwd).
std::tuple<Tensor, Tensor> feature_l1_fwd_signs(const Tensor& decoded, const Tensor& target, const OptTensor& mask) {
    const at::cuda::OptionalCUDAGuard guard(device_of(decoded));
    fit3d::FeatureL1Args a = feature_l1_args(decoded, target, mask);
    Tensor signs;  // undefined (None) where the 8-channel kernel does not apply
    if (fit3d::feature_l1_keeps_signs(a)) {
        signs = torch::empty({decoded.numel() / 8}, decoded.options().dtype(at::kShort));
        a.signs = reinterpret_cast<uint16_t*>(signs.data_ptr());
    }
    return {feature_l1_loss(a, decoded), signs};
}

// The gradient w.r.t. decoded (`sizes` [B, D, H, W], channels-last, the dtype of `like`) from the forward's signs.
Tensor feature_l1_bwd_from_signs(const Tensor& signs, const Tensor& grad_output, std::vector<int64_t> sizes,
                                 const Tensor& like) {
    const at::cuda::OptionalCUDAGuard guard(device_of(signs));
    FIT3D_CHECK(sizes.size() == 4, "fit3d feature loss: sizes must be [B, D, H, W], got ", c10::IntArrayRef(sizes));
    check_tensor(grad_output, "grad_output", {1}, at::kFloat, &signs);
    const int64_t count = sizes[0] * sizes[1] * sizes[2] * sizes[3];
    check_tensor(signs, "signs", {count / 8}, at::kShort);
    FIT3D_CHECK(sizes[1] % 8 == 0, "fit3d feature loss: signs need a multiple of 8 channels, got ", sizes[1]);
    Tensor grad =
        torch::empty(sizes, like.options().device(signs.device()).memory_format(at::MemoryFormat::ChannelsLast));
    check_cuda(fit3d::launch_feature_l1_from_signs(reinterpret_cast<const uint16_t*>(signs.data_ptr()), count,
                                                   scalar_type(grad, "decoded"), grad_output.data_ptr<float>(),
                                                   1.f / float(count), grad.data_ptr(), stream()),
               "feature_l1 backward (signs)");
    return grad;
}

Tensor feature_l1_bwd(const Tensor& decoded, const Tensor& target, const OptTensor& mask, const Tensor& grad_output) {
    const at::cuda::OptionalCUDAGuard guard(device_of(decoded));
    check_tensor(grad_output, "grad_output", {1}, at::kFloat, &decoded);
    fit3d::FeatureL1Args a = feature_l1_args(decoded, target, mask);
    Tensor grad = torch::empty_like(decoded, at::MemoryFormat::ChannelsLast);
    a.grad_output = grad_output.data_ptr<float>();
    a.grad = grad.data_ptr();
    check_cuda(fit3d::launch_feature_l1(a, stream()), "feature_l1 backward");
    return grad;
}

// ---- ssim ---------------------------------------------------------------------------------------------
namespace {

// The images' checks and the arguments both directions share (the 3DGS window: 11 taps, sigma 1.5).
fit3d::SsimArgs ssim_args(const Tensor& prediction, const Tensor& target) {
    check_tensor(prediction, "prediction", {-1, -1, -1, -1});
    check_tensor(target, "target", {prediction.size(0), prediction.size(1), prediction.size(2), prediction.size(3)},
                 at::kFloat, &prediction);
    FIT3D_CHECK(prediction.size(2) > 0 && prediction.size(3) > 0, "fit3d ssim: the images must have pixels, got ",
                prediction.sizes());
    for (int64_t dim = 0; dim < 4; ++dim)  // ceil_div of the tile counts must not overflow an int
        FIT3D_CHECK(prediction.size(dim) <= INT_MAX / 2, "fit3d ssim: images of size ", prediction.sizes(),
                    " are too large");
    fit3d::SsimArgs a = {};
    a.B = int(prediction.size(0));
    a.C = int(prediction.size(1));
    a.H = int(prediction.size(2));
    a.W = int(prediction.size(3));
    fit3d::ssim_gaussian_taps(1.5, a.taps);
    a.prediction = prediction.data_ptr<float>();
    a.target = target.data_ptr<float>();
    a.inv_count = float(1.0 / double(std::max<int64_t>(prediction.numel(), 1)));
    return a;
}

}  // namespace

// Mean SSIM of prediction and target (a 0-d tensor) and the derivatives [3, B, C, H, W] that ssim_bwd reads.
std::tuple<Tensor, Tensor> ssim_fwd(const Tensor& prediction, const Tensor& target) {
    fit3d::SsimArgs a = ssim_args(prediction, target);
    const at::cuda::OptionalCUDAGuard guard(device_of(prediction));
    Tensor derivatives = torch::empty({3, a.B, a.C, a.H, a.W}, prediction.options());
    Tensor partials = torch::empty({fit3d::ssim_blocks(a)}, prediction.options());
    a.derivatives = derivatives.data_ptr<float>();
    a.partials = partials.data_ptr<float>();
    check_cuda(fit3d::launch_ssim_fwd(a, stream()), "ssim forward");
    // per-block sums, added up by torch: a fixed order, so the value is the same on every run
    return {partials.sum() / double(prediction.numel()), derivatives};
}

// The gradient of grad_output * mean SSIM w.r.t. prediction (the target receives none).
Tensor ssim_bwd(const Tensor& prediction, const Tensor& target, const Tensor& derivatives, const Tensor& grad_output) {
    fit3d::SsimArgs a = ssim_args(prediction, target);
    check_tensor(derivatives, "derivatives", {3, a.B, a.C, a.H, a.W}, at::kFloat, &prediction);
    check_tensor(grad_output, "grad_output", {1}, at::kFloat, &prediction);
    const at::cuda::OptionalCUDAGuard guard(device_of(prediction));
    Tensor grad = torch::empty_like(prediction);
    a.derivatives = derivatives.data_ptr<float>();
    a.grad_output = grad_output.data_ptr<float>();
    a.grad = grad.data_ptr<float>();
    check_cuda(fit3d::launch_ssim_bwd(a, stream()), "ssim backward");
    return grad;
}

// Waits until the pair count of this thread's last isect_tiles with a capacity on `device` is in its `total`
// (not for the rest of that binning, nor for what was queued after it).
void wait_pair_count(int64_t device) {
    FIT3D_CHECK(device >= 0 && device < c10::cuda::device_count(), "fit3d rasterizer: no CUDA device ", device);
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));  // where its event is made, if new
    check_cuda(cudaEventSynchronize(pair_count_event(int(device))), "pair count wait");
}

// ---- adam ---------------------------------------------------------------------------------------------
// One Adam step of every tensor in `params` (in place, with their moments), in one launch per
// fit3d::ADAM_MAX_TENSORS tensors; `hyper` holds per tensor (step_size, bias_correction2_sqrt, beta1, beta2, eps),
// and `live`, if not empty, per tensor the number of leading elements of each row (its elements past the first
// dimension) that the step updates, or -1 for all of them; see fit3d::AdamTensor.
void adam_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
               const std::vector<Tensor>& exp_avg_sqs, const std::vector<std::array<double, 5>>& hyper,
               const std::vector<int64_t>& live) {
    const size_t count = params.size();
    FIT3D_CHECK(
        grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count && hyper.size() == count,
        "fit3d adam: ", count, " parameters but ", grads.size(), " gradients, ", exp_avgs.size(), " and ",
        exp_avg_sqs.size(), " moments and ", hyper.size(), " settings");
    FIT3D_CHECK(live.empty() || live.size() == count, "fit3d adam: ", count, " parameters but ", live.size(),
                " live row prefixes");
    if (count == 0) return;
    std::vector<fit3d::AdamTensor> tensors(count);
    for (size_t i = 0; i < count; ++i) {
        const Tensor& p = params[i];
        // elementwise: any dense layout does, if the four tensors share it (the decoder's weight is channels-last)
        FIT3D_CHECK(p.is_cuda() && p.scalar_type() == at::kFloat && p.is_non_overlapping_and_dense(),
                    "fit3d adam: parameter ", i, " must be a dense float32 CUDA tensor, got ", p.scalar_type(), " on ",
                    p.device());
        const std::pair<const Tensor*, const char*> others[] = {
            {&grads[i], "gradient"}, {&exp_avgs[i], "exp_avg"}, {&exp_avg_sqs[i], "exp_avg_sq"}};
        for (const auto& [t, name] : others) {
            FIT3D_CHECK(t->device() == params[0].device() && t->scalar_type() == at::kFloat &&
                            t->sizes() == p.sizes() && t->strides() == p.strides(),
                        "fit3d adam: the ", name, " of parameter ", i,
                        " must be a float32 tensor of the parameter's shape ", p.sizes(), " and strides ", p.strides(),
                        " on ", params[0].device(), ", got ", t->scalar_type(), " ", t->sizes(), " strides ",
                        t->strides(), " on ", t->device());
        }
        FIT3D_CHECK(p.device() == params[0].device(), "fit3d adam: parameter ", i, " is on ", p.device(),
                    " but parameter 0 is on ", params[0].device());
        int64_t n = p.numel(), row = 0, prefix = 0;
        if (!live.empty() && live[i] >= 0) {
            const int64_t rows = p.dim() > 0 ? p.size(0) : 1;
            const int64_t row_length = rows > 0 ? n / rows : 0;
            FIT3D_CHECK(p.is_contiguous() && live[i] <= row_length && n < INT_MAX, "fit3d adam: a live prefix of ",
                        live[i],
                        " elements per row needs a contiguous parameter of fewer than 2^31 elements with rows that "
                        "long; parameter ",
                        i, " has shape ", p.sizes());
            if (live[i] < row_length) {  // else all of it: the dense path
                row = row_length;
                prefix = live[i];
                n = rows * prefix;
            }
        }
        const auto& [step_size, bias_correction2_sqrt, beta1, beta2, eps] = hyper[i];
        tensors[i] = {p.data_ptr<float>(),
                      grads[i].data_ptr<float>(),
                      exp_avgs[i].data_ptr<float>(),
                      exp_avg_sqs[i].data_ptr<float>(),
                      n,
                      float(step_size),
                      float(bias_correction2_sqrt),
                      float(beta1),
                      float(1.0 - beta1),
                      float(beta2),
                      float(1.0 - beta2),
                      float(eps),
                      int(row),
                      int(prefix)};
    }
    const at::cuda::OptionalCUDAGuard guard(device_of(params[0]));
    check_cuda(fit3d::launch_adam(tensors.data(), int(count), stream()), "adam");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fit3d-hf CUDA rasterizer of RGB, depth and feature channels (see fit3d_hf/render/_wrapper.py)";
    m.def("project_fwd", &project_fwd);
    m.def("project_bwd", &project_bwd);
    m.def("spherical_harmonics_fwd", &sh_fwd);
    m.def("spherical_harmonics_bwd", &sh_bwd);
    m.def("isect_tiles", &isect_tiles);
    m.def("rasterize_fwd", &rasterize_fwd);
    m.def("rasterize_bwd", &rasterize_bwd);
    m.def("feature_l1_fwd", &feature_l1_fwd);
    m.def("feature_l1_bwd", &feature_l1_bwd);
    m.def("feature_l1_fwd_signs", &feature_l1_fwd_signs);
    m.def("feature_l1_bwd_from_signs", &feature_l1_bwd_from_signs);
    m.attr("TILE_SIZE") = fit3d::TILE_SIZE;
    m.def("ssim_fwd", &ssim_fwd);
    m.def("ssim_bwd", &ssim_bwd);
    m.def("wait_pair_count", &wait_pair_count);
    m.def("adam_step", &adam_step);
}
