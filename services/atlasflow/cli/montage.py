"""The demo's picture: CT slices with organ labels and the attention heatmap (Pillow only).

Layout (all panels the same size, `cell_px` square):

    title line
    row 1: n_slices axial slices + 1 coronal slice, CT with translucent organ overlays
    row 2: the same slices, CT with the attention heatmap (hot colour map)
    legend: organ colours and names; the display conventions

Display conventions (radiological): axial slices are seen from the feet, so the patient's
RIGHT is on the image LEFT and anterior is up; the coronal slice is seen from the front,
patient's right on the image left, superior up. Every panel keeps the physical aspect ratio
(voxel spacing from the affine). CT window [-175, 250] HU (the AbdomenAtlas clip range).

Usage: python -m atlasflow.cli.montage CT.nii.gz LABELS.nii.gz HEATMAP.nii.gz OUT.png [--title T]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from atlasflow.common.organs import ORGANS

WINDOW_HU = (-175.0, 250.0)
LABEL_ALPHA = 0.45
HEATMAP_ALPHA_MAX = 0.75
# Distinct colours (RGB) per AbdomenAtlas organ id.
ORGAN_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (230, 25, 75),  # aorta: red
    2: (60, 180, 75),  # gall_bladder: green
    3: (255, 225, 25),  # kidney_left: yellow
    4: (245, 130, 48),  # kidney_right: orange
    5: (0, 130, 200),  # liver: blue
    6: (145, 30, 180),  # pancreas: purple
    7: (70, 240, 240),  # postcava: cyan
    8: (240, 50, 230),  # spleen: magenta
    9: (170, 110, 40),  # stomach: brown
}

CELL_PX = 192
GAP_PX = 6
MARGIN_PX = 10
TITLE_H = 30
CAPTION_H = 16
LEGEND_W = 170
BG = (16, 16, 16)
FG = (235, 235, 235)


def montage_size(n_slices: int = 6, cell_px: int = CELL_PX) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that `render_montage` writes."""
    cols = n_slices + 1
    width = 2 * MARGIN_PX + cols * cell_px + (cols - 1) * GAP_PX + GAP_PX + LEGEND_W
    height = 2 * MARGIN_PX + TITLE_H + 2 * (cell_px + CAPTION_H) + GAP_PX
    return width, height


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the axes of `volume` so that index axes point R, A, S.

    Returns (volume whose index axes increase toward patient Right, Anterior, Superior;
    spacing (3,) in mm along those axes). Only axis permutations and flips (no resampling);
    oblique affines use the closest axes.
    """
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    out = nib.orientations.apply_orientation(np.asarray(volume), ornt)
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    spacing = spacing[ornt[:, 0].astype(int).argsort()]  # spacing in output axis order
    return out, spacing


def axial_view(vol_ras: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k of an RAS volume (X, Y, Z) as an image (rows, cols), radiological view:
    row 0 = anterior, column 0 = patient right. img[r, c] = vol[X-1-c, Y-1-r, k]."""
    return vol_ras[::-1, ::-1, k].T


def coronal_view(vol_ras: np.ndarray, j: int) -> np.ndarray:
    """Coronal slice j of an RAS volume as an image, seen from the front: row 0 = superior,
    column 0 = patient right. img[r, c] = vol[X-1-c, j, Z-1-r]."""
    return vol_ras[::-1, j, ::-1].T


def window(ct_img: np.ndarray, lo: float = WINDOW_HU[0], hi: float = WINDOW_HU[1]) -> np.ndarray:
    """HU -> uint8 grey, clipped to [lo, hi]."""
    x = (np.clip(ct_img.astype(np.float32), lo, hi) - lo) / (hi - lo)
    return np.round(x * 255.0).astype(np.uint8)


def hot(t: np.ndarray) -> np.ndarray:
    """'hot' colour map: t in [0, 1] (H, W) -> (H, W, 3) float RGB in [0, 1]."""
    t = np.clip(t, 0.0, 1.0)
    return np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)


