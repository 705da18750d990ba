"""
Text metrics for owt_masked.py, as MDLM and SDTT compute them.

    gen_ppl          exp(mean over samples of the per-sample mean NLL) under a judge LM
    unigram_entropy  mean over samples of the entropy (nats) of each sample's token histogram
    self_bleu        prefix-conditional self-BLEU: 4-gram, NLTK smoothing method 1, x100
    gpt2_large_nll   the judge of the paper (GPT-2 Large through `transformers`, imported
                     only when this function is called; an optional extra)

Samples are token-id tensors (N, D) long. A judge is any callable
    nll_fn(x (N, D) long) -> (N, D - 1) float: -log p(x[:, i+1] | x[:, :i+1])
so the offline autoregressive judge trained by owt_masked.py and GPT-2 Large plug in alike.
"""
import math
from typing import Callable, List, Sequence

import torch


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


def gpt2_large_nll(device, name: str = "gpt2-large") -> Callable:
    """An nll_fn for GPT-2 Large in float32 (MDLM's judge). Needs `pip install transformers`
    and the weights in the HF cache (or internet). Inputs must be GPT-2 token ids."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SystemExit("error: --eval_gpt2 needs `pip install transformers`") from e
    model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()

    @torch.no_grad()
    def nll_fn(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        logits = model(x).logits[:, :-1].float()                  # (N, D - 1, V)
        return torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), x[:, 1:], reduction="none").cpu()
    return nll_fn


def decode_groups(samples: torch.Tensor, n_per_group: int) -> List[List[List[int]]]:
    """(P * C, D) samples, continuations of one prefix adjacent -> groups[p][c] id lists."""
    rows = samples.tolist()
    return [rows[i:i + n_per_group] for i in range(0, len(rows), n_per_group)]
