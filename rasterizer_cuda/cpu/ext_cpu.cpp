// The torch binding of the CPU rasterizer (module fit3d_hf._C_cpu): the functions and signatures of the CUDA
// extension's ext.cpp, so that fit3d_hf/render/_wrapper.py drives either by the tensors' device. Checks
// tensors, allocates outputs, fills the argument structs of ops.h (as ext.cpp does: binding_args.h) and runs the
// loops of cpu/*.cpp on torch's intra-op threads. The Python wrapper validates inputs with clear messages first;
// the checks here are a backstop.
// Only the headers it uses (not torch/extension.h): the file compiles in half the time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <climits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "binding_args.h"
#include "constants.h"
#include "cpu/ops_cpu.h"
#include "sh_math.h"

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace fit3d::cpu {

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    const int64_t chunks = (n + grain - 1) / grain;
    if (chunks == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
        body(0, n);
        return;
    }
    // each thread takes the next chunk until none is left: uneven chunks (tiles) balance themselves
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        for (int64_t c = next++; c < chunks; c = next++) body(c * grain, std::min(n, (c + 1) * grain));
    });
}

}  // namespace fit3d::cpu

namespace {

using fit3d::binding::tiles_along;

// Device, dtype, layout and shape of an argument; `shape` holds the expected sizes, -1 for "any".
void check_tensor(const Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                  at::ScalarType dtype = at::kFloat) {
    FIT3D_CHECK(t.device().is_cpu(), "fit3d CPU rasterizer: ", name, " must be a CPU tensor, got one on ", t.device());
    fit3d::binding::check_layout(t, "fit3d CPU rasterizer", name, shape, dtype);
}

const float* optional_ptr(const OptTensor& t, const char* name, std::initializer_list<int64_t> shape) {
    if (!t.has_value() || !t->defined()) return nullptr;
    check_tensor(*t, name, shape);
    return t->data_ptr<float>();
}

// The feature images' gradient, planar or channels-last (the layout of the features this extension returns, and
// of what a convolution of them passes back); sets its strides.
const float* feature_grad_ptr(const OptTensor& t, std::initializer_list<int64_t> shape, fit3d::RasterizeArgs& a) {
    a.v_features_channel_stride = int64_t(a.width) * a.height;
    a.v_features_pixel_stride = 1;
    if (!t.has_value() || !t->defined()) return nullptr;
    if (t->dim() == 4 && !t->is_contiguous() && t->is_contiguous(at::MemoryFormat::ChannelsLast)) {
        check_tensor(t->permute({0, 2, 3, 1}), "v_features (channels-last)",
                     {shape.begin()[0], shape.begin()[2], shape.begin()[3], shape.begin()[1]});
        a.v_features_channel_stride = 1;
        a.v_features_pixel_stride = a.F;
        return t->data_ptr<float>();
    }
    check_tensor(*t, "v_features", shape);
    return t->data_ptr<float>();
}

void check_image(int64_t width, int64_t height) {
    FIT3D_CHECK(width > 0 && height > 0 && width <= INT_MAX - fit3d::TILE_SIZE && height <= INT_MAX - fit3d::TILE_SIZE,
                "fit3d CPU rasterizer: bad image size ", width, " x ", height);
}

}  // namespace

// ---- project ------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> project_fwd(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                                       const Tensor& opacities, const Tensor& viewmats,
                                                       const Tensor& Ks, int64_t width, int64_t height,
                                                       double near_plane, double far_plane) {
    check_tensor(means, "means", {-1, 3});
    const int64_t N = means.size(0), B = viewmats.dim() == 3 ? viewmats.size(0) : -1;
    check_tensor(quats, "quats", {N, 4});
    check_tensor(scales, "scales", {N, 3});
    check_tensor(opacities, "opacities", {N});
    check_tensor(viewmats, "world_to_camera", {B, 4, 4});
    check_tensor(Ks, "K", {B, 3, 3});
    check_image(width, height);
    FIT3D_CHECK(near_plane > 0.0 && near_plane < far_plane,
                "fit3d CPU rasterizer: need 0 < near_plane < far_plane, got ", near_plane, " and ", far_plane);
    FIT3D_CHECK(B * N < INT_MAX, "fit3d CPU rasterizer: ", B, " cameras x ", N, " Gaussians exceed the int32 limit");
    auto opts = means.options();
    Tensor means2d = at::empty({B, N, 2}, opts), conics = at::empty({B, N, 3}, opts);
    Tensor depths = at::empty({B, N}, opts), radii = at::empty({B, N}, opts.dtype(at::kInt));
    fit3d::ProjectArgs a = fit3d::binding::project_args(means, quats, scales, viewmats, Ks, width, height);
    fit3d::binding::set_project_outputs(a, opacities, near_plane, far_plane, means2d, conics, depths, radii);
    fit3d::cpu::project_fwd(a);
    return {means2d, conics, depths, radii};
}

