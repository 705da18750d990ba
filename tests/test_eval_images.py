"""Image metrics (eval/): Fréchet distance against closed forms, the offline digits classifier and
its cache, input validation, and the lazy torch-fidelity wrapper (no weights, no network)."""
import os
import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch

from eval import digits, inception
from eval.frechet import frechet_distance, frechet_from_stats, gaussian_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- Fréchet distance

def test_frechet_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert abs(frechet_distance(feats, feats)) < 1e-8
    assert abs(frechet_distance(torch.as_tensor(feats), feats)) < 1e-8


def test_frechet_from_stats_exact_commuting_covariances():
    # commuting covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = 25 + (1-3)^2 + (2-1)^2
    mu1, mu2 = np.zeros(2), np.array([3.0, 4.0])
    a, b = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    assert frechet_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(30.0, abs=1e-12)
    # the same after a shared rotation (non-diagonal, still commuting)
    c, s = np.cos(0.7), np.sin(0.7)
    r = np.array([[c, -s], [s, c]])
    d = frechet_from_stats(r @ mu1, r @ np.diag(a) @ r.T, r @ mu2, r @ np.diag(b) @ r.T)
    assert d == pytest.approx(30.0, abs=1e-10)


def test_frechet_from_stats_matches_scipy_sqrtm_on_non_commuting():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_of_samples_approaches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 2.0])
    v1, v2 = np.array([1.0, 0.25, 4.0, 1.0]), np.array([2.0, 1.0, 1.0, 0.5])
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # 1.25 + 1.43 = 2.68
    n = 200_000
    a = mu1 + np.sqrt(v1) * rng.normal(size=(n, 4))
    b = mu2 + np.sqrt(v2) * rng.normal(size=(n, 4))
    # sampling error of means and variances ~ 1/sqrt(n) ~ 2e-3 per entry; 0.03 is a wide margin
    assert frechet_distance(a, b) == pytest.approx(exact, abs=0.03)


def test_frechet_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        gaussian_stats(np.zeros(5))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="mismatch"):
        frechet_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- digits metric

@pytest.fixture(scope="module")
def clf():
    return digits.train_digits_classifier(seed=0)


def test_load_digits_uint():
    images, labels = digits.load_digits_uint()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16 and set(labels.tolist()) == set(range(10))


