"""--lam_dim k (lambda ~ U[0,1]^k; the paper uses k = 1) in the three networks: the student
starts exactly at the teacher for every lambda, and once its weights move every one of the k
coordinates changes the output (each is embedded, none is dropped)."""
import pytest
import torch

import cifar10_gaussian as pix
import di4c_core as core
import imagenet_masked as img
import owt_masked as txt


def networks(k):
    """(teacher, student with lambda dimension k, (x_t, t, cond)) of each domain's smoke size."""
    g = torch.Generator().manual_seed(0)
    cfg = pix.make_config(pix.Config, preset="smoke")
    torch.manual_seed(0)
    teacher = pix.build_unet(cfg, 1, 8, lam=0)
    yield ("pixels", teacher, pix.build_unet(cfg, 1, 8, lam=k),
           (torch.randint(0, cfg.S, (3, 64), generator=g), torch.rand(3, generator=g), None))
    cfg = img.make_config(img.Config, preset="smoke")
    meta = {"K": 17, "grid": 8, "n_classes": 5}
    teacher = img.build_model(cfg, meta)
    yield ("images", teacher, img.build_model(cfg, meta, lam_dim=k),
           (torch.randint(0, 18, (3, 64), generator=g), None, torch.tensor([0, 3, 4])))
    cfg = txt.make_config(txt.Config, preset="smoke")
    teacher = txt.build_model(cfg, 50)
    x_t = torch.randint(0, 49, (3, 16), generator=g)
    x_t[:, ::2] = 49                                  # [MASK]: SUBS copies the revealed tokens
    yield ("text", teacher, txt.build_model(cfg, 50, lam_dim=k), (x_t, torch.rand(3, generator=g), None))


@pytest.mark.parametrize("k", [1, 3])
def test_every_lambda_coordinate_reaches_the_output(k):
    for domain, teacher, student, (x_t, t, cond) in networks(k):
        student = core.student_from_teacher(student, teacher.state_dict()).eval()
        assert student.lam_dim == k, domain
        lam = torch.full((3, k), 0.3)
        with torch.no_grad():
            want = teacher.eval()(x_t, t, None, cond)
            assert torch.equal(student(x_t, t, lam, cond), want), domain      # zero-initialised
            g = torch.Generator().manual_seed(1)
            for p in student.parameters():     # moves the lambda path off zero (and MDLM's
                p.add_(0.1 * torch.randn(p.shape, generator=g))   # zero-initialised adaLN)
            base = student(x_t, t, lam, cond)
            for i in range(k):
                moved = lam.clone()
                moved[:, i] = 0.9
                assert (student(x_t, t, moved, cond) - base).abs().max() > 1e-4, (domain, i)
