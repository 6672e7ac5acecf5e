"""mimood.data.augment: batched flips/rotations and intensity augmentation keep the image contract."""
import math

import torch

from mimood.data.augment import intensity_augment, spatial_augment


def _batch(b=6):
    """[B, 1, 160, 160] discs with a structured pattern in [0.1, 0.9] on a zero background."""
    yy, xx = torch.meshgrid(torch.arange(160.0), torch.arange(160.0), indexing="ij")
    disc = ((yy - 80) ** 2 / 60 ** 2 + (xx - 75) ** 2 / 50 ** 2) < 1
    pattern = torch.stack([0.5 + 0.4 * torch.sin(xx / (4 + i)) * torch.cos(yy / (6 + i)) for i in range(b)])
    return torch.where(disc, pattern, torch.zeros(()))[:, None]


def test_flip_only_is_an_exact_left_right_flip():
    x = _batch()
    y = spatial_augment(x, torch.Generator().manual_seed(1), max_rotation_deg=0.0, flip_p=1.0)
    assert torch.equal(y, x.flip(-1))
    assert torch.equal(spatial_augment(x, torch.Generator().manual_seed(1), max_rotation_deg=0.0, flip_p=0.0), x)


def test_rotation_keeps_background_zero_and_range_and_is_seeded():
    x = _batch()
    y = spatial_augment(x, torch.Generator().manual_seed(3), max_rotation_deg=10.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    far = torch.zeros(160, 160, dtype=torch.bool)
    far[:8], far[-8:], far[:, :8], far[:, -8:] = True, True, True, True     # well outside any rotated disc
    assert torch.all(y[..., far] == 0)
    assert not torch.allclose(y, x)
    # a rotation by at most 10 degrees about the centre barely changes the brain's area
    assert torch.allclose((y > 0).float().mean(dim=(1, 2, 3)), (x > 0).float().mean(dim=(1, 2, 3)), rtol=0.05)
    assert torch.equal(y, spatial_augment(x, torch.Generator().manual_seed(3), max_rotation_deg=10.0))


def test_rotation_angle_is_bounded():
    # one bright dot at radius 60 from the centre: after rotation it must stay within 10 degrees of arc
    x = torch.zeros(64, 1, 160, 160)
    x[:, 0, 79:81, 139:141] = 1.0
    y = spatial_augment(x, torch.Generator().manual_seed(0), max_rotation_deg=10.0, flip_p=0.0)
    yy, xx = torch.meshgrid(torch.arange(160.0), torch.arange(160.0), indexing="ij")
    w = y[:, 0] / y[:, 0].sum(dim=(1, 2), keepdim=True)
    cy, cx = (w * yy).sum(dim=(1, 2)) - 79.5, (w * xx).sum(dim=(1, 2)) - 79.5
    angles = torch.rad2deg(torch.atan2(cy, cx)).abs()
    assert angles.max() <= 10.5 and angles.max() > 5          # bounded, and actually rotating
    assert torch.allclose(torch.sqrt(cx ** 2 + cy ** 2), torch.full((64,), 60.0), atol=1.0)


def test_intensity_augment_contract():
    x = _batch()
    g = torch.Generator().manual_seed(5)
    y = intensity_augment(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.all(y[x == 0] == 0)
    inside = x > 0
    # per-sample changes are real and different between samples
    diff = (y - x).abs().sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3))
    assert torch.all(diff > 0.01) and diff.std() > 0
    # still the same picture: correlation with the input stays high
    for i in range(x.shape[0]):
        m = inside[i]
        c = torch.corrcoef(torch.stack([x[i][m], y[i][m]]))[0, 1]
        assert c > 0.9 and not math.isnan(c)
    assert torch.equal(y, intensity_augment(x, torch.Generator().manual_seed(5)))
