"""Semantic correspondence probe: zero-shot keypoint transfer by nearest
neighbour in feature space (the DIFT / SPair-71k protocol), with PCK at image
and bounding-box thresholds, and an optional light trained 3x3 conv head.

Layouts: a feature map is ``(C, h, w)`` (float16 or float32, any resolution);
keypoints are ``(N, 2)`` as ``(x, y)`` in image pixels; an image size is
``(H, W)``; a bounding box is ``(x1, y1, x2, y2)`` in pixels.

Coordinates: pixel ``x`` is the pixel with index ``x`` (its centre); in the
bilinear upsampling (``align_corners=False``) feature cell ``j`` of ``w`` covers
pixels ``[j * W / w, (j + 1) * W / w)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .runner import progress

Size = tuple[int, int]


# ----------------------------------------------------------------------------
# validation and coordinate helpers
def _check_feat(name: str, feat: torch.Tensor) -> torch.Tensor:
    if not isinstance(feat, torch.Tensor):
        feat = torch.as_tensor(np.asarray(feat))
    if feat.ndim != 3:
        raise ValueError(f"{name} must be a feature map of shape (C, h, w), got shape {tuple(feat.shape)}")
    return feat.float()


def _check_size(name: str, size: Any) -> Size:
    size = tuple(int(s) for s in (size.tolist() if hasattr(size, "tolist") else size))
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be an image size (H, W) of two positive ints, got {size}")
    return size  # type: ignore[return-value]


def _check_kps(name: str, kps: Any) -> torch.Tensor:
    kps = torch.as_tensor(np.asarray(kps.detach().cpu() if isinstance(kps, torch.Tensor) else kps, dtype=np.float64))
    if kps.ndim != 2 or kps.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) holding (x, y) per keypoint, got shape {tuple(kps.shape)}")
    return kps.float()


def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear resampling with ``align_corners=False``:
    exactly those of ``F.interpolate(..., mode="bilinear")`` along one axis."""
    eye = torch.eye(n_in, dtype=torch.float32)[None]  # (1, n_in channels, n_in positions)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def pixel_to_cell(xy: torch.Tensor, image_size: Size, grid_size: Size) -> torch.Tensor:
    """(N, 2) pixel (x, y) -> (N, 2) long indices (col, row) of the feature cell
    holding each pixel, clamped to the grid."""
    (H, W), (h, w) = image_size, grid_size
    col = torch.floor((xy[:, 0] + 0.5) * w / W).clamp(0, w - 1)
    row = torch.floor((xy[:, 1] + 0.5) * h / H).clamp(0, h - 1)
    return torch.stack([col, row], 1).long()


def cell_to_pixel(cells: torch.Tensor, image_size: Size, grid_size: Size) -> torch.Tensor:
    """(N, 2) long (col, row) feature cells -> (N, 2) float pixel (x, y) of the cell centres."""
    (H, W), (h, w) = image_size, grid_size
    x = (cells[:, 0].float() + 0.5) * W / w - 0.5
    y = (cells[:, 1].float() + 0.5) * H / h - 0.5
    return torch.stack([x, y], 1)


