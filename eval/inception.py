"""FID and Inception Score for CIFAR-10 / ImageNet samples, through torch-fidelity.

Why torch-fidelity: it is maintained (0.4.0, 2026-02), pip-installable, its Inception-v3 port
reproduces the original TensorFlow FID/IS numbers that papers report, and one call computes FID and
IS with cached reference statistics. The paper used pytorch-image-generation-metrics, whose last
release was 2024-06; pytorch-fid (2023-01) has no Inception Score.
Install with `pip install torch-fidelity`; it is imported only inside fid_is(), so importing this
module never needs it. On first use it downloads the Inception weights (~100 MB) to
$TORCH_HOME/hub/checkpoints and, for reference='cifar10-train', CIFAR-10 itself; offline, place
them there beforehand or pass weights_path.

inception_features() returns the raw features (2048-d pool, unbiased logits) of the same
extractor for eval/image_metrics.py, which computes the ImageNet metrics under the MaskGIT-pytorch
or ADM protocol.

Notation: N images, 3 channels, H x W pixels, uint8 in 0..255.
"""
import os

import torch
from torch.utils.data import Dataset


class _Uint8Images(Dataset):
    """In-memory images (N, 3, H, W) uint8, the item type torch-fidelity expects."""

    def __init__(self, images):
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                and images.ndim == 4 and images.shape[1] == 3):
            got = f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
            raise ValueError(f"image tensors must be uint8 of shape (N, 3, H, W), got {got}")
        self.images = images.cpu()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _as_input(x):
    """A path or registered name passes through; a uint8 tensor is wrapped as a Dataset."""
    return x if isinstance(x, str) else _Uint8Images(x)


def fid_is(samples, reference="cifar10-train", batch_size=64, cuda=None, weights_path=None,
           datasets_root=None, verbose=False):
    """FID of samples against a reference, and the Inception Score of samples.

    Args:
        samples: a directory of PNG/JPEG images, or a uint8 tensor (N, 3, H, W).
        reference: a torch-fidelity dataset name ('cifar10-train', 'cifar10-val', ...), a directory of
            images, or a uint8 tensor (M, 3, H', W').
        cuda: run Inception on the GPU (default: when one is available).
        weights_path: local Inception weights file, to avoid the download.
        datasets_root: where registered datasets live (default $TORCH_HOME/fidelity_datasets).
    Returns:
        {"fid": float, "is_mean": float, "is_std": float}
    """
    try:
        import torch_fidelity
    except ImportError as e:
        raise ImportError("eval.inception.fid_is needs torch-fidelity: pip install torch-fidelity") from e
    try:
        m = torch_fidelity.calculate_metrics(
            input1=_as_input(samples), input2=_as_input(reference), fid=True, isc=True,
            batch_size=batch_size, cuda=torch.cuda.is_available() if cuda is None else cuda,
            feature_extractor_weights_path=weights_path, datasets_root=datasets_root, verbose=verbose)
    except OSError as e:
        raise RuntimeError(
            "torch-fidelity could not download the Inception weights or the reference dataset "
            "(no network?). Put the weights in $TORCH_HOME/hub/checkpoints or pass weights_path=, and "
            "pass a local reference (an image directory, a tensor, or datasets_root= holding the "
            f"dataset). Original error: {e}") from e
    return {"fid": m["frechet_inception_distance"], "is_mean": m["inception_score_mean"],
            "is_std": m["inception_score_std"]}


_EXTRACTORS = {}


