"""eval/text_metrics.py against hand computations, and its wiring in owt_masked.py's stage_eval:
gen-PPL averaging and prefix offset, prefix-conditional self-BLEU, and the GPT-2 Large judge path
run end to end with a small random GPT-2 built offline (transformers, no download)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import owt_masked as m
from eval import text_data, text_metrics



# -----------------------------------------------------------------------------
# gen-PPL: exp(mean over samples of the per-sample mean NLL), from the prefix offset on


def id_judge(x):
    """NLL column i scores token i + 1: 0.5 * token id + 0.1 * i (float64), so the NLL changes
    with the token and with its position, and every value below is a short sum by hand."""
    i = torch.arange(x.shape[1] - 1, dtype=torch.float64)
    return 0.5 * x[:, 1:].double() + 0.1 * i


def test_gen_ppl_is_exp_of_the_mean_over_samples_of_each_samples_mean_nll():
    """By hand, for 3 samples of 4 tokens (3 scored tokens each):
         sample [9, 1, 2, 3]: 0.5 + 0.0, 1.0 + 0.1, 1.5 + 0.2 -> mean 3.3 / 3 = 1.1
         sample [9, 4, 4, 4]: 2.0 + 0.0, 2.0 + 0.1, 2.0 + 0.2 -> mean 6.3 / 3 = 2.1
         sample [9, 8, 1, 6]: 4.0 + 0.0, 0.5 + 0.1, 3.0 + 0.2 -> mean 7.8 / 3 = 2.6
       gen-PPL = exp((1.1 + 2.1 + 2.6) / 3). Batch sizes that do not divide N catch a mean of
    per-batch means; the mean of per-sample perplexities (exp before the mean) is another number."""
    x = torch.tensor([[9, 1, 2, 3], [9, 4, 4, 4], [9, 8, 1, 6]])
    want = math.exp((1.1 + 2.1 + 2.6) / 3)
    for batch_size in (1, 2, 3, 64):
        assert text_metrics.gen_ppl(id_judge, x, batch_size=batch_size) == \
            pytest.approx(want, rel=1e-12)
    mean_of_ppls = (math.exp(1.1) + math.exp(2.1) + math.exp(2.6)) / 3
    batch_means = math.exp(((1.1 + 2.1) / 2 + 2.6) / 2)               # batches of 2, then 1
    assert abs(mean_of_ppls / want - 1) > 0.05 and abs(batch_means / want - 1) > 0.05
    # token-weighted = per-sample mean here (equal lengths): the judge's padding is not gen_ppl's
    # business; retokenized_gen_ppl (MDLM's protocol) is token-weighted, tests/test_owt.py


def test_gen_ppl_start_scores_only_the_continuation():
    """Prefix-conditional samples: prefix [20, 30] (2 tokens), continuation of 3. start = 2 must
    score tokens 2, 3, 4 (NLL columns 1, 2, 3), never the second prefix token (column 0).
         sample [20, 30, 1, 2, 3]: columns 15.0, 0.5 + 0.1, 1.0 + 0.2, 1.5 + 0.3
           start 2 -> (0.6 + 1.2 + 1.8) / 3 = 3.6 / 3
         sample [20, 30, 4, 4, 1]: columns 15.0, 2.0 + 0.1, 2.0 + 0.2, 0.5 + 0.3
           start 2 -> (2.1 + 2.2 + 0.8) / 3 = 5.1 / 3
    An offset one too early takes in the prefix token (NLL 15), one too late drops a token."""
    x = torch.tensor([[20, 30, 1, 2, 3], [20, 30, 4, 4, 1]])
    want = math.exp((3.6 / 3 + 5.1 / 3) / 2)
    assert text_metrics.gen_ppl(id_judge, x, start=2) == pytest.approx(want, rel=1e-12)
    early = math.exp(((15.0 + 3.6) / 4 + (15.0 + 5.1) / 4) / 2)        # start 1: every token
    assert text_metrics.gen_ppl(id_judge, x, start=1) == pytest.approx(early, rel=1e-12)
    late = math.exp(((1.2 + 1.8) / 2 + (2.2 + 0.8) / 2) / 2)           # start 3
    assert text_metrics.gen_ppl(id_judge, x, start=3) == pytest.approx(late, rel=1e-12)
    assert min(abs(early / want - 1), abs(late / want - 1)) > 0.01


# -----------------------------------------------------------------------------
# self-BLEU: 4-gram BLEU of each continuation against the others of its prefix, x100


def test_self_bleu_against_a_hand_computation():
    """Modified n-gram precisions p1..p4 (a hypothesis' n-gram counts clipped by the largest count
    in any one reference), weights 1/4, brevity penalty exp(1 - r / c) when the hypothesis
    (length c) is shorter than the closest reference length r, NLTK smoothing method 1 (a zero
    numerator becomes 0.1). Token 12 is one id (not "1" and "2"). Averaged over the continuations
    of a prefix, then over prefixes (the groups have 3 and 2 continuations, so a flat mean over all
    5 differs).

    Group 1: A = [1 2 3 4 5], B = [1 2 3 6 7], C = [12 2 3 4]
      A vs {B, C}: p1 4/5 (5 absent), p2 3/4 (45), p3 2/3 (345), p4 0/2 -> 0.1/2; r = 5, BP 1
      B vs {A, C}: p1 3/5, p2 2/4, p3 1/3, p4 0/2 -> 0.05; r = 5, BP 1
      C vs {A, B}: p1 3/4 (12 absent), p2 2/3, p3 1/2, p4 0/1 -> 0.1; r = 5 > c = 4: BP e^(-1/4)
    Group 2 (clipping): D = [5 5 5 5 6], E = [5 5 6 9]
      D vs {E}: p1 (min(4, 2) + 1)/5 = 3/5, p2 (min(3, 1) + 1)/4 = 2/4, p3 (0 + 1)/3 (556),
                p4 0/2 -> 0.05; c = 5 > r = 4: BP 1
      E vs {D}: p1 3/4, p2 2/3 (55, 56), p3 1/2 (556), p4 0/1 -> 0.1; r = 5 > c = 4: BP e^(-1/4)
    """
    A, B, C = [1, 2, 3, 4, 5], [1, 2, 3, 6, 7], [12, 2, 3, 4]
    D, E = [5, 5, 5, 5, 6], [5, 5, 6, 9]
    bleu = lambda p, bp=1.0: bp * math.prod(p) ** 0.25
    a = bleu([4 / 5, 3 / 4, 2 / 3, 0.1 / 2])
    b = bleu([3 / 5, 2 / 4, 1 / 3, 0.1 / 2])
    c = bleu([3 / 4, 2 / 3, 1 / 2, 0.1 / 1], math.exp(1 - 5 / 4))
    d = bleu([3 / 5, 2 / 4, 1 / 3, 0.1 / 2])
    e = bleu([3 / 4, 2 / 3, 1 / 2, 0.1 / 1], math.exp(1 - 5 / 4))
    want = 100 * ((a + b + c) / 3 + (d + e) / 2) / 2
    assert text_metrics.self_bleu([[A, B, C], [D, E]]) == pytest.approx(want, rel=1e-9)
    assert text_metrics.self_bleu([[A, B, C]]) == pytest.approx(100 * (a + b + c) / 3, rel=1e-9)
    assert abs(100 * (a + b + c + d + e) / 5 - want) > 0.1              # flat mean differs
    # a group of identical continuations: every precision 1, BLEU 100; disjoint ones: 0
    assert text_metrics.self_bleu([[A, A, A]]) == pytest.approx(100.0)
    assert text_metrics.self_bleu([[[1, 2, 3, 4], [5, 6, 7, 8]]]) == 0.0
    # decode_groups: continuations of one prefix are adjacent rows
    rows = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    assert text_metrics.decode_groups(rows, 2) == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]


# -----------------------------------------------------------------------------
# stage_eval wiring: which tokens and which offset each sample set is scored with


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """A smoke run (pydoc, exact GPT-2 BPE, no control) through the sample stage; tests score it
    with --run_dir into their own --out_dir, so the run itself is shared and never changed."""
    cfg = m.make_config(m.Config, preset="smoke", control_iters=0,
                        out_dir=str(tmp_path_factory.mktemp("owt") / "run"))
    for stage in ("teacher", "distill", "sample"):
        m.main(m.make_config(m.Config, **{**m.asdict(cfg), "stage": stage}))
    return cfg


def eval_cfg(run, out_dir, **kw):
    return m.make_config(m.Config, **{**m.asdict(run), "stage": "eval", "run_dir": run.out_dir,
                                      "out_dir": str(out_dir), **kw})


def samples_of(run):
    """{set name: tokens} of every sample file the run wrote."""
    folder = os.path.join(run.out_dir, "samples")
    return {f[:-3]: torch.load(os.path.join(folder, f), weights_only=True)["tokens"]
            for f in sorted(os.listdir(folder)) if f.endswith(".pt")}


def test_stage_eval_scores_conditional_samples_from_the_prefix_offset(sampled_run, tmp_path,
                                                                      monkeypatch):
    """Every gen_ppl call of stage_eval (trained judge): prefix-conditional sets with start =
    --prefix, and their first prefix_len tokens are the held-out prefixes (so that offset is
    where the continuation begins); unconditional sets and the data with start = 1."""
    calls, real = [], text_metrics.gen_ppl

    def spy(nll_fn, samples, start=1, batch_size=64):
        calls.append((samples.clone(), start))
        return real(nll_fn, samples, start, batch_size)
    monkeypatch.setattr(text_metrics, "gen_ppl", spy)
    cfg = eval_cfg(sampled_run, tmp_path / "scores", judge="trained")
    m.main(cfg)
    sets = samples_of(sampled_run)
    order = [f"{n}_{k}_{N}" for n, k, N in m.sample_sets(cfg)]     # stage_eval's order
    assert sorted(order) == sorted(sets) and any("_cond_" in k for k in order)
    assert len(calls) == 1 + len(order)                                  # the data, then each set
    corpus = m.Corpus(cfg, m.Ctx(0, 1, torch.device("cpu"), cfg.out_dir, "float32"))
    val = corpus.get("val", np.arange(min(cfg.n_samples, corpus.n_blocks("val"))))
    assert torch.equal(calls[0][0], val) and calls[0][1] == 1
    n_prefix, prefix_len, cont_len = cfg.prefix
    n_prefix = min(n_prefix, corpus.n_blocks("val"))
    prefixes = corpus.get("val", np.arange(n_prefix))[:, :prefix_len]
    for name, (tokens, start) in zip(order, calls[1:]):
        assert torch.equal(tokens, sets[name]), name
        if "_cond_" in name:
            assert start == prefix_len > 1
            assert tokens.shape[1] == prefix_len + cont_len
            assert torch.equal(tokens[:, :start], prefixes.repeat_interleave(m.N_CONT, 0))
        else:
            assert start == 1 and tokens.shape[1] == cfg.seq_len


# -----------------------------------------------------------------------------
# The GPT-2 Large judge, run with a small random GPT-2 (no download)


@pytest.fixture
def tiny_gpt2(monkeypatch):
    """transformers' AutoModelForCausalLM.from_pretrained returns a 1-layer random GPT-2 with the
    real vocabulary (50257), initialised 10x wider than GPT-2 (so NLLs differ by nats from token
    to token, and a wrong offset or average shows). Returns (model, the names it was asked for)."""
    import transformers
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=text_data.N_GPT2,
                                     n_positions=64, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    asked = []

    def from_pretrained(name, *a, **k):
        asked.append(name)
        return model
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return model, asked


def hand_gen_ppl(model, ids, start):
    """exp(mean over rows of the mean over tokens i >= start of -log p(x_i | x_<i)), one row per
    forward pass (no batch, no mask), in float64 from the model's own logits."""
    per_row = []
    with torch.no_grad():
        for row in ids.tolist():
            logp = model(torch.tensor([row])).logits[0].double().log_softmax(-1)   # (D, V)
            per_row.append(sum(-logp[i - 1, row[i]].item() for i in range(start, len(row)))
                           / (len(row) - start))
    return math.exp(sum(per_row) / len(per_row))


