// What the two torch bindings, the CUDA extension's ext.cpp and the CPU one's cpu/ext_cpu.cpp, do alike: their
// error messages, the dtype/layout/shape part of an argument's check, and the filling of ops.h's argument structs
// from tensors. Each binding checks devices its own way, allocates its outputs and runs its own kernels or loops;
// with one mapping of tensors to struct fields, the CPU tests also vouch for the one the CUDA ops use.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

#include "constants.h"
#include "ops.h"
#include "sh_math.h"

namespace fit3d::binding {

template <typename... Args>
std::string message(const Args&... args) {
    std::ostringstream out;
    (out << ... << args);
    return out.str();
}

// Argument errors are thrown as std::invalid_argument (Python: ValueError, through pybind11's own translation).
#define FIT3D_CHECK(cond, ...)                                                          \
    do {                                                                                \
        if (!(cond)) throw std::invalid_argument(fit3d::binding::message(__VA_ARGS__)); \
    } while (0)

// Dtype, contiguity and shape of an argument (`shape`: the expected sizes, -1 for "any"); `who` begins the message.
inline void check_layout(const at::Tensor& t, const char* who, const char* name, std::initializer_list<int64_t> shape,
                         at::ScalarType dtype) {
    FIT3D_CHECK(t.scalar_type() == dtype, who, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
    FIT3D_CHECK(t.is_contiguous(), who, ": ", name, " must be contiguous");
    bool ok = t.dim() == int64_t(shape.size());
    int64_t dim = 0;
    for (const int64_t size : shape) {  // dim advances on "any" (-1) axes too
        ok = ok && (size < 0 || t.size(dim) == size);
        ++dim;
    }
    FIT3D_CHECK(ok, who, ": ", name, " must have shape ", c10::IntArrayRef(shape), " (-1: any), got ", t.sizes());
}

inline int tiles_along(int64_t pixels) { return int((pixels + TILE_SIZE - 1) / TILE_SIZE); }

// ---- project ------------------------------------------------------------------------------------------------
// The inputs both directions read: means [N, 3], quats [N, 4], scales [N, 3], world-to-camera [B, 4, 4], K [B, 3, 3].
inline ProjectArgs project_args(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                const at::Tensor& viewmats, const at::Tensor& Ks, int64_t width, int64_t height) {
    ProjectArgs a = {};
    a.B = int(viewmats.size(0));
    a.N = int(means.size(0));
    a.width = int(width);
    a.height = int(height);
    a.means = means.data_ptr<float>();
    a.quats = quats.data_ptr<float>();
    a.scales = scales.data_ptr<float>();
    a.viewmats = viewmats.data_ptr<float>();
    a.Ks = Ks.data_ptr<float>();
    return a;
}

// The forward's culling inputs and its outputs.
inline void set_project_outputs(ProjectArgs& a, const at::Tensor& opacities, double near_plane, double far_plane,
                                at::Tensor& means2d, at::Tensor& conics, at::Tensor& depths, at::Tensor& radii) {
    a.opacities = opacities.data_ptr<float>();
    a.near_plane = float(near_plane);
    a.far_plane = float(far_plane);
    a.means2d = means2d.data_ptr<float>();
    a.conics = conics.data_ptr<float>();
    a.depths = depths.data_ptr<float>();
    a.radii = radii.data_ptr<int32_t>();
}

// The backward's inputs (the forward's radii, its outputs' gradients) and the gradients it writes.
inline void set_project_gradients(ProjectArgs& a, const at::Tensor& radii, const at::Tensor& v_means2d,
                                  const at::Tensor& v_conics, const at::Tensor& v_depths, at::Tensor& v_means,
                                  at::Tensor& v_quats, at::Tensor& v_scales) {
    a.radii = radii.data_ptr<int32_t>();
    a.v_means2d = v_means2d.data_ptr<float>();
    a.v_conics = v_conics.data_ptr<float>();
    a.v_depths = v_depths.data_ptr<float>();
    a.v_means = v_means.data_ptr<float>();
    a.v_quats = v_quats.data_ptr<float>();
    a.v_scales = v_scales.data_ptr<float>();
}

// ---- spherical harmonics ------------------------------------------------------------------------------------
// The coefficients as one [N, K, 3] tensor `sh_dc` (sh_rest null), or as the DC terms [N, 1, 3] and the rest
// [N, K - 1, 3] (see ShArgs).
inline ShArgs sh_args(const at::Tensor& sh_dc, const at::Tensor* sh_rest, const at::Tensor& means,
                      const at::Tensor& viewmats, int64_t degree) {
    ShArgs a = {};
    a.B = int(viewmats.size(0));
    a.N = int(means.size(0));
    a.degree = int(degree);
    const int K = int(sh_rest != nullptr ? 1 + sh_rest->size(1) : sh_dc.size(1));
    set_sh_layout(a, sh_rest != nullptr, K, sh_dc.data_ptr<float>(),
                  sh_rest != nullptr ? sh_rest->data_ptr<float>() : nullptr);
    a.means = means.data_ptr<float>();
    a.viewmats = viewmats.data_ptr<float>();
    return a;
}

// The backward's input (the colours' gradient) and the gradients it writes, v_rest null where sh_rest was.
inline void set_sh_gradients(ShArgs& a, const at::Tensor& v_colors, at::Tensor& v_dc, at::Tensor* v_rest,
                             at::Tensor& v_means) {
    a.v_colors = v_colors.data_ptr<float>();
    set_sh_gradient_layout(a, v_rest != nullptr, v_dc.data_ptr<float>(),
                           v_rest != nullptr ? v_rest->data_ptr<float>() : nullptr);
    a.v_means = v_means.data_ptr<float>();
}

// ---- isect_tiles --------------------------------------------------------------------------------------------
// The projected Gaussians the binning reads: means2d [B, N, 2], conics [B, N, 3], opacities [N], radii [B, N].
inline IsectArgs isect_args(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& opacities,
                            const at::Tensor& radii, int64_t width, int64_t height) {
    IsectArgs a = {};
    a.B = int(means2d.size(0));
    a.N = int(means2d.size(1));
    a.width = int(width);
    a.height = int(height);
    a.tiles_x = tiles_along(width);
    a.tiles_y = tiles_along(height);
    a.means2d = means2d.data_ptr<float>();
    a.conics = conics.data_ptr<float>();
    a.opacities = opacities.data_ptr<float>();
    a.radii = radii.data_ptr<int32_t>();
    return a;
}

// ---- rasterize ----------------------------------------------------------------------------------------------
// The inputs both directions read (colors [N, 3] or per camera [B, N, 3]; the background is the caller's), set for
// one pass over every channel from the first.
inline RasterizeArgs rasterize_args(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& opacities,
                                    const at::Tensor& colors, const at::Tensor& depths, const at::Tensor& features,
                                    const at::Tensor& tile_ranges, const at::Tensor& gaussian_ids, int64_t width,
                                    int64_t height) {
    RasterizeArgs a = {};
    a.B = int(means2d.size(0));
    a.N = int(means2d.size(1));
    a.F = int(features.size(1));
    a.width = int(width);
    a.height = int(height);
    a.tiles_x = tiles_along(width);
    a.tiles_y = tiles_along(height);
    a.channel_begin = 0;
    a.channel_count = 4 + a.F;
    a.first_pass = true;
    a.means2d = means2d.data_ptr<float>();
    a.conics = conics.data_ptr<float>();
    a.opacities = opacities.data_ptr<float>();
    a.colors = colors.data_ptr<float>();
    a.colors_camera_stride = colors.dim() == 3 ? int64_t(a.N) * 3 : 0;
    a.depths = depths.data_ptr<float>();
    a.features = features.data_ptr<float>();
    a.tile_ranges = tile_ranges.data_ptr<int32_t>();
    a.gaussian_ids = gaussian_ids.data_ptr<int32_t>();
    return a;
}

// The forward's outputs but the features (whose dtype and layout differ between the bindings).
inline void set_rasterize_outputs(RasterizeArgs& a, at::Tensor& rgb, at::Tensor& depth, at::Tensor& alpha,
                                  at::Tensor& final_t, at::Tensor& last_ids) {
    a.out_rgb = rgb.data_ptr<float>();
    a.out_depth = depth.data_ptr<float>();
    a.out_alpha = alpha.data_ptr<float>();
    a.final_t = final_t.data_ptr<float>();
    a.last_ids = last_ids.data_ptr<int32_t>();
}

// The gradients the backward accumulates (zeroed by the caller).
inline void set_rasterize_gradients(RasterizeArgs& a, at::Tensor& v_means2d, at::Tensor& v_conics,
                                    at::Tensor& v_opacities, at::Tensor& v_colors, at::Tensor& v_depths,
                                    at::Tensor& v_feats) {
    a.v_means2d = v_means2d.data_ptr<float>();
    a.v_conics = v_conics.data_ptr<float>();
    a.v_opacities = v_opacities.data_ptr<float>();
    a.v_colors = v_colors.data_ptr<float>();
    a.v_depths = v_depths.data_ptr<float>();
    a.v_feats = v_feats.data_ptr<float>();
}

// ---- feature_l1 ---------------------------------------------------------------------------------------------
// The sizes of the decoded map [B, D, H, W] and of the target [B, D, h, w] it is compared with, upsampled.
inline void set_feature_l1_sizes(FeatureL1Args& a, const at::Tensor& decoded, const at::Tensor& target) {
    a.B = int(decoded.size(0));
    a.D = int(decoded.size(1));
    a.H = int(decoded.size(2));
    a.W = int(decoded.size(3));
    a.h = int(target.size(2));
    a.w = int(target.size(3));
    a.scale_x = float(a.w) / float(a.W);
    a.scale_y = float(a.h) / float(a.H);
    a.inv_count = 1.f / float(decoded.numel());
}

}  // namespace fit3d::binding
