"""Loss-curve, eval and image-grid PNGs drawn with Pillow only (no matplotlib, no torch/jax): both trainers use it."""

import math
import os
import re

from . import atomic


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _nice_ticks(low, high, count=5):
    """Round tick values covering [low, high] (1, 2, 5 x 10^k spacing)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value):
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _save_png(image, path):
    with atomic.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def loss_curve_image(steps, losses, width=800, height=450, smoothing=0.9, title="training loss"):
    """A PIL image of the per-step loss (thin grey) and its exponential moving average (blue)."""
    from PIL import Image, ImageDraw

    points = [(float(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(float(v))]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    left, right, top, bottom = 70, 20, 30, 45
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    if not points:
        draw.text((left + 10, top + 10), "no finite loss values", fill="black", font=font)
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high == y_low:
        y_low, y_high = y_low - abs(y_low) * 0.1 - 1e-3, y_high + abs(y_high) * 0.1 + 1e-3
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad

    def to_pixel(x, y):
        return (left + (x - x_low) / (x_high - x_low) * plot_w, top + (y_high - y) / (y_high - y_low) * plot_h)

    for tick in _nice_ticks(y_low, y_high):
        _, py = to_pixel(x_low, tick)
        draw.line([left, py, left + plot_w, py], fill=(230, 230, 230))
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((5, py - 6), _label(tick), fill="black", font=font)
    for tick in _nice_ticks(x_low, x_high):
        px, _ = to_pixel(tick, y_low)
        draw.line([px, top + plot_h, px, top + plot_h + 4], fill="black")
        draw.text((px - 10, top + plot_h + 8), _label(tick), fill="black", font=font)
    draw.text((left + plot_w // 2 - 15, height - 16), "step", fill="black", font=font)

    raw = [to_pixel(x, y) for x, y in points]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 170, 170), width=1)
    else:
        x, y = raw[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    average, smooth = None, []
    for x, y in points:
        average = y if average is None else smoothing * average + (1 - smoothing) * y
        smooth.append(to_pixel(x, average))
    if len(smooth) > 1:
        draw.line(smooth, fill=(31, 119, 180), width=2)
    return image


def write_loss_curve(path, steps, losses, **kwargs):
    """Write the loss curve PNG to path (atomically). Returns path."""
    return _save_png(loss_curve_image(steps, losses, **kwargs), path)


def image_grid(rows, labels=None, cell=None, gap=4):
    """A PIL image: one row per entry of rows (a list of PIL images each), with an optional label on the left."""
    from PIL import Image, ImageDraw

    rows = [list(r) for r in rows if r]
    if not rows:
        raise ValueError("image_grid needs at least one image")
    cell = cell or max(max(im.size) for r in rows for im in r)
    label_w = 80 if labels else 0
    columns = max(len(r) for r in rows)
    width = label_w + columns * (cell + gap) + gap
    height = len(rows) * (cell + gap) + gap
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for r, row in enumerate(rows):
        y = gap + r * (cell + gap)
        if labels:
            draw.text((6, y + cell // 2 - 6), str(labels[r]), fill="black", font=font)
        for c, im in enumerate(row):
            tile = im.convert("RGB")
            if tile.size != (cell, cell):
                tile = tile.resize((cell, cell), Image.NEAREST if max(tile.size) < cell else Image.BICUBIC)
            grid.paste(tile, (label_w + gap + c * (cell + gap), y))
    return grid


VALIDATION_NAME = re.compile(r"step-(\d+)-(\d+)\.png$")


def save_validation_images(output_dir, step, images):
    """Write PIL images as output_dir/validation/step-NNNNNN-I.png (the names read back below)."""
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    return [_save_png(image, os.path.join(folder, f"step-{step:06d}-{i}.png")) for i, image in enumerate(images)]


def validation_images_by_step(folder):
    """{step: [paths in image order]} for the trainers' validation/step-NNNNNN-I.png files."""
    found = {}
    if not os.path.isdir(folder):
        return found
    for name in os.listdir(folder):
        match = VALIDATION_NAME.search(name)
        if match:
            found.setdefault(int(match.group(1)), []).append((int(match.group(2)), os.path.join(folder, name)))
    return {step: [p for _, p in sorted(items)] for step, items in sorted(found.items())}