def hand_retok_gen_ppl(model, texts, encode, eos, max_length):
    """MDLM's protocol from its definition: each text re-encoded and truncated; the rows padded
    with EOS to the longest; a target counts if it is not EOS or is its row's first EOS;
    token-weighted. Each row is scored alone, unpadded up to its first padding EOS (causal: the
    padding after it changes no counted NLL)."""
    rows = [list(encode(t))[:max_length] for t in texts]
    width = max(map(len, rows))
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            padded = r + [eos] * (width - len(r))
            first = padded.index(eos) if eos in padded else None
            seq = padded[:len(r) + 1]
            logp = model(torch.tensor([seq])).logits[0].double().log_softmax(-1)
            for j in range(1, len(seq)):
                if seq[j] != eos or j == first:
                    total -= logp[j - 1, seq[j]].item()
                    count += 1
    return math.exp(total / count)


def test_gpt2_judge_gen_ppl_equals_the_models_own_nll(tiny_gpt2):
    """gen_ppl(ids_nll(gpt2_large(cpu))) on GPT-2 ids, batched, against the model's per-row NLL
    by hand: unconditional (start 1) and prefix-conditional (start = prefix length 3)."""
    model, asked = tiny_gpt2
    judge = text_metrics.gpt2_large(torch.device("cpu"))
    assert asked == ["gpt2-large"]
    ids = torch.randint(0, text_data.N_GPT2, (5, 12), generator=torch.Generator().manual_seed(1))
    ids[1, 4] = text_data.EOT                                       # an <|endoftext|> inside
    nll = text_metrics.ids_nll(judge)
    for start in (1, 3):
        want = hand_gen_ppl(model, ids, start)
        for batch_size in (2, 64):
            got = text_metrics.gen_ppl(nll, ids, start, batch_size=batch_size)
            assert got == pytest.approx(want, rel=1e-4)
    off_by_one = [hand_gen_ppl(model, ids, s) for s in (2, 4)]       # the NLLs really differ
    assert all(abs(v / hand_gen_ppl(model, ids, 3) - 1) > 1e-2 for v in off_by_one)


