"""Offline 8x8 image data and metric for the demo presets: scikit-learn's bundled handwritten
digits, and (the second data set, which no preset was tuned on) patches of its two photographs.

The data (1797 images, 17 grey levels 0..16, labels 0..9) ships with scikit-learn, so nothing is
downloaded. A small MLP classifier (64 -> 256 -> 128 -> 10, ReLU) plays Inception's role: its
128-d penultimate activations are the features of a Fréchet distance ("digits FD"), and its
predictions score class-conditional samples.

Measured (torch 2.14.1, CPU, seed 0): held-out accuracy 98.9% (356/360) on the fixed 80/20 split
after 3-5 s of training (99.7% on all 1797 images). Floor, the FD between two random halves of the
real data (898 vs 899 images): 0.93 for halves drawn with torch seed 0, 0.58-0.93 over seeds 0-4.
All 1797 real images vs 1797 uniform-noise images: 80.8. FD is biased upwards at small N, so
compare numbers only at equal sample sizes; the features differ from the prototype's classifier,
so its numbers (floor 1.98) do not carry over.

"photos" (load_photo_patches): 1950 grey 8x8 patches, 17 levels, of china.jpg and flower.jpg
(427 x 640, shipped with scikit-learn); labels = photograph x 5 horizontal bands (10 classes), so
the same classifier, trained the same way on that set's own 80% split, gives its features.
"scenes" (load_scene_patches), the third set: 2040 patches of the terrain map and the portrait
shipped with matplotlib, labelled the same way.

Notation: N images, 64 = 8 * 8 pixels, 128 feature dimensions.
"""
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from .frechet import frechet_distance

LEVELS = 17     # grey levels 0..16
SPLIT_SEED = 0  # the 80/20 split is fixed, whatever the training seed


def load_digits_uint():
    """The bundled digits as integers: images (N, 8, 8) long in 0..16, labels (N,) long, N = 1797."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.as_tensor(d.images).round().long(), torch.as_tensor(d.target).long()


def bands_of_patches(greys: list, scales: list, strides: list):
    """Grey 8x8 patches of grey pictures (H, W) float64 in 0..255: each area-downscaled by its
    scale, every 8x8 window at its stride, levels round(16 v / 255); the label of a patch is
    5 picture + the fifth of the picture (top to bottom) its first row lies in.
    Returns images (N, 8, 8) long in 0..16, labels (N,) long in 0..5 len(greys) - 1."""
    images, labels = [], []
    for i, (grey, scale, stride) in enumerate(zip(greys, scales, strides)):
        H, W = grey.shape[0] // scale, grey.shape[1] // scale
        small = grey[:H * scale, :W * scale].view(H, scale, W, scale).mean((1, 3))   # (H, W)
        win = small.unfold(0, 8, stride).unfold(1, 8, stride)             # (rows, cols, 8, 8)
        rows, cols = win.shape[:2]
        band = (torch.arange(rows) * 5 // rows)[:, None].expand(rows, cols)
        images.append(win.reshape(-1, 8, 8))
        labels.append((5 * i + band).reshape(-1))
    return (torch.cat(images) * (LEVELS - 1) / 255).round().long(), torch.cat(labels)


def load_photo_patches(scale: int = 4, stride: int = 4):
    """Grey 8x8 patches of the two photographs bundled with scikit-learn (china.jpg, flower.jpg):
    luma (0.299 R + 0.587 G + 0.114 B), downscaled 4x (427 x 640 -> 106 x 160), windows at
    stride 4 (25 x 39 per photograph; bands_of_patches). Returns images (1950, 8, 8) long in
    0..16, labels (1950,) long in 0..9."""
    from sklearn.datasets import load_sample_images
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    greys = [torch.from_numpy(rgb.copy()).double() @ luma for rgb in load_sample_images().images]
    return bands_of_patches(greys, [scale] * 2, [stride] * 2)


def load_scene_patches():
    """The third set, which no preset was tuned on: grey 8x8 patches of the two pictures bundled
    with matplotlib, a terrain (jacksboro_fault_dem.npz, a 344 x 403 elevation map, min-max
    scaled to 0..255, downscaled 2x, stride 6: 28 x 33 patches) and a portrait (grace_hopper.jpg,
    512 x 600, luma, downscaled 4x, stride 4: 31 x 36). Returns images (2040, 8, 8) long in
    0..16, labels (2040,) long in 0..9 (bands_of_patches)."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image
    dem = torch.from_numpy(cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]
                           .astype(np.float64))
    dem = (dem - dem.min()) / (dem.max() - dem.min()) * 255
    rgb = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    luma = torch.from_numpy(rgb.astype(np.float64)) @ torch.tensor([0.299, 0.587, 0.114],
                                                                   dtype=torch.float64)
    return bands_of_patches([dem, luma], [2, 4], [6, 4])


