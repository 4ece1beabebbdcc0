"""Gaussian diffusion as GenDD trains and samples it (improved-DDPM formulation).

Epsilon prediction with a learned-range variance: the head outputs ``[eps_hat, v]`` per row and
``log var = f * log(beta_t) + (1 - f) * log(post_var_clipped_t)`` with ``f = (v + 1) / 2``.
All tables are float64 (as the reference builds them with numpy) and are cast to float32 after
indexing, so results match the reference bit for bit where the arithmetic order does.

Names follow the improved-DDPM paper and code: ``alphas_cumprod`` is abar_t, ``q_sample`` is the
noise injection, ``p_mean_variance`` the model's reverse step, ``training_losses`` returns
``mse + vb``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

ModelFn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------------------------
def cosine_alpha_bar(t: float) -> float:
    """abar(t) of the cosine schedule (Nichol & Dhariwal), t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)
    if name == "linear":
        scale = 1000 / num_timesteps  # keeps the linear schedule's endpoints for any T
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; valid: 'cosine', 'linear'")


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> set:
    """Which of the ``num_timesteps`` training steps a respaced sampler keeps.

    ``"100"`` keeps 100 evenly spaced steps; ``"10,15,20"`` splits the range into three equal
    sections taking 10, 15 and 20 steps; ``"ddimN"`` takes a stride that gives exactly N steps
    (DDIM paper style). ``""`` or ``None`` keeps all steps.
    """
    if section_counts is None or section_counts == "":
        return set(range(num_timesteps))
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"unknown respacing spec {section_counts!r}: 'ddim' must be "
                                 f"followed by a step count, e.g. 'ddim50'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"respacing {section_counts!r}: cannot take exactly {desired} of "
                             f"{num_timesteps} steps with an integer stride")
        try:
            section_counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(f"unknown respacing spec {section_counts!r}: expected a step count "
                             f"('100'), comma-separated section counts ('10,20,30') or "
                             f"'ddimN'") from None
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"respacing {section_counts!r}: every section needs at least one step")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot take {count} steps from a "
                             f"section of {size} (at most {num_timesteps} steps in all)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


