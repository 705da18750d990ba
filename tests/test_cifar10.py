"""cifar10_gaussian.py: process, networks, data formats, smoke end to end, exact resume, torchrun, errors."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import cifar10_gaussian as m
from tests.runs import metrics_without_timings, second_di4c_round

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(tmp_path, **kw):
    return m.make_config(m.Config, preset="smoke", out_dir=str(tmp_path), **kw)


def test_rate_matrix_is_reversible_and_reaches_pi_only_near_t1():
    R, pi = m.gaussian_rate_matrix(17, 1.5, 34.0)
    torch.testing.assert_close(R.sum(1), torch.zeros(17, dtype=torch.float64))
    flux = pi[:, None] * R
    torch.testing.assert_close(flux, flux.T)                                     # detailed balance
    proc = m.build_process(m.make_config(m.Config, preset="demo"), "cpu")
    Q = proc.transition(torch.tensor([0.3, 0.5, 1.0]))
    tv = 0.5 * (Q - proc.pi[None, None]).abs().sum(-1).max(-1).values
    assert tv[0] > 0.5 and tv[1] > 0.3 and tv[2] < 0.01                         # demo time scale


def test_student_equals_teacher_at_init_for_every_lambda():
    cfg = m.make_config(m.Config, preset="smoke", dropout=0.0)
    torch.manual_seed(0)
    teacher = m.build_unet(cfg, 1, 8, lam=False).eval()
    with torch.no_grad():                       # non-trivial teacher weights
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = m.student_from_teacher(teacher, cfg).eval()
    x = torch.randint(0, 17, (3, 64))
    t = torch.tensor([0.1, 0.5, 0.9])
    want = teacher(x, t)
    for lam in (0.0, 0.37, 1.0):
        torch.testing.assert_close(student(x, t, torch.full((3, 1), lam)), want)
    with torch.no_grad():
        student.lam_emb_down[-1].bias.add_(1.0)
        student.down[0].lam_proj.bias.add_(1.0)
    assert not torch.allclose(student(x, t, torch.full((3, 1), 0.5)), want)


def test_logistic_head_is_a_finite_distribution_peaked_at_mu():
    x = torch.zeros(2, 1, 2, 2)
    raw = torch.zeros(2, 2, 2, 2)
    raw[:, 1] = -3.0                                                             # sharp
    logits = m.logistic_logits(x, raw, 17)                                       # (2, 4, 17)
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == 8).all()                                        # bin holding 0
    assert (logits.exp().sum(-1) <= 1 + 1e-5).all()


def write_cifar10_batches(root, n_per_batch=5, batches=2):
    """CIFAR-10's python-pickle layout with random images under root/cifar-10-batches-py: training
    batches data_batch_1.. and the test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        data = torch.randint(0, 256, (n_per_batch, 3072), dtype=torch.uint8).numpy()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * n_per_batch}, f)


