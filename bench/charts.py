"""Charts of an SSE benchmark run (bench/sse_fanout.py's JSON), gateway and nchan side by side:

    .venv/bin/python -m bench.charts bench/results/sse_fanout.json   # again, from a run's figures

- `<stem>_rate.{png,svg}`: deliveries/s and p99 latency against the publish rate, with the
  1,000 clients of the lab scenarios (1 and 5 msg/s from the viewers scenarios, 50 msg/s
  and up from the fixed windows and the ramp);
- `<stem>_subscribers.{png,svg}`: the same against the number of subscribers (the viewers
  scenarios), one line per server and rate;
- `<stem>_storms.{png,svg}`: the reconnect storms, one panel per publish rate: the share of
  the subscribers back against the seconds since the first drop, one line per server.

A window that was not sustained (under 99% delivered, or p99 over 1 s) is drawn hollow;
of two attempts the better one is drawn, of several rounds (`--repeat`) the one with the
median p99. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STYLE: dict[str, dict[str, Any]] = {
    "nchan": {"color": "#4c72b0", "marker": "s", "label": "nchan, 1 worker"},
    "nchan2": {"color": "#8fb0e0", "marker": "s", "label": "nchan, 2 workers"},
    "gateway": {"color": "#dd8452", "marker": "o", "label": "gateway, 1 worker"},
    "gateway2": {"color": "#c44e52", "marker": "o", "label": "gateway, 2 workers"},
    "lean": {"color": "#55a868", "marker": "^", "label": "lean (reference)"},
}
DASHES = {1.0: (4, 2), 5.0: ()}  # 1 msg/s dashed, 5 msg/s solid


def _best(windows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int, float], Mapping[str, Any]]:
    """Per (server, clients, rate), the window to draw: of two attempts the better one
    (sustained first, then more deliveries/s), of several rounds (`--repeat`) the one with
    the median p99; storms and warm-ups left out."""
    better: dict[tuple[str, int, float, int], Mapping[str, Any]] = {}
    for w in windows:
        if w.get("restart_s") is not None or str(w["scenario"]).startswith("warm-up"):
            continue
        key = (str(w["server"]), int(w["clients"]), float(w["rate"]), int(w.get("round", 1)))
        old = better.get(key)
        if old is None or (w["sustained"], w["delivered_per_s"]) > (old["sustained"], old["delivered_per_s"]):
            better[key] = w
    rounds: dict[tuple[str, int, float], list[Mapping[str, Any]]] = {}
    for (server, clients, rate, _), w in better.items():
        rounds.setdefault((server, clients, rate), []).append(w)
    return {key: _median_p99(ws) for key, ws in rounds.items()}


def _median_p99(windows: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    def rank(w: Mapping[str, Any]) -> tuple[bool, float]:
        return not w["sustained"], w["p99_ms"] if w["p99_ms"] is not None else float("inf")

    ranked = sorted(windows, key=rank)
    return ranked[(len(ranked) - 1) // 2]


def _series(ax: Any, server: str, points: list[tuple[float, float | None, bool]], **style: Any) -> None:
    points = sorted((x, y, ok) for x, y, ok in points if y is not None)
    if not points:
        return
    st = STYLE.get(server, {"color": "black", "marker": "x", "label": server})
    xs = [x for x, _, _ in points]
    ys = [y for _, y, _ in points]
    (line,) = ax.plot(xs, ys, color=st["color"], label=style.pop("label", st["label"]), **style)
    ax.scatter(
        xs,
        ys,
        marker=st["marker"],
        s=28,
        zorder=3,
        edgecolors=st["color"],
        facecolors=[st["color"] if ok else "white" for _, _, ok in points],
    )
    line.set_linewidth(1.6)


def write(run: Mapping[str, Any], out_dir: Path, stem: str = "sse_fanout") -> list[Path]:
    """Draw the charts of one run into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best(run["windows"])
    servers = [s for s in STYLE if any(k[0] == s for k in best)] + sorted({k[0] for k in best} - set(STYLE))
    title = f"SSE fan-out, {run['started']} (2 shared cores)"
    written: list[Path] = []

    lab_clients = int(run["args"].get("clients", 1000))
    by_rate = {s: [(k[2], w) for k, w in best.items() if k[0] == s and k[1] == lab_clients] for s in servers}
    if any(by_rate.values()):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
        for s in servers:
            _series(top, s, [(r, w["delivered_per_s"], w["sustained"]) for r, w in by_rate[s]])
            _series(bottom, s, [(r, w["p99_ms"], w["sustained"]) for r, w in by_rate[s]])
        top.set_title(f"{lab_clients:,} subscribers: deliveries/s and p99 against the publish rate")
        top.set_ylabel("delivered events/s")
        bottom.set_ylabel("p99 latency, ms")
        bottom.set_xlabel("publish rate, msg/s (hollow: not sustained)")
        _axes((top, bottom), sorted({r for pts in by_rate.values() for r, _ in pts}))
        top.legend(loc="upper left", fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        written += _save(fig, out_dir / f"{stem}_rate")
        plt.close(fig)

    viewer_counts = {int(n) for n in str(run["args"].get("viewers", "")).split(",") if n.strip()}
    rates = sorted({k[2] for k in best if k[1] in viewer_counts and k[2] in DASHES})
    if viewer_counts and rates:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
        for s in servers:
            for rate in rates:
                pts = [
                    (k[1], w) for k, w in best.items() if k[0] == s and k[2] == rate and k[1] in viewer_counts
                ]
                label = f"{STYLE.get(s, {}).get('label', s)}, {rate:g} msg/s"
                dash = {"dashes": DASHES[rate]} if DASHES[rate] else {}
                _series(
                    top, s, [(n, w["delivered_per_s"], w["sustained"]) for n, w in pts], label=label, **dash
                )
                _series(bottom, s, [(n, w["p99_ms"], w["sustained"]) for n, w in pts], label=label, **dash)
        top.set_title("deliveries/s and p99 against the number of subscribers (dashed: 1 msg/s, solid: 5)")
        top.set_ylabel("delivered events/s")
        bottom.set_ylabel("p99 latency, ms")
        bottom.set_xlabel("subscribers (hollow: not sustained)")
        _axes((top, bottom), sorted(viewer_counts))
        top.legend(loc="upper left", fontsize=7, ncol=2)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        written += _save(fig, out_dir / f"{stem}_subscribers")
        plt.close(fig)

    storms = _storms(run["windows"])
    if storms:
        rates = sorted({rate for rate, _ in storms})
        fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4.5), sharey=True, squeeze=False)
        for ax, rate in zip(axes[0], rates, strict=True):
            for (r, server), w in storms.items():
                if r != rate:
                    continue
                curve = w["back_curve_s"]
                st = STYLE.get(server, {"color": "black", "label": server})
                pct = [100 * k / (len(curve) - 1) for k in range(len(curve))]
                ax.plot([0.0, *curve], [0.0, *pct], color=st["color"], linewidth=1.6,
                        label=f"{st['label']}, {int(w['clients']):,}")  # fmt: skip
            ax.set_title(f"reconnect storm @ {rate:g} msg/s", fontsize=10)
            ax.set_xlabel("seconds since the first subscriber was dropped")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right", fontsize=7)
        axes[0][0].set_ylabel("subscribers back, %")
        fig.suptitle(f"{title}: the server restarted, every subscriber resuming", fontsize=9)
        fig.tight_layout()
        written += _save(fig, out_dir / f"{stem}_storms")
        plt.close(fig)
    return written


