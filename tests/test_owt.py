"""owt_masked.py: tokenizer ids, data pipeline, student == teacher at init, smoke end to end,
exact resume, 2-process torchrun on CPU, clear errors. CPU, offline."""
import json
import math
import os
import random
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import owt_masked as m
from tests.runs import metrics_without_timings, second_di4c_round
from eval import text_data, text_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = os.path.join(ROOT, "assets", "gpt2.tiktoken")
WORDS = ("the cat sat on a mat and dog ran to red blue house tree river stone "
         "light dark small big old new").split()


def write_corpus(tmp_path, n_docs=40, kind="jsonl"):
    """A tiny corpus with a ~100-id vocabulary, so the tests run in seconds."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(n_docs)]
    if kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif kind == "txt":                                  # one document per file
        for i, d in enumerate(docs):
            (tmp_path / f"doc_{i:03d}.txt").write_text(d)
        path = tmp_path / "doc_*.txt"
    elif kind == "parquet":
        import datasets
        path = tmp_path / "corpus.parquet"
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    else:                               # shards as docs/owt.md's export command writes them
        import datasets
        ds = datasets.Dataset.from_dict({"text": docs})
        for i in range(12):             # 12 > 10: names sort in document order (zero-padded)
            ds.shard(12, i, contiguous=True).to_parquet(str(tmp_path / f"owt-{i:05d}.parquet"))
        path = tmp_path / "owt-*.parquet"
    return str(path), docs


def smoke_cfg(tmp_path, name="run", **kw):
    return m.make_config(m.Config, preset="smoke", out_dir=str(tmp_path / name), **kw)


def ctx_for(cfg):
    os.makedirs(cfg.out_dir, exist_ok=True)
    return m.Ctx(0, 1, torch.device("cpu"), cfg.out_dir, "float32")


def test_tokenizer_matches_gpt2():
    enc = text_data.gpt2_encoding(RANKS)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "parquet_shards"])
def test_local_files_pipeline(tmp_path, kind):
    path, docs = write_corpus(tmp_path, kind=kind)
    cfg = smoke_cfg(tmp_path, data_files=path, val_docs=4, seq_len=16)
    corpus = m.Corpus(cfg, ctx_for(cfg))
    enc = corpus.enc
    train_docs = docs[:len(docs) - cfg.val_docs]
    expected = [t for d in train_docs for t in enc.encode_ordinary(d) + [text_data.EOT]]
    n = len(expected) // 16
    got = corpus.gpt2_ids(corpus.get("train", np.arange(n))).flatten().tolist()
    assert got == expected[:n * 16]
    assert corpus.mask_id == corpus.S - 1 and corpus.unk == corpus.S - 2
    assert corpus.decode(corpus.get("train", [0])[0].tolist()).startswith(train_docs[0][:20])


def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="matched no file"):
        m.Corpus(*(lambda c: (c, ctx_for(c)))(smoke_cfg(tmp_path, data_files="/nonexistent/*.txt")))
    path, _ = write_corpus(tmp_path, n_docs=3)
    with pytest.raises(SystemExit, match="documents"):
        m.Corpus(*(lambda c: (c, ctx_for(c)))(smoke_cfg(tmp_path, data_files=path, val_docs=5)))
    with pytest.raises(SystemExit, match="not found"):
        text_data.gpt2_encoding("/nonexistent/gpt2.tiktoken")
    with pytest.raises(SystemExit, match="preset"):
        m.make_config(m.Config, preset="huge")
    with pytest.raises(SystemExit, match="unknown"):
        m.make_config(m.Config, steps_typo=3)
    with pytest.raises(SystemExit, match="stage"):
        m.main(smoke_cfg(tmp_path, stage="train"))
    for argv, msg in ((["--seq_len", "abc"], "invalid int"), (["--bogus", "1"], "unrecognized"),
                      (["--resume", "maybe"], "choose from 'true', 'false'")):
        r = subprocess.run([sys.executable, "owt_masked.py", *argv], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert m.parse_config(m.Config, ["--preset", "demo", "--steps", "2", "3"]).steps == (2, 3)


def test_hub_dataset_failure_points_to_the_export_command(tmp_path, monkeypatch):
    """datasets >= 4 refuses the loading script of Skylion007/openwebtext: the error names the
    cause and docs/owt.md's one-off parquet export (whose shard layout test_local_files_pipeline
    reads back in document order), and docs/owt.md has that command."""
    import datasets

    def refuse(name, **kw):
        raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    cfg = smoke_cfg(tmp_path, dataset="Skylion007/openwebtext")
    with pytest.raises(SystemExit, match=r"RuntimeError: Dataset scripts .*docs/owt.md.*"
                                         r"--data_files 'owt/\*\.parquet'"):
        text_data.load_documents(cfg)
    doc = open(os.path.join(ROOT, "docs", "owt.md")).read()
    assert re.search(r"datasets<4.*'Skylion007/openwebtext'.*trust_remote_code.*contiguous=True",
                     doc, re.S)


@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
def test_student_equals_teacher_at_init(lam):
    cfg = m.make_config(m.Config, preset="smoke", dropout=0.1)
    torch.manual_seed(0)
    teacher = m.build_model(cfg, 50).eval()
    student = m.build_model(cfg, 50, lam_dim=1).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("lam_mlp.") for k in missing)
    for p in teacher.parameters():                       # a non-trivial teacher
        p.data.normal_(0, 0.2)
    student.load_state_dict(teacher.state_dict(), strict=False)
    x = torch.randint(0, 50, (3, 12))
    x[:, ::2] = 49                                       # [MASK]
    with torch.no_grad():
        a = student(x, None, torch.full((3, 1), lam))
        b = teacher(x, None, None)
    assert torch.equal(a, b)
    lp = torch.log_softmax(a, -1)
    assert (lp[x != 49].max(-1).values == 0).all()       # SUBS: revealed tokens are copied
    assert (lp[x == 49][:, 49] < -1e5).all()             # never predict [MASK]


def test_text_metrics():
    x = torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4]])
    assert text_metrics.unigram_entropy(x) == pytest.approx(0.5 * np.log(4))
    uniform = lambda x: torch.full((x.shape[0], x.shape[1] - 1), np.log(7.0))
    assert text_metrics.gen_ppl(uniform, x) == pytest.approx(7.0)
    same = [[[1, 2, 3, 4, 5]] * 3]
    assert text_metrics.self_bleu(same) == pytest.approx(100.0)


def test_retokenized_gen_ppl_is_mdlms_protocol():
    """MDLM's gen-PPL against a loop written from its definition: a bigram judge over a
    character vocabulary ("|" = EOS), texts truncated to max_length and right-padded with EOS,
    windows of `context` tokens (a window's first token is no target), a target counts if it
    is not EOS or is the row's first EOS; token-weighted over the set. The judge must see the
    attention mask (0 on padding)."""
    vocab = "abcde|"
    eos = vocab.index("|")
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))    # (prev, next)
    seen = []

    def logits_fn(x, attn):
        seen.append(None if attn is None else attn.clone())
        return table[x]                                                       # (n, c, V)

    encode = lambda t: [vocab.index(ch) for ch in t]
    texts = ["abcab", "a|bc|dd", "eeeeeeeee", "b", "cd|"]
    max_length, context = 7, 4
    total, count = 0.0, 0
    rows = [encode(t)[:max_length] for t in texts]
    width = max(map(len, rows))
    for r in rows:
        r = r + [eos] * (width - len(r))
        first_eos = r.index(eos) if eos in r else None
        for j in range(1, width):
            if j % context == 0 or (r[j] == eos and j != first_eos):
                continue
            total -= torch.log_softmax(table[r[j - 1]], -1)[r[j]].item()
            count += 1
    want = math.exp(total / count)
    for bs in (1, 2, 16):
        seen.clear()
        got = text_metrics.retokenized_gen_ppl(logits_fn, texts, encode, eos, max_length,
                                               context, batch_size=bs)
        assert got == pytest.approx(want, rel=1e-9)
    mask = torch.cat([torch.cat(seen[i:i + 2], 1) for i in range(0, len(seen), 2)])
    assert mask.tolist()[3] == [1, 0, 0, 0, 0, 0, 0]                 # "b" padded, masked
    ids = text_metrics.ids_nll(logits_fn)(torch.tensor([[0, 1, 2]]))
    assert torch.allclose(ids[0], -torch.stack([torch.log_softmax(table[0], -1)[1],
                                                torch.log_softmax(table[1], -1)[2]]))


def test_smoke_end_to_end_pydoc(tmp_path):
    """The smoke preset as shipped (CPython's bundled docs, exact GPT-2 BPE, all stages), run
    twice: identical metrics (timings aside); a teacher trained for 150 steps is far below the
    uniform model's NELBO (log of the vocabulary size); the sampler's cache skips unchanged rows."""
    for run in ("run", "again"):
        m.main(smoke_cfg(tmp_path, run, teacher_iters=150, steps=(2, 4, 64)))
    assert metrics_without_timings(tmp_path / "run" / "metrics.json") == \
        metrics_without_timings(tmp_path / "again" / "metrics.json")
    cfg = smoke_cfg(tmp_path)
    metrics = json.load(open(os.path.join(cfg.out_dir, "metrics.json")))
    log = open(os.path.join(cfg.out_dir, "log.txt")).read()
    S = int(log.split("S = ")[1].split(" ")[0])
    assert metrics["teacher"]["val_nelbo"] < 0.85 * math.log(S - 1)
    assert metrics["eval"]["teacher_uncond_64"]["nfe"] < 64            # the cache skipped calls
    ev = metrics["eval"]
    for key in ("teacher_uncond_2", "teacher_uncond_4", "student_uncond_2", "control_uncond_2",
                "student_cond_2"):
        assert np.isfinite(ev[key]["gen_ppl_judge"]) and ev[key]["entropy"] > 0
    assert "self_bleu" in ev["student_cond_2"] and "2" in metrics["latency"]
    assert ev["teacher_uncond_4"]["nfe"] <= 5
    text = open(os.path.join(cfg.out_dir, "samples", "student_uncond_2.txt")).read()
    assert len(text) > 0


def test_resume_is_exact(tmp_path):
    path, _ = write_corpus(tmp_path)
    common = dict(data_files=path, control_iters=0, ckpt_every=1, lam_lr_mult=10.0,
                  ema=(0.9, 0.9), teacher_cosine=True)
    full = smoke_cfg(tmp_path, "full", teacher_iters=4, distil_iters=3, **common)
    for stage in ("teacher", "distill"):
        m.main(m.make_config(m.Config, **{**asdict(full), "stage": stage}))
    cut = smoke_cfg(tmp_path, "cut", **common)
    for stage, resume, iters in (("teacher", False, dict(teacher_iters=2)),
                                 ("teacher", True, dict(teacher_iters=4)),
                                 ("distill", False, dict(distil_iters=1)),
                                 ("distill", True, dict(distil_iters=3))):
        m.main(m.make_config(m.Config, **{**asdict(cut), "stage": stage,
                                          "resume": resume, **iters}))
    for name in ("teacher", "student"):
        a = torch.load(os.path.join(full.out_dir, f"{name}.pt"), weights_only=True)
        b = torch.load(os.path.join(cut.out_dir, f"{name}.pt"), weights_only=True)
        assert a["step"] == b["step"]
        for key in ("model", "ema"):
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), (name, key, k)
    assert b["optimizer"] is None                      # finished model; training state apart
    b = torch.load(os.path.join(cut.out_dir, "student_state.pt"), weights_only=True)
    groups = b["optimizer"]["param_groups"]            # the student's lambda path learns 10x faster
    n_lam = sum(k.startswith("lam_mlp.") for k in b["model"])
    assert len(groups) == 2 and len(groups[1]["params"]) == n_lam == 4
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[0]["lr"] > 0


def test_second_di4c_round_from_a_student(tmp_path):
    second_di4c_round(m, lambda path, **kw: smoke_cfg(path.parent, path.name, **kw), tmp_path,
                      "samples/{model}_uncond_2.pt", "tokens")


def test_embedding_gradient_is_deterministic():
    """The token embedding's gradient with repeated ids is bitwise the same every time (indexing's
    backward is not on CPU; a rerun of the demo must train the same weights)."""
    torch.manual_seed(0)
    emb = m.VocabEmbed(500, 16)
    x = torch.randint(0, 20, (16, 32))
    g = torch.randn(16, 32, 16)
    grads = set()
    for _ in range(10):
        emb.zero_grad()
        (emb(x) * g).sum().backward()
        grads.add(emb.embedding.grad.numpy().tobytes())
    assert len(grads) == 1


def test_the_judge_does_not_depend_on_the_training_seed(tmp_path):
    """The judge is part of the metric: runs of different --seed train the same judge, and a
    seed run reuses the seed-0 run's judge.pt (its weights are loaded, not retrained)."""
    path, _ = write_corpus(tmp_path)
    judges = {}
    for seed in (0, 3):
        cfg = smoke_cfg(tmp_path, f"s{seed}", data_files=path, seed=seed)
        ctx = ctx_for(cfg)
        judges[seed] = m.train_judge(cfg, ctx, m.Corpus(cfg, ctx)).state_dict()
    assert judges[0].keys() == judges[3].keys()
    assert all(torch.equal(judges[0][k], judges[3][k]) for k in judges[0])
    cfg = smoke_cfg(tmp_path, "reuse", data_files=path, seed=7)
    ctx = ctx_for(cfg)
    state = torch.load(tmp_path / "s0" / "judge.pt", weights_only=False)
    state["model"] = {k: v + 1 for k, v in state["model"].items()}   # marks the file's weights
    torch.save(state, tmp_path / "reuse" / "judge.pt")
    got = m.train_judge(cfg, ctx, m.Corpus(cfg, ctx)).state_dict()
    assert all(torch.equal(got[k], judges[0][k] + 1) for k in got)
    assert "reusing the judge" in open(tmp_path / "reuse" / "log.txt").read()


def test_stdlib_docstrings_the_second_offline_corpus(tmp_path, monkeypatch):
    """--dataset stdlib: one document per standard-library module (its docstrings, from ast),
    checked exactly on a fake library (tests, site-packages, modules that do not parse or have
    no docstring left out); then the whole pipeline runs on the real one."""
    import sysconfig
    lib = tmp_path / "lib"
    files = {"a.py": '"""Module a."""\nclass C:\n    """Class C."""\n    def f(self):\n'
                     '        """Method f."""\n',
             "pkg/b.py": 'def g():\n    """Function g."""\n', "pkg/deep/c.py": '"""Too deep."""',
             "test/t.py": '"""A test."""', "site-packages/s.py": '"""Installed."""',
             "bad.py": 'def (:\n', "plain.py": "x = 1\n"}
    for name, text in files.items():
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_text(text)
    real = sysconfig.get_paths()
    with monkeypatch.context() as mp:
        mp.setattr(sysconfig, "get_paths", lambda: {**real, "stdlib": str(lib)})
        assert text_data.stdlib_docstrings() == ["Module a.\n\nClass C.\n\nMethod f.",
                                                 "Function g."]
    docs = text_data.stdlib_docstrings()
    assert len(docs) > 100 and all(d.strip() for d in docs)
    cfg = smoke_cfg(tmp_path, dataset="stdlib")
    m.main(cfg)
    ev = json.load(open(os.path.join(cfg.out_dir, "metrics.json")))["eval"]
    assert ev and all(np.isfinite(v["gen_ppl_judge"]) for v in ev.values())