def inception_features(images, batch_size=64, cuda=None, weights_path=None):
    """Pool features and unbiased logits of torch-fidelity's Inception-v3 port
    ('inception-v3-compat', features '2048' and 'logits_unbiased'): the extractor that
    MaskGIT-pytorch's evaluator builds, and torch-fidelity's port of the TensorFlow graph that
    ADM's evaluator runs.

    Args:
        images: uint8 tensor (N, 3, H, W); any H, W (the extractor resizes to 299 as TF did).
    Returns:
        pool (N, 2048) float32 and logits (N, 1008) float32, on the CPU.
    """
    _Uint8Images(images)                                               # validates
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("eval.inception.inception_features needs torch-fidelity: "
                          "pip install torch-fidelity") from e
    dev = torch.device("cuda" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu")
    key = (weights_path, str(dev))
    if key not in _EXTRACTORS:
        try:
            _EXTRACTORS[key] = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"],
                feature_extractor_weights_path=weights_path).to(dev).eval()
        except OSError as e:
            raise RuntimeError("torch-fidelity could not download the Inception weights (no "
                               "network?): put them in $TORCH_HOME/hub/checkpoints or pass "
                               f"weights_path=. Original error: {e}") from e
    net, pool, logits = _EXTRACTORS[key], [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f, lg = net(images[i:i + batch_size].to(dev))
            pool.append(f.float().cpu())
            logits.append(lg.float().cpu())
    return torch.cat(pool), torch.cat(logits)


def pigm_inception(device):
    """pytorch-image-generation-metrics' Inception-v3 (pytorch-fid's port of the FID graph),
    returning the 2048-d pool features (block 3) and the 1008-way softmax (block 4) in one pass;
    built once per device."""
    try:
        from pytorch_image_generation_metrics.inception import InceptionV3
    except ImportError as e:
        raise ImportError("CIFAR-10's FID / IS need pytorch-image-generation-metrics: "
                          "pip install pytorch-image-generation-metrics") from e
    key = ("pigm", str(device))
    if key in _EXTRACTORS:
        return _EXTRACTORS[key]
    try:
        _EXTRACTORS[key] = InceptionV3([3, 4]).to(device).eval()
        return _EXTRACTORS[key]
    except OSError as e:
        raise RuntimeError("pytorch-image-generation-metrics could not download its Inception "
                           "weights (no network?): put pt_inception-2015-12-05-6726825d.pth in "
                           f"$TORCH_HOME/hub/checkpoints. Original error: {e}") from e


def pigm_features(images, batch_size=50, cuda=None):
    """Pool features (N, 2048) and softmax (N, 1008) of uint8 images (N, 3, H, W), float64 numpy,
    as pytorch_image_generation_metrics.get_inception_feature computes them (images / 255, its
    bilinear resize to 299), without its torch.distributed plumbing: the eval runs on rank 0."""
    _Uint8Images(images)
    dev = torch.device("cuda" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu")
    net, pool, probs = pigm_inception(dev), [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f, p = net(images[i:i + batch_size].to(dev).float() / 255)
            pool.append(f.view(len(f), -1).cpu().double())
            probs.append(p.view(len(p), -1).cpu().double())
    return torch.cat(pool).numpy(), torch.cat(probs).numpy()


def pigm_stats(images, path, batch_size=50, cuda=None):
    """FID reference statistics {mu (2048,), sigma (2048, 2048)} of uint8 images, as
    pytorch_image_generation_metrics.fid_ref writes them; saved to path (atomically)."""
    import numpy as np
    acts, _ = pigm_features(images, batch_size, cuda)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, mu=acts.mean(0), sigma=np.cov(acts, rowvar=False))
    os.replace(tmp, path)


def pigm_fid_is(samples, stats, batch_size=50, cuda=None, splits=10):
    """The CIFAR-10 metrics of the Di4C and tauLDR papers: FID against reference statistics
    (an npz with mu, sigma: pytorch-image-generation-metrics' cifar10.train.npz, or pigm_stats) and
    the Inception Score over `splits` splits, computed by pytorch-image-generation-metrics' own
    functions (get_inception_score_and_fid's steps). samples: uint8 (N, 3, H, W)."""
    import numpy as np
    from pytorch_image_generation_metrics.core import (calculate_frechet_inception_distance,
                                                       calculate_inception_score)
    acts, probs = pigm_features(samples, batch_size, cuda)
    with np.load(stats) as f:
        mu, sigma = f["mu"][:], f["sigma"][:]
    is_mean, is_std = calculate_inception_score(probs, splits)
    return {"fid": float(calculate_frechet_inception_distance(acts, mu, sigma)),
            "is_mean": float(is_mean), "is_std": float(is_std)}


def pigm_scorer(images, levels: int, out_dir: str, stats: str = "", name: str = "pigm"):
    """score(samples) -> pigm_fid_is(samples, stats), the paper's FID / IS; samples and the
    reference `images` (N, 3, H, W) have `levels` grey levels 0..levels-1 and are passed as uint8
    0..255. stats: the reference npz, or "" for the statistics of `images`, computed once to
    out_dir/fid_stats_{name}.npz (what the package's fid_ref tool writes)."""
    as_uint8 = lambda x: (x.long() * 256 // levels).to(torch.uint8)  # noqa: E731
    if not stats:
        stats = os.path.join(out_dir, f"fid_stats_{name}.npz")
        if not os.path.exists(stats):
            pigm_stats(as_uint8(images), stats)
    return lambda samples: pigm_fid_is(as_uint8(samples), stats)


def pigm_needs(stats: str = "") -> list:
    """[(problem, fix)] for preflight before pigm_scorer: the package, and the given `stats`."""
    from eval.preflight import package_needs
    needs = package_needs({"pytorch_image_generation_metrics": (
        "pytorch-image-generation-metrics", "FID / IS (Di4C's validation, stage eval)")})
    if stats and not os.path.exists(stats):
        needs.append((f"--fid_stats {stats!r} does not exist", "download "
                      "pytorch-image-generation-metrics' cifar10.train.npz (docs/cifar10.md) "
                      "or drop --fid_stats to compute it from the training images"))
    return needs
