"""Ensemble segmentation pipeline: native CT -> model grid -> three members -> native grid ->
ensemble labels, attention heatmap and per-organ statistics.

Grids and resampling live in `atlasflow.segmentation.grid`; the attention terms, mask helpers
and ranking strategies in `atlasflow.method` (shared with the ranking tools).

Array conventions: volumes are ``(X, Y, Z)`` voxel arrays with a 4x4 affine mapping voxel
indices to RAS+ world coordinates in mm (nibabel convention); any orientation (LPS, feet-first,
oblique) and spacing is accepted. Organ ids are AbdomenAtlas-8K 1..9
(`atlasflow.common.organs`); per-organ arrays use row ``k`` for organ id ``k + 1``.

Steps (DESIGN.md, "The method"):
1. Reorient + resample in one step (`atlasflow.segmentation.grid`): the model grid is
   RAS-aligned, spans the input's bounding box at the member's ``target_spacing_mm``; the HU
   window [-175, 250] is scaled to [0, 1] and sampled trilinearly (outside the input = 0,
   i.e. air). Pure reorientation at equal spacing is done exactly by flips/transposes;
   axis-aligned grids (any orientation, any spacing) by three separable 1-D linear passes;
   oblique grids by ``grid_sample``.
2. Per member: MONAI ``sliding_window_inference`` (Gaussian blending, the member's patch size,
   overlap, batch), then sigmoid per class (or softmax without background).
3. Per organ, each member's probability is sampled back onto the native grid (trilinear) and
   stored as uint8 ``p*255`` (the reference's storage). Member mask = ``p > 0.5``, largest
   26-connected component; ensemble mask = mean over members ``> 0.5``, largest 26-connected
   component. Overlaps between organs go to the organ with the larger mean probability
   (ties: lower id).
4. Attention (organs not in ``labelled_organs`` only), by the ensemble's ranking strategy
   (`atlasflow.method.strategy`; ensemble ``"attention": {"mode": <name>}`` or
   ``attention_mode=``). A strategy whose heatmap is the recipe's per-organ terms
   (``reference``, ``needs_whole_case`` False): each member's soft prediction zeroed outside
   a 1-voxel dilation of its own mask (`atlasflow.method.masks.keep_own_component`); std,
   entropy and overlap terms (`atlasflow.method.attention.organ_attention`). The overlap term
   uses the other eight organs' ensemble masks (before overlap resolution): we have 9
   structures, not the reference's 20 non-vessel ones. The output heatmap is the voxelwise
   maximum over organs of each organ's normalised heatmap.

   A strategy that needs the whole case (``enhanced``): the heatmap is instead the library's
   attention of that strategy (`atlasflow.segmentation.attention.strategy_attention`, i.e.
   `atlasflow.method.attention.case_attention` + the strategy's ``rank``; for ``enhanced``:
   `suspect_regions` of the members' unmasked soft predictions, swapped kidneys; heatmap =
   the library's reference heatmap inside that attention, at least 0.5),
   computed from the same uint8 native-grid soft predictions (`soft_predictions`): the library
   gets them organ by organ, each stack resampled again from the members' model-grid outputs
   when the library asks for it (`_NativeStacks`), so that no more than one full ``(M, X, Y,
   Z)`` stack of ours lives at a time; the library keeps its own crops. Nothing is cropped
   or thresholded before the library sees it: its result is the one it gives on the full
   stacks, whatever its definition. ``attention_ml`` / ``heatmap_ml`` are the strategy's attention
   volume and heatmap sum. Labels and ``component_count`` do not depend on the strategy.

Imported members (``imported=``: registered nnU-Net v2 / MONAI-bundle models,
`atlasflow.segmentation.imported`, docs/models.md) run before step 1 on the whole native CT by
the models package's own path (`atlasflow.models.segment.load_model`, the network on Triton:
`imported_triton_url` or ``imported_network``) and answer label maps of their own ids, which
`atlasflow.segmentation.heterogeneous.native_label_maps` maps by organ name onto the case grid
(one label volume per member; an organ's 255/0 plane is made when the organ is processed). In
step 3 an organ's stack gets the rows of the imported members that predict it (255/0), and the
vote (mean > 0.5; overlaps by the larger mean) and step 4's attention use only those rows:
a member without an opinion on an organ is left out, never counted as background
(``available``). `soft_predictions` returns the ensemble file's members only.

Every heavy array op runs in torch on ``device``; the connected-component labelling runs in
scipy on bounding-box crops (CPU).

GPU options (ensemble JSON or `EnsemblePipeline` arguments; defaults leave CPU results
unchanged): ``autocast="bf16"`` runs the members under bfloat16 autocast; ``sw_batch_size``
and ``overlap`` override every member's sliding-window batch and overlap; ``foreground_crop``
(`ForegroundCrop`) first crops the native CT to the body's bounding box (HU > threshold, grown
by a margin in mm) so the sliding window covers the body only; everything outside the box is
background with zero heatmap.

The result types (`PipelineOutput`, `STATS_COLUMNS`, `labelled_flags`) live in the torch-free
`atlasflow.segmentation.outputs`, which the service process imports. The pipeline itself
stays one module (past ~500 lines): its steps share the per-organ working state (`_OrganWork`,
the lazily resampled native stacks) of one case, and splitting them would only pass that
state across module boundaries.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.organs import NUM_ORGANS
from atlasflow.method.attention import organ_attention
from atlasflow.method.masks import Box, bounding_box, keep_own_component, largest_component, union_box
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import RankingStrategy, strategy_names
from atlasflow.segmentation.attention import strategy_attention
from atlasflow.segmentation.ensemble import (
    AUTOCAST,
    DOMAIN,
    EnsembleConfig,
    ForegroundCrop,
    MemberConfig,
    Preprocessing,
    load_ensemble,
    triton_model_name,
)
from atlasflow.segmentation.grid import model_grid, resample
from atlasflow.segmentation.heterogeneous import MemberOutput, NativeLabelMaps, native_label_maps
from atlasflow.segmentation.imported import ImportedMember, served_model_name
from atlasflow.segmentation.models import load_member
from atlasflow.segmentation.outputs import STATS_COLUMNS, PipelineOutput

# ----------------------------------------------------------------------------- foreground crop


def foreground_box(volume_hu: npt.ArrayLike, affine: npt.ArrayLike, crop: ForegroundCrop) -> Box | None:
    """Bounding box (native voxel slices) of ``volume_hu > crop.threshold_hu`` grown by
    ``crop.margin_mm`` (per axis: ``ceil(margin / spacing)`` voxels, spacing = the affine's
    column norms in mm); None when no voxel passes the threshold."""
    vol = np.asarray(volume_hu)
    box = bounding_box(vol > crop.threshold_hu)
    if box is None:
        return None
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    grow = [int(np.ceil(crop.margin_mm / max(float(sp), 1e-6) - 1e-9)) for sp in spacing]
    sx, sy, sz = (slice(max(0, b.start - g), min(n, b.stop + g)) for b, g, n in zip(box, grow, vol.shape))
    return sx, sy, sz


# ----------------------------------------------------------------------------- preprocessing


def preprocess(hu: torch.Tensor, affine: np.ndarray, pre: Preprocessing) -> tuple[torch.Tensor, np.ndarray]:
    """Step 1 for one member's preprocessing: ``hu`` ``(X, Y, Z)`` (HU, native grid, any
    device) -> ``((1, X', Y', Z')`` float32 image on the RAS model grid, that grid's 4x4
    affine). The HU window is scaled to [0, 1] and clamped, then sampled trilinearly (outside
    the input = 0, air). Also what fine-tuning (atlasflow.training) feeds the members."""
    shape = (int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2]))
    lo, hi = pre.hu_window
    windowed = ((hu.to(torch.float32) - lo) / (hi - lo)).clamp_(0.0, 1.0)
    g_aff, g_shape = model_grid(affine, shape, pre.target_spacing_mm)
    return resample(windowed[None], affine, g_aff, g_shape), g_aff


# ----------------------------------------------------------------------------- pipeline


@dataclass
class _OrganWork:
    box: Box | None
    masked_u8: torch.Tensor | None  # (M, *box) uint8 soft predictions zeroed outside dilated masks
    ensemble_mask: torch.Tensor | None  # (*box) bool, on the pipeline's device


class _NativeStacks(Mapping[int, torch.Tensor]):
    """Organ id 1..9 -> the members' uint8 ``(M, X, Y, Z)`` soft predictions on the native grid
    (on the pipeline's device), resampled from the model-grid outputs when asked for: the
    library reads them one organ at a time, so only one full stack lives at a time."""

    def __init__(
        self,
        pipeline: EnsemblePipeline,
        member_probs: list[tuple[torch.Tensor, np.ndarray]],
        aff: np.ndarray,
        shape: tuple[int, int, int],
        imported: NativeLabelMaps | None = None,
    ) -> None:
        self._pipeline, self._probs, self._aff, self._shape = pipeline, member_probs, aff, shape
        self._imported = imported

    def __getitem__(self, organ: int) -> torch.Tensor:
        if not 1 <= int(organ) <= NUM_ORGANS:
            raise KeyError(organ)
        u8 = self._pipeline._native_u8(self._probs, int(organ) - 1, self._aff, self._shape)
        if self._imported is None:
            return u8
        # every imported row (zeros where it has no opinion: `available` leaves them out)
        return torch.cat([u8, self._imported.planes(int(organ)).to(u8.device)])

    def available(self) -> dict[int, list[bool]] | None:
        """Organ id -> per-row flags (the ensemble file's members predict every organ;
        `NativeLabelMaps.available`)."""
        if self._imported is None:
            return None
        n = len(self._probs)
        return {o: [True] * n + flags for o, flags in self._imported.available.items()}

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, NUM_ORGANS + 1))

    def __len__(self) -> int:
        return NUM_ORGANS


class EnsemblePipeline:
    """The whole ensemble method for one CT; construct once, call per volume."""

    def __init__(
        self,
        ensemble_cfg_path_or_version: str,
        device: str = "cpu",
        *,
        autocast: str | None = None,
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        foreground_crop: ForegroundCrop | bool | None = None,
        attention_mode: str | None = None,
        imported: Sequence[str] = (),
        models_state_dir: str | Path = "",
        imported_triton_url: str | None = None,
        imported_network: Callable[[str], Any] | None = None,
    ) -> None:
        """``autocast`` (``none``/``bf16``), ``sw_batch_size``, ``overlap``,
        ``foreground_crop`` (a `ForegroundCrop`, True = defaults, False = off) and
        ``attention_mode`` (a registered ranking strategy's name,
        `atlasflow.method.strategy.strategy_names`) override the ensemble file; None keeps the
        file's setting.

        ``imported``: registered models of ``models_state_dir`` (`atlasflow.models.registry`)
        added as members (`_imported_grid`); their networks run on the Triton at
        ``imported_triton_url`` (model `atlasflow.models.export.triton_model_name`, e.g. the
        server this pipeline is bound in), or what ``imported_network`` makes of that model
        name (a stock Triton's Python backend: `atlasflow.segmentation.model_serving.BlsNetwork`),
        or in this process when both are None."""
        config: EnsembleConfig = load_ensemble(ensemble_cfg_path_or_version)
        if attention_mode is not None:
            if attention_mode not in strategy_names():
                raise InvalidArgument(
                    "INVALID_ENSEMBLE_CONFIG", f"attention mode must be one of {strategy_names()}", domain=DOMAIN
                )
            config = dataclasses.replace(config, attention_mode=attention_mode)
        if autocast is not None:
            if autocast not in AUTOCAST:
                raise InvalidArgument("INVALID_ENSEMBLE_CONFIG", f"autocast must be one of {AUTOCAST}", domain=DOMAIN)
            config = dataclasses.replace(config, autocast=autocast)
        if foreground_crop is not None:
            crop = ForegroundCrop() if foreground_crop is True else (foreground_crop or None)
            config = dataclasses.replace(config, foreground_crop=crop)
        if sw_batch_size is not None or overlap is not None:
            members = []
            for m in config.members:
                pre = m.preprocessing
                pre = dataclasses.replace(
                    pre,
                    sw_batch_size=int(sw_batch_size) if sw_batch_size is not None else pre.sw_batch_size,
                    overlap=float(overlap) if overlap is not None else pre.overlap,
                )
                members.append(dataclasses.replace(m, preprocessing=pre))
            config = dataclasses.replace(config, members=tuple(members))
        self.config = config
        self.device = torch.device(device)
        self.members: list[tuple[MemberConfig, torch.nn.Module]] = [
            (m, load_member(m, self.device)) for m in self.config.members
        ]
        self.weights_trained: bool = self.config.weights_trained
        self._prior: PopulationPrior | None = None
        if imported_triton_url and imported_network is None:
            from atlasflow.segmentation.model_serving import TritonNetwork

            url = imported_triton_url

            def imported_network(model_name: str) -> Any:
                return TritonNetwork(url, model_name)

        self.imported: list[tuple[ImportedMember, Any]] = self._load_imported(
            imported, models_state_dir, imported_network
        )

    def _load_imported(
        self, names: Sequence[str], state_dir: str | Path, make_network: Callable[[str], Any] | None
    ) -> list[tuple[ImportedMember, Any]]:
        """The imported members, each with its model (`atlasflow.models.segment.load_model`:
        the same pre/post-processing and tiling as ``atlasflow segment``)."""
        if not names:
            return []
        from atlasflow.models.export import triton_model_name as served_name
        from atlasflow.models.registry import ModelRegistry
        from atlasflow.models.segment import load_model

        registry = ModelRegistry(state_dir)
        out: list[tuple[ImportedMember, Any]] = []
        for name in names:
            network = make_network(served_name(registry.get(name))) if make_network is not None else None
            model = load_model(state_dir, name, device=str(self.device), network=network)
            out.append((ImportedMember(name, model.manifest.digest), model))
        return out

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def model_name(self) -> str:
        """The Triton model name of this pipeline: the ensemble's, with the imported members'
        digest appended when there are any (`atlasflow.segmentation.imported.served_model_name`)."""
        return served_model_name(triton_model_name(self.version), [m for m, _ in self.imported])

    @property
    def attention_mode(self) -> str:
        """The name of the ensemble's ranking strategy (``reference``, ``enhanced``, ...)."""
        return self.config.attention_mode

    @property
    def strategy(self) -> RankingStrategy:
        """The ensemble's ranking strategy (`EnsembleConfig.strategy`)."""
        return self.config.strategy

    # -- input checks -------------------------------------------------------------------
    @staticmethod
    def _check(
        volume_hu: np.ndarray, affine: np.ndarray, labelled: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        vol = np.asarray(volume_hu)
        if vol.ndim != 3 or min(vol.shape) < 1 or not np.issubdtype(vol.dtype, np.number):
            raise InvalidArgument("INVALID_VOLUME", "volume must be a non-empty numeric (X, Y, Z) array", domain=DOMAIN)
        aff = np.asarray(affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise InvalidArgument("INVALID_AFFINE", "affine must be a finite, invertible 4x4 matrix", domain=DOMAIN)
        if labelled is None:
            flags = np.zeros(NUM_ORGANS, dtype=np.uint8)
        else:
            flags = np.asarray(labelled).astype(np.uint8).reshape(-1)
            if flags.shape != (NUM_ORGANS,) or flags.max(initial=0) > 1:
                raise InvalidArgument(
                    "INVALID_LABELLED_ORGANS",
                    "labelled_organs must be 9 flags (0/1), flag k = organ id k+1",
                    domain=DOMAIN,
                )
        return vol, aff, flags

    # -- member inference ---------------------------------------------------------------
    def _member_probs(self, member: MemberConfig, net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """``image`` (1, 1, X', Y', Z') on the model grid -> (9, X', Y', Z') float16 probabilities."""
        from monai.inferers.utils import sliding_window_inference

        pre = member.preprocessing
        bf16 = self.config.autocast == "bf16"
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = sliding_window_inference(
                image,
                roi_size=pre.patch_size,
                sw_batch_size=pre.sw_batch_size,
                predictor=net,
                overlap=pre.overlap,
                mode="gaussian",
                device=self.device,
                sw_device=self.device,
            )
            assert isinstance(logits, torch.Tensor)  # the members return one tensor, not a tuple or dict
            if bf16:
                logits = logits.float()
            if member.activation == "softmax":
                probs = torch.softmax(logits[0], dim=0)[1:]
            else:
                probs = torch.sigmoid(logits[0])
        return probs.to(torch.float16)

    def __call__(
        self, volume_hu: np.ndarray, affine: np.ndarray, labelled_organs: np.ndarray | None = None
    ) -> PipelineOutput:
        """Segment one CT.

        ``volume_hu``: ``(X, Y, Z)`` HU (int16 expected); ``affine``: 4x4 voxel -> RAS mm;
        ``labelled_organs``: optional ``(9,)`` 0/1 flags (flag k = organ id k+1) of organs the
        case's source already labels (no attention for them; see `labelled_flags`).
        """
        vol, aff, flags = self._check(volume_hu, affine, labelled_organs)
        t0 = time.perf_counter()
        imported_timings: dict[str, float] = {}
        extra = self._imported_grid(vol, aff, imported_timings)
        t1 = time.perf_counter()
        box, sub_aff = self._crop_box(vol, aff)
        if box is None:
            out = self._segment(vol, aff, flags, extra)
            out.timings_s.update(imported_timings)
            out.timings_s["total"] = time.perf_counter() - t0
            return out
        t_crop = time.perf_counter() - t1
        if extra is not None:
            extra = extra.crop(box)
        sub = self._segment(np.ascontiguousarray(vol[box]), sub_aff, flags, extra)
        labels = np.zeros(vol.shape, dtype=np.uint8)
        heat = np.zeros(vol.shape, dtype=np.uint8)
        labels[box] = sub.labels
        heat[box] = sub.heatmap
        timings = {**sub.timings_s, **imported_timings}
        timings["foreground_crop"] = t_crop
        timings["total"] = time.perf_counter() - t0
        return PipelineOutput(labels, heat, sub.organ_stats, sub.weights_trained, timings)

    def imported_outputs(self, vol: np.ndarray, aff: np.ndarray, timings: dict[str, float]) -> list[MemberOutput]:
        """Each imported member on the whole native CT, exactly as ``atlasflow segment`` runs
        it (its own pre-processing, tiling and post-processing; the network on Triton): a
        label map of its own label ids on the CT's grid. Adds ``infer_<name>`` timings."""
        spacing = [float(v) for v in np.linalg.norm(aff[:3, :3], axis=0)]
        outs = []
        for member, model in self.imported:
            ts = time.perf_counter()
            if getattr(model, "needs_affine", False):
                label_map = model(vol, spacing, affine=aff)
            else:
                label_map = model(vol, spacing)
            timings[f"infer_{member.name}"] = time.perf_counter() - ts
            outs.append(MemberOutput(member.label, dict(model.manifest.labels), aff, label_map=label_map))
        return outs

    def _imported_grid(self, vol: np.ndarray, aff: np.ndarray, timings: dict[str, float]) -> NativeLabelMaps | None:
        """The imported members' label maps on the case grid, mapped by organ name
        (`heterogeneous.native_label_maps`: the planes of `common_grid`, 255 inside / 0
        outside, made per organ when asked for; ``available`` False for an organ a member does
        not predict); None without imported members."""
        if not self.imported:
            return None
        outs = self.imported_outputs(vol, aff, timings)
        ts = time.perf_counter()
        grid = native_label_maps(outs, aff, (int(vol.shape[0]), int(vol.shape[1]), int(vol.shape[2])))
        timings["imported_to_grid"] = time.perf_counter() - ts
        return grid

    def _crop_box(self, vol: np.ndarray, aff: np.ndarray) -> tuple[tuple[slice, slice, slice] | None, np.ndarray]:
        """The configured foreground crop's box and the affine of the cropped grid, or
        ``(None, aff)`` when there is no crop (off, nothing above the threshold, or the whole
        volume)."""
        crop = self.config.foreground_crop
        if crop is None:
            return None, aff
        box = foreground_box(vol, aff, crop)
        if box is None or all(b.start == 0 and b.stop == n for b, n in zip(box, vol.shape)):
            return None, aff
        sub_aff = aff.copy()
        sub_aff[:3, 3] = aff[:3, :3] @ np.array([b.start for b in box], dtype=np.float64) + aff[:3, 3]
        return box, sub_aff

    def _model_grid_probs(
        self, hu: torch.Tensor, aff: np.ndarray, timings: dict[str, float]
    ) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Steps 1-2: ``hu`` ``(X, Y, Z)`` on ``device`` -> per member (``(9, X', Y', Z')``
        float16 probabilities on its model grid, that grid's affine). Adds stage timings."""
        prepared: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
        member_probs: list[tuple[torch.Tensor, np.ndarray]] = []
        for member, net in self.members:
            pre = member.preprocessing
            key = (pre.target_spacing_mm, pre.hu_window)
            if key not in prepared:
                ts = time.perf_counter()
                image, g_aff = preprocess(hu, aff, pre)
                prepared[key] = (image[None], g_aff)
                timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - ts
            image, g_aff = prepared[key]
            ts = time.perf_counter()
            member_probs.append((self._member_probs(member, net, image), g_aff))
            timings[f"infer_{member.name}"] = time.perf_counter() - ts
        return member_probs

    def _native_u8(
        self, member_probs: list[tuple[torch.Tensor, np.ndarray]], k: int, aff: np.ndarray, shape: tuple[int, int, int]
    ) -> torch.Tensor:
        """Step 3's start: organ row ``k`` (id ``k + 1``) of every member, sampled back onto the
        native grid -> ``(M, X, Y, Z)`` uint8 ``round(p*255)`` on ``device``."""
        u8 = torch.empty((len(member_probs), *shape), dtype=torch.uint8, device=self.device)
        for m, (probs, g_aff) in enumerate(member_probs):
            p = resample(probs[k : k + 1].to(torch.float32), g_aff, aff, shape)[0]
            u8[m] = (p.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
            del p
        return u8

    def soft_predictions(self, volume_hu: np.ndarray, affine: np.ndarray) -> dict[int, torch.Tensor]:
        """The members' soft predictions on the native grid, exactly as the pipeline's
        attention sees them: organ id 1..9 -> uint8 ``(M, X, Y, Z)`` ``round(p*255)`` (CPU),
        zeros outside the foreground crop when one is configured. For inspection and tests
        (9*M full volumes of memory); `__call__` never materialises them all."""
        vol, aff, _ = self._check(volume_hu, affine, None)
        box, sub_aff = self._crop_box(vol, aff)
        sub = vol if box is None else np.ascontiguousarray(vol[box])
        hu = torch.from_numpy(np.ascontiguousarray(sub)).to(self.device)
        member_probs = self._model_grid_probs(hu, sub_aff, {})
        shape = (int(sub.shape[0]), int(sub.shape[1]), int(sub.shape[2]))
        out: dict[int, torch.Tensor] = {}
        for k in range(NUM_ORGANS):
            u8 = self._native_u8(member_probs, k, sub_aff, shape).cpu()
            if box is not None:
                full = torch.zeros((u8.shape[0], *vol.shape), dtype=torch.uint8)
                full[(slice(None), *box)] = u8
                u8 = full
            out[k + 1] = u8
        return out

    def _segment(
        self, vol: np.ndarray, aff: np.ndarray, flags: np.ndarray, extra: NativeLabelMaps | None = None
    ) -> PipelineOutput:
        """`__call__` without checks and cropping (arguments already validated). ``extra``:
        the imported members' organs on this grid: per organ, the rows of the members that
        predict it join the stack (vote and attention over the members with an opinion)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        shape = (int(vol.shape[0]), int(vol.shape[1]), int(vol.shape[2]))
        voxel_ml = abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0
        hu = torch.from_numpy(np.ascontiguousarray(vol)).to(self.device)

        # 1-2. preprocess (cached per spacing/window) + members on their model grids
        member_probs = self._model_grid_probs(hu, aff, timings)

        # 3. per organ: back to native grid, member + ensemble masks, overlap resolution
        ts = time.perf_counter()
        labels = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        best = torch.zeros(shape, dtype=torch.int16, device=self.device)
        # with imported members the organs' stacks differ in height: compare means, i.e.
        # sum_a * n_b > sum_b * n_a (exact integers); best_n = the stack height of `best`
        best_n = torch.ones(shape, dtype=torch.int16, device=self.device) if extra is not None else None
        mask_count = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        stats = np.zeros((NUM_ORGANS, len(STATS_COLUMNS)), dtype=np.float64)
        work: dict[int, _OrganWork] = {}
        strategy = self.config.strategy
        whole_case = strategy.needs_whole_case
        for k in range(NUM_ORGANS):
            u8 = self._native_u8(member_probs, k, aff, shape)
            if extra is not None:
                u8 = torch.cat([u8, extra.planes(k + 1, only_available=True).to(self.device)])
            n_models = int(u8.shape[0])
            ens_sum = u8.sum(dim=0, dtype=torch.int16)
            ens_mask, n_comp = largest_component(ens_sum.to(torch.int32) * 2 > 255 * n_models)
            stats[k, 3] = n_comp
            mask_count += ens_mask.to(torch.uint8)
            if best_n is None:
                take = ens_mask & ((labels == 0) | (ens_sum > best))
            else:
                better = ens_sum.to(torch.int32) * best_n.to(torch.int32) > best.to(torch.int32) * n_models
                take = ens_mask & ((labels == 0) | better)
                best_n[take] = n_models
            labels[take] = k + 1
            best[take] = ens_sum[take]
            if whole_case:  # the strategy takes it from here (step 4)
                del u8, ens_sum
                continue
            if flags[k]:
                continue  # source labels this organ: no attention
            boxes = [bounding_box(ens_mask)] + [keep_own_component(u8[m]) for m in range(n_models)]
            box = union_box(boxes)
            if box is None:
                work[k] = _OrganWork(None, None, None)
            else:
                work[k] = _OrganWork(box, u8[(slice(None), *box)].clone(), ens_mask[box].clone())
            del u8, ens_sum
        del best
        if not whole_case:
            del member_probs
        timings["native_masks"] = time.perf_counter() - ts

        # 4. attention for unlabelled organs
        ts = time.perf_counter()
        heat = torch.zeros(shape, dtype=torch.float32, device=self.device)
        if whole_case:
            if self._prior is None:
                self._prior = PopulationPrior.load()  # bundled; the strategy scores findings with it
            stacks = _NativeStacks(self, member_probs, aff, shape, extra)
            organs = strategy_attention(
                stacks,
                aff,
                [k + 1 for k in range(NUM_ORGANS) if flags[k]],
                strategy=strategy,
                prior=self._prior,
                available=stacks.available(),
            )
            del member_probs
            for organ, o in organs.items():
                stats[organ - 1, 1] = float(o.attention.sum()) * voxel_ml
                stats[organ - 1, 2] = float(o.heatmap.sum(dtype=np.float64)) * voxel_ml
                heat[o.box] = torch.maximum(heat[o.box], torch.from_numpy(o.heatmap).to(self.device))
        for k, w in work.items():
            if w.box is None or w.masked_u8 is None or w.ensemble_mask is None:
                continue
            overlap = w.ensemble_mask & (mask_count[w.box] >= 2)
            att = organ_attention(w.masked_u8, overlap)
            stats[k, 1] = float(att.attention.sum()) * voxel_ml
            stats[k, 2] = float(att.heatmap.sum(dtype=torch.float64)) * voxel_ml
            heat[w.box] = torch.maximum(heat[w.box], att.heatmap)
        timings["attention"] = time.perf_counter() - ts

        counts = torch.bincount(labels.reshape(-1).to(torch.int64), minlength=NUM_ORGANS + 1).cpu().numpy()
        stats[:, 0] = counts[1 : NUM_ORGANS + 1] * voxel_ml
        heat_u8 = (heat.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
        timings["total"] = time.perf_counter() - t0
        return PipelineOutput(
            labels=labels.cpu().numpy(),
            heatmap=heat_u8.cpu().numpy(),
            organ_stats=stats,
            weights_trained=self.weights_trained,
            timings_s=timings,
        )


def ensemble_path(version: str) -> Path:
    """Path of a shipped ensemble file (``ensembles/<version>.json``)."""
    cfg = load_ensemble(version)
    assert cfg.source is not None
    return cfg.source
