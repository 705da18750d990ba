"""
Text metrics for owt_masked.py, as MDLM and SDTT compute them.

    gen_ppl          exp(mean over samples of the per-sample mean NLL) under a judge LM
    unigram_entropy  mean over samples of the entropy (nats) of each sample's token histogram
    self_bleu        prefix-conditional self-BLEU: 4-gram, NLTK smoothing method 1, x100
    retokenized_gen_ppl  MDLM's protocol: samples decoded to text, re-encoded by the judge's
                     tokenizer (truncated to max_length, right-padded with EOS), token-weighted
                     mean NLL over the non-EOS tokens and the first EOS, in 1024-token windows
    gpt2_large       the judge of the papers (GPT-2 Large through `transformers`, imported
                     only when this function is called; requirements-paper.txt)
    latency          seconds per sampler call of teacher and student, and the overhead
    scorer           the gen-PPLs of owt_masked.py's eval stage under its --judge
    print_table      the eval table and RESULT lines of owt_masked.py

Samples are token-id tensors (N, D) long. A judge is any callable
    logits_fn(x (N, C) long, attention_mask (N, C) | None) -> (N, C, V) float logits
`ids_nll(logits_fn)` turns it into the nll_fn(x) -> (N, D - 1) that gen_ppl takes, so the
offline autoregressive judge trained by owt_masked.py and GPT-2 Large plug in alike.
gen_ppl on GPT-2 ids is SDTT's protocol (sdtt core/diffusion/absorbing.py gpt2_eval), which the
Di4C authors' text evaluation uses; retokenized_gen_ppl is MDLM's (diffusion.py
compute_generative_perplexity).
"""
import math
import os
import statistics
from contextlib import nullcontext
from typing import Callable, List, Sequence

import torch

from .text_data import EOT


def gen_ppl(nll_fn: Callable, samples: torch.Tensor, start: int = 1,
            batch_size: int = 64) -> float:
    """Generative perplexity: exp(mean_n mean_{i >= start} NLL(x_n^i)), MDLM's per-sample average.

    The per-sample mean comes first, then the mean over samples (not token-weighted), as in
    the official SDTT/MDLM evaluation. start = 1 scores tokens 2..D of unconditional samples;
    start = prefix length scores only the continuation of prefix-conditional samples.
    Args: samples (N, D) long. Returns a float.
    """
    per_sample = []
    for i in range(0, samples.shape[0], batch_size):
        nll = nll_fn(samples[i:i + batch_size])                  # (n, D - 1)
        per_sample.append(nll[:, start - 1:].double().mean(1))    # (n,)
    return math.exp(torch.cat(per_sample).mean().item())


def unigram_entropy(samples: torch.Tensor) -> float:
    """Mean over samples of H(empirical token distribution of the sample), in nats.

    Low entropy flags repetitive samples that a judge scores as likely (a low gen-PPL bought
    with repetition), so report it beside every gen-PPL.
    Args: samples (N, D) long. Returns a float.
    """
    ents = []
    for row in samples:
        counts = torch.bincount(row).double()
        p = counts[counts > 0] / row.numel()
        ents.append(-(p * p.log()).sum().item())
    return sum(ents) / len(ents)


