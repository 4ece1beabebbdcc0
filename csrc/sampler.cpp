// The GenDD sampler loop: respaced ancestral (learned-range variance) or DDIM sampling with
// temperature and classifier-free guidance, for the SimpleMLPAdaLN head.
//
// What it saves over the Python reference loop:
//  * the time MLP runs once per kept step for all steps up front, not once per row per step;
//  * cond_embed(z) + pos_embed(k) is computed once per call;
//  * the unconditional half of CFG has z = 0, so its condition depends only on (step, token):
//    its adaLN modulations are computed for L rows and gathered, not for N rows;
//  * the adaLN modulations of all blocks and the final layer are one GEMM against their
//    weights stacked once per call (11W x W at depth 3), written straight into a buffer that
//    holds both CFG halves, so no per-step concatenation;
//  * input_proj(x_t) is shared by both halves (they share x_t);
//  * the per-step update (guidance mix, variance interpolation, posterior mean, noise) is one
//    fused pass over the rows (a CUDA kernel on GPU, one vectorised loop on CPU);
//  * no Python between steps. Matrix products go through ATen (MKL/oneDNN or cuBLAS).
#include "sampler.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace gendd {
namespace {

constexpr int kFreqDim = 256;  // sinusoidal timestep features, as the reference head

struct Block {
  at::Tensor ln_w, ln_b, w0, b0, w2, b2, ada_w, ada_b;
};

struct Head {
  at::Tensor t_w0, t_b0, t_w2, t_b2, cond_w, cond_b, pos_w, in_w, in_b;
  std::vector<Block> blocks;
  at::Tensor fin_ada_w, fin_ada_b, fin_w, fin_b;
  int64_t width = 0, d = 0, zc = 0, chunks = 0;
};

void check_shape(const at::Tensor& t, std::vector<int64_t> want, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "gendd_fast._C: weight ", name, " is missing");
  TORCH_CHECK_VALUE(t.sizes().vec() == want, "gendd_fast._C: weight ", name, " has shape ",
                    t.sizes(), ", expected ", at::IntArrayRef(want));
}