std::tuple<Tensor, Tensor, Tensor> project_bwd(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                               const Tensor& viewmats, const Tensor& Ks, const Tensor& radii,
                                               int64_t width, int64_t height, const Tensor& v_means2d,
                                               const Tensor& v_conics, const Tensor& v_depths) {
    check_tensor(means, "means", {-1, 3});
    const int64_t N = means.size(0), B = viewmats.dim() == 3 ? viewmats.size(0) : -1;
    check_tensor(quats, "quats", {N, 4});
    check_tensor(scales, "scales", {N, 3});
    check_tensor(viewmats, "world_to_camera", {B, 4, 4});
    check_tensor(Ks, "K", {B, 3, 3});
    check_tensor(radii, "radii", {B, N}, at::kInt);
    check_tensor(v_means2d, "v_means2d", {B, N, 2});
    check_tensor(v_conics, "v_conics", {B, N, 3});
    check_tensor(v_depths, "v_depths", {B, N});
    check_image(width, height);
    Tensor v_means = at::empty_like(means), v_quats = at::empty_like(quats), v_scales = at::empty_like(scales);
    fit3d::ProjectArgs a = fit3d::binding::project_args(means, quats, scales, viewmats, Ks, width, height);
    fit3d::binding::set_project_gradients(a, radii, v_means2d, v_conics, v_depths, v_means, v_quats, v_scales);
    fit3d::cpu::project_bwd(a);
    return {v_means, v_quats, v_scales};
}

// ---- spherical harmonics ------------------------------------------------------------------------------
namespace {

// The coefficients as one [N, K, 3] tensor `sh_dc` (no `sh_rest`), or as the DC terms [N, 1, 3] and the rest
// [N, K - 1, 3] (see ShArgs).
fit3d::ShArgs sh_args(const Tensor& sh_dc, const OptTensor& sh_rest, const Tensor& means, const Tensor& viewmats,
                      int64_t degree) {
    check_tensor(means, "means", {-1, 3});
    const bool split = sh_rest.has_value() && sh_rest->defined();
    check_tensor(sh_dc, split ? "sh_dc" : "sh", {means.size(0), split ? 1 : -1, 3});
    if (split) check_tensor(*sh_rest, "sh_rest", {means.size(0), -1, 3});
    check_tensor(viewmats, "world_to_camera", {-1, 4, 4});
    const int K = int(split ? 1 + sh_rest->size(1) : sh_dc.size(1));
    FIT3D_CHECK(degree >= 0 && degree <= 3 && (degree + 1) * (degree + 1) <= K, "fit3d CPU rasterizer: bad sh_degree ",
                degree, " for ", K, " coefficients");
    return fit3d::binding::sh_args(sh_dc, split ? &*sh_rest : nullptr, means, viewmats, degree);
}

}  // namespace

Tensor sh_fwd(const Tensor& sh_dc, const OptTensor& sh_rest, const Tensor& means, const Tensor& viewmats,
              int64_t degree) {
    fit3d::ShArgs a = sh_args(sh_dc, sh_rest, means, viewmats, degree);
    Tensor colors = at::empty({a.B, a.N, 3}, means.options());
    a.colors = colors.data_ptr<float>();
    fit3d::cpu::sh_fwd(a);
    return colors;
}

