"""Evaluation tools: 2.5D FID, tumour fidelity, sample diversity, QC rate, and a tumour segmenter.

Each tool is a function over numpy volumes (or NIfTI paths) returning a dataclass with
``to_dict()`` and ``summary()``; `maisi2 evaluate ...` (maisi2.cli.evaluate_cmd) is a thin layer
over them. Definitions and which numbers are comparable with the paper's: docs/evaluation.md.
"""

from maisi2.evaluate.diversity import DiversityResult, diversity, ms_ssim, ms_ssim_settings
from maisi2.evaluate.features import HUTextureFeatures, ResNet50Features, load_resnet50
from maisi2.evaluate.fid import FeatureStats, FIDResult, SetStats, fid, fid_from_stats, frechet_distance, volume_set_stats
from maisi2.evaluate.fidelity import FidelityResult, fidelity, fidelity_files, tumor_contrasts
from maisi2.evaluate.inputs import collect_pairs, collect_volumes
from maisi2.evaluate.qcrate import QCRateResult, qc_rate, qc_rate_files
from maisi2.evaluate.seg import (
    SegmenterConfig,
    SegmenterTrainSettings,
    dice_score,
    load_segmenter,
    segment,
    train_segmenter,
)

__all__ = [
    "fid", "fid_from_stats", "frechet_distance", "volume_set_stats", "FeatureStats", "SetStats", "FIDResult",
    "HUTextureFeatures", "ResNet50Features", "load_resnet50",
    "fidelity", "fidelity_files", "tumor_contrasts", "FidelityResult",
    "diversity", "ms_ssim", "ms_ssim_settings", "DiversityResult",
    "qc_rate", "qc_rate_files", "QCRateResult",
    "SegmenterConfig", "SegmenterTrainSettings", "train_segmenter", "load_segmenter", "segment", "dice_score",
    "collect_pairs", "collect_volumes",
]