def self_bleu(groups: Sequence[Sequence[Sequence[int]]], n_gram: int = 4) -> float:
    """Prefix-conditional self-BLEU x100, SDTT's protocol (the prompt included).

    For each prefix, every continuation is scored against the other ones of the same prefix
    (4-gram BLEU, NLTK smoothing method 1); the result is averaged over continuations, then over
    prefixes. Tokens are GPT-2 ids; the shared prefix is included, as in the official code,
    which inflates absolute values. Lower means more diverse.
    Args: groups[p][c] = token ids of continuation c of prefix p (prefix included).
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    smooth = SmoothingFunction().method1
    weights = (1.0 / n_gram,) * n_gram
    per_prefix = []
    for group in groups:
        toks = [[str(i) for i in seq] for seq in group]
        scores = [sentence_bleu(toks[:c] + toks[c + 1:], hyp, weights=weights,
                                smoothing_function=smooth) for c, hyp in enumerate(toks)]
        per_prefix.append(sum(scores) / len(scores))
    return 100.0 * sum(per_prefix) / len(per_prefix)


def next_token_nll(logits_fn: Callable, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """-log p(x[:, i+1] | x[:, :i+1]) under a logits_fn judge: (N, C) -> (N, C - 1) on the CPU."""
    logits = logits_fn(x, attention_mask)[:, :-1].float()                      # (N, C - 1, V)
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), x[:, 1:].to(logits.device), reduction="none").cpu()


def ids_nll(logits_fn: Callable) -> Callable:
    """nll_fn(x (N, D)) -> (N, D - 1) for gen_ppl, from a logits_fn judge."""
    return torch.no_grad()(lambda x: next_token_nll(logits_fn, x))


@torch.no_grad()
def retokenized_gen_ppl(logits_fn: Callable, texts: Sequence[str], encode: Callable, eos: int,
                        max_length: int = 1024, context: int = 1024,
                        batch_size: int = 16) -> float:
    """MDLM's generative perplexity (diffusion.py, compute_generative_perplexity, retokenize).

    Each text is encoded by the judge's tokenizer (`encode(str) -> ids`, <|endoftext|> as the
    EOS token) and truncated to max_length; the rows are right-padded with EOS to the longest
    (attention mask 0 there) and cut into windows of `context` tokens. A target token counts
    if it is not EOS or if it is the row's first EOS (MDLM's mask: cumsum(EOS) == 1 or not
    EOS, so the tokens between the first and a second EOS count as well); the result is
    exp(sum of NLLs / number of counted tokens), token-weighted over the whole set.
    Returns a float.
    """
    rows = [list(encode(t))[:max_length] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.long)               # (N, W)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        for lo in range(0, width, context):
            x, a = ids[b:b + batch_size, lo:lo + context], attn[b:b + batch_size, lo:lo + context]
            nll = next_token_nll(logits_fn, x, a).double()                      # (n, c - 1)
            is_eos = x == eos
            counted = ((is_eos.cumsum(-1) == 1) | ~is_eos)[:, 1:]              # (n, c - 1)
            total += (nll * counted).sum().item()
            count += int(counted.sum())
    return math.exp(total / count)


def gpt2_large(device, name: str = "gpt2-large") -> Callable:
    """GPT-2 Large as a logits_fn, float32 (the judge of MDLM, SDTT and Di4C). Needs
    `pip install transformers` and the weights in the HF cache (or internet)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SystemExit("error: --judge gpt2-large needs `pip install transformers`") from e
    model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()

    @torch.no_grad()
    def logits_fn(x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        a = None if attention_mask is None else attention_mask.to(device)
        return model(x.to(device), attention_mask=a).logits
    return logits_fn


def gpt2_large_cached() -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache("gpt2-large", "config.json"), str)


def gpt2_large_needs() -> list:
    """[(problem, fix)] for a run's preflight: offline (HF_HUB_OFFLINE=1), GPT-2 Large's weights
    must be in the Hugging Face cache."""
    if os.environ.get("HF_HUB_OFFLINE") != "1" or gpt2_large_cached():
        return []
    return [("--judge gpt2-large needs the gpt2-large weights, which are not in the Hugging Face "
             "cache and HF_HUB_OFFLINE=1 forbids the download",
             "run once online: python -c \"from transformers import AutoModelForCausalLM as M; "
             "M.from_pretrained('gpt2-large')\"")]


def scorer(judge, corpus, device, max_length: int, batch_size: int) -> tuple:
    """(score, key) for owt_masked.py's eval stage: score(tokens (N, D) model ids, start) ->
    {name: gen-PPL}; key names the primary gen-PPL. judge: a logits_fn on model ids (the judge
    trained there: "gen_ppl_judge"), or None for GPT-2 Large: SDTT's protocol on the GPT-2 ids
    ("gen_ppl_gpt2_large") and, for unconditional sets (start 1), MDLM's retokenised one
    ("gen_ppl_gpt2_large_retok", the primary). corpus: gpt2_ids(x), decode(row) and enc."""
    if judge is not None:
        nll, name, key, gpt2 = ids_nll(judge), "gen_ppl_judge", "gen_ppl_judge", None
    else:
        name, key = "gen_ppl_gpt2_large", "gen_ppl_gpt2_large_retok"
        gpt2 = gpt2_large(device)
        gpt2_nll = ids_nll(gpt2)
        nll = lambda x: gpt2_nll(corpus.gpt2_ids(x))       # SDTT's protocol on GPT-2 ids

    def score(tokens: torch.Tensor, start: int) -> dict:
        out = {name: gen_ppl(nll, tokens, start)}
        if gpt2 is not None and start == 1:                # MDLM's protocol, unconditional sets
            out[key] = retokenized_gen_ppl(
                gpt2, [corpus.decode(row) for row in tokens.tolist()],
                lambda t: corpus.enc.encode(t, allowed_special="all"), EOT,
                max_length=max_length, batch_size=batch_size)
        return out
    return score, key


