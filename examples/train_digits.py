#!/usr/bin/env python3
"""Train a small embedding with each margin head on scikit-learn's bundled 8x8 digits.

NumPy only (plus scikit-learn for the data, which ships inside the package): a two-layer
network (tanh) maps 64 pixels to a 16-d embedding; arcface_rs.margin_loss gives the loss and the
gradients of the embeddings and of the class centres; plain SGD with momentum updates all.
Prints the training loss as it goes, then held-out accuracy (nearest class centre by cosine)
and the mean angle between each test embedding and its own centre, per head.

usage: python examples/train_digits.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits

import arcface_rs as afr


def train(margin, x_train, y_train, epochs, seed=0):
    rng = np.random.default_rng(seed)
    hidden, dim, classes = 64, 16, 10
    params = {
        "w1": rng.standard_normal((64, hidden)) * np.sqrt(1 / 64),
        "w2": rng.standard_normal((hidden, dim)) * np.sqrt(1 / hidden),
        "centres": rng.standard_normal((classes, dim)) * 0.01,
    }
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    lr, momentum, batch = 0.05, 0.9, 64
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        losses = []
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            x, y = x_train[idx], y_train[idx]
            h = np.tanh(x @ params["w1"])  # tanh, not ReLU: a dead ReLU layer gives a zero
            emb = h @ params["w2"]  # embedding, which has no direction (ValueError)
            loss, g_emb, g_centres = afr.margin_loss(emb, params["centres"], y, margin)
            g_h = (g_emb @ params["w2"].T) * (1 - h * h)
            grads = {"w1": x.T @ g_h, "w2": h.T @ g_emb, "centres": g_centres}
            for k in params:
                velocity[k] = momentum * velocity[k] - lr * grads[k]
                params[k] += velocity[k]
            losses.append(float(loss))
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"  {type(margin).__name__:>14} epoch {epoch:3d}  loss {np.mean(losses):8.4f}")
    return params


def evaluate(params, x, y):
    emb = np.tanh(x @ params["w1"]) @ params["w2"]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    centres = params["centres"] / np.linalg.norm(params["centres"], axis=1, keepdims=True)
    cos = emb @ centres.T
    accuracy = float(np.mean(cos.argmax(axis=1) == y))
    angle = float(np.degrees(np.arccos(np.clip(cos[np.arange(len(y)), y], -1, 1))).mean())
    return accuracy, angle


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    digits = load_digits()
    x = digits.data / 16.0
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    test, tr = order[:400], order[400:]
    heads = [
        afr.Softmax(s=16.0),
        afr.ArcFace(s=16.0, m=0.3),
        afr.CosFace(s=16.0, m=0.2),
        afr.SphereFace(m=2, s=16.0, lambda_=2.0),
        afr.CombinedMargin(s=16.0, m1=1.0, m2=0.2, m3=0.1),
    ]
    print(f"digits: {len(tr)} train / {len(test)} test images, 10 classes, 16-d embeddings")
    rows = []
    for margin in heads:
        t = time.perf_counter()
        params = train(margin, x[tr], y[tr], args.epochs)
        acc, angle = evaluate(params, x[test], y[test])
        rows.append((margin, acc, angle, time.perf_counter() - t))
    print()
    print(f"{'head':<52} {'test acc':>8} {'angle to centre':>16} {'train s':>8}")
    for margin, acc, angle, secs in rows:
        print(f"{margin!r:<52} {acc:8.3f} {angle:15.1f}° {secs:8.2f}")


if __name__ == "__main__":
    main()
