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


def test_cache_is_written_then_loaded(tmp_path, clf, monkeypatch):
    path = str(tmp_path / "sub" / "digits_clf.pt")
    monkeypatch.setattr(digits, "train_digits_classifier", lambda seed=0: clf)
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
    monkeypatch.setattr(digits, "train_digits_classifier", lambda seed=0: calls.append(seed) or clf)
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


def test_inception_precision_recall_on_inception_features(monkeypatch):
    """prc=True asks torch-fidelity for k = 3 precision / recall on the 2048-d Inception
    features (ADM's protocol), not its VGG16 default, and returns them by name."""
    seen = {}

    def metrics(**kwargs):
        seen.update(kwargs)
        return {"frechet_inception_distance": 3.0, "inception_score_mean": 9.0,
                "inception_score_std": 0.1, "precision": 0.7, "recall": 0.5}
    monkeypatch.setitem(sys.modules, "torch_fidelity",
                        types.SimpleNamespace(calculate_metrics=metrics))
    out = inception.fid_is(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), reference="ref", prc=True)
    assert out == {"fid": 3.0, "is_mean": 9.0, "is_std": 0.1, "precision": 0.7, "recall": 0.5}
    assert seen["prc"] and seen["feature_extractor"] == "inception-v3-compat"
    assert seen["feature_layer_prc"] == "2048" and seen["prc_neighborhood"] == 3
