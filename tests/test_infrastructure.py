"""The shared infrastructure block (identical in the three scripts, tests/test_layout.py): no run
exits 0 with a wrong result. Stale checkpoints and samples are refused, a non-finite loss stops
before the update, Ctrl-C and a full disk keep the last good state, bad files give one line."""
import json
import os
import re
from dataclasses import asdict

import pytest
import torch

import cifar10_gaussian as cifar
import imagenet_masked as imagenet
import owt_masked as owt
from eval import text_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_of(m, tmp_path, name="run", **kw):
    return m.make_config(m.Config, preset="smoke", out_dir=str(tmp_path / name), **kw)


def stage(m, cfg, name, **kw):
    m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": name, **kw}))


# -----------------------------------------------------------------------------
# Stale state: a retrained teacher invalidates its student and every sample drawn from them


@pytest.mark.parametrize("m", [cifar, imagenet, owt], ids=["cifar", "imagenet", "owt"])
def test_retrained_teacher_makes_student_and_samples_stale(m, tmp_path):
    cfg = cfg_of(m, tmp_path)
    first = ("tokenize", "teacher", "distill", "sample") if m is imagenet else \
        ("teacher", "distill", "sample")
    for s in first:
        stage(m, cfg, s)
    stage(m, cfg, "teacher", teacher_iters=cfg.teacher_iters + 1)       # the teacher changes
    for s in ("sample", "eval"):                                         # its student is stale
        with pytest.raises(SystemExit, match="made from another teacher"):
            stage(m, cfg, s, teacher_iters=cfg.teacher_iters + 1)
    with pytest.raises(SystemExit, match="made from another teacher"):   # so is its state
        stage(m, cfg, "distill", teacher_iters=cfg.teacher_iters + 1, resume=True)
    stage(m, cfg, "distill", teacher_iters=cfg.teacher_iters + 1)        # a fresh student is fine
    with pytest.raises(SystemExit, match="made from another"):           # old samples are not
        stage(m, cfg, "eval", teacher_iters=cfg.teacher_iters + 1)


def test_samples_of_another_sampling_config_are_refused(tmp_path):
    cfg = cfg_of(owt, tmp_path)
    owt.main(cfg)
    with pytest.raises(SystemExit, match="another config .*n_samples"):
        stage(owt, cfg, "eval", n_samples=8)
    with pytest.raises(SystemExit, match="run --stage sample"):          # a step count not drawn
        stage(owt, cfg, "eval", steps=(2, 4, 8))
    with pytest.raises(SystemExit, match="run --stage teacher"):         # nothing there yet
        stage(owt, cfg_of(owt, tmp_path, "empty"), "eval")
    with pytest.raises(SystemExit, match="run --stage teacher"):
        stage(owt, cfg_of(owt, tmp_path, "empty"), "sample")


# -----------------------------------------------------------------------------
# Training: non-finite stop, Ctrl-C, full disk


