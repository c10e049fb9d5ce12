"""Small dependency-free SVG charts: plot areas with linear axes, ticks, labels, lines, points, bands and legends.

The benchmark figures are plain SVG files, readable anywhere (a README, a browser, a diff) without plotly or a
JavaScript runtime; this module draws them, and knows nothing of what they show.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

# Where a legend entry's label starts, after its marker: a point, a short line or a small bar.
_MARKER_WIDTH = {"point": 14, "line": 26, "bar": 16, None: 0}


class Drawing:
    """An SVG document of a given size on a white background: charts and legends append their elements to it."""

    def __init__(self, width: float, height: float):
        self.width, self.height = width, height
        self.elements = [f'<rect width="{width}" height="{height}" fill="white"/>']

    def text(self, x: float, y: float, text: str, anchor: str | None = None, rotate: float | None = None) -> None:
        """`text` with its baseline at (x, y); `anchor` "middle" or "end" aligns it there; `rotate` turns it (degrees)
        about that point."""
        attributes = f' text-anchor="{anchor}"' if anchor else ""
        if rotate is not None:
            attributes += f' transform="rotate({_n(rotate)} {_n(x)} {_n(y)})"'
        self.elements.append(f'<text x="{_n(x)}" y="{_n(y)}"{attributes}>{escape(str(text))}</text>')

    def line(self, x0: float, y0: float, x1: float, y1: float, colour: str = "black", width: float | None = None) -> None:
        self.elements.append(
            f'<line x1="{_n(x0)}" y1="{_n(y0)}" x2="{_n(x1)}" y2="{_n(y1)}" stroke="{colour}"{_stroke_width(width)}/>'
        )

    def chart(self, box: tuple[float, float, float, float], x_range: tuple[float, float],
              y_range: tuple[float, float]) -> "Chart":
        """A plot area: `box` is its (left, top, right, bottom) in pixels; data in `x_range` × `y_range` fills it."""
        return Chart(self, box, x_range, y_range)

    def legend(self, x: float, y: float, entries, step: tuple[float, float] = (0, 16)) -> None:
        """One entry per (label, colour, marker) from (x, y) on, each `step` (dx, dy) pixels after the last; the
        marker is "point", "line", "bar" or None (the label alone, a note)."""
        for k, (label, colour, marker) in enumerate(entries):
            ex, ey = x + k * step[0], y + k * step[1]
            if marker == "point":
                self.elements.append(f'<circle cx="{_n(ex + 5)}" cy="{_n(ey)}" r="4" fill="{colour}"/>')
            elif marker == "line":
                self.line(ex, ey, ex + 20, ey, colour, width=2)
            elif marker == "bar":
                self.elements.append(f'<rect x="{_n(ex)}" y="{_n(ey - 2)}" width="12" height="4" fill="{colour}"/>')
            self.text(ex + _MARKER_WIDTH[marker], ey + 4, label)

    def render(self) -> str:
        header = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                  'font-family="sans-serif" font-size="11">')
        return "\n".join([header, *self.elements, "</svg>"])


class Chart:
    """A plot area of a drawing with linear scales: data coordinates in, marks drawn at their pixels."""

    def __init__(self, drawing: Drawing, box, x_range, y_range):
        self.drawing = drawing
        self.left, self.top, self.right, self.bottom = box
        self.x_range, self.y_range = x_range, y_range

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / ((high - low) or 1) * (self.right - self.left)

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.bottom - (value - low) / ((high - low) or 1) * (self.bottom - self.top)

    def twin(self, y_range: tuple[float, float]) -> "Chart":
        """The same plot area and x scale with another y scale, for a second axis on the right."""
        return Chart(self.drawing, (self.left, self.top, self.right, self.bottom), self.x_range, y_range)

    def axes(self, right: bool = False) -> None:
        """The x axis along the bottom and the y axis on the left (and on the right with `right`)."""
        self.drawing.line(self.left, self.bottom, self.right, self.bottom)
        self.drawing.line(self.left, self.top, self.left, self.bottom)
        if right:
            self.drawing.line(self.right, self.bottom, self.right, self.top)

    def x_ticks(self, form: str, values=None, count: int = 6) -> None:
        """Tick labels under the x axis at `values` (default: `count` evenly spaced over the range), each
        formatted with the format spec `form`."""
        for value in _ticks(self.x_range, values, count):
            self.drawing.text(self.x(value), self.bottom + 15, format(value, form), anchor="middle")

    def y_ticks(self, form: str, values=None, count: int = 6, side: str = "left") -> None:
        """Tick labels beside the y axis on `side` ("left" or "right"), as `x_ticks`."""
        for value in _ticks(self.y_range, values, count):
            if side == "left":
                self.drawing.text(self.left - 6, self.y(value) + 4, format(value, form), anchor="end")
            else:
                self.drawing.text(self.right + 6, self.y(value) + 4, format(value, form))

    def x_label(self, text: str, below: float = 38) -> None:
        """The x axis' title, centred `below` pixels under the axis."""
        self.drawing.text((self.left + self.right) / 2, self.bottom + below, text, anchor="middle")

    def y_label(self, text: str, x: float = 14) -> None:
        """The y axis' title, turned to read upwards at `x` pixels from the drawing's left edge."""
        self.drawing.text(x, (self.top + self.bottom) / 2, text, anchor="middle", rotate=-90)

    def polyline(self, points, colour: str, width: float | None = None, dash: str | None = None) -> None:
        """A line through (x, y) data points; `dash` an SVG dash pattern such as "4 3"."""
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.drawing.elements.append(
            f'<polyline points="{self._path(points)}" fill="none" stroke="{colour}"{_stroke_width(width)}{dashes}/>'
        )

    def points(self, points, colour: str, radius: float = 4, titles=None) -> None:
        """A dot at each (x, y) data point, with its title (a tooltip in browsers) when `titles` gives one."""
        titles = titles if titles is not None else [None] * len(points)
        for (x, y), title in zip(points, titles):
            hover = f"<title>{escape(str(title))}</title>" if title is not None else ""
            self.drawing.elements.append(
                f'<circle cx="{self.x(x):.1f}" cy="{self.y(y):.1f}" r="{radius}" fill="{colour}">{hover}</circle>'
            )

    def band(self, xs, lows, highs, colour: str, opacity: float = 0.15) -> None:
        """A shaded region between `lows` and `highs` over `xs` (a range around a line)."""
        outline = list(zip(xs, highs)) + list(zip(reversed(xs), reversed(lows)))
        self.drawing.elements.append(
            f'<polygon points="{self._path(outline)}" fill="{colour}" fill-opacity="{opacity}" '
            'stroke="none"/>'
        )

    def _path(self, points) -> str:
        return " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in points)


def _ticks(data_range, values, count: int):
    if values is not None:
        return list(values)
    low, high = data_range
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def _stroke_width(width: float | None) -> str:
    return f' stroke-width="{width}"' if width is not None else ""


def _n(value: float) -> str:
    """A pixel coordinate: one decimal at most."""
    return f"{value:.1f}".removesuffix(".0")
