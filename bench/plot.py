"""
Loss curves from train.py's metrics.jsonl files (one JSON object a step: "step", "loss", ...), drawn as an SVG with
nothing but the standard library: one panel per file side by side, or every file on one pair of axes (--overlay,
for runs to compare, such as speedrun.sh --ablation's two pre-trainings).

    python bench/plot.py runs/pretrain/metrics.jsonl runs/sft/metrics.jsonl --out docs/loss.svg
    python bench/plot.py runs/ablation/{unfiltered,filtered}/pretrain/metrics.jsonl --overlay --out docs/ablation.svg

A curve's name is its run dir (the folder that holds metrics.jsonl) unless --labels names them (comma-separated).
"""
import json
import math
import os
import sys
from dataclasses import dataclass
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import parse_config  # noqa: E402

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


@dataclass
class Config:
    """python bench/plot.py METRICS.jsonl ... [--out FILE.svg] [--labels a,b] [--overlay] [--key loss]"""
    out: str = "docs/loss.svg"
    labels: str = ""  # comma-separated, one per file; "" = each file's run dir name
    key: str = "loss"  # the metric to draw against "step"
    overlay: bool = False  # every curve on one pair of axes (otherwise one panel per file)
    smooth: float = 0.0  # exponential moving average of this weight on the past (0.9 = heavy); 0 = the raw values
    width: int = 420  # pixels per panel
    height: int = 300


def read_curve(path: str, key: str) -> list[tuple[int, float]]:
    """(step, value) per line; a line cut by a kill (the last) is dropped; a line without the key is an error."""
    points = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except ValueError:
                break
            if key not in row or "step" not in row:
                raise SystemExit(f"{path}:{n}: no {key!r} or 'step' in the line")
            points.append((row["step"], row[key]))
    if not points:
        raise SystemExit(f"{path}: no steps")
    return points


def ema(values: list[float], weight: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def ticks(lo: float, hi: float, n: int = 5, whole: bool = False) -> list[float]:
    """About n round numbers (1, 2 or 5 times a power of ten apart; whole: at least 1) covering [lo, hi]."""
    span = hi - lo or abs(hi) or 1.0
    raw = max(span / n, 1.0 if whole else 0.0)
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def panel(x0: int, cfg: Config, title: str, curves: list[tuple[str, str, list[tuple[int, float]]]]) -> list[str]:
    """SVG elements of one panel at x offset x0: frame, ticks, grid, one polyline per curve, a legend if several."""
    left, right, top, bottom = 52, 20, 28, 40  # margins inside the panel
    w, h = cfg.width - left - right, cfg.height - top - bottom
    xs = [s for _, _, pts in curves for s, _ in pts]
    ys = [v for _, _, pts in curves for _, v in pts]
    xt, yt = ticks(min(0, min(xs)), max(xs), whole=True), ticks(min(ys), max(ys))
    X = lambda s: x0 + left + (s - xt[0]) / ((xt[-1] - xt[0]) or 1) * w  # noqa: E731
    Y = lambda v: top + h - (v - yt[0]) / ((yt[-1] - yt[0]) or 1) * h  # noqa: E731
    fmt = lambda t: f"{t:g}"  # noqa: E731
    out = [f'<text x="{x0 + left + w / 2:.1f}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{x0 + left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#444"/>']
    for t in yt:
        out += [f'<line x1="{x0 + left}" x2="{x0 + left + w}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#ddd"/>',
                f'<text x="{x0 + left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{fmt(t)}</text>']
    for t in xt:
        out.append(f'<text x="{X(t):.1f}" y="{top + h + 16}" text-anchor="middle">{fmt(t)}</text>')
    out += [f'<text x="{x0 + left + w / 2:.1f}" y="{cfg.height - 8}" text-anchor="middle">step</text>',
            f'<text x="{x0 + 14}" y="{top + h / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 {x0 + 14} {top + h / 2:.1f})">{escape(cfg.key)}</text>']
    for k, (name, color, pts) in enumerate(curves):
        vals = ema([v for _, v in pts], cfg.smooth) if cfg.smooth else [v for _, v in pts]
        line = " ".join(f"{X(s):.1f},{Y(v):.1f}" for (s, _), v in zip(pts, vals))
        out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(curves) > 1:
            ly = top + 14 + 16 * k
            out += [f'<line x1="{x0 + left + w - 110}" x2="{x0 + left + w - 90}" y1="{ly - 4}" y2="{ly - 4}" '
                    f'stroke="{color}" stroke-width="2"/>',
                    f'<text x="{x0 + left + w - 84}" y="{ly}">{escape(name)}</text>']
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    files = argv[: next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))]
    cfg = parse_config(Config, argv[len(files):])
    if not files:
        raise SystemExit("usage: python bench/plot.py METRICS.jsonl ... [--out FILE.svg] [--overlay]")
    names = cfg.labels.split(",") if cfg.labels else [os.path.basename(os.path.dirname(os.path.abspath(f)))
                                                      for f in files]
    if len(names) != len(files):
        raise SystemExit(f"--labels names {len(names)} curves, there are {len(files)} files")
    curves = [(n, COLORS[k % len(COLORS)], read_curve(f, cfg.key)) for k, (n, f) in enumerate(zip(names, files))]
    groups = [(" vs ".join(names), curves)] if cfg.overlay else [(c[0], [c]) for c in curves]
    body = [e for k, (title, cs) in enumerate(groups) for e in panel(k * cfg.width, cfg, title, cs)]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{cfg.width * len(groups)}" height="{cfg.height}" '
           f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
           + "\n".join(body) + "\n</svg>\n")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(tmp := cfg.out + ".tmp", "w") as f:
        f.write(svg)
    os.replace(tmp, cfg.out)
    print(f"wrote {cfg.out}: " + ", ".join(f"{n} ({len(p)} steps, {cfg.key} {p[0][1]:.3f} -> {p[-1][1]:.3f})"
                                           for n, _, p in curves))


if __name__ == "__main__":
    main()