std::tuple<Tensor, OptTensor, Tensor> sh_bwd(const Tensor& sh_dc, const OptTensor& sh_rest, const Tensor& means,
                                             const Tensor& viewmats, int64_t degree, const Tensor& v_colors) {
    fit3d::ShArgs a = sh_args(sh_dc, sh_rest, means, viewmats, degree);
    check_tensor(v_colors, "v_colors", {a.B, a.N, 3});
    Tensor v_dc = at::empty_like(sh_dc), v_means = at::empty_like(means);
    OptTensor v_rest;
    if (sh_rest.has_value() && sh_rest->defined()) v_rest = at::empty_like(*sh_rest);
    fit3d::binding::set_sh_gradients(a, v_colors, v_dc, v_rest.has_value() ? &*v_rest : nullptr, v_means);
    fit3d::cpu::sh_bwd(a);
    return {v_dc, v_rest, v_means};
}

// ---- isect_tiles --------------------------------------------------------------------------------------
// Returns (tile ranges, Gaussian ids, total) as the CUDA op; the pair list is always sized exactly (`capacity`,
// the GPU's way to avoid a host sync, is ignored), so `total` is its size.
std::tuple<Tensor, Tensor, Tensor> isect_tiles(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                               const Tensor& depths, const Tensor& radii, int64_t width, int64_t height,
                                               int64_t /*capacity*/) {
    check_tensor(means2d, "means2d", {-1, -1, 2});
    const int64_t B = means2d.size(0), N = means2d.size(1);
    check_tensor(conics, "conics", {B, N, 3});
    check_tensor(opacities, "opacities", {N});
    check_tensor(depths, "depths", {B, N});
    check_tensor(radii, "radii", {B, N}, at::kInt);
    check_image(width, height);
    FIT3D_CHECK(B * N < INT_MAX, "fit3d CPU rasterizer: ", B, " cameras x ", N, " Gaussians exceed the int32 limit");
    fit3d::IsectArgs a = fit3d::binding::isect_args(means2d, conics, opacities, radii, width, height);
    const fit3d::cpu::IsectPlan plan = fit3d::cpu::isect_count(a, depths.data_ptr<float>());
    FIT3D_CHECK(plan.total < INT_MAX, "fit3d CPU rasterizer: ", plan.total,
                " (Gaussian, tile) pairs exceed the int32 limit");
    auto int_opts = means2d.options().dtype(at::kInt);
    Tensor ranges = at::zeros({B * a.tiles_x * a.tiles_y, 2}, int_opts), ids = at::empty({plan.total}, int_opts);
    fit3d::cpu::isect_fill(a, plan, ranges.data_ptr<int32_t>(), ids.data_ptr<int32_t>());
    return {ranges, ids, at::full({1}, plan.total, means2d.options().dtype(at::kLong))};
}

// ---- rasterize ----------------------------------------------------------------------------------------
namespace {

fit3d::RasterizeArgs rasterize_args(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                    const Tensor& colors, const Tensor& depths, const Tensor& features,
                                    const OptTensor& background, const Tensor& tile_ranges, const Tensor& gaussian_ids,
                                    int64_t width, int64_t height) {
    check_tensor(means2d, "means2d", {-1, -1, 2});
    const int64_t B = means2d.size(0), N = means2d.size(1);
    check_tensor(conics, "conics", {B, N, 3});
    check_tensor(opacities, "opacities", {N});
    if (colors.dim() == 3)
        check_tensor(colors, "colors", {B, N, 3});
    else
        check_tensor(colors, "colors", {N, 3});
    check_tensor(depths, "depths", {B, N});
    check_tensor(features, "features", {N, -1});
    check_image(width, height);
    check_tensor(tile_ranges, "tile_ranges", {B * tiles_along(width) * tiles_along(height), 2}, at::kInt);
    check_tensor(gaussian_ids, "gaussian_ids", {-1}, at::kInt);
    fit3d::RasterizeArgs a = fit3d::binding::rasterize_args(means2d, conics, opacities, colors, depths, features,
                                                            tile_ranges, gaussian_ids, width, height);
    a.background = optional_ptr(background, "background", {3});
    return a;
}

}  // namespace

