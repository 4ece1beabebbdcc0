// The fused per-step update of the GenDD sampler on CUDA: guidance mix, learned-range variance
// interpolation, posterior mean (or DDIM update) and noise, in one pass over the rows.
// c10's CUDA headers only (not ATen/cuda/CUDAContext.h): the kernel needs a stream and a device
// guard, not cuBLAS/cuSPARSE, so it builds with a minimal CUDA toolkit too.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "sampler.h"

namespace gendd {
namespace {

template <typename T>
__global__ void step_kernel(float* __restrict__ x, const T* __restrict__ out,
                            const float* __restrict__ noise, int64_t n, int64_t d, int64_t od,
                            StepScalars s, float cfg, bool guided, bool ddim, float sigma,
                            float dir, float sqrt_ac_prev) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= n * d) return;
  const int64_t r = k / d, j = k % d;
  const float ec = static_cast<float>(out[r * od + j]);
  float eps = ec;
  if (guided) {
    const float eu = static_cast<float>(out[(r + n) * od + j]);
    eps = eu + cfg * (ec - eu);
  }
  const float xt = x[k];
  const float x0 = s.sqrt_recip_ac * xt - s.sqrt_recipm1_ac * eps;
  float nx;
  if (ddim) {
    const float e = (s.sqrt_recip_ac * xt - x0) / s.sqrt_recipm1_ac;
    nx = x0 * sqrt_ac_prev + dir * e + sigma * noise[k] * s.noise_scale;
  } else {
    const float frac = (static_cast<float>(out[r * od + d + j]) + 1.f) * 0.5f;
    const float logvar = frac * s.log_beta + (1.f - frac) * s.post_logvar;
    nx = s.coef1 * x0 + s.coef2 * xt + __expf(0.5f * logvar) * noise[k] * s.noise_scale;
  }
  x[k] = nx;
}

}  // namespace

void step_update_cuda(at::Tensor& x, const at::Tensor& out, const at::Tensor& noise,
                      const StepScalars& s, double cfg, bool guided, bool ddim, double eta) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1), od = out.size(1);
  float sigma = 0.f, dir = 0.f;
  if (ddim) {
    sigma = static_cast<float>(eta) * sqrtf((1.f - s.ac_prev) / (1.f - s.ac)) *
            sqrtf(1.f - s.ac / s.ac_prev);
    dir = sqrtf(1.f - s.ac_prev - sigma * sigma);
  }
  const int threads = 256;
  const int64_t blocks = (n * d + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gendd_step", [&] {
    step_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x.data_ptr<float>(), out.data_ptr<scalar_t>(), noise.data_ptr<float>(), n, d, od, s,
        static_cast<float>(cfg), guided, ddim, sigma, dir, sqrtf(s.ac_prev));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gendd
