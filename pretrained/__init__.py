"""Ports of third-party network architectures and checkpoint key maps, so that released
checkpoints load into the domain scripts. The scripts import these modules only when such a
checkpoint (or the architecture) is used; the paper's pipeline does not depend on them.

taming_vqgan  the taming-transformers VQGAN (CompVis/taming-transformers) as released with
              valeoai/Maskgit-pytorch: architecture + checkpoint reader (imagenet_masked.py)
maskgit       valeoai/Maskgit-pytorch: transformer state dict -> ours; its sampler and schedule,
              and the Di4C authors' copy of it (imagenet_masked.py --sampler maskgit | di4c)
tauldr        andrew-cr/tauLDR U-Net checkpoint <-> ours, format detection and strict check
              (cifar10_gaussian.py)
mdlm          MDLM / SDTT / Di4C-SDTT checkpoint readers and key maps; SDTT's ancestral sampler
              (owt_masked.py --sampler sdtt)
"""
