// Stage I's feature loss on the CPU: mean over channels and pixels of |decoded - up(target)|, masked pixels
// counting 0, where up() is PyTorch's bilinear upsampling (align_corners=False) of the patch-resolution target.
// One pass over the decoded map per direction, instead of the composed ops' upsampled copy, where(),
// difference, abs, mean and their backward. Any memory layout (strides), one image row per work item; the
// loss sums the rows' partial sums (double) in row order, so it does not depend on the thread count.
#include <cmath>
#include <vector>

#include "cpu/ops_cpu.h"
#include "feature_loss_math.h"

namespace fit3d::cpu {

namespace {

// Calls fn(b, y, x, c, diff) for every element of image row (b, y) that the mask keeps, channel by channel;
// diff = decoded - up(target) (PyTorch's association of the bilinear sum, so up() is its value).
template <typename Fn>
void for_row(const FeatureL1Args& a, Strides4 ds, Strides4 ts, const std::vector<int>& x0s, const std::vector<int>& x1s,
             const std::vector<float>& lxs, int b, int y, Fn&& fn) {
    int y0, y1;
    float ly;
    source_index(y, a.scale_y, a.h, y0, y1, ly);
    const float h0 = 1.f - ly, h1 = ly;
    const float* decoded = static_cast<const float*>(a.decoded);
    const float* target = static_cast<const float*>(a.target);
    const bool* mask = a.mask != nullptr ? a.mask + (int64_t(b) * a.H + y) * a.W : nullptr;
    for (int c = 0; c < a.D; ++c) {
        const float* row0 = target + b * ts.b + c * ts.c + y0 * ts.y;
        const float* row1 = target + b * ts.b + c * ts.c + y1 * ts.y;
        const float* d = decoded + b * ds.b + c * ds.c + y * ds.y;
        for (int x = 0; x < a.W; ++x) {
            if (mask != nullptr && !mask[x]) continue;
            const float w1 = lxs[x], w0 = 1.f - w1;
            const int64_t i0 = x0s[x] * ts.x, i1 = x1s[x] * ts.x;
            const float up = h0 * (w0 * row0[i0] + w1 * row0[i1]) + h1 * (w0 * row1[i0] + w1 * row1[i1]);
            fn(c, x, d[x * ds.x] - up);
        }
    }
}

struct Columns {
    std::vector<int> x0, x1;
    std::vector<float> lx;
    explicit Columns(const FeatureL1Args& a) : x0(a.W), x1(a.W), lx(a.W) {
        for (int x = 0; x < a.W; ++x) source_index(x, a.scale_x, a.w, x0[x], x1[x], lx[x]);
    }
};

}  // namespace

double feature_l1_fwd(const FeatureL1Args& a, Strides4 ds, Strides4 ts) {
    const Columns cols(a);
    const int64_t rows = int64_t(a.B) * a.H;
    std::vector<double> partial(size_t(rows), 0.0);
    parallel_for(rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            double sum = 0.0;
            for_row(a, ds, ts, cols.x0, cols.x1, cols.lx, int(r / a.H), int(r % a.H),
                    [&](int, int, float diff) { sum += std::fabs(diff); });
            partial[size_t(r)] = sum;
        }
    });
    double total = 0.0;
    for (const double p : partial) total += p;
    return total * double(a.inv_count);
}

void feature_l1_bwd(const FeatureL1Args& a, Strides4 ds, Strides4 ts, float scale) {
    const Columns cols(a);
    float* grad = static_cast<float*>(a.grad);
    parallel_for(int64_t(a.B) * a.H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const int b = int(r / a.H), y = int(r % a.H);
            float* g = grad + b * ds.b + y * ds.y;
            if (a.mask != nullptr)  // masked pixels get 0 (for_row skips them)
                for (int c = 0; c < a.D; ++c)
                    for (int x = 0; x < a.W; ++x) g[c * ds.c + x * ds.x] = 0.f;
            for_row(a, ds, ts, cols.x0, cols.x1, cols.lx, b, y, [&](int c, int x, float diff) {
                g[c * ds.c + x * ds.x] = diff > 0.f ? scale : (diff < 0.f ? -scale : 0.f);
            });
        }
    });
}

}  // namespace fit3d::cpu