std::vector<Tensor> rasterize_fwd(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                  const Tensor& colors, const Tensor& depths, const Tensor& features,
                                  const OptTensor& background, const Tensor& tile_ranges, const Tensor& gaussian_ids,
                                  int64_t width, int64_t height, bool features_bf16) {
    fit3d::RasterizeArgs a = rasterize_args(means2d, conics, opacities, colors, depths, features, background,
                                            tile_ranges, gaussian_ids, width, height);
    auto opts = means2d.options();
    const int64_t B = a.B, H = height, W = width;
    Tensor rgb = at::empty({B, 3, H, W}, opts), depth = at::empty({B, 1, H, W}, opts);
    // features channels-last: the tiles accumulate them pixel-major, so this layout is written without a
    // transpose, and a convolution of them (Stage I's decoder) runs on it without one either
    Tensor feats = at::empty({B, int64_t(a.F), H, W}, opts.memory_format(at::MemoryFormat::ChannelsLast));
    Tensor alpha = at::empty({B, 1, H, W}, opts);
    Tensor final_t = at::empty({B, H, W}, opts), last_ids = at::empty({B, H, W}, opts.dtype(at::kInt));
    fit3d::binding::set_rasterize_outputs(a, rgb, depth, alpha, final_t, last_ids);
    a.out_features = feats.data_ptr<float>();
    fit3d::cpu::rasterize_fwd(a);
    // bfloat16 on request (the CUDA kernel writes them so directly); the layout stays channels-last
    if (features_bf16) feats = feats.to(at::kBFloat16);
    return {rgb, depth, feats, alpha, final_t, last_ids};
}

std::vector<Tensor> rasterize_bwd(const Tensor& means2d, const Tensor& conics, const Tensor& opacities,
                                  const Tensor& colors, const Tensor& depths, const Tensor& features,
                                  const OptTensor& background, const Tensor& tile_ranges, const Tensor& gaussian_ids,
                                  const Tensor& final_t, const Tensor& last_ids, int64_t width, int64_t height,
                                  const OptTensor& v_rgb, const OptTensor& v_depth, const OptTensor& v_features,
                                  const OptTensor& v_alpha, bool feature_grad_to_geometry, bool alpha_clamp_grad,
                                  bool geometry_grad) {
    fit3d::RasterizeArgs a = rasterize_args(means2d, conics, opacities, colors, depths, features, background,
                                            tile_ranges, gaussian_ids, width, height);
    const int64_t B = a.B, F = a.F, H = height, W = width;
    check_tensor(final_t, "final_t", {B, H, W});
    check_tensor(last_ids, "last_ids", {B, H, W}, at::kInt);
    a.final_t = final_t.data_ptr<float>();
    a.last_ids = last_ids.data_ptr<int32_t>();
    a.v_rgb = optional_ptr(v_rgb, "v_rgb", {B, 3, H, W});
    a.v_depth = optional_ptr(v_depth, "v_depth", {B, 1, H, W});
    // a bfloat16 gradient (of bfloat16 features) is read as float32, converted here
    const OptTensor v_features_float =
        v_features.has_value() && v_features->defined() && v_features->scalar_type() == at::kBFloat16
            ? OptTensor(v_features->to(at::kFloat))
            : v_features;
    a.v_features = feature_grad_ptr(v_features_float, {B, F, H, W}, a);
    a.v_alpha = optional_ptr(v_alpha, "v_alpha", {B, 1, H, W});
    a.alpha_clamp_grad = alpha_clamp_grad;
    Tensor v_means2d = at::zeros_like(means2d), v_conics = at::zeros_like(conics);
    Tensor v_opacities = at::zeros_like(opacities), v_colors = at::zeros_like(colors);
    Tensor v_depths = at::zeros_like(depths), v_feats = at::zeros_like(features);
    fit3d::binding::set_rasterize_gradients(a, v_means2d, v_conics, v_opacities, v_colors, v_depths, v_feats);
    // feature channels take part only when their image has a gradient
    a.channel_count = a.v_features != nullptr ? 4 + a.F : 4;
    // none routed: no alpha gradient and no geometry sums (as the CUDA kernel), when the geometry needs no gradient
    a.routed_count = !geometry_grad ? 0 : feature_grad_to_geometry ? a.channel_count : 4;
    fit3d::cpu::rasterize_bwd(a, gaussian_ids.numel());
    return {v_means2d, v_conics, v_opacities, v_colors, v_depths, v_feats};
}

