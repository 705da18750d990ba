"""FID and Inception Score for CIFAR-10 / ImageNet samples, through torch-fidelity.

Why torch-fidelity: it is maintained (0.4.0, 2026-02), pip-installable, its Inception-v3 port
reproduces the original TensorFlow FID/IS numbers that papers report, and one call computes FID and
IS with cached reference statistics. The paper used pytorch-image-generation-metrics, whose last
release was 2024-06; pytorch-fid (2023-01) has no Inception Score.
Install with `pip install torch-fidelity`; it is imported only inside fid_is(), so importing this
module never needs it. On first use it downloads the Inception weights (~100 MB) to
$TORCH_HOME/hub/checkpoints and, for reference='cifar10-train', CIFAR-10 itself; offline, place
them there beforehand or pass weights_path.

Notation: N images, 3 channels, H x W pixels, uint8 in 0..255.
"""
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
           datasets_root=None, verbose=False, prc=False):
    """FID of samples against a reference, and the Inception Score of samples; with prc=True
    also improved precision and recall (Kynkaenniemi et al. 2019, k = 3) on the same
    Inception-v3 pool features (2048-d), as ADM's ImageNet evaluator computes them (torch-fidelity's
    own default for precision / recall is VGG16 features, which the image papers do not use).

    Args:
        samples: a directory of PNG/JPEG images, or a uint8 tensor (N, 3, H, W).
        reference: a torch-fidelity dataset name ('cifar10-train', 'cifar10-val', ...), a directory of
            images, or a uint8 tensor (M, 3, H', W').
        cuda: run Inception on the GPU (default: when one is available).
        weights_path: local Inception weights file, to avoid the download.
        datasets_root: where registered datasets live (default $TORCH_HOME/fidelity_datasets).
    Returns:
        {"fid": float, "is_mean": float, "is_std": float} (+ "precision", "recall" with prc)
    """
    try:
        import torch_fidelity
    except ImportError as e:
        raise ImportError("eval.inception.fid_is needs torch-fidelity: pip install torch-fidelity") from e
    extra = dict(prc=True, feature_extractor="inception-v3-compat",
                 feature_layer_prc="2048", prc_neighborhood=3) if prc else {}
    try:
        m = torch_fidelity.calculate_metrics(
            input1=_as_input(samples), input2=_as_input(reference), fid=True, isc=True,
            batch_size=batch_size, cuda=torch.cuda.is_available() if cuda is None else cuda,
            feature_extractor_weights_path=weights_path, datasets_root=datasets_root, verbose=verbose,
            **extra)
    except OSError as e:
        raise RuntimeError(
            "torch-fidelity could not download the Inception weights or the reference dataset "
            "(no network?). Put the weights in $TORCH_HOME/hub/checkpoints or pass weights_path=, and "
            "pass a local reference (an image directory, a tensor, or datasets_root= holding the "
            f"dataset). Original error: {e}") from e
    out = {"fid": m["frechet_inception_distance"], "is_mean": m["inception_score_mean"],
           "is_std": m["inception_score_std"]}
    if prc:
        out.update(precision=m["precision"], recall=m["recall"])
    return out