def decode_groups(samples: torch.Tensor, n_per_group: int) -> List[List[List[int]]]:
    """(P * C, D) samples, continuations of one prefix adjacent -> groups[p][c] id lists."""
    rows = samples.tolist()
    return [rows[i:i + n_per_group] for i in range(0, len(rows), n_per_group)]


def latency(fns: dict, runs: int, device, context: Callable = nullcontext) -> dict:
    """Seconds per call of fns["teacher"] and fns["student"] (each inside context(); mean and
    population sd of `runs` calls after one warm-up call, CUDA-synchronised) -> {teacher_s,
    teacher_std, student_s, student_std, overhead_pct} (the student's extra time in %)."""
    from eval.report import seconds
    out = {}
    for name, fn in fns.items():
        secs = seconds(lambda r: fn(), device, runs, context)
        out[f"{name}_s"], out[f"{name}_std"] = statistics.mean(secs), statistics.pstdev(secs)
    out["overhead_pct"] = 100 * (out["student_s"] / out["teacher_s"] - 1)
    return out


def ppl_of(row: dict, key: str) -> float:
    """A sample set's primary gen-PPL; prefix-conditional rows have only the id protocol."""
    return row.get(key, row.get(key.replace("_retok", "")))


def result_rows(res: dict, key: str) -> list:
    """The eval table's rows ({"<model>_<kind>_<N>": row}) for eval/results_table.py and the plot:
    [{model, kind, steps, nfe, gen_ppl (under key), entropy}]."""
    return [dict(model=k.split("_")[0], kind=k.split("_")[1], steps=int(k.split("_")[2]),
                 nfe=v["nfe"], gen_ppl=ppl_of(v, key), entropy=v["entropy"])
            for k, v in res.items() if k != "data"]


def print_table(res: dict, key: str):
    """The eval table of owt_masked.py ({"data": row, "<model>_<kind>_<N>": row}; gen-PPL under
    `key`) and a RESULT line for student vs teacher at each student step count."""
    keys = sorted((k for k in res if k != "data"),
                  key=lambda k: (k.split("_")[1], k.split("_")[0], int(k.split("_")[2])))
    print(f"\n{'model':<9}{'kind':<8}{'steps':>6}{'NFE':>7}{'gen-PPL':>10}{'entropy':>9}"
          f"{'self-BLEU':>11}")
    print(f"{'data':<9}{'val':<8}{'-':>6}{'-':>7}{res['data'][key]:>10.1f}"
          f"{res['data']['entropy']:>9.3f}")
    for k in keys:
        name, kind, N = k.split("_")
        r = res[k]
        bleu = f"{r['self_bleu']:>11.1f}" if "self_bleu" in r else ""
        print(f"{name:<9}{kind:<8}{N:>6}{r['nfe']:>7.1f}{ppl_of(r, key):>10.1f}"
              f"{r['entropy']:>9.3f}{bleu}")
    for k in sorted((k for k in keys if k.startswith("student_uncond_")),
                    key=lambda k: int(k.split("_")[2])):
        N = k.split("_")[2]
        if f"teacher_uncond_{N}" in res:
            s, t = res[k], res[f"teacher_uncond_{N}"]
            print(f"RESULT student_gen_ppl@{N}={s[key]:.2f} teacher_gen_ppl@{N}={t[key]:.2f} "
                  f"student_entropy@{N}={s['entropy']:.3f} teacher_entropy@{N}={t['entropy']:.3f}")
