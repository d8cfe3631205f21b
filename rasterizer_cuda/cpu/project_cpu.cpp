// EWA projection and SH colours on the CPU: the per-element functions of project_math.h and sh_math.h (the
// ones the CUDA threads run), looped over (camera, Gaussian) pairs or Gaussians on torch's threads.
#include "cpu/ops_cpu.h"
#include "project_math.h"
#include "sh_math.h"

namespace fit3d::cpu {

namespace {
constexpr int64_t GRAIN = 4096;  // elements per chunk: a few microseconds of work
}

void project_fwd(const ProjectArgs& a) {
    parallel_for(int64_t(a.B) * a.N, GRAIN, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) project_fwd_one(a, i);
    });
}

void project_bwd(const ProjectArgs& a) {
    parallel_for(a.N, GRAIN, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) project_bwd_one(a, int(g));
    });
}

void sh_fwd(const ShArgs& a) {
    with_sh_degree(a.degree, [&](auto deg) {
        parallel_for(int64_t(a.B) * a.N, GRAIN, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) sh_fwd_one<decltype(deg)::value>(a, i);
        });
    });
}

void sh_bwd(const ShArgs& a) {
    with_sh_degree(a.degree, [&](auto deg) {
        parallel_for(a.N, GRAIN, [&](int64_t begin, int64_t end) {
            for (int64_t g = begin; g < end; ++g) sh_bwd_one<decltype(deg)::value>(a, int(g));
        });
    });
}

}  // namespace fit3d::cpu
