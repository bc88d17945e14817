"""The Performer paper's approximation experiment (its Figure 4) and the Lemma 2 check.

``linattn approx``:

* the mean squared error of the attention output against exact softmax attention, as a
  function of the number of random features. The setting is L = 4096, d = 16 (float64),
  with orthogonal vs iid projections and positive vs trigonometric features (the paper),
  extended with hyperbolic and FAVOR++ features and with larger query/key norms. Error
  bars are the standard deviation over independent draws;
* the kernel estimate's MSE against ``|x + y|``, empirical (iid features) beside the
  paper's closed forms (Lemma 2):
  ``MSE(SM+) = exp(|x+y|^2) SM(x,y)^2 (1 - exp(-|x+y|^2)) / m`` and
  ``MSE(SMtrig) = exp(|x+y|^2) SM(x,y)^-2 (1 - exp(-|x-y|^2))^2 / (2m)``,
  with ``SM(x, y) = exp(x.y)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .._plotting import finish, log_axes, pyplot
from ..features import FeatureParams, draw_projection, get_feature_map
from ..functional import favor_attention
from .results import machine_info, write_results

# (label, kernel, orthogonal)
VARIANTS = [
    ("positive, orthogonal", "softmax", True),
    ("positive, iid", "softmax", False),
    ("trigonometric, orthogonal", "softmax_trig", True),
    ("trigonometric, iid", "softmax_trig", False),
    ("hyperbolic, orthogonal", "softmax_hyp", True),
    ("FAVOR++, orthogonal", "softmax_opt", True),
]

PRESETS = {
    "quick": {
        "length": 1024,
        "features": [16, 32, 64, 128],
        "draws": 5,
        "pairs": 24,
        "lemma_draws": 400,
    },
    "full": {
        "length": 4096,
        "features": [16, 32, 64, 96, 128, 160, 256],
        "draws": 15,
        "pairs": 40,
        "lemma_draws": 2000,
    },
}


def _inputs(length: int, d: int, std: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(length, d, dtype=torch.float64, generator=g) * s for s in (std, std, 1.0)]


def attention_mse(length=4096, d=16, *, features, draws, std=1.0, seed=0, progress=None):
    """Rows of ``{variant, std, m, mse_mean, mse_std}``: output MSE vs exact attention."""
    q, k, v = _inputs(length, d, std, seed)
    exact = torch.softmax(q @ k.T / math.sqrt(d), -1) @ v
    rows = []
    for label, kernel, orthogonal in VARIANTS:
        for m in features:
            g = torch.Generator().manual_seed(1000 + m)
            errs = []
            for _ in range(draws):
                w = draw_projection(m, d, orthogonal=orthogonal, generator=g, dtype=torch.float64)
                out = favor_attention(q, k, v, w, kernel=kernel)
                errs.append((out - exact).square().mean().item())
            t = torch.tensor(errs)
            rows.append(
                {
                    "variant": label,
                    "kernel": kernel,
                    "orthogonal": orthogonal,
                    "std": std,
                    "m": m,
                    "mse_mean": t.mean().item(),
                    "mse_std": t.std().item() if draws > 1 else 0.0,
                }
            )
            if progress is not None:
                progress.update(1)
    return rows


def lemma2(x: torch.Tensor, y: torch.Tensor, m: int, kernel: str) -> torch.Tensor:
    """Closed-form MSE of the iid kernel estimate for rows of ``x, y: (P, d)``."""
    sm = torch.exp((x * y).sum(-1))
    s2 = (x + y).square().sum(-1)
    if kernel == "softmax":
        return torch.exp(s2) * sm**2 * (1 - torch.exp(-s2)) / m
    d2 = (x - y).square().sum(-1)
    return torch.exp(s2) * sm**-2 * (1 - torch.exp(-d2)) ** 2 / (2 * m)


def lemma2_check(*, pairs=40, draws=2000, m=16, d=16, seed=0):
    """Empirical MSE of ``phi(x).phi(y)`` over ``draws`` iid projections beside Lemma 2,
    for pairs with ``|x + y|`` spread over [0.1, ~1] (beyond, the squared error is so
    heavy-tailed that no affordable number of draws estimates its mean). Rows of
    ``{kernel, norm_sum, empirical, closed_form, stderr}``."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(pairs, d, dtype=torch.float64, generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = torch.linspace(0.05, 0.5, pairs, dtype=torch.float64)[:, None]
    noise = torch.randn(pairs, d, dtype=torch.float64, generator=g) * 0.05
    x = direction * radius + noise
    y = direction * radius - noise
    rows = []
    for kernel in ("softmax", "softmax_trig"):
        fm = get_feature_map(kernel)
        sq = torch.zeros(pairs, dtype=torch.float64)
        sq4 = torch.zeros(pairs, dtype=torch.float64)
        target = torch.exp((x * y).sum(-1))
        gg = torch.Generator().manual_seed(seed + 1)
        for _ in range(draws):
            w = draw_projection(m, d, orthogonal=False, generator=gg, dtype=torch.float64)
            p = FeatureParams(w, 1.0)
            est = (fm.exact(x, p, is_query=True) * fm.exact(y, p, is_query=False)).sum(-1)
            err2 = (est - target) ** 2
            sq += err2
            sq4 += err2**2
        emp = sq / draws
        stderr = torch.sqrt((sq4 / draws - emp**2).clamp_min(0) / draws)
        closed = lemma2(x, y, m, kernel)
        for i in range(pairs):
            rows.append(
                {
                    "kernel": kernel,
                    "norm_sum": (x[i] + y[i]).norm().item(),
                    "empirical": emp[i].item(),
                    "closed_form": closed[i].item(),
                    "stderr": stderr[i].item(),
                }
            )
    return rows