def test_cifar10_pickle_batches_format_and_requantisation(tmp_path):
    write_cifar10_batches(tmp_path)
    cfg = m.make_config(m.Config, dataset="cifar10", data_dir=str(tmp_path))
    x = m.load_images(cfg)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8
    x17 = m.load_images(m.make_config(m.Config, dataset="cifar10", data_dir=str(tmp_path), S=17))
    assert torch.equal(x17, (x.long() * 17 // 256).to(torch.uint8)) and int(x17.max()) <= 16
    assert m.load_images(cfg, "val").shape == (5, 3, 32, 32)                     # test_batch


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--preset must be one of"):
        m.make_config(m.Config, preset="huge")
    with pytest.raises(SystemExit, match="unknown config field"):
        m.make_config(m.Config, stepz=3)
    with pytest.raises(SystemExit, match="cifar-10-batches-py"):
        m.load_images(m.make_config(m.Config, data_dir=str(tmp_path / "nope")))
    with pytest.raises(SystemExit, match="--stage must be"):
        m.main(smoke(tmp_path, stage="train"))
    with pytest.raises(SystemExit, match="run --stage"):
        m.main(smoke(tmp_path, stage="sample"))
    r = subprocess.run([sys.executable, "cifar10_gaussian.py", "--preset", "smoke", "--ste", "3"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_checkpoint_from_another_config_is_refused(tmp_path):
    m.main(smoke(tmp_path, stage="teacher"))
    with pytest.raises(SystemExit, match="another config"):
        m.main(smoke(tmp_path, stage="distill", ch=16))


def test_smoke_end_to_end_is_deterministic_and_learns(tmp_path):
    """Two identical runs give identical metrics (timings aside); a teacher trained for 150
    steps samples far closer to the digits than uniform noise does."""
    for run in ("a", "b"):
        m.main(smoke(tmp_path / run, teacher_iters=150))
    assert metrics_without_timings(tmp_path / "a" / "metrics.json") == \
        metrics_without_timings(tmp_path / "b" / "metrics.json")
    tmp_path = tmp_path / "a"
    saved = json.load(open(tmp_path / "metrics.json"))
    from eval import digits
    clf = digits.load_or_train_classifier(str(tmp_path / "digits_classifier.pt"))
    real, _ = digits.load_digits_uint()
    noise = torch.randint(0, 17, (16, 8, 8), generator=torch.Generator().manual_seed(0))
    fd_noise = digits.digits_frechet(clf, noise, real)
    assert saved["eval"]["teacher@4"]["frechet"] < 0.65 * fd_noise, fd_noise      # 50.6 vs 93.0
    labels = ["teacher@2", "teacher@4", "student@2", "hybrid@2", "control@2"]
    assert sorted(saved["eval"]) == sorted(labels)
    assert all(v["frechet"] > 0 for v in saved["eval"].values())
    assert "2" in saved["latency"] and saved["student"]["train_seconds"] > 0
    assert (tmp_path / "grid_student@2.png").exists()
    assert (tmp_path / "quality_vs_steps.png").exists()


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path, monkeypatch):
    """Teacher cut at step 2 and resumed, student stopped by Ctrl-C at step 1 and resumed:
    the states and the finished checkpoints equal the uninterrupted run's, the raw weights and
    the EMA weights (which sampling uses; restored from the state, not restarted from the raw
    weights) both."""
    a, b = tmp_path / "a", tmp_path / "b"
    m.main(smoke(a, stage="teacher", teacher_iters=4, ckpt_every=100))
    m.main(smoke(b, stage="teacher", teacher_iters=2, ckpt_every=100))      # "interrupted" at step 2
    m.main(smoke(b, stage="teacher", teacher_iters=4, ckpt_every=100, resume=True))  # from step 2
    m.main(smoke(a, stage="distill", distil_iters=4, control_iters=0, ckpt_every=100))
    accumulate = m.accumulate

    def ctrl_c_at_step_1(*args):
        if args[7] == 1:                                                 # accumulate's `step`
            raise KeyboardInterrupt
        return accumulate(*args)
    monkeypatch.setattr(m, "accumulate", ctrl_c_at_step_1)
    with pytest.raises(SystemExit, match="interrupted: student state at step 1"):  # stops, saves
        m.main(smoke(b, stage="distill", distil_iters=4, control_iters=0, ckpt_every=100))
    monkeypatch.setattr(m, "accumulate", accumulate)
    m.main(smoke(b, stage="distill", distil_iters=4, control_iters=0, ckpt_every=100, resume=True))
    for name in ("teacher_state", "teacher", "student_state", "student"):
        sa = torch.load(a / f"{name}.pt", weights_only=True)
        sb = torch.load(b / f"{name}.pt", weights_only=True)
        assert sa["step"] == sb["step"] == 4, name
        for key in ("model", "ema"):
            assert sa[key].keys() == sb[key].keys()
            for k in sa[key]:
                assert torch.equal(sa[key][k], sb[key][k]), (name, key, k)
        assert any(not torch.equal(sa["ema"][k], sa["model"][k]) for k in sa["model"]), name
        if not name.endswith("_state"):
            assert sa["id"] == sb["id"]


def test_eval_with_the_papers_fid_package(tmp_path, monkeypatch):
    """CIFAR-10 images are scored by pytorch-image-generation-metrics (the paper's package): the
    reference statistics are computed once from the training images (uint8 0..255) unless
    --fid_stats names a file, every sample set is scored against them, and a missing --fid_stats
    stops the run before any work. Di4C's validation scores the teacher and the student (steps 0
    and 1) against the test batch's own statistics, never the training images'. (The package's
    numbers themselves: tests/test_eval_images.py.)"""
    write_cifar10_batches(tmp_path / "cifar")
    from eval import inception, preflight
    calls = {"stats": [], "score": []}

    def stats(images, path):
        calls["stats"].append(images)
        open(path, "w").write("stats")

    def score(samples, stats_path):
        calls["score"].append((samples, stats_path))
        return {"fid": float(samples.float().mean()), "is_mean": 1.0, "is_std": 0.0}
    monkeypatch.setattr(inception, "pigm_stats", stats)
    monkeypatch.setattr(inception, "pigm_fid_is", score)
    monkeypatch.setattr(preflight, "package_needs", lambda packages: [])
    cfg = smoke(tmp_path / "run", dataset="cifar10", data_dir=str(tmp_path / "cifar"),
                teacher_iters=2, distil_iters=1)
    m.main(cfg)
    val_ref, ref = calls["stats"]     # Di4C's validation first: the test batch's statistics
    test_batch = (m.load_images(cfg, "val").long() * 256 // cfg.S).to(torch.uint8)   # 0..255
    assert torch.equal(val_ref, test_batch) and not torch.equal(ref[:5], test_batch)
    assert ref.dtype == torch.uint8 and ref.shape == (10, 3, 32, 32) and int(ref.max()) > 200
    val, calls["score"] = calls["score"][:3], calls["score"][3:]
    assert all(s.shape == (5, 3, 32, 32) and p.endswith("fid_stats_pigm_val.npz") for s, p in val)
    curve = json.load(open(tmp_path / "run" / "metrics.json"))["student"]["validation"]["curve"]
    assert [c["step"] for c in curve] == [0, 1]
    assert len(calls["score"]) == 5 and all(
        s.dtype == torch.uint8 and s.shape == (16, 3, 32, 32) and p.endswith("fid_stats_pigm.npz")
        for s, p in calls["score"])
    ev = json.load(open(tmp_path / "run" / "metrics.json"))["eval"]
    assert sorted(v["fid"] for v in ev.values()) == \
        pytest.approx(sorted(float(s.float().mean()) for s, _ in calls["score"]))
    m.main(m.make_config(m.Config, **{**vars(cfg), "stage": "eval"}))
    assert len(calls["stats"]) == 2                                   # computed once
    given = tmp_path / "given.npz"
    given.write_text("x")
    m.main(m.make_config(m.Config, **{**vars(cfg), "stage": "eval", "fid_stats": str(given)}))
    assert calls["score"][-1][1] == str(given) and len(calls["stats"]) == 2
    with pytest.raises(SystemExit, match="--fid_stats .*nope.npz' does not exist"):
        m.main(m.make_config(m.Config, **{**vars(cfg), "stage": "eval",
                                          "fid_stats": str(tmp_path / "nope.npz")}))


def test_second_di4c_round_from_a_student(tmp_path):
    second_di4c_round(m, smoke, tmp_path, "samples_{model}@2.pt", "images")


@pytest.mark.parametrize("data", ["photos", "scenes"])
def test_other_embedded_sets_end_to_end(tmp_path, data):
    """--dataset photos | scenes: the training images are the set's patches (their fixed 80 %;
    the other 20 % validates Di4C, tests/test_validation.py); the run scores with the
    classifier trained on that set (its own cache file), never with Inception."""
    from eval import digits
    cfg = smoke(tmp_path, dataset=data)
    assert torch.equal(m.load_images(cfg)[:, 0].long(), digits.digits_split(data)[0])
    m.main(cfg)
    ev = json.load(open(tmp_path / "metrics.json"))["eval"]
    assert ev and all(v["frechet"] > 0 for v in ev.values())
    assert (tmp_path / f"{data}_classifier.pt").exists()
    assert not (tmp_path / "digits_classifier.pt").exists()
