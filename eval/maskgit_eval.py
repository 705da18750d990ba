"""The evaluation protocol of imagenet_masked.py's VQ-token runs, as the Di4C paper ran it
(MaskGIT-pytorch's evaluator, docs/imagenet.md "Sampling and evaluation"): decoded images are
min-max remapped per image to uint8 (truncated), written as PNGs, embedded by torch-fidelity's
Inception (eval/inception.py) and scored with FID, IS, precision, recall, density and coverage
under the `maskgit` protocol (eval/image_metrics.py) against the reference images (the validation
split, remapped the same way). Also the PNG grids of the sample stage, the sampler latency and
the eval stage's summary and printed table.

Notation: N images, 3 channels, R x R pixels.
"""
import os
import shutil

import numpy as np
import torch


def remap_uint8(imgs: torch.Tensor) -> torch.Tensor:
    """MaskGIT-pytorch's conversion of decoded images (N, 3, R, R) to uint8 before Inception:
    per-image min-max to 0..255, then truncated (not rounded), as its evaluator does."""
    lo, hi = imgs.amin((1, 2, 3), keepdim=True), imgs.amax((1, 2, 3), keepdim=True)
    return ((imgs - lo) / (hi - lo).clamp_min(1e-8) * 255).clamp(0, 255).to(torch.uint8)


def write_pngs(folder: str, images):
    """Images (R, R, 3) uint8 -> folder/000000.png, ...; written to folder.tmp, then renamed,
    so an interrupted run leaves no half set (a rerun's images replace the old ones)."""
    from PIL import Image
    os.makedirs(folder + ".tmp", exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(folder + ".tmp", f"{i:06d}.png"))
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(folder + ".tmp", folder)


def reference_features(folder: str, images) -> tuple:
    """Inception (pool features, logits) of the reference images: written once as PNGs to
    `folder` from `images()` (an iterable of (R, R, 3) uint8 arrays, called only then), remapped
    like the samples, features cached in folder_features.pt."""
    from PIL import Image
    from eval import inception
    path = folder + "_features.pt"
    if os.path.exists(path):
        return torch.load(path)
    if not os.path.isdir(folder):
        write_pngs(folder, images())
    names, pool, logits = sorted(os.listdir(folder)), [], []
    for i in range(0, len(names), 256):
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(folder, n))
                                                      .convert("RGB"))).permute(2, 0, 1)
                            for n in names[i:i + 256]])                         # (n, 3, R, R)
        f, lg = inception.inception_features(remap_uint8(imgs.float()))
        pool.append(f)
        logits.append(lg)
    feats = (torch.cat(pool), torch.cat(logits))
    torch.save(feats, path + ".tmp")
    os.replace(path + ".tmp", path)
    return feats


def embed(decoded) -> tuple:
    """`decoded` yields float images (n, 3, R, R) (decoded in bounded chunks) -> (the images
    remapped to uint8 (N, 3, R, R), their Inception pool features, logits)."""
    from eval import inception
    imgs = torch.cat([remap_uint8(x) for x in decoded])                         # (N, 3, R, R)
    return (imgs, *inception.inception_features(imgs))


def score(ref: tuple, decoded, folder: str, label: str) -> dict:
    """The metrics of one sample set: `decoded` as in embed, the remapped images written to
    `folder` as PNGs; ref = reference_features."""
    from eval import image_metrics
    imgs, pool, logits = embed(decoded)
    write_pngs(folder, imgs.permute(0, 2, 3, 1).numpy())
    try:
        return image_metrics.metrics_from_features(ref[0], pool, logits, "maskgit")
    except ValueError as e:
        raise SystemExit(f"error: {label}: {e}; sample more (--n_per_class)") from None


def score_sets(sets: dict, decode, ref_images, out_dir: str) -> dict:
    """{label: score(...) + steps, w} of the sample sets {label: {"codes" (N, D), "steps", "w"}}:
    decode(codes) -> float images, in chunks of 256; the reference from ref_images() once
    (out_dir/fid_ref); each set's PNGs in out_dir/samples/<label>_png."""
    ref = reference_features(os.path.join(out_dir, "fid_ref"), ref_images)
    return {label: {**score(ref, (decode(c) for c in s["codes"].split(256)),
                            os.path.join(out_dir, "samples", label + "_png"), label),
                    "steps": s["steps"], "w": s["w"]} for label, s in sets.items()}


def save_grids(folder: str, label: str, by_class: list):
    """by_class: float images (n, C, H, W) in [0, 1] per class -> folder/<label>.png (a row of
    up to 8 per class) and folder/<label>/class_<c>.png (all of class c)."""
    from torchvision.utils import save_image
    os.makedirs(os.path.join(folder, label), exist_ok=True)
    for c, imgs in enumerate(by_class):
        save_image(imgs, os.path.join(folder, label, f"class_{c:04d}.png"), nrow=8, padding=1)
    rows = [imgs[:8] for imgs in by_class]
    save_image(torch.cat(rows), os.path.join(folder, f"{label}.png"),
               nrow=max(len(r) for r in rows), padding=1)


def latencies(sample, autocast, generator: torch.Generator, seed: int,
              device: torch.device) -> dict:
    """{teacher_s, student_s, overhead_pct}: eval/report.latency of sample("teacher" |
    "student", generator) under autocast(), the generator seeded to `seed` before each model."""
    from eval.report import latency
    timed = lambda name: lambda r: sample(name, generator.manual_seed(seed) if r == 0
                                          else generator)
    return latency(timed("teacher"), timed("student"), device, context=autocast)


def summary(res: dict, lat: dict, key: str) -> dict:
    """The eval stage's metrics.json entries (scores, latencies, one row per sample set, the
    speed-ups at equal quality) from res {label "model@steps_wW": scores with steps, w}; prints
    the table."""
    from eval import results_table
    rows = [dict(model=label.split("@")[0], steps=r["steps"], nfe=r["steps"], w=r["w"],
                 **{k: v for k, v in r.items() if k not in ("steps", "w")})
            for label, r in res.items()]
    print_table(res, lat, key)
    return {"eval": res, "latency": lat, "results": rows, "primary": key,
            "speedup": results_table.speedups(rows, key)}


def print_table(res: dict, lat: dict, key: str):
    """The eval table, the latencies and a RESULT line per student step count (student vs
    teacher); key: "frechet" (embedded data, with class_acc) or "fid" (with is_mean)."""
    second = "class_acc" if key == "frechet" else "is_mean"
    print(f"\n{'samples':<20}{key:>10}{second:>11}")
    for label in sorted(res, key=lambda k: (k.split("@")[0], res[k]["w"], res[k]["steps"])):
        print(f"{label:<20}{res[label][key]:>10.3f}{res[label][second]:>11.3f}")
    from eval.report import print_latency_and_results
    print_latency_and_results(res, lat, key)