def test_classifier_held_out_accuracy(clf):
    _, _, x_te, y_te = digits.digits_split()
    acc = digits.class_accuracy(clf, x_te, y_te)
    print(f"\n digits classifier held-out accuracy: {acc:.4f} ({len(y_te)} images)")
    assert acc >= 0.97
    assert digits.digits_features(clf, x_te).shape == (len(x_te), 128)
    pred = clf(x_te.reshape(-1, 64).float() / 16).argmax(-1)
    for div in (2, 5):                      # grouped labels: right iff the digit is in the group
        want = (pred // div == y_te // div).float().mean().item()
        assert digits.class_accuracy(clf, x_te, y_te // div, div) == pytest.approx(want)
        assert want >= acc
    wrong = (y_te // 2 + 1) % 5                                       # every group shifted by one
    assert digits.class_accuracy(clf, x_te, wrong, 2) <= 1 - acc + 0.02


def test_photo_patches_the_second_embedded_set():
    """"photos": 8x8 windows at stride 4 of the photographs downscaled 4x (a window r, c covers
    the original rows 16 r .. 16 r + 31), checked on one patch against a hand computation; the
    same classifier trained on its 80% split beats chance (10 classes; measured 0.35) and its
    Fréchet distance separates two halves of the set (measured 0.19) from noise (41.8)."""
    from sklearn.datasets import load_sample_images
    images, labels = digits.load_photo_patches()
    assert images.shape == (1950, 8, 8) and labels.bincount().tolist() == [195] * 10
    assert images.min() == 0 and images.max() == 16
    grey = torch.from_numpy(load_sample_images().images[1].copy()).double() @ \
        torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)         # flower.jpg, (427, 640)
    r, c = 7, 11
    want = grey[16 * r:16 * r + 32, 16 * c:16 * c + 32].reshape(8, 4, 8, 4).mean((1, 3))
    i = 975 + 39 * r + c                                          # 25 x 39 windows per photograph
    assert torch.equal(images[i], (want * 16 / 255).round().long())
    assert labels[i] == 5 + 1                                     # flower, band 7 * 5 // 25 = 1
    clf = digits.train_digits_classifier(seed=0, data="photos")
    _, _, x_te, y_te = digits.digits_split("photos")
    assert digits.class_accuracy(clf, x_te, y_te) >= 0.25
    perm = torch.randperm(1950, generator=torch.Generator().manual_seed(0))
    noise = torch.randint(0, 17, (1950, 8, 8), generator=torch.Generator().manual_seed(1))
    assert digits.digits_frechet(clf, images[perm[:975]], images[perm[975:]]) < 0.5
    assert digits.digits_frechet(clf, noise, images) > 20


def test_cache_is_written_then_loaded(tmp_path, clf, monkeypatch):
    path = str(tmp_path / "sub" / "digits_clf.pt")
    monkeypatch.setattr(digits, "train_digits_classifier", lambda seed=0, data="digits": clf)
    first = digits.load_or_train_classifier(path)
    assert os.path.exists(path) and os.listdir(tmp_path / "sub") == ["digits_clf.pt"]

    def must_not_train(seed=0):
        raise AssertionError("the cache should have been loaded")
    monkeypatch.setattr(digits, "train_digits_classifier", must_not_train)
    second = digits.load_or_train_classifier(path)
    x, _ = digits.load_digits_uint()
    torch.testing.assert_close(digits.digits_features(first, x), digits.digits_features(second, x))


@pytest.mark.parametrize("bad", ["garbage", "other_architecture"])
def test_bad_cache_is_retrained_and_overwritten(tmp_path, clf, monkeypatch, bad):
    path = str(tmp_path / "digits_clf.pt")
    if bad == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a checkpoint")
    else:
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    calls = []
    monkeypatch.setattr(digits, "train_digits_classifier",
                        lambda seed=0, data="digits": calls.append(seed) or clf)
    digits.load_or_train_classifier(path)
    assert calls == [0]
    state = torch.load(path, weights_only=True)
    assert state.keys() == clf.state_dict().keys()


def test_frechet_floor_and_noise(clf):
    images, _ = digits.load_digits_uint()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half = len(images) // 2
    floor = digits.digits_frechet(clf, images[perm[:half]], images[perm[half:]])
    noise = torch.randint(0, 17, images.shape, generator=torch.Generator().manual_seed(0))
    far = digits.digits_frechet(clf, images, noise)
    print(f"\n digits FD real half vs real half: {floor:.3f}; real vs uniform noise: {far:.2f}")
    assert floor < 2.0
    assert far > 20 * floor


def test_digits_input_validation(clf):
    images, labels = digits.load_digits_uint()
    ok = images[:10]
    for shaped in (ok, ok[:, None], ok.reshape(10, 64), ok.numpy().astype(np.uint8)):
        assert digits.digits_features(clf, shaped).shape == (10, 128)
    with pytest.raises(ValueError, match="shape"):
        digits.digits_features(clf, torch.zeros(10, 7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        digits.digits_features(clf, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="0..16"):
        digits.digits_features(clf, ok + 1)
    with pytest.raises(ValueError, match="0..16"):
        digits.digits_features(clf, ok - 1)
    with pytest.raises(ValueError, match="dtype"):
        digits.digits_features(clf, ok.float())
    with pytest.raises(ValueError, match="labels"):
        digits.class_accuracy(clf, ok, labels[:9])


# ----------------------------------------------------------------------------- Inception wrapper

def test_inception_import_is_lazy():
    code = "import sys, eval.inception; assert 'torch_fidelity' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_inception_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception.fid_is(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_inception_download_failure_error(monkeypatch):
    def offline(**kwargs):
        assert isinstance(kwargs["input1"], torch.utils.data.Dataset) and kwargs["fid"] and kwargs["isc"]
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=offline))
    with pytest.raises(RuntimeError, match="weights_path"):
        inception.fid_is(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_inception_returns_named_metrics_and_validates(monkeypatch):
    fake = {"frechet_inception_distance": 3.0, "inception_score_mean": 9.0, "inception_score_std": 0.1}
    fidelity = types.SimpleNamespace(calculate_metrics=lambda **kwargs: fake)
    monkeypatch.setitem(sys.modules, "torch_fidelity", fidelity)
    out = inception.fid_is(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), reference="cifar10-train")
    assert out == {"fid": 3.0, "is_mean": 9.0, "is_std": 0.1}
    with pytest.raises(ValueError, match="uint8"):
        inception.fid_is(torch.zeros(2, 3, 8, 8))


# ------------------------------------------------- ImageNet metrics against the upstream evaluators

def test_image_metrics_match_the_maskgit_and_adm_evaluators():
    """tests/fixtures/image_metrics.npz: sony/di4c's MaskGIT-pytorch evaluator and ADM's
    TensorFlow evaluator run on fixed features (make_metric_fixtures.py). FID and IS agree to
    float rounding, MaskGIT's precision / recall / density / coverage exactly (5 splits and 1);
    ADM's precision / recall within 0.005 (its float16 distances move border points; measured
    0.002 / 0.003 on these 600 / 500 points)."""
    from eval import image_metrics as im
    z = np.load(os.path.join(ROOT, "tests", "fixtures", "image_metrics.npz"))
    real, fake = torch.from_numpy(z["real"]), torch.from_numpy(z["fake"])
    logits = fake @ torch.from_numpy(z["w"])
    mg, adm = (im.metrics_from_features(real, fake, logits, p) for p in ("maskgit", "adm"))
    assert mg["fid"] == pytest.approx(float(z["maskgit_fid"]), rel=2e-5)   # upstream: float32 cov
    assert adm["fid"] == pytest.approx(float(z["adm_fid"]), rel=1e-7)      # float64; its scipy sqrtm
    assert mg["is_mean"] == pytest.approx(float(z["maskgit_is"]), rel=1e-6)
    assert adm["is_mean"] == pytest.approx(float(z["adm_is_5000"]), rel=1e-6)
    assert im.inception_score(logits, split_size=200)["is_mean"] == \
        pytest.approx(float(z["adm_is_200"]), rel=1e-6)
    got = [mg[k] for k in ("precision", "recall", "density", "coverage")]
    assert got == pytest.approx(z["maskgit_prdc_s5"].tolist(), abs=1e-9)
    one = im.prdc(real, fake, k=3, splits=1, strict_lt=True)
    assert list(one.values()) == pytest.approx(z["maskgit_prdc_s1"].tolist(), abs=1e-9)
    assert abs(adm["precision"] - z["adm_pr"][0]) <= 0.005
    assert abs(adm["recall"] - z["adm_pr"][1]) <= 0.005
    # the protocols differ where they should: splits raise precision and recall
    assert mg["precision"] > one["precision"] + 0.1 and mg["recall"] > one["recall"] + 0.05


def test_prdc_blocks_and_ties():
    """Blocked distance computation gives the unblocked answer; `<` vs `<=` matters on a
    ball's border (a point exactly at the k-th neighbour's distance)."""
    from eval import image_metrics as im
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(70, 5, generator=g), torch.randn(50, 5, generator=g) + 0.3
    r_real, r_fake = im.knn_radii(real, 3), im.knn_radii(fake, 3)
    whole = im.ball_stats(real, r_real, fake, r_fake, True)
    small = im.ball_stats(real, im.knn_radii(real, 3, block=16), fake, r_fake, True, block=16)
    assert all(torch.equal(a, b) for a, b in zip(whole, small))
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0]])          # k = 1 radii: all 1
    on_border = torch.tensor([[4.0], [9.0]])                    # 4: distance 1 from the point at 3
    assert im.prdc(line, on_border, k=1, strict_lt=True)["precision"] == 0.0
    assert im.prdc(line, on_border, k=1, strict_lt=False)["precision"] == 0.5
    with pytest.raises(ValueError, match="need more than 3 points per split .5 split.s. of 50 "
                                         "reference and 15 sample features leave 3"):
        im.prdc(real[:50], fake[:15], k=3, splits=5)
    with pytest.raises(ValueError, match="unknown metrics protocol 'fid'"):
        im.metrics_from_features(real, fake, fake, "fid")


