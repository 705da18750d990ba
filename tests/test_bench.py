"""bench/paper_shapes.py at the real D and S with narrow networks: every paper preset runs every
training stage and sampler on CPU from data in the real on-disk formats, and the projection is
made of counted FLOPs and measured memory."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"cifar10_gaussian": ("3x32x32", 256), "imagenet_masked": (256, 1025),
          "owt_masked": (1024, 50258)}
FITS = {"cifar10_gaussian": {"teacher", "student", "control"},
        "imagenet_masked": {"teacher", "student", "control"},
        "owt_masked": {"teacher", "student", "control", "judge"}}


def test_paper_shapes_narrow(tmp_path):
    r = subprocess.run([sys.executable, os.path.join("bench", "paper_shapes.py"), "--narrow",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = {x["script"]: x for x in json.load(open(tmp_path / "paper_shapes.json"))}
    assert set(results) == set(SHAPES)
    for name, res in results.items():
        assert (res["D"], res["S"]) == SHAPES[name], name            # the real shapes ran
        fits = {f["stage"]: f for f in res["fits"]}
        assert set(fits) == FITS[name]
        for stage, f in fits.items():
            assert f["tflop_per_step"] > 0 and f["cpu_s_per_step"] > 0, (name, stage)
            assert f["gb_per_gpu"] > 0 and f["cpu_peak_gb"] > 0, (name, stage)
            assert (f["a100_hours"] > f["h100_hours"] > 0) == (f["preset_iters"] > 0)
        # the Di4C step runs the network on L lambdas per x_t: more FLOPs per x_t than a
        # teacher step per image
        s, t = fits["student"], fits["teacher"]
        assert s["tflop_per_step"] / s["preset_batch"] > t["tflop_per_step"] / t["preset_batch"]
    table = open(tmp_path / "paper_shapes.md").read()
    assert table.count("\n| ") == 1 + sum(len(v) for v in FITS.values())


def test_step_cost_runs_every_domain():
    """bench/step_cost.py at the demo sizes: a teacher step and a Di4C step per domain, every
    time positive (the ratios themselves go in docs, not tests)."""
    r = subprocess.run([sys.executable, os.path.join("bench", "step_cost.py"), "--sizes", "demo",
                        "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    steps = {(c[0].strip(), c[2].strip()) for c in rows}
    for domain in ("text", "images", "pixels"):
        assert (domain, "Di4C step") in steps
        assert any(d == domain and s.startswith("teacher step") for d, s in steps)
    assert len(rows) == 6 and all(float(c[5]) > 0 for c in rows)
