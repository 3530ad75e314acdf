"""Can an image-text alignment be borrowed offline? EfficientNet-Lite0's ImageNet head vs FashionScenes.

The zero-shot methods here (ESDA, ZS3D, Seg-diffusion) transfer to a novel class only through its
name. The papers read names with CLIP, whose image and text spaces are aligned on 400M pairs; no
such weights exist offline, and our encoders are unaligned (an ImageNet CNN and MiniLM). One
aligned space does exist on disk: the 1000 classifier vectors of EfficientNet-Lite0's ImageNet
head, each tied to a class *name*. This probe asks whether it carries the FashionScenes classes:

* **ridge** (DeViSE-style): a linear map from the MiniLM embedding of an ImageNet class name to
  its classifier vector (+ bias), fitted on the 1000 classes, applied to the ten FashionScenes names;
* **neighbours** (ConSE-style): each FashionScenes name's classifier is the softmax(cos / τ)-weighted
  mix of the ImageNet classifiers whose names are closest in MiniLM space;

each scored as 10-way zero-shot accuracy on the object crops of val scenes (the whole box, and
the box with everything but the object greyed out), beside the majority-class floor and a
supervised linear probe on the same frozen features (5-fold cross-validation): the ceiling of
what the features separate when labels are given. Run from the repository root (≈ 2 min)::

    python benchmarks/alignment_probe.py --data /work/data/fashion_scenes
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import markdown_table, provenance, write_results_section
from diffuseg.eval import load_meta, load_split_samples  # noqa: E402

logger = logging.getLogger("alignment_probe")

SECTION_ID = "alignment-probe"
IMAGENET_CLASSES = Path(__file__).resolve().parent / "data" / "imagenet_classes.tsv"
TEMPLATE = "a photo of a {}."


def load_imagenet_classes(path: Path = IMAGENET_CLASSES) -> list[str]:
    """The 1000 ImageNet class names in index order (all lemmas of each class, comma-separated)."""
    rows = [
        line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if not line.startswith("#")
    ]
    names = [r[1] for r in rows if len(r) == 2]
    if len(names) != 1000:
        raise ValueError(f"{path}: expected 1000 'wnid<TAB>lemmas' rows, found {len(names)}")
    return names


def object_crops(
    data_dir: Path, split: str, num_images: int, min_pixels: int, size: int = 224, masked: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One crop per object (class present with ≥ ``min_pixels``) of the first scenes, resized to ``size``.

    Returns images ``(N, 3, size, size)`` in [-1, 1] and class ids ``(N,)``. ``masked`` greys out
    every pixel of the box that is not the object, so only the object's own shape and shading remain.
    """
    crops, labels = [], []
    for i, sample in enumerate(load_split_samples(data_dir, split)):
        if i >= num_images:
            break
        image, label = sample["image"].astype(np.float32), sample["label"]
        for c in np.unique(label):
            if c in (0, 255) or (label == c).sum() < min_pixels:
                continue
            ys, xs = np.nonzero(label == c)
            box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            crop = image[box].copy()
            if masked:
                crop[label[box] != c] = 127.5
            t = torch.from_numpy(crop).permute(2, 0, 1)[None] / 127.5 - 1.0
            crops.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0])
            labels.append(int(c))
    if not crops:
        raise ValueError(
            f"no object with ≥ {min_pixels} px in the first {num_images} {split} scenes of {data_dir}"
        )
    return torch.stack(crops), torch.tensor(labels)


@torch.no_grad()
def pooled_features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """EfficientNet-Lite's pooled head features ``(N, 1280)``: what its ImageNet classifier reads."""
    from diffuseg.backbones.imagenet import lite_input

    x = lite_input(images)
    return torch.cat(
        [net.extract_features(x[i : i + batch_size]).mean((2, 3)) for i in range(0, len(x), batch_size)]
    )


