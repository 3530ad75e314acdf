"""Dataset spec registry: class counts, mappings and protocol splits."""

from __future__ import annotations

import pytest

from diffuseg.data.specs import (
    COCO_STUFF_182_TO_27,
    DATASET_SPECS,
    get_dataset_spec,
)


@pytest.mark.parametrize(
    ("name", "n"),
    [
        ("voc2012", 21),
        ("pascal-5i", 21),
        ("coco-20i", 81),
        ("cityscapes", 19),
        ("cityscapes-27", 27),
        ("coco-stuff-27", 27),
        ("ade20k", 150),
        ("pascal-context-59", 59),
        ("fashion-scenes", 11),
    ],
)
def test_class_counts_and_palettes(name: str, n: int) -> None:
    spec = get_dataset_spec(name)
    assert spec.num_classes == n and len(spec.palette) == n
    assert len(set(spec.classes)) == n
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in spec.palette)
    assert spec.ignore_index == 255
    meta = spec.meta()
    assert meta["classes"] == list(spec.classes) and meta["ignore_index"] == 255


def test_voc_zero_shot_splits() -> None:
    voc = get_dataset_spec("PASCAL VOC")
    assert voc.classes[0] == "background" and voc.classes[20] == "tvmonitor"
    assert voc.unseen("zs3d") == ("aeroplane", "cat", "cow", "motorbike")
    assert voc.unseen() == voc.unseen("zs3d")
    sizes = [len(voc.unseen(f"zs3net-{k}")) for k in (2, 4, 6, 8, 10)]
    assert sizes == [2, 4, 6, 8, 10]
    for small, big in zip((2, 4, 6, 8), (4, 6, 8, 10), strict=True):
        assert set(voc.unseen(f"zs3net-{small}")) < set(voc.unseen(f"zs3net-{big}"))
    assert set(voc.unseen("zs3net-10")) == {
        "cow", "motorbike", "aeroplane", "sofa", "cat", "tvmonitor", "train", "bottle", "chair",
        "pottedplant",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unseen split"):
        voc.unseen("nope")


@pytest.mark.parametrize(("name", "folds", "per_fold"), [("pascal-5i", 4, 5), ("coco-20i", 4, 20)])
def test_folds_partition_the_classes(name: str, folds: int, per_fold: int) -> None:
    spec = get_dataset_spec(name)
    assert len(spec.folds) == folds
    all_names = [c for f in spec.folds for c in f]
    assert all(len(f) == per_fold for f in spec.folds)
    assert sorted(all_names) == sorted(spec.classes[1:])


def test_fold_contents() -> None:
    p5 = get_dataset_spec("pascal-5i")
    assert p5.fold(0) == ("aeroplane", "bicycle", "bird", "boat", "bottle")
    assert p5.fold(3) == ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
    coco = get_dataset_spec("coco-20i")
    # interleaved: fold 0 = classes 1, 5, 9, ... ; fold 1 = 2, 6, 10, ...
    assert coco.fold(0)[:3] == ("person", "airplane", "boat")
    assert coco.fold(1)[:3] == ("bicycle", "bus", "traffic light")
    assert [coco.class_index(c) for c in coco.fold(2)] == list(range(3, 81, 4))
    with pytest.raises(ValueError, match="fold 4"):
        coco.fold(4)


def test_cityscapes_mappings() -> None:
    c19, c27 = get_dataset_spec("cityscapes"), get_dataset_spec("cityscapes-27")
    assert c19.label_map[7] == 0 and c19.label_map[33] == 18 and 9 not in c19.label_map
    assert sorted(c19.label_map.values()) == list(range(19))
    assert c19.classes[c19.label_map[26]] == "car"
    assert c27.label_map == {i: i - 7 for i in range(7, 34)}
    assert c27.classes[0] == "road" and c27.classes[2] == "parking" and c27.classes[26] == "bicycle"
    assert c19.unseen() == ("bus", "person", "sidewalk")


def test_coco_stuff_182_to_27() -> None:
    spec = get_dataset_spec("cocostuff27")
    assert spec.label_map is COCO_STUFF_182_TO_27
    assert sorted(COCO_STUFF_182_TO_27) == list(range(182))
    assert set(COCO_STUFF_182_TO_27.values()) == set(range(27))
    # things (0..90) map to the 12 thing groups, stuff (91..181) to the 15 stuff groups
    assert {COCO_STUFF_182_TO_27[i] for i in range(91)} == set(range(12))
    assert {COCO_STUFF_182_TO_27[i] for i in range(91, 182)} == set(range(12, 27))
    names = spec.classes
    assert names[COCO_STUFF_182_TO_27[0]] == "person"
    assert names[COCO_STUFF_182_TO_27[2]] == "vehicle"  # car
    assert names[COCO_STUFF_182_TO_27[15]] == "animal"  # cat
    assert names[COCO_STUFF_182_TO_27[156]] == "sky"  # sky-other
    assert names[COCO_STUFF_182_TO_27[177]] == "water"  # sea


def test_ade_context_fashion() -> None:
    ade = get_dataset_spec("ADE20K")
    assert ade.reduce_zero_label and ade.classes[0] == "wall" and ade.classes[-1] == "flag"
    pc = get_dataset_spec("pc59")
    assert pc.reduce_zero_label and pc.classes[0] == "aeroplane" and pc.classes[-1] == "wood"
    fs = get_dataset_spec("fashion_scenes")
    assert fs.unseen() == ("sandal", "coat")
    assert fs.coarse_groups["footwear"] == ("sandal", "sneaker", "ankle boot")
    assert fs.coarse_groups["tops"] == ("t-shirt", "pullover", "coat", "shirt")
    grouped = [c for g in fs.coarse_groups.values() for c in g]
    assert sorted(grouped) == sorted(fs.classes)


@pytest.mark.parametrize(
    ("alias", "key"),
    [("cityscapes27", "cityscapes-27"), ("coco-stuff27", "coco-stuff-27"), ("Pascal_VOC", "voc2012")],
)
def test_aliases(alias: str, key: str) -> None:
    assert get_dataset_spec(alias).name == key


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="known:"):
        get_dataset_spec("imagenet")
    with pytest.raises(ValueError, match="no class"):
        DATASET_SPECS["voc2012"].class_index("unicorn")
