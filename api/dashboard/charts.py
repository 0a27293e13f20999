"""Inline SVG charts as plain data for the templates: points already scaled to pixels, ticks labelled. No
JavaScript and no external assets, so the pages render anywhere, offline included."""

from __future__ import annotations

from dataclasses import dataclass, field

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 24, 36
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")


@dataclass
class Tick:
    at: float
    label: str


@dataclass
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)  # {"points": "x,y x,y", "color"}
    bars: list[dict] = field(default_factory=list)  # {"x", "y", "w", "h", "color", "label", "value"}
    dots: list[dict] = field(default_factory=list)  # {"x", "y", "color", "title"}
    legend: list[dict] = field(default_factory=list)  # {"label", "color"}
    x_label: str = ""
    y_label: str = ""

    @property
    def plot_bottom(self) -> int:
        return self.height - BOTTOM


class Scale:
    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        if high <= low:
            low, high = low - 1, high + 1
        self.low, self.high, self.start, self.end = low, high, start, end

    def __call__(self, value: float) -> float:
        return round(self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start), 1)

    def ticks(self, count: int = 5) -> list[Tick]:
        step = (self.high - self.low) / (count - 1)
        return [Tick(self(self.low + i * step), _short(self.low + i * step)) for i in range(count)]


def _short(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _padded(values: list[float]) -> tuple[float, float]:
    """The values' range widened by 5 % each side, so no point sits on an axis."""
    low, high = min(values), max(values)
    pad = (high - low) * 0.05
    return low - pad, high + pad


def _axes(xs: list[float], ys: list[float], *, zero: bool = False) -> tuple[Chart, Scale, Scale]:
    chart = Chart()
    x = Scale(*_padded(xs), LEFT, WIDTH - RIGHT)
    low, high = _padded(ys)
    y = Scale(0.0 if zero else low, high, chart.plot_bottom, TOP)
    chart.x_ticks, chart.y_ticks = x.ticks(), y.ticks()
    return chart, x, y


def line_chart(points: list[tuple[float, float]], *, x_label: str, y_label: str) -> Chart | None:
    if not points:
        return None
    chart, x, y = _axes([p[0] for p in points], [p[1] for p in points])
    chart.lines.append({"points": " ".join(f"{x(a)},{y(b)}" for a, b in points), "color": PALETTE[0]})
    chart.x_label, chart.y_label = x_label, y_label
    return chart


def bar_chart(bars: list[tuple[str, str, float]], *, y_label: str) -> Chart | None:
    """(series, category, value) -> grouped bars: one group per category, a color per series."""
    if not bars:
        return None
    categories = list(dict.fromkeys(category for _, category, _ in bars))
    series = list(dict.fromkeys(name for name, _, _ in bars))
    chart, _, y = _axes([0.0, 1.0], [value for _, _, value in bars], zero=min(v for *_, v in bars) >= 0)
    chart.x_ticks = []
    slot = (WIDTH - LEFT - RIGHT) / len(categories)
    width = max(slot * 0.8 / len(series), 2.0)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}
    for name, category, value in bars:
        left = LEFT + categories.index(category) * slot + slot * 0.1 + series.index(name) * width
        top, base = y(value), y(max(y.low, 0.0))
        chart.bars.append(
            {
                "x": round(left, 1),
                "y": min(top, base),
                "w": round(width - 1, 1),
                "h": round(abs(base - top), 1),
                "color": colors[name],
                "title": f"{name} / {category}: {value:.4g}",
            }
        )
    chart.x_ticks = [Tick(round(LEFT + (i + 0.5) * slot, 1), c) for i, c in enumerate(categories)]
    chart.legend = [{"label": name, "color": color} for name, color in colors.items()]
    chart.y_label = y_label
    return chart


def scatter(points: list[tuple[float, float, str, str]], *, x_label: str, y_label: str) -> Chart | None:
    """(x, y, group, title) -> dots colored by group."""
    if not points:
        return None
    chart, x, y = _axes([p[0] for p in points], [p[1] for p in points])
    groups = list(dict.fromkeys(p[2] for p in points))
    colors = {group: PALETTE[i % len(PALETTE)] for i, group in enumerate(groups)}
    chart.dots = [{"x": x(a), "y": y(b), "color": colors[g], "title": t} for a, b, g, t in points]
    chart.legend = [{"label": group, "color": color} for group, color in colors.items()]
    chart.x_label, chart.y_label = x_label, y_label
    return chart