// Weights in the order sampler_ext.head_weights() gives them (gendd_fast/head_layout.py names
// them); every shape is checked here so a mismatched head is a Python ValueError, never a crash
// inside a GEMM.
Head unpack(const std::vector<at::Tensor>& w, int64_t depth) {
  TORCH_CHECK_VALUE(depth >= 1, "gendd_fast._C: depth must be >= 1, got ", depth);
  const int64_t expect = 9 + 8 * depth + 4;
  TORCH_CHECK_VALUE(static_cast<int64_t>(w.size()) == expect, "gendd_fast._C: expected ", expect,
                    " weight tensors for depth ", depth, ", got ", w.size());
  Head h;
  h.t_w0 = w[0];
  TORCH_CHECK_VALUE(h.t_w0.dim() == 2, "gendd_fast._C: time_embed.mlp.0.weight must be 2-D");
  h.width = h.t_w0.size(0);
  const int64_t W = h.width;
  check_shape(h.t_w0, {W, kFreqDim}, "time_embed.mlp.0.weight");
  h.t_b0 = w[1];
  check_shape(h.t_b0, {W}, "time_embed.mlp.0.bias");
  h.t_w2 = w[2];
  check_shape(h.t_w2, {W, W}, "time_embed.mlp.2.weight");
  h.t_b2 = w[3];
  check_shape(h.t_b2, {W}, "time_embed.mlp.2.bias");
  h.cond_w = w[4];
  TORCH_CHECK_VALUE(h.cond_w.dim() == 2 && h.cond_w.size(0) == W,
                    "gendd_fast._C: cond_embed.weight must be (", W, ", z_channels), got ",
                    h.cond_w.sizes());
  h.zc = h.cond_w.size(1);
  h.cond_b = w[5];
  check_shape(h.cond_b, {W}, "cond_embed.bias");
  h.pos_w = w[6];
  TORCH_CHECK_VALUE(h.pos_w.dim() == 2 && h.pos_w.size(1) == W,
                    "gendd_fast._C: pos_embed.weight must be (num_chunks, ", W, "), got ",
                    h.pos_w.sizes());
  h.chunks = h.pos_w.size(0);
  h.in_w = w[7];
  TORCH_CHECK_VALUE(h.in_w.dim() == 2 && h.in_w.size(0) == W,
                    "gendd_fast._C: input_proj.weight must be (", W, ", token_dim), got ",
                    h.in_w.sizes());
  h.d = h.in_w.size(1);
  h.in_b = w[8];
  check_shape(h.in_b, {W}, "input_proj.bias");
  for (int64_t i = 0; i < depth; ++i) {
    const auto* p = &w[9 + 8 * i];
    Block b{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
    check_shape(b.ln_w, {W}, "res_blocks.in_ln.weight");
    check_shape(b.ln_b, {W}, "res_blocks.in_ln.bias");
    check_shape(b.w0, {W, W}, "res_blocks.mlp.0.weight");
    check_shape(b.b0, {W}, "res_blocks.mlp.0.bias");
    check_shape(b.w2, {W, W}, "res_blocks.mlp.2.weight");
    check_shape(b.b2, {W}, "res_blocks.mlp.2.bias");
    check_shape(b.ada_w, {3 * W, W}, "res_blocks.adaLN_modulation.1.weight");
    check_shape(b.ada_b, {3 * W}, "res_blocks.adaLN_modulation.1.bias");
    h.blocks.push_back(b);
  }
  const auto* f = &w[9 + 8 * depth];
  h.fin_ada_w = f[0];
  check_shape(h.fin_ada_w, {2 * W, W}, "final_layer.adaLN_modulation.1.weight");
  h.fin_ada_b = f[1];
  check_shape(h.fin_ada_b, {2 * W}, "final_layer.adaLN_modulation.1.bias");
  h.fin_w = f[2];
  check_shape(h.fin_w, {2 * h.d, W}, "final_layer.linear.weight");
  h.fin_b = f[3];
  check_shape(h.fin_b, {2 * h.d}, "final_layer.linear.bias");
  const auto dev = h.t_w0.device();
  const auto dt = h.t_w0.scalar_type();
  for (const auto& t : w) {
    TORCH_CHECK_VALUE(t.device() == dev && t.scalar_type() == dt,
                      "gendd_fast._C: all weights must share one device and dtype");
  }
  return h;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return at::addmm(b, x, w.t());
}

// All adaLN modulation weights stacked for one GEMM `SiLU(y) @ w + b`: w is (W, 11W) at depth
// 3, columns [block 0: shift, scale, gate | block 1 | block 2 | final: shift, scale]. The bias
// of every `scale` segment carries the +1 of `LN(h) * (1 + scale)`, so the trunk multiplies by
// the GEMM output directly. (sampler_ext.stacked_modulation builds the same, cached.)
struct StackedModulation {
  at::Tensor w, b;
};

StackedModulation stack_modulations(const Head& h) {
  std::vector<at::Tensor> ws, bs;
  for (const auto& b : h.blocks) {
    ws.push_back(b.ada_w);
    bs.push_back(b.ada_b);
  }
  ws.push_back(h.fin_ada_w);
  bs.push_back(h.fin_ada_b);
  auto bias = at::cat(bs, 0);
  const int64_t W = h.width;
  for (size_t i = 0; i <= h.blocks.size(); ++i) bias.narrow(0, 3 * W * i + W, W).add_(1);
  return {at::cat(ws, 0).t().contiguous(), bias};
}

void check_stacked(const Head& h, const StackedModulation& m) {
  const int64_t cols = (3 * static_cast<int64_t>(h.blocks.size()) + 2) * h.width;
  TORCH_CHECK_VALUE(m.w.sizes() == at::IntArrayRef({h.width, cols}) &&
                        m.b.sizes() == at::IntArrayRef({cols}),
                    "gendd_fast._C: stacked modulation must be (", h.width, ", ", cols,
                    ") and (", cols, "), got ", m.w.sizes(), " and ", m.b.sizes());
  TORCH_CHECK_VALUE(m.w.device() == h.t_w0.device() && m.w.scalar_type() == h.t_w0.scalar_type(),
                    "gendd_fast._C: stacked modulation must match the weights' device and dtype");
}

// out (rows, 11W) <- SiLU(y) @ stacked + bias: every modulation of every layer in one GEMM.
void modulations_into(at::Tensor out, const StackedModulation& m, const at::Tensor& y) {
  at::addmm_out(out, m.b, at::silu(y), m.w);
}

// The residual blocks and final layer for hidden states x and per-row modulations `mods`
// laid out as stack_modulations() stacks the weights.
at::Tensor trunk(const Head& h, at::Tensor x, const at::Tensor& mods) {
  const int64_t W = h.width;
  int64_t col = 0;
  auto take = [&](int64_t width) {
    auto v = mods.narrow(1, col, width);
    col += width;
    return v;
  };
  for (const auto& b : h.blocks) {
    auto shift = take(W), scale1 = take(W), gate = take(W);  // scale1 = 1 + scale
    auto u = at::layer_norm(x, {W}, b.ln_w, b.ln_b, 1e-6);
    u = at::addcmul(shift, u, scale1);
    u = linear(at::silu(linear(u, b.w0, b.b0)), b.w2, b.b2);
    x = at::addcmul(x, gate, u);
  }
  auto shift = take(W), scale1 = take(W);
  auto u = at::layer_norm(x, {W}, {}, {}, 1e-6);
  u = at::addcmul(shift, u, scale1);
  return linear(u, h.fin_w, h.fin_b);
}

}  // namespace

