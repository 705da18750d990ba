"""eval/results_table.py: matched-quality step speedups and the Markdown tables."""
import json
import re

import pytest

from eval import results_table as rt

TEACHER = [(2, 8.0), (4, 4.0), (8, 2.0), (16, 1.0)]


def test_matched_nfe_interpolates_in_log_nfe():
    assert rt.matched_nfe(TEACHER, 4.0) == (4, "=")
    n, rel = rt.matched_nfe(TEACHER, 3.0)                  # halfway: NFE 4 and 8 in log NFE
    assert rel == "=" and n == pytest.approx(4 * 2 ** 0.5)
    assert rt.matched_nfe(TEACHER, 0.5) == (16, ">")       # beats every teacher NFE
    assert rt.matched_nfe(TEACHER, 9.0) == (2, "<")        # worse than the fewest
    higher = [(n, -s) for n, s in TEACHER]                 # a higher-is-better metric
    assert rt.matched_nfe(higher, -4.0, lower=False) == (4, "=")
    assert rt.speedup(TEACHER, 4, 2.0) == "2.0x" and rt.speedup(TEACHER, 8, 0.5) == ">2.0x"


def test_tables_from_metrics(tmp_path, capsys):
    rows = [dict(model="teacher", nfe=n, steps=n, frechet=s) for n, s in TEACHER]
    rows += [dict(model="student", nfe=4, steps=4, frechet=2.0),
             dict(model="control", nfe=4, steps=4, frechet=4.0)]
    (tmp_path / "metrics.json").write_text(json.dumps({"results": rows, "primary": "frechet"}))
    rt.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| student |  | 2.00 (2.0x) |  |  |" in out and "| control |  | 4.00 (1.0x) |" in out
    with pytest.raises(SystemExit, match="not found"):
        rt.main([str(tmp_path / "nope")])


def test_speedups_per_cfg_weight_against_that_weights_teacher():
    rows = [dict(model="teacher", nfe=n, w=w, frechet=s * (1 + w)) for n, s in TEACHER
            for w in (0, 1)]
    rows += [dict(model="student", nfe=4, w=0, frechet=2.0),     # teacher w0 at 8 NFE: 2x
             dict(model="student", nfe=4, w=1, frechet=2.0),     # teacher w1 reaches 2.0 at 16
             dict(model="hybrid", nfe=2, w=0, frechet=0.5)]      # beats every teacher NFE
    got = {(r["model"], r["w"]): r for r in rt.speedups(rows, "frechet")}
    assert set(got) == {("student", 0), ("student", 1), ("hybrid", 0)}
    assert got["student", 0]["speedup"] == pytest.approx(2.0) and got["student", 0]["relation"] == "="
    assert got["student", 1]["speedup"] == pytest.approx(4.0)
    assert got["hybrid", 0]["relation"] == ">" and got["hybrid", 0]["speedup"] == 8.0


def test_seed_table_mean_sd_and_per_run_speedups(tmp_path, capsys):
    """--seeds: cells are mean ± sd (n - 1) over the runs; each run's speedup is measured against
    that run's own teacher; a bound in only some runs is marked "~"."""
    runs = []
    for i, (student, shift) in enumerate([(2.0, 1.0), (4.0, 1.0), (2.0, 2.0)]):
        rows = [dict(model="teacher", nfe=n, frechet=s * shift) for n, s in TEACHER]
        rows += [dict(model="student", nfe=4, frechet=student),
                 dict(model="control", nfe=4, frechet=17.0)]
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "metrics.json").write_text(
            json.dumps({"results": rows, "primary": "frechet"}))
        runs.append(str(tmp_path / f"s{i}"))
    rt.main(["--seeds"] + runs)
    out = capsys.readouterr().out
    # student 2, 4, 2: mean 8/3, sd sqrt((4/9 + 16/9 + 4/9) / 2) = 1.15; speedups against each
    # run's own teacher: 8/4 = 2, 4/4 = 1, and 2.0 against 2 * (8, 4, 2, 1) (its last point,
    # "="): 16/4 = 4; mean 7/3, sd sqrt((1/9 + 16/9 + 25/9) / 2) = 1.53
    assert "| student |  | 2.67 ± 1.15 (2.3 ± 1.5x) |" in out
    assert "| control |  | 17.00 ± 0.00 (<0.5 ± 0.0x) |" in out    # worse than every teacher NFE
    assert "| teacher | 10.67 ± 4.62 |" in out                            # 8, 8, 16
    (tmp_path / "s2" / "metrics.json").write_text(json.dumps({"results": [
        dict(model="teacher", nfe=n, frechet=s) for n, s in TEACHER] + [
        dict(model="student", nfe=4, frechet=0.5), dict(model="control", nfe=4, frechet=17.0)],
        "primary": "frechet"}))
    rt.main(["--seeds"] + runs)
    assert "| student |  | 2.17 ± 1.76 (~2.3 ± 1.5x) |" in capsys.readouterr().out  # 2, 1, >16/4
    rows = [dict(model="teacher", nfe=n, steps=n, frechet=s) for n, s in TEACHER]
    (tmp_path / "s2" / "metrics.json").write_text(json.dumps({"results": rows + [
        dict(model="student", nfe=5.0, steps=4, frechet=2.0),     # NFE measured: 5 for 4 steps
        dict(model="control", nfe=4, steps=4, frechet=17.0)], "primary": "frechet"}))
    rt.main(["--seeds"] + runs)                # keyed by step count; that run's speedup 8/5
    assert "| student |  | 2.67 ± 1.15 (1.5 ± 0.5x) |" in capsys.readouterr().out
    (tmp_path / "s2" / "metrics.json").write_text(json.dumps({"results": [], "primary": "frechet"}))
    with pytest.raises(SystemExit, match="differ in their models"):
        rt.main(["--seeds"] + runs)
    with pytest.raises(SystemExit, match="at least two"):
        rt.main(["--seeds", runs[0]])