def ridge_classifiers(
    source_text: torch.Tensor, source_weights: torch.Tensor, target_text: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    """Regress classifier rows from name embeddings (with a bias column) and apply to new names.

    ``source_weights`` is ``(K, D + 1)`` (classifier vector and bias); returns ``(C, D + 1)``.
    """
    xs = torch.cat([source_text, torch.ones(len(source_text), 1)], 1).double()
    xt = torch.cat([target_text, torch.ones(len(target_text), 1)], 1).double()
    a = torch.linalg.solve(
        xs.T @ xs + lam * torch.eye(xs.shape[1], dtype=xs.dtype), xs.T @ source_weights.double()
    )
    return (xt @ a).float()


def neighbour_classifiers(
    source_text: torch.Tensor, source_weights: torch.Tensor, target_text: torch.Tensor, tau: float = 0.05
) -> torch.Tensor:
    """Each new name's classifier: the softmax(cos / τ) mix of the source classifiers (unit-norm text)."""
    mix = (F.normalize(target_text, dim=1) @ F.normalize(source_text, dim=1).T / tau).softmax(1)
    return mix @ source_weights


def accuracy(
    features: torch.Tensor, classifiers: torch.Tensor, labels: torch.Tensor, class_ids: list[int]
) -> float:
    logits = features @ classifiers[:, :-1].T + classifiers[:, -1]
    pred = torch.tensor(class_ids)[logits.argmax(1)]
    return float((pred == labels).float().mean())


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """5-fold cross-validated logistic regression on the frozen features (labels given: a ceiling)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, features.numpy(), labels.numpy(), cv=folds)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="FashionScenes folder")
    p.add_argument("--split", default="val")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--min-pixels", type=int, default=45, help="smallest object cropped (the episodes' rule)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from diffuseg.backbones.encoders import EfficientNetLiteEncoder
    from diffuseg.text import get_text_encoder

    t0 = time.perf_counter()
    classes = load_meta(args.data)["classes"]
    ids = [i for i, c in enumerate(classes) if c != "background"]
    names = [classes[i] for i in ids]
    net = EfficientNetLiteEncoder("efficientnet-lite0", weights="imagenet").net.eval()
    head = torch.cat([net._fc.weight, net._fc.bias[:, None]], 1).detach()  # (1000, 1281)
    inet = load_imagenet_classes()
    text = get_text_encoder("minilm")
    inet_text = text.encode_classes(inet, templates=(TEMPLATE,))
    fashion_text = text.encode_classes(names, templates=(TEMPLATE,))
    zero_shot = {
        "ridge (name → classifier, λ = 1)": ridge_classifiers(inet_text, head, fashion_text, 1.0),
        "neighbours (τ = 0.05)": neighbour_classifiers(inet_text, head, fashion_text, 0.05),
    }
    columns, top_rows = {}, []
    for masked in (False, True):
        crops, labels = object_crops(args.data, args.split, args.num_images, args.min_pixels, masked=masked)
        feats = pooled_features(net, crops)
        col = {k: accuracy(feats, w, labels, ids) for k, w in zero_shot.items()}
        col["floor: majority class"] = float(torch.bincount(labels).max()) / len(labels)
        col["ceiling: supervised linear probe (5-fold CV)"] = linear_probe_accuracy(feats, labels)
        columns["masked" if masked else "box"] = (col, len(labels))
        if not masked:  # what the ImageNet head itself calls each class
            top1 = (feats @ head[:, :-1].T + head[:, -1]).argmax(1)
            for c, name in zip(ids, names, strict=True):
                hits = top1[labels == c]
                vals, counts = torch.unique(hits, return_counts=True)
                order = counts.argsort(descending=True)[:3]
                tops = ", ".join(f"{inet[int(vals[i])].split(',')[0]} ({int(counts[i])})" for i in order)
                near = (
                    F.normalize(fashion_text[ids.index(c)], dim=0) @ F.normalize(inet_text, dim=1).T
                ).topk(3)
                nearest = ", ".join(
                    f"{inet[int(j)].split(',')[0]} ({float(v):.2f})" for v, j in zip(*near, strict=True)
                )
                top_rows.append([name, str(len(hits)), tops, nearest])
    rows = [[k, *(f"{100 * columns[m][0][k]:.1f}" for m in ("box", "masked"))] for k in columns["box"][0]]
    body = "\n".join(
        [
            "## Is there an offline image-text alignment? (EfficientNet-Lite0's ImageNet head)",
            "",
            provenance(threads=args.threads),
            f"- data: `{args.data}` {args.split}, first {args.num_images} scenes, one crop per object "
            f"with ≥ {args.min_pixels} px ({columns['box'][1]} objects), resized to 224 px",
            f"- text: MiniLM, template `{TEMPLATE}`; ImageNet names: `benchmarks/data/imagenet_classes.tsv` "
            "(all lemmas of each class)",
            f"- run time: {time.perf_counter() - t0:.0f} s",
            "",
            "**10-way accuracy (%) on the object crops** (box: the object's bounding box as is; masked: the "
            "box with the scene outside the object greyed out):",
            "",
            markdown_table(["classifier", "box", "masked"], rows),
            "",
            "**What the ImageNet head calls each class** (top-1 over the box crops, count) and the "
            "ImageNet names nearest to the class name in MiniLM space (cosine):",
            "",
            markdown_table(
                ["class", "objects", "ImageNet top-1 (count)", "nearest ImageNet names"], top_rows
            ),
        ]
    )
    if args.no_write:
        sys.stdout.write(body + "\n")
    else:
        logger.info("wrote %s", write_results_section(SECTION_ID, body))


if __name__ == "__main__":
    main()
