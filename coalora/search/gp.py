"""The GP over f1 and the log-NEHVI acquisition with exact bits (METHOD.md §5).

Both objectives are minimised in coalora (``coalora.pareto``); botorch maximises, so the acquisition sees

    y(x) = (−bits(x)/8, −f1(x)/f1_scale)        reference point −hv_reference

where bits(x) is the exact linear function of the encoding (``encoding.bits_of``, a
``GenericDeterministicModel``: known, not modelled) and f1 a ``SingleTaskGP`` (float64, outcomes
standardised, homoscedastic noise inferred: f1 is re-measured on a small slice with a moving adapter,
so it is noisy). The two are a ``ModelList``; qLogNEHVI integrates over the GP's uncertainty at the seen
configs as well (noisy observations), with a seeded quasi-MC sampler.

botorch 0.18 would compile a fused C++ kernel for this acquisition on first use, into the user-wide
``~/.cache/torch_extensions`` under a lock file that a killed run leaves behind for good (every later run
then waits on it forever), with ``-march=native`` (numbers that depend on the machine). coalora keeps
botorch's pure-PyTorch path (:func:`use_python_kernel`): no compiler, no lock, no process to outlive a
run, the same proposals; benchmarks/fused_kernel.md measures what it costs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from coalora import interrupt
from coalora.search.encoding import bits_of

BITS_SCALE = 8.0  # objectives are (bits/8, f1/f1_scale): both of order 1, as the HV reference expects
# L-BFGS iterations of the marginal-likelihood fit. Measured (28 layers, 54 configs): scipy's default runs to
# convergence in 2.1 s with marginal log-likelihood −2.679; 100 iterations take 0.5 s and reach −2.684.
FIT_MAXITER = 100


def fit_f1_gp(x: torch.Tensor, f1_norm: torch.Tensor):
    """A GP of −f1_norm on the encoded configs, hyperparameters by maximum marginal likelihood.

    Args:
        x: (N, L) float64 encodings of every seen config.
        f1_norm: (N,) f1 / f1_scale of each (latest measurement).
    """
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    gp = SingleTaskGP(x.double(), -f1_norm.double().unsqueeze(-1), outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp),
                     optimizer_kwargs={"options": {"maxiter": FIT_MAXITER}})
    return gp


def objective_model(gp, weights: torch.Tensor):
    """ModelList(exact −bits/8, the f1 GP): the two maximised objectives."""
    from botorch.models.deterministic import GenericDeterministicModel
    from botorch.models.model import ModelList

    w = weights.double()
    bits = GenericDeterministicModel(lambda x: -(bits_of(x, w) / BITS_SCALE).unsqueeze(-1), num_outputs=1)
    return ModelList(bits, gp)


def use_python_kernel() -> None:
    """Make botorch's qLog(N)EHVI use its pure-PyTorch path: never compile or load the fused C++ kernel.

    botorch loads the kernel once per process, when ``_load_attempted`` is still False; marking the
    attempt as made (and dropping a kernel loaded already) leaves the pure path, which it documents as the
    fallback with identical results.
    """
    from botorch.acquisition.multi_objective import logei

    logei._C = None
    logei._load_attempted = True


def log_nehvi(model, x_seen: torch.Tensor, reference: Sequence[float], mc_samples: int, seed: int):
    """qLogNEHVI over the seen configs as the noisy baseline; ``reference`` in minimised units."""
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.sampling.get_sampler import get_sampler

    use_python_kernel()
    ref = -torch.as_tensor(reference, dtype=torch.float64)
    # a ModelList of a deterministic and a GP model has a PosteriorList; get_sampler builds its ListSampler
    sampler = get_sampler(model.posterior(x_seen[:1]), torch.Size([mc_samples]), seed=seed)
    return qLogNoisyExpectedHypervolumeImprovement(model, ref_point=ref, X_baseline=x_seen, sampler=sampler,
                                                   prune_baseline=True, cache_root=False)


@torch.no_grad()
def greedy_choice(acq, candidates: torch.Tensor, q: int, chunk: int = 256) -> list[int]:
    """Indices of ``q`` candidates chosen one at a time, each maximising the acquisition given those
    already chosen as pending points (sequential greedy q-batch, as botorch's ``optimize_acqf_discrete``).

    Args:
        acq: a botorch MC acquisition function (supports ``set_X_pending``).
        candidates: (M, L) encodings.
    """
    chosen: list[int] = []
    for _ in range(min(q, len(candidates))):
        interrupt.check()
        values = torch.cat([acq(part.unsqueeze(1)) for part in candidates.split(chunk)])  # (M,)
        values[chosen] = -torch.inf
        best = int(torch.argmax(values))
        chosen.append(best)
        acq.set_X_pending(candidates[chosen])
    acq.set_X_pending(None)
    return chosen
