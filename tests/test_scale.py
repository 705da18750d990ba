"""Multi-process training at any world size (the shared infrastructure block): batch_plan
splits any global batch over any number of ranks and micro-batches, the accumulated gradient is
the global batch's, and every collective goes through Ctx with tensors on the training device."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import cifar10_gaussian as cifar
import imagenet_masked as imagenet
import owt_masked as owt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ctx_of(rank, world_size, device="cpu", out_dir="."):
    return owt.Ctx(rank, world_size, torch.device(device), out_dir, "float32")


@pytest.mark.parametrize("B", range(1, 13))
def test_batch_plan_partitions_every_global_batch(B):
    """Exhaustive over W <= 5 ranks and micro-batches of 0..4 rows: the ranks' rows are the
    global batch exactly once, every rank has the same number of micro-steps, none is larger
    than micro_batch, and the last (the DDP sync) is never empty."""
    for W in range(1, 6):
        for m in range(5):
            if B < W:
                with pytest.raises(SystemExit, match=f"global batch of {B} cannot be split "
                                                     f"over {W} ranks"):
                    owt.batch_plan(ctx_of(0, W), B, m)
                continue
            plans = [owt.batch_plan(ctx_of(r, W), B, m) for r in range(W)]
            rows = [i for p in plans for s in p for i in range(s.start, s.stop)]
            assert sorted(rows) == list(range(B)), (B, W, m)
            assert len({len(p) for p in plans}) == 1
            assert all(p[-1].stop > p[-1].start for p in plans)
            assert m == 0 or all(s.stop - s.start <= m for p in plans for s in p)
            assert m == 0 or len(plans[0]) == -(-(-(-B // W)) // m)


def toy_fit(tmp_path, name, ctx, micro_batch, steps=3, B=5):
    """fit on a linear model with a loss that draws nothing: the update depends only on the
    global batch's rows, however they are split."""
    cfg = owt.make_config(owt.Config, preset="smoke", out_dir=str(tmp_path / name),
                          micro_batch=micro_batch)
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    data = owt.epoch_batches((torch.randn(4 * B, 3, generator=torch.Generator().manual_seed(1)),),
                       cfg, ctx, B)
    loss = lambda model, batch, g: ((model(batch[0])[:, 0] - 1) ** 2, {})
    owt.fit(cfg, ctx, "toy", net, loss, data, steps, 0.1, B)
    return net.weight.detach().clone()


def test_accumulated_gradient_is_the_global_batch_gradient(tmp_path):
    """Micro-batches of 1, 2 and 3 rows give the same weights as the whole batch at once
    (float32 round-off), and so does a world size that does not divide the batch (tested with
    two processes in test_two_process_fit_matches_one_process)."""
    ctx = ctx_of(0, 1, out_dir=str(tmp_path))
    whole = toy_fit(tmp_path, "whole", ctx, 0)
    for m in (1, 2, 3):
        assert torch.allclose(toy_fit(tmp_path, f"m{m}", ctx, m), whole, atol=1e-6), m


def test_ctx_collectives_move_tensors_to_the_training_device(monkeypatch):
    """Ctx.sum hands dist.all_reduce a float32 tensor on the training device whatever device
    the input is on (nccl serves CUDA tensors only; 'meta' stands in for a GPU here), and the
    barrier names the GPU of the rank."""
    seen = []
    monkeypatch.setattr(owt.dist, "all_reduce", lambda x, *a, **k: seen.append(x.device))
    monkeypatch.setattr(owt.dist, "barrier", lambda *a, **k: seen.append(k))
    ctx = ctx_of(0, 2, device="meta")
    ctx.sum(torch.ones(3))
    ctx.sum(torch.ones(3, dtype=torch.float64))
    assert seen == [torch.device("meta")] * 2
    ctx_of(1, 2, device="cuda:1").barrier()
    assert seen[-1] == {"device_ids": [1]}


def torchrun(args, out, timeout=600):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.join("tests", "dist_probe.py"),
                        str(out / "calls"), *args, "--out_dir", str(out), "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.load(open(out / f"calls{rank}.json")) for rank in range(2)]