def _storms(windows: Sequence[Mapping[str, Any]]) -> dict[tuple[float, str], Mapping[str, Any]]:
    """Per (rate, server), the storm window with its curve of subscribers back (runs
    before the curve was recorded have none: left out)."""
    return {
        (float(w["rate"]), str(w["server"])): w
        for w in windows
        if w.get("restart_s") is not None and w.get("back_curve_s")
    }


def _spaced(ticks: Sequence[float], ratio: float = 1.4) -> list[float]:
    """`ticks` thinned from the top so that labels on a log axis do not run into each
    other: each kept tick at least `ratio` times the next kept below it (200 and 150 would
    print as "150200")."""
    kept: list[float] = []
    for t in sorted(ticks, reverse=True):
        if not kept or kept[-1] >= t * ratio:
            kept.append(t)
    return sorted(kept)


def _axes(axes: Sequence[Any], xticks: Sequence[float]) -> None:
    """Log scales labelled in plain numbers (1,000 rather than 10^3), ticks at the data."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(_spaced(xticks))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)


def _save(fig: Any, base: Path) -> list[Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".png"), base.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1], metadata={"Date": None})  # no timestamp: the same figures, the same file
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.charts RESULTS.json", file=sys.stderr)
        return 2
    source = Path(args[0])
    for path in write(json.loads(source.read_text()), source.parent, source.stem):
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