class _Grid:
    """A feature map seen on its matching grid: the image pixel grid (bilinear
    upsampling, computed row-block by row-block) or the raw feature grid."""

    def __init__(self, feat: torch.Tensor, image_size: Size, upsample: bool):
        self.feat, self.image_size, self.upsample = feat, image_size, upsample
        _, h, w = feat.shape
        if upsample:
            self.shape = image_size
            self.ay, self.ax = _interp_matrix(h, image_size[0]), _interp_matrix(w, image_size[1])
            self.ay, self.ax = self.ay.to(feat.device), self.ax.to(feat.device)
        else:
            self.shape = (h, w)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """(C, r1 - r0, W_grid) unnormalised features of grid rows ``r0:r1``."""
        if not self.upsample:
            return self.feat[:, r0:r1]
        return torch.einsum("yk,ckl,xl->cyx", self.ay[r0:r1], self.feat, self.ax)

    def at(self, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(N, C) unnormalised features at grid positions (N,) cols, (N,) rows."""
        if not self.upsample:
            return self.feat[:, rows, cols].T
        tmp = torch.einsum("nk,ckl->ncl", self.ay[rows], self.feat)
        return torch.einsum("ncl,nl->nc", tmp, self.ax[cols])

    def to_grid(self, xy: torch.Tensor) -> torch.Tensor:
        """(N, 2) pixel (x, y) -> (N, 2) long grid (col, row), rounded and clamped."""
        if not self.upsample:
            return pixel_to_cell(xy, self.image_size, self.shape)
        H, W = self.shape
        return torch.stack([xy[:, 0].round().clamp(0, W - 1), xy[:, 1].round().clamp(0, H - 1)], 1).long()

    def to_pixels(self, cells: torch.Tensor) -> torch.Tensor:
        """(N, 2) long grid (col, row) -> (N, 2) float pixel (x, y)."""
        return cells.float() if self.upsample else cell_to_pixel(cells, self.image_size, self.shape)


# ----------------------------------------------------------------------------
# matching
@torch.no_grad()
def match_keypoints(
    src_feat: torch.Tensor,
    trg_feat: torch.Tensor,
    src_xy: Any,
    src_size: Size,
    trg_size: Size,
    upsample: bool = True,
    chunk_size: int = 256,
    block_pixels: int = 16384,
) -> torch.Tensor:
    """Transfer source keypoints to the target image by cosine nearest neighbour.

    Protocol (DIFT): both maps are bilinearly upsampled to their image sizes
    (``upsample=True``) and L2-normalised over channels; each source keypoint
    takes the feature at its rounded, clamped pixel; the prediction is the
    argmax of its cosine similarity over every target pixel (first maximum on
    ties). With ``upsample=False`` matching runs on the raw feature grids: a
    keypoint takes the cell holding its pixel and the prediction is the pixel
    centre of the best target cell.

    Memory stays bounded: the upsampled target is never held whole but built in
    blocks of about ``block_pixels`` pixels, and keypoints go ``chunk_size`` at a
    time, so peak extra memory is ``~ (C + chunk_size) * block_pixels`` floats.
    All computation is float32.

    Args:
        src_feat: (C, hs, ws) source feature map.
        trg_feat: (C, ht, wt) target feature map.
        src_xy: (N, 2) source keypoints (x, y) in source pixels.
        src_size: source image size (H, W).
        trg_size: target image size (H, W).
        upsample: match on image pixel grids (True) or feature grids (False).
        chunk_size: keypoints per similarity chunk.
        block_pixels: target grid pixels per block.

    Returns:
        (N, 2) float32 predicted (x, y) in target pixels (CPU).
    """
    src, trg = _check_feat("src_feat", src_feat), _check_feat("trg_feat", trg_feat)
    if src.shape[0] != trg.shape[0]:
        raise ValueError(f"src_feat and trg_feat must have the same channels, got {src.shape[0]} and {trg.shape[0]}")
    src_xy = _check_kps("src_xy", src_xy)
    src_grid = _Grid(src, _check_size("src_size", src_size), upsample)
    trg_grid = _Grid(trg, _check_size("trg_size", trg_size), upsample)
    if len(src_xy) == 0:
        return torch.zeros(0, 2)
    cells = src_grid.to_grid(src_xy).to(src.device)
    queries = F.normalize(src_grid.at(cells[:, 0], cells[:, 1]), dim=1)  # (N, C)
    best = _argmax_over_target(queries, trg_grid, chunk_size, block_pixels)
    wt = trg_grid.shape[1]
    return trg_grid.to_pixels(torch.stack([best % wt, best // wt], 1)).cpu()


def _argmax_over_target(queries: torch.Tensor, grid: _Grid, chunk_size: int, block_pixels: int) -> torch.Tensor:
    """(N,) flat index into ``grid`` of the best cosine match of each (N, C) unit query."""
    h, w = grid.shape
    n = len(queries)
    best_val = torch.full((n,), -math.inf, device=queries.device)
    best_idx = torch.zeros(n, dtype=torch.long, device=queries.device)
    rows_per_block = max(1, block_pixels // w)
    for r0 in range(0, h, rows_per_block):
        r1 = min(h, r0 + rows_per_block)
        block = F.normalize(grid.rows(r0, r1).flatten(1), dim=0)  # (C, rows * w)
        for c0 in range(0, n, chunk_size):
            val, idx = (queries[c0 : c0 + chunk_size] @ block).max(1)
            better = val > best_val[c0 : c0 + chunk_size]  # strict: keep the first maximum
            best_val[c0 : c0 + chunk_size] = torch.where(better, val, best_val[c0 : c0 + chunk_size])
            best_idx[c0 : c0 + chunk_size] = torch.where(better, idx + r0 * w, best_idx[c0 : c0 + chunk_size])
    return best_idx


# ----------------------------------------------------------------------------
# evaluation
PAIR_KEYS = ("src_feat", "trg_feat", "src_kps", "trg_kps", "src_size", "trg_size", "trg_bbox")
PCK_COLUMNS = [
    "pair_id", "category", "kp", "pred_x", "pred_y", "gt_x", "gt_y",
    "dist", "thr_img", "thr_bbox", "correct_img", "correct_bbox",
]  # fmt: skip


def _check_pair(i: int, pair: Mapping[str, Any]) -> None:
    missing = [k for k in PAIR_KEYS if k not in pair]
    if missing:
        raise ValueError(f"pair {i} lacks keys {missing}; a pair needs {list(PAIR_KEYS)} (category, pair_id optional)")


def _bbox_size(bbox: Any) -> float:
    b = np.asarray(bbox.detach().cpu() if isinstance(bbox, torch.Tensor) else bbox, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or b[2] < b[0] or b[3] < b[1]:
        raise ValueError(f"trg_bbox must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, got {b.tolist()}")
    return float(max(b[2] - b[0], b[3] - b[1]))


@torch.no_grad()
def _apply_head(head: nn.Module | None, feat: torch.Tensor) -> torch.Tensor:
    if head is None:
        return feat
    was_training = head.training
    head.eval()
    out = head(_check_feat("feature map", feat))
    head.train(was_training)
    return out


def evaluate_pairs(
    pairs: Iterable[Mapping[str, Any]],
    alpha: float = 0.1,
    head: nn.Module | None = None,
    upsample: bool = True,
    match_size: Size | None = None,
    chunk_size: int = 256,
    show_progress: bool | None = None,
) -> pd.DataFrame:
    """Keypoint transfer over image pairs; one row per keypoint.

    Args:
        pairs: iterable of dicts with ``src_feat`` (C, hs, ws), ``trg_feat`` (C, ht, wt),
            ``src_kps`` / ``trg_kps`` (N, 2) (x, y) pixels (all visible in both),
            ``src_size`` / ``trg_size`` (H, W), ``trg_bbox`` (x1, y1, x2, y2), and
            optionally ``category`` and ``pair_id`` (default: position in the stream).
        alpha: PCK threshold factor.
        head: optional module (e.g. :class:`ConvHead`) applied to both maps first.
        upsample: see :func:`match_keypoints`.
        match_size: (H, W) of a common matching grid: keypoints are scaled to it, both
            maps upsampled to it, and predictions scaled back to the target image (the
            official ``task-corres.py`` matches on a 512 x 512 grid). None: each image's
            own pixel grid (DIFT).
        chunk_size: keypoints per similarity chunk.
        show_progress: tqdm bar (None: only on a terminal).

    Returns:
        DataFrame with columns :data:`PCK_COLUMNS`: ``pair_id, category, kp,
        pred_x, pred_y, gt_x, gt_y, dist, thr_img`` (``alpha * max(H, W)`` of the
        target image), ``thr_bbox`` (``alpha * max(h, w)`` of the target box),
        ``correct_img``, ``correct_bbox`` (``dist <= thr``).
    """
    frames = []
    for i, pair in enumerate(progress(pairs, desc="pairs", enabled=show_progress)):
        _check_pair(i, pair)
        src_kps, trg_kps = _check_kps("src_kps", pair["src_kps"]), _check_kps("trg_kps", pair["trg_kps"])
        if src_kps.shape != trg_kps.shape:
            shapes = f"{tuple(src_kps.shape)} vs {tuple(trg_kps.shape)}"
            raise ValueError(f"pair {i}: src_kps and trg_kps must have the same shape, got {shapes}")
        trg_size = _check_size("trg_size", pair["trg_size"])
        src_size = _check_size("src_size", pair["src_size"])
        grid_src, grid_trg, query = src_size, trg_size, src_kps
        if match_size is not None:
            grid_src = grid_trg = _check_size("match_size", match_size)
            query = src_kps * torch.tensor([grid_src[1] / src_size[1], grid_src[0] / src_size[0]])
        pred = match_keypoints(
            _apply_head(head, pair["src_feat"]), _apply_head(head, pair["trg_feat"]), query,
            grid_src, grid_trg, upsample=upsample, chunk_size=chunk_size,
        )  # fmt: skip
        if match_size is not None:
            pred = pred * torch.tensor([trg_size[1] / grid_trg[1], trg_size[0] / grid_trg[0]])
        pred64, gt64 = pred.double().numpy(), trg_kps.double().numpy()
        dist = np.linalg.norm(pred64 - gt64, axis=1)
        thr_img, thr_bbox = alpha * max(trg_size), alpha * _bbox_size(pair["trg_bbox"])
        columns = {
            "pair_id": pair.get("pair_id", i),
            "category": pair.get("category"),
            "kp": np.arange(len(dist)),
            "pred_x": pred64[:, 0],
            "pred_y": pred64[:, 1],
            "gt_x": gt64[:, 0],
            "gt_y": gt64[:, 1],
            "dist": dist,
            "thr_img": thr_img,
            "thr_bbox": thr_bbox,
            "correct_img": dist <= thr_img,
            "correct_bbox": dist <= thr_bbox,
        }
        frames.append(pd.DataFrame(columns))
    if not frames:
        return pd.DataFrame({c: [] for c in PCK_COLUMNS})
    return pd.concat(frames, ignore_index=True)[PCK_COLUMNS]


def summarize_pck(df: pd.DataFrame) -> dict[str, float]:
    """PCK from an :func:`evaluate_pairs` frame, both ways SPair-71k reports it.

    Returns:
        ``pck_img_per_kp`` / ``pck_bbox_per_kp``: mean over all keypoints;
        ``pck_img_per_image`` / ``pck_bbox_per_image``: mean over pairs of each
        pair's fraction of correct keypoints (pairs grouped by ``pair_id``, which must
        be unique per pair); and ``n_keypoints``, ``n_pairs``.
    """
    missing = {"pair_id", "correct_img", "correct_bbox"} - set(df.columns)
    if missing:
        raise ValueError(f"summarize_pck needs an evaluate_pairs frame; missing columns {sorted(missing)}")
    if len(df) == 0:
        raise ValueError("summarize_pck got an empty frame (no keypoints)")
    per_pair = df.groupby("pair_id", sort=False)[["correct_img", "correct_bbox"]].mean()
    return {
        "pck_img_per_kp": float(df["correct_img"].mean()),
        "pck_bbox_per_kp": float(df["correct_bbox"].mean()),
        "pck_img_per_image": float(per_pair["correct_img"].mean()),
        "pck_bbox_per_image": float(per_pair["correct_bbox"].mean()),
        "n_keypoints": float(len(df)),
        "n_pairs": float(len(per_pair)),
    }


# ----------------------------------------------------------------------------
# light trained head (generic-diffusion-feature ``correspondence/``)
class ConvHead(nn.Module):
    """The official correspondence head: one 3x3 convolution ``C -> D`` without bias
    (``AggregationNetwork.out``; D = C for one model). Input (C, h, w) or (B, C, h, w);
    output (D, h, w) or (B, D, h, w).

    ``front``: a function returning ``(module, channels)``, a per-pixel module applied to every
    cell's feature vector before the convolution and trained with it (GATE's per-pixel weight
    assigners, :class:`difstudy.gate.PixelAssigners`, through a source's ``pixel_front``); the
    convolution then sees ``channels`` channels."""

    def __init__(self, in_channels: int, out_dim: int | None = None, front=None):
        super().__init__()
        self.front, mid = front() if front is not None else (None, in_channels)
        self.conv = nn.Conv2d(mid, out_dim or mid, kernel_size=3, padding=1, bias=False)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = feat.float() if feat.ndim == 4 else feat.float()[None]
        if self.front is not None:  # every cell through the per-pixel front
            b, c, h, w = x.shape
            x = self.front(x.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        out = self.conv(x)
        return out if feat.ndim == 4 else out[0]


def _flat_cells(xy: torch.Tensor, image_size: Size, grid: Size) -> torch.Tensor:
    """(N,) flat row-major indices of the grid cells holding pixels (N, 2) (x, y)."""
    cells = pixel_to_cell(xy, image_size, grid)
    return cells[:, 1] * grid[1] + cells[:, 0]


def contrastive_loss(head: nn.Module, pair: Mapping[str, Any], temperature: float = 0.07) -> torch.Tensor:
    """The official symmetric CLIP loss (``task-corres.py: compute_clip_loss``): cosine
    similarities between every cell of the two head outputs, scaled by ``1 / temperature``;
    each source keypoint's cell must pick its target keypoint's cell among all target cells
    and vice versa; the mean of the two cross-entropies."""
    src, trg = head(_check_feat("src_feat", pair["src_feat"])), head(_check_feat("trg_feat", pair["trg_feat"]))
    src_size, trg_size = _check_size("src_size", pair["src_size"]), _check_size("trg_size", pair["trg_size"])
    src_kps, trg_kps = _check_kps("src_kps", pair["src_kps"]), _check_kps("trg_kps", pair["trg_kps"])
    s_idx = _flat_cells(src_kps, src_size, tuple(src.shape[1:])).to(src.device)
    t_idx = _flat_cells(trg_kps, trg_size, tuple(trg.shape[1:])).to(trg.device)
    S, T = F.normalize(src.flatten(1), dim=0), F.normalize(trg.flatten(1), dim=0)  # (D, cells)
    loss_src = F.cross_entropy(S[:, s_idx].T @ T / temperature, t_idx)
    loss_trg = F.cross_entropy(T[:, t_idx].T @ S / temperature, s_idx)
    return (loss_src + loss_trg) / 2


def train_conv_head(
    train_pairs: Sequence[Mapping[str, Any]],
    out_dim: int | None = None,
    epochs: int = 2,
    steps_per_epoch: int = 5000,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
    temperature: float = 0.07,
    show_progress: bool | None = None,
    front=None,
) -> ConvHead:
    """Train a :class:`ConvHead` with :func:`contrastive_loss`, one AdamW step per pair.

    Defaults are the official ``task-corres.py`` ones: 2 epochs, each over at most 5000
    pairs in a fresh random order, AdamW lr 5e-4, weight decay 0.01, temperature 0.07.
    (The official script also validates every 500 steps and reports the best validation
    score; here the final head is returned.)

    Args:
        train_pairs: pairs as for :func:`evaluate_pairs` (a sequence; may be lazy).
        out_dim: D (None: C, as the official single-model head).
        epochs, steps_per_epoch, lr, weight_decay, temperature: the schedule above.
        seed: seeds the initialisation and the pair order.
        show_progress: tqdm bar (None: only on a terminal).
        front: a per-pixel module factory trained jointly with the head (see :class:`ConvHead`).

    Returns:
        The trained head, in eval mode.
    """
    if len(train_pairs) == 0:
        raise ValueError("train_conv_head needs at least one training pair")
    first = train_pairs[0]
    _check_pair(0, first)
    in_channels = _check_feat("src_feat", first["src_feat"]).shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ConvHead(in_channels, out_dim, front)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in progress(range(epochs), desc="conv head", enabled=show_progress):
        order = torch.randperm(len(train_pairs), generator=gen)[:steps_per_epoch].tolist()
        for i in order:
            pair = train_pairs[i]
            _check_pair(i, pair)
            loss = contrastive_loss(head, pair, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()