def test_two_process_fit_matches_one_process(tmp_path):
    """fit under torchrun with 2 ranks, a global batch of 5 (3 + 2 rows) and micro-batches of
    one row: the weights equal the single-process, whole-batch run's."""
    script = tmp_path / "two.py"
    script.write_text(
        "import sys, torch, os\nsys.path[:0] = [%r, os.path.join(%r, 'tests')]\n"
        "import test_scale as ts, owt_masked as owt\nfrom pathlib import Path\n"
        "r, w, dev = owt.setup_dist('cpu', 5)\nctx = ts.ctx_of(r, w, out_dir=%r)\n"
        "weight = ts.toy_fit(Path(%r), 'two', ctx, 1)\n"
        "if r == 0:\n    torch.save(weight, %r)\nctx.barrier(); torch.distributed.destroy_process_group()\n"
        % (ROOT, ROOT, str(tmp_path), str(tmp_path), str(tmp_path / "w.pt")))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one = toy_fit(tmp_path, "one", ctx_of(0, 1, out_dir=str(tmp_path)), 0)
    assert torch.allclose(torch.load(tmp_path / "w.pt"), one, atol=1e-6)


CTX_METHODS = {"barrier", "sum", "gather"}
ODD = {   # global batches that 2 ranks cannot split evenly, and micro-batches (accumulation)
    "cifar": ["cifar10_gaussian.py", "--preset", "smoke", "--teacher_batch", "5",
              "--batch_size", "3", "--micro_batch", "1"],
    "imagenet": ["imagenet_masked.py", "--preset", "smoke", "--batch_size", "7",
                 "--distil_batch", "3", "--micro_batch", "1"],
    "owt": ["owt_masked.py", "--preset", "smoke",
            "--batch_size", "7", "--distil_batch", "3", "--micro_batch", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ODD))
def test_torchrun_two_processes_odd_batches_and_accumulation(name, tmp_path):
    """Every stage of the smoke preset under torchrun with 2 CPU ranks, odd global batches and
    micro-batches; every collective call (recorded by tests/dist_probe.py) comes from a Ctx
    method and gets tensors on the training device only."""
    calls = torchrun(ODD[name], tmp_path)
    log = open(tmp_path / "log.txt").read()
    assert "world size 2" in log and "micro-step" in log
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["results"] and all(r["model"] for r in metrics["results"])
    assert {r["model"] for r in metrics["speedup"]} >= {"student", "control"}
    assert all(r["speedup"] > 0 and r["relation"] in "=<>" for r in metrics["speedup"])
    micro = re.search(r"student: global batch 3 = 2 rank\(s\) x (\d+) micro-step", log)
    assert micro and int(micro.group(1)) >= 2
    for rank_calls in calls:
        assert rank_calls, "no collective recorded"
        assert {c["caller"] for c in rank_calls} <= CTX_METHODS, \
            {(c["file"], c["caller"]) for c in rank_calls if c["caller"] not in CTX_METHODS}
        assert {d for c in rank_calls for d in c["devices"]} <= {"cpu"}
        assert {c["op"] for c in rank_calls} >= {"all_reduce", "barrier", "all_gather_object"} \
            - ({"all_gather_object"} if name == "cifar" else set())


def test_compile_trains_like_eager_and_saves_plain_names(tmp_path):
    """--compile: torch.compile'd training reaches the eager weights (float32 round-off), and
    the checkpoint has the module's own parameter names (no _orig_mod. prefix)."""
    ctx = ctx_of(0, 1, out_dir=str(tmp_path))
    eager = toy_fit(tmp_path, "eager", ctx, 0)
    cfg = owt.make_config(owt.Config, preset="smoke", out_dir=str(tmp_path / "c"), compile=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    data = owt.epoch_batches((torch.randn(20, 3, generator=torch.Generator().manual_seed(1)),),
                       cfg, ctx, 5)
    owt.fit(cfg, ctx, "toy", net, lambda m, b, g: ((m(b[0])[:, 0] - 1) ** 2, {}), data, 3,
            0.1, 5)
    assert torch.allclose(net.weight, eager, atol=1e-5)
    assert set(torch.load(tmp_path / "c" / "toy.pt", weights_only=True)["model"]) == \
        {"weight", "bias"}


# -----------------------------------------------------------------------------
# Fail fast: a paper run stops before any work when a later stage would fail


def hide_packages(monkeypatch, *names):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in names else find(name, *a, **k))