def write_validation_grid(validation_dir, path, cell=128, max_rows=8):
    """Grid PNG of validation images over steps (rows: steps, oldest first; evenly thinned to max_rows).

    Returns path, or None when there are no validation images."""
    from PIL import Image

    by_step = validation_images_by_step(validation_dir)
    if not by_step:
        return None
    steps = sorted(by_step)
    if len(steps) > max_rows:
        picks = sorted({round(i * (len(steps) - 1) / (max_rows - 1)) for i in range(max_rows)})
        steps = [steps[i] for i in picks]
    rows = []
    for step in steps:
        row = []
        for p in by_step[step]:
            with Image.open(p) as im:
                row.append(im.convert("RGB"))
        rows.append(row)
    return _save_png(image_grid(rows, labels=[f"step {s}" for s in steps], cell=cell), path)


def _panel(draw, box, xs, ys, title, x_name):
    """Axes with ticks in box (left, top, right, bottom) for the points' range; returns the point -> pixel map."""
    font = _font()
    left, top, right, bottom = box
    draw.text((left, top - 22), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    x_low, x_high, y_low, y_high = min(xs), max(xs), min(ys), max(ys)
    if x_high == x_low:
        x_low, x_high = x_low - abs(x_low) * 0.1 - 1e-3, x_high + abs(x_high) * 0.1 + 1e-3
    if y_high == y_low:
        y_low, y_high = y_low - abs(y_low) * 0.1 - 1e-3, y_high + abs(y_high) * 0.1 + 1e-3
    x_pad, y_pad = (x_high - x_low) * 0.08, (y_high - y_low) * 0.08
    x_low, x_high, y_low, y_high = x_low - x_pad, x_high + x_pad, y_low - y_pad, y_high + y_pad

    def to_pixel(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                top + (y_high - y) / (y_high - y_low) * (bottom - top))

    def label(ticks, value):  # as many digits as the tick spacing needs: 1.0846, 1.0848, not 1.08 twice
        spacing = ticks[1] - ticks[0] if len(ticks) > 1 else 0
        if not spacing or abs(value) >= 1e4:
            return _label(value)
        return f"{value:.{max(0, -math.floor(math.log10(spacing)))}f}"

    y_ticks, x_ticks = _nice_ticks(y_low, y_high), _nice_ticks(x_low, x_high)
    for tick in y_ticks:
        _, py = to_pixel(x_low, tick)
        draw.line([left, py, right, py], fill=(230, 230, 230))
        draw.text((left - 60, py - 6), label(y_ticks, tick), fill="black", font=font)
    for tick in x_ticks:
        px, _ = to_pixel(tick, y_low)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 10, bottom + 8), label(x_ticks, tick), fill="black", font=font)
    draw.text(((left + right) // 2 - 3 * len(x_name), bottom + 24), x_name, fill="black", font=font)
    return to_pixel


def eval_plot_image(entries, height=460):
    """eval.png: the validation loss over steps (blue) with the initializer's baseline (grey), and, when the
    steps have CLIP scores, reconstruction against editability with every step labelled (the Textual Inversion
    paper's figure). entries: {step: eval.json entry}."""
    from PIL import Image, ImageDraw

    loss = [(s, e["validation_loss"]) for s, e in entries.items() if isinstance(e.get("validation_loss"), (int, float))]
    scored = [(s, e["reconstruction"], e["editability"]) for s, e in entries.items()
              if isinstance(e.get("reconstruction"), (int, float)) and isinstance(e.get("editability"), (int, float))]
    panels = [p for p in ("loss" if loss else None, "scores" if scored else None) if p]
    width = 560 * max(1, len(panels))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if not panels:
        draw.text((20, 20), "nothing measured yet", fill="black", font=_font())
        return image
    for n, panel in enumerate(panels):
        box = (560 * n + 80, 40, 560 * (n + 1) - 20, height - 60)
        if panel == "loss":
            baselines = [e["validation_baseline"] for e in entries.values()
                         if isinstance(e.get("validation_baseline"), (int, float))]
            ys = [v for _, v in loss] + baselines[:1]
            to_pixel = _panel(draw, box, [s for s, _ in loss], ys, "validation loss (grey: initializer's words)",
                              "step")
            if baselines:
                _, py = to_pixel(loss[0][0], baselines[0])
                draw.line([box[0], py, box[2], py], fill=(150, 150, 150), width=1)
            points = [to_pixel(s, v) for s, v in loss]
            if len(points) > 1:
                draw.line(points, fill=(31, 119, 180), width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
        else:
            to_pixel = _panel(draw, box, [r for _, r, _ in scored], [e for _, _, e in scored],
                              "editability (y) against reconstruction (x), CLIP", "reconstruction")
            for step, rec, edit in scored:
                x, y = to_pixel(rec, edit)
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40))
                draw.text((x + 6, y - 6), str(step), fill="black", font=_font())
    return image


def write_eval_plot(path, entries):
    """Write eval.png (atomically). Returns path."""
    return _save_png(eval_plot_image(entries), path)
