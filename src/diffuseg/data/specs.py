"""Dataset specifications: class names, palettes, label mappings and the standard protocol splits.

One place for the facts every method and evaluation needs about the public benchmarks, so that a
zero-shot split or a coarse mapping is never re-typed (and mistyped) in a script. Class order is
the order of the label ids our converted datasets use (see :mod:`diffuseg.data.converters`).

Sources of the protocols:

* PASCAL VOC 2012: 21 classes with background. ZS3Net (Bucher et al., 2019) unseen splits of
  2/4/6/8/10 classes, each extending the previous one; ZS3D's unseen set {aeroplane, cat, cow,
  motorbike}.
* PASCAL-5i (OSLSM / PFENet / HSNet): fold ``i`` holds VOC classes ``5i+1 .. 5i+5``.
* COCO-20i: the **interleaved** split used by PFENet (``use_split_coco=True``) and HSNet: fold ``i``
  holds COCO classes ``{4k + i + 1 : k = 0..19}`` (1-based over the 80 thing classes), not the
  consecutive blocks of the original FWB split.
* Cityscapes: the 19 ``trainId`` classes; DiffSeg/STEGO's 27-class variant maps ``labelId``
  7..33 to 0..26 and ignores 0..6 (and the license plate, -1).
* COCO-Stuff-27: STEGO's (and DiffSeg's) 182 -> 27 coarse mapping of the stuffthingmaps ids
  (0-based: 0..90 things incl. unused ids, 91..181 stuff; 255 unlabelled).
* ADE20K-150 and Pascal-Context-59: mmsegmentation's class order; both reduce the zero label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from diffuseg.data.fashion_scenes import (
    FASHION_SCENES_CLASSES,
    FASHION_SCENES_COARSE_GROUPS,
    FASHION_SCENES_UNSEEN,
)
from diffuseg.io import default_palette

IGNORE_INDEX = 255


@dataclass(frozen=True)
class DatasetSpec:
    """Everything a benchmark protocol needs to know about one dataset.

    Attributes:
        name: registry key.
        classes: class names in label-id order (after any ``label_map``/``reduce_zero_label``).
        palette: one RGB triple per class, for visualisation.
        ignore_index: label id that never counts (255 everywhere here).
        reduce_zero_label: whether the *official* annotations need mmseg's zero reduction
            (0 -> ignore, k -> k-1) to index ``classes``; converted folders are already reduced.
        label_map: raw official id -> our class id for datasets whose official ids differ
            (Cityscapes labelIds, COCO-Stuff 182); ids absent from the map become ``ignore_index``.
        unseen_splits: named zero-shot splits (unseen class names).
        default_unseen: the key of ``unseen_splits`` written to meta.json by converters.
        folds: few-shot folds (tuples of class names), e.g. PASCAL-5i.
        coarse_groups: coarse group name -> member classes (FashionScenes).
        description: one line for ``diffuseg data`` help and docs.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False
    label_map: dict[int, int] | None = None
    unseen_splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_unseen: str | None = None
    folds: tuple[tuple[str, ...], ...] = ()
    coarse_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{self.name}: duplicate class names")
        if len(self.palette) != len(self.classes):
            raise ValueError(
                f"{self.name}: {len(self.palette)} palette colours for {len(self.classes)} classes"
            )
        known = set(self.classes)
        for key, names in [*self.unseen_splits.items(), *((f"fold{i}", f) for i, f in enumerate(self.folds))]:
            bad = [n for n in names if n not in known]
            if bad:
                raise ValueError(f"{self.name}: split {key} names unknown classes {bad}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_index(self, name: str) -> int:
        """Label id of ``name``; ValueError listing the classes when it is unknown."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise ValueError(
                f"{self.name} has no class {name!r}; classes: {', '.join(self.classes)}"
            ) from None

    def unseen(self, split: str | None = None) -> tuple[str, ...]:
        """Unseen class names of a named zero-shot split (default: ``default_unseen``)."""
        key = split or self.default_unseen
        if key is None:
            return ()
        if key not in self.unseen_splits:
            raise ValueError(
                f"{self.name}: unknown unseen split {key!r}; known: {sorted(self.unseen_splits)}"
            )
        return self.unseen_splits[key]

    def fold(self, i: int) -> tuple[str, ...]:
        """Novel classes of few-shot fold ``i``."""
        if not self.folds:
            raise ValueError(f"{self.name} defines no folds")
        if not 0 <= i < len(self.folds):
            raise ValueError(f"{self.name}: fold {i} out of range 0..{len(self.folds) - 1}")
        return self.folds[i]

    def meta(self, unseen_split: str | None = None) -> dict:
        """meta.json content (DESIGN.md data contract) for a folder holding this dataset."""
        meta = {
            "name": self.name,
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            "unseen": list(self.unseen(unseen_split)),
            "ignore_index": self.ignore_index,
        }
        if self.coarse_groups:
            meta["coarse_groups"] = {k: list(v) for k, v in self.coarse_groups.items()}
        return meta


def _pal(n: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(c) for c in default_palette(n))  # type: ignore[misc]


# --- PASCAL VOC 2012 -----------------------------------------------------------------------------
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# ZS3Net: each split adds two classes to the previous one.
_ZS3NET_STEPS = (
    ("cow", "motorbike"),
    ("aeroplane", "sofa"),
    ("cat", "tvmonitor"),
    ("train", "bottle"),
    ("chair", "pottedplant"),
)
VOC_UNSEEN_SPLITS: dict[str, tuple[str, ...]] = {
    f"zs3net-{2 * (k + 1)}": tuple(c for step in _ZS3NET_STEPS[: k + 1] for c in step) for k in range(5)
}
VOC_UNSEEN_SPLITS["zs3d"] = ("aeroplane", "cat", "cow", "motorbike")

PASCAL_5I_FOLDS = tuple(tuple(VOC_CLASSES[5 * i + 1 : 5 * i + 6]) for i in range(4))

# --- COCO (80 thing classes, contiguous order) ---------------------------------------------------
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# Interleaved COCO-20i (PFENet use_split_coco / HSNet): fold i = 1-based ids 4k + i + 1.
COCO_20I_FOLDS = tuple(tuple(COCO_CLASSES[4 * k + i] for k in range(20)) for i in range(4))

# --- Cityscapes ----------------------------------------------------------------------------------
# (labelId, name, trainId or None, colour) for ids 0..33, from the official label definition.
_CITYSCAPES_LABELS = (
    (0, "unlabeled", None, (0, 0, 0)),
    (1, "ego vehicle", None, (0, 0, 0)),
    (2, "rectification border", None, (0, 0, 0)),
    (3, "out of roi", None, (0, 0, 0)),
    (4, "static", None, (0, 0, 0)),
    (5, "dynamic", None, (111, 74, 0)),
    (6, "ground", None, (81, 0, 81)),
    (7, "road", 0, (128, 64, 128)),
    (8, "sidewalk", 1, (244, 35, 232)),
    (9, "parking", None, (250, 170, 160)),
    (10, "rail track", None, (230, 150, 140)),
    (11, "building", 2, (70, 70, 70)),
    (12, "wall", 3, (102, 102, 156)),
    (13, "fence", 4, (190, 153, 153)),
    (14, "guard rail", None, (180, 165, 180)),
    (15, "bridge", None, (150, 100, 100)),
    (16, "tunnel", None, (150, 120, 90)),
    (17, "pole", 5, (153, 153, 153)),
    (18, "polegroup", None, (153, 153, 153)),
    (19, "traffic light", 6, (250, 170, 30)),
    (20, "traffic sign", 7, (220, 220, 0)),
    (21, "vegetation", 8, (107, 142, 35)),
    (22, "terrain", 9, (152, 251, 152)),
    (23, "sky", 10, (70, 130, 180)),
    (24, "person", 11, (220, 20, 60)),
    (25, "rider", 12, (255, 0, 0)),
    (26, "car", 13, (0, 0, 142)),
    (27, "truck", 14, (0, 0, 70)),
    (28, "bus", 15, (0, 60, 100)),
    (29, "caravan", None, (0, 0, 90)),
    (30, "trailer", None, (0, 0, 110)),
    (31, "train", 16, (0, 80, 100)),
    (32, "motorcycle", 17, (0, 0, 230)),
    (33, "bicycle", 18, (119, 11, 32)),
)
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {i: t for i, _, t, _ in _CITYSCAPES_LABELS if t is not None}
_cs19 = sorted((t, n, c) for _, n, t, c in _CITYSCAPES_LABELS if t is not None)
CITYSCAPES_CLASSES = tuple(n for _, n, _ in _cs19)
CITYSCAPES_PALETTE = tuple(c for _, _, c in _cs19)
CITYSCAPES_27_LABELID_MAP: dict[int, int] = {i: i - 7 for i in range(7, 34)}
CITYSCAPES_27_CLASSES = tuple(n for i, n, _, _ in _CITYSCAPES_LABELS if i >= 7)
CITYSCAPES_27_PALETTE = tuple(c for i, _, _, c in _CITYSCAPES_LABELS if i >= 7)

# --- COCO-Stuff-27 -------------------------------------------------------------------------------
# Coarse classes in STEGO's order: 12 thing supercategories, then 15 stuff supercategories. STEGO
# names two of them twice ("food", "furniture"); the stuff ones get a "-stuff" suffix here so that
# class names stay unique keys.
COCO_STUFF_27_CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
# stuffthingmaps id (0..181) -> coarse id (0..26); 255 (unlabelled) stays ignored.
COCO_STUFF_182_TO_27: dict[int, int] = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8, 12: 8,
    13: 8, 14: 8, 15: 7, 16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7, 24: 7,
    25: 6, 26: 6, 27: 6, 28: 6, 29: 6, 30: 6, 31: 6, 32: 6, 33: 10, 34: 10, 35: 10, 36: 10,
    37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10, 43: 5, 44: 5, 45: 5, 46: 5, 47: 5, 48: 5,
    49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2, 58: 2, 59: 2, 60: 2,
    61: 3, 62: 3, 63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0, 72: 0,
    73: 0, 74: 0, 75: 0, 76: 0, 77: 1, 78: 1, 79: 1, 80: 1, 81: 1, 82: 1, 83: 4, 84: 4,
    85: 4, 86: 4, 87: 4, 88: 4, 89: 4, 90: 4, 91: 17, 92: 17, 93: 22, 94: 20, 95: 20, 96: 22,
    97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12, 103: 17, 104: 17, 105: 23, 106: 15,
    107: 15, 108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 113: 13, 114: 13, 115: 13, 116: 13,
    117: 13, 118: 22, 119: 26, 120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24,
    127: 20, 128: 22, 129: 15, 130: 17, 131: 16, 132: 15, 133: 22, 134: 24, 135: 21, 136: 17,
    137: 25, 138: 16, 139: 21, 140: 17, 141: 22, 142: 16, 143: 21, 144: 21, 145: 25, 146: 21,
    147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21, 154: 26, 155: 15, 156: 23,
    157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20, 166: 17,
    167: 17, 168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18,
    177: 26, 178: 26, 179: 19, 180: 19, 181: 24,
}  # fmt: skip

# --- ADE20K-150 (mmsegmentation order; official id k+1 -> class k) ------------------------------
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

# --- Pascal-Context-59 (mmsegmentation's converted ids 1..59 -> class 0..58) ----------------------
PASCAL_CONTEXT_59_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain",
    "mouse", "curtain", "platform", "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky",
    "snow", "bedclothes", "track", "tree", "truck", "wall", "water", "window", "wood",
)  # fmt: skip


def _build_registry() -> dict[str, DatasetSpec]:
    voc_pal = _pal(len(VOC_CLASSES))
    specs = [
        DatasetSpec(
            "voc2012", VOC_CLASSES, voc_pal, unseen_splits=VOC_UNSEEN_SPLITS, default_unseen="zs3d",
            description="PASCAL VOC 2012 semantic segmentation, 21 classes incl. background",
        ),
        DatasetSpec(
            "pascal-5i", VOC_CLASSES, voc_pal, folds=PASCAL_5I_FOLDS,
            description="PASCAL-5i few-shot folds: fold i = VOC classes 5i+1..5i+5",
        ),
        DatasetSpec(
            "coco-20i", ("background", *COCO_CLASSES), _pal(81), folds=COCO_20I_FOLDS,
            description="COCO-20i, interleaved folds (PFENet/HSNet): fold i = classes 4k+i+1",
        ),
        DatasetSpec(
            "cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, label_map=CITYSCAPES_LABELID_TO_TRAINID,
            unseen_splits={"zs3d": ("bus", "person", "sidewalk")}, default_unseen="zs3d",
            description="Cityscapes fine, 19 trainId classes",
        ),
        DatasetSpec(
            "cityscapes-27", CITYSCAPES_27_CLASSES, CITYSCAPES_27_PALETTE,
            label_map=CITYSCAPES_27_LABELID_MAP,
            description="Cityscapes fine, 27 classes (labelIds 7..33), DiffSeg/STEGO protocol",
        ),
        DatasetSpec(
            "coco-stuff-27", COCO_STUFF_27_CLASSES, _pal(27), label_map=COCO_STUFF_182_TO_27,
            description="COCO-Stuff with STEGO's 182->27 coarse mapping (DiffSeg protocol)",
        ),
        DatasetSpec(
            "ade20k", ADE20K_CLASSES, _pal(151)[1:], reduce_zero_label=True,
            description="ADE20K SceneParsing, 150 classes (0 = other, ignored)",
        ),
        DatasetSpec(
            "pascal-context-59", PASCAL_CONTEXT_59_CLASSES, _pal(60)[1:], reduce_zero_label=True,
            description="Pascal-Context, 59 classes (mmseg conversion; 0 = background, ignored)",
        ),
        DatasetSpec(
            "fashion-scenes", FASHION_SCENES_CLASSES, _pal(len(FASHION_SCENES_CLASSES)),
            unseen_splits={"default": FASHION_SCENES_UNSEEN}, default_unseen="default",
            coarse_groups=FASHION_SCENES_COARSE_GROUPS,
            description="FashionScenes, the embedded benchmark (diffuseg data fashion-scenes)",
        ),
    ]  # fmt: skip
    return {s.name: s for s in specs}


DATASET_SPECS: dict[str, DatasetSpec] = _build_registry()

_ALIASES = {
    "voc": "voc2012",
    "pascalvoc": "voc2012",
    "pascal-voc": "voc2012",
    "pascal-voc-2012": "voc2012",
    "pascal5i": "pascal-5i",
    "coco20i": "coco-20i",
    "cityscapes-19": "cityscapes",
    "cocostuff27": "coco-stuff-27",
    "cocostuff": "coco-stuff-27",
    "coco-stuff": "coco-stuff-27",
    "ade20k-150": "ade20k",
    "ade": "ade20k",
    "pascal-context": "pascal-context-59",
    "pc59": "pascal-context-59",
    "fashionscenes": "fashion-scenes",
}


def normalize_dataset_name(name: str) -> str:
    """Registry key for ``name``: case-insensitive, ``_``/space as ``-``, common aliases accepted."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    if key in DATASET_SPECS:
        return key
    compact = key.replace("-", "")
    by_compact = {k.replace("-", ""): k for k in DATASET_SPECS}
    return _ALIASES.get(key) or _ALIASES.get(compact) or by_compact.get(compact, key)


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look up a dataset spec; ValueError listing the known names when ``name`` is unknown."""
    key = normalize_dataset_name(name)
    if key not in DATASET_SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASET_SPECS))}")
    return DATASET_SPECS[key]