def test_paper_run_without_metric_package_stops_before_training(tmp_path, monkeypatch):
    """The paper presets with torch-fidelity / transformers missing: one message naming the
    package and the install command, and nothing written (no data cache, no checkpoint)."""
    hide_packages(monkeypatch, "torch_fidelity", "transformers", "pytorch_image_generation_metrics")
    runs = [(cifar, dict(data_dir=str(tmp_path / "cifar")),
             "FID / IS .*pytorch-image-generation-metrics"),
            (imagenet, dict(vqgan_ckpt="", data_dir=str(tmp_path / "inet")),
             "FID / IS .*torch-fidelity.*requirements-paper.*FID reference images"),
            (owt, dict(judge="gpt2-large"), "--judge gpt2-large needs the package transformers")]
    for m, kw, message in runs:
        out = tmp_path / m.__name__
        cfg = m.make_config(m.Config, preset="paper", out_dir=str(out), **kw)
        with pytest.raises(SystemExit, match=f"later stage .*{message}.*(requirements-paper|val)"):
            m.main(cfg)
        assert not out.exists(), m.__name__
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                  # the judge's weights, offline
    monkeypatch.setattr(owt.text_metrics, "gpt2_large_cached", lambda: False)
    with pytest.raises(SystemExit, match="gpt2-large weights, which are not in the Hugging Face "
                                         "cache.*from_pretrained"):
        owt.main(owt.make_config(owt.Config, preset="paper", out_dir=str(tmp_path / "j"),
                                 judge="gpt2-large"))
    # Di4C validates with the same package on CIFAR-10 and ImageNet (FID on held-out images)
    for m in (cifar, imagenet):
        needs = " ".join(p for stage in ("teacher", "distill") for p, _ in m.run_needs(
            m.make_config(m.Config, preset="paper", stage=stage, data_dir=str(tmp_path / "no"))))
        assert needs.count("FID / IS") == 1 and "validation" in needs, m.__name__
    # a stage that needs no metric passes the check (and fails later for its own reasons)
    assert owt.run_needs(owt.make_config(owt.Config, judge="gpt2-large", stage="teacher",
                                         teacher_ckpt="")) == []
    # the text paper preset's teacher is SDTT-7's released file: missing, the fix is its download
    with pytest.raises(SystemExit, match="teacher 'pretrained_sdtt/sdtt7/model.safetensors' is "
                                         "not there .*huggingface-cli download jdeschena/sdtt "
                                         "model.safetensors --revision baselines_kld_step_70000"):
        owt.main(owt.make_config(owt.Config, preset="paper", out_dir=str(tmp_path / "k"),
                                 judge="trained", stage="distill"))


def test_missing_checkpoints_and_data_stop_before_training(tmp_path):
    cfg = imagenet.make_config(imagenet.Config, preset="smoke", dataset="folder",
                               vqgan_ckpt=str(tmp_path / "no.ckpt"),
                               teacher_ckpt=str(tmp_path / "no.pth"), out_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="vqgan_ckpt .*no.ckpt.* does not exist.*teacher_ckpt"):
        imagenet.main(cfg)
    cfg = owt.make_config(owt.Config, preset="smoke", data_files=str(tmp_path / "*.parquet"),
                          out_dir=str(tmp_path / "o"))
    with pytest.raises(SystemExit, match="data_files .* matched no file"):
        owt.main(cfg)
    cfg = cifar.make_config(cifar.Config, preset="smoke", out_dir=str(tmp_path / "c"),
                            teacher_ckpt=str(tmp_path / "t.pt"), stage="distill")
    with pytest.raises(SystemExit, match="teacher_ckpt .*t.pt.* does not exist"):
        cifar.main(cfg)
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)     # no test batch
    cfg = cifar.make_config(cifar.Config, preset="smoke", out_dir=str(tmp_path / "c"),
                            dataset="cifar10", data_dir=str(tmp_path / "cifar"), stage="distill")
    with pytest.raises(SystemExit, match="test_batch' not found .*Di4C's validation"):
        cifar.main(cfg)


@pytest.mark.slow
def test_two_processes_with_one_row_micro_batches_reproduce_one_process(tmp_path):
    """The guarantee of docs/scale.md: a micro-batch's draws depend on (seed, stage, step, its
    first global row) only, so with --micro_batch 1 a 2-process run of owt_masked.py (text:
    the data rows are drawn too) trains the same student and control as 1 process, batches of 3
    rows (2 + 1 over the ranks)."""
    base = ["--preset", "smoke", "--device", "cpu",
            "--distil_batch", "3", "--batch_size", "3", "--distil_iters", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    teacher = tmp_path / "teacher"
    owt.main(owt.make_config(owt.Config, preset="smoke",
                             out_dir=str(teacher), stage="teacher", batch_size=3))

    def distill(name, nproc, micro):
        args = base + ["--stage", "distill", "--out_dir", str(tmp_path / name),
                       "--teacher_ckpt", str(teacher / "teacher.pt"), "--micro_batch", micro]
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
        r = subprocess.run(launch + ["owt_masked.py", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return {k: torch.load(tmp_path / name / f"{k}.pt", weights_only=True)["model"]
                for k in ("student", "control")}

    one, two = distill("one", 1, "1"), distill("two", 2, "1")
    for k in one:
        for n, w in one[k].items():
            assert torch.allclose(w, two[k][n], atol=1e-5, rtol=1e-4), (k, n)
