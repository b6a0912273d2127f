"""The loss curves a person would rather look at than read (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from bertlite.trainer import History


def plot_history(history: History, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """MLM and NSP loss against step (and held-out metrics in a second panel when recorded),
    written to a PNG."""
    from matplotlib.figure import Figure  # no pyplot: works headless, leaves backends alone

    has_eval = bool(history.eval)
    fig = Figure(figsize=(9 if has_eval else 5, 3.5))
    axes = fig.subplots(1, 2) if has_eval else [fig.subplots()]
    ax = axes[0]
    ax.plot(history.step, history.mlm_loss, label="mlm", color="tab:blue", alpha=0.35)
    ax.plot(history.step, history.nsp_loss, label="nsp", color="tab:orange", alpha=0.35)
    for values, color, name in ((history.mlm_loss, "tab:blue", "mlm (running mean)"),
                                (history.nsp_loss, "tab:orange", "nsp (running mean)")):
        running, total = [], 0.0
        for i, v in enumerate(values, 1):
            total += v
            running.append(total / i)
        ax.plot(history.step, running, color=color, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    if has_eval:
        ax2 = axes[1]
        steps = [e["step"] for e in history.eval]
        for key, label in (("mlm_accuracy", "masked-token accuracy"),
                           ("nsp_accuracy", "NSP accuracy")):
            if all(key in e for e in history.eval):
                ax2.plot(steps, [e[key] for e in history.eval], marker="o", label=label)
        ax2.set_xlabel("step")
        ax2.set_ylabel("held-out accuracy")
        ax2.set_ylim(0, 1)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
