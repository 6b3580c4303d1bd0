"""The linear probe's classifier and its result files (docs/PROBE.md)."""

import math
import os
import warnings

import torch
from threadpoolctl import threadpool_limits

from tools.checkpoint import numbered_files, read_json, write_json
from tools.data import to_float
from tools.plots import pyplot, save_figure

CLASSIFIERS = ("sklearn", "torch")
HOLDOUT_SEED = 0  # of the permutation that picks the held-out images


class LinearProbe:
    """Standardised features, then logistic regression minimising sum_i CE_i + ||W||^2 / (2 C) (as scikit-learn)."""

    def __init__(self, X, y, C, method, num_classes, device, init=None):
        self.mean, self.std = X.mean(0), X.std(0).clamp_min(1e-6)  # dead channels stay 0 after centring
        Z = (X - self.mean) / self.std
        if method == "torch":
            self.W, self.b = self._fit_torch(Z.to(device), y.to(device), C, num_classes, init)
            return
        from sklearn.exceptions import ConvergenceWarning  # lazy: seconds of start-up
        from sklearn.linear_model import LogisticRegression  # lazy: as above
        threads = 1 if Z.numel() < 2 ** 22 else None  # multi-threaded BLAS slows small problems ~10x
        with warnings.catch_warnings(), threadpool_limits(threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=1000).fit(Z.numpy(), y.numpy())
        coef, intercept = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
        if len(clf.classes_) == 2:  # one logit z for two classes: softmax logits -z/2, z/2
            coef, intercept = torch.cat([-coef, coef]) / 2, torch.cat([-intercept, intercept]) / 2
        self.W = torch.zeros(X.shape[1], num_classes)
        self.b = torch.full((num_classes,), -math.inf)  # classes absent from the fitting set are never predicted
        self.W[:, clf.classes_], self.b[clf.classes_] = coef.T, intercept

    @staticmethod
    def _fit_torch(Z, y, C, num_classes, init):
        """The same objective / N, by full-batch L-BFGS on Z's device."""
        W = (torch.zeros(Z.shape[1], num_classes, device=Z.device) if init is None else init[0].clone().to(Z.device)).requires_grad_()
        b = (torch.zeros(num_classes, device=Z.device) if init is None else init[1].clone().to(Z.device)).requires_grad_()
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=1000, history_size=20, tolerance_grad=1e-5,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Z @ W + b, y) + W.square().sum() / (2 * C * len(y))
            loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        return W.detach().cpu(), b.detach().cpu()

    def accuracy(self, X, y):
        return (((X - self.mean) / self.std @ self.W + self.b).argmax(1) == y).to(torch.float64).mean().item()


def probe_cell(feats, labels, p, num_classes, device):
    """C chosen on held-out training images, refit on the whole training split, the test split scored once."""
    train, train_flip, test = feats["train", False], feats.get(("train", True)), feats["test", False]
    y, n = labels["train"], len(labels["train"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    num_holdout = round(p["holdout"] * n)
    held, fit = perm[:num_holdout], perm[num_holdout:]

    def fitting_set(idx):
        if train_flip is None:
            return train[idx], y[idx]
        return torch.cat([train[idx], train_flip[idx]]), torch.cat([y[idx], y[idx]])

    holdout_pct, fitted, best_C, init = {}, {}, p["C_grid"][0], None
    if num_holdout > 0 and len(p["C_grid"]) > 1:
        for C in sorted(p["C_grid"]):  # strongest regularisation first, each fit from the last
            fitted[C] = LinearProbe(*fitting_set(fit), C, p["classifier"], num_classes, device, init)
            holdout_pct[C] = round(100 * fitted[C].accuracy(train[held], y[held]), 3)
            init = (fitted[C].W, fitted[C].b)
        best_C = max(holdout_pct, key=holdout_pct.get)  # ties: the stronger regularisation
        init = (fitted[best_C].W, fitted[best_C].b)
    probe = LinearProbe(*fitting_set(torch.arange(n)), best_C, p["classifier"], num_classes, device, init)
    return dict(test_accuracy_pct=round(100 * probe.accuracy(test, labels["test"]), 3), feature_dim=train.shape[1], C=best_C,
                holdout_accuracy_pct=holdout_pct.get(best_C), holdout_accuracy_pct_by_C={f"{C:g}": v for C, v in holdout_pct.items()})


def pixels_baseline(outdir, p, images, labels, num_classes, device):
    """The same protocol on raw pixels in [-1, 1], cached per run directory in probe/pixels.json."""
    path = os.path.join(outdir, "probe", "pixels.json")
    key = f"{p['classifier']}/holdout={p['holdout']:g}/C_grid={','.join(f'{c:g}' for c in p['C_grid'])}" + ("/xflip" if p["xflip"] else "")
    results = read_json(path)
    if key not in results or results[key].get("num_train") != len(labels["train"]):
        feats = {("train", False): to_float(images["train"]).flatten(1), ("test", False): to_float(images["test"]).flatten(1)}
        if p["xflip"]:
            feats["train", True] = to_float(images["train"].flip(3)).flatten(1)
        results[key] = dict(probe_cell(feats, labels, p, num_classes, device), num_train=len(labels["train"]))
        write_json(path, results)
    return results[key]


def read_probe_results(outdir):
    rows = []
    for _, path in numbered_files(os.path.join(outdir, "checkpoints"), "epoch_", ".probe.json"):
        rows += list(read_json(path).values())
    return rows


def save_heatmap(path, table, blocks, sigmas, best):
    """Held-out accuracy (what selects) and test accuracy per block x sigma, the best cell outlined."""
    plt = pyplot()
    cell = {(c["block"], c["sigma"]): c for c in table}
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.1 * len(sigmas) * 2, 1.2 + 0.28 * len(blocks)), squeeze=False)
    for ax, key, title in zip(axes[0], ("holdout_accuracy_pct", "test_accuracy_pct"), ("held-out (selects)", "test")):
        grid = torch.tensor([[cell[b, s][key] if cell[b, s][key] is not None else math.nan for s in sigmas] for b in blocks])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        for i in range(len(blocks)):
            for j in range(len(sigmas)):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6, color="k" if im.norm(grid[i, j].item()) > 0.6 else "w")
        ax.set_xticks(range(len(sigmas)), [f"{s:.3g}" for s in sigmas], fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks if ax is axes[0][0] else [], fontsize=7)
        ax.set_xlabel("sigma")
        ax.set_title(f"{title} accuracy %", fontsize=9)
        bi, bj = blocks.index(best["block"]), sigmas.index(best["sigma"])
        ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="r", linewidth=2))
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
