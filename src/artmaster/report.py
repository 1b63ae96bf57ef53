"""The evaluation as people read it: summary.md, grid.png and a self-contained report.html (every
picture inlined), all drawn from the metrics `evaluate` computed."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from artmaster.config import Settings

esc = html.escape


@dataclass(frozen=True)
class ReportSettings(Settings):
    """`evaluate.report`: the pictures of grid.png and report.html."""

    cell: int
    grid_seeds: int
    reference_shown: int

STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:0.6em 0} td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}
th{background:#f3f3f3} img{image-rendering:pixelated;margin:1px} .small{font-size:11px;color:#555}
.yes{color:#0a7a28;font-weight:bold} .no{color:#a33;font-weight:bold} .verdict{font-size:15px;margin:0.3em 0}
"""


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def cell_image(image: Image.Image, size: int) -> Image.Image:
    """Fit into size x size (nearest-neighbour, so small generations stay crisp)."""
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.NEAREST)


def img(image: Image.Image, cell: int, title: str = "") -> str:
    return f"<img src='{data_uri(cell_image(image, cell))}' title='{esc(title)}'>"


def draw_grid(rows, plan, prompts: list[str], cell: int, grid_seeds: int) -> Image.Image:
    """Rows = prompts (text on the left), columns = models (first training replicate); each cell
    shows the first `grid_seeds` seeds side by side."""
    seeds = sorted({seed for _, _, seed in plan})[: max(1, grid_seeds)]
    font = ImageFont.load_default(size=12)
    gap, label_w, header_h = 4, 170, 34
    column_w = len(seeds) * cell + (len(seeds) - 1) * 2
    grid = Image.new("RGB", (label_w + len(rows) * (column_w + gap), header_h + len(prompts) * (cell + gap)), "white")
    draw = ImageDraw.Draw(grid)
    position = {(index, seed): i for i, (index, _, seed) in enumerate(plan)}
    for column, row in enumerate(rows):
        left = label_w + column * (column_w + gap)
        for line, text in enumerate(textwrap.wrap(row.name.replace("_", " "), max(8, column_w // 7))[:2]):
            draw.text((left + 2, 2 + line * 14), text, fill="black", font=font)
        for p_row in range(len(prompts)):
            top = header_h + p_row * (cell + gap)
            for k, seed in enumerate(seeds):
                grid.paste(cell_image(row.images[0][position[(p_row, seed)]], cell), (left + k * (cell + 2), top))
    for p_row, prompt in enumerate(prompts):
        top = header_h + p_row * (cell + gap)
        for line, text in enumerate(textwrap.wrap(prompt, 26)[:6]):
            draw.text((4, top + 4 + line * 15), text, fill="black", font=font)
    return grid


def interval(entry, digits: int = 3, sign: bool = False) -> str:
    if not isinstance(entry, dict):
        return str(entry) if entry is not None else "n/a"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    value = entry.get("value", entry.get("mean_difference"))
    return f"{fmt.format(value)} [{fmt.format(entry['ci_low'])}, {fmt.format(entry['ci_high'])}]"


def effect_text(entry: dict) -> str:
    p = entry["p_value"]
    return f"{interval(entry, 4, sign=True)}, p = {p:.4f}" + (" *" if entry["significant"] else "")


MODEL_COLUMNS = ("model", "style_score", "judge AUC (0.5 = indistinguishable)", "judge P(painter)",
                 "KID (0 = same distribution)", "CLIP score", "diversity", "nearest training crop (min / mean)", "near-copies")


def model_cells(name: str, entry: dict) -> list[str]:
    kid = entry["kid"]
    memo = entry["memorisation"]
    return [name, interval(entry["style_score"]), interval(entry["judge_auc"]), interval(entry["judge_p_painter"]),
            f"{kid['value']:.3g} [{kid['ci_low']:.3g}, {kid['ci_high']:.3g}]",
            interval(entry["adherence"], 2), "n/a" if entry["diversity"] is None else f"{entry['diversity']:.3f}",
            f"{memo['min_distance']:.3f} / {memo['mean_distance']:.3f}", str(memo["near_copies"])]


def comparison_cells(name: str, entry: dict) -> list[str]:
    return [name.replace("_vs_", " vs "), effect_text(entry["style"]), effect_text(entry["judge"]),
            f"{entry['style']['replicates_agreeing']} / {entry['judge']['replicates_agreeing']} of "
            f"{entry['style']['replicates']}"]


COMPARISON_COLUMNS = ("comparison", "style_score difference (95% CI), p", "judge P(painter) difference (95% CI), p",
                      "replicates agreeing in sign (style / judge)")


def markdown_table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def markdown_summary(metrics: dict) -> str:
    lines = [f"Models ({metrics['plan']['replicates']} training replicate(s) x {len(metrics['plan']['prompts'])} "
             f"prompts x {len(metrics['plan']['seeds'])} seeds):", ""]
    lines += markdown_table(MODEL_COLUMNS, [model_cells(n, e) for n, e in metrics["models"].items()])
    for name, entry in metrics["references"].items():
        lines.append(f"\n({name.replace('_', ' ')}: style_score {interval(entry['style_score'])})")
    lines += ["", "Comparisons (paired on prompts and seeds; * = significant at "
                  f"alpha {metrics['alpha']}):", ""]
    lines += markdown_table(COMPARISON_COLUMNS, [comparison_cells(n, e) for n, e in metrics["comparisons"].items()])
    lines += ["", *(f"- {s}" for s in metrics["verdicts"]["sentences"])]
    return "\n".join(lines) + "\n"


def html_table(columns, rows) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdicts(metrics: dict) -> str:
    parts = ["<h2>Verdicts</h2>"]
    for model, learned in metrics["verdicts"]["style_learned"].items():
        css = "yes" if learned else "no"
        parts.append(f"<p class='verdict'>{esc(model)}: style learned beyond a colour filter: "
                     f"<span class='{css}'>{'yes' if learned else 'no'}</span></p>")
    parts += [f"<p>{esc(sentence.replace('**', ''))}</p>" for sentence in metrics["verdicts"]["sentences"]]
    return "".join(parts)


def _grid(rows, plan, metrics: dict, cell: int) -> str:
    prompts = metrics["plan"]["prompts"]
    parts = ["<h2>Images (first training replicate; style_score under each)</h2><table><tr><th>prompt</th>",
             *(f"<th>{esc(row.name)}</th>" for row in rows), "</tr>"]
    for index, prompt in enumerate(prompts):
        parts.append(f"<tr><td>{esc(prompt)}</td>")
        for row in rows:
            cells = [f"<div style='display:inline-block;text-align:center'>{img(row.images[0][i], cell, f'seed {seed}')}"
                     f"<br><span class='small'>s{seed}: {row.scores[0, i]:.2f}</span></div>"
                     for i, (p, _, seed) in enumerate(plan) if p == index]
            parts.append("<td>" + "".join(cells) + "</td>")
        parts.append("</tr>")
    return "".join(parts) + "</table>"


def _memorisation(rows, plan, train_crops, metrics: dict, shown: int, cell: int) -> str:
    candidates = sorted(((float(row.nearest_distance[r, i]), row, r, i) for row in rows
                         for r in range(len(row.images)) for i in range(len(plan))), key=lambda item: item[0])
    crops = dict(zip(*train_crops))
    table = []
    for distance, row, r, i in candidates[:shown]:
        _, prompt, seed = plan[i]
        crop_id = row.nearest_crop[r][i]
        table.append(f"<tr><td>{img(row.images[r][i], cell)}</td><td>{img(crops[crop_id], cell)}<br>"
                     f"<span class='small'>{esc(crop_id)}</span></td><td>{esc(row.name)} (replicate {r})<br>"
                     f"{esc(prompt)}<br>seed {seed}</td><td>{distance:.3f}</td>"
                     f"<td>{row.pixel_correlation[r, i]:.3f}</td></tr>")
    return (f"<h2>Memorisation: the {len(table)} generations closest to a training crop</h2><table><tr>"
            "<th>generation</th><th>nearest training crop</th><th>model, prompt, seed</th>"
            f"<th>style distance (relative; near-copy below {metrics['memorisation_threshold']})</th>"
            "<th>pixel correlation</th></tr>" + "".join(table) + "</table>")


def _references(reference, train_crops, roundtrip, settings: ReportSettings, cell: int) -> str:
    count = min(settings.reference_shown, len(reference[1]))
    parts = [f"<h2>Style reference: held-out crops ({count} of {len(reference[1])} shown)</h2><p>",
             *(img(image, cell, name) for name, image in list(zip(*reference))[:count]), "</p>"]
    if roundtrip:
        count = min(settings.reference_shown, len(roundtrip))
        parts.append(f"<h2>Training crops (top) and the same after the base VAE's encode + decode (bottom), "
                     f"{count} of {len(roundtrip)}</h2><table><tr>")
        parts += [f"<td>{img(image, cell, name)}<br>{img(decoded, cell)}</td>"
                  for name, image, decoded in list(zip(*train_crops, roundtrip))[:count]]
        parts.append("</tr></table>")
    return "".join(parts)


EXPLANATION = (
    "style_score: higher = closer to the painter's held-out works (about -1 for a typical one of them against "
    "the others); it measures tone texture (on equalised lightness, so no tone curve moves it), colour "
    "structure (the scale and placement of colour) and colour detail (which colours come as dots), not global "
    "colour histograms. Judge: a small classifier trained from scratch to tell the painter's held-out works "
    "from generated images, cross-fitted by scan and prompt; AUC 0.5 = it cannot tell this model's images from "
    "the painter's; P(painter) = how painter-like it finds each image. It shares nothing with the style metric, "
    "which ArtAug's critic and filter use. Colour-matched rows: another row's images through a pure colour "
    "lookup table matched to the training crops (channels: per RGB channel; joint: the 3-D colour "
    "distribution); a gain that such a table also gets is not style. Intervals: 95%, resampling prompts and "
    "training replicates; p: sign flips of whole prompts. Training crops through the VAE: the painter's own "
    "crops after the base VAE, a reference point (not a bound: generations can score above it). "
    "docs/metrics.md explains the metric, the baselines, the judge and their limits."
)


def render_report(metrics: dict, rows, plan, reference, train_crops, roundtrip, settings: ReportSettings,
                  pairs_shown: int) -> str:
    """report.html; `pairs_shown`: the (generation, nearest training crop) pairs pictured."""
    cell = settings.cell
    generation = metrics["generation"]
    ref = metrics["reference"]
    intro = (f"<p>Style reference: <b>{ref['heldout_crops']}</b> crops of the held-out scans "
             f"{esc(', '.join(ref['heldout_scans']))} (never trained on), at the training scale. Every model paints "
             f"{len(metrics['plan']['prompts'])} prompts x {len(metrics['plan']['seeds'])} seeds at "
             f"{esc(generation['size'])} px ({generation['steps']} steps, guidance {generation['guidance']}); "
             f"adapters once per training replicate ({metrics['plan']['replicates']}). Paired comparisons share "
             f"prompts and seeds; * = significant at alpha {metrics['alpha']}.</p>")
    references = "".join(f"<p class='small'>{esc(name.replace('_', ' '))}: style_score "
                         f"{esc(interval(entry['style_score']))}</p>" for name, entry in metrics["references"].items())
    return "\n".join([
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ArtMaster evaluation</title><style>{STYLE}</style>"
        "</head><body><h1>ArtMaster evaluation</h1>", intro, _verdicts(metrics),
        "<h2>Models</h2>", html_table(MODEL_COLUMNS, [model_cells(n, e) for n, e in metrics["models"].items()]),
        references,
        "<h2>Comparisons</h2>",
        html_table(COMPARISON_COLUMNS, [comparison_cells(n, e) for n, e in metrics["comparisons"].items()]),
        f"<p class='small'>{esc(EXPLANATION)}</p>",
        _grid(rows, plan, metrics, cell),
        _memorisation(rows, plan, train_crops, metrics, pairs_shown, cell),
        _references(reference, train_crops, roundtrip, settings, cell),
        f"<p class='small'>Prompt adherence: {esc(metrics['adherence_backend'])}. Computed on "
        f"{esc(metrics['runtime']['cpu'])} ({esc(metrics['runtime']['aten_cpu_capability'])} kernels, "
        f"{metrics['runtime']['torch_threads']} torch thread(s)).</p></body></html>",
    ])
