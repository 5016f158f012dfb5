"""Draw every schedule of ``lightning_opt.schedules`` into docs/img/schedule_<name>.png (run from the repo root).

python docs/gen_schedule_plots.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_opt.schedules import (
    ConstantSchedule,
    ExponentialSchedule,
    IterativeSchedule,
    LinearSchedule,
    OneShotSchedule,
    PolynomialSchedule,
)

TOTAL = 1000
SCHEDULES = {
    "constant": ConstantSchedule(final=0.5, start=0.2),
    "linear": LinearSchedule(final=0.9, start=0.1, end=0.7, frequency=50),
    "polynomial": PolynomialSchedule(final=0.9, start=0.1, end=0.7, frequency=50),
    "exponential": ExponentialSchedule(final=0.9, start=0.1, end=0.7, frequency=50, rate=5.0),
    "one_shot": OneShotSchedule(final=0.9, at=0.5),
    "iterative": IterativeSchedule(final=0.9, start=0.1, end=0.7, steps=4),
}


def main() -> None:
    out = Path(__file__).resolve().parent / "img"
    out.mkdir(exist_ok=True)
    steps = range(TOTAL + 1)
    fig_all, ax_all = plt.subplots(figsize=(7, 4))
    for name, s in SCHEDULES.items():
        values = [s.value(t, TOTAL) for t in steps]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(steps, values, drawstyle="steps-post", color="tab:blue")
        ups = s.update_steps(TOTAL)
        ax.plot(ups, [s.value(u, TOTAL) for u in ups], "o", ms=3, color="tab:orange", label="update steps")
        ax.set_xlabel(f"optimizer step (of {TOTAL})")
        ax.set_ylabel("value (e.g. sparsity)")
        ax.set_ylim(-0.02, 1.0)
        ax.set_title(repr(s), fontsize=7)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"schedule_{name}.png", dpi=110)
        plt.close(fig)
        ax_all.plot(steps, values, drawstyle="steps-post", label=name)
    ax_all.set_xlabel(f"optimizer step (of {TOTAL})")
    ax_all.set_ylabel("value")
    ax_all.legend(fontsize=8)
    ax_all.set_title("lightning_opt.schedules (start=0.1, end=0.7 where they apply)")
    fig_all.tight_layout()
    fig_all.savefig(out / "schedules.png", dpi=110)
    print(f"wrote {len(SCHEDULES) + 1} PNGs to {out}")


if __name__ == "__main__":
    main()
