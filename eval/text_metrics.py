"""
Text metrics for owt_masked.py, as MDLM and SDTT compute them.

    gen_ppl          exp(mean over samples of the per-sample mean NLL) under a judge LM
    unigram_entropy  mean over samples of the entropy (nats) of each sample's token histogram
    self_bleu        prefix-conditional self-BLEU: 4-gram, NLTK smoothing method 1, x100
    mauve_score      MAUVE of continuations against the real ones (optional: mauve-text)
    retokenized_gen_ppl  MDLM's protocol: samples decoded to text, re-encoded by the judge's
                     tokenizer (truncated to max_length, right-padded with EOS), token-weighted
                     mean NLL over the non-EOS tokens and the first EOS, in 1024-token windows
    gpt2_large       the judge of the papers (GPT-2 Large through `transformers`, imported
                     only when this function is called; requirements-paper.txt)

Samples are token-id tensors (N, D) long. A judge is any callable
    logits_fn(x (N, C) long, attention_mask (N, C) | None) -> (N, C, V) float logits
`ids_nll(logits_fn)` turns it into the nll_fn(x) -> (N, D - 1) that gen_ppl takes, so the
offline autoregressive judge trained by owt_masked.py and GPT-2 Large plug in alike.
gen_ppl on GPT-2 ids is SDTT's protocol (sdtt core/diffusion/absorbing.py gpt2_eval), which the
Di4C authors' text evaluation uses; retokenized_gen_ppl is MDLM's (diffusion.py
compute_generative_perplexity).
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


def mauve_score(real_texts: Sequence[str], sample_texts: Sequence[str], device_id: int = -1,
                model: str = "gpt2-large", max_text_length: int = 1024) -> float:
    """MAUVE (Pillutla et al. 2021) of samples against real text, through the `mauve-text`
    package (GPT-2 Large features, its default k-means quantisation), as SDTT reports it for
    prefix-conditional continuations. Optional: `pip install mauve-text`."""
    try:
        import mauve
    except ImportError as e:
        raise SystemExit("error: --mauve needs `pip install mauve-text`") from e
    out = mauve.compute_mauve(p_text=list(real_texts), q_text=list(sample_texts),
                              featurize_model_name=model, device_id=device_id,
                              max_text_length=max_text_length, verbose=False)
    return float(out.mauve)


def decode_groups(samples: torch.Tensor, n_per_group: int) -> List[List[List[int]]]:
    """(P * C, D) samples, continuations of one prefix adjacent -> groups[p][c] id lists."""
    rows = samples.tolist()
    return [rows[i:i + n_per_group] for i in range(0, len(rows), n_per_group)]
