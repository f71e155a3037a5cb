"""RUN_DIR/victims.png: per-epoch clean-validation ACC and AUC of the clean and the protected
victim, one panel per protocol -- the shortcut-then-recovery curve of a protected victim."""
from __future__ import annotations

from pathlib import Path

STYLE = {"clean": "--", "protected": "-"}


def plot_victims(histories: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """``histories[protocol][victim]`` is that victim's list of per-epoch records."""
    from .figures import pyplot, save_png

    plt = pyplot()
    protocols = list(histories) or ["none"]
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 3.6),
                             squeeze=False, constrained_layout=True)
    for ax, protocol in zip(axes[0], protocols):
        for victim, records in histories.get(protocol, {}).items():
            epochs = [r["epoch"] for r in records if r.get("val_acc") is not None]
            for metric, colour in (("val_acc", "tab:blue"), ("val_auc", "tab:orange")):
                values = [r.get(metric) for r in records if r.get("val_acc") is not None]
                if any(v is not None for v in values):
                    ax.plot(epochs, [float("nan") if v is None else v for v in values], STYLE.get(victim, ":"),
                            color=colour, marker=".", label=f"{victim} {metric[4:].upper()}")
        ax.set_title(f"protocol {protocol}: clean validation")
        ax.set_xlabel("victim epoch")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, path)
