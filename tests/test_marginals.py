"""The property that settles Flow-GRPO (FLOW_GRPO.md section 2): the SDE sampler reaches the same
marginal p_t as the ODE at every t. Checked exactly on a 2-D Gaussian mixture, whose marginal
velocity has a closed form, against the exact marginal of rectified flow at that t; a deliberately
wrong SDE must fail the same check (so the check has the power to see a broken sampler)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fastflow.sde import flow_sigmas, sde_step

F64 = torch.float64


@dataclass
class Mixture:
    """A Gaussian mixture data distribution p_0 under rectified flow x_t = (1 - t) x_0 + t eps."""

    weights: torch.Tensor  # [K]
    means: torch.Tensor  # [K, 2]
    covs: torch.Tensor  # [K, 2, 2]

    def component_cov(self, t: float) -> torch.Tensor:
        """[K, 2, 2]: Cov(x_t | k) = (1 - t)^2 S_k + t^2 I."""
        return (1 - t) ** 2 * self.covs + t**2 * torch.eye(2, dtype=F64)

    def log_resp(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """[N, K] log posterior of the component given x_t = x."""
        comp = torch.distributions.MultivariateNormal((1 - t) * self.means, self.component_cov(t))
        return torch.log_softmax(comp.log_prob(x[:, None, :]) + self.weights.log(), dim=1)

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The marginal velocity E[eps - x_0 | x_t = x], by Gaussian conditioning per component.

        Given k, (x_0, eps, x_t) is jointly Gaussian with Cov(x_0, x_t) = (1 - t) S_k and
        Cov(eps, x_t) = t I, so with C = Cov(x_t | k) and r = x - (1 - t) mu_k:
        E[x_0 | x_t, k] = mu_k + (1 - t) S_k C^-1 r and E[eps | x_t, k] = t C^-1 r.
        """
        c_inv = torch.linalg.inv(self.component_cov(t))  # [K, 2, 2]
        r = x[:, None, :] - (1 - t) * self.means  # [N, K, 2]
        c_inv_r = torch.einsum("kij,nkj->nki", c_inv, r)
        e_x0 = self.means + (1 - t) * torch.einsum("kij,nkj->nki", self.covs, c_inv_r)
        e_eps = t * c_inv_r
        resp = self.log_resp(x, t).exp()  # [N, K]
        return torch.einsum("nk,nki->ni", resp, e_eps - e_x0)

    def moments(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean [2] and covariance [2, 2] of p_t."""
        m_k = (1 - t) * self.means
        mean = self.weights @ m_k
        second = torch.einsum("k,kij->ij", self.weights,
                              self.component_cov(t) + m_k[:, :, None] * m_k[:, None, :])
        return mean, second - torch.outer(mean, mean)

    def projected_cdf(self, z: torch.Tensor, u: torch.Tensor, t: float) -> torch.Tensor:
        """CDF of u^T x_t at z (a 1-D Gaussian mixture)."""
        loc = (1 - t) * self.means @ u  # [K]
        scale = torch.einsum("i,kij,j->k", u, self.component_cov(t), u).sqrt()
        return (self.weights * torch.special.ndtr((z[:, None] - loc) / scale)).sum(dim=1)


MIXTURE = Mixture(
    weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64),
    means=torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=F64),
    covs=torch.tensor([[[0.3, 0.0], [0.0, 0.6]],
                       [[0.5, 0.3], [0.3, 0.4]],
                       [[0.2, 0.0], [0.0, 0.2]]], dtype=F64),
)

# Significance of each individual statistical check. The runs use fixed seeds, so the outcome is
# deterministic; the thresholds are what a correct sampler passes with probability 1 - ALPHA.
ALPHA = 1e-4
Z = 4.0  # two-sided normal quantile for ~6e-5
PROJECTIONS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]], dtype=F64)


def check_marginal(x: torch.Tensor, t: float, mix: Mixture = MIXTURE) -> tuple[bool, list[str]]:
    """Whether samples x [N, 2] are consistent with the exact marginal p_t of ``mix``.

    Checks, each at significance ~ALPHA with standard errors from the sample size: the mean
    (Hotelling-type chi^2 with 2 dof), every covariance entry (z-test with the sample's own
    fourth-moment standard error), the mass of every component (E[resp_k(x_t)] = w_k exactly,
    since the responsibilities are the posterior of the prior w), and a KS test on several 1-D
    projections against the exact projected mixture CDF. Returns (ok, failures).
    """
    n = x.shape[0]
    if not torch.isfinite(x).all():  # NaN would compare False against every threshold below
        return False, ["non-finite samples"]
    mean, cov = mix.moments(t)
    failures = []

    d = x.mean(0) - mean
    chi2 = n * d @ torch.linalg.solve(cov, d)
    if chi2 > -2 * math.log(ALPHA):  # chi^2_2 survival function is exp(-q / 2)
        failures.append(f"mean {x.mean(0).tolist()} vs {mean.tolist()} (chi2 {chi2:.1f})")

    c = x - x.mean(0)
    prods = c[:, :, None] * c[:, None, :]  # [N, 2, 2]
    se = prods.std(0) / math.sqrt(n)
    z_cov = (prods.mean(0) - cov) / se
    if z_cov.abs().max() > Z:
        failures.append(f"cov {prods.mean(0).tolist()} vs {cov.tolist()} "
                        f"(max z {z_cov.abs().max():.1f})")

    resp = mix.log_resp(x, t).exp()
    z_mass = (resp.mean(0) - mix.weights) / (resp.std(0) / math.sqrt(n))
    if z_mass.abs().max() > Z:
        failures.append(f"component mass {resp.mean(0).tolist()} vs {mix.weights.tolist()} "
                        f"(max z {z_mass.abs().max():.1f})")

    # KS: P(sqrt(n) D > c) ~ 2 exp(-2 c^2)
    ks_crit = math.sqrt(-math.log(ALPHA / 2) / 2) / math.sqrt(n)
    for u in PROJECTIONS:
        z = torch.sort(x @ u).values
        cdf = mix.projected_cdf(z, u, t)
        i = torch.arange(1, n + 1, dtype=F64)
        ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
        if ks > ks_crit:
            failures.append(f"KS on projection {u.tolist()}: {ks:.4f} > {ks_crit:.4f}")
    return not failures, failures


# ----------------------------------------------------------------------------------------------
# Samplers


def wrong_sde_step(variant: str):
    """sde_step's "sde" kind with one deliberate mistake, written out here in float64."""

    def step(x, v, sigma, sigma_next, *, noise, sigma_guard):
        dt = sigma_next - sigma
        s_den = sigma if sigma < 1 else sigma_guard
        std_t = 0.7 * math.sqrt(sigma / (1 - s_den))
        corr = std_t**2 / (2 * sigma)
        if variant == "score_sign_flipped":
            mean = x * (1 - corr * dt) + v * (1 - std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        elif variant == "no_drift_correction":
            mean = x + v * dt
        elif variant == "noise_std_10pct_high":
            mean = x * (1 + corr * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
            std_t = 1.1 * std_t
        else:
            raise AssertionError(variant)
        return mean + std_t * math.sqrt(-dt) * noise

    return step


def run_sampler(kind: str, checkpoints: list[float], *, steps: int, shift: float, n: int,
                seed: int, wrong: str | None = None) -> dict[float, tuple[float, torch.Tensor]]:
    """Samples from t = 1 down the flow_sigmas grid with the exact mixture velocity.

    Returns {requested t: (grid t actually reached, samples)}, stopping at the grid sigma nearest
    each requested t (the exact marginal is then evaluated at that grid value).
    """
    sigmas = flow_sigmas(steps, shift).to(F64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    stops = {float(sigmas[(sigmas - t).abs().argmin()]): t for t in checkpoints}
    out = {}
    guard = float(sigmas[1])
    for i in range(steps + 1):
        s = float(sigmas[i])
        if s in stops:
            out[stops[s]] = (s, x.clone())
        if i == steps or len(out) == len(stops):
            break
        s_next = float(sigmas[i + 1])
        v = MIXTURE.velocity(x, s)
        noise = torch.randn(n, 2, generator=g, dtype=F64)
        if wrong is None:
            x = sde_step(x, v, s, s_next, noise_level=0.7, kind=kind, noise=noise,
                         sigma_guard=guard).prev_sample
        else:
            x = wrong_sde_step(wrong)(x, v, s, s_next, noise=noise, sigma_guard=guard)
    return out


N_SAMPLES = 20_000
CHECKPOINTS = [0.6, 0.3, 0.02, 0.0]


@pytest.fixture(scope="module", params=[1.0, 3.0], ids=["shift1", "shift3"])
def sde_runs(request):
    return run_sampler("sde", CHECKPOINTS, steps=150, shift=request.param, n=N_SAMPLES, seed=0)


@pytest.mark.parametrize("t", CHECKPOINTS, ids=lambda t: f"t{t}")
def test_sde_preserves_marginals(sde_runs, t):
    t_grid, x = sde_runs[t]
    assert abs(t_grid - t) < 0.01
    ok, failures = check_marginal(x, t_grid)
    assert ok, f"SDE samples at t = {t_grid:.4f} do not match p_t: {failures}"


@pytest.fixture(scope="module")
def ode_runs():
    return run_sampler("ode", [0.6, 0.3, 0.0], steps=150, shift=3.0, n=N_SAMPLES, seed=1)


@pytest.mark.parametrize("t", [0.6, 0.3, 0.0], ids=lambda t: f"t{t}")
def test_ode_preserves_marginals(ode_runs, t):
    t_grid, x = ode_runs[t]
    ok, failures = check_marginal(x, t_grid)
    assert ok, f"ODE samples at t = {t_grid:.4f} do not match p_t: {failures}"


def test_check_accepts_exact_samples_and_rejects_perturbed_ones():
    """The check itself: accepts exact samples of p_t, rejects slightly perturbed ones."""
    g = torch.Generator().manual_seed(7)
    t = 0.3
    k = torch.multinomial(MIXTURE.weights, N_SAMPLES, replacement=True, generator=g)
    x0 = MIXTURE.means[k] + torch.einsum(
        "nij,nj->ni", torch.linalg.cholesky(MIXTURE.covs)[k], torch.randn(N_SAMPLES, 2, generator=g,
                                                                           dtype=F64))
    xt = (1 - t) * x0 + t * torch.randn(N_SAMPLES, 2, generator=g, dtype=F64)
    ok, failures = check_marginal(xt, t)
    assert ok, failures
    assert not check_marginal(xt * 1.05, t)[0]
    assert not check_marginal(xt + torch.tensor([0.05, 0.0], dtype=F64), t)[0]
    assert not check_marginal(xt, t + 0.05)[0]


@pytest.mark.parametrize("variant", ["score_sign_flipped", "no_drift_correction",
                                     "noise_std_10pct_high"])
def test_wrong_sde_fails_the_check(variant):
    runs = run_sampler("sde", [0.6, 0.3], steps=150, shift=3.0, n=N_SAMPLES, seed=0, wrong=variant)
    results = {t: check_marginal(x, t_grid) for t, (t_grid, x) in runs.items()}
    assert not all(ok for ok, _ in results.values()), (
        f"a wrong SDE ({variant}) passed the marginal check: the check has no power")
    # and at t = 0.6 already, not only by accident at one time
    assert not results[0.6][0]
