"""Ports of third-party network architectures and checkpoint key maps, so that released
checkpoints load into the domain scripts. The scripts import these modules only when such a
checkpoint (or the architecture) is used; the paper's pipeline does not depend on them.

taming_vqgan  the taming-transformers VQGAN (CompVis/taming-transformers) as released with
              valeoai/Maskgit-pytorch: architecture + checkpoint reader, and the VQ-VAE of
              that architecture trained on your own images (imagenet_masked.py)
maskgit       valeoai/Maskgit-pytorch: transformer state dict -> ours; its sampler and schedule,
              the Di4C authors' copy of it (imagenet_masked.py --sampler di4c); its images'
              ImageFolder reading, resizing and centre crop
tauldr        andrew-cr/tauLDR U-Net checkpoint <-> ours, format detection and strict check
              (cifar10_gaussian.py)
mdlm          MDLM / SDTT / Di4C-SDTT checkpoint readers and key maps; SDTT's ancestral sampler
              (owt_masked.py --sampler sdtt)
"""


def load_strict(module, sd: dict, what: str):
    """module.load_state_dict(sd), strictly: any missing, unexpected or mis-shaped key stops the
    run with an error that says `what` and names the first eight keys of each kind."""
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise SystemExit(f"error: {what}: missing {missing[:8]} ({len(missing)}), unexpected "
                         f"{unexpected[:8]} ({len(unexpected)}), shape mismatches (checkpoint vs "
                         f"model) {shapes[:8]}")
    module.load_state_dict(sd)
    return module