EMBEDDED = {"digits": load_digits_uint, "photos": load_photo_patches,
            "scenes": load_scene_patches}


def load_embedded(data: str = "digits"):
    """An embedded 8x8 set by name: digits | photos | scenes (the loaders above)."""
    if data not in EMBEDDED:
        raise ValueError(f"embedded data must be one of {sorted(EMBEDDED)}, got {data!r}")
    return EMBEDDED[data]()


def class_names(data: str = "digits", label_div: int = 1) -> list:
    """Names of the classes label // label_div of an embedded set: the digits ("0|1", ... for
    label_div 2), or the picture bands ("china0", ..., "flower4"; "terrain0", ..., "hopper4")."""
    pics = {"photos": ("china", "flower"), "scenes": ("terrain", "hopper")}.get(data)
    name = str if pics is None else lambda d: f"{pics[d // 5]}{d % 5}"
    return ["|".join(name(d) for d in range(10) if d // label_div == c)
            for c in range((9 // label_div) + 1)]


def digits_split(data: str = "digits"):
    """Fixed 80/20 split of an embedded set (load_embedded): (train_images (1437, 8, 8),
    train_labels, test_images (360, 8, 8), test_labels) for the digits."""
    images, labels = load_embedded(data)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    tr, te = perm[:int(0.8 * len(images))], perm[int(0.8 * len(images)):]
    return images[tr], labels[tr], images[te], labels[te]


class DigitsClassifier(nn.Module):
    """MLP on pixels scaled to [0, 1]; features() gives the 128-d penultimate activations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x):
        """x: (N, 64) float in [0, 1] -> (N, 128)."""
        return self.body(x)

    def forward(self, x):
        """x: (N, 64) float in [0, 1] -> logits (N, 10)."""
        return self.head(self.body(x))


def _as_pixels(images):
    """Validate integer grey levels (N, 8, 8), (N, 1, 8, 8) or (N, 64) in 0..16 -> (N, 64) float in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"digits images must be integer grey levels 0..16, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0 or tuple(x.shape[1:]) not in ((8, 8), (1, 8, 8), (64,)):
        raise ValueError(f"digits images must have shape (N, 8, 8), (N, 1, 8, 8) or (N, 64) with N >= 1, "
                         f"got {tuple(x.shape)}")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi >= LEVELS:
        raise ValueError(f"digits grey levels must lie in 0..{LEVELS - 1}, got values in {lo}..{hi}")
    return x.reshape(len(x), 64).float() / (LEVELS - 1)  # (N, 64)


def _random_shift(x, gen):
    """Translate half of the images by -1, 0 or +1 pixels per axis, zero fill: (N, 64) -> (N, 64)."""
    n = len(x)
    pad = F.pad(x.view(n, 8, 8), (1, 1, 1, 1))                     # (N, 10, 10)
    ar = torch.arange(8)
    rows = torch.randint(0, 3, (n, 1), generator=gen) + ar          # (N, 8)
    cols = torch.randint(0, 3, (n, 1), generator=gen) + ar          # (N, 8)
    shifted = pad[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]].reshape(n, 64)
    return torch.where(torch.rand(n, 1, generator=gen) < 0.5, shifted, x)


def train_digits_classifier(seed=0, epochs=60, batch_size=64, lr=2e-3, data="digits"):
    """Train the classifier on the 80% split of `data` (load_embedded), on CPU, deterministically
    (global RNG left untouched).

    AdamW (weight decay 0.01), cosine lr, +-1 pixel shift augmentation. It runs on one thread: the
    model is too small to gain from more, and the result then does not depend on the thread count.
    Returns the model in eval mode.
    """
    x_tr, y_tr, _, _ = digits_split(data)
    x = _as_pixels(x_tr)                                            # (N, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(x, y_tr, seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _fit(x, y, seed, epochs, batch_size, lr):
    """The training loop of train_digits_classifier: x (N, 64) float in [0, 1], y (N,) long."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        clf = DigitsClassifier()
        opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch_size))
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = F.cross_entropy(clf(_random_shift(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return clf.eval()


def load_or_train_classifier(cache_path, seed=0, data="digits"):
    """Load the classifier's state_dict from cache_path, or train it on `data` (load_embedded) and
    write the cache atomically (one cache file per data set: the caller names it).

    A missing, unreadable or mismatched cache (another architecture) is retrained and overwritten.
    """
    clf = DigitsClassifier()
    try:
        clf.load_state_dict(torch.load(cache_path, map_location="cpu", weights_only=True))
        return clf.eval()
    except Exception:  # any failure to read the cache means "retrain"; the metric must never crash here
        pass
    clf = train_digits_classifier(seed, data=data)
    folder = os.path.dirname(os.path.abspath(cache_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(clf.state_dict(), tmp)
        os.replace(tmp, cache_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return clf


@torch.no_grad()
def digits_features(clf, images):
    """Penultimate features: images (N, 8, 8) | (N, 1, 8, 8) | (N, 64) ints 0..16 -> (N, 128) float32."""
    return clf.eval().features(_as_pixels(images))


@torch.no_grad()
def class_accuracy(clf, images, labels, label_div=1):
    """Fraction of images classified as their label: images as in digits_features, labels (N,)
    ints; with label_div > 1 a label is a group of digits (digit // label_div), and an image
    counts as right when the predicted digit is in its group."""
    x = _as_pixels(images)                                          # (N, 64)
    y = torch.as_tensor(labels).reshape(-1)                         # (N,)
    if len(y) != len(x):
        raise ValueError(f"got {len(x)} images but {len(y)} labels")
    return (clf.eval()(x).argmax(-1) // label_div == y).float().mean().item()


def digits_frechet(clf, images_a, images_b):
    """Fréchet distance between the classifier features of two image sets (N_a and N_b images, N >= 2)."""
    return frechet_distance(digits_features(clf, images_a), digits_features(clf, images_b))


def frechet_scorer(real, levels: int, data: str, cache_path: str):
    """score(samples) -> {"frechet": digits_frechet to all of `real`}, with the classifier of
    `data` (load_or_train_classifier, cached at cache_path); samples and `real` are images of
    `levels` grey levels 0..levels-1, requantised to the embedded sets' 17."""
    clf = load_or_train_classifier(cache_path, data=data)
    to17 = lambda x: x if levels == 17 else (x.long() * 17 // levels).to(torch.uint8)  # noqa: E731
    real = to17(real)
    return lambda samples: {"frechet": digits_frechet(clf, to17(samples), real)}


def score_sets(sets: dict, data: str, label_div: int, cache_path: str) -> dict:
    """{label: {frechet, class_acc, steps, w}} of conditional sample sets {label: {"codes" (N, 64)
    0..16, "labels" (N,), "steps", "w"}}: Frechet distance to all of `data` and class accuracy
    (label_div: as class_accuracy), with `data`'s classifier cached at cache_path."""
    clf = load_or_train_classifier(cache_path, data=data)
    real, _ = load_embedded(data)
    return {label: dict(frechet=digits_frechet(clf, s["codes"].view(-1, 8, 8), real),
                        class_acc=class_accuracy(clf, s["codes"].view(-1, 8, 8), s["labels"],
                                                 label_div),
                        steps=s["steps"], w=s["w"]) for label, s in sets.items()}