def fit_owt(tmp_path, loss_fn, iters=4, **kw):
    cfg = cfg_of(owt, tmp_path, ckpt_every=2, **kw)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ctx = owt.Ctx(0, 1, torch.device("cpu"), cfg.out_dir, "float32")
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    batches = lambda step, rows, g: torch.randn(rows.stop - rows.start, 3, generator=g)
    return cfg, owt.fit(cfg, ctx, "toy", net, loss_fn, batches, iters, 1e-2, 4)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_state(tmp_path):
    def loss_fn(model, x, g):
        loss = model(x)[:, 0] ** 2
        bad = loss_fn.calls == 3
        loss_fn.calls += 1
        return loss * (float("nan") if bad else 1.0), {"part": loss.detach()}
    loss_fn.calls = 0
    with pytest.raises(SystemExit, match="toy step 3: non-finite loss") as e:
        fit_owt(tmp_path, loss_fn)
    assert "last good state" in str(e.value)
    state = torch.load(tmp_path / "run" / "toy_state.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not os.path.exists(tmp_path / "run" / "toy.pt")           # no finished model


def test_ctrl_c_saves_the_state_and_resume_is_exact(tmp_path):
    def loss_fn(model, x, g):
        loss_fn.calls += 1
        if loss_fn.calls == 4 and loss_fn.interrupt:
            raise KeyboardInterrupt
        return model(x)[:, 0] ** 2, {}
    loss_fn.calls, loss_fn.interrupt = 0, False
    fit_owt(tmp_path / "full", loss_fn, iters=6)
    loss_fn.calls, loss_fn.interrupt = 0, True
    with pytest.raises(SystemExit, match="interrupted: toy state at step 3 saved"):
        fit_owt(tmp_path / "cut", loss_fn, iters=6)
    loss_fn.interrupt = False
    fit_owt(tmp_path / "cut", loss_fn, iters=6, resume=True)
    a, b = (torch.load(tmp_path / d / "run" / "toy.pt", weights_only=True) for d in ("full", "cut"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_full_disk_leaves_no_temp_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    owt.save_checkpoint(path, {"config": {}, "v": 1})

    def full(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="could not write checkpoint .*No space left.*kept"):
        owt.save_checkpoint(path, {"config": {}, "v": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.load(path, weights_only=True)["v"] == 1


def test_truncated_or_foreign_checkpoints_give_one_line(tmp_path):
    cfg = cfg_of(owt, tmp_path)
    stage(owt, cfg, "teacher")
    path = os.path.join(cfg.out_dir, "teacher.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*teacher\.pt"):
        stage(owt, cfg, "distill")
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit, match="not a checkpoint written by this script"):
        stage(owt, cfg, "distill")


def test_identical_runs_and_one_resume_default(tmp_path):
    """Two runs of one config train bitwise the same weights with the same weights_id, a content
    hash (names, shapes, dtypes, bytes; one function in the three scripts) by which children and
    samples know a checkpoint. Resume is off by default in all three scripts (dataclass and CLI):
    rerunning a command in an out_dir that holds a saved state (step 3 of 6) starts over, all 6
    steps, and ends where a fresh run ends; --resume true runs only the 3 steps left."""
    for m in (cifar, imagenet, owt):
        assert m.Config().resume is False and m.parse_config(m.Config, []).resume is False
        assert m.parse_config(m.Config, ["--resume", "true"]).resume is True

    def loss_fn(model, x, g):
        loss_fn.calls += 1
        if loss_fn.calls == 4 and loss_fn.interrupt:
            raise KeyboardInterrupt
        return model(x)[:, 0] ** 2, {}
    runs = {}
    for name, interrupt, resume in (("a", False, False), ("b", False, False),
                                    ("c", True, False), ("c", False, False),
                                    ("d", True, False), ("d", False, True)):
        loss_fn.calls, loss_fn.interrupt = 0, interrupt
        if interrupt:
            with pytest.raises(SystemExit, match="interrupted: toy state at step 3 saved"):
                fit_owt(tmp_path / name, loss_fn, iters=6)
            continue
        fit_owt(tmp_path / name, loss_fn, iters=6, resume=resume)
        runs[name] = (loss_fn.calls, torch.load(tmp_path / name / "run" / "toy.pt",
                                                weights_only=True))
    assert [runs[k][0] for k in "abcd"] == [6, 6, 6, 3]       # c starts over, d resumes
    a = runs["a"][1]
    assert a["id"] == owt.weights_id(a["model"])
    for k in "bcd":
        assert runs[k][1]["step"] == 6 and runs[k][1]["id"] == a["id"]
        assert all(torch.equal(a["model"][n], runs[k][1]["model"][n]) for n in a["model"])
    log = open(tmp_path / "c" / "run" / "log.txt").read()
    assert "resumed" not in log and "resumed" in open(tmp_path / "d" / "run" / "log.txt").read()
    one = {"a": torch.ones(2)}                       # each variant differs in one respect only
    variants = [one, {"b": torch.ones(2)}, {"a": torch.ones(1, 2)}, {"a": torch.tensor([1.0, 0.0])},
                {"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.int32)}]  # same bytes
    assert len({owt.weights_id(v) for v in variants}) == len(variants)
    assert {m.weights_id({"a": torch.ones(2)}) for m in (cifar, imagenet, owt)} == \
        {owt.weights_id(one)}


# -----------------------------------------------------------------------------
# Bad data files: one line naming the file


def test_bad_image_files_and_batches_give_one_line(tmp_path):
    from PIL import Image
    from pretrained import maskgit
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (12, 12)).save(tmp_path / "imgs" / cls / "ok.png")
    (tmp_path / "imgs" / "b" / "bad.png").write_bytes(b"not a png")
    cfg = imagenet.make_config(imagenet.Config, preset="smoke", dataset="folder",
                               data_dir=str(tmp_path / "imgs"), img_size=8, vqgan_ckpt="")
    with pytest.raises(SystemExit, match=r"cannot read image .*bad\.png"):
        maskgit.load_images(imagenet.image_folder(cfg, "train"))
    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"\x80\x04garbage")
    with pytest.raises(SystemExit, match=r"data_batch_1' is not a CIFAR-10 python batch"):
        cifar.load_images(cifar.make_config(cifar.Config, preset="smoke", dataset="cifar10",
                                            data_dir=str(tmp_path / "c")))


def test_binary_text_and_unknown_validation_tokens(tmp_path):
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 50)
    cfg = cfg_of(owt, tmp_path, data_files=str(tmp_path / "bin.txt"))
    with pytest.raises(SystemExit, match="could not read --data_files"):
        text_data.load_documents(cfg)
    import datasets                                   # validation text unlike the training text
    docs = ["the cat sat on the mat " * 20] * 12 + ["zebra quartz jukebox vexed " * 20] * 4
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    cfg = cfg_of(owt, tmp_path, "unk", data_files=str(tmp_path / "c.parquet"), stage="teacher")
    owt.main(cfg)
    log = open(os.path.join(cfg.out_dir, "log.txt")).read()
    assert re.search(r"warning: 9\d\.\d% unknown validation tokens", log), log  # all but EOT


# -----------------------------------------------------------------------------
# Scoring a finished run that may not be written to, into a new --out_dir


def snapshot_of(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.parametrize("m", [cifar, imagenet, owt], ids=["cifar", "imagenet", "owt"])
def test_eval_of_a_read_only_run_into_a_new_out_dir(m, tmp_path):
    run = cfg_of(m, tmp_path, "run")
    m.main(run)
    before = snapshot_of(run.out_dir)
    os.chmod(run.out_dir, 0o555)                       # as far as this user's rights go
    try:
        new = cfg_of(m, tmp_path, "scores", stage="eval", run_dir=run.out_dir)
        m.main(new)
    finally:
        os.chmod(run.out_dir, 0o755)
    assert snapshot_of(run.out_dir) == before          # nothing written into the run
    a = json.load(open(os.path.join(run.out_dir, "metrics.json")))["eval"]
    b = json.load(open(os.path.join(new.out_dir, "metrics.json")))["eval"]
    assert a == b and len(a) >= 5                      # the same scores, written elsewhere


def test_resume_with_another_objective_is_refused(tmp_path):
    """--resume continues a state only under the config that shaped it (the objective too)."""
    cfg = cfg_of(owt, tmp_path, control_iters=0)
    stage(owt, cfg, "teacher")
    stage(owt, cfg, "distill")
    with pytest.raises(SystemExit, match="another config .*delta"):
        stage(owt, cfg, "distill", resume=True, distil_iters=5, delta=0.1)
    stage(owt, cfg, "distill", resume=True, distil_iters=5)           # same objective: continues
    assert torch.load(os.path.join(cfg.out_dir, "student.pt"), weights_only=True)["step"] == 5


def test_three_bad_inputs_stop_before_any_work_with_one_line(tmp_path):
    """An --out_dir that is a file (all three scripts), an empty --data_files file (text) and
    more image steps than the schedule can run: one line each, before anything is written."""
    import cifar10_gaussian as cifar
    import imagenet_masked as imagenet
    import owt_masked as owt
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for m in (cifar, imagenet, owt):
        cfg = m.make_config(m.Config, preset="smoke", out_dir=str(afile))
        with pytest.raises(SystemExit, match=r"^error: --out_dir .*a_file' is a file, not a folder$"):
            m.main(cfg)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "full.txt").write_text("some text")
    cfg = owt.make_config(owt.Config, preset="smoke", out_dir=str(tmp_path / "o"),
                          data_files=str(tmp_path / "*.txt"))
    with pytest.raises(SystemExit, match=r"--data_files file .*empty.txt' is empty"):
        owt.main(cfg)
    assert not (tmp_path / "o").exists()
    for steps in (dict(student_steps=(64,)), dict(steps=(2, 80))):
        cfg = imagenet.make_config(imagenet.Config, preset="smoke", out_dir=str(tmp_path / "i"),
                                   **steps)
        with pytest.raises(SystemExit, match=r"^error: \d+ steps cannot reveal 64 tokens"):
            imagenet.main(cfg)
        assert not (tmp_path / "i").exists()
