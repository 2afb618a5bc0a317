"""What is known about each public source: where it is distributed, its licence, how to cite
it, and the folder names it unpacks to (which `curate build` uses to find it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceInfo:
    kind: str
    title: str
    url: str
    licence: str
    citation: str
    #: Folder names as distributed, and common aliases (compared case-insensitively).
    folder_names: tuple[str, ...]


CATALOG: dict[str, SourceInfo] = {s.kind: s for s in (
    SourceInfo(
        "kolektorsdd", "KolektorSDD", "https://www.vicos.si/resources/kolektorsdd/",
        "CC BY-NC-SA 4.0",
        "D. Tabernik, S. Šela, J. Skvarč, D. Skočaj, \"Segmentation-based deep-learning "
        "approach for surface-defect detection\", J. Intelligent Manufacturing 31(3):759-776, "
        "2020.",
        ("KolektorSDD", "KSDD", "KolektorSDD-boxes", "kolektor-sdd")),
    SourceInfo(
        "kolektorsdd2", "KolektorSDD2", "https://www.vicos.si/resources/kolektorsdd2/",
        "CC BY-NC-SA 4.0",
        "J. Božič, D. Tabernik, D. Skočaj, \"Mixed supervision for surface-defect detection: "
        "from weakly to fully supervised learning\", Computers in Industry 129:103459, 2021.",
        ("KolektorSDD2", "KSDD2", "kolektor-sdd2")),
    SourceInfo(
        "mtd", "Magnetic-tile defect (MTD)",
        "https://github.com/abin24/Magnetic-tile-defect-datasets.",
        "none published; the authors ask for citation (research use)",
        "Y. Huang, C. Qiu, K. Yuan, \"Surface defect saliency of magnetic tile\", The Visual "
        "Computer 36(1):85-96, 2020.",
        ("Magnetic-tile-defect-datasets.", "Magnetic-tile-defect-datasets",
         "Magnetic-tile-defect", "MTD", "magnetic-tile")),
    SourceInfo(
        "severstal", "Severstal: Steel Defect Detection (STEEL)",
        "https://www.kaggle.com/c/severstal-steel-defect-detection",
        "Kaggle competition rules (accept them on Kaggle to download)",
        "A. Grishin, BorisV, iBardintsev, inversion, Oleg, \"Severstal: Steel Defect "
        "Detection\", Kaggle, 2019.",
        ("severstal-steel-defect-detection", "severstal", "STEEL", "steel-defect-detection")),
    SourceInfo(
        "casting", "Casting surface defects",
        "no public distribution located; ask the authors",
        "unknown",
        "Q. Wang, S. Gao, L. Xiong, A. Liang, K. Jiang, W. Zhang, \"A casting surface dataset "
        "and benchmark for subtle and confusable defect detection in complex contexts\", IEEE "
        "Sensors Journal, 2024.",
        ("casting", "Casting", "casting-surface", "casting_dataset")),
    SourceInfo(
        "mvtec", "MVTec-AD layout", "https://www.mvtec.com/company/research/datasets/mvtec-ad",
        "as the folder's own dataset says (MVTec AD itself: CC BY-NC-SA 4.0)",
        "P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, \"MVTec AD - a comprehensive "
        "real-world dataset for unsupervised anomaly detection\", CVPR 2019.",
        ("mvtec", "mvtec_anomaly_detection", "mvtec-ad")),
)}
