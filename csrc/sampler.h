// gendd_fast._C: the GenDD multi-step sampler loop, run natively.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace gendd {

// Per-step scalars the fused update needs, float32 as the reference casts its float64 tables.
struct StepScalars {
  float sqrt_recip_ac;    // sqrt(1 / abar_t)
  float sqrt_recipm1_ac;  // sqrt(1 / abar_t - 1)
  float coef1;            // posterior mean coefficient on x0
  float coef2;            // posterior mean coefficient on x_t
  float log_beta;         // max log-variance
  float post_logvar;      // min log-variance (clipped posterior)
  float ac;               // abar_t            (DDIM)
  float ac_prev;          // abar_{t-1}        (DDIM)
  float noise_scale;      // temperature, or 0 at the last step
};

// x <- one reverse step, given the head output `out` (rows, 2d) of the conditional rows and,
// with guidance, of the unconditional rows (rows [uncond_offset, uncond_offset + n)).
void step_update_cpu(at::Tensor& x, const at::Tensor& out, const at::Tensor& noise,
                     const StepScalars& s, double cfg, bool guided, bool ddim, double eta);
#ifdef WITH_CUDA
void step_update_cuda(at::Tensor& x, const at::Tensor& out, const at::Tensor& noise,
                      const StepScalars& s, double cfg, bool guided, bool ddim, double eta);
#endif

}  // namespace gendd
