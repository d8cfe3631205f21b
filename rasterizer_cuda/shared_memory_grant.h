// Raising a kernel's dynamic shared-memory limit (cudaFuncSetAttribute) is a driver call, made before every
// launch until now; the host time of a render is one of the rasterizer's targets, so each launch site keeps
// what it has been granted per device and asks again only for more.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

namespace fit3d {

class SharedMemoryGrant {
public:
    // Lets `kernel` launch with `bytes` of dynamic shared memory on the current device.
    template <typename Kernel>
    cudaError_t ensure(Kernel* kernel, size_t bytes) {
        int device = 0;
        cudaError_t err = cudaGetDevice(&device);
        if (err != cudaSuccess) return err;
        if (device < 0 || device >= kDevices) return raise(kernel, bytes);
        if (bytes <= granted_[device].load(std::memory_order_acquire)) return cudaSuccess;
        // a smaller request from another thread must not lower the limit between a larger grant and its launch
        const std::lock_guard<std::mutex> lock(mutex_);
        if (bytes <= granted_[device].load(std::memory_order_relaxed)) return cudaSuccess;
        err = raise(kernel, bytes);
        if (err == cudaSuccess) granted_[device].store(bytes, std::memory_order_release);
        return err;
    }

private:
    static constexpr int kDevices = 64;

    template <typename Kernel>
    static cudaError_t raise(Kernel* kernel, size_t bytes) {
        return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    }

    std::atomic<size_t> granted_[kDevices] = {};
    std::mutex mutex_;
};

}  // namespace fit3d
