"""Plots of the tools (compare, the sweeps, the probe's heat map): matplotlib without a screen, saved atomically."""

from tools.checkpoint import atomic_write


def pyplot():
    import matplotlib.pyplot as plt  # lazy: seconds of start-up that only the plotting tools need
    plt.switch_backend("Agg")
    return plt


def save_figure(fig, path, dpi=100):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)
    return path