# ---------------------------------------------------------------------------------------------
# Closed-form helpers of the variational bound
# ---------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x under a Gaussian discretised into 255 bins on [-1, 1] (image decoder)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------------------------
_TABLES = ("betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
           "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
           "posterior_mean_coef1", "posterior_mean_coef2")


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion with learned-range variance and eps prediction.

    ``use_timesteps`` keeps a subset of the base process's steps; betas are recomputed from abar at
    the kept steps and the model is called with the *original* index of each kept step
    (``timestep_map``), exactly like improved-DDPM's ``SpacedDiffusion``.
    """

    def __init__(self, betas: np.ndarray, use_timesteps: Optional[set] = None):
        base_betas = np.asarray(betas, dtype=np.float64)
        if base_betas.ndim != 1 or not ((base_betas > 0) & (base_betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        if use_timesteps is None:
            use_timesteps = set(range(len(base_betas)))
        if not use_timesteps or max(use_timesteps) >= len(base_betas) or min(use_timesteps) < 0:
            raise ValueError(f"timesteps to keep must lie in [0, {len(base_betas)})")
        self.timestep_map = []
        new_betas, last = [], 1.0
        for i, ac in enumerate(base_alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1.0 - ac / last)
                last = ac
                self.timestep_map.append(i)
        b = np.array(new_betas, dtype=np.float64)
        self.num_timesteps = len(b)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.np = {
            "betas": b,
            "log_betas": np.log(b),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            # the posterior variance is 0 at t=0: the log is clipped to its value at t=1
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:]))
            if len(b) > 1 else np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        }
        self._device_tables: Dict[torch.device, Dict[str, torch.Tensor]] = {}
        self._map_tables: Dict[torch.device, torch.Tensor] = {}

    # -- table access --------------------------------------------------------------------------
    def tables(self, device) -> Dict[str, torch.Tensor]:
        """float64 copies of every table on ``device`` (made once per device)."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = {k: torch.from_numpy(v).to(device)
                                           for k, v in self.np.items()}
        return self._device_tables[device]

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps ``t`` as float32, broadcastable against ``x``."""
        v = self.tables(t.device)[name][t].float()
        return v.view(-1, *([1] * (x.ndim - 1)))

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map respaced step indices to the training-process indices the model was trained on."""
        if t.device not in self._map_tables:
            self._map_tables[t.device] = torch.tensor(self.timestep_map, dtype=torch.long,
                                                      device=t.device)
        return self._map_tables[t.device][t]

    # -- forward process -----------------------------------------------------------------------
    def q_sample(self, x_start, t, noise):
        """Noise injection: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        return (mean, self._extract("posterior_variance", t, x_t),
                self._extract("posterior_log_variance_clipped", t, x_t))

    # -- reverse process -----------------------------------------------------------------------
    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Reverse-step mean and log-variance from the head's ``[eps_hat, v]`` output."""
        d = x_t.shape[-1]
        if model_output.shape[-1] != 2 * d:
            raise ValueError(f"model output has {model_output.shape[-1]} channels; a learned-"
                             f"range head must give 2 * {d} (eps and variance)")
        eps, var_values = model_output[..., :d].float(), model_output[..., d:].float()
        min_log = self._extract("posterior_log_variance_clipped", t, x_t)
        max_log = self._extract("log_betas", t, x_t)
        frac = (var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                       - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": model_mean, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # -- training ------------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """The variational term in bits per dimension: KL at t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        kl = kl / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def losses_from_output(self, model_output, x_start, x_t, t, noise) -> Dict[str, torch.Tensor]:
        """Per-row ``mse``, ``vb`` and ``loss = mse + vb`` from a head output already computed."""
        d = x_start.shape[-1]
        eps_hat = model_output[..., :d].float()
        # The VB term must train only the variance: eps is detached there (improved-DDPM).
        frozen = torch.cat([eps_hat.detach(), model_output[..., d:].float()], dim=-1)
        vb = self.vb_terms_bpd(frozen, x_start.float(), x_t.float(), t)
        mse = mean_flat((noise.float() - eps_hat) ** 2)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def training_losses(self, model: ModelFn, x_start, t, model_kwargs=None, noise=None,
                        generator: Optional[torch.Generator] = None):
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device,
                                dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.original_timesteps(t), **(model_kwargs or {}))
        return self.losses_from_output(out, x_start, x_t, t, noise)

    # -- sampling ------------------------------------------------------------------------------
    def _step_noise(self, i, step, shape, step_noises, generator, device):
        if step_noises is not None:
            return step_noises[step]
        return torch.randn(shape, generator=generator, device=device)

    def p_sample_loop(self, model: ModelFn, shape, noise=None, model_kwargs=None,
                      temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                      step_noises: Optional[torch.Tensor] = None, device=None):
        """Ancestral sampling with learned-range variance, ``clip_denoised=False``.

        ``noise`` is x_T; ``step_noises`` (num_timesteps, *shape) are the per-step noises in the
        order the loop uses them (first entry: the step from T). The last step adds no noise.
        """
        device = device or (noise.device if noise is not None else "cpu")
        img = noise if noise is not None else torch.randn(shape, generator=generator,
                                                          device=device)
        self._check_step_noises(step_noises, img.shape)
        for step, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((img.shape[0],), i, device=img.device, dtype=torch.long)
            out = self.p_mean_variance(model(img, self.original_timesteps(t),
                                             **(model_kwargs or {})), img, t)
            z = self._step_noise(i, step, img.shape, step_noises, generator, img.device)
            if i > 0:
                img = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z * temperature
            else:
                img = out["mean"]
        return img

    def ddim_sample_loop(self, model: ModelFn, shape, noise=None, model_kwargs=None,
                         eta: float = 0.0, temperature: float = 1.0,
                         generator: Optional[torch.Generator] = None,
                         step_noises: Optional[torch.Tensor] = None, device=None):
        """DDIM sampling (eta = 0: deterministic) over the same respaced steps."""
        device = device or (noise.device if noise is not None else "cpu")
        img = noise if noise is not None else torch.randn(shape, generator=generator,
                                                          device=device)
        self._check_step_noises(step_noises, img.shape)
        for step, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((img.shape[0],), i, device=img.device, dtype=torch.long)
            out = self.p_mean_variance(model(img, self.original_timesteps(t),
                                             **(model_kwargs or {})), img, t)
            eps = self.predict_eps_from_xstart(img, t, out["pred_xstart"])
            abar = self._extract("alphas_cumprod", t, img)
            abar_prev = self._extract("alphas_cumprod_prev", t, img)
            sigma = (eta * torch.sqrt((1 - abar_prev) / (1 - abar))
                     * torch.sqrt(1 - abar / abar_prev))
            mean_pred = (out["pred_xstart"] * torch.sqrt(abar_prev)
                         + torch.sqrt(1 - abar_prev - sigma ** 2) * eps)
            z = self._step_noise(i, step, img.shape, step_noises, generator, img.device)
            img = mean_pred + sigma * z * temperature if i > 0 else mean_pred
        return img

    def _check_step_noises(self, step_noises, shape):
        if step_noises is not None and tuple(step_noises.shape) != (self.num_timesteps, *shape):
            raise ValueError(f"step_noises has shape {tuple(step_noises.shape)}; expected "
                             f"{(self.num_timesteps, *tuple(shape))} (one noise per step)")


def create_diffusion(timestep_respacing: Union[str, int, Sequence[int], None] = "",
                     noise_schedule: str = "cosine",
                     diffusion_steps: int = NUM_TRAIN_TIMESTEPS) -> GaussianDiffusion:
    """The diffusion GenDD uses: ``""`` for training (all steps), e.g. ``"100"`` for sampling."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    return GaussianDiffusion(betas, space_timesteps(diffusion_steps, timestep_respacing))