def test_teacher_from_measures_against_another_runs_teacher(tmp_path, capsys):
    """--teacher_from: a round-2 run (its own "teacher" the round-1 student) is measured against
    the product teacher of the base run; one base per run; the metric must match."""
    base = [dict(model="teacher", nfe=n, steps=n, frechet=s) for n, s in TEACHER]
    round2 = [dict(model="teacher", nfe=n, steps=n, frechet=s / 4) for n, s in TEACHER]
    round2 += [dict(model="student", nfe=4, steps=4, frechet=2.0)]
    for name, rows in (("base", base), ("r2", round2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"results": rows, "primary": "frechet"}))
    r2, b = str(tmp_path / "r2"), str(tmp_path / "base")
    rt.main([r2])
    assert "| student |  | 2.00 (0.5x) ! |" in capsys.readouterr().out  # = its round-1 student at 2
    rt.main([r2, "--teacher_from", b])
    out = capsys.readouterr().out
    assert "r2 vs base's teacher" in out and "| teacher | 8.00 | 4.00 |" in out
    assert "| student |  | 2.00 (2.0x) |" in out                    # 2.0 is the base's NFE 8
    rt.main(["--seeds", r2, r2, "--teacher_from", b, b])
    assert "| student |  | 2.00 ± 0.00 (2.0 ± 0.0x) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="one run folder per run"):
        rt.main(["--seeds", r2, r2, "--teacher_from", b])
    (tmp_path / "base" / "metrics.json").write_text(json.dumps({"results": base, "primary": "fid"}))
    with pytest.raises(SystemExit, match="measures fid"):
        rt.main([r2, "--teacher_from", b])
    (tmp_path / "base" / "metrics.json").write_text(json.dumps(
        {"results": [dict(r, w=1.0) for r in base], "primary": "frechet"}))
    with pytest.raises(SystemExit, match="no teacher rows"):
        rt.main([r2, "--teacher_from", b])


def test_cells_worse_than_the_teacher_are_marked(tmp_path, capsys):
    """"!" marks a student cell worse than its teacher at the same NFE (the warning's cells);
    with --seeds "!k/n" counts the runs where it is; the control is never marked."""
    runs = []
    for i, student in enumerate([5.0, 3.0, 6.0]):                  # teacher at 4 NFE: 4.0
        rows = [dict(model="teacher", nfe=n, frechet=s) for n, s in TEACHER]
        rows += [dict(model="student", nfe=4, frechet=student),
                 dict(model="control", nfe=4, frechet=9.0)]
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "metrics.json").write_text(
            json.dumps({"results": rows, "primary": "frechet"}))
        runs.append(str(tmp_path / f"s{i}"))
    rt.main([runs[0], runs[1]])
    out = capsys.readouterr().out
    assert re.search(r"\| student \|  \| 5\.00 \([0-9.]+x\) ! \|", out)
    assert re.search(r"\| student \|  \| 3\.00 \([0-9.]+x\) \|", out)
    assert "| control |  | 9.00 (<0.5x) |" in out
    rt.main(["--seeds"] + runs)
    assert " !2/3 |" in capsys.readouterr().out