void step_update_cpu(at::Tensor& x, const at::Tensor& out_any, const at::Tensor& noise,
                     const StepScalars& s, double cfg_d, bool guided, bool ddim, double eta_d) {
  const at::Tensor out = out_any.to(at::kFloat).contiguous();
  const int64_t n = x.size(0), d = x.size(1), od = out.size(1);
  float* xp = x.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* zp = noise.data_ptr<float>();
  const float cfg = static_cast<float>(cfg_d), eta = static_cast<float>(eta_d);
  float sigma = 0.f, dir = 0.f;
  if (ddim) {
    sigma = eta * std::sqrt((1.f - s.ac_prev) / (1.f - s.ac)) * std::sqrt(1.f - s.ac / s.ac_prev);
    dir = std::sqrt(1.f - s.ac_prev - sigma * sigma);
  }
  const float sqrt_ac_prev = std::sqrt(s.ac_prev);
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* oc = op + r * od;                  // conditional row: [eps_c, v]
      const float* ou = op + (r + n) * od;            // unconditional row (guided only)
      float* xr = xp + r * d;
      const float* zr = zp + r * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const float eps = guided ? ou[j] + cfg * (oc[j] - ou[j]) : oc[j];
        const float xt = xr[j];
        const float x0 = s.sqrt_recip_ac * xt - s.sqrt_recipm1_ac * eps;
        float nx;
        if (ddim) {
          const float e = (s.sqrt_recip_ac * xt - x0) / s.sqrt_recipm1_ac;
          nx = x0 * sqrt_ac_prev + dir * e + sigma * zr[j] * s.noise_scale;
        } else {
          const float frac = (oc[d + j] + 1.f) * 0.5f;
          const float logvar = frac * s.log_beta + (1.f - frac) * s.post_logvar;
          nx = s.coef1 * x0 + s.coef2 * xt + std::exp(0.5f * logvar) * zr[j] * s.noise_scale;
        }
        xr[j] = nx;
      }
    }
  });
}

