"""The newcomer's demo: ``python -m arcface_rs.demo`` (needs the ``demo`` extra).

Trains a small embedding network on scikit-learn's bundled 8x8 digits (nothing is
downloaded) with plain normalised softmax and with each margin head, in an open-set
protocol: the network and head see only digits 0-5; verification is measured on all pairs
of images of the unseen digits 6-9, by cosine similarity of their embeddings. Prints
TAR@FAR and AUC per head (mean over seeds) and writes the figures:

- ``roc_cmc.png``: ROC (log FAR) and CMC of every head on the unseen digits;
- ``target_logits.png``: the target logit s*psi(theta) of every margin at its large-scale
  defaults (the ArcFace paper's figure);
- ``features_2d.png`` / ``features_3d.png``: plain softmax vs ArcFace on 8 identities with 2-D
  and 3-D embeddings, normalised (the paper's toy experiment).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Union

import numpy as np

import arcface_rs as afr
from arcface_rs.metrics import identification, verification

TRAIN_CLASSES = range(0, 6)
FARS = (1e-3, 1e-2, 1e-1)


Head = Union[afr.Margin, tuple[afr.Margin, dict[str, Any]], str, None]

#: the ArcFace paper's baseline "Softmax-pretrain, Triplet-finetune": the normalised softmax
#: head for the given epochs, then the network alone fine-tuned with the batch-hard triplet
#: loss (cosine, margin 0.2) for half as many
SOFTMAX_THEN_TRIPLET = "softmax, then triplet"


def _heads(s: float) -> dict[str, Head]:
    """The compared heads; None is plain softmax (a linear classifier, no normalisation), a
    (margin, keywords) pair a head with ``margin_loss`` keywords (sub-centres).

    The margins are smaller than the large-scale defaults (ArcFace m=0.5 over 85k
    identities): with six training classes a wide margin over-fits their geometry.
    """
    return {
        "Plain softmax": None,
        "Norm. softmax": afr.Softmax(s=s),
        "Softmax→Triplet": SOFTMAX_THEN_TRIPLET,
        "SphereFace": afr.SphereFace(m=2, s=s, lambda_=5.0),
        "CosFace": afr.CosFace(s=s, m=0.15),
        "ArcFace": afr.ArcFace(s=s, m=0.2),
        "Combined": afr.CombinedMargin(s=s, m1=1.0, m2=0.15, m3=0.05),
        "AdaFace": afr.AdaFace(s=s, m=0.2, batch_mean=5.0, batch_std=2.0),
        "MagFace": afr.MagFace(s=s, l_a=2.0, u_a=12.0, l_m=0.1, u_m=0.3, lambda_g=2.0),
        "CurricularFace": afr.CurricularFace(s=s, m=0.2),
        "Sub-center ArcFace": (afr.ArcFace(s=s, m=0.2), {"sub_centers": 3}),
    }


def _load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _net(dim: int, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.BatchNorm1d(256),
        torch.nn.PReLU(),
        torch.nn.Linear(256, 128),
        torch.nn.BatchNorm1d(128),
        torch.nn.PReLU(),
        torch.nn.Linear(128, dim),
    )


def train(margin: Head, x, y, dim: int, epochs: int, seed: int, progress: str = ""):
    """Train net + head on (x, y) (margin None: plain softmax); returns (net, centres)."""
    import torch

    from arcface_rs.torch import margin_loss

    if margin == SOFTMAX_THEN_TRIPLET:
        net, centres = train(afr.Softmax(s=16.0), x, y, dim, epochs, seed, progress)
        return fine_tune_triplet(net, x, y, max(1, epochs // 2), seed, progress), centres
    margin, options = margin if isinstance(margin, tuple) else (margin, {})
    if isinstance(margin, afr.CurricularFace):  # its t is state: each seed starts afresh
        margin = afr.CurricularFace(s=margin.s, m=margin.m, alpha=margin.alpha)
    net = _net(dim, seed)
    classes = int(y.max()) + 1
    rows = classes * options.get("sub_centers", 1)
    weight = torch.nn.Parameter(torch.randn(rows, dim) * 0.01)
    bias = torch.nn.Parameter(torch.zeros(classes))
    if margin is None:  # plain softmax: logits = W x + b, cross-entropy

        def loss_fn(emb, labels):
            return torch.nn.functional.cross_entropy(emb @ weight.T + bias, labels)

    else:

        def loss_fn(emb, labels):
            return margin_loss(emb, weight, labels, margin, **options)

    params = list(net.parameters()) + [weight] + ([bias] if margin is None else [])
    opt = torch.optim.Adam(params, lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    _fit(net, loss_fn, opt, x, y, epochs, seed, progress, sched=sched)
    return net, weight.detach()


def _fit(net, loss_fn, opt, x, y, epochs: int, seed: int, progress: str, sched=None) -> None:
    """Mini-batches of 64 in a seeded random order for ``epochs``; leaves ``net`` in eval
    mode. Prints the mean loss four times along the way when ``progress`` names the run."""
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if sched is not None:
            sched.step()
        if progress and (epoch + 1) % max(1, epochs // 4) == 0:
            print(f"  {progress} epoch {epoch + 1:3d}/{epochs}  loss {total / len(xt):7.4f}")
    net.eval()


def fine_tune_triplet(net, x, y, epochs: int, seed: int, progress: str = ""):
    """The network alone, fine-tuned with the batch-hard triplet loss (the seed table's
    "Triplet-finetune"); returns it in eval mode."""
    import torch

    from arcface_rs.torch import TripletLoss

    loss_fn = TripletLoss(margin=0.2, mining="batch_hard", distance="cosine")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    label = f"{progress} triplet" if progress else ""
    _fit(net, loss_fn, opt, x, y, epochs, seed + 1000, label)
    return net


def embed(net, x):
    import torch

    with torch.no_grad():
        e = net(torch.from_numpy(x)).numpy().astype(np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def open_set_scores(net, x, y):
    """Cosine scores and same/different labels of all pairs of the given images."""
    e = embed(net, x)
    i, j = np.triu_indices(len(e), k=1)
    return np.einsum("ij,ij->i", e[i], e[j]), y[i] == y[j]


def evaluate(args) -> dict[str, dict[str, float]]:
    x, y = _load_digits()
    seen = np.isin(y, TRAIN_CLASSES)
    x_tr, y_tr = x[seen], y[seen]
    x_te, y_te = x[~seen], y[~seen]
    print(
        f"digits: train on classes {list(TRAIN_CLASSES)} ({len(x_tr)} images); verify on all "
        f"{len(x_te) * (len(x_te) - 1) // 2:,} pairs of the unseen classes 6-9 "
        f"({len(x_te)} images); {args.dim}-d embeddings, {args.epochs} epochs, "
        f"seeds {list(range(args.seeds))}"
    )
    results: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, Any] = {}
    cmcs: dict[str, Any] = {}
    for name, margin in _heads(args.scale).items():
        for seed in range(args.seeds):
            t = time.perf_counter()
            net, _ = train(
                margin, x_tr, y_tr, args.dim, args.epochs, seed, f"{name:>13} seed {seed}"
            )
            scores, same = open_set_scores(net, x_te, y_te)
            rep = verification(scores, same, far=FARS, folds=10)
            if seed == 0:
                curves[name] = rep
                cmcs[name] = _identify(net, x_te, y_te)
            mega = _megaface(net, x_tr, x_te, y_te, scores, same)
            row = results.setdefault(name, {})
            for key, value in mega.items():
                row.setdefault(key, []).append(value)
            row.setdefault("AUC", []).append(rep.auc)
            row.setdefault("acc", []).append(rep.accuracy_mean)
            for far in FARS:
                row.setdefault(f"TAR@{far:g}", []).append(rep.tar_at_far[far])
            print(
                f"  {name:>13} seed {seed}: AUC {rep.auc:.4f}  TAR@1e-2 "
                f"{rep.tar_at_far[1e-2]:.3f}  ({time.perf_counter() - t:.1f} s)"
            )
    table = {h: {k: float(np.mean(v)) for k, v in row.items()} for h, row in results.items()}
    cols = ["AUC"] + [f"TAR@{far:g}" for far in FARS] + ["acc"]
    print()
    print(f"Open-set verification on unseen digits, mean over {args.seeds} seeds")
    print("| head | " + " | ".join(c.replace("acc", "10-fold acc") for c in cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for head, row in table.items():
        print(f"| {head} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    lowest = next(k for k in next(iter(table.values())) if k.startswith("TAR@lowest"))
    print()
    print(
        "MegaFace-style, mean over seeds: rank-1 identification of the unseen digits (one "
        f"enrolled image each) among {int(np.isin(y, TRAIN_CLASSES).sum())} distractors (the "
        f"training digits' images), and {lowest.replace('TAR@lowest ', 'TAR at FAR ')}, the "
        "lowest FAR the unseen pairs resolve"
    )
    print("| head | rank-1 with distractors | rank-1 without | TAR at the lowest FAR |")
    print("| --- | --- | --- | --- |")
    for head, row in table.items():
        print(
            f"| {head} | {row['rank-1 distractors']:.4f} | {row['rank-1']:.4f} "
            f"| {row[lowest]:.4f} |"
        )
    args.reports = (curves, cmcs)
    return table


def _megaface(net, x_distractors, x, y, scores, same) -> dict[str, float]:
    """The ArcFace paper's MegaFace protocol in miniature: each unseen digit enrolled by one
    image (its first), the other images probes, the training digits' images distractors;
    and TAR at the lowest FAR the unseen pairs resolve (the power of ten at or above
    1/negatives)."""
    e = embed(net, x)
    enrol = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        enrol[np.flatnonzero(y == label)[0]] = True
    distractors = embed(net, x_distractors)
    with_d = identification(e[~enrol], y[~enrol], e[enrol], y[enrol], distractors=distractors)
    without = identification(e[~enrol], y[~enrol], e[enrol], y[enrol])
    negatives = int((~same).sum())
    far = 10.0 ** math.ceil(math.log10(1.0 / negatives))
    tar = verification(scores, same, far=(far,)).tar_at_far[far]
    return {
        "rank-1 distractors": with_d.cmc[1],
        "rank-1": without.cmc[1],
        f"TAR@lowest {far:g}": tar,
    }


def _identify(net, x, y):
    """Closed-set identification of unseen digits: 5 enrolled images per digit, the rest probe."""
    e = embed(net, x)
    enrol = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        enrol[np.flatnonzero(y == label)[:5]] = True
    return identification(e[~enrol], y[~enrol], e[enrol], y[enrol], ranks=(1, 2, 3, 4))


def plot_target_logits(path: Path, s: float = 64.0) -> None:
    """s*psi(theta) of every margin at the large-scale defaults (the ArcFace paper's Fig.)."""
    import matplotlib.pyplot as plt

    theta = np.linspace(0, math.pi, 721)
    c = np.cos(theta)
    margins = [
        afr.Softmax(s=s),
        afr.SphereFace(m=4, s=s),
        afr.SphereFace(m=4, s=s, lambda_=5.0),
        afr.CosFace(s=s, m=0.35),
        afr.ArcFace(s=s, m=0.5),
        afr.CombinedMargin(s=s, m1=1.0, m2=0.3, m3=0.2),
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for margin in margins:
        ax.plot(np.degrees(theta), s * margin.psi(c), label=repr(margin), lw=1.6)
    # the norm-adaptive margins at a low, the mean and a high feature norm
    for z, what in ((-1.0, "low"), (0.0, "mean"), (1.0, "high")):
        ada = afr._core.Margin.adaface(s, 0.4, z)  # z: the margin scaler of that norm
        ax.plot(
            np.degrees(theta), s * ada.psi(c), ls="--", lw=1.2, label=f"AdaFace m=0.4, {what} norm"
        )
    mag = afr.MagFace(s=s)
    for norm in (10.0, 60.0, 110.0):
        ax.plot(
            np.degrees(theta),
            s * mag.psi(c, norm),
            ls=":",
            lw=1.4,
            label=f"MagFace, ‖x‖={norm:.0f}",
        )
    ax.set_xlabel("angle between feature and target centre θ (degrees)")
    ax.set_ylabel("target logit s·ψ(θ)")
    ax.set_title("Target logit of each margin")
    ax.set_xlim(0, 180)
    ax.set_ylim(-2.5 * s, 1.1 * s)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_metrics(path: Path, curves: dict[str, Any], cmcs: dict[str, Any]) -> None:
    """ROC (log FAR) and CMC of every head on the unseen digits, seed 0."""
    import matplotlib.pyplot as plt

    from arcface_rs import plots

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    plots.roc(curves, ax=left, title="Verification on unseen digits (seed 0)")
    plots.cmc(cmcs, ax=right, title="Identification of unseen digits (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_features(path2d: Path, path3d: Path, epochs: int) -> None:
    import matplotlib.pyplot as plt

    x, y = _load_digits()
    keep = y < 8  # 8 identities, as in the paper's toy experiment
    x, y = x[keep], y[keep]
    heads = {"Plain softmax": None, "ArcFace": afr.ArcFace(s=10.0, m=0.5)}
    colors = plt.get_cmap("tab10")(np.arange(8))
    for dim, path in ((2, path2d), (3, path3d)):
        fig = plt.figure(figsize=(9, 4.4))
        for k, (name, margin) in enumerate(heads.items()):
            net, centres = train(margin, x, y, dim, epochs, seed=0, progress=f"{name:>10} {dim}-D")
            e = embed(net, x)
            w = centres.numpy()
            w = w / np.linalg.norm(w, axis=1, keepdims=True)
            if dim == 2:
                ax = fig.add_subplot(1, 2, k + 1)
                ax.scatter(e[:, 0], e[:, 1], c=colors[y], s=5, alpha=0.6)
                for j in range(8):
                    ax.plot([0, w[j, 0]], [0, w[j, 1]], color=colors[j], lw=1.5)
                ax.set_aspect("equal")
                ax.set_xlim(-1.15, 1.15), ax.set_ylim(-1.15, 1.15)
            else:
                ax = fig.add_subplot(1, 2, k + 1, projection="3d")
                ax.scatter(e[:, 0], e[:, 1], e[:, 2], c=colors[y], s=4, alpha=0.6)
                ax.set_box_aspect((1, 1, 1))
            ax.set_title(f"{name}: {dim}-D normalised features of 8 digits")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m arcface_rs.demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=32, help="embedding size")
    ap.add_argument("--scale", type=float, default=16.0, help="logit scale s of every head")
    ap.add_argument("--out", default="arcface_rs_demo", help="folder for the PNG figures")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    evaluate(args)
    if not args.no_figures:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            print("\nmatplotlib is not installed: pip install 'arcface_rs[demo]' for the figures")
        else:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            print("\nfigures:")
            plot_target_logits(out / "target_logits.png")
            plot_metrics(out / "roc_cmc.png", *args.reports)
            plot_features(out / "features_2d.png", out / "features_3d.png", args.epochs)
            for name in ("target_logits.png", "roc_cmc.png", "features_2d.png", "features_3d.png"):
                print(f"  {out / name}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