# ---------------------------------------- CIFAR-10: the paper's package, pytorch-image-generation-metrics

def random_pigm_weights(monkeypatch):
    """pytorch-image-generation-metrics builds its FID Inception and then downloads the weights;
    here the download returns random weights of that architecture (He-normal convolutions, fixed
    seed), so its real code runs offline."""
    import math
    import pytorch_image_generation_metrics.inception as pin
    from torchvision import models
    net = models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for name, block, arg in (("Mixed_5b", pin.FIDInceptionA, (192, 32)),
                             ("Mixed_5c", pin.FIDInceptionA, (256, 64)),
                             ("Mixed_5d", pin.FIDInceptionA, (288, 64)),
                             ("Mixed_6b", pin.FIDInceptionC, (768, 128)),
                             ("Mixed_6c", pin.FIDInceptionC, (768, 160)),
                             ("Mixed_6d", pin.FIDInceptionC, (768, 160)),
                             ("Mixed_6e", pin.FIDInceptionC, (768, 192)),
                             ("Mixed_7b", pin.FIDInceptionE_1, (1280,)),
                             ("Mixed_7c", pin.FIDInceptionE_2, (2048,))):
        setattr(net, name, block(*arg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g)
                                 * math.sqrt(2 / mod.weight[0].numel()))
    state = net.state_dict()
    monkeypatch.setattr(pin, "load_state_dict_from_url", lambda url, progress=True: state)
    monkeypatch.setattr(inception, "_EXTRACTORS", {})        # no network built before leaks in


