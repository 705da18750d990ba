"""FID, Inception Score and precision / recall / density / coverage from Inception features, under
the two protocols the ImageNet papers report (docs/imagenet.md, "Metrics"):

* `maskgit`: the evaluator of the Di4C paper's ImageNet experiments (MaskGIT-pytorch's, which the
  authors' copy keeps): Euclidean k-NN balls, k = 3, strict `<`, precision / recall / density /
  coverage computed on 5 equal splits of both sets and averaged; IS over 10 chunks.
* `adm`: ADM's TensorFlow evaluator (guided-diffusion `evaluations/evaluator.py`), which ReDi and
  most later MaskGIT papers use with the `VIRTUAL_imagenet256_labeled.npz` reference: k = 3,
  `<=`, whole sets; IS over splits of 5,000. ADM computes the distances in float16, which moves
  points that lie on a ball's border: on the fixture (600 / 500 points) its precision and recall
  differ from these exact distances' by 0.002 and 0.003.

Both take the features of torch-fidelity's Inception-v3 port ('2048' pool features and
'logits_unbiased', the last layer without its bias); tests/fixtures/image_metrics.npz holds both
upstream evaluators' outputs on fixed features, and tests/test_eval_images.py compares.

Notation: N real (reference) features, M fake (sample) features, F dimensions, C classes.
"""
import torch

from eval.frechet import frechet_distance

PROTOCOLS = {
    "maskgit": dict(k=3, splits=5, strict_lt=True, is_chunks=10),
    "adm": dict(k=3, splits=1, strict_lt=False, is_split_size=5000),
}


def pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between rows, in float64: (n, F), (m, F) -> (n, m) float32."""
    a, b = a.double(), b.double()
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0).sqrt().float()


def _blocks(n: int, block: int):
    return [(i, min(i + block, n)) for i in range(0, n, block)]


def knn_radii(x: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    """Distance of each row of x (N, F) to its k-th nearest other row: (N,)."""
    out = []
    for i, j in _blocks(len(x), block):
        d = torch.cat([pairwise(x[i:j], x[u:v]) for u, v in _blocks(len(x), block)], 1)
        out.append(d.kthvalue(k + 1, dim=1).values)           # k + 1: the row itself is at 0
    return torch.cat(out)


def ball_stats(real, r_real, fake, r_fake, strict_lt, block=4096):
    """For the balls of radius r around each point: (fake in some real ball (M,) bool,
    number of real balls holding each fake (M,), real in some fake ball (N,) bool,
    nearest fake of each real inside its own ball (N,) bool)."""
    lt = torch.lt if strict_lt else torch.le
    in_real = torch.zeros(len(fake), dtype=torch.bool)
    count = torch.zeros(len(fake), dtype=torch.long)
    in_fake = torch.zeros(len(real), dtype=torch.bool)
    nearest = torch.full((len(real),), float("inf"))
    for i, j in _blocks(len(real), block):
        for u, v in _blocks(len(fake), block):
            d = pairwise(real[i:j], fake[u:v])                      # (n, m)
            inside = lt(d, r_real[i:j, None])                       # fake u..v in ball of real i..j
            in_real[u:v] |= inside.any(0)
            count[u:v] += inside.sum(0)
            in_fake[i:j] |= lt(d, r_fake[None, u:v]).any(1)
            nearest[i:j] = torch.minimum(nearest[i:j], d.min(1).values)
    return in_real, count, in_fake, lt(nearest, r_real)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 3, splits: int = 1,
         strict_lt: bool = True) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) and density and coverage
    (Naeem et al. 2020) of fake (M, F) against real (N, F); with splits > 1 both sets are cut into
    `splits` consecutive chunks (torch.chunk), the metrics computed per pair and averaged.
    strict_lt: a point is inside a ball when its distance is < the radius (MaskGIT), else <=
    (ADM)."""
    real, fake = torch.as_tensor(real).float(), torch.as_tensor(fake).float()
    acc = {"precision": [], "recall": [], "density": [], "coverage": []}
    pairs = list(zip(real.chunk(splits), fake.chunk(splits)))
    small = min(min(len(r), len(f)) for r, f in pairs)
    if small <= k:
        raise ValueError(f"precision / recall with k = {k} need more than {k} points per split "
                         f"({splits} split(s) of {len(real)} reference and {len(fake)} sample "
                         f"features leave {small})")
    for r, f in pairs:
        r_real, r_fake = knn_radii(r, k), knn_radii(f, k)
        in_real, count, in_fake, covered = ball_stats(r, r_real, f, r_fake, strict_lt)
        acc["precision"].append(in_real.double().mean())
        acc["recall"].append(in_fake.double().mean())
        acc["density"].append(count.double().mean() / k)
        acc["coverage"].append(covered.double().mean())
    return {name: float(torch.stack(v).mean()) for name, v in acc.items()}


def inception_score(logits: torch.Tensor, chunks: int = None, split_size: int = None) -> dict:
    """exp E_x KL(p(y|x) || p(y)) per chunk of the samples' logits (M, C), averaged:
    `chunks` equal parts (torch.chunk, MaskGIT-pytorch) or consecutive parts of `split_size`
    (ADM). Returns {"is_mean", "is_std"}."""
    logits = torch.as_tensor(logits).double()
    parts = logits.chunk(chunks) if chunks else logits.split(split_size)
    scores = []
    for part in parts:
        log_p = part.log_softmax(1)                                        # (m, C)
        log_marginal = log_p.exp().mean(0).log()                           # (C,)
        scores.append((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp())
    s = torch.stack(scores)
    return {"is_mean": float(s.mean()), "is_std": float(s.std(unbiased=False)) if len(s) > 1 else 0.0}


def metrics_from_features(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor,
                          protocol: str = "maskgit") -> dict:
    """FID, IS, precision, recall, density, coverage of fake against real under a protocol.

    Args:
        real: (N, F) reference pool features; fake: (M, F) sample pool features;
        fake_logits: (M, C) the samples' unbiased Inception logits.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metrics protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    out = {"fid": frechet_distance(real, fake)}
    out.update(inception_score(fake_logits, chunks=p.get("is_chunks"),
                               split_size=p.get("is_split_size")))
    out.update(prdc(real, fake, p["k"], p["splits"], p["strict_lt"]))
    return out