// x_T (n, d) float32; step_noises (S, n, d) float32; tables (S, 8) float32 with columns
// [sqrt_recip_ac, sqrt_recipm1_ac, coef1, coef2, log_beta, post_logvar, ac, ac_prev] for the
// respaced steps 0..S-1; timesteps (S,) the original index of each kept step.
at::Tensor sample_loop(const std::vector<at::Tensor>& weights, int64_t depth, at::Tensor z,
                       at::Tensor chunk_idx, at::Tensor x_T, at::Tensor step_noises,
                       at::Tensor tables, at::Tensor timesteps, double cfg, double temperature,
                       bool ddim, double eta, bool check_indices,
                       c10::optional<at::Tensor> stacked_w, c10::optional<at::Tensor> stacked_b) {
  const Head h = unpack(weights, depth);
  const auto dev = h.t_w0.device();
  const auto wdt = h.t_w0.scalar_type();
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) == h.zc, "gendd_fast._C: z must be (N, ", h.zc,
                    "), got ", z.sizes());
  const int64_t n = z.size(0);
  TORCH_CHECK_VALUE(n > 0, "gendd_fast._C: cannot sample an empty batch (z has 0 rows)");
  TORCH_CHECK_VALUE(chunk_idx.dim() == 1 && chunk_idx.size(0) == n,
                    "gendd_fast._C: chunk_idx must be (", n, "), got ", chunk_idx.sizes());
  // Range checks read values back (a device sync); a CUDA-graph capture validates beforehand.
  if (check_indices) {
    const auto kmin = chunk_idx.min().item<int64_t>(), kmax = chunk_idx.max().item<int64_t>();
    TORCH_CHECK_VALUE(kmin >= 0 && kmax < h.chunks, "gendd_fast._C: chunk_idx out of range [0, ",
                      h.chunks, "): got [", kmin, ", ", kmax, "]");
  }
  TORCH_CHECK_VALUE(x_T.sizes() == at::IntArrayRef({n, h.d}), "gendd_fast._C: x_T must be (",
                    n, ", ", h.d, "), got ", x_T.sizes());
  TORCH_CHECK_VALUE(timesteps.dim() == 1 && timesteps.size(0) >= 1,
                    "gendd_fast._C: need at least one sampling step");
  const int64_t S = timesteps.size(0);
  TORCH_CHECK_VALUE(S <= 1000, "gendd_fast._C: at most 1000 sampling steps, got ", S);
  if (check_indices) {
    TORCH_CHECK_VALUE(
        timesteps.min().item<int64_t>() >= 0 && timesteps.max().item<int64_t>() < 1000,
        "gendd_fast._C: timesteps must lie in [0, 1000)");
  }
  TORCH_CHECK_VALUE(step_noises.sizes() == at::IntArrayRef({S, n, h.d}),
                    "gendd_fast._C: step_noises must be (", S, ", ", n, ", ", h.d, "), got ",
                    step_noises.sizes());
  TORCH_CHECK_VALUE(tables.sizes() == at::IntArrayRef({S, 8}),
                    "gendd_fast._C: tables must be (", S, ", 8), got ", tables.sizes());
  TORCH_CHECK_VALUE(z.device() == dev && x_T.device() == dev && step_noises.device() == dev,
                    "gendd_fast._C: z, x_T, step_noises and the weights must be on one device");
  const bool guided = cfg != 1.0;
  const auto fopt = at::TensorOptions().dtype(at::kFloat).device(dev);

  // Time embeddings of every kept step at once: (S, W).
  const int64_t half = kFreqDim / 2;
  auto freqs = at::exp(-std::log(10000.0) * at::arange(half, fopt) / half);
  auto args = timesteps.to(dev).to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
  auto tfreq = at::cat({at::cos(args), at::sin(args)}, 1).to(wdt);
  auto temb = linear(at::silu(linear(tfreq, h.t_w0, h.t_b0)), h.t_w2, h.t_b2);

  // Condition without the time term, once per call, for the rows one GEMM serves each step:
  // rows [0, L) the unconditional condition of each token (cond_embed(0) is its bias), rows
  // [L, L + n) the conditional rows.
  auto idx = chunk_idx.to(dev).to(at::kLong);
  auto base_c = linear(z.to(wdt), h.cond_w, h.cond_b) + h.pos_w.index_select(0, idx);
  const int64_t L = h.chunks;
  auto base = guided ? at::cat({h.pos_w + h.cond_b, base_c}, 0) : base_c;
  const int64_t first = guided ? L : 0;  // first conditional row of `base` and `mods`

  auto x = x_T.to(at::kFloat).contiguous().clone();
  auto noises = step_noises.to(at::kFloat).contiguous();
  auto tab = tables.to(at::kCPU).to(at::kFloat).contiguous();
  const float* tp = tab.data_ptr<float>();

  StackedModulation stacked;
  if (stacked_w.has_value() && stacked_b.has_value()) {
    stacked = {*stacked_w, *stacked_b};
    check_stacked(h, stacked);
  } else {
    stacked = stack_modulations(h);
  }
  const int64_t mod_width = stacked.w.size(1);
  // mods rows: [0, L) per-token unconditional, [L, L + n) conditional, [L + n, L + 2n) the
  // unconditional rows gathered per row (guided); unguided: [0, n) conditional.
  auto mods = at::empty({first + (guided ? 2 * n : n), mod_width}, stacked.w.options());
  auto hid = at::empty({guided ? 2 * n : n, h.width}, stacked.w.options());
  auto mods_gemm = mods.narrow(0, 0, first + n);
  auto mods_trunk = mods.narrow(0, first, guided ? 2 * n : n);
  auto mods_gathered = guided ? mods.narrow(0, first + n, n) : at::Tensor();
  auto mods_uncond = guided ? mods.narrow(0, 0, L) : at::Tensor();
  auto hid_cond = hid.narrow(0, 0, n);
  auto hid_uncond = guided ? hid.narrow(0, n, n) : at::Tensor();

  for (int64_t step = 0; step < S; ++step) {
    const int64_t i = S - 1 - step;  // respaced index, from T down to 0
    modulations_into(mods_gemm, stacked, base + temb.narrow(0, i, 1));
    at::addmm_out(hid_cond, h.in_b, x.to(wdt), h.in_w.t());
    if (guided) {
      at::index_select_out(mods_gathered, mods_uncond, 0, idx);
      hid_uncond.copy_(hid_cond);  // both halves share x_t
    }
    auto out = trunk(h, hid, mods_trunk);
    const float* r = tp + i * 8;
    StepScalars s{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7],
                  i > 0 ? static_cast<float>(temperature) : 0.f};
    auto nz = noises[step];
#ifdef WITH_CUDA
    if (x.is_cuda()) {
      step_update_cuda(x, out.contiguous(), nz, s, cfg, guided, ddim, eta);
      continue;
    }
#endif
    step_update_cpu(x, out, nz, s, cfg, guided, ddim, eta);
  }
  return x;
}

}  // namespace gendd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gendd_fast._C: native GenDD sampler loop (CPU, and CUDA when built with it)";
  m.def("sample_loop", &gendd::sample_loop, "Run the whole respaced sampling loop",
        py::arg("weights"), py::arg("depth"), py::arg("z"), py::arg("chunk_idx"), py::arg("x_T"),
        py::arg("step_noises"), py::arg("tables"), py::arg("timesteps"), py::arg("cfg"),
        py::arg("temperature"), py::arg("ddim"), py::arg("eta"), py::arg("check_indices") = true,
        py::arg("stacked_w") = py::none(), py::arg("stacked_b") = py::none());
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