def test_smoke_eval_with_the_gpt2_large_judge_end_to_end(sampled_run, tmp_path, tiny_gpt2,
                                                         monkeypatch):
    """--judge gpt2-large on a sampled smoke run: metrics.json holds GPT-2's numbers for every
    sample set, equal to the model's NLL by hand: the id protocol on
    the GPT-2 ids of the samples (prefix-conditional: from prefix_len, --prefix), MDLM's retokenised
    protocol (unconditional only); the results table takes the retokenised number as primary."""
    model, asked = tiny_gpt2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(text_metrics, "gpt2_large_cached", lambda: True)   # the fake is cached
    cfg = eval_cfg(sampled_run, tmp_path / "scores", judge="gpt2-large")
    m.main(cfg)
    assert asked == ["gpt2-large"]
    metrics = json.load(open(os.path.join(cfg.out_dir, "metrics.json")))
    ev = metrics["eval"]
    sets = samples_of(sampled_run)
    assert set(ev) == set(sets) | {"data"}
    corpus = m.Corpus(cfg, m.Ctx(0, 1, torch.device("cpu"), cfg.out_dir, "float32"))
    encode = lambda t: corpus.enc.encode(t, allowed_special="all")
    for name, tokens in sets.items():
        row, cond = ev[name], name.split("_")[1] == "cond"
        assert "gen_ppl_judge" not in row                       # no trained judge here
        ids = corpus.gpt2_ids(tokens)
        want = hand_gen_ppl(model, ids, cfg.prefix[1] if cond else 1)
        assert row["gen_ppl_gpt2_large"] == pytest.approx(want, rel=1e-4), name
        if cond:
            assert "gen_ppl_gpt2_large_retok" not in row
        else:
            texts = [corpus.decode(r) for r in tokens.tolist()]
            want = hand_retok_gen_ppl(model, texts, encode, text_data.EOT, cfg.seq_len)
            assert row["gen_ppl_gpt2_large_retok"] == pytest.approx(want, rel=1e-4), name
    assert "gen_ppl_gpt2_large_retok" in ev["data"]
    for r in metrics["results"]:
        key = "gen_ppl_gpt2_large" + ("" if r["kind"] == "cond" else "_retok")
        assert r["gen_ppl"] == ev[f"{r['model']}_{r['kind']}_{r['steps']}"][key]
