"""The flagged-prompt cards of the report: each flagged prompt's generations beside its nearest training image,
shown at the size of one generation tile, and that image through the model's VAE (withheld when redacted).
"""

from __future__ import annotations

from typing import Any

from memaudit.report.images import MAX_TILE_CSS_PX, Image, Images
from memaudit.report.prose import distance_explanation
from memaudit.report.text import as_int, esc, finite_float, fmt

ROUNDTRIP_CAPTION = "through the model's VAE"  # the training image as the model can draw it at best


def _distance_key(prompt: dict) -> tuple:
    d = finite_float(prompt.get("nearest_train_distance"))
    idx = prompt.get("index")
    return (d is None, d if d is not None else 0.0, idx if isinstance(idx, int) else 0)


def _caption(*labels: str) -> str:
    """A figure caption of short labels, one per line, none of them wrapped (a too-long one is cut with an
    ellipsis, its full text in the tooltip)."""
    return "<figcaption>" + "".join(f'<span title="{esc(t)}">{esc(t)}</span>' for t in labels if t) + "</figcaption>"


def _sized_img(image: Image, alt: str, width: float | None) -> str:
    style = f' style="width:{width:.6g}px"' if width else ""
    return f'<img src="{image.uri}" alt="{esc(alt)}"{style}>'


def _tile_width(grid: Image, columns: Any) -> tuple[float | None, float | None]:
    """``(grid display width, tile display width)`` in CSS px: the grid PNG is ``columns`` tiles wide; a tile is
    shown at its pixel width, at most :data:`MAX_TILE_CSS_PX`, and the grid at the same scale."""
    if grid.size is None:
        return None, None
    width = grid.size[0]
    cols = as_int(columns)
    if cols is None or cols < 1 or width < cols:
        return float(width), None
    tile = width / cols
    scale = min(1.0, MAX_TILE_CSS_PX / tile)
    return width * scale, tile * scale


def flagged_cards(results: dict, images: Images, redact: bool, max_prompts: int) -> list[str]:
    """The "Flagged prompts" section: one card per flagged prompt, closest to a training image first, at most
    ``max_prompts`` of them."""
    prompts = [p for p in results.get("prompts") or [] if isinstance(p, dict) and p.get("flagged")]
    prompts.sort(key=_distance_key)
    out = ["<h2>Flagged prompts</h2>"]
    if not prompts:
        return out + ['<p class="note">No prompt was flagged.</p>']
    out.append(f'<p class="note">{len(prompts)} flagged prompt(s), closest to a training image first.</p>')
    out.append(f'<p class="explain">{esc(distance_explanation(results))}</p>')
    for p in prompts[:max_prompts]:
        extracted = bool(p.get("extracted"))
        facts = [
            f"prompt #{fmt(p.get('index'))}",
            f"clique size {fmt(p.get('clique_size'))}"
            + (" (greedy lower bound: the exact search hit its step cap)" if p.get("clique_exact") is False else ""),
            f"extracted: {'yes' if extracted else 'no'}",
            f"distance to nearest training image {fmt(p.get('nearest_train_distance'))}",
            f"denoising score {fmt(p.get('denoising_score'))}",
        ]
        if p.get("own_train_index") is not None:
            facts.append(f"own training image #{fmt(p.get('own_train_index'))}")
        card = ['<div class="card">', f'<div class="prompt">{esc(p.get("prompt"))}</div>',
                f"<div>{esc(' · '.join(facts))}</div>", '<div class="pair">']
        medoid = p.get("medoid_generation")
        train = None if redact else images.image(p.get("train_image"))
        tile = None
        if p.get("grid_withheld") is True and not p.get("grid"):
            card.append('<figure><p class="note">generations withheld (redacted): the audit matched them to a '
                        "training image</p></figure>")
        else:
            grid = images.image(p.get("grid"))
            columns = p.get("grid_columns")
            if as_int(columns) is None and grid.size and train is not None and train.size \
                    and grid.size[0] % train.size[0] == 0:
                columns = grid.size[0] // train.size[0]  # older results: the training image is one tile wide
            grid_width, tile = _tile_width(grid, columns)
            card.append("<figure>" + (_sized_img(grid, "generations", grid_width) if grid.uri
                                      else f'<p class="note">{esc(grid.note)}</p>')
                        + _caption("generations", f"(medoid: generation {fmt(medoid)})" if medoid is not None
                                   else "") + "</figure>")
        name = p.get("nearest_train_name")
        train_labels = (f"nearest training image #{fmt(p.get('nearest_train_index'))}",
                        f"({name})" if name is not None else "",
                        f"distance {fmt(p.get('nearest_train_distance'))}")
        if train is None:  # redacted
            label = f"{train_labels[0]}{' ' + train_labels[1] if name is not None else ''}, {train_labels[2]}"
            card.append(f'<figure><p class="note">{esc(label)} — image withheld (redacted)</p></figure>')
        else:
            width = tile or (float(train.size[0]) if train.size else None)
            card.append("<figure>" + (_sized_img(train, "nearest training image", width) if train.uri
                                      else f'<p class="note">{esc(train.note)}</p>')
                        + _caption(*train_labels) + "</figure>")
            if p.get("train_roundtrip"):
                drawn = images.image(p.get("train_roundtrip"))
                width = tile or (float(drawn.size[0]) if drawn.size else None)
                card.append("<figure>" + (_sized_img(drawn, "training image through the model's VAE", width)
                                          if drawn.uri else f'<p class="note">{esc(drawn.note)}</p>')
                            + _caption("the same image", ROUNDTRIP_CAPTION, "(the best the model can draw)")
                            + "</figure>")
        card += ["</div>", "</div>"]
        out += card
    if len(prompts) > max_prompts:
        out.append(f'<p class="note">{len(prompts) - max_prompts} more flagged prompt(s) not shown; '
                   "see the table of all prompts below and results.json.</p>")
    return out