def test_pigm_backend_is_the_packages_own_numbers(tmp_path, monkeypatch):
    """pigm, the FID / IS of cifar10_gaussian.py's paper preset, gives the numbers of the package
    itself, with the same (random) weights: pigm_stats writes what its fid_ref tool writes from a
    PNG folder, and pigm_fid_is returns what get_inception_score_and_fid returns (scipy's sqrtm,
    25 s at 2048 x 2048 on two cores, is replaced on both sides by one stand-in)."""
    pytest.importorskip("pytorch_image_generation_metrics")
    import pytorch_image_generation_metrics.core as pcore
    from PIL import Image
    from pytorch_image_generation_metrics import get_inception_score_and_fid
    from pytorch_image_generation_metrics.utils import calc_fid_ref
    random_pigm_weights(monkeypatch)
    monkeypatch.setattr(pcore, "linalg", types.SimpleNamespace(
        sqrtm=lambda a, disp=True: (np.diag(np.sqrt(np.abs(np.diag(a)))), 0.0)))
    monkeypatch.setattr(pcore.dist, "device", lambda: torch.device("cpu"))   # its default: cuda
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.6 + 40).to(torch.uint8)[:12]
    os.makedirs(tmp_path / "real")
    for i, img in enumerate(real.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(tmp_path / "real" / f"{i:03d}.png")
    calc_fid_ref(str(tmp_path / "real"), str(tmp_path / "theirs.npz"), num_workers=0, verbose=False)
    stats = str(tmp_path / "ours.npz")
    inception.pigm_stats(real, stats, cuda=False)
    with np.load(stats) as a, np.load(tmp_path / "theirs.npz") as b:
        assert np.abs(a["mu"] - b["mu"]).max() < 1e-6 and np.abs(a["sigma"] - b["sigma"]).max() < 1e-6
    ours = inception.pigm_fid_is(fake, stats, cuda=False)
    (is_mean, is_std), fid = get_inception_score_and_fid(fake.float() / 255, stats,
                                                         device=torch.device("cpu"), batch_size=50)
    assert ours == pytest.approx({"fid": fid, "is_mean": is_mean, "is_std": is_std}, rel=1e-9)
    assert ours["fid"] > 1.0 and inception.pigm_fid_is(real, stats, cuda=False)["fid"] < 1e-6
