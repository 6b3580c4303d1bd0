"""Plots of the tools (compare, the sweeps, the probe's heat map): matplotlib without a screen, saved atomically."""

from tools.checkpoint import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib.pyplot as plt  # lazy: matplotlib costs seconds to import, and only the plotting tools draw
    plt.switch_backend("Agg")
    return plt


def save_figure(fig, path, dpi=100):
    """Write a figure as PNG, atomically (a full disk: one line, the previous file intact), and close it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)
    return path