def run(out_dir, *, preset="quick", progress=True) -> dict:
    from tqdm import tqdm

    conf = PRESETS[preset]
    # 0.5: |q~|^2 ~ 1 (the paper's "appropriately normalized" inputs); 1.0: q, k ~ N(0, I),
    # where |q~ + k~|^2 ~ 8 and one positive feature has relative variance e^8 - 1.
    stds = [0.5, 1.0]
    bar = tqdm(
        total=len(stds) * len(VARIANTS) * len(conf["features"]), desc="approx", disable=not progress
    )
    rows = []
    for std in stds:
        rows += attention_mse(
            conf["length"],
            16,
            features=conf["features"],
            draws=conf["draws"],
            std=std,
            progress=bar,
        )
    bar.close()
    lemma = lemma2_check(pairs=conf["pairs"], draws=conf["lemma_draws"])
    result = {
        "machine": machine_info(),
        "config": {**conf, "head_dim": 16, "stds": stds},
        "results": rows,
        "lemma2": lemma,
    }
    out = Path(out_dir)
    write_results(
        out,
        "approx",
        result,
        ["variant", "kernel", "orthogonal", "std", "m", "mse_mean", "mse_std"],
    )
    plot(result, out)
    return result


def format_table(result: dict) -> str:
    feats = result["config"]["features"]
    lines = []
    for std in result["config"]["stds"]:
        lines += [
            "",
            f"attention output MSE vs exact (L={result['config']['length']}, d=16, "
            f"q,k ~ N(0, {std}^2 I), {result['config']['draws']} draws)",
            f"{'variant':28}" + "".join(f"{'m=' + str(m):>11}" for m in feats),
        ]
        for label, _, _ in VARIANTS:
            cells = {
                r["m"]: r for r in result["results"] if r["variant"] == label and r["std"] == std
            }
            lines.append(f"{label:28}" + "".join(f"{cells[m]['mse_mean']:>11.2e}" for m in feats))
    for kernel in ("softmax", "softmax_trig"):
        rs = [r for r in result["lemma2"] if r["kernel"] == kernel]
        ratio = sum(r["empirical"] for r in rs) / sum(r["closed_form"] for r in rs)
        lines.append(
            f"Lemma 2 ({kernel}): empirical / closed-form MSE, summed over "
            f"{len(rs)} pairs = {ratio:.3f}"
        )
    return "\n".join(lines).lstrip()


def plot(result: dict, out: Path) -> None:
    plt = pyplot()

    stds = result["config"]["stds"]
    fig, axes = plt.subplots(1, len(stds), figsize=(6 * len(stds), 4.6), squeeze=False)
    for ax, std in zip(axes[0], stds):
        for label, _, orthogonal in VARIANTS:
            rs = sorted(
                (r for r in result["results"] if r["variant"] == label and r["std"] == std),
                key=lambda r: r["m"],
            )
            ax.errorbar(
                [r["m"] for r in rs],
                [r["mse_mean"] for r in rs],
                yerr=[r["mse_std"] for r in rs],
                marker="o",
                capsize=3,
                ls="-" if orthogonal else "--",
                label=label,
            )
        log_axes(
            ax,
            xlabel="number of random features m",
            ylabel="MSE of attention output vs exact",
            title=f"L={result['config']['length']}, d=16, q,k ~ N(0, {std}² I)",
            logx=False,
        )
        ax.legend(fontsize=7)
    finish(
        fig,
        out / "approx_mse.png",
        dpi=110,
        title="FAVOR approximation error (the Performer paper's Figure 4, extended)",
        fontsize=11,
    )

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kernel, color in (("softmax", "C0"), ("softmax_trig", "C3")):
        rs = sorted(
            (r for r in result["lemma2"] if r["kernel"] == kernel), key=lambda r: r["norm_sum"]
        )
        xs = [r["norm_sum"] for r in rs]
        name = "positive" if kernel == "softmax" else "trigonometric"
        ax.errorbar(
            xs,
            [r["empirical"] for r in rs],
            yerr=[r["stderr"] for r in rs],
            fmt="o",
            ms=3,
            color=color,
            alpha=0.6,
            label=f"{name}: empirical",
        )
        # Markers, not a line: the trigonometric form depends on |x - y| as well.
        ax.plot(
            xs,
            [r["closed_form"] for r in rs],
            "x",
            ms=7,
            color=color,
            label=f"{name}: Lemma 2 (closed form)",
        )
    log_axes(
        ax,
        xlabel="|x + y|",
        ylabel="MSE of the kernel estimate (m = 16, iid)",
        title="Kernel-estimate MSE against the closed form",
        logx=False,
    )
    ax.legend(fontsize=8)
    finish(fig, out / "approx_variance.png", dpi=110)