// ---- feature_l1 ---------------------------------------------------------------------------------------
namespace {

struct FeatureL1Inputs {
    fit3d::FeatureL1Args args = {};  // zeroed: a null mask and grad unless set
    Tensor decoded, target;          // float32 (converted when given in another dtype)
    fit3d::cpu::Strides4 decoded_strides, target_strides;
};

fit3d::cpu::Strides4 strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

FeatureL1Inputs feature_l1_inputs(const Tensor& decoded, const Tensor& target, const OptTensor& mask) {
    for (const auto& [t, name] : {std::pair{&decoded, "decoded"}, std::pair{&target, "target"}}) {
        FIT3D_CHECK(t->device().is_cpu() && t->dim() == 4, "fit3d feature loss: ", name,
                    " must be a 4-d CPU tensor, got ", t->sizes(), " on ", t->device());
        FIT3D_CHECK(
            t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16,
            "fit3d feature loss: ", name, " must be float32, float16 or bfloat16, got ", t->scalar_type());
    }
    FIT3D_CHECK(target.size(0) == decoded.size(0) && target.size(1) == decoded.size(1), "fit3d feature loss: target ",
                target.sizes(), " must have the batch size and channels of decoded ", decoded.sizes());
    FeatureL1Inputs in;
    // float32, in its own layout when that is dense (the gradient is allocated like it)
    in.decoded = decoded.scalar_type() == at::kFloat ? decoded : decoded.to(at::kFloat);
    if (!in.decoded.is_contiguous() && !in.decoded.is_contiguous(at::MemoryFormat::ChannelsLast))
        in.decoded = in.decoded.contiguous();
    in.target = target.to(at::kFloat);
    in.decoded_strides = strides_of(in.decoded);
    in.target_strides = strides_of(in.target);
    fit3d::FeatureL1Args& a = in.args;
    fit3d::binding::set_feature_l1_sizes(a, decoded, target);
    a.decoded_type = a.target_type = fit3d::ScalarType::Float32;
    a.decoded = in.decoded.data_ptr();
    a.target = in.target.data_ptr();
    if (mask.has_value() && mask->defined()) {
        FIT3D_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                        mask->dim() == 4 && mask->size(0) == a.B && mask->size(1) == 1 && mask->size(2) == a.H &&
                        mask->size(3) == a.W,
                    "fit3d feature loss: mask must be a contiguous bool CPU tensor of shape [", a.B, ", 1, ", a.H, ", ",
                    a.W, "], got ", mask->sizes(), " ", mask->scalar_type(), " on ", mask->device());
        a.mask = mask->data_ptr<bool>();
    }
    return in;
}

}  // namespace

Tensor feature_l1_fwd(const Tensor& decoded, const Tensor& target, const OptTensor& mask) {
    const FeatureL1Inputs in = feature_l1_inputs(decoded, target, mask);
    const double loss = fit3d::cpu::feature_l1_fwd(in.args, in.decoded_strides, in.target_strides);
    return at::scalar_tensor(loss, decoded.options().dtype(at::kFloat));
}

Tensor feature_l1_bwd(const Tensor& decoded, const Tensor& target, const OptTensor& mask, const Tensor& grad_output) {
    check_tensor(grad_output, "grad_output", {1});
    FeatureL1Inputs in = feature_l1_inputs(decoded, target, mask);
    Tensor grad = at::empty_like(in.decoded);  // dense: the strides of in.decoded, which the kernel writes by
    in.args.grad = grad.data_ptr();
    // the composed ops' rounding: (gradient / count) in float32, as mean()'s backward
    const float scale = grad_output.item<float>() / float(decoded.numel());
    fit3d::cpu::feature_l1_bwd(in.args, in.decoded_strides, in.target_strides, scale);
    return grad.scalar_type() == decoded.scalar_type() ? grad : grad.to(decoded.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fit3d-hf CPU rasterizer of RGB, depth and feature channels (see fit3d_hf/render/_wrapper.py)";
    m.def("project_fwd", &project_fwd);
    m.def("project_bwd", &project_bwd);
    m.def("spherical_harmonics_fwd", &sh_fwd);
    m.def("spherical_harmonics_bwd", &sh_bwd);
    m.def("isect_tiles", &isect_tiles);
    m.def("rasterize_fwd", &rasterize_fwd);
    m.def("rasterize_bwd", &rasterize_bwd);
    m.def("feature_l1_fwd", &feature_l1_fwd);
    m.def("feature_l1_bwd", &feature_l1_bwd);
    m.attr("TILE_SIZE") = fit3d::TILE_SIZE;
}
