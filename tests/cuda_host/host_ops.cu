// Runs the per-element projection and SH math of rasterizer_cuda/ on the CPU (their functions are
// __host__ __device__), so CPU-only CI can compare them with the Python reference. Built by
// tests/test_rasterizer_compiles.py with nvcc into a shared library and called through ctypes.
#include "project_fwd.cu"
#include "project_bwd.cu"
#include "sh_fwd.cu"
#include "sh_bwd.cu"

using namespace fit3d;

extern "C" {

void host_project_fwd(int B, int N, int width, int height, float near_plane, float far_plane,
                      const float* means, const float* quats, const float* scales, const float* opacities,
                      const float* viewmats, const float* Ks, float* means2d, float* conics, float* depths,
                      int32_t* radii) {
    ProjectArgs a = {};
    a.B = B; a.N = N; a.width = width; a.height = height; a.near_plane = near_plane; a.far_plane = far_plane;
    a.means = means; a.quats = quats; a.scales = scales; a.opacities = opacities; a.viewmats = viewmats;
    a.Ks = Ks; a.means2d = means2d; a.conics = conics; a.depths = depths; a.radii = radii;
    for (int64_t i = 0; i < int64_t(B) * N; ++i) project_fwd_one(a, i);
}

void host_project_bwd(int B, int N, int width, int height, const float* means, const float* quats,
                      const float* scales, const float* viewmats, const float* Ks, const int32_t* radii,
                      const float* v_means2d, const float* v_conics, const float* v_depths, float* v_means,
                      float* v_quats, float* v_scales) {
    ProjectArgs a = {};
    a.B = B; a.N = N; a.width = width; a.height = height;
    a.means = means; a.quats = quats; a.scales = scales; a.viewmats = viewmats; a.Ks = Ks; a.radii = const_cast<int32_t*>(radii);
    a.v_means2d = v_means2d; a.v_conics = v_conics; a.v_depths = v_depths;
    a.v_means = v_means; a.v_quats = v_quats; a.v_scales = v_scales;
    for (int g = 0; g < N; ++g) project_bwd_one(a, g);
}

void host_sh_fwd(int B, int N, int K, int degree, const float* sh, const float* means, const float* viewmats,
                 float* colors) {
    ShArgs a = {};
    a.B = B; a.N = N; a.degree = degree; a.means = means; a.viewmats = viewmats;
    set_sh_layout(a, false, K, sh, nullptr);
    a.colors = colors;
    with_sh_degree(degree, [&](auto deg) {
        for (int64_t i = 0; i < int64_t(B) * N; ++i) sh_fwd_one<decltype(deg)::value>(a, i);
    });
}

void host_sh_bwd(int B, int N, int K, int degree, const float* sh, const float* means, const float* viewmats,
                 const float* v_colors, float* v_sh, float* v_means) {
    ShArgs a = {};
    a.B = B; a.N = N; a.degree = degree; a.means = means; a.viewmats = viewmats;
    set_sh_layout(a, false, K, sh, nullptr);
    set_sh_gradient_layout(a, false, v_sh, nullptr);
    a.v_colors = v_colors; a.v_means = v_means;
    with_sh_degree(degree, [&](auto deg) {
        for (int g = 0; g < N; ++g) sh_bwd_one<decltype(deg)::value>(a, g);
    });
}

}  // extern "C"
