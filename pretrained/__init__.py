"""Ports of third-party network architectures and checkpoint key maps, so that released
checkpoints load into the domain scripts. The scripts import these modules only when such a
checkpoint (or the architecture) is used; the paper's pipeline does not depend on them.

taming_vqgan  the taming-transformers VQGAN (CompVis/taming-transformers) as released with
              valeoai/Maskgit-pytorch: architecture + checkpoint reader (imagenet_masked.py)
maskgit       valeoai/Maskgit-pytorch transformer state dict -> ours (imagenet_masked.py)
tauldr        andrew-cr/tauLDR U-Net checkpoint <-> ours, format detection and strict check
              (cifar10_gaussian.py)
"""