def overlay_labels(grey: np.ndarray, labels: np.ndarray, alpha: float = LABEL_ALPHA) -> np.ndarray:
    """Blend organ colours over a grey image: (H, W) uint8 + (H, W) ids -> (H, W, 3) uint8."""
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    for oid, colour in ORGAN_COLOURS.items():
        m = labels == oid
        if m.any():
            rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour, np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def overlay_heatmap(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend a [0, 1] heatmap over a grey image with the hot colour map (alpha grows with t)."""
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    t = np.clip(heat.astype(np.float32), 0.0, 1.0)
    a = (HEATMAP_ALPHA_MAX * np.clip(t * 2.0, 0.0, 1.0))[..., None]
    rgb = (1 - a) * rgb + a * hot(t) * 255.0
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _heat_unit(heatmap: np.ndarray) -> np.ndarray:
    """Heatmap as float in [0, 1]: uint8 maps (p*255) are divided by 255."""
    h = np.asarray(heatmap)
    if h.dtype.kind in "iu":
        return h.astype(np.float32) / 255.0
    return np.clip(h.astype(np.float32), 0.0, 1.0)


def _fit(img: np.ndarray, row_mm: float, col_mm: float, cell: int, *, nearest: bool) -> Image.Image:
    """Resize an (H, W[, 3]) uint8 image to keep physical aspect, centred in a cell x cell box."""
    h, w = img.shape[:2]
    height_mm, width_mm = h * row_mm, w * col_mm
    scale = cell / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    pil = Image.fromarray(img).resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    box = Image.new("RGB", (cell, cell), (0, 0, 0))
    box.paste(pil, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return box


def pick_slices(labels_ras: np.ndarray, n: int) -> list[int]:
    """n axial indices evenly spread over the z-range holding labels (whole volume if none)."""
    z_any = np.flatnonzero(labels_ras.any(axis=(0, 1)))
    lo, hi = (int(z_any[0]), int(z_any[-1])) if z_any.size else (0, labels_ras.shape[2] - 1)
    if n <= 1:
        return [(lo + hi) // 2]
    # Stay a little inside the labelled range: its first/last slices hold little tissue.
    pad = (hi - lo) / (2 * n)
    return [int(round(v)) for v in np.linspace(lo + pad, hi - pad, n)][::-1]  # cranial first


def render_montage(
    ct: np.ndarray,
    labels: np.ndarray,
    heatmap: np.ndarray,
    affine: np.ndarray,
    out_png: Path,
    *,
    n_slices: int = 6,
    title: str = "",
    cell_px: int = CELL_PX,
) -> Path:
    """Draw the demo montage and write it to `out_png`; return the path.

    ct: (X, Y, Z) HU; labels: (X, Y, Z) AbdomenAtlas ids 0..9; heatmap: (X, Y, Z) attention
    heatmap in [0, 1] (float) or 0..255 (uint8 = p*255); all on the same grid with voxel-to-world
    `affine` (4, 4), RAS+ mm (any axis order: the volumes are reoriented to RAS for display).
    The PNG is `montage_size(n_slices, cell_px)` pixels. `title` is printed on the first line
    (say "untrained models" there when the labels come from demo weights).
    """
    ct = np.asarray(ct)
    labels = np.asarray(labels)
    heatmap = np.asarray(heatmap)
    if ct.ndim != 3 or labels.shape != ct.shape or heatmap.shape != ct.shape:
        raise ValueError("ct, labels and heatmap must be 3-D arrays of the same shape")
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    ct_r, sp = to_ras(ct, affine)
    lab_r, _ = to_ras(labels, affine)
    heat_r, _ = to_ras(_heat_unit(heatmap), affine)
    sx, sy, sz = (float(s) for s in sp)
    zs = pick_slices(lab_r, n_slices)
    # Coronal slice through the labelled region's centre of mass (the volume centre if none).
    ys = np.flatnonzero(lab_r.any(axis=(0, 2)))
    j = int(round(ys.mean())) if ys.size else ct_r.shape[1] // 2

    width, height = montage_size(n_slices, cell_px)
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    f_title, f_small = _font(16), _font(11)
    draw.text((MARGIN_PX, MARGIN_PX + 4), title or "atlasflow", fill=FG, font=f_title)

    inv_z = _world_z(affine, ct_r.shape)
    panels: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float, str]] = []
    for k in zs:
        panels.append(
            (axial_view(ct_r, k), axial_view(lab_r, k), axial_view(heat_r, k), sy, sx, f"axial z={inv_z(k):.0f} mm")
        )
    panels.append((coronal_view(ct_r, j), coronal_view(lab_r, j), coronal_view(heat_r, j), sz, sx, "coronal"))

    top = MARGIN_PX + TITLE_H
    for col, (c_img, l_img, h_img, row_mm, col_mm, caption) in enumerate(panels):
        x = MARGIN_PX + col * (cell_px + GAP_PX)
        grey = window(c_img)
        for row, rgb in enumerate((overlay_labels(grey, l_img), overlay_heatmap(grey, h_img))):
            y = top + row * (cell_px + CAPTION_H + GAP_PX)
            canvas.paste(_fit(rgb, row_mm, col_mm, cell_px, nearest=True), (x, y))
            draw.text((x + 3, y + 2), "R", fill=FG, font=f_small)
            draw.text((x + cell_px - 10, y + 2), "L", fill=FG, font=f_small)
            draw.text((x + 2, y + cell_px + 2), caption if row == 0 else "attention heatmap", fill=FG, font=f_small)

    lx = MARGIN_PX + (n_slices + 1) * (cell_px + GAP_PX) + 4
    ly = top
    draw.text((lx, ly), "organs", fill=FG, font=_font(13))
    ly += 20
    for oid, name in ORGANS.items():
        draw.rectangle((lx, ly + 2, lx + 12, ly + 12), fill=ORGAN_COLOURS[oid])
        draw.text((lx + 18, ly), name, fill=FG, font=f_small)
        ly += 17
    ly += 8
    for line in (
        "radiological view:",
        "patient right on",
        "image left; anterior up",
        f"window {WINDOW_HU[0]:.0f}..{WINDOW_HU[1]:.0f} HU",
        "heatmap: hot, 0..1",
    ):
        draw.text((lx, ly), line, fill=FG, font=f_small)
        ly += 15
    # Hot colour bar.
    bar = (hot(np.linspace(1, 0, 80)[:, None].repeat(14, axis=1)) * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (lx, ly + 4))
    draw.text((lx + 20, ly + 2), "1", fill=FG, font=f_small)
    draw.text((lx + 20, ly + 74), "0", fill=FG, font=f_small)

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return out_png


def _world_z(affine: np.ndarray, ras_shape: Sequence[int]) -> Callable[[int], float]:
    """k (RAS index along S) -> world z in mm, for captions."""
    a = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(a)
    # Axis of the input array that became S, and whether it was flipped.
    in_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    flipped = ornt[in_axis, 1] < 0
    n = int(ras_shape[2])

    def f(k: int) -> float:
        idx = np.zeros(4)
        idx[in_axis] = (n - 1 - k) if flipped else k
        idx[3] = 1.0
        return float((a @ idx)[2])

    return f


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: render the montage of NIfTI files (CT, labels, heatmap) into a PNG."""
    from atlasflow.common.nifti import from_nifti_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ct")
    p.add_argument("labels")
    p.add_argument("heatmap", help="heatmap NIfTI, or '-' for none")
    p.add_argument("out_png")
    p.add_argument("--title", default="")
    p.add_argument("--slices", type=int, default=6)
    args = p.parse_args(argv)
    ct, affine = from_nifti_bytes(Path(args.ct).read_bytes())
    labels, _ = from_nifti_bytes(Path(args.labels).read_bytes())
    heat = (
        np.zeros(ct.shape, np.float32) if args.heatmap == "-" else from_nifti_bytes(Path(args.heatmap).read_bytes())[0]
    )
    render_montage(ct, labels, heat, affine, Path(args.out_png), n_slices=args.slices, title=args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
